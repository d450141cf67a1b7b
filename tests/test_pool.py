"""The padded rank pool: growth in place, output continuity, errors."""

from __future__ import annotations

import math

import pytest
import torch

import drlora_kernels as dk
from drlora_kernels.pool import RankPool, lora_scale


def _pool(**kw):
    args = dict(num_experts=4, in_features=24, out_features=16, r_max=8, r_init=2, r_target=4)
    args.update(kw)
    return RankPool(**args)


def test_shapes_init_and_scale():
    pool = _pool()
    assert pool.lora_A.shape == (4, 8, 24) and pool.lora_B.shape == (4, 16, 8)
    assert pool.ranks.dtype == torch.int32 and pool.ranks.tolist() == [2, 2, 2, 2]
    assert (pool.lora_B == 0).all()
    bound = 1 / math.sqrt(24)  # PEFT's kaiming_uniform(a=sqrt(5)) on [r, in]
    assert pool.lora_A.abs().max() <= bound and pool.lora_A.abs().max() > 0.8 * bound
    assert pool.scaling == pytest.approx(2 * 4 / 4)  # alpha defaults to 2 * r_target
    assert lora_scale(16, 4, "rslora") == pytest.approx(8.0)
    assert "ranks" in dict(pool.named_buffers()) and "ranks" in pool.state_dict()


def test_grow_never_reallocates_and_keeps_output():
    pool = _pool()
    with torch.no_grad():
        pool.lora_B.normal_()
    pool.lora_B.data[:, :, 2:] = 0  # as if freshly initialised beyond rank 2
    ptr_a, ptr_b, param_a = pool.lora_A.data_ptr(), pool.lora_B.data_ptr(), pool.lora_A
    x = torch.randn(10, 24)
    offsets = torch.tensor([0, 3, 3, 7, 10], dtype=torch.int32)
    before = dk.grouped_lora(x, pool.lora_A, pool.lora_B, pool.ranks, offsets, pool.scaling)
    old_a = pool.lora_A.detach().clone()
    changes = pool.grow([0, 2], [3, 6], generator=torch.Generator().manual_seed(1))
    assert changes == [(0, 2, 5), (2, 2, 8)]
    assert pool.ranks.tolist() == [5, 2, 8, 2]
    assert (
        pool.lora_A.data_ptr() == ptr_a
        and pool.lora_B.data_ptr() == ptr_b
        and pool.lora_A is param_a
    )
    after = dk.grouped_lora(x, pool.lora_A, pool.lora_B, pool.ranks, offsets, pool.scaling)
    torch.testing.assert_close(after, before)  # new B columns are zero
    assert not torch.equal(pool.lora_A[0, 2:5], old_a[0, 2:5])  # re-drawn
    torch.testing.assert_close(pool.lora_A[1], old_a[1])  # untouched experts unchanged
    torch.testing.assert_close(pool.lora_A[0, :2], old_a[0, :2])  # active rows unchanged


def test_seeded_growth_is_reproducible():
    a, b = _pool(), _pool()
    a.grow([1, 3], [2, 4], seeds=[11, 12])
    b.grow([1, 3], [2, 4], seeds=[11, 12])
    torch.testing.assert_close(a.lora_A[1, 2:4], b.lora_A[1, 2:4])
    torch.testing.assert_close(a.lora_A[3, 2:6], b.lora_A[3, 2:6])


@pytest.mark.parametrize(
    "ids, amounts, match",
    [
        ([0], [7], "exceeds r_max=8"),
        ([0], [-1], "amounts must be >= 0"),
        ([4], [1], r"expert_ids holds 4"),
        ([0, 0], [1, 1], "must not repeat"),
        ([0, 1], [1], "same length"),
    ],
    ids=["overflow", "negative", "bad-id", "repeat", "length"],
)
def test_grow_errors_leave_pool_untouched(ids, amounts, match):
    pool = _pool()
    before = pool.lora_A.detach().clone()
    with pytest.raises(ValueError, match=match):
        pool.grow(ids, amounts)
    assert pool.ranks.tolist() == [2, 2, 2, 2]
    assert torch.equal(pool.lora_A, before)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(r_init=9), "r_init"),
        (dict(r_max=0), "r_max"),
        (dict(r_target=9), "r_target"),
        (dict(num_experts=0), "num_experts"),
        (dict(init="gaussian"), "init"),
        (dict(scaling="bogus"), "scaling"),
    ],
)
def test_constructor_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _pool(**kw)


def test_active_mask_and_repr():
    pool = _pool()
    pool.grow([3], [6])
    mask = pool.active_mask()
    assert mask.sum(1).tolist() == [2, 2, 2, 8]
    assert "r_max=8" in repr(pool) and pool.total_rank == 14
