"""Benchmark workloads: frozen dataclasses, named profiles and one registry.

A :class:`Workload` fixes everything a provider needs to build its inputs:
the expert stack (``E`` experts, ``K`` in, ``N`` out, ``R = r_max`` slots),
the routing (``tokens`` tokens, ``top_k`` experts each, ``group_profile``), the
active ranks (``rank_profile``) and the dtype. For the ``layer`` suite ``K`` is
the hidden size ``H`` and ``N`` the expert intermediate size ``I`` (the block
holds ``gate_up [E, 2I, H]`` and ``down [E, H, I]``).

Rank profiles are ``"<skew>:<mean>"``; every skew of a given mean has the same
total rank ``E * mean`` (so dynamic and uniform runs do the same LoRA FLOPs):

* ``uniform:m``  every expert at ``m`` (plain LoRA / PEFT's setting);
* ``ragged:m``   uniform-ish: ``m`` plus a random spread of up to ``m/2``;
* ``zipf:m``     ranks proportional to a Zipf(1) law over a random expert order;
* ``rmaxfew:m``  ``E/8`` experts at ``r_max``, the others share the rest.

Group profiles set the router's expert popularity: ``balanced`` (random routing,
every expert equally likely) or ``zipf:a`` (expert ``i`` chosen with weight
``1/(i+1)^a``, random expert order).

Shapes follow OLMoE-1B-7B (64 experts, top-8, hidden 2048, intermediate 1024,
DR-LoRA r_target 64 / r_max 128) on GPU and a 4x smaller stand-in on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

RANK_SKEWS = ("uniform", "ragged", "zipf", "rmaxfew")
DYNAMIC_SKEWS = RANK_SKEWS[1:]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Workload:
    """One benchmark problem (see the module docstring for field meanings)."""

    name: str
    E: int
    K: int
    N: int
    R: int
    top_k: int
    tokens: int
    rank_profile: str = "uniform:16"
    group_profile: str = "balanced"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for field_name in ("E", "K", "N", "R", "top_k", "tokens"):
            val = getattr(self, field_name)
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"Workload.{field_name} must be a positive int, got {val!r}")
        if self.top_k > self.E:
            raise ValueError(f"Workload.top_k ({self.top_k}) must not exceed E ({self.E})")
        if self.dtype not in DTYPES:
            raise ValueError(f"Workload.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        skew, mean = parse_rank_profile(self.rank_profile)
        if mean > self.R:
            raise ValueError(f"Workload.rank_profile mean {mean} exceeds R={self.R}")
        parse_group_profile(self.group_profile)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def rank_skew(self) -> str:
        return parse_rank_profile(self.rank_profile)[0]

    @property
    def mean_rank(self) -> int:
        return parse_rank_profile(self.rank_profile)[1]

    @property
    def rows(self) -> int:
        """Expert-sorted rows the grouped ops see: ``tokens * top_k``."""
        return self.tokens * self.top_k

    def with_ranks(self, rank_profile: str) -> Workload:
        """The same problem with another rank profile (name suffix updated)."""
        base = self.name.rsplit("@", 1)[0]
        return replace(self, name=f"{base}@{rank_profile}", rank_profile=rank_profile)

    def shape_key(self) -> tuple:
        """Everything but the rank skew: workloads with equal keys are directly comparable."""
        return (self.E, self.K, self.N, self.R, self.top_k, self.tokens, self.mean_rank,
                self.group_profile, self.dtype)  # fmt: skip


def parse_rank_profile(profile: str) -> tuple[str, int]:
    """``"zipf:48"`` -> ``("zipf", 48)``; raises ``ValueError`` naming ``rank_profile``."""
    skew, _, mean = profile.partition(":")
    if skew not in RANK_SKEWS or not mean.isdigit():
        raise ValueError(
            f"rank_profile must be '<skew>:<mean>' with skew in {RANK_SKEWS}, got {profile!r}"
        )
    return skew, int(mean)


def parse_group_profile(profile: str) -> float:
    """Zipf exponent of a group profile (``0.0`` for ``balanced``)."""
    if profile == "balanced":
        return 0.0
    kind, _, a = profile.partition(":")
    try:
        if kind == "zipf":
            return float(a)
    except ValueError:
        pass
    raise ValueError(f"group_profile must be 'balanced' or 'zipf:<a>', got {profile!r}")


def _fix_total(ranks: list[int], total: int, R: int, gen: torch.Generator) -> list[int]:
    """Nudge ``ranks`` (each in ``[0, R]``) by +-1 steps until they sum to ``total``."""
    ranks = [min(max(r, 0), R) for r in ranks]
    order = torch.randperm(len(ranks), generator=gen).tolist()
    i = 0
    while sum(ranks) != total:
        e = order[i % len(ranks)]
        if sum(ranks) < total and ranks[e] < R:
            ranks[e] += 1
        elif sum(ranks) > total and ranks[e] > 0:
            ranks[e] -= 1
        i += 1
    return ranks


def make_ranks(profile: str, E: int, R: int, seed: int = 0) -> list[int]:
    """Active ranks for ``E`` experts under a rank profile; they always sum to ``E * mean``."""
    skew, mean = parse_rank_profile(profile)
    if mean > R:
        raise ValueError(f"rank_profile mean {mean} exceeds r_max R={R}")
    gen = torch.Generator().manual_seed(seed)
    total = E * mean
    if skew == "uniform":
        return [mean] * E
    if skew == "ragged":
        spread = torch.randint(-(mean // 2), mean // 2 + 1, (E,), generator=gen).tolist()
        return _fix_total([mean + s for s in spread], total, R, gen)
    if skew == "zipf":
        w = torch.tensor([1.0 / (i + 1) for i in range(E)])[torch.randperm(E, generator=gen)]
        return _fix_total([round(float(x)) for x in w / w.sum() * total], total, R, gen)
    # rmaxfew: a few experts (E/8, at least one) at r_max, the rest share what is left
    n_full = min(max(1, E // 8), total // R)
    rest = E - n_full
    share = (total - n_full * R) / max(rest, 1)
    ranks = [R] * n_full + [math.floor(share)] * rest
    ranks = _fix_total(ranks, total, R, gen)
    perm = torch.randperm(E, generator=gen).tolist()
    return [ranks[p] for p in perm]


def expert_popularity(profile: str, E: int, seed: int = 0) -> torch.Tensor:
    """Router prior ``p [E]`` (sums to 1) for a group profile."""
    a = parse_group_profile(profile)
    gen = torch.Generator().manual_seed(seed + 1)
    p = torch.tensor([1.0 / (i + 1) ** a for i in range(E)])
    return (p / p.sum())[torch.randperm(E, generator=gen)]


def make_routing(w: Workload, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top_k_index [T, k] int64, top_k_weights [T, k] fp32)`` drawn like a softmax router.

    Logits are Gaussian noise plus ``log p`` of the group profile, so popular
    experts win more often; weights are the renormalised top-k softmax (OLMoE).
    """
    gen = torch.Generator().manual_seed(seed + 2)
    logits = (
        torch.randn(w.tokens, w.E, generator=gen)
        + expert_popularity(w.group_profile, w.E, seed).log()
    )
    probs = logits.softmax(-1)
    weights, index = probs.topk(w.top_k, dim=-1)
    return index, weights / weights.sum(-1, keepdim=True)


# ---------------------------------------------------------------- the registry

PROFILES_FOR_MEAN = tuple(f"{s}:{{m}}" for s in RANK_SKEWS)


def _rank_family(base: Workload, mean: int) -> list[Workload]:
    return [base.with_ranks(p.format(m=mean)) for p in PROFILES_FOR_MEAN]


# (E, H, I, R, top_k, tokens, mean rank) per device class
SHAPES = {
    "gpu": dict(E=64, H=2048, I=1024, R=128, top_k=8, tokens=8192, mean=64),
    "cpu": dict(E=16, H=512, I=256, R=128, top_k=2, tokens=2048, mean=48),
    "smoke": dict(E=4, H=48, I=40, R=12, top_k=2, tokens=96, mean=6),
}


def shapes_for(device: str, smoke: bool) -> dict:
    if smoke:
        return SHAPES["smoke"]
    return SHAPES["gpu" if device == "cuda" else "cpu"]


def ops_workloads(device: str, smoke: bool = False, dtype: str | None = None) -> list[Workload]:
    """Grouped-op problems: the gate_up and down projections of the layer shape, all rank skews."""
    s = shapes_for(device, smoke)
    dtype = dtype or ("bfloat16" if device == "cuda" and not smoke else "float32")
    out = []
    for proj, K, N in (("gate_up", s["H"], 2 * s["I"]), ("down", s["I"], s["H"])):
        base = Workload(f"ops-{proj}", s["E"], K, N, s["R"], s["top_k"], s["tokens"],
                        rank_profile=f"uniform:{s['mean']}", dtype=dtype)  # fmt: skip
        if smoke:  # seconds, not minutes: one uniform and one skewed profile
            out.append(
                base.with_ranks(f"{'uniform' if proj == 'gate_up' else 'rmaxfew'}:{s['mean']}")
            )
            continue
        out += _rank_family(base, s["mean"])
        # skewed routing (popular experts get more tokens), uniform vs zipf ranks
        zipf = replace(base, name=f"ops-{proj}-zipfroute", group_profile="zipf:1.2")
        out += [zipf.with_ranks(f"uniform:{s['mean']}"), zipf.with_ranks(f"zipf:{s['mean']}")]
    return out


def layer_workloads(device: str, smoke: bool = False, dtype: str | None = None) -> list[Workload]:
    """One SwiGLU MoE expert block (``K`` = hidden, ``N`` = intermediate), all rank skews."""
    s = shapes_for(device, smoke)
    dtype = dtype or ("bfloat16" if device == "cuda" and not smoke else "float32")
    base = Workload("layer", s["E"], s["H"], s["I"], s["R"], s["top_k"], s["tokens"],
                    rank_profile=f"uniform:{s['mean']}", dtype=dtype)  # fmt: skip
    if smoke:
        return [base.with_ranks(f"ragged:{s['mean']}")]
    return _rank_family(base, s["mean"])


def scaling_workloads(device: str, smoke: bool = False, dtype: str | None = None) -> list[Workload]:
    """Fused gate_up op: a sweep over mean rank (at the default tokens) and over tokens (at the default rank)."""
    s = shapes_for(device, smoke)
    dtype = dtype or ("bfloat16" if device == "cuda" and not smoke else "float32")
    R, mean, T = s["R"], s["mean"], s["tokens"]
    base = Workload("scaling", s["E"], s["H"], 2 * s["I"], R, s["top_k"], T,
                    rank_profile=f"uniform:{mean}", dtype=dtype)  # fmt: skip
    means = (
        sorted({max(1, R // 16), R // 8, R // 4, R // 2, 3 * R // 4, R}) if not smoke else [2, R]
    )
    tokens = [T // 4, T // 2, T, 2 * T] if not smoke else []
    skews = ("uniform", "ragged") if not smoke else ("ragged",)
    out = []
    for m in means:
        for skew in skews:
            w = replace(base, name=f"scaling-rank@{skew}:{m}", rank_profile=f"{skew}:{m}")
            out.append(w)
    for t in tokens:
        for skew in skews:
            out.append(replace(base, name=f"scaling-tokens{t}@{skew}:{mean}", tokens=t,
                               rank_profile=f"{skew}:{mean}"))  # fmt: skip
    return out


@dataclass(frozen=True)
class ModelWorkload:
    """A tiny OLMoE training step (``model`` suite)."""

    name: str
    layers: int = 4
    E: int = 16
    top_k: int = 2
    hidden: int = 512
    intermediate: int = 256
    heads: int = 8
    vocab: int = 4096
    batch: int = 2
    seq: int = 512
    mean_rank: int = 48
    r_max: int = 128
    rank_skews: tuple[str, ...] = ("ragged", "zipf", "rmaxfew")
    dtype: str = "float32"

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def model_workloads(device: str, smoke: bool = False) -> list[ModelWorkload]:
    if smoke:
        return [ModelWorkload("model-smoke", layers=2, E=4, hidden=64, intermediate=48, heads=4,
                              vocab=256, batch=2, seq=32, mean_rank=6, r_max=12,
                              rank_skews=("ragged",))]  # fmt: skip
    if device == "cuda":
        return [ModelWorkload("model-olmoe-tiny", dtype="bfloat16")]
    return [ModelWorkload("model-olmoe-tiny")]


REGISTRY = {
    "ops": ops_workloads,
    "layer": layer_workloads,
    "scaling": scaling_workloads,
    "model": model_workloads,
}
