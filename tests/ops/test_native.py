"""The native backend (``drlora_kernels._C``) against the reference, on CPU (and CUDA if present).

Forward and gradients for fp32 / bf16 / fp16 (fp64 for gradcheck), through the
fused CPU backward and through the three primitives composed, the named edge
cases, NaN-poisoned inactive slots, transposed operands (the backward's views),
the native importance sums, the custom ops under ``opcheck``, and the C++ argument
checks. Skipped as a whole when the extension is not loaded (e.g.
``DRLORA_DISABLE_NATIVE=1``).
"""

from __future__ import annotations

import pytest
import torch

from drlora_kernels import _native
from drlora_kernels.ops import get_ops, grouped_lora, grouped_lora_base
from drlora_kernels.ops import native_impl as native
from drlora_kernels.ops import reference as ref
from tests.helpers import (
    assert_close_to_ref,
    inactive_mask,
    make_problem,
    oracle,
    poison_inactive,
    run_backward,
    run_forward,
)

pytestmark = [
    pytest.mark.native,
    pytest.mark.skipif(
        not _native.HAS_NATIVE, reason=f"native extension: {_native.NOT_LOADED_REASON}"
    ),
]

LOW_PRECISION = (torch.bfloat16, torch.float16)
GRAD_NAMES = ("dx", "da", "db", "dw")


def _native_ops():
    return get_ops("native")


def check_against_reference(p, *, with_w: bool, need_w: bool = False) -> None:
    """Forward and every gradient of native (fused and composed backward) vs the fp32 oracle."""
    dtype = p.x.dtype
    y, u = run_forward(_native_ops(), p, with_w=with_w)
    y_ref, u_ref = run_forward(oracle(), p, with_w=with_w)
    y_lp = (
        run_forward(oracle(upcast=False), p, with_w=with_w)[0] if dtype in LOW_PRECISION else None
    )
    assert y.dtype == dtype and u.dtype == u_ref.dtype
    assert_close_to_ref("y", y, y_ref, y_lp, dtype)
    assert_close_to_ref("u", u, u_ref, None, dtype)

    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(
        dtype=dtype, device=y.device
    )
    need_w = need_w and with_w
    outs_ref = run_backward(oracle(), p, gy, u_ref, with_w=with_w, need_w=need_w)
    outs_lp = None
    if dtype in LOW_PRECISION:  # the oracle computed in the input dtype throughout
        outs_lp = run_backward(
            oracle(upcast=False), p, gy, u_ref.to(dtype), with_w=with_w, need_w=need_w
        )
    for fused in (True, False):
        out = run_backward(_native_ops(), p, gy, u_ref, with_w=with_w, need_w=need_w, fused=fused)
        for i, name in enumerate(GRAD_NAMES):
            o, r = out[i], outs_ref[i]
            if r is None:
                assert o is None, f"{name}: not requested, got {tuple(o.shape)}"
                continue
            lp = outs_lp[i] if outs_lp is not None else None
            assert o.dtype == r.dtype, f"{name}: dtype {o.dtype} != reference {r.dtype}"
            assert_close_to_ref(f"{name} ({'fused' if fused else 'composed'})", o, r, lp, dtype)


# ---------------------------------------------------------------- forward / backward vs reference

CASES = [
    pytest.param(dict(E=4, K=32, N=24, R=8, T=40), id="E4-K32-N24-R8"),
    pytest.param(
        dict(E=6, K=96, N=80, R=16, T=150, popularity="zipf:1.5"), id="E6-K96-N80-R16-zipf"
    ),
    pytest.param(
        dict(E=5, K=129, N=96, R=12, T=90, popularity="skewed"), id="E5-K129-N96-R12-skewed"
    ),
    pytest.param(
        dict(E=8, K=64, N=129, R=32, T=300, popularity="uniform"), id="E8-K64-N129-R32-rows300"
    ),
]


@pytest.mark.parametrize("with_w", [False, True], ids=["lora", "base+lora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, dtype, with_w):
    check_against_reference(make_problem(**case, dtype=dtype), with_w=with_w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_gradient(dtype):
    p = make_problem(E=4, K=40, N=24, R=8, T=64, popularity="zipf:1.5", dtype=dtype)
    check_against_reference(p, with_w=True, need_w=True)


@pytest.mark.parametrize("threads", [1, 2])
def test_both_backward_schedules(threads):
    """Balanced routing takes the expert-local schedule, one hot expert the two-phase split."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for pop in ("uniform", "one-hot"):
            p = make_problem(E=8, K=48, N=40, R=16, T=512, popularity=pop)
            check_against_reference(p, with_w=True, need_w=True)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_primitives_on_transposed_views_match_reference(dtype):
    """The backward calls shrink / base_expand on transposed views (B^T, A^T, W^T)."""
    p = make_problem(E=5, K=96, N=80, R=16, T=120, popularity="zipf:1.5", dtype=dtype)
    b_t, a_t, w_t = (t.transpose(1, 2) for t in (p.lora_b, p.lora_a, p.w))
    gy = torch.randn(p.x.shape[0], 80).to(dtype)
    for name, args in {
        "shrink": (p.x, p.lora_a, p.ranks, p.offsets, None),
        "shrink(scale)": (p.x, p.lora_a, p.ranks, p.offsets, p.scale),
        "shrink(B^T)": (gy, b_t, p.ranks, p.offsets, p.scale),
    }.items():
        assert_close_to_ref(name, native.shrink(*args), ref.shrink(*args), None, dtype)
    gb = ref.shrink(gy, b_t, p.ranks, p.offsets, p.scale)
    ones = torch.ones_like(p.scale)
    for name, args in {
        "expand": (None, None, gb, a_t, p.ranks, p.offsets, ones),
        "base_expand(W^T, A^T)": (gy, w_t, gb, a_t, p.ranks, p.offsets, ones),
    }.items():
        lp = ref.base_expand(*args[:2], args[2].to(dtype), *args[3:], upcast=False)
        assert_close_to_ref(name, native.base_expand(*args), ref.base_expand(*args), lp, dtype)
    u = ref.shrink(p.x, p.lora_a, p.ranks, p.offsets)
    for flags in [
        (True, True, True),
        (True, False, False),
        (False, True, False),
        (False, False, True),
    ]:
        kw = dict(zip(("need_a", "need_b", "need_w"), flags))
        got = native.weight_grad(gy, p.x, u, gb, p.ranks, p.offsets, p.scale, **kw)
        exp = ref.weight_grad(gy, p.x, u, gb, p.ranks, p.offsets, p.scale, **kw)
        for name, o, r in zip(("da", "db", "dw"), got, exp):
            if r.numel() == 0:
                assert o.shape == (0,), f"{name} not asked for, got {tuple(o.shape)}"
            else:
                assert_close_to_ref(f"{name} {kw}", o, r, None, dtype)


def test_autograd_through_public_api():
    p = make_problem(E=4, K=48, N=40, R=8, T=60, popularity="zipf:1.5")
    grads = {}
    for backend in ("native", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in (p.x, p.w, p.lora_a, p.lora_b)]
        x, w, a, b = leaves
        y = grouped_lora_base(x, w, a, b, p.ranks, p.offsets, p.scale, backend=backend)
        y2 = grouped_lora(x, a, b, p.ranks, p.offsets, 0.5, backend=backend)
        ((y * y).sum() + y2.sum()).backward()
        grads[backend] = [y.detach()] + [t.grad for t in leaves]
    for name, o, r in zip(("y", "dx", "dw", "da", "db"), grads["native"], grads["reference"]):
        assert_close_to_ref(name, o, r, None, torch.float32)


# ---------------------------------------------------------------- named edge cases


def test_empty_experts():
    check_against_reference(
        make_problem(E=6, K=32, N=24, R=8, group_sizes=[0, 7, 0, 0, 5, 0]), with_w=True
    )


def test_all_tokens_one_expert():
    check_against_reference(
        make_problem(E=5, K=32, N=24, R=8, group_sizes=[0, 0, 37, 0, 0]), with_w=True
    )


def test_rank_zero_everywhere():
    check_against_reference(make_problem(E=4, K=32, N=24, R=8, ranks=[0, 0, 0, 0]), with_w=False)
    check_against_reference(make_problem(E=4, K=32, N=24, R=8, ranks=[0, 0, 0, 0]), with_w=True)


def test_rank_r_max_everywhere():
    check_against_reference(make_problem(E=4, K=32, N=24, R=8, ranks=[8, 8, 8, 8]), with_w=True)


def test_zipf_groups():
    check_against_reference(
        make_problem(E=16, K=64, N=48, R=16, T=400, popularity="zipf:1.5"), with_w=True
    )


def test_single_token():
    check_against_reference(make_problem(E=3, K=32, N=24, R=8, group_sizes=[0, 1, 0]), with_w=True)


def test_no_tokens():
    check_against_reference(make_problem(E=3, K=32, N=24, R=8, group_sizes=[0, 0, 0]), with_w=True)


@pytest.mark.parametrize("K,N", [(96, 80), (129, 96), (80, 129)], ids=lambda v: str(v))
def test_non_power_of_two_sizes(K, N):
    check_against_reference(
        make_problem(E=4, K=K, N=N, R=12, T=70, popularity="skewed"), with_w=True
    )


# ---------------------------------------------------------------- inactive slots and importance


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "composed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_poisoned_inactive_slots(dtype, fused):
    p = poison_inactive(
        make_problem(E=6, K=48, N=40, R=16, T=90, ranks=[0, 3, 16, 7, 1, 12], dtype=dtype)
    )
    y, u = run_forward(_native_ops(), p, with_w=True)
    assert torch.isfinite(y).all() and torch.isfinite(u).all()
    gy = torch.randn(y.shape).to(dtype)
    g = run_backward(_native_ops(), p, gy, u, with_w=True, need_w=True, fused=fused)
    for name, t in zip(GRAD_NAMES, g):
        assert torch.isfinite(t).all(), f"{name} has non-finite values"
    dead = inactive_mask(p.ranks, 16)
    assert (g.da[dead] == 0).all(), "inactive rows of da must be exactly zero"
    assert (g.db.transpose(1, 2)[dead] == 0).all(), "inactive columns of db must be exactly zero"
    off = p.offsets.tolist()
    for e, r in enumerate(p.ranks.tolist()):
        assert (u[off[e] : off[e + 1], r:] == 0).all(), (
            f"u columns >= rank of expert {e} must be zero"
        )
    check_against_reference(p, with_w=True, need_w=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_native_slot_importance_from_grads(dtype):
    """The extension's slot_importance (used by the public op on CPU) vs the reference:
    inactive slots poisoned with NaN in parameters and gradients must come out exactly 0."""
    gen = torch.Generator().manual_seed(3)
    E, R, K, N = 5, 12, 40, 24
    ranks = torch.tensor([0, 3, 12, 7, 1], dtype=torch.int32)
    a, da = (torch.randn(E, R, K, generator=gen).to(dtype) for _ in range(2))
    b, db = (torch.randn(E, N, R, generator=gen).to(dtype) for _ in range(2))
    exp_a, exp_b = ref.slot_importance(a, da, b, db, ranks)
    for e, r in enumerate(ranks.tolist()):
        a[e, r:] = da[e, r:] = float("nan")
        b[e, :, r:] = db[e, :, r:] = float("nan")
    imp_a, imp_b = _native._C.slot_importance(a, da, b, db, ranks)
    assert imp_a.dtype == imp_b.dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-6) if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(imp_a, exp_a, **tol)
    torch.testing.assert_close(imp_b, exp_b, **tol)
    inactive = inactive_mask(ranks, R)
    assert (imp_a[inactive] == 0).all() and (imp_b[inactive] == 0).all()
    # the public op takes the native path here and gives the same numbers
    from drlora_kernels.ops import slot_importance

    pub_a, pub_b = slot_importance(a, da, b, db, ranks)
    torch.testing.assert_close(pub_a, imp_a, rtol=0, atol=0)
    torch.testing.assert_close(pub_b, imp_b, rtol=0, atol=0)


def test_native_slot_importance_checks():
    a, da = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    b, db = torch.randn(3, 6, 4), torch.randn(3, 6, 4)
    ranks = torch.tensor([1, 4, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match="grad_a must have shape"):
        _native._C.slot_importance(a, da[:, :3], b, db, ranks)
    with pytest.raises(TypeError, match="grad_b has dtype"):
        _native._C.slot_importance(a, da, b, db.double(), ranks)
    with pytest.raises(ValueError, match=r"ranks\[1\] = 5"):
        _native._C.slot_importance(a, da, b, db, torch.tensor([1, 5, 0], dtype=torch.int32))


def test_outputs_never_alias():
    p = make_problem(E=3, K=16, N=12, R=4, T=20)
    y, u = run_forward(_native_ops(), p, with_w=True)
    for fused in (True, False):
        g = run_backward(_native_ops(), p, torch.randn_like(y), u, with_w=True, fused=fused)
        ptrs = [
            t.untyped_storage().data_ptr()
            for t in (*[t for t in g if t is not None], p.x, p.w, p.lora_a, p.lora_b, u, y)
            if t.numel()
        ]
        assert len(set(ptrs)) == len(ptrs)


# ---------------------------------------------------------------- custom ops, gradcheck


def _small():
    return make_problem(E=4, K=16, N=12, R=8, group_sizes=[3, 0, 5, 2], ranks=[2, 8, 0, 4])


@pytest.mark.parametrize("with_w", [False, True], ids=["lora", "base+lora"])
def test_opcheck_fused_backward(with_w):
    """The fused CPU backward op (the three primitives are opchecked for every backend in test_opcheck.py)."""
    p = _small()
    _, u = run_forward(_native_ops(), p, with_w=with_w)
    gy = torch.randn(p.x.shape[0], 12)
    for flags in [
        (True, True, True, with_w),
        (False, True, False, False),
        (True, False, False, False),
    ]:
        torch.library.opcheck(
            torch.ops.drlora.lora_backward_native.default,
            (gy, p.x, p.w if with_w else None, p.lora_a, p.lora_b, u, p.ranks, p.offsets, p.scale),
            dict(zip(("need_x", "need_a", "need_b", "need_w"), flags)),
        )


def test_gradcheck_fp64():
    p = make_problem(
        E=3, K=6, N=5, R=4, group_sizes=[3, 0, 4], ranks=[2, 4, 1], dtype=torch.float64
    )
    leaves = [t.clone().requires_grad_() for t in (p.x, p.w, p.lora_a, p.lora_b)]

    def f(x, w, a, b):
        return grouped_lora_base(x, w, a, b, p.ranks, p.offsets, p.scale, backend="native")

    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-8)


# ---------------------------------------------------------------- C++ argument checks


def _c_call(fn: str, **over):
    p = make_problem(E=3, K=16, N=12, R=4, T=20)
    u = ref.shrink(p.x, p.lora_a, p.ranks, p.offsets)
    args = {
        "shrink": dict(x=p.x, lora_a=p.lora_a, ranks=p.ranks, offsets=p.offsets, scale=p.scale),
        "base_expand": dict(
            x=p.x, w=p.w, u=u, lora_b=p.lora_b, ranks=p.ranks, offsets=p.offsets, scale=p.scale
        ),
        "weight_grad": dict(
            grad_y=torch.randn(20, 12),
            x=p.x,
            u=u,
            gb=u.clone(),
            ranks=p.ranks,
            offsets=p.offsets,
            scale=p.scale,
            need_a=True,
            need_b=True,
            need_w=True,
        ),  # fmt: skip
        "lora_backward": dict(
            grad_y=torch.randn(20, 12),
            x=p.x,
            w=p.w,
            lora_a=p.lora_a,
            lora_b=p.lora_b,
            u=u,
            ranks=p.ranks,
            offsets=p.offsets,
            scale=p.scale,
            need_x=True,
            need_a=True,
            need_b=True,
            need_w=True,
        ),  # fmt: skip
    }[fn]
    args.update(over)
    return getattr(_native._C, fn)(**args)


INT = torch.int32
INDEX_CASES = [
    (dict(ranks=torch.tensor([1, 5, 0], dtype=INT)), ValueError, r"ranks\[1\] = 5"),
    (dict(ranks=torch.tensor([1, -1, 0], dtype=INT)), ValueError, "ranks out of range"),
    (dict(ranks=torch.tensor([1.0, 2.0, 0.0])), TypeError, "ranks has dtype"),
    (dict(ranks=torch.tensor([1, 2, 0])), TypeError, r"ranks has dtype Long.*int32"),
    (dict(ranks=torch.tensor([1, 9, 2, 9, 0], dtype=INT)[::2]), ValueError, "ranks must be contiguous"),
    (dict(ranks=torch.tensor([2], dtype=INT).expand(3)), ValueError, "ranks must be contiguous"),
    (dict(offsets=torch.tensor([0, 12, 8, 20], dtype=INT)), ValueError, "non-decreasing"),
    (dict(offsets=torch.tensor([0, 8, 12, 19], dtype=INT)), ValueError, r"offsets\[-1\]"),
    (dict(offsets=torch.tensor([0, 8, 20], dtype=INT)), ValueError, "offsets must have shape"),
    (dict(offsets=torch.tensor([0, 8, 12, 20])), TypeError, "offsets has dtype Long"),
    (dict(offsets=torch.tensor([0, 0, 8, 0, 12, 0, 20], dtype=INT)[::2]), ValueError, "offsets must be contiguous"),
    (dict(scale=torch.ones(4)), ValueError, "scale must have shape"),
]  # fmt: skip
INDEX_IDS = [
    "rank-too-big", "rank-negative", "float-ranks", "int64-ranks", "strided-ranks",
    "expanded-ranks", "offsets-decreasing", "offsets-total", "offsets-length", "int64-offsets",
    "strided-offsets", "scale-shape",
]  # fmt: skip


@pytest.mark.parametrize("fn", ["shrink", "base_expand", "weight_grad", "lora_backward"])
@pytest.mark.parametrize("over,exc,match", INDEX_CASES, ids=INDEX_IDS)
def test_cpp_group_checks_name_the_argument(fn, over, exc, match):
    with pytest.raises(exc, match=match):
        _c_call(fn, **over)


@pytest.mark.parametrize(
    "fn,over,exc,match",
    [
        ("shrink", dict(lora_a=torch.randn(3, 4, 15)), ValueError, "lora_a must have shape"),
        ("shrink", dict(x=torch.randn(20, 16).double()), TypeError, "lora_a has dtype"),
        ("shrink", dict(x=torch.randn(20, 16).to(torch.int32)), TypeError, "x has dtype"),
        ("shrink", dict(x=torch.randn(16, 20).t()), ValueError, "x must be contiguous"),
        ("base_expand", dict(lora_b=torch.randn(3, 12, 5)), ValueError, "lora_b must have shape"),
        ("base_expand", dict(w=torch.randn(3, 12, 15)), ValueError, "w must have shape"),
        ("base_expand", dict(x=None), ValueError, "w is given but x is None"),
        ("base_expand", dict(u=torch.randn(20, 4).double()), TypeError, "u has dtype"),
        ("weight_grad", dict(grad_y=torch.randn(21, 12)), ValueError, "grad_y must have shape"),
        ("weight_grad", dict(gb=None), ValueError, "need_a is true but gb is None"),
        ("lora_backward", dict(w=None), ValueError, "need_w is true but w is None"),
        ("lora_backward", dict(lora_b=torch.randn(3, 12, 5)), ValueError, "lora_b must have shape"),
    ],
)  # fmt: skip
def test_cpp_checks_name_the_argument(fn, over, exc, match):
    with pytest.raises(exc, match=match):
        _c_call(fn, **over)


# ---------------------------------------------------------------- CUDA (needs a GPU; untested until one runs them)


@pytest.mark.gpu
@pytest.mark.skipif(not _native.HAS_NATIVE_CUDA, reason="native extension built without CUDA")
@pytest.mark.parametrize("with_w", [False, True], ids=["lora", "base+lora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "case",
    CASES + [pytest.param(dict(E=3, K=32, N=24, R=8, group_sizes=[0, 37, 0]), id="one-expert")],
)
def test_cuda_matches_reference(case, dtype, with_w):
    p = make_problem(**case, dtype=dtype, device="cuda")
    check_against_reference(p, with_w=with_w, need_w=with_w)


@pytest.mark.gpu
@pytest.mark.skipif(not _native.HAS_NATIVE_CUDA, reason="native extension built without CUDA")
def test_cuda_nan_poisoned_inactive_slots():
    p = poison_inactive(
        make_problem(E=6, K=48, N=40, R=16, T=90, ranks=[0, 3, 16, 7, 1, 12], device="cuda")
    )
    y, u = run_forward(_native_ops(), p, with_w=True)
    g = run_backward(_native_ops(), p, torch.randn_like(y), u, with_w=True, need_w=True)
    for t in (y, u, *g):
        assert torch.isfinite(t).all()
    dead = inactive_mask(p.ranks, 16)
    assert (g.da[dead] == 0).all() and (g.db.transpose(1, 2)[dead] == 0).all()
