"""``torch.library.opcheck`` on every ``drlora::`` primitive of every available backend.

Covers each primitive the way the registry calls it: the forward (``shrink`` without a
scale, ``base_expand`` with and without the base weight), the backward (``shrink`` of
``B^T`` with the scale, ``base_expand`` on transposed ``W^T`` / ``A^T``, ``weight_grad``
for every combination of requested gradients).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from drlora_kernels.ops import get_ops
from tests.helpers import make_problem


def _problem():
    return make_problem(E=4, K=16, N=12, R=8, group_sizes=[3, 0, 5, 2], ranks=[2, 8, 0, 4])


def test_opcheck_shrink(backend):
    p, ops = _problem(), get_ops(backend)
    torch.library.opcheck(ops.shrink, (p.x, p.lora_a, p.ranks, p.offsets))
    gy = torch.randn(p.x.shape[0], 12)
    torch.library.opcheck(ops.shrink, (gy, p.lora_b.transpose(1, 2), p.ranks, p.offsets, p.scale))


@pytest.mark.parametrize("with_w", [False, True], ids=["lora", "base+lora"])
def test_opcheck_base_expand(backend, with_w):
    p, ops = _problem(), get_ops(backend)
    u = ops.shrink(p.x, p.lora_a, p.ranks, p.offsets)
    x, w = (p.x, p.w) if with_w else (None, None)
    torch.library.opcheck(ops.base_expand, (x, w, u, p.lora_b, p.ranks, p.offsets, p.scale))
    gy = torch.randn(p.x.shape[0], 12)
    gb = ops.shrink(gy, p.lora_b.transpose(1, 2), p.ranks, p.offsets, p.scale)
    wt = p.w.transpose(1, 2) if with_w else None
    args = (gy if with_w else None, wt, gb, p.lora_a.transpose(1, 2), p.ranks, p.offsets)
    torch.library.opcheck(ops.base_expand, (*args, torch.ones_like(p.scale)))


@pytest.mark.parametrize(
    "need", list(itertools.product([False, True], repeat=3)), ids=lambda n: "abw:" + "".join("01"[v] for v in n)
)  # fmt: skip
def test_opcheck_weight_grad(backend, need):
    p, ops = _problem(), get_ops(backend)
    u = ops.shrink(p.x, p.lora_a, p.ranks, p.offsets)
    gy = torch.randn(p.x.shape[0], 12)
    gb = ops.shrink(gy, p.lora_b.transpose(1, 2), p.ranks, p.offsets, p.scale) if need[0] else None
    torch.library.opcheck(
        ops.weight_grad,
        (gy, p.x, u, gb, p.ranks, p.offsets, p.scale),
        dict(need_a=need[0], need_b=need[1], need_w=need[2]),
    )


def test_every_backend_has_the_three_primitives(backend):
    ops = get_ops(backend)
    names = [op._qualname for op in (ops.shrink, ops.base_expand, ops.weight_grad)]
    assert names == [f"drlora::{v}_{backend}" for v in ("shrink", "base_expand", "weight_grad")]
