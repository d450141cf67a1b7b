"""Grouped variable-rank shrink: ``out[m, :r_e] = c_e * in[m] @ L[e, :r_e].T``, zero beyond ``r_e``.

Grid: one axis of (row tile, rank block) pairs in GROUP_M order (see :mod:`.tiles`). A rank
block at or past ``r_e`` does no math and only stores its zeros, so expert ``e`` costs
``ceil(r_e / BLOCK_R)`` blocks. K is looped in BLOCK_K tiles. Serves the forward ``u = x A^T``
(L = A) and the backward ``s dY B`` (L = B read as ``[E, R, N]`` through its strides, the rank
axis then contiguous). The L tile is loaded masked by the pool size ``R`` (full-width vector
loads whatever ``r_e`` is); slots ``>= r_e`` (possibly NaN) only reach output columns
``>= r_e``, which are zeroed before the store. Accumulates in ACC_DTYPE (fp64 for fp64 inputs).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import expert_tile, grouped_pid


@triton.jit(do_not_specialize=["T"])
def _grouped_lora_shrink_kernel(
    in_ptr, stride_im, stride_ik,  # in: [T, K]
    l_ptr, stride_le, stride_lr, stride_lk,  # L: [E, R, K] (any strides)
    out_ptr, stride_om, stride_or,  # out: [T, R]
    ranks_ptr, offsets_ptr, scale_ptr,  # [E], [E+1], [E]
    T, E, K, R,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    num_m = tl.cdiv(T, BLOCK_M) + E
    pid_m, pid_r = grouped_pid(tl.program_id(0), num_m, tl.cdiv(R, BLOCK_R), GROUP_M)
    e, row_start, row_end = expert_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if e >= E:
        return
    rank = tl.load(ranks_ptr + e).to(tl.int32)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_mask = offs_m < row_end
    r_pool = offs_r < R
    rows = offs_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    if pid_r * BLOCK_R < rank:
        l_base = l_ptr + e.to(tl.int64) * stride_le
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(
                in_ptr + rows[:, None] * stride_im + offs_k[None, :] * stride_ik,
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            a = tl.load(
                l_base + offs_k[:, None] * stride_lk + offs_r[None, :] * stride_lr,
                mask=k_mask[:, None] & r_pool[None, :],
                other=0.0,
            )
            acc = tl.dot(x.to(DOT_DTYPE), a.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + e).to(ACC_DTYPE)
        # column r of acc only ever saw L[e, r]: zeroing columns >= r_e drops inactive slots
        acc = tl.where((offs_r < rank)[None, :], acc, 0.0)
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & r_pool[None, :])
