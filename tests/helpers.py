"""Shared test helpers: random grouped-LoRA problems and the tolerance rule.

Tolerance rule (flash-attention's): a backend's error against the fp32 oracle
must be at most twice the oracle's own error when run in the input dtype,
plus a small per-dtype floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drlora_kernels.ops.registry import lora_backward, lora_forward, plain_ops

ATOL_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@dataclass
class Problem:
    x: torch.Tensor
    w: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    ranks: torch.Tensor
    offsets: torch.Tensor
    scale: torch.Tensor

    @property
    def group_sizes(self) -> list[int]:
        off = self.offsets.tolist()
        return [off[i + 1] - off[i] for i in range(len(off) - 1)]


def group_sizes_for(popularity: str, E: int, T: int, gen: torch.Generator) -> list[int]:
    """Group sizes summing to ``T`` with a named popularity profile."""
    if popularity == "uniform":
        base = [T // E] * E
        for i in range(T - sum(base)):
            base[i] += 1
        return base
    if popularity.startswith("zipf"):
        a = float(popularity.split(":")[1]) if ":" in popularity else 1.5
        p = torch.tensor([1.0 / (i + 1) ** a for i in range(E)])
        p = p[torch.randperm(E, generator=gen)]
    elif popularity == "one-hot":
        p = torch.zeros(E)
        p[int(torch.randint(E, (1,), generator=gen))] = 1.0
    elif popularity == "empty-heavy":
        p = torch.zeros(E)
        keep = torch.randperm(E, generator=gen)[: max(1, E // 3)]
        p[keep] = 1.0
    elif popularity == "skewed":
        p = torch.rand(E, generator=gen) ** 4 + 1e-3
    else:
        raise ValueError(popularity)
    if T == 0:
        return [0] * E
    counts = torch.multinomial(p / p.sum(), T, replacement=True, generator=gen)
    return torch.bincount(counts, minlength=E).tolist()


def make_problem(
    E: int = 4,
    K: int = 32,
    N: int = 24,
    R: int = 8,
    *,
    T: int = 40,
    ranks: list[int] | None = None,
    group_sizes: list[int] | None = None,
    popularity: str = "uniform",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    scale: float | list[float] = 0.75,
    seed: int = 0,
) -> Problem:
    """A random grouped LoRA problem: non-zero data everywhere (B is not zero-initialised)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = group_sizes if group_sizes is not None else group_sizes_for(popularity, E, T, gen)
    assert len(sizes) == E
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32)
    if ranks is None:
        ranks = torch.randint(0, R + 1, (E,), generator=gen).tolist()
    T = int(offsets[-1])

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(dtype=dtype, device=device)

    scale_t = torch.tensor(
        scale if isinstance(scale, list) else [scale] * E, dtype=torch.float32, device=device
    )
    return Problem(
        x=rnd(T, K),
        w=rnd(E, N, K, s=K**-0.5),
        lora_a=rnd(E, R, K, s=K**-0.5),
        lora_b=rnd(E, N, R, s=R**-0.5),
        ranks=torch.tensor(ranks, dtype=torch.int32, device=device),
        offsets=offsets.to(device),
        scale=scale_t,
    )


def poison_inactive(p: Problem) -> Problem:
    """Fill every inactive slot (``A[e, r_e:]``, ``B[e, :, r_e:]``) with NaN."""
    a, b = p.lora_a.clone(), p.lora_b.clone()
    for e, r in enumerate(p.ranks.tolist()):
        a[e, r:] = float("nan")
        b[e, :, r:] = float("nan")
    return Problem(p.x, p.w, a, b, p.ranks, p.offsets, p.scale)


def oracle(upcast: bool = True):
    """The reference backend's primitives as plain functions (``upcast=False``: in the input dtype)."""
    return plain_ops("reference", upcast=upcast)


def run_forward(ops, p: Problem, *, with_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, u)`` of problem ``p`` composed from ``ops``' primitives (a ``BackendOps``)."""
    return lora_forward(
        ops, x=p.x, w=p.w if with_w else None, lora_a=p.lora_a, lora_b=p.lora_b,
        ranks=p.ranks, offsets=p.offsets, scale=p.scale,
    )  # fmt: skip


def run_backward(
    ops,
    p: Problem,
    grad_y: torch.Tensor,
    u: torch.Tensor,
    *,
    with_w: bool,
    need_x: bool = True,
    need_a: bool = True,
    need_b: bool = True,
    need_w: bool = False,
    fused: bool = True,
):
    """The registry's backward of problem ``p`` on ``ops`` -> ``Grads(dx, da, db, dw)`` (None: not asked)."""
    return lora_backward(
        ops, grad_y=grad_y, x=p.x, w=p.w if with_w else None, lora_a=p.lora_a, lora_b=p.lora_b,
        u=u, ranks=p.ranks, offsets=p.offsets, scale=p.scale, need_x=need_x, need_a=need_a,
        need_b=need_b, need_w=need_w, fused=fused,
    )  # fmt: skip


def pool_lora(pool, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The LoRA update of one ``RankPool`` on expert-sorted rows ``x`` (reference backend)."""
    from drlora_kernels.ops import grouped_lora

    return grouped_lora(
        x, pool.lora_A, pool.lora_B, pool.ranks, offsets, pool.scaling, backend="reference"
    )


def inactive_mask(ranks: torch.Tensor, R: int) -> torch.Tensor:
    """`[E, R]` bool, True where the slot is inactive."""
    return torch.arange(R, device=ranks.device)[None, :] >= ranks[:, None]


def assert_close_to_ref(
    name: str, out: torch.Tensor, ref: torch.Tensor, ref_lp: torch.Tensor | None, dtype: torch.dtype
) -> None:
    """``max|out - ref| <= 2 * max|ref_lp - ref| + floor[dtype]`` (ref: fp32/fp64 oracle; ref_lp: oracle in ``dtype``)."""
    assert out.shape == ref.shape, (
        f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    )
    out64, ref64 = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out64).all(), (
        f"{name}: non-finite values at {(~torch.isfinite(out64)).nonzero()[:5].tolist()}"
    )
    err = (out64 - ref64).abs()
    lp_err = (
        0.0
        if ref_lp is None
        else float((ref_lp.double() - ref64).abs().max())
        if ref.numel()
        else 0.0
    )
    scale = float(ref64.abs().max()) if ref.numel() else 0.0
    tol = 2 * lp_err + ATOL_FLOOR[dtype] * max(1.0, scale)
    max_err = float(err.max()) if err.numel() else 0.0
    if max_err > tol:
        idx = (err > tol).nonzero()[:5].tolist()
        vals = [(i, float(out64[tuple(i)]), float(ref64[tuple(i)])) for i in idx]
        rmse = float(err.pow(2).mean().sqrt() / ref64.pow(2).mean().sqrt().clamp_min(1e-30))
        raise AssertionError(
            f"{name}: max error {max_err:.3e} > tol {tol:.3e} (ref_lp error {lp_err:.3e}, dtype {dtype}); "
            f"relative RMSE {rmse:.2e}; first mismatches (index, out, ref): {vals}"
        )
