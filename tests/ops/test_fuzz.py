"""Fuzz the public grouped-LoRA ops against a float64 oracle on random problems, every backend.

Each problem draws: the op (``grouped_lora``, ``grouped_lora_base``, ``lora_shrink``,
``lora_expand``), sizes ``E, K, N, R, T`` (odd ones included), group sizes (empty groups, all
tokens in one expert, zipf-like, uniform), ranks from ``0`` to ``r_max`` (the edges twice as
likely), the dtype (fp32 / fp16 / bf16), a float or per-expert scale, inactive slots poisoned
with NaN, integer inputs as int32, int64, strided views or expanded (stride-0) views, and for a
third of the ``grouped_lora*`` problems the backward too (gradients of ``x``, ``A``, ``B``,
``W``; inactive slots must get exactly zero).

The oracle is a plain per-group float64 loop over the inputs as rounded to the problem's dtype;
the error bound is ``tol[dtype] * M`` with ``M`` the same expression on absolute values (a
rounding-error bound that does not depend on cancellation).

Problems are seeded: a failure prints the seed and the problem, and
``DRLORA_FUZZ_SEED=<seed> pytest tests/ops/test_fuzz.py -k <backend>`` replays just that one.
``DRLORA_FUZZ_N`` overrides the number of problems per CPU backend (default 1000; the Triton
interpreter runs a tenth).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from drlora_kernels.ops import (
    available_backends,
    grouped_lora,
    grouped_lora_base,
    lora_expand,
    lora_shrink,
)

pytestmark = pytest.mark.slow

N_PROBLEMS = int(os.environ.get("DRLORA_FUZZ_N", "1000"))
ONLY_SEED = os.environ.get("DRLORA_FUZZ_SEED")
BASE_SEED = 160_000
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# error <= TOL * M: a few units of the output dtype's rounding (fp32 accumulation of <= 48 terms)
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
OPS = ("grouped_lora", "grouped_lora_base", "lora_shrink", "lora_expand")
INT_LAYOUTS = ("int32", "int64", "strided", "expanded")


@dataclass
class Problem:
    seed: int
    op: str
    E: int
    K: int
    N: int
    R: int
    sizes: list[int]
    ranks: list[int]
    dtype: torch.dtype
    scale: float | list[float]
    int_layout: str
    backward: bool
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def describe(self) -> str:
        return (
            f"seed={self.seed} op={self.op} E={self.E} K={self.K} N={self.N} R={self.R} "
            f"T={sum(self.sizes)} sizes={self.sizes} ranks={self.ranks} dtype={self.dtype} "
            f"scale={self.scale} ints={self.int_layout} backward={self.backward}"
        )


def _sizes(rng: random.Random, E: int) -> list[int]:
    kind = rng.choice(("uniform", "empty-heavy", "one-expert", "zipf", "all-empty"))
    T = rng.randint(1, 48)
    if kind == "all-empty":
        return [0] * E
    if kind == "one-expert":
        sizes = [0] * E
        sizes[rng.randrange(E)] = T
        return sizes
    if kind == "uniform":
        return [T // E + (i < T % E) for i in range(E)]
    weights = [
        (0.0 if kind == "empty-heavy" and rng.random() < 0.6 else 1.0 / (i + 1) ** 1.5)
        for i in range(E)
    ]
    if not any(weights):
        weights[rng.randrange(E)] = 1.0
    picks = rng.choices(range(E), weights=weights, k=T)
    return [picks.count(e) for e in range(E)]


def _ranks(rng: random.Random, E: int, R: int, layout: str) -> list[int]:
    if layout == "expanded":  # one rank for all experts: a stride-0 view
        return [rng.choice((0, R, rng.randint(0, R)))] * E
    return [rng.choice((0, R, rng.randint(0, R), rng.randint(0, R))) for _ in range(E)]


def _int_tensor(values: list[int], layout: str) -> torch.Tensor:
    if layout == "int64":
        return torch.tensor(values, dtype=torch.int64)
    if layout == "strided":  # every other element of a larger tensor, garbage in between
        big = torch.full((2 * len(values),), 10_000, dtype=torch.int32)
        big[::2] = torch.tensor(values, dtype=torch.int32)
        return big[::2]
    if layout == "expanded" and len(set(values)) == 1:
        return torch.tensor(values[0], dtype=torch.int32).expand(len(values))
    return torch.tensor(values, dtype=torch.int32)


def make_problem(seed: int, *, int_layouts=INT_LAYOUTS) -> Problem:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    E, K, N, R = rng.randint(1, 6), rng.randint(1, 40), rng.randint(1, 40), rng.randint(1, 9)
    op = rng.choice(OPS)
    layout = rng.choice(int_layouts)
    sizes = _sizes(rng, E)
    ranks = _ranks(rng, E, R, layout)
    dtype = rng.choice(DTYPES)
    scale: float | list[float] = (
        round(rng.uniform(-2, 2), 3)
        if rng.random() < 0.5
        else [round(rng.uniform(-2, 2), 3) for _ in range(E)]
    )
    backward = op in ("grouped_lora", "grouped_lora_base") and rng.random() < 1 / 3
    p = Problem(seed, op, E, K, N, R, sizes, ranks, dtype, scale, layout, backward)
    T = sum(sizes)

    def rand(*shape, std=1.0):  # rounded to the problem's dtype; the oracle sees the same values
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)

    p.tensors = {
        "x": rand(T, K),
        "w": rand(E, N, K, std=K**-0.5),
        "a": rand(E, R, K, std=K**-0.5),
        "b": rand(E, N, R, std=R**-0.5),
        "u": torch.randn(T, R, generator=gen, dtype=torch.float64).float(),
    }
    for e, r in enumerate(ranks):  # inactive slots must never be read
        p.tensors["a"][e, r:] = float("nan")
        p.tensors["b"][e, :, r:] = float("nan")
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    p.tensors["ranks"] = _int_tensor(ranks, layout)
    p.tensors["offsets"] = _int_tensor(offsets, "int32" if layout == "expanded" else layout)
    return p


# --------------------------------------------------------------------------- the oracle


def oracle(p: Problem, grad_y: torch.Tensor | None = None):
    """``(out, M, grads)`` in float64: the op's value, its absolute-value bound, and the gradients."""
    t = {k: v.double() for k, v in p.tensors.items() if v.is_floating_point()}
    x, w, a, b, u = t["x"], t["w"], t["a"], t["b"], t["u"]
    scales = p.scale if isinstance(p.scale, list) else [p.scale] * p.E
    T = x.shape[0]
    width = p.R if p.op == "lora_shrink" else p.N
    out, bound = (
        torch.zeros(T, width, dtype=torch.float64),
        torch.zeros(T, width, dtype=torch.float64),
    )
    grads = {k: torch.zeros_like(v) for k, v in (("x", x), ("a", a), ("b", b), ("w", w))}
    start = 0
    for e, (n, r) in enumerate(zip(p.sizes, p.ranks)):
        rows, s = slice(start, start + n), scales[e]
        start += n
        xe, ae, be = x[rows], a[e, :r], b[e, :, :r]
        if p.op == "lora_shrink":
            out[rows, :r] = xe @ ae.T
            bound[rows, :r] = xe.abs() @ ae.abs().T
            continue
        if p.op == "lora_expand":
            out[rows] = s * u[rows, :r] @ be.T
            bound[rows] = abs(s) * u[rows, :r].abs() @ be.abs().T
            continue
        ue = xe @ ae.T
        out[rows] = s * ue @ be.T
        bound[rows] = abs(s) * (xe.abs() @ ae.abs().T) @ be.abs().T
        if p.op == "grouped_lora_base":
            out[rows] += xe @ w[e].T
            bound[rows] += xe.abs() @ w[e].abs().T
        if grad_y is not None:
            gy = grad_y[rows].double()
            gu = s * gy @ be  # [n, r]
            grads["x"][rows] = gu @ ae + (gy @ w[e] if p.op == "grouped_lora_base" else 0)
            grads["a"][e, :r] = gu.T @ xe
            grads["b"][e, :, :r] = s * gy.T @ ue
            grads["w"][e] = gy.T @ xe
    return out, bound, grads


def _gradient_bounds(p: Problem, grad_y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Absolute-value bounds of the gradients (same expressions on |.|, NaN slots as 0)."""
    t = {
        k: torch.nan_to_num(v.double()).abs() for k, v in p.tensors.items() if v.is_floating_point()
    }
    q = Problem(p.seed, p.op, p.E, p.K, p.N, p.R, p.sizes, p.ranks, torch.float64,
                [abs(s) for s in (p.scale if isinstance(p.scale, list) else [p.scale] * p.E)],
                p.int_layout, p.backward, {**p.tensors, **t})  # fmt: skip
    return oracle(q, grad_y.double().abs())[2]


# --------------------------------------------------------------------------- one problem


def _run(p: Problem, backend: str):
    t = p.tensors
    ranks, offsets = t["ranks"], t["offsets"]
    scale = p.scale if isinstance(p.scale, float) else torch.tensor(p.scale, dtype=torch.float32)
    if p.op == "lora_shrink":
        return lora_shrink(t["x"], t["a"], ranks, offsets, backend=backend), None, None
    if p.op == "lora_expand":
        return lora_expand(t["u"], t["b"], ranks, offsets, scale, backend=backend), None, None
    leaves = {k: t[k].clone().requires_grad_(p.backward) for k in ("x", "a", "b", "w")}
    if p.op == "grouped_lora":
        y = grouped_lora(
            leaves["x"], leaves["a"], leaves["b"], ranks, offsets, scale, backend=backend
        )
        leaves.pop("w")
    else:
        y = grouped_lora_base(
            leaves["x"],
            leaves["w"],
            leaves["a"],
            leaves["b"],
            ranks,
            offsets,
            scale,
            backend=backend,
        )
    if not p.backward:
        return y, None, None
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(p.seed + 1)).to(y.dtype)
    y.backward(grad_y)
    return y, grad_y, {k: v.grad for k, v in leaves.items()}


def check_problem(p: Problem, backend: str) -> None:
    y, grad_y, grads = _run(p, backend)
    ref, bound, ref_grads = oracle(p, grad_y)
    tol = TOL[p.dtype]
    expected_dtype = torch.float32 if p.op == "lora_shrink" else (
        torch.float32 if p.op == "lora_expand" else p.dtype
    )  # fmt: skip
    if p.op == "lora_expand":
        expected_dtype = p.tensors["b"].dtype
    assert y.dtype == expected_dtype, f"output dtype {y.dtype}, expected {expected_dtype}"
    assert tuple(y.shape) == tuple(ref.shape), f"output shape {tuple(y.shape)}"
    assert torch.isfinite(y).all(), "non-finite output (an inactive NaN slot was read?)"
    err = (y.double() - ref).abs() - (tol * bound + 1e-6)
    assert err.max() <= 0 if err.numel() else True, (
        f"output off by {float(err.max()):.3g} beyond the bound at {divmod(int(err.argmax()), ref.shape[1])}"
    )
    if grads is None:
        return
    bounds = _gradient_bounds(p, grad_y)
    for name, g in grads.items():
        gref = ref_grads[name]
        assert g is not None and torch.isfinite(g).all(), f"grad {name} is missing or non-finite"
        if name in ("a", "b"):
            r_idx = torch.arange(p.R)
            inactive = r_idx[None, :] >= torch.tensor(p.ranks)[:, None]  # [E, R]
            mask = inactive[:, :, None] if name == "a" else inactive[:, None, :]
            assert (g.masked_select(mask.expand_as(g)) == 0).all(), (
                f"grad {name}: inactive slots not exactly 0"
            )
        gerr = (g.double() - gref).abs() - (tol * bounds[name] + 1e-6)
        assert gerr.numel() == 0 or gerr.max() <= 0, (
            f"grad {name} off by {float(gerr.max()):.3g} beyond the bound"
        )


# --------------------------------------------------------------------------- the tests


def _check_triton_views() -> None:
    """Run a few strided / stride-0 integer-view problems on Triton (AssertionError if one is wrong)."""
    for seed in range(BASE_SEED, BASE_SEED + 8):
        p = make_problem(seed, int_layouts=("strided", "expanded"))
        p.op, p.backward = "grouped_lora", False
        check_problem(p, "triton")


def _triton_takes_integer_views() -> bool:
    """Whether the Triton public API gives the right answers for strided and stride-0 integer views.

    Issue 16 item 1: the public ops did not make integer inputs contiguous for Triton (wrong
    results; heap corruption that kills the process for stride-0 views), so the probe runs in a
    subprocess. Until that fix is in, the integer-view variants are skipped for Triton (reported
    as a skip, not silently); once it is, they run without any change here.
    """
    root = Path(__file__).resolve().parents[2]
    code = "from tests.ops.test_fuzz import _check_triton_views; _check_triton_views()"
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, timeout=600
    )
    return proc.returncode == 0


def _fuzz(backend: str, layouts: tuple[str, ...], count: int) -> None:
    seeds = [int(ONLY_SEED)] if ONLY_SEED else range(BASE_SEED, BASE_SEED + count)
    for seed in seeds:
        p = make_problem(seed, int_layouts=layouts)
        try:
            check_problem(p, backend)
        except Exception as exc:
            raise AssertionError(
                f"{backend} fails on problem {p.describe()}: {exc}\n"
                f"replay: DRLORA_FUZZ_SEED={seed} pytest {__file__} -k {backend}"
            ) from exc


def _count(backend: str) -> int:
    return N_PROBLEMS if backend != "triton" else max(N_PROBLEMS // 15, 1)


def test_fuzz_against_fp64_oracle(backend):  # every backend (conftest); unavailable ones skip
    # Triton's integer views have their own test below (they can crash the process today)
    layouts = INT_LAYOUTS if backend != "triton" else ("int32", "int64")
    _fuzz(backend, layouts, _count(backend))


@pytest.mark.skipif(not available_backends()["triton"][0], reason="triton unavailable")
def test_fuzz_triton_integer_views():
    if not _triton_takes_integer_views():
        pytest.skip(
            "strided / stride-0 ranks and offsets give wrong results or crash on the Triton "
            "backend: its public API does not make integer inputs contiguous yet (issue 16 item 1)"
        )
    _fuzz("triton", ("strided", "expanded"), _count("triton"))


def test_the_problems_cover_the_edge_cases():
    """The draw reaches every edge the fuzz is meant to: a check on the generator, not on a backend."""
    problems = [make_problem(s) for s in range(BASE_SEED, BASE_SEED + N_PROBLEMS)]
    seen = {
        "empty group": any(0 in p.sizes for p in problems),
        "all tokens in one expert": any(
            sum(1 for s in p.sizes if s) == 1 and p.E > 1 for p in problems
        ),
        "no tokens": any(sum(p.sizes) == 0 for p in problems),
        "rank 0": any(0 in p.ranks for p in problems),
        "rank r_max": any(p.R in p.ranks for p in problems),
        "one expert": any(p.E == 1 for p in problems),
        "backward": any(p.backward for p in problems),
    }
    for layout in INT_LAYOUTS:
        seen[f"ints {layout}"] = any(
            p.int_layout == layout and (layout != "expanded" or p.tensors["ranks"].stride() == (0,))
            for p in problems
        )
    for dtype in DTYPES:
        seen[str(dtype)] = any(p.dtype == dtype for p in problems)
    for op in OPS:
        seen[op] = any(p.op == op for p in problems)
    missing = [k for k, v in seen.items() if not v]
    assert not missing, missing
    p = make_problem(BASE_SEED + 7)
    assert p.describe() == make_problem(BASE_SEED + 7).describe()  # reproducible
