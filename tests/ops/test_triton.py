"""The Triton backend against the reference: every op, every gradient, fp32/fp16/bf16 (+ fp64 gradcheck).

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest), which is
slow: problems are small, but sized past one tile on every axis (interpreter blocks are
``BLOCK_M=32``, ``BLOCK_K/N=64``, ``BLOCK_R=16``), so multi-tile rows, ragged last tiles,
several rank blocks and ranks that are not a multiple of ``BLOCK_R`` are all exercised.

``ref`` is the reference on fp32 copies with ``upcast=True``; ``ref_lp`` is the reference run in the
input dtype with ``upcast=False`` (fp16/bf16 CPU matmuls work in torch 2.13). The reference's
low-precision ``backward``/``expand`` need ``u`` in the input dtype (torch matmul refuses mixed
dtypes), so ``ref_lp`` gets ``u.to(dtype)``: the rounding of ``u`` is then part of the error budget,
as it is in a bf16 PEFT layer.
"""

from __future__ import annotations

import pytest
import torch

import drlora_kernels as dk
from drlora_kernels.ops import available_backends, reference
from tests.helpers import (
    Problem,
    assert_close_to_ref,
    backward_args,
    inactive_mask,
    make_problem,
    poison_inactive,
    run_backward,
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
GRADS = ("dx", "dw", "da", "db", "imp_a", "imp_b")


@pytest.fixture(autouse=True)
def _ieee_fp32(monkeypatch):
    # TF32 off on both sides (A1): fp32 results must match the fp32 oracle to ~1e-5.
    if _ok:
        monkeypatch.setattr(ti, "ALLOW_TF32", False)


def _on(p: Problem, device, dtype=None) -> Problem:
    def mv(t):
        return t.to(
            device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        )

    return Problem(
        mv(p.x),
        mv(p.w),
        mv(p.lora_a),
        mv(p.lora_b),
        p.ranks.to(device),
        p.offsets.to(device),
        p.scale.to(device),
    )


def _triton_all(p: Problem, gy: torch.Tensor, with_w: bool) -> dict[str, torch.Tensor]:
    w = p.w if with_w else None
    y, u = ti.forward(p.x, w, p.lora_a, p.lora_b, p.ranks, p.offsets, p.scale)
    grads = run_backward(ti, p, gy, u, w=w, need_w=with_w, with_importance=True)
    return {"y": y, "u": u, **dict(zip(GRADS, grads))}


def _reference_all(
    p: Problem, gy: torch.Tensor, with_w: bool, upcast: bool
) -> dict[str, torch.Tensor]:
    w = p.w if with_w else None
    y, u = reference.forward(p.x, w, p.lora_a, p.lora_b, p.ranks, p.offsets, p.scale, upcast=upcast)
    u_in = u if upcast else u.to(p.x.dtype)
    grads = run_backward(
        reference, p, gy, u_in, w=w, need_w=with_w, with_importance=True, upcast=upcast
    )
    return {"y": y, "u": u, **dict(zip(GRADS, grads))}


def _grad_out(p: Problem, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(p.x.shape[0], p.lora_b.shape[1], generator=gen).to(p.x.dtype)


def _check(out: dict[str, torch.Tensor], p: Problem, gy: torch.Tensor, with_w: bool) -> None:
    """Check every output in ``out`` against ``ref`` (fp32 oracle) and ``ref_lp`` (oracle in dtype)."""
    dtype = p.x.dtype
    ref = _reference_all(_on(p, "cpu", torch.float32), gy.cpu().float(), with_w, upcast=True)
    ref_lp = (
        _reference_all(_on(p, "cpu"), gy.cpu(), with_w, upcast=False)
        if dtype != torch.float32
        else None
    )
    for name, o in out.items():
        if name == "dw" and not with_w:
            continue
        if name in ("u", "imp_a", "imp_b"):
            assert o.dtype == torch.float32, f"{name}: dtype {o.dtype}, expected float32"
        else:
            assert o.dtype == dtype, f"{name}: dtype {o.dtype}, expected {dtype}"
        assert_close_to_ref(
            name, o.detach().cpu(), ref[name], None if ref_lp is None else ref_lp[name], dtype
        )


def _compare(p: Problem, device, with_w: bool = True) -> dict[str, torch.Tensor]:
    """Every output of the Triton backend module, checked against the reference."""
    gy = _grad_out(p)
    out = _triton_all(_on(p, device), gy.to(device), with_w)
    _check(out, p, gy, with_w)
    return out


# ---------------------------------------------------------------- every op, every dtype


@pytest.mark.parametrize("with_w", [False, True], ids=["lora", "base+lora"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward_matches_reference(device, dtype, with_w):
    p = make_problem(
        E=4, K=96, N=80, R=40, T=70, ranks=[37, 0, 15, 26], popularity="zipf:1.5", dtype=dtype
    )
    _compare(p, device, with_w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_shrink_and_expand_match_reference(device, dtype):
    p = make_problem(
        E=3, K=100, N=70, R=40, group_sizes=[30, 0, 41], ranks=[33, 7, 16], dtype=dtype
    )
    u = ti.shrink(
        p.x.to(device), p.lora_a.to(device), p.ranks.to(device), p.offsets.to(device)
    ).cpu()
    q = _on(p, "cpu", torch.float32)
    ref_u = reference.shrink(q.x, q.lora_a, q.ranks, q.offsets)
    lp_u = (
        reference.shrink(p.x, p.lora_a, p.ranks, p.offsets, upcast=False)
        if dtype != torch.float32
        else None
    )
    assert u.dtype == torch.float32
    assert_close_to_ref("u", u, ref_u, lp_u, dtype)

    # expand from the fp32 oracle's u, so only expand's own error is measured
    y = ti.expand(
        ref_u.to(device),
        p.lora_b.to(device),
        p.ranks.to(device),
        p.offsets.to(device),
        p.scale.to(device),
    )
    ref_y = reference.expand(ref_u, q.lora_b, q.ranks, q.offsets, q.scale)
    lp_y = None
    if dtype != torch.float32:
        lp_y = reference.expand(
            ref_u.to(dtype), p.lora_b, p.ranks, p.offsets, p.scale, upcast=False
        )
    assert y.dtype == dtype
    assert_close_to_ref("y", y.cpu(), ref_y, lp_y, dtype)


@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[2]])
def test_autograd_through_public_api(device, dtype):
    # backend="triton" through the registered custom op: autograd calls drlora::lora_bwd_triton
    p = make_problem(
        E=3, K=96, N=80, R=24, T=50, ranks=[24, 9, 17], popularity="skewed", dtype=dtype
    )
    q = _on(p, device)
    leaves = [t.clone().requires_grad_() for t in (q.x, q.w, q.lora_a, q.lora_b)]
    y = dk.grouped_lora_base(*leaves, q.ranks, q.offsets, q.scale, backend="triton")
    gy = _grad_out(p)
    y.backward(gy.to(device))
    out = {"y": y, **{n: t.grad for n, t in zip(("dx", "dw", "da", "db"), leaves)}}
    _check(out, p, gy, with_w=True)


# ---------------------------------------------------------------- named edge cases (fp32 and bf16)

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


@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[2]])
@pytest.mark.parametrize("case", list(EDGE), ids=list(EDGE))
def test_edge_case(device, case, dtype):
    kw = dict(K=96, N=80, R=40, dtype=dtype)
    kw.update(EDGE[case])
    _compare(make_problem(**kw), device, with_w=True)


def test_lora_only_rank_zero_rows_are_zero(device):
    p = _on(make_problem(E=3, K=40, N=70, R=40, group_sizes=[30, 10, 25], ranks=[0, 40, 0]), device)
    y, u = ti.forward(p.x, None, p.lora_a, p.lora_b, p.ranks, p.offsets, p.scale)
    assert (y[:30] == 0).all() and (y[40:] == 0).all() and (u[:30] == 0).all()
    assert (y[30:40] != 0).any()


# ---------------------------------------------------------------- inactive slots, importance, contract


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_poisoned_inactive_slots_are_never_read(device, dtype):
    p = poison_inactive(
        make_problem(E=4, K=96, N=80, R=40, T=70, ranks=[37, 0, 15, 26], dtype=dtype)
    )
    out = _triton_all(
        _on(p, device), torch.randn(70, 80).to(device=device, dtype=dtype), with_w=True
    )
    for name in ("y", "u", "dx", "dw"):
        assert torch.isfinite(out[name]).all(), f"{name} is not finite"
    dead = inactive_mask(p.ranks, 40).to(device)
    assert (
        torch.isfinite(out["da"][~dead]).all()
        and torch.isfinite(out["db"].transpose(1, 2)[~dead]).all()
    )
    assert (out["da"][dead] == 0).all(), "inactive rows of dA must be exactly zero"
    assert (out["db"].transpose(1, 2)[dead] == 0).all(), (
        "inactive columns of dB must be exactly zero"
    )
    assert (out["imp_a"][dead] == 0).all() and (out["imp_b"][dead] == 0).all()
    assert torch.isfinite(out["imp_a"]).all() and torch.isfinite(out["imp_b"]).all()
    u_dead = torch.zeros_like(out["u"], dtype=torch.bool)
    for e, (lo, r) in enumerate(zip(p.offsets.tolist(), p.ranks.tolist())):
        u_dead[lo : p.offsets[e + 1], r:] = True
    assert (out["u"][u_dead] == 0).all(), "u must be zero beyond r_e"


def test_importance_matches_slot_importance(device):
    # the fused epilogue against slot_importance() applied to the reference's fp32 gradients
    p = make_problem(E=4, K=96, N=80, R=40, T=70, ranks=[37, 0, 15, 40], popularity="skewed")
    gy = torch.randn(70, 80)
    q = _on(p, device)
    _, u = ti.forward(q.x, q.w, q.lora_a, q.lora_b, q.ranks, q.offsets, q.scale)
    # importance without asking for dA/dB: they are computed, not stored, and returned empty
    dx, dw, da, db, imp_a, imp_b = run_backward(
        ti, q, gy.to(device), u, w=q.w, need_x=False, need_a=False, need_b=False,
        with_importance=True,
    )  # fmt: skip
    assert dx.numel() == dw.numel() == da.numel() == db.numel() == 0
    ref_u = reference.shrink(p.x, p.lora_a, p.ranks, p.offsets)
    g = reference.backward(
        gy, p.x, p.w, p.lora_a, p.lora_b, ref_u, p.ranks, p.offsets, p.scale, 0, 0, 1, 1, 0
    )
    ref_a, ref_b = reference.slot_importance(p.lora_a, g[2], p.lora_b, g[3], p.ranks)
    assert_close_to_ref("imp_a", imp_a.cpu(), ref_a, None, torch.float32)
    assert_close_to_ref("imp_b", imp_b.cpu(), ref_b, None, torch.float32)
    assert (ref_a[0, :37] != 0).all() and (ref_b[3] != 0).all(), (
        "test data must give non-zero importance on active slots"
    )


def test_unrequested_outputs_are_fresh_empty_tensors(device):
    p = _on(make_problem(E=3, K=40, N=30, R=20, group_sizes=[10, 5, 20], ranks=[3, 20, 0]), device)
    _, u = ti.forward(p.x, p.w, p.lora_a, p.lora_b, p.ranks, p.offsets, p.scale)
    gy = torch.randn(35, 30, device=device)
    outs = run_backward(ti, p, gy, u, w=p.w, need_a=False)
    assert [tuple(o.shape) for o in outs] == [(35, 40), (0,), (0,), (3, 30, 20), (0,), (0,)]
    ptrs = [o.untyped_storage().data_ptr() for o in outs if o.numel()]
    assert len(set(ptrs)) == len(ptrs)
    assert all(o is not q for o in outs for q in (gy, p.x, p.w, p.lora_a, p.lora_b, u))
    assert len({id(o) for o in outs}) == 6


def test_backward_is_deterministic(device):
    p = _on(make_problem(E=3, K=96, N=80, R=40, group_sizes=[70, 3, 50], ranks=[40, 9, 25]), device)
    _, u = ti.forward(p.x, p.w, p.lora_a, p.lora_b, p.ranks, p.offsets, p.scale)
    gy = torch.randn(123, 80, device=device)
    args = backward_args(p, gy, u, w=p.w, need_w=True, with_importance=True)
    for first, second in zip(ti.backward(*args), ti.backward(*args)):
        assert torch.equal(first, second)


def test_unsupported_dtype_raises_type_error_naming_it(device):
    x = torch.ones(4, 16, dtype=torch.int32, device=device)
    a = torch.ones(2, 8, 16, dtype=torch.int32, device=device)
    ranks = torch.tensor([1, 2], dtype=torch.int32, device=device)
    offsets = torch.tensor([0, 2, 4], dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="x has dtype torch.int32"):
        ti.shrink(x, a, ranks, offsets)


def test_gradcheck_fp64(device):
    p = _on(
        make_problem(
            E=3, K=20, N=18, R=20, group_sizes=[5, 0, 4], ranks=[17, 3, 2], dtype=torch.float64
        ),
        device,
    )
    leaves = [t.clone().requires_grad_() for t in (p.x, p.w, p.lora_a, p.lora_b)]

    def fn(x, w, a, b):
        return dk.grouped_lora_base(x, w, a, b, p.ranks, p.offsets, p.scale, backend="triton")

    assert fn(*leaves).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=True)


def test_opcheck_triton_ops(device):
    from drlora_kernels.ops import get_ops

    ops = get_ops("triton")
    assert ops["forward"]._qualname == "drlora::lora_fwd_triton"
    p = _on(make_problem(E=3, K=40, N=70, R=20, group_sizes=[33, 0, 5], ranks=[20, 4, 0]), device)
    fwd_args = (
        p.x.requires_grad_(),
        p.w,
        p.lora_a.requires_grad_(),
        p.lora_b.requires_grad_(),
        p.ranks,
        p.offsets,
        p.scale,
    )
    torch.library.opcheck(torch.ops.drlora.lora_fwd_triton, fwd_args)
    x, a, b = p.x.detach(), p.lora_a.detach(), p.lora_b.detach()
    _, u = torch.ops.drlora.lora_fwd_triton(x, p.w, a, b, p.ranks, p.offsets, p.scale)
    gy = torch.randn(38, 70, device=device)
    bwd_args = (gy, x, p.w, a, b, u, p.ranks, p.offsets, p.scale, True, True, True, True, True)
    torch.library.opcheck(torch.ops.drlora.lora_bwd_triton, bwd_args)
    torch.library.opcheck(torch.ops.drlora.shrink_triton, (x, a, p.ranks, p.offsets))
    torch.library.opcheck(torch.ops.drlora.expand_triton, (u, b, p.ranks, p.offsets, p.scale))


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


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_olmoe_like_shape_on_gpu(dtype):
    p = make_problem(
        E=64, K=2048, N=1024, R=128, T=4096, popularity="zipf:1.2", dtype=dtype, seed=3
    )
    p.ranks.copy_(torch.randint(32, 129, (64,), generator=torch.Generator().manual_seed(0)).int())
    _compare(p, torch.device("cuda"), with_w=True)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    dev = torch.device("cuda")
    p = _on(make_problem(E=8, K=256, N=192, R=64, T=500, popularity="zipf:1.5"), dev)
    args = (p.x, p.w, p.lora_a, p.lora_b, p.ranks, p.offsets, p.scale)
    ti.forward(*args)  # compile/autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, _ = ti.forward(*args)
    new_sizes = torch.tensor(
        [0, 100, 100, 200, 250, 250, 400, 450, 500], dtype=torch.int32, device=dev
    )
    p.offsets.copy_(new_sizes)  # same shapes, new groups: the graph must follow the device values
    p.ranks.copy_(torch.tensor([64, 0, 7, 33, 64, 1, 16, 50], dtype=torch.int32, device=dev))
    graph.replay()
    ref_y, _ = reference.forward(*(t.cpu() for t in args))
    assert_close_to_ref("y", y.cpu(), ref_y, None, torch.float32)


def test_int64_ranks_and_offsets(device):
    p = make_problem(E=3, K=40, N=30, R=20, group_sizes=[10, 0, 25], ranks=[3, 20, 17])
    p64 = Problem(p.x, p.w, p.lora_a, p.lora_b, p.ranks.long(), p.offsets.long(), p.scale)
    out = _triton_all(_on(p, device), torch.ones(35, 30, device=device), True)
    out64 = _triton_all(_on(p64, device), torch.ones(35, 30, device=device), True)
    for name in out:
        assert torch.equal(out[name], out64[name]), name


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
