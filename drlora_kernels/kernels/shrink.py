"""Grouped variable-rank shrink: ``out[m, :r_e] = c_e * in[m] @ L[e, :r_e].T``, zero beyond ``r_e``.

Grid: (rank blocks of BLOCK_R) x (row tiles from ``offsets``, see :mod:`.tiles`). A rank block
at or past ``r_e`` does no math and only stores its zeros, so expert ``e`` costs
``ceil(r_e / BLOCK_R)`` blocks and never reads ``L[e, r_e:]``. K is looped in BLOCK_K tiles.
Serves the forward ``u = x A^T`` (L = A) and the backward ``s dY B`` (L = B read as
``[E, R, N]`` through its strides). Accumulates in ACC_DTYPE (fp32, fp64 for fp64 inputs).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import expert_tile, mma


@triton.jit
def _grouped_lora_shrink_kernel(
    in_ptr, stride_im, stride_ik,  # in: [T, K]
    l_ptr, stride_le, stride_lr, stride_lk,  # L: [E, R, K] (any strides)
    out_ptr, stride_om, stride_or,  # out: [T, R]
    ranks_ptr, offsets_ptr, scale_ptr,  # [E], [E+1], [E]
    E, K, R,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, ALLOW_TF32: tl.constexpr,
):  # fmt: skip
    pid_r = tl.program_id(0)  # fastest: the rank blocks of one row tile share its x tile in L2
    pid_m = tl.program_id(1)
    e, row_start, row_end = expert_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if e >= E:
        return
    rank = tl.load(ranks_ptr + e).to(tl.int32)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_mask = offs_m < row_end
    rows = offs_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    if pid_r * BLOCK_R < rank:
        r_mask = offs_r < rank  # never read slots >= r_e (they may hold NaN)
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
                mask=k_mask[:, None] & r_mask[None, :],
                other=0.0,
            )
            acc = mma(x, a, acc, DOT_DTYPE, ALLOW_TF32)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + e).to(ACC_DTYPE)
    out_mask = m_mask[:, None] & (offs_r < R)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
