"""Device-side scheduling over expert-sorted rows, the L2-friendly tile order, and the one dot.

Row-tiled kernels launch ``cdiv(T, BLOCK_M) + E`` row tiles: an upper bound on
``sum_e cdiv(n_e, BLOCK_M)`` that needs no knowledge of the group sizes on the host
(scattermoe's grid). Each program finds its expert from ``offsets`` in registers
(``BLOCK_E >= E`` lanes, a cumulative sum of per-expert tile counts); programs past
the last tile exit at once. No ``.item()``, no host sync: CUDA-graph friendly.
The same lookup with a runtime chunk size splits the weight-gradient reduction of
large groups into row chunks (:func:`row_chunk`). Dots are written inline as
``tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)``: operands are
converted right before the dot (fp32 under the interpreter, which mishandles bf16 arithmetic;
on GPU the storage dtype, so the fp32 intermediates u / s*dY*B meet bf16/fp16 weights on tensor
cores), ``DOT_PRECISION`` is "tf32" or "ieee" for fp32.

Tiles are numbered on one grid axis and mapped to (row tile, column tile) in groups of
``GROUP_M`` row tiles (the order of Triton's matmul tutorial and vLLM's fused_moe): the
programs in flight share a few row tiles and a band of columns of ``W``, so both stay in L2.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_pid(pid, num_m, num_n, GROUP_M: tl.constexpr):
    # (pid_m, pid_n) of program ``pid``: columns vary fastest within a group of GROUP_M rows.
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def expert_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E: tl.constexpr):
    # Returns (e, first row of this tile, end row of group e); e >= E means "no work".
    # (Self-contained and frugal on purpose: under the interpreter every reduction and
    # nested jit call costs milliseconds, and this runs once per program.)
    e_idx = tl.arange(0, BLOCK_E)
    e_mask = e_idx < E
    lo = tl.load(offsets_ptr + e_idx, mask=e_mask, other=0).to(tl.int32)
    hi = tl.load(offsets_ptr + e_idx + 1, mask=e_mask, other=0).to(tl.int32)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    # The owner is the first expert whose cumulative tile count exceeds pid_m; experts
    # with no rows add no tiles, so they are skipped without a branch.
    e = tl.sum((tl.cumsum(tiles, 0) <= pid_m).to(tl.int32), 0)
    first_tile = tl.sum(tl.where(e_idx < e, tiles, 0), 0)
    row_start = tl.load(offsets_ptr + e, mask=e < E, other=0).to(tl.int32)
    row_end = tl.load(offsets_ptr + e + 1, mask=e < E, other=0).to(tl.int32)
    return e, row_start + (pid_m - first_tile) * BLOCK_M, row_end


@triton.jit
def row_chunk(work, offsets_ptr, E, CHUNK, BLOCK_E: tl.constexpr):
    # Work item ``work`` of the weight-gradient split: rows [start, end) of expert e, the
    # number of chunks of e, and its slot in the partials workspace (meaningful only when
    # e has more than one chunk: single-chunk experts write their gradient directly).
    # Slots go, in expert order, to the chunks of experts with more than one chunk.
    e_idx = tl.arange(0, BLOCK_E)
    e_mask = e_idx < E
    lo = tl.load(offsets_ptr + e_idx, mask=e_mask, other=0).to(tl.int32)
    hi = tl.load(offsets_ptr + e_idx + 1, mask=e_mask, other=0).to(tl.int32)
    chunks = (hi - lo + CHUNK - 1) // CHUNK
    e = tl.sum((tl.cumsum(chunks, 0) <= work).to(tl.int32), 0)
    before = e_idx < e
    c = work - tl.sum(tl.where(before, chunks, 0), 0)
    slot = tl.sum(tl.where(before & (chunks > 1), chunks, 0), 0) + c
    lo_e = tl.load(offsets_ptr + e, mask=e < E, other=0).to(tl.int32)
    hi_e = tl.load(offsets_ptr + e + 1, mask=e < E, other=0).to(tl.int32)
    start = lo_e + c * CHUNK
    return e, start, tl.minimum(start + CHUNK, hi_e), (hi_e - lo_e + CHUNK - 1) // CHUNK, slot


@triton.jit
def expert_chunks(e, offsets_ptr, E, CHUNK, BLOCK_E: tl.constexpr):
    # (rows of expert e < E, its number of chunks, its first workspace slot), as in row_chunk
    e_idx = tl.arange(0, BLOCK_E)
    e_mask = e_idx < E
    lo = tl.load(offsets_ptr + e_idx, mask=e_mask, other=0).to(tl.int32)
    hi = tl.load(offsets_ptr + e_idx + 1, mask=e_mask, other=0).to(tl.int32)
    chunks = (hi - lo + CHUNK - 1) // CHUNK
    n_rows = tl.load(offsets_ptr + e + 1).to(tl.int32) - tl.load(offsets_ptr + e).to(tl.int32)
    slot0 = tl.sum(tl.where((e_idx < e) & (chunks > 1), chunks, 0), 0)
    return n_rows, (n_rows + CHUNK - 1) // CHUNK, slot0
