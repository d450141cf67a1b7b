"""The oracle against an independent per-token loop, forward and every gradient.

The reference backend's three primitives, composed by the registry
(:func:`~drlora_kernels.ops.registry.lora_forward` / ``lora_backward``), must give
the forward and the autograd gradients of a per-token loop written without them.
"""

from __future__ import annotations

import pytest
import torch

from drlora_kernels.ops import reference
from tests.helpers import make_problem, oracle, run_backward, run_forward
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
    y, u = run_forward(oracle(), p, with_w=with_w)
    g = run_backward(oracle(), p, gy, u, with_w=with_w, need_w=with_w)
    ref_y, ref_dx, ref_dw, ref_da, ref_db = _grads_of_naive(p, with_w, gy)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(y.double(), ref_y, **tol)
    torch.testing.assert_close(g.dx.double(), ref_dx, **tol)
    torch.testing.assert_close(g.da.double(), ref_da, **tol)
    torch.testing.assert_close(g.db.double(), ref_db, **tol)
    if with_w:
        torch.testing.assert_close(g.dw.double(), ref_dw, **tol)
    else:
        assert g.dw is None


def test_shrink_scale_and_inactive_columns():
    p = make_problem(E=4, K=16, N=12, R=8, T=30, popularity="zipf:1.5", ranks=[8, 0, 5, 2])
    u = reference.shrink(p.x, p.lora_a, p.ranks, p.offsets)
    scaled = reference.shrink(p.x, p.lora_a, p.ranks, p.offsets, p.scale * 3)
    off = p.offsets.tolist()
    for e, r in enumerate(p.ranks.tolist()):
        rows = slice(off[e], off[e + 1])
        assert (u[rows, r:] == 0).all()  # inactive columns of u are zero
        torch.testing.assert_close(u[rows, :r], p.x[rows] @ p.lora_a[e, :r].T)
        torch.testing.assert_close(scaled[rows], u[rows] * p.scale[e] * 3)


def test_base_expand_without_x_is_the_lora_term():
    p = make_problem(E=3, K=16, N=8, R=4, T=12, ranks=[4, 0, 3])
    u = reference.shrink(p.x, p.lora_a, p.ranks, p.offsets)
    lora = reference.base_expand(None, None, u, p.lora_b, p.ranks, p.offsets, p.scale)
    full = reference.base_expand(p.x, p.w, u, p.lora_b, p.ranks, p.offsets, p.scale)
    base = reference.base_expand(
        p.x, p.w, u, p.lora_b, torch.zeros_like(p.ranks), p.offsets, p.scale
    )
    torch.testing.assert_close(full, base + lora)


def test_weight_grad_returns_empty_for_gradients_not_asked():
    p = make_problem(E=3, K=16, N=8, R=4, T=12, ranks=[4, 0, 3])
    u = reference.shrink(p.x, p.lora_a, p.ranks, p.offsets)
    gy = torch.randn(12, 8)
    da, db, dw = reference.weight_grad(
        gy, p.x, u, None, p.ranks, p.offsets, p.scale, need_a=False, need_b=True, need_w=False
    )
    assert da.shape == (0,) and dw.shape == (0,) and db.shape == (3, 8, 4)


def test_upcast_false_runs_in_input_dtype():
    p = make_problem(E=3, K=16, N=8, R=4, T=12, dtype=torch.bfloat16, ranks=[4, 2, 3])
    y_lp, _ = run_forward(oracle(upcast=False), p, with_w=True)
    y, _ = run_forward(oracle(), p, with_w=True)
    assert y_lp.dtype == y.dtype == torch.bfloat16
    # both close to the fp32 truth
    q = make_problem(E=3, K=16, N=8, R=4, T=12, dtype=torch.float32, ranks=[4, 2, 3])
    q.x, q.w, q.lora_a, q.lora_b = (t.float() for t in (p.x, p.w, p.lora_a, p.lora_b))
    truth, _ = run_forward(oracle(), q, with_w=True)
    assert (y.float() - truth).abs().max() < 0.05
    assert (y_lp.float() - truth).abs().max() < 0.1
