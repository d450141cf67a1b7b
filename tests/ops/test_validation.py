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
        (lambda p: dict(ranks=[2, 8, 0, 4]), TypeError, "ranks must be a torch.Tensor"),
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
        (lambda p: dict(scale=float("nan")), ValueError, "scale must be finite"),
        (lambda p: dict(scale=float("inf")), ValueError, "scale must be finite"),
        (
            lambda p: dict(scale=torch.tensor([1.0, float("-inf"), 1.0, 1.0])),
            ValueError,
            r"scale\[1\] = -inf",
        ),
        (lambda p: dict(scale=torch.tensor(float("nan"))), ValueError, "scale must be finite"),
        (
            lambda p: dict(scale=torch.ones(4, requires_grad=True)),
            ValueError,
            "scale requires grad",
        ),
        (lambda p: dict(scale="2.0"), TypeError, "scale must be a float or a tensor"),
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
        "ranks-list",
        "ranks-short",
        "rank-above-R",
        "rank-negative",
        "offsets-short",
        "offsets-not-zero",
        "offsets-end",
        "offsets-non-monotone",
        "offsets-float",
        "scale-shape",
        "scale-nan",
        "scale-inf",
        "scale-tensor-inf",
        "scale-0d-nan",
        "scale-requires-grad",
        "scale-str",
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
    from drlora_kernels.ops import backends

    monkeypatch.setitem(backends._loaded, "native", (None, "pretend it failed to build"))
    with pytest.raises(dk.BackendUnavailableError, match="pretend it failed to build"):
        _call(p, backend="native")


def test_module_without_the_three_primitives_is_unavailable(monkeypatch):
    """A backend module still on the old contract is reported unavailable, with the reason."""
    import importlib
    import types

    from drlora_kernels.ops import backends

    old = types.ModuleType("old_backend")
    old.is_available = lambda: (True, "imports fine")
    old.shrink = old.expand = old.forward = old.backward = lambda *a: None  # the old contract
    real_import = importlib.import_module
    monkeypatch.setattr(
        backends.importlib,
        "import_module",
        lambda path: old if path.endswith("triton_impl") else real_import(path),
    )
    monkeypatch.setattr(backends, "_loaded", {})
    ok, why = backends.describe_backend("triton").is_available()
    assert not ok and "no base_expand, weight_grad" in why
    assert dk.ops.resolve_backend("auto", torch.device("cuda")) != "triton"
    with pytest.raises(dk.BackendUnavailableError, match="no base_expand, weight_grad"):
        dk.ops.resolve_backend("triton", torch.device("cuda"))


def test_auto_prefers_triton_on_cuda(monkeypatch):
    """auto on CUDA = triton, then reference: the native CUDA kernels (never run on a GPU)
    leave auto; an explicit backend="native" still selects them."""
    from drlora_kernels.ops import backends

    usable: set[str] = set()

    class FakeBackend:
        def __init__(self, name):
            self.name = name

        def supports(self, device):
            return self.name in usable, ""

        def module(self):
            return None

    for name in backends.DESCRIPTORS:
        monkeypatch.setitem(backends.DESCRIPTORS, name, FakeBackend(name))
    cuda = torch.device("cuda")
    assert backends.AUTO_ORDER["cuda"] == ("triton", "reference")
    usable.update({"reference", "native", "triton"})
    assert backends.resolve_backend("auto", cuda) == "triton"
    usable.discard("triton")
    assert backends.resolve_backend("auto", cuda) == "reference"
    assert backends.resolve_backend("native", cuda) == "native"


def test_shrink_expand_validation(p):
    with pytest.raises(ValueError, match="lora_a must have shape"):
        dk.lora_shrink(p.x[:, :-1], p.lora_a, p.ranks, p.offsets)
    with pytest.raises(ValueError, match="scale must be finite"):
        dk.lora_shrink(p.x, p.lora_a, p.ranks, p.offsets, scale=float("nan"))
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
    with pytest.raises(ValueError, match="expert ids"):
        dk.route_tokens(torch.tensor([[0, -1]]), torch.ones(1, 2), num_experts=4)
    with pytest.raises(TypeError, match="integer tensor"):
        dk.route_tokens(idx.float(), torch.ones(2, 2), num_experts=8)


# ---------------------------------------------------------------- integer inputs (issue 16)


def _int_views(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values as ``t`` as an int64 tensor, a strided view and (if constant) an expanded one."""
    spread = torch.zeros(2 * t.numel(), dtype=t.dtype)
    spread[::2] = t
    spread[1::2] = 10_000  # garbage between the strided elements: read it and the result is wrong
    views = {"int64": t.long(), "strided": spread[::2], "strided-int64": spread.long()[::2]}
    return views


@pytest.mark.parametrize("which", ["ranks", "offsets"])
@pytest.mark.parametrize("with_w", [False, True], ids=["lora", "base+lora"])
def test_strided_and_int64_integer_inputs(backend, which, with_w):
    """Every backend gets the same result from int64 and strided views as from contiguous int32."""
    p = make_problem(E=4, K=16, N=12, R=8, group_sizes=[3, 0, 5, 2], ranks=[2, 8, 0, 4])
    base = dict(x=p.x, lora_a=p.lora_a, lora_b=p.lora_b, ranks=p.ranks, offsets=p.offsets)

    def run(**over):
        args = {**base, **over}
        leaves = {k: args[k].clone().requires_grad_() for k in ("x", "lora_a", "lora_b")}
        args.update(leaves)
        if with_w:
            y = dk.grouped_lora_base(args["x"], p.w, args["lora_a"], args["lora_b"], args["ranks"],
                                     args["offsets"], p.scale, backend=backend)  # fmt: skip
        else:
            y = dk.grouped_lora(**args, scale=p.scale, backend=backend)
        y.backward(torch.ones_like(y))
        return [y.detach()] + [leaves[k].grad for k in ("x", "lora_a", "lora_b")]

    expected = run()
    for name, view in _int_views(base[which]).items():
        for got, exp in zip(run(**{which: view}), expected):
            torch.testing.assert_close(got, exp, msg=f"{which} as {name}")


def test_expanded_ranks(backend):
    p = make_problem(E=4, K=16, N=12, R=8, group_sizes=[3, 0, 5, 2], ranks=[3, 3, 3, 3])
    expanded = torch.tensor([3], dtype=torch.int64).expand(4)
    y = dk.grouped_lora(p.x, p.lora_a, p.lora_b, expanded, p.offsets, p.scale, backend=backend)
    exp = dk.grouped_lora(p.x, p.lora_a, p.lora_b, p.ranks, p.offsets, p.scale, backend=backend)
    torch.testing.assert_close(y, exp)
    u = dk.lora_shrink(p.x, p.lora_a, expanded, p.offsets, backend=backend)
    torch.testing.assert_close(
        u, dk.lora_shrink(p.x, p.lora_a, p.ranks, p.offsets, backend=backend)
    )


def test_route_tokens_integer_views():
    idx = torch.tensor([[3, 0, 9], [1, 3, 9], [0, 2, 9]])[:, :2]  # strided [T, k] view
    expected = dk.route_tokens(idx.contiguous(), torch.ones(3, 2), num_experts=4)
    for view in (idx, idx.int(), idx.t().contiguous().t()):
        got = dk.route_tokens(view, torch.ones(3, 2), num_experts=4)
        torch.testing.assert_close(got.offsets, expected.offsets)
        torch.testing.assert_close(got.token_index, expected.token_index)
    assert expected.offsets.tolist() == [0, 2, 3, 4, 6]
    assert expected.offsets.dtype == torch.int32


# ---------------------------------------------------------------- value checks off the host


def test_accelerator_checks_are_device_asserts(p):
    """With host reads off (as on CUDA), bad values still raise: device-side asserts."""
    from drlora_kernels.ops._sync import simulate_accelerator

    with simulate_accelerator():
        with pytest.raises(RuntimeError, match="ranks out of range"):
            _call(p, ranks=torch.tensor([2, 9, 0, 4], dtype=torch.int32))
        with pytest.raises(RuntimeError, match="offsets must start at 0"):
            _call(p, offsets=torch.tensor([0, 5, 3, 8, 10], dtype=torch.int32))
        with pytest.raises(RuntimeError, match="scale must be finite"):
            _call(p, scale=torch.tensor([1.0, float("nan"), 1.0, 1.0]))
        with pytest.raises(RuntimeError, match="expert id outside"):
            dk.route_tokens(torch.tensor([[0, 4]]), torch.ones(1, 2), num_experts=4)


def test_drlora_check_reads_values_on_the_host(p, monkeypatch):
    """DRLORA_CHECK=1: eager ValueErrors naming the entry, also where the host would not look."""
    from drlora_kernels.ops._sync import simulate_accelerator

    monkeypatch.setenv("DRLORA_CHECK", "1")
    with simulate_accelerator():
        with pytest.raises(ValueError, match=r"ranks\[1\] = 9"):
            _call(p, ranks=torch.tensor([2, 9, 0, 4], dtype=torch.int32))
