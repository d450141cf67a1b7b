"""The native CUDA primitives (CUTLASS grouped GEMMs, csrc/cuda) against an fp32 oracle per expert.

Every test needs a GPU (``@pytest.mark.gpu``; ``bash bench/gpu.sh`` runs them) and the extension
built with CUDA. NONE OF THEM HAS RUN YET: no GPU was available when the kernels were written;
they compile for sm_80/sm_90 in CI (tests/test_gate_cuda.py). The cases cover what the kernels
special-case: ragged and empty groups, rank 0, rank R, ranks and R that are not multiples of 8,
NaN in inactive slots, the strided factors the backward passes (``lora_b^T``, ``lora_a^T``,
``w^T``), per-expert scale, no host sync, and the fp32 / alignment errors.
"""

from __future__ import annotations

import pytest
import torch

from drlora_kernels import _native

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _native.HAS_NATIVE_CUDA, reason="native extension built without CUDA"),
]

C = _native._C
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _problem(E, K, N, R, counts, ranks, dtype, poison=True, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    T = sum(counts)
    dev = "cuda"

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.25).to(dev, dtype)

    x, w = rnd(T, K), rnd(E, N, K)
    a, b = rnd(E, R, K), rnd(E, N, R)
    if poison:  # inactive slots must never be read
        for e, r in enumerate(ranks):
            a[e, r:] = float("nan")
            b[e, :, r:] = float("nan")
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    return dict(
        x=x,
        w=w,
        a=a,
        b=b,
        ranks=torch.tensor(ranks, dtype=torch.int32, device=dev),
        offsets=offsets.to(dev),
        scale=(0.5 + torch.rand(E, generator=g)).to(dev),
        grad_y=rnd(T, N),
    )


def _groups(p):
    off = p["offsets"].tolist()
    return [(e, int(r), off[e], off[e + 1]) for e, r in enumerate(p["ranks"].tolist())]


def oracle_shrink(x, a, p, scale):
    u = torch.zeros(x.shape[0], a.shape[1], device=x.device)
    for e, r, lo, hi in _groups(p):
        if r and hi > lo:
            s = 1.0 if scale is None else scale[e].item()
            u[lo:hi, :r] = s * (x[lo:hi].float() @ a[e, :r].float().T)
    return u


def oracle_base_expand(x, w, u, b, p, scale):
    y = torch.zeros(u.shape[0], b.shape[1], device=u.device)
    for e, r, lo, hi in _groups(p):
        if w is not None:
            y[lo:hi] = x[lo:hi].float() @ w[e].float().T
        if r:
            y[lo:hi] += scale[e].item() * (u[lo:hi, :r] @ b[e, :, :r].float().T)
    return y


def oracle_weight_grad(gy, x, u, gb, p):
    E, R, K, N = p["ranks"].numel(), u.shape[1], x.shape[1], gy.shape[1]
    da = torch.zeros(E, R, K, device=x.device)
    db = torch.zeros(E, N, R, device=x.device)
    dw = torch.zeros(E, N, K, device=x.device)
    for e, r, lo, hi in _groups(p):
        if hi == lo:
            continue
        dw[e] = gy[lo:hi].float().T @ x[lo:hi].float()
        if r:
            da[e, :r] = gb[lo:hi, :r].T @ x[lo:hi].float()
            db[e, :, :r] = p["scale"][e].item() * (gy[lo:hi].float().T @ u[lo:hi, :r])
    return da, db, dw


def _close(out, ref, dtype, what):
    scale = ref.abs().max().clamp_min(1e-6)
    err = (out.float() - ref).abs().max() / scale
    assert torch.isfinite(out).all(), f"{what}: non-finite values (inactive slots read?)"
    assert err <= TOL[dtype], f"{what}: max error {err:.3e} x max|ref| > {TOL[dtype]}"


CASES = {
    # ragged groups, an empty group, rank 0 and rank R, odd ranks
    "ragged": dict(E=6, K=64, N=48, R=16, counts=[17, 0, 40, 1, 23, 9], ranks=[0, 3, 16, 7, 1, 12]),
    # R and every rank not a multiple of 8 (zero-padded operands, 1-element stores)
    "odd_r": dict(E=4, K=32, N=40, R=13, counts=[33, 5, 0, 60], ranks=[13, 5, 11, 1]),
    # larger: several 128-row tiles per group, N > one tile
    "tiles": dict(E=3, K=256, N=264, R=24, counts=[300, 129, 7], ranks=[24, 17, 8]),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request):
    return CASES[request.param]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_forward_primitives_match_oracle(case, dtype):
    p = _problem(**case, dtype=dtype)
    u = C.shrink(p["x"], p["a"], p["ranks"], p["offsets"], None)
    assert u.dtype == torch.float32 and u.shape == (p["x"].shape[0], case["R"])
    _close(u, oracle_shrink(p["x"], p["a"], p, None), dtype, "shrink")
    for e, r, lo, hi in _groups(p):
        assert (u[lo:hi, r:] == 0).all(), f"u: inactive slots of expert {e} not zero"
    for with_w in (True, False):
        w = p["w"] if with_w else None
        y = C.base_expand(p["x"], w, u, p["b"], p["ranks"], p["offsets"], p["scale"])
        assert y.dtype == dtype
        _close(y, oracle_base_expand(p["x"], w, u, p["b"], p, p["scale"]), dtype, f"y w={with_w}")
        if not with_w:
            for e, r, lo, hi in _groups(p):
                if r == 0:
                    assert (y[lo:hi] == 0).all(), f"y rows of rank-0 expert {e} not zero"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_backward_composition_matches_oracle(case, dtype):
    """gb = shrink(dY, B^T, s); dX = base_expand(dY, W^T, gb, A^T, 1); weight_grad."""
    p = _problem(**case, dtype=dtype)
    x, gy, ranks, offsets, scale = p["x"], p["grad_y"], p["ranks"], p["offsets"], p["scale"]
    u = C.shrink(x, p["a"], ranks, offsets, None)
    gb = C.shrink(gy, p["b"].transpose(1, 2), ranks, offsets, scale)
    _close(gb, oracle_shrink(gy, p["b"].transpose(1, 2), p, scale), dtype, "gb")
    ones = torch.ones_like(scale)
    dx = C.base_expand(gy, p["w"].transpose(1, 2), gb, p["a"].transpose(1, 2), ranks, offsets, ones)
    ref_dx = oracle_base_expand(gy, p["w"].transpose(1, 2), gb, p["a"].transpose(1, 2), p, ones)
    _close(dx, ref_dx, dtype, "dx")
    da, db, dw = C.weight_grad(gy, x, u, gb, ranks, offsets, scale, True, True, True)
    ref_da, ref_db, ref_dw = oracle_weight_grad(gy, x, u, gb, p)
    _close(da, ref_da, dtype, "da")
    _close(db, ref_db, dtype, "db")
    _close(dw, ref_dw, dtype, "dw")
    for e, r, lo, hi in _groups(p):
        assert (da[e, r:] == 0).all() and (db[e, :, r:] == 0).all(), f"slots >= r_{e} not zero"
        if hi == lo:
            assert (da[e] == 0).all() and (db[e] == 0).all() and (dw[e] == 0).all()


def test_weight_grad_returns_empty_for_gradients_not_asked_for():
    p = _problem(**CASES["ragged"], dtype=torch.bfloat16)
    u = C.shrink(p["x"], p["a"], p["ranks"], p["offsets"], None)
    da, db, dw = C.weight_grad(
        p["grad_y"], p["x"], u, None, p["ranks"], p["offsets"], p["scale"], False, True, False
    )
    assert da.shape == (0,) and dw.shape == (0,) and db.shape == p["b"].shape


def test_no_host_sync():
    p = _problem(**CASES["ragged"], dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        u = C.shrink(p["x"], p["a"], p["ranks"], p["offsets"], None)
        C.base_expand(p["x"], p["w"], u, p["b"], p["ranks"], p["offsets"], p["scale"])
        C.weight_grad(
            p["grad_y"], p["x"], u, u, p["ranks"], p["offsets"], p["scale"], True, True, True
        )
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_float32_is_a_type_error_naming_the_triton_backend():
    p = _problem(**CASES["ragged"], dtype=torch.float32, poison=False)
    with pytest.raises(TypeError, match="triton"):
        C.shrink(p["x"], p["a"], p["ranks"], p["offsets"], None)


def test_unaligned_feature_dim_is_a_value_error():
    p = _problem(E=2, K=12, N=16, R=4, counts=[5, 3], ranks=[4, 2], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 8"):
        C.shrink(p["x"], p["a"], p["ranks"], p["offsets"], None)


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_olmoe_like_layer_shape(dtype):
    """OLMoE gate_up-like: E=64, K=2048, N=2048, R=64, zipf-skewed groups, mixed ranks."""
    E, K, N, R = 64, 2048, 2048, 64
    weights = 1.0 / torch.arange(1, E + 1, dtype=torch.float64)
    counts = (weights / weights.sum() * 8192).round().long().tolist()
    counts[-1] = 0
    ranks = [(8 * e) % (R + 1) for e in range(E)]
    p = _problem(E, K, N, R, counts, ranks, dtype)
    u = C.shrink(p["x"], p["a"], p["ranks"], p["offsets"], None)
    y = C.base_expand(p["x"], p["w"], u, p["b"], p["ranks"], p["offsets"], p["scale"])
    _close(y, oracle_base_expand(p["x"], p["w"], u, p["b"], p, p["scale"]), dtype, "y")
