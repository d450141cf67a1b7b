"""Per-expert weight gradients, rows split into chunks, reduced in a fixed order without atomics.

``out[e, i, j] = c_e * sum_{m in group e} left[m, i] * right[m, j]`` (``dA = gb^T x``,
``dB = s dY^T u``, ``dW = dY^T x``). The rows of each expert are cut into ``CHUNK``-row pieces
(``CHUNK`` chosen on the host from shapes only, see ``ops/triton_configs.py``), so a zipf-skewed
expert is many short programs instead of one long tail. Pass 1 (:func:`_grouped_weight_grad_kernel`):
one program per (output tile, chunk); an expert with a single chunk is finished there (scaled,
masked, stored); the chunks of a larger expert store fp32 partial tiles into a workspace.
Pass 2 (:func:`_weight_grad_reduce_kernel`): one program per (output tile, expert) sums those
partials in chunk order (deterministic: same order every run, no atomics), and writes the
zeros of experts without rows. RANK_AXIS names the rank axis of the output (0: ``dA [E, R, K]``,
1: ``dB [E, N, R]``, -1: ``dW``): tiles past ``r_e`` do no math, and slots ``>= r_e`` are
zeroed before the store, so inactive slots get exactly zero gradient.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import expert_chunks, grouped_pid, row_chunk


@triton.jit
def _finish(acc, out_ptr, stride_oe, stride_oi, stride_oj, ranks_ptr, scale_ptr, e, offs_i, offs_j,
            I, J, RANK_AXIS: tl.constexpr, HAS_SCALE: tl.constexpr, ACC_DTYPE: tl.constexpr):  # fmt: skip
    # scale, zero the slots >= r_e on the rank axis, store the tile of out[e]
    if RANK_AXIS == 0:
        acc = tl.where((offs_i < tl.load(ranks_ptr + e))[:, None], acc, 0.0)
    if RANK_AXIS == 1:
        acc = tl.where((offs_j < tl.load(ranks_ptr + e))[None, :], acc, 0.0)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + e).to(ACC_DTYPE)
    ptrs = (
        out_ptr
        + e.to(tl.int64) * stride_oe
        + offs_i[:, None] * stride_oi
        + offs_j[None, :] * stride_oj
    )
    tl.store(
        ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_i < I)[:, None] & (offs_j < J)[None, :]
    )


@triton.jit(do_not_specialize=["CHUNK"])
def _grouped_weight_grad_kernel(
    left_ptr, stride_lm, stride_li,  # left: [T, I]
    right_ptr, stride_rm, stride_rj,  # right: [T, J]
    out_ptr, stride_oe, stride_oi, stride_oj,  # out: [E, I, J]
    ws_ptr, stride_wp, stride_wi, stride_wj,  # fp32 partials: [slots, I, J]
    ranks_ptr, offsets_ptr, scale_ptr,  # [E], [E+1], [E]
    E, I, J, CHUNK,
    RANK_AXIS: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # axis 0: output tiles (GROUP_M order: neighbours share left/right columns in L2);
    # axis 1: row chunks, the experts' chunks one after another
    pid_i, pid_j = grouped_pid(tl.program_id(0), tl.cdiv(I, BLOCK_I), tl.cdiv(J, BLOCK_J), GROUP_M)
    e, row_lo, row_hi, n_chunks, slot = row_chunk(tl.program_id(1), offsets_ptr, E, CHUNK, BLOCK_E)
    if e >= E:
        return
    rank = tl.load(ranks_ptr + e).to(tl.int32)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_in = offs_i < I
    j_in = offs_j < J
    # a tile whose first slot on the rank axis is inactive is all zeros: no math
    lead = pid_i * BLOCK_I if RANK_AXIS == 0 else (pid_j * BLOCK_J if RANK_AXIS == 1 else 0)
    active = (lead < rank) | (RANK_AXIS == -1)

    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=ACC_DTYPE)
    if active:
        for m0 in range(row_lo, row_hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < row_hi
            rows = offs_m.to(tl.int64)
            lt = tl.load(  # left^T tile [BLOCK_I, BLOCK_M]
                left_ptr + offs_i[:, None] * stride_li + rows[None, :] * stride_lm,
                mask=i_in[:, None] & m_mask[None, :],
                other=0.0,
            )
            rt = tl.load(
                right_ptr + rows[:, None] * stride_rm + offs_j[None, :] * stride_rj,
                mask=m_mask[:, None] & j_in[None, :],
                other=0.0,
            )
            acc = tl.dot(lt.to(DOT_DTYPE), rt.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)

    if n_chunks == 1:
        _finish(acc, out_ptr, stride_oe, stride_oi, stride_oj, ranks_ptr, scale_ptr, e, offs_i,
                offs_j, I, J, RANK_AXIS, HAS_SCALE, ACC_DTYPE)  # fmt: skip
    elif active:  # inactive tiles of split experts are zero-filled by pass 2 without reading
        ws = ws_ptr + slot.to(tl.int64) * stride_wp
        ptrs = ws + offs_i[:, None] * stride_wi + offs_j[None, :] * stride_wj
        tl.store(ptrs, acc, mask=i_in[:, None] & j_in[None, :])


@triton.jit(do_not_specialize=["CHUNK"])
def _weight_grad_reduce_kernel(
    ws_ptr, stride_wp, stride_wi, stride_wj,  # fp32 partials: [slots, I, J]
    out_ptr, stride_oe, stride_oi, stride_oj,  # out: [E, I, J]
    ranks_ptr, offsets_ptr, scale_ptr,  # [E], [E+1], [E]
    E, I, J, CHUNK,
    RANK_AXIS: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    e = tl.program_id(1)
    n_rows, n_chunks, slot0 = expert_chunks(e, offsets_ptr, E, CHUNK, BLOCK_E)
    if (n_rows > 0) & (n_chunks == 1):
        return  # pass 1 finished this expert
    pid_i = tl.program_id(0) // tl.cdiv(J, BLOCK_J)
    pid_j = tl.program_id(0) % tl.cdiv(J, BLOCK_J)
    rank = tl.load(ranks_ptr + e).to(tl.int32)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    in_bounds = (offs_i < I)[:, None] & (offs_j < J)[None, :]
    lead = pid_i * BLOCK_I if RANK_AXIS == 0 else (pid_j * BLOCK_J if RANK_AXIS == 1 else 0)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=ACC_DTYPE)
    if (lead < rank) | (RANK_AXIS == -1):
        ptrs = ws_ptr + offs_i[:, None] * stride_wi + offs_j[None, :] * stride_wj
        for c in range(0, n_chunks):  # fixed order: bit-identical on every run
            acc += tl.load(ptrs + (slot0 + c).to(tl.int64) * stride_wp, mask=in_bounds, other=0.0)
    _finish(acc, out_ptr, stride_oe, stride_oi, stride_oj, ranks_ptr, scale_ptr, e, offs_i, offs_j,
            I, J, RANK_AXIS, HAS_SCALE, ACC_DTYPE)  # fmt: skip
