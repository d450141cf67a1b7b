"""The oracle against an independent per-token loop, forward and every gradient."""

from __future__ import annotations

import pytest
import torch

from drlora_kernels.ops import reference
from tests.helpers import make_problem, run_backward
from tests.ops._naive import naive_forward


def _grads_of_naive(p, with_w: bool, gy):
    x = p.x.double().requires_grad_()
    a = p.lora_a.double().requires_grad_()
    b = p.lora_b.double().requires_grad_()
    w = p.w.double().requires_grad_() if with_w else None
    y = naive_forward(x, w, a, b, p.ranks, p.offsets, p.scale.double())
    y.backward(gy.double())
    return y.detach(), x.grad, None if w is None else w.grad, a.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("with_w", [False, True], ids=["lora", "base+lora"])
@pytest.mark.parametrize("popularity", ["uniform", "zipf:1.5", "empty-heavy"])
def test_reference_matches_naive_loop(dtype, with_w, popularity):
    p = make_problem(
        E=5, K=12, N=10, R=6, T=23, popularity=popularity, ranks=[0, 3, 6, 1, 4], dtype=dtype
    )
    gy = torch.randn(p.x.shape[0], p.lora_b.shape[1], dtype=dtype)
    y, u = reference.forward(
        p.x, p.w if with_w else None, p.lora_a, p.lora_b, p.ranks, p.offsets, p.scale
    )
    dx, dw, da, db, imp_a, imp_b = run_backward(
        reference, p, gy, u, w=p.w if with_w else None, need_w=with_w, with_importance=True
    )
    ref_y, ref_dx, ref_dw, ref_da, ref_db = _grads_of_naive(p, with_w, gy)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(y.double(), ref_y, **tol)
    torch.testing.assert_close(dx.double(), ref_dx, **tol)
    torch.testing.assert_close(da.double(), ref_da, **tol)
    torch.testing.assert_close(db.double(), ref_db, **tol)
    if with_w:
        torch.testing.assert_close(dw.double(), ref_dw, **tol)
    else:
        assert dw.numel() == 0
    # importance from the same gradients, computed independently
    act = torch.arange(6)[None, :] < p.ranks[:, None]
    exp_a = (p.lora_a.double() * ref_da).abs().sum(2) * act
    exp_b = (p.lora_b.double() * ref_db).abs().sum(1) * act
    torch.testing.assert_close(imp_a.double(), exp_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(imp_b.double(), exp_b, atol=1e-4, rtol=1e-4)


def test_shrink_expand_compose_to_forward():
    p = make_problem(E=4, K=16, N=12, R=8, T=30, popularity="zipf:1.5", ranks=[8, 0, 5, 2])
    u = reference.shrink(p.x, p.lora_a, p.ranks, p.offsets)
    y = reference.expand(u, p.lora_b, p.ranks, p.offsets, p.scale)
    y_fwd, u_fwd = reference.forward(p.x, None, p.lora_a, p.lora_b, p.ranks, p.offsets, p.scale)
    torch.testing.assert_close(u, u_fwd)
    torch.testing.assert_close(y, y_fwd)
    off = p.offsets.tolist()
    for e, r in enumerate(p.ranks.tolist()):  # inactive columns of u are zero
        assert (u[off[e] : off[e + 1], r:] == 0).all()


def test_upcast_false_runs_in_input_dtype():
    p = make_problem(E=3, K=16, N=8, R=4, T=12, dtype=torch.bfloat16, ranks=[4, 2, 3])
    y_lp, _ = reference.forward(
        p.x, p.w, p.lora_a, p.lora_b, p.ranks, p.offsets, p.scale, upcast=False
    )
    y, _ = reference.forward(p.x, p.w, p.lora_a, p.lora_b, p.ranks, p.offsets, p.scale)
    assert y_lp.dtype == y.dtype == torch.bfloat16
    # both close to the fp32 truth
    q = make_problem(E=3, K=16, N=8, R=4, T=12, dtype=torch.float32, ranks=[4, 2, 3])
    truth, _ = reference.forward(
        p.x.float(), p.w.float(), p.lora_a.float(), p.lora_b.float(), q.ranks, q.offsets, q.scale
    )
    assert (y.float() - truth).abs().max() < 0.05
    assert (y_lp.float() - truth).abs().max() < 0.1
