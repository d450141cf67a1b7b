"""The Triton backend: its three primitives against an fp64 oracle, then the composed ops.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest), which is
slow: problems are small, but sized past one tile on every axis (interpreter blocks are
``BLOCK_M=32``, ``BLOCK_K/N=64``, rank blocks of 16, see ``triton_configs.INTERP_CONFIGS``), so
multi-tile rows, ragged last tiles, several rank blocks and ranks that are not a multiple of the
rank block are all exercised.

``ref`` is the oracle below in fp64; ``ref_lp`` is the same oracle computed in the input dtype
(fp32 intermediates such as ``u`` rounded to it, as the kernels round them before a dot), so the
tolerance is flash-attention's: twice the oracle's own low-precision error plus a floor.
"""

from __future__ import annotations

import pytest
import torch

import drlora_kernels as dk
from drlora_kernels.ops import available_backends
from drlora_kernels.ops import triton_configs as tc
from drlora_kernels.ops.registry import plain_ops
from tests.helpers import (
    Problem,
    assert_close_to_ref,
    inactive_mask,
    make_problem,
    poison_inactive,
    run_backward,
    run_forward,
)

_ok, _why = available_backends()["triton"]
pytestmark = pytest.mark.skipif(not _ok, reason=f"triton backend unavailable: {_why}")
if _ok:
    from drlora_kernels.ops import triton_impl as ti

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
FP32_BF16 = [DTYPES[0], DTYPES[2]]


@pytest.fixture(autouse=True)
def _ieee_fp32(monkeypatch):
    # TF32 off (A1): fp32 results must match the oracle to ~1e-5.
    monkeypatch.setattr(tc, "ALLOW_TF32", False)


@pytest.fixture
def force_row_split(monkeypatch):
    """Chunks of 16 rows: every expert with more than 2x the mean group is split (pass 2 runs)."""
    monkeypatch.setattr(tc, "ROW_SPLIT_MIN", 16)
    monkeypatch.setattr(tc, "ROW_SPLIT_ALIGN", 16)


# ---------------------------------------------------------------- the fp64 oracle (COMMON.md)


def _groups(ranks, offsets):
    off = offsets.tolist()
    return [(e, int(r), off[e], off[e + 1]) for e, r in enumerate(ranks.tolist())]


def _s(scale, e, dt):
    return torch.ones((), dtype=dt) if scale is None else scale[e].to(dt)


def oracle_shrink(x, a, ranks, offsets, scale=None, dt=torch.float64):
    u = torch.zeros(x.shape[0], a.shape[1], dtype=dt)
    for e, r, lo, hi in _groups(ranks, offsets):
        u[lo:hi, :r] = _s(scale, e, dt) * (x[lo:hi].to(dt) @ a[e, :r].to(dt).T)
    return u


def oracle_base_expand(x, w, u, b, ranks, offsets, scale=None, dt=torch.float64):
    y = torch.zeros(u.shape[0], b.shape[1], dtype=dt)
    for e, r, lo, hi in _groups(ranks, offsets):
        if w is not None:
            y[lo:hi] = x[lo:hi].to(dt) @ w[e].to(dt).T
        y[lo:hi] += _s(scale, e, dt) * (u[lo:hi, :r].to(dt) @ b[e, :, :r].to(dt).T)
    return y


def oracle_weight_grad(gy, x, u, gb, ranks, offsets, scale, dt=torch.float64):
    E, R, K, N = ranks.shape[0], u.shape[1], x.shape[1], gy.shape[1]
    da, db, dw = (torch.zeros(s, dtype=dt) for s in ((E, R, K), (E, N, R), (E, N, K)))
    for e, r, lo, hi in _groups(ranks, offsets):
        g, xe = gy[lo:hi].to(dt), x[lo:hi].to(dt)
        da[e, :r] = gb[lo:hi, :r].to(dt).T @ xe
        db[e, :, :r] = _s(scale, e, dt) * (g.T @ u[lo:hi, :r].to(dt))
        dw[e] = g.T @ xe
    return da, db, dw


def _check(name, out, oracle, args, dtype):
    """``out`` (on any device) against ``oracle(*args)`` in fp64 and in ``dtype``."""
    cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    ref = oracle(*cpu)
    ref_lp = oracle(*cpu, dt=dtype) if dtype != torch.float32 else oracle(*cpu, dt=torch.float32)
    outs, refs, lps = (out, ref, ref_lp) if isinstance(out, tuple) else ((out,), (ref,), (ref_lp,))
    for i, (o, r, lp) in enumerate(zip(outs, refs, lps)):
        assert_close_to_ref(f"{name}[{i}]", o.detach().cpu(), r, lp, dtype)


def _on(p: Problem, device) -> Problem:
    return Problem(*(t.to(device) for t in (p.x, p.w, p.lora_a, p.lora_b, p.ranks, p.offsets,
                                            p.scale)))  # fmt: skip


def _u(p: Problem) -> torch.Tensor:
    return oracle_shrink(p.x.cpu(), p.lora_a.cpu(), p.ranks.cpu(), p.offsets.cpu()).float()


BASE = dict(E=4, K=96, N=80, R=40, T=70, ranks=[37, 0, 15, 26], popularity="zipf:1.5")


# ---------------------------------------------------------------- shrink


@pytest.mark.parametrize("with_scale", [False, True], ids=["no-scale", "scale"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_shrink_matches_oracle(device, dtype, with_scale):
    p = _on(make_problem(**BASE, dtype=dtype, scale=[0.5, 2.0, -1.25, 0.75]), device)
    s = p.scale if with_scale else None
    u = ti.shrink(p.x, p.lora_a, p.ranks, p.offsets, s)
    assert u.dtype == torch.float32 and u.shape == (70, 40)
    _check("u", u, oracle_shrink, (p.x, p.lora_a, p.ranks, p.offsets, s), dtype)


@pytest.mark.parametrize("dtype", FP32_BF16)
def test_shrink_reads_a_transposed_view(device, dtype):
    # the backward's gb = shrink(dY, B^T, s): lora_a arrives as lora_b.transpose(1, 2)
    p = _on(make_problem(**BASE, dtype=dtype), device)
    gy = torch.randn(70, 80, dtype=dtype, device=device)
    b_t = p.lora_b.transpose(1, 2)
    assert not b_t.is_contiguous()
    gb = ti.shrink(gy, b_t, p.ranks, p.offsets, p.scale)
    _check("gb", gb, oracle_shrink, (gy, b_t, p.ranks, p.offsets, p.scale), dtype)


# ---------------------------------------------------------------- base_expand


@pytest.mark.parametrize("with_w", [False, True], ids=["lora", "base+lora"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_base_expand_matches_oracle(device, dtype, with_w):
    p = _on(make_problem(**BASE, dtype=dtype), device)
    u = _u(p).to(device)
    x, w = (p.x, p.w) if with_w else (None, None)
    y = ti.base_expand(x, w, u, p.lora_b, p.ranks, p.offsets, p.scale)
    assert y.dtype == dtype and y.shape == (70, 80)
    _check("y", y, oracle_base_expand, (x, w, u, p.lora_b, p.ranks, p.offsets, p.scale), dtype)


@pytest.mark.parametrize("with_w", [False, True], ids=["lora", "base+lora"])
@pytest.mark.parametrize("dtype", FP32_BF16)
def test_base_expand_reads_transposed_views(device, dtype, with_w):
    # the backward's dX = dY W + gb A: w and lora_b arrive as w / lora_a .transpose(1, 2)
    p = _on(make_problem(**BASE, dtype=dtype), device)
    gy = torch.randn(70, 80, dtype=dtype, device=device)
    gb = oracle_shrink(gy.cpu(), p.lora_b.cpu().transpose(1, 2), p.ranks.cpu(), p.offsets.cpu())
    gb = gb.float().to(device)
    w_t = p.w.transpose(1, 2) if with_w else None
    a_t = p.lora_a.transpose(1, 2)
    dx = ti.base_expand(gy, w_t, gb, a_t, p.ranks, p.offsets)
    assert dx.shape == (70, 96)
    _check("dx", dx, oracle_base_expand, (gy, w_t, gb, a_t, p.ranks, p.offsets), dtype)


def test_base_expand_without_x_but_with_w_raises(device):
    p = _on(make_problem(**BASE), device)
    with pytest.raises(ValueError, match="x is None"):
        ti.base_expand(None, p.w, _u(p).to(device), p.lora_b, p.ranks, p.offsets, p.scale)


# ---------------------------------------------------------------- weight_grad


def _weight_grad_inputs(p: Problem, device, dtype):
    gen = torch.Generator().manual_seed(7)
    gy = torch.randn(p.x.shape[0], p.lora_b.shape[1], generator=gen).to(dtype)
    gb = oracle_shrink(gy, p.lora_b.cpu().transpose(1, 2), p.ranks.cpu(), p.offsets.cpu())
    return gy.to(device), _u(p).to(device), gb.float().to(device)


@pytest.mark.parametrize("split", [False, True], ids=["one-chunk", "row-split"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_grad_matches_oracle(device, dtype, split, request):
    if split:
        request.getfixturevalue("force_row_split")
    sizes = [52, 6, 0, 12]  # one dominant expert, one empty
    p = _on(make_problem(E=4, K=96, N=80, R=40, group_sizes=sizes, ranks=[37, 0, 15, 26],
                         dtype=dtype), device)  # fmt: skip
    chunk = tc.rows_per_chunk(70, 4, 40 * 96, 4)
    assert (chunk < max(sizes)) == split, f"chunk {chunk}: the split must happen iff forced"
    gy, u, gb = _weight_grad_inputs(p, device, dtype)
    out = ti.weight_grad(
        gy, p.x, u, gb, p.ranks, p.offsets, p.scale, need_a=True, need_b=True, need_w=True
    )
    assert [o.dtype for o in out] == [dtype] * 3
    _check("dA,dB,dW", out, oracle_weight_grad, (gy, p.x, u, gb, p.ranks, p.offsets, p.scale),
           dtype)  # fmt: skip


def test_row_split_is_exercised_and_deterministic(device, force_row_split):
    # one expert far above 2x the mean group: it is cut into chunks and reduced in pass 2
    p = _on(make_problem(E=4, K=96, N=80, R=40, group_sizes=[97, 5, 0, 18],
                         ranks=[33, 40, 7, 0]), device)  # fmt: skip
    T, E = 120, 4
    chunk = tc.rows_per_chunk(T, E, 40 * 96, 4)
    assert chunk < 97, f"chunk {chunk}: expert 0 must span several chunks"
    gy, u, gb = _weight_grad_inputs(p, device, torch.float32)
    args = (gy, p.x, u, gb, p.ranks, p.offsets, p.scale)
    need = dict(need_a=True, need_b=True, need_w=True)
    first, second = ti.weight_grad(*args, **need), ti.weight_grad(*args, **need)
    for a, b in zip(first, second):
        assert torch.equal(a, b), "the chunked reduction must be bit-identical across runs"
    _check("dA,dB,dW", first, oracle_weight_grad, args[:7], torch.float32)


@pytest.mark.parametrize(
    "need", [(True, False, False), (False, True, False), (False, False, True), (True, True, False)],
    ids=["a", "b", "w", "a+b"],
)  # fmt: skip
def test_weight_grad_returns_fresh_empty_tensors_for_unrequested(device, need):
    p = _on(make_problem(**BASE), device)
    gy, u, gb = _weight_grad_inputs(p, device, torch.float32)
    out = ti.weight_grad(gy, p.x, u, gb, p.ranks, p.offsets, p.scale,
                         **dict(zip(("need_a", "need_b", "need_w"), need)))  # fmt: skip
    shapes = [(4, 40, 96), (4, 80, 40), (4, 80, 96)]
    assert [tuple(o.shape) for o in out] == [s if n else (0,) for s, n in zip(shapes, need)]
    assert len({id(o) for o in out}) == 3


def test_weight_grad_missing_inputs_raise(device):
    p = _on(make_problem(**BASE), device)
    gy, u, gb = _weight_grad_inputs(p, device, torch.float32)
    with pytest.raises(ValueError, match="needs gb"):
        ti.weight_grad(
            gy, p.x, u, None, p.ranks, p.offsets, p.scale, need_a=True, need_b=False, need_w=False
        )
    with pytest.raises(ValueError, match="needs u"):
        ti.weight_grad(
            gy, p.x, None, gb, p.ranks, p.offsets, p.scale, need_a=False, need_b=True, need_w=False
        )


PRIMITIVE_EDGES = {
    "empty-groups": dict(group_sizes=[30, 0, 0, 25, 0], ranks=[20, 40, 7, 17, 3]),
    "rank-zero-everywhere": dict(group_sizes=[20, 0, 12, 9, 4], ranks=[0, 0, 0, 0, 0]),
    "rank-r-everywhere": dict(group_sizes=[20, 7, 12, 0, 16], ranks=[40, 40, 40, 40, 40]),
    "single-token": dict(group_sizes=[0, 0, 1, 0, 0], ranks=[3, 40, 21, 0, 5]),
    "no-tokens": dict(group_sizes=[0, 0, 0, 0, 0], ranks=[4, 0, 40, 1, 2]),
}


@pytest.mark.parametrize("case", list(PRIMITIVE_EDGES), ids=list(PRIMITIVE_EDGES))
def test_primitives_on_edge_cases_match_oracle(device, case, force_row_split):
    p = _on(make_problem(E=5, K=96, N=80, R=40, **PRIMITIVE_EDGES[case]), device)
    s = p.scale
    u = ti.shrink(p.x, p.lora_a, p.ranks, p.offsets)
    _check("u", u, oracle_shrink, (p.x, p.lora_a, p.ranks, p.offsets), torch.float32)
    y = ti.base_expand(p.x, p.w, u, p.lora_b, p.ranks, p.offsets, s)
    _check("y", y, oracle_base_expand, (p.x, p.w, u, p.lora_b, p.ranks, p.offsets, s),
           torch.float32)  # fmt: skip
    gy, _, gb = _weight_grad_inputs(p, device, torch.float32)
    out = ti.weight_grad(
        gy, p.x, u, gb, p.ranks, p.offsets, s, need_a=True, need_b=True, need_w=True
    )
    _check("dA,dB,dW", out, oracle_weight_grad, (gy, p.x, u, gb, p.ranks, p.offsets, s),
           torch.float32)  # fmt: skip


# ---------------------------------------------------------------- inactive slots (NaN-poisoned)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_poisoned_inactive_slots_never_leak(device, dtype, force_row_split):
    p = _on(poison_inactive(make_problem(**BASE, dtype=dtype)), device)
    dead = inactive_mask(p.ranks, 40).to(device)  # [E, R]
    u = ti.shrink(p.x, p.lora_a, p.ranks, p.offsets)
    u_dead = torch.zeros_like(u, dtype=torch.bool)
    for _, r, lo, hi in _groups(p.ranks.cpu(), p.offsets.cpu()):
        u_dead[lo:hi, r:] = True
    assert torch.isfinite(u).all() and (u[u_dead] == 0).all(), "u must be finite, 0 beyond r_e"
    gy = torch.randn(70, 80, dtype=dtype, device=device)
    gb = ti.shrink(gy, p.lora_b.transpose(1, 2), p.ranks, p.offsets, p.scale)
    assert torch.isfinite(gb).all() and (gb[u_dead] == 0).all()
    # u and gb poisoned beyond r_e too: only u[rows_e, :r_e] may be read
    u_bad, gb_bad = u.masked_fill(u_dead, float("nan")), gb.masked_fill(u_dead, float("nan"))
    y = ti.base_expand(p.x, p.w, u_bad, p.lora_b, p.ranks, p.offsets, p.scale)
    dx = ti.base_expand(gy, p.w.transpose(1, 2), gb_bad, p.lora_a.transpose(1, 2), p.ranks,
                        p.offsets)  # fmt: skip
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    da, db, dw = ti.weight_grad(
        gy, p.x, u_bad, gb_bad, p.ranks, p.offsets, p.scale, need_a=1, need_b=1, need_w=1
    )
    assert torch.isfinite(dw).all()
    assert (da[dead] == 0).all(), "inactive rows of dA must be exactly zero"
    assert (db.transpose(1, 2)[dead] == 0).all(), "inactive columns of dB must be exactly zero"
    assert torch.isfinite(da).all() and torch.isfinite(db).all()
    clean = _on(make_problem(**BASE, dtype=dtype), device)
    _check("y", y, oracle_base_expand,
           (clean.x, clean.w, u, clean.lora_b, clean.ranks, clean.offsets, clean.scale), dtype)  # fmt: skip


# ---------------------------------------------------------------- the composed ops, edge cases


def _compose(p: Problem, gy: torch.Tensor, with_w: bool):
    """Forward + backward the way the registry composes them from the three primitives."""
    w = p.w if with_w else None
    u = ti.shrink(p.x, p.lora_a, p.ranks, p.offsets)
    y = ti.base_expand(p.x, w, u, p.lora_b, p.ranks, p.offsets, p.scale)
    gb = ti.shrink(gy, p.lora_b.transpose(1, 2), p.ranks, p.offsets, p.scale)
    w_t = None if w is None else w.transpose(1, 2)
    dx = ti.base_expand(gy, w_t, gb, p.lora_a.transpose(1, 2), p.ranks, p.offsets)
    da, db, dw = ti.weight_grad(gy, p.x, u, gb, p.ranks, p.offsets, p.scale,
                                need_a=True, need_b=True, need_w=with_w)  # fmt: skip
    return {"y": y, "dx": dx, "da": da, "db": db, **({"dw": dw} if with_w else {})}


def _check_composed(p: Problem, device, with_w=True):
    """The composition against the reference backend on fp32 copies (the fp32 oracle)."""
    dtype = p.x.dtype
    gy = torch.randn(p.x.shape[0], p.lora_b.shape[1], generator=torch.Generator().manual_seed(1))
    gy = gy.to(dtype)
    out = _compose(_on(p, device), gy.to(device), with_w)
    q = Problem(*(t.float() if t.is_floating_point() else t for t in
                  (p.x, p.w, p.lora_a, p.lora_b, p.ranks, p.offsets, p.scale)))  # fmt: skip
    ops = plain_ops("reference")
    y, u = run_forward(ops, q, with_w=with_w)
    dx, da, db, dw = run_backward(ops, q, gy.float(), u, with_w=with_w, need_w=with_w)
    want = {"y": y, "dx": dx, "dw": dw, "da": da, "db": db}
    for name, o in out.items():
        assert o.dtype == dtype, f"{name}: dtype {o.dtype}"
        lp = None if dtype == torch.float32 else want[name].to(dtype)
        assert_close_to_ref(name, o.cpu(), want[name], lp, dtype)


@pytest.mark.parametrize("with_w", [False, True], ids=["lora", "base+lora"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_composed_forward_backward_matches_reference(device, dtype, with_w):
    _check_composed(make_problem(**BASE, dtype=dtype), device, with_w)


EDGE = {
    "empty-experts": dict(E=5, group_sizes=[40, 0, 0, 33, 0], ranks=[20, 40, 7, 17, 3]),
    "all-tokens-one-expert": dict(E=4, group_sizes=[0, 0, 75, 0], ranks=[5, 12, 40, 1]),
    "rank-zero": dict(E=3, group_sizes=[20, 35, 12], ranks=[0, 18, 0]),
    "rank-zero-everywhere": dict(E=3, group_sizes=[20, 35, 12], ranks=[0, 0, 0]),
    "rank-r-max": dict(E=3, group_sizes=[33, 20, 14], ranks=[40, 40, 40]),
    "zipf-ragged": dict(E=8, T=90, popularity="zipf:1.5"),
    "single-token": dict(E=4, group_sizes=[0, 0, 1, 0], ranks=[3, 40, 21, 0]),
    "non-pow2-K129-N80": dict(E=2, K=129, N=80, group_sizes=[34, 9], ranks=[19, 33]),
    "rank-not-multiple-of-block-r": dict(E=4, group_sizes=[9, 40, 3, 18], ranks=[1, 17, 31, 33]),
    "no-tokens": dict(E=3, group_sizes=[0, 0, 0], ranks=[4, 0, 40]),
}


@pytest.mark.parametrize("dtype", FP32_BF16)
@pytest.mark.parametrize("case", list(EDGE), ids=list(EDGE))
def test_edge_case(device, case, dtype):
    kw = dict(K=96, N=80, R=40, dtype=dtype)
    kw.update(EDGE[case])
    _check_composed(make_problem(**kw), device)


def test_edge_cases_with_row_split(device, force_row_split):
    for case in ("empty-experts", "all-tokens-one-expert", "rank-zero"):
        _check_composed(make_problem(K=96, N=80, R=40, **EDGE[case]), device)


# ---------------------------------------------------------------- through the registry


@pytest.mark.parametrize("dtype", FP32_BF16)
def test_autograd_through_public_api(device, dtype):
    # backend="triton" through the registered custom op: autograd reaches the primitives
    p = make_problem(E=3, K=96, N=80, R=24, T=50, ranks=[24, 9, 17], popularity="skewed",
                     dtype=dtype)  # fmt: skip
    q = _on(p, device)
    leaves = [t.clone().requires_grad_() for t in (q.x, q.w, q.lora_a, q.lora_b)]
    y = dk.grouped_lora_base(*leaves, q.ranks, q.offsets, q.scale, backend="triton")
    gy = torch.randn(50, 80, generator=torch.Generator().manual_seed(2)).to(dtype)
    y.backward(gy.to(device))
    u = oracle_shrink(p.x, p.lora_a, p.ranks, p.offsets)
    gb = oracle_shrink(gy, p.lora_b.transpose(1, 2), p.ranks, p.offsets, p.scale)
    ref = {
        "y": oracle_base_expand(p.x, p.w, u, p.lora_b, p.ranks, p.offsets, p.scale),
        "dx": oracle_base_expand(gy, p.w.transpose(1, 2), gb, p.lora_a.transpose(1, 2), p.ranks,
                                 p.offsets),
        **dict(zip(("da", "db", "dw"), oracle_weight_grad(gy, p.x, u, gb, p.ranks, p.offsets,
                                                          p.scale))),
    }  # fmt: skip
    got = {"y": y, "dx": leaves[0].grad, "dw": leaves[1].grad, "da": leaves[2].grad,
           "db": leaves[3].grad}  # fmt: skip
    for name, out in got.items():
        # bf16: the oracle's own error in bf16 is the budget (rounded result of the fp64 oracle)
        lp = None if dtype == torch.float32 else ref[name].to(dtype)
        assert_close_to_ref(name, out.detach().cpu(), ref[name], lp, dtype)


def test_gradcheck_fp64(device):
    p = _on(make_problem(E=3, K=20, N=18, R=20, group_sizes=[5, 0, 4], ranks=[17, 3, 2],
                         dtype=torch.float64), device)  # fmt: skip
    leaves = [t.clone().requires_grad_() for t in (p.x, p.w, p.lora_a, p.lora_b)]

    def fn(x, w, a, b):
        return dk.grouped_lora_base(x, w, a, b, p.ranks, p.offsets, p.scale, backend="triton")

    assert fn(*leaves).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=True)


def test_torch_compile_fullgraph_matches_eager_without_recompiles(device):
    # the custom op is opaque to Inductor, so the interpreter path compiles on CPU too
    def loss(x, w, a, b, ranks, offsets, scale):
        return (
            dk.grouped_lora_base(x, w, a, b, ranks, offsets, scale, backend="triton").square().sum()
        )

    def grads(fn, p):
        leaves = [t.clone().requires_grad_() for t in (p.x, p.w, p.lora_a, p.lora_b)]
        fn(*leaves, p.ranks, p.offsets, p.scale).backward()
        return [t.grad for t in leaves]

    p = _on(make_problem(E=3, K=40, N=30, R=20, group_sizes=[10, 0, 25], ranks=[3, 20, 17]), device)
    compiled = torch.compile(loss, fullgraph=True)
    for got, want in zip(grads(compiled, p), grads(loss, p)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    q = _on(make_problem(E=3, K=40, N=30, R=20, group_sizes=[5, 20, 10], ranks=[3, 20, 0]), device)
    with torch._dynamo.config.patch(error_on_recompile=True):  # new group sizes and ranks
        for got, want in zip(grads(compiled, q), grads(loss, q)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_int64_ranks_and_offsets(device):
    p = make_problem(E=3, K=40, N=30, R=20, group_sizes=[10, 0, 25], ranks=[3, 20, 17])
    p64 = Problem(p.x, p.w, p.lora_a, p.lora_b, p.ranks.long(), p.offsets.long(), p.scale)
    gy = torch.ones(35, 30, device=device)
    out, out64 = _compose(_on(p, device), gy, True), _compose(_on(p64, device), gy, True)
    for name in out:
        assert torch.equal(out[name], out64[name]), name


def test_unsupported_dtype_raises_type_error_naming_it(device):
    x = torch.ones(4, 16, dtype=torch.int32, device=device)
    a = torch.ones(2, 8, 16, dtype=torch.int32, device=device)
    ranks = torch.tensor([1, 2], dtype=torch.int32, device=device)
    offsets = torch.tensor([0, 2, 4], dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="x has dtype torch.int32"):
        ti.shrink(x, a, ranks, offsets)


def test_cpu_without_interpreter_raises_clear_error():
    # triton.jit picks interpreted or compiled kernels at import: CPU tensors need TRITON_INTERPRET=1 then.
    import os
    import subprocess
    import sys

    code = (
        "import torch, drlora_kernels as dk\n"
        "x = torch.randn(4, 16); a = torch.randn(2, 8, 16)\n"
        "r = torch.tensor([1, 2], dtype=torch.int32); o = torch.tensor([0, 2, 4], dtype=torch.int32)\n"
        "try:\n"
        "    dk.ops.lora_shrink(x, a, r, o, backend='triton')\n"
        "except RuntimeError as exc:\n"
        "    print('RAISED', exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DRLORA_DISABLE_NATIVE"] = "1"
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "RAISED" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stdout


# ---------------------------------------------------------------- configs, autotune, determinism


def test_every_default_config_fits_sm80_and_sm90_by_the_estimate():
    # the compile gate checks the real numbers; this keeps the table and the pruner consistent
    for site, by_prec in tc.CONFIGS.items():
        for prec, configs in by_prec.items():
            for cc, limit in tc.SMEM_LIMIT.items():
                kept = tc.candidates(site, prec, 64, limit)
                assert kept[0] == tc.fit_rank_block(site, configs[0], 64), (site, prec, cc)


def test_every_site_keeps_a_config_for_99_kib_gpus():
    # sm_86 / sm_89 (A10, L4, RTX 3090/4090) allow 99 KiB per block: the pruner must leave one
    for site, by_prec in tc.CONFIGS.items():
        for prec in by_prec:
            assert tc.candidates(site, prec, 128, tc.SMALL_SMEM_LIMIT), (site, prec)


def test_prune_drops_configs_over_shared_memory_or_registers():
    big = tc._cfg(8, 4, BLOCK_I=256, BLOCK_J=256, BLOCK_M=128)
    assert tc.smem_estimate("weight_grad_w", big, "tf32") > tc.SMEM_LIMIT[90]
    assert tc.prune("weight_grad_w", [big], "tf32", tc.SMEM_LIMIT[90]) == []
    wide = tc._cfg(4, 1, BLOCK_I=256, BLOCK_J=256, BLOCK_M=16)
    assert tc.acc_regs_estimate("weight_grad_w", wide, "16bit") > tc.MAX_ACC_REGS
    assert tc.prune("weight_grad_w", [wide], "16bit", 10**9) == []
    with pytest.raises(RuntimeError, match="shared memory"):
        tc.candidates("shrink", "16bit", 64, smem_limit=1024)


def test_rank_block_is_clamped_to_the_pool():
    cfg = tc.CONFIGS["shrink"]["16bit"][0]
    assert tc.fit_rank_block("shrink", cfg, 8)["BLOCK_R"] == 16
    assert tc.fit_rank_block("shrink", cfg, 40)["BLOCK_R"] == min(64, cfg["BLOCK_R"])
    assert tc.fit_rank_block("weight_grad_w", tc.CONFIGS["weight_grad_w"]["16bit"][0], 8) == \
        tc.CONFIGS["weight_grad_w"]["16bit"][0]  # fmt: skip


def test_allow_tf32_follows_torch_matmul_precision(monkeypatch):
    monkeypatch.setattr(tc, "ALLOW_TF32", None)
    old = torch.get_float32_matmul_precision()
    try:
        for setting, want in (("highest", False), ("high", True), ("medium", True)):
            torch.set_float32_matmul_precision(setting)
            assert tc.allow_tf32() is want, setting
            assert tc.precision(torch.float32) == ("tf32" if want else "fp32")
    finally:
        torch.set_float32_matmul_precision(old)
    assert tc.precision(torch.bfloat16) == "16bit" and tc.precision(torch.float64) == "fp64"


def test_deterministic_mode_pins_the_default(monkeypatch):
    monkeypatch.setenv("DRLORA_TRITON_AUTOTUNE", "1")
    configs = tc.CONFIGS["base_expand"]["16bit"]
    times = {c: 3.0 - i for i, c in enumerate(configs)}  # the last config is the fastest
    tuner = tc.Tuner()
    monkeypatch.setenv("DRLORA_DETERMINISTIC", "1")
    assert tc.deterministic() and not tc.autotune_enabled()
    assert tuner.choose(("k",), configs, times.__getitem__) == configs[0]
    monkeypatch.setenv("DRLORA_DETERMINISTIC", "0")
    torch.use_deterministic_algorithms(True)
    try:
        assert tc.deterministic()
        assert tuner.choose(("k",), configs, times.__getitem__) == configs[0]
    finally:
        torch.use_deterministic_algorithms(False)
    assert not tc.deterministic() and tc.autotune_enabled()
    assert tuner.choose(("k",), configs, times.__getitem__) == configs[-1]


def test_tuner_caches_per_key_and_skips_configs_out_of_resources(monkeypatch):
    monkeypatch.setenv("DRLORA_TRITON_AUTOTUNE", "1")
    monkeypatch.delenv("DRLORA_DETERMINISTIC", raising=False)
    a, b = tc.CONFIGS["shrink"]["16bit"][:2]
    calls = []

    class OutOfResources(Exception):
        pass

    def bench(cfg):
        calls.append(cfg)
        if cfg == a:
            raise OutOfResources("out of resource: shared memory")
        return 1.0

    tuner = tc.Tuner()
    assert tuner.choose(("shrink", 1024), [a, b], bench) == b
    assert tuner.choose(("shrink", 1024), [a, b], bench) == b and len(calls) == 2
    tuner.choose(("shrink", 2048), [a, b], bench)  # a new T bucket tunes again
    assert len(calls) == 4
    with pytest.raises(ValueError):
        tuner.choose(("x",), [a, b], lambda cfg: (_ for _ in ()).throw(ValueError("bug")))


def test_t_bucket_and_row_split_policy():
    assert [tc.t_bucket(t) for t in (1, 16, 17, 1000, 1024, 1025)] == [16, 16, 32, 1024, 1024, 2048]
    # at least twice the mean group, aligned, and the fp32 partials within the budget
    T, E = 65536, 64
    for out_elems in (64 * 2048, 2048 * 2048):
        chunk = tc.rows_per_chunk(T, E, out_elems, 4)
        assert chunk % tc.ROW_SPLIT_ALIGN == 0 and chunk >= 2 * T // E
        assert tc.workspace_slots(T, chunk) * out_elems * 4 <= tc.WORKSPACE_BUDGET * 1.01


def test_workspace_bound_holds_for_any_grouping():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        E = int(torch.randint(1, 20, (1,), generator=gen))
        T = int(torch.randint(0, 3000, (1,), generator=gen))
        chunk = int(torch.randint(1, 400, (1,), generator=gen))
        cuts = torch.randint(0, T + 1, (E - 1,), generator=gen).sort().values.tolist()
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, T])]
        used = sum(-(-n // chunk) for n in sizes if n > chunk)
        assert used <= tc.workspace_slots(T, chunk), (sizes, chunk)


def test_capture_records_every_launch_without_running(monkeypatch):
    # what tools/gate_triton.py compiles: meta tensors, every selectable config, default first
    E, K, N, R, T = 8, 256, 128, 64, 4096
    meta = dict(device="meta")
    x, gy = torch.empty(T, K, **meta), torch.empty(T, N, **meta)
    w, b = torch.empty(E, N, K, **meta), torch.empty(E, N, R, **meta)
    u = torch.empty(T, R, **meta)
    ranks = torch.empty(E, dtype=torch.int32, **meta)
    offsets = torch.empty(E + 1, dtype=torch.int32, **meta)
    scale = torch.empty(E, **meta)
    with ti.capture_launches(smem_limit=tc.SMEM_LIMIT[80]) as launches:
        ti.base_expand(x, w, u, b, ranks, offsets, scale)
        ti.weight_grad(gy, x, u, u, ranks, offsets, scale, need_a=True, need_b=True, need_w=True)
    sites = [launch.site for launch in launches]
    assert sites == ["base_expand", "weight_grad_a", "weight_grad_reduce", "weight_grad_b",
                     "weight_grad_reduce", "weight_grad_w", "weight_grad_reduce"]  # fmt: skip
    first = launches[0]
    assert first.configs == tc.candidates("base_expand", "fp32", R, tc.SMEM_LIMIT[80])
    assert first.constexprs["HAS_BASE"] and first.constexprs["DOT_PRECISION"] == "ieee"
    with pytest.raises(RuntimeError, match="nest"):
        with ti.capture_launches(1), ti.capture_launches(1):
            pass


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_olmoe_like_shape_on_gpu(dtype):
    p = make_problem(E=64, K=2048, N=1024, R=128, T=4096, popularity="zipf:1.2", dtype=dtype,
                     seed=3)  # fmt: skip
    p.ranks.copy_(torch.randint(32, 129, (64,), generator=torch.Generator().manual_seed(0)).int())
    _check_composed(p, torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FP32_BF16)
def test_zipf_skewed_row_split_on_gpu(dtype):
    # one expert holds ~half of 16k rows: the weight gradients split it into chunks
    sizes = [8192] + [128] * 63 + [0]
    p = make_problem(E=65, K=512, N=384, R=64, group_sizes=sizes, dtype=dtype, seed=4)
    assert tc.rows_per_chunk(sum(sizes), 65, 64 * 512, 4) < 8192
    _check_composed(p, torch.device("cuda"))


@pytest.mark.gpu
def test_deterministic_mode_is_bit_identical_on_gpu(monkeypatch):
    monkeypatch.setenv("DRLORA_DETERMINISTIC", "1")
    p = _on(make_problem(E=16, K=512, N=256, R=64, T=6000, popularity="zipf:1.5",
                         dtype=torch.bfloat16), torch.device("cuda"))  # fmt: skip
    gy = torch.randn(6000, 256, device="cuda", dtype=torch.bfloat16)
    first, second = _compose(p, gy, True), _compose(p, gy, True)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.gpu
def test_tf32_follows_matmul_precision_on_gpu(monkeypatch):
    monkeypatch.setattr(tc, "ALLOW_TF32", None)
    p = _on(make_problem(E=4, K=1024, N=512, R=64, T=2048), torch.device("cuda"))
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        ieee = ti.shrink(p.x, p.lora_a, p.ranks, p.offsets)
        torch.set_float32_matmul_precision("high")
        tf32 = ti.shrink(p.x, p.lora_a, p.ranks, p.offsets)
    finally:
        torch.set_float32_matmul_precision(old)
    ref = oracle_shrink(p.x.cpu(), p.lora_a.cpu(), p.ranks.cpu(), p.offsets.cpu())
    err_ieee = (ieee.cpu().double() - ref).abs().max()
    err_tf32 = (tf32.cpu().double() - ref).abs().max()
    assert err_ieee < 1e-4 < err_tf32, (err_ieee, err_tf32)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    dev = torch.device("cuda")
    p = _on(make_problem(E=8, K=256, N=192, R=64, T=500, popularity="zipf:1.5"), dev)
    u = ti.shrink(p.x, p.lora_a, p.ranks, p.offsets)
    ti.base_expand(p.x, p.w, u, p.lora_b, p.ranks, p.offsets, p.scale)  # compile/tune first
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        u = ti.shrink(p.x, p.lora_a, p.ranks, p.offsets)
        y = ti.base_expand(p.x, p.w, u, p.lora_b, p.ranks, p.offsets, p.scale)
    new = torch.tensor([0, 100, 100, 200, 250, 250, 400, 450, 500], dtype=torch.int32, device=dev)
    p.offsets.copy_(new)  # same shapes, new groups: the graph must follow the device values
    p.ranks.copy_(torch.tensor([64, 0, 7, 33, 64, 1, 16, 50], dtype=torch.int32, device=dev))
    graph.replay()
    u_ref = oracle_shrink(p.x.cpu(), p.lora_a.cpu(), p.ranks.cpu(), p.offsets.cpu())
    y_ref = oracle_base_expand(p.x.cpu(), p.w.cpu(), u_ref, p.lora_b.cpu(), p.ranks.cpu(),
                               p.offsets.cpu(), p.scale.cpu())  # fmt: skip
    assert_close_to_ref("y", y.cpu(), y_ref, None, torch.float32)


@pytest.mark.gpu
def test_training_step_makes_no_host_sync():
    # after warm-up (compile + autotune), a forward+backward through the primitives never syncs
    dev = torch.device("cuda")
    p = _on(make_problem(E=16, K=512, N=256, R=64, T=3000, popularity="zipf:1.2",
                         dtype=torch.bfloat16), dev)  # fmt: skip
    gy = torch.randn(3000, 256, device=dev, dtype=torch.bfloat16)
    _compose(p, gy, True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = _compose(p, gy, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out["y"]).all()
