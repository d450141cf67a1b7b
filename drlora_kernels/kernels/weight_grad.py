"""Per-expert weight gradients without atomics, with the rank-importance sums as an epilogue.

``out[e, i, j] = c_e * sum_{m in group e} left[m, i] * right[m, j]``: one program owns one
``[BLOCK_I, BLOCK_J]`` tile of one expert and loops over that expert's rows in BLOCK_M chunks,
so the reduction order is fixed (deterministic) and no atomics are needed. RANK_AXIS says which
output axis is the rank axis (0: ``dA [E, R, K]``, 1: ``dB [E, N, R]``, -1: ``dW``, no rank):
tiles past ``r_e`` on it do no math and store zeros (inactive slots get exactly zero gradient).
WITH_IMP: the epilogue sums ``|P * out|`` over the non-rank axis of the tile while it is in
registers (P = the parameter, A or B) and stores one partial per (slot, tile); a fixed-order
sum over those few partials finishes it, so saliency costs no extra pass over dA/dB.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import mma


@triton.jit
def _grouped_weight_grad_kernel(
    left_ptr, stride_lm, stride_li,  # left: [T, I]
    right_ptr, stride_rm, stride_rj,  # right: [T, J]
    out_ptr, stride_oe, stride_oi, stride_oj,  # out: [E, I, J]
    p_ptr, stride_pe, stride_pi, stride_pj,  # P: [E, I, J], the parameter (WITH_IMP only)
    imp_ptr, stride_ie, stride_ir, stride_ib,  # importance partials: [E, R, n_tiles_other_axis]
    ranks_ptr, offsets_ptr, scale_ptr,  # [E], [E+1], [E]
    I, J,
    RANK_AXIS: tl.constexpr, HAS_SCALE: tl.constexpr, WITH_IMP: tl.constexpr,
    STORE_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, ALLOW_TF32: tl.constexpr,
):  # fmt: skip
    # Grid (rank-axis blocks, other-axis blocks, E): the rank blocks of one tile run side by side
    # and share its x / dY reads in L2 instead of re-reading them from HBM.
    if RANK_AXIS == 1:
        pid_j = tl.program_id(0)
        pid_i = tl.program_id(1)
    else:
        pid_i = tl.program_id(0)
        pid_j = tl.program_id(1)
    e = tl.program_id(2)
    e64 = e.to(tl.int64)
    row_lo = tl.load(offsets_ptr + e).to(tl.int32)
    row_hi = tl.load(offsets_ptr + e + 1).to(tl.int32)
    i_lim = I
    j_lim = J
    if RANK_AXIS == 0:
        i_lim = tl.load(ranks_ptr + e).to(tl.int32)
    if RANK_AXIS == 1:
        j_lim = tl.load(ranks_ptr + e).to(tl.int32)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_act = offs_i < i_lim
    j_act = offs_j < j_lim

    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=ACC_DTYPE)
    if (pid_i * BLOCK_I < i_lim) & (pid_j * BLOCK_J < j_lim):
        for m0 in range(row_lo, row_hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < row_hi
            rows = offs_m.to(tl.int64)
            lt = tl.load(  # left^T tile [BLOCK_I, BLOCK_M]
                left_ptr + offs_i[:, None] * stride_li + rows[None, :] * stride_lm,
                mask=i_act[:, None] & m_mask[None, :],
                other=0.0,
            )
            rt = tl.load(
                right_ptr + rows[:, None] * stride_rm + offs_j[None, :] * stride_rj,
                mask=m_mask[:, None] & j_act[None, :],
                other=0.0,
            )
            acc = mma(lt, rt, acc, DOT_DTYPE, ALLOW_TF32)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + e).to(ACC_DTYPE)

    if STORE_OUT:
        out_ptrs = (
            out_ptr + e64 * stride_oe + offs_i[:, None] * stride_oi + offs_j[None, :] * stride_oj
        )
        tl.store(
            out_ptrs,
            acc.to(out_ptr.dtype.element_ty),
            mask=(offs_i < I)[:, None] & (offs_j < J)[None, :],
        )

    if WITH_IMP:
        p = tl.load(
            p_ptr + e64 * stride_pe + offs_i[:, None] * stride_pi + offs_j[None, :] * stride_pj,
            mask=i_act[:, None] & j_act[None, :],
            other=0.0,
        ).to(ACC_DTYPE)
        prod = tl.abs(p * acc)  # exactly 0 on inactive slots: p and acc are both masked to 0 there
        if RANK_AXIS == 0:
            part = tl.sum(prod, 1)
            imp_ptrs = imp_ptr + e64 * stride_ie + offs_i * stride_ir + pid_j * stride_ib
            tl.store(imp_ptrs, part.to(imp_ptr.dtype.element_ty), mask=offs_i < I)
        if RANK_AXIS == 1:
            part = tl.sum(prod, 0)
            imp_ptrs = imp_ptr + e64 * stride_ie + offs_j * stride_ir + pid_i * stride_ib
            tl.store(imp_ptrs, part.to(imp_ptr.dtype.element_ty), mask=offs_j < J)
