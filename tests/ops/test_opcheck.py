"""``torch.library.opcheck`` on every ``drlora::`` op of every available backend."""

from __future__ import annotations

import pytest
import torch

from drlora_kernels.ops import get_ops
from tests.helpers import backward_args, make_problem


def _problem():
    return make_problem(E=4, K=16, N=12, R=8, group_sizes=[3, 0, 5, 2], ranks=[2, 8, 0, 4])


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("with_w", [False, True], ids=["lora", "base+lora"])
def test_opcheck_forward(backend, requires_grad, with_w):
    p = _problem()
    args = (
        p.x.requires_grad_(requires_grad),
        p.w.requires_grad_(requires_grad) if with_w else None,
        p.lora_a.requires_grad_(requires_grad),
        p.lora_b.requires_grad_(requires_grad),
        p.ranks,
        p.offsets,
        p.scale,
    )
    torch.library.opcheck(get_ops(backend)["forward"], args)


@pytest.mark.parametrize("with_importance", [False, True], ids=["grads", "grads+importance"])
def test_opcheck_backward(backend, with_importance):
    p = _problem()
    ops = get_ops(backend)
    _, u = ops["forward"](p.x, p.w, p.lora_a, p.lora_b, p.ranks, p.offsets, p.scale)
    gy = torch.randn(p.x.shape[0], 12)
    args = backward_args(p, gy, u, w=p.w, need_w=True, with_importance=with_importance)
    torch.library.opcheck(ops["backward"], args)
    partial = backward_args(p, gy, u, need_x=False, need_b=False)
    torch.library.opcheck(ops["backward"], partial)


def test_opcheck_shrink_expand(backend):
    p = _problem()
    ops = get_ops(backend)
    torch.library.opcheck(ops["shrink"], (p.x, p.lora_a, p.ranks, p.offsets))
    u = ops["shrink"](p.x, p.lora_a, p.ranks, p.offsets)
    torch.library.opcheck(ops["expand"], (u, p.lora_b, p.ranks, p.offsets, p.scale))
