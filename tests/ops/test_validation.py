"""Bad input gets a ValueError/TypeError naming the argument, never a kernel crash."""

from __future__ import annotations

import pytest
import torch

import drlora_kernels as dk
from tests.helpers import make_problem


@pytest.fixture
def p():
    return make_problem(E=4, K=16, N=12, R=8, group_sizes=[3, 0, 5, 2], ranks=[2, 8, 0, 4])


def _call(p, backend="reference", **over):
    args = dict(
        x=p.x, lora_a=p.lora_a, lora_b=p.lora_b, ranks=p.ranks, offsets=p.offsets, scale=p.scale
    )
    args.update(over)
    return dk.grouped_lora(**args, backend=backend)


@pytest.mark.parametrize(
    "override, exc, match",
    [
        (lambda p: dict(x=p.x[:, :-1]), ValueError, "lora_a"),
        (lambda p: dict(x=p.x[None]), ValueError, "x must be 2-D"),
        (lambda p: dict(lora_a=p.lora_a[:, :, :-1]), ValueError, "lora_a"),
        (lambda p: dict(lora_b=p.lora_b[:, :, :-1]), ValueError, "lora_b"),
        (lambda p: dict(lora_b=p.lora_b[:-1]), ValueError, "lora_b"),
        (lambda p: dict(x=p.x.double()), TypeError, "dtype"),
        (lambda p: dict(x=p.x.int()), TypeError, "x has dtype"),
        (lambda p: dict(x="not a tensor"), TypeError, "x must be a torch.Tensor"),
        (lambda p: dict(ranks=p.ranks.float()), TypeError, "ranks"),
        (lambda p: dict(ranks=p.ranks[:-1]), ValueError, "ranks must have shape"),
        (
            lambda p: dict(ranks=torch.tensor([2, 9, 0, 4], dtype=torch.int32)),
            ValueError,
            r"ranks\[1\] = 9",
        ),
        (
            lambda p: dict(ranks=torch.tensor([2, -1, 0, 4], dtype=torch.int32)),
            ValueError,
            "ranks out of range",
        ),
        (lambda p: dict(offsets=p.offsets[:-1]), ValueError, "offsets must have shape"),
        (
            lambda p: dict(offsets=torch.tensor([1, 3, 3, 8, 10], dtype=torch.int32)),
            ValueError,
            r"offsets\[0\]",
        ),
        (
            lambda p: dict(offsets=torch.tensor([0, 3, 3, 8, 9], dtype=torch.int32)),
            ValueError,
            r"offsets\[-1\]",
        ),
        (
            lambda p: dict(offsets=torch.tensor([0, 5, 3, 8, 10], dtype=torch.int32)),
            ValueError,
            "non-decreasing",
        ),
        (lambda p: dict(offsets=p.offsets.float()), TypeError, "offsets"),
        (lambda p: dict(scale=torch.ones(3)), ValueError, "scale"),
    ],
    ids=[
        "x-K-mismatch",
        "x-3d",
        "a-K-mismatch",
        "b-R-mismatch",
        "b-E-mismatch",
        "dtype-mismatch",
        "x-int",
        "x-not-tensor",
        "ranks-float",
        "ranks-short",
        "rank-above-R",
        "rank-negative",
        "offsets-short",
        "offsets-not-zero",
        "offsets-end",
        "offsets-non-monotone",
        "offsets-float",
        "scale-shape",
    ],
)
def test_bad_input_names_argument(p, backend, override, exc, match):
    with pytest.raises(exc, match=match):
        _call(p, backend, **override(p))


def test_bad_base_weight(p):
    with pytest.raises(ValueError, match="w must have shape"):
        dk.grouped_lora_base(p.x, p.w[:, :-1], p.lora_a, p.lora_b, p.ranks, p.offsets, p.scale)
    with pytest.raises(TypeError, match="w has dtype"):
        dk.grouped_lora_base(p.x, p.w.double(), p.lora_a, p.lora_b, p.ranks, p.offsets, p.scale)


def test_device_mismatch_is_named(p):
    meta_ranks = p.ranks.to("meta")
    with pytest.raises(ValueError, match="ranks is on meta"):
        _call(p, ranks=meta_ranks)


def test_unknown_backend_is_rejected(p):
    with pytest.raises(ValueError, match="backend must be one of"):
        _call(p, backend="cutlass")


def test_unavailable_backend_says_why(p, monkeypatch):
    from drlora_kernels.ops import registry

    monkeypatch.setitem(registry._modules, "native", None)
    monkeypatch.setitem(registry._unavailable, "native", "pretend it failed to build")
    with pytest.raises(dk.BackendUnavailableError, match="pretend it failed to build"):
        _call(p, backend="native")


def test_shrink_expand_validation(p):
    with pytest.raises(ValueError, match="lora_a must have shape"):
        dk.lora_shrink(p.x[:, :-1], p.lora_a, p.ranks, p.offsets)
    with pytest.raises(TypeError, match="u has dtype"):
        dk.lora_expand(p.x[:, :8].half(), p.lora_b, p.ranks, p.offsets, 1.0)
    with pytest.raises(ValueError, match="offsets"):
        dk.lora_shrink(p.x, p.lora_a, p.ranks, p.offsets.flip(0))


def test_route_tokens_validation():
    idx = torch.tensor([[0, 1], [2, 5]])
    with pytest.raises(ValueError, match="expert ids"):
        dk.route_tokens(idx, torch.ones(2, 2), num_experts=4)
    with pytest.raises(ValueError, match="top_k_weights must have the shape"):
        dk.route_tokens(idx, torch.ones(2, 3), num_experts=8)
