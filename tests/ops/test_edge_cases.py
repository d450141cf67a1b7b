"""Every backend against the reference on the edge cases DESIGN.md lists, forward and backward (fp32).

Backend-specific files (test_triton.py, test_native.py) add low-precision dtypes
and larger shapes; this file is the shared contract every backend must meet.
"""

from __future__ import annotations

import pytest
import torch

import drlora_kernels as dk
from drlora_kernels.ops import reference
from tests.helpers import (
    assert_close_to_ref,
    inactive_mask,
    make_problem,
    oracle,
    poison_inactive,
    run_backward,
    run_forward,
)


def _run(p, backend, with_w):
    x = p.x.clone().requires_grad_()
    a = p.lora_a.clone().requires_grad_()
    b = p.lora_b.clone().requires_grad_()
    w = p.w.clone().requires_grad_() if with_w else None
    if with_w:
        y = dk.grouped_lora_base(x, w, a, b, p.ranks, p.offsets, p.scale, backend=backend)
    else:
        y = dk.grouped_lora(x, a, b, p.ranks, p.offsets, p.scale, backend=backend)
    gy = torch.randn_like(y)
    y.backward(gy)
    return y, x.grad, None if w is None else w.grad, a.grad, b.grad, gy


def _check_against_reference(p, backend, with_w=True):
    y, dx, dw, da, db, gy = _run(p, backend, with_w)
    ref_y, u = run_forward(oracle(), p, with_w=with_w)
    ref = run_backward(oracle(), p, gy, u, with_w=with_w, need_w=with_w)
    dt = p.x.dtype
    assert_close_to_ref("y", y, ref_y, None, dt)
    assert_close_to_ref("dx", dx, ref.dx, None, dt)
    assert_close_to_ref("da", da, ref.da, None, dt)
    assert_close_to_ref("db", db, ref.db, None, dt)
    if with_w:
        assert_close_to_ref("dw", dw, ref.dw, None, dt)
    return y, dx, dw, da, db


CASES = {
    "empty-experts": dict(E=6, group_sizes=[5, 0, 0, 7, 0, 3], ranks=[4, 8, 2, 5, 1, 3]),
    "all-tokens-one-expert": dict(E=4, group_sizes=[0, 0, 17, 0], ranks=[3, 4, 8, 1]),
    "rank-zero-everywhere": dict(E=3, group_sizes=[4, 6, 2], ranks=[0, 0, 0]),
    "rank-zero-some": dict(E=4, group_sizes=[4, 6, 2, 9], ranks=[0, 8, 0, 3]),
    "rank-r-max": dict(E=3, group_sizes=[5, 9, 4], ranks=[8, 8, 8]),
    "ragged-zipf": dict(E=8, T=61, popularity="zipf:1.5"),
    "single-token": dict(E=4, group_sizes=[0, 1, 0, 0], ranks=[2, 5, 8, 0]),
    "non-power-of-two": dict(E=3, K=96, N=80, R=6, T=29, popularity="skewed", ranks=[5, 6, 3]),
    "odd-sizes-129": dict(E=2, K=129, N=33, R=5, group_sizes=[7, 6], ranks=[5, 3]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("with_w", [False, True], ids=["lora", "base+lora"])
def test_edge_case(backend, case, with_w):
    kw = dict(K=24, N=20, R=8)
    kw.update(CASES[case])
    _check_against_reference(make_problem(**kw), backend, with_w)


def test_empty_input_no_tokens(backend):
    p = make_problem(E=3, K=16, N=8, R=4, group_sizes=[0, 0, 0], ranks=[1, 2, 3])
    y, dx, dw, da, db = _check_against_reference(p, backend)
    assert y.shape == (0, 8)
    assert (da == 0).all() and (db == 0).all()


def test_inactive_slots_poisoned_with_nan(backend):
    p = poison_inactive(
        make_problem(E=5, K=24, N=16, R=8, T=31, popularity="zipf:1.5", ranks=[0, 3, 8, 5, 1])
    )
    y, dx, dw, da, db, _ = _run(p, backend, with_w=True)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    mask = inactive_mask(p.ranks, 8)
    assert torch.isfinite(da[~mask]).all() and torch.isfinite(db.transpose(1, 2)[~mask]).all()
    assert (da[mask] == 0).all(), "inactive A slots must get exactly zero gradient"
    assert (db.transpose(1, 2)[mask] == 0).all(), "inactive B slots must get exactly zero gradient"


def test_shrink_and_expand_match_reference(backend):
    p = make_problem(E=4, K=24, N=20, R=8, T=33, popularity="zipf:1.5", ranks=[8, 2, 0, 5])
    u = dk.lora_shrink(p.x, p.lora_a, p.ranks, p.offsets, backend=backend)
    ref_u = reference.shrink(p.x, p.lora_a, p.ranks, p.offsets)
    assert_close_to_ref("u", u, ref_u, None, torch.float32)
    y = dk.lora_expand(ref_u, p.lora_b, p.ranks, p.offsets, p.scale, backend=backend)
    ref_y = reference.base_expand(None, None, ref_u, p.lora_b, p.ranks, p.offsets, p.scale)
    assert_close_to_ref("y", y, ref_y, None, torch.float32)
    u2 = dk.lora_shrink(p.x, p.lora_a, p.ranks, p.offsets, scale=p.scale, backend=backend)
    ref_u2 = reference.shrink(p.x, p.lora_a, p.ranks, p.offsets, p.scale)
    assert_close_to_ref("u (scaled)", u2, ref_u2, None, torch.float32)


def test_gradcheck_fp64(backend):
    p = make_problem(
        E=3, K=6, N=5, R=4, group_sizes=[3, 0, 4], ranks=[2, 4, 4], dtype=torch.float64
    )
    mod = dk.ops.backend_module(backend)
    if backend != "reference" and not getattr(mod, "SUPPORTS_FP64", False):
        pytest.skip(f"{backend} does not take fp64 inputs")
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip(
            "interpreted Triton gradcheck lives in test_triton.py (one call per perturbation is slow)"
        )
    inputs = (
        p.x.requires_grad_(),
        p.w.requires_grad_(),
        p.lora_a.requires_grad_(),
        p.lora_b.requires_grad_(),
    )

    def f(x, w, a, b):
        return dk.grouped_lora_base(x, w, a, b, p.ranks, p.offsets, p.scale, backend=backend)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)
