"""Device-side tile scheduling over expert-sorted rows, and the one dot every kernel uses.

Row-tiled kernels launch ``cdiv(T, BLOCK_M) + E`` programs: an upper bound on
``sum_e cdiv(n_e, BLOCK_M)`` that needs no knowledge of the group sizes on the host
(scattermoe's grid). Each program finds its expert from ``offsets`` in registers
(``BLOCK_E >= E`` lanes, a cumulative sum of per-expert tile counts); programs past
the last tile exit at once. No ``.item()``, no host sync: CUDA-graph friendly.
Row tiles sit on grid axis 1 (the other axis, rank or column blocks, varies fastest so
neighbouring programs share the row tile in L2); CUDA caps that axis at 65535 tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def expert_tile(pid_m, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # Returns (e, first row of this tile, end row of group e); e >= E means "no work".
    e_idx = tl.arange(0, BLOCK_E)
    e_mask = e_idx < E
    lo = tl.load(offsets_ptr + e_idx, mask=e_mask, other=0).to(tl.int32)
    hi = tl.load(offsets_ptr + e_idx + 1, mask=e_mask, other=0).to(tl.int32)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(tiles, 0)
    # The owner is the first expert whose cumulative tile count exceeds pid_m; experts
    # with no rows add no tiles, so they are skipped without a branch.
    e = tl.sum((cum <= pid_m).to(tl.int32), 0)
    own = e_idx == e
    first_tile = tl.sum(tl.where(own, cum - tiles, 0), 0)
    row_start = tl.sum(tl.where(own, lo, 0), 0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(own, hi, 0), 0)
    return e, row_start, row_end


@triton.jit
def mma(a, b, acc, DOT_DTYPE: tl.constexpr, ALLOW_TF32: tl.constexpr):
    # Operands are converted to DOT_DTYPE right before the dot: fp32 under the interpreter
    # (it mishandles bf16 arithmetic) and for the fp32 intermediates u / s*dY*B on GPU this
    # is the storage dtype of the other operand (tensor cores), with fp32 accumulation.
    if ALLOW_TF32:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="tf32")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="ieee")
