"""Fused grouped base GEMM + variable-rank expand, one accumulator, one write of the output tile.

``out[m, j] = sum_i in[m, i] W[e, j, i]  (HAS_BASE)  +  sum_{r < r_e} (c_e v[m, r]) L[e, j, r]``.
Grid: one axis of (row tile, column block) pairs in GROUP_M order (see :mod:`.tiles`). The base
part loops I in BLOCK_I tiles; the LoRA part loops only ``ceil(r_e / BLOCK_R)`` rank blocks
(none for rank 0) into the same accumulator: ``c_e`` is folded into the fp32 ``v`` tile before
it is rounded for the dot, so one ``[BLOCK_M, BLOCK_J]`` accumulator lives in registers.
The rank axis is the contraction axis here, so both operands are zeroed past ``r_e`` after
full-width loads (masked only by the pool size ``R``): NaN in an inactive slot never meets a
product. Serves the forward ``y = x W^T + s u B^T``, the LoRA-only expand (no W), and the
backward ``dX = dY W + gb A`` (W read as ``[E, K, N]``, A as ``[E, K, R]`` through strides).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import expert_tile, grouped_pid


@triton.jit(do_not_specialize=["T"])
def _grouped_lora_base_expand_kernel(
    in_ptr, stride_im, stride_ii,  # in: [T, I] (unused without HAS_BASE)
    w_ptr, stride_we, stride_wj, stride_wi,  # W: [E, J, I]
    v_ptr, stride_vm, stride_vr,  # v: [T, R] (fp32 intermediate)
    l_ptr, stride_le, stride_lj, stride_lr,  # L: [E, J, R]
    out_ptr, stride_om, stride_oj,  # out: [T, J]
    ranks_ptr, offsets_ptr, scale_ptr,  # [E], [E+1], [E]
    T, E, I, J, R,
    HAS_BASE: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    num_m = tl.cdiv(T, BLOCK_M) + E
    pid_m, pid_j = grouped_pid(tl.program_id(0), num_m, tl.cdiv(J, BLOCK_J), GROUP_M)
    e, row_start, row_end = expert_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if e >= E:
        return
    e64 = e.to(tl.int64)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    m_mask = offs_m < row_end
    j_mask = offs_j < J
    rows = offs_m.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=ACC_DTYPE)
    if HAS_BASE:
        w_base = w_ptr + e64 * stride_we
        for i0 in range(0, I, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            i_mask = offs_i < I
            x = tl.load(
                in_ptr + rows[:, None] * stride_im + offs_i[None, :] * stride_ii,
                mask=m_mask[:, None] & i_mask[None, :],
                other=0.0,
            )
            w = tl.load(
                w_base + offs_i[:, None] * stride_wi + offs_j[None, :] * stride_wj,
                mask=i_mask[:, None] & j_mask[None, :],
                other=0.0,
            )
            acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)

    rank = tl.load(ranks_ptr + e).to(tl.int32)
    c = 1.0
    if HAS_SCALE:
        c = tl.load(scale_ptr + e).to(ACC_DTYPE)
    l_base = l_ptr + e64 * stride_le
    for r0 in range(0, rank, BLOCK_R):  # only the active rank blocks; rank 0 runs no iteration
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_pool = offs_r < R
        active = offs_r < rank
        v = tl.load(
            v_ptr + rows[:, None] * stride_vm + offs_r[None, :] * stride_vr,
            mask=m_mask[:, None] & r_pool[None, :],
            other=0.0,
        )
        b = tl.load(
            l_base + offs_r[:, None] * stride_lr + offs_j[None, :] * stride_lj,
            mask=r_pool[:, None] & j_mask[None, :],
            other=0.0,
        )
        v = tl.where(active[None, :], v.to(ACC_DTYPE) * c, 0.0)
        b = tl.where(active[:, None], b, 0.0)
        acc = tl.dot(v.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_j[None, :] * stride_oj
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & j_mask[None, :])
