"""The padded rank pool: ``r_max`` LoRA slots per expert, allocated once.

For one adapted projection (``E`` experts, ``K`` in, ``N`` out) the pool holds
``lora_A [E, R, K]`` and ``lora_B [E, N, R]`` as parameters and ``ranks [E]``
(int32) as a buffer. Only ``lora_A[e, :r_e]`` and ``lora_B[e, :, :r_e]`` take
part in the computation. Growth initialises the next slots in place and bumps
``ranks``: no tensor is reallocated, parameter identity and optimizer-state
shapes never change, and the output is unchanged at the moment of growth
(new ``B`` columns are zero).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import nn

from .config import check_int, validate_field
from .engines import Engine, LocalEngine


def lora_scale(alpha: float, r_target: int, scaling: str = "standard") -> float:
    """The fixed LoRA scale of SPEC.md: ``alpha / r_target`` (``alpha / sqrt(r_target)`` for rsLoRA)."""
    validate_field("scaling", scaling)
    validate_field("r_target", r_target)
    return alpha / (math.sqrt(r_target) if scaling == "rslora" else r_target)


def kaiming_uniform_rows(
    rows: int, in_features: int, generator: torch.Generator | None, dtype, device
) -> torch.Tensor:
    """PEFT's default ``lora_A`` init: Kaiming-uniform with ``a=sqrt(5)``, i.e. ``U(-1/sqrt(K), 1/sqrt(K))``.

    Drawn on the CPU (so a seeded generator gives the same values on every device), then moved.
    """
    bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
    out = torch.empty(rows, in_features, dtype=torch.float32).uniform_(
        -bound, bound, generator=generator
    )
    return out.to(dtype=dtype, device=device)


def _integers(name: str, values: Sequence[int] | torch.Tensor) -> list[int]:
    """``values`` as Python ints; ``TypeError`` naming ``name`` for a float, bool or other non-integer."""
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got a {values.dtype} tensor")
        return [int(v) for v in values.reshape(-1).tolist()]
    out = []
    for v in values:
        if isinstance(v, bool) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool):
            raise TypeError(f"{name} must hold integers, got {v!r}")
        try:
            out.append(operator.index(v))
        except TypeError:
            raise TypeError(f"{name} must hold integers, got {v!r} ({type(v).__name__})") from None
    return out


class RankPool(nn.Module):
    """Per-expert LoRA slots for one stack of expert projections, with a per-expert active rank.

    Args:
        num_experts: ``E``.
        in_features: ``K`` (the projection's input size).
        out_features: ``N`` (the projection's output size).
        r_max: ``R``, slots per expert (hard cap on the rank).
        r_init: starting active rank of every expert.
        r_target: the mean rank the budget aims at; sets the fixed scale (default ``r_init``).
        alpha: LoRA alpha (default ``2 * r_target``).
        scaling: ``"standard"`` (``alpha / r_target``) or ``"rslora"`` (``alpha / sqrt(r_target)``).
        init: ``"peft"``: Kaiming-uniform ``A`` (all ``R`` rows), zero ``B``.
        generator: optional generator for the initial ``A``.
    """

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    ranks: torch.Tensor

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        r_max: int,
        r_init: int,
        *,
        r_target: int | None = None,
        alpha: float | None = None,
        scaling: str = "standard",
        init: str = "peft",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        # The rules of DRLoRAConfig (config.py), the one place hyperparameters are validated.
        for name, val in (
            ("num_experts", num_experts),
            ("in_features", in_features),
            ("out_features", out_features),
        ):
            check_int(name, val, minimum=1)
        r_max = validate_field("r_max", r_max)
        r_init = check_int("r_init", r_init, minimum=0, maximum=r_max)
        r_target = r_init if r_target is None else r_target
        r_target = check_int("r_target", r_target, minimum=1, maximum=r_max)
        if init != "peft":
            raise ValueError(f"init must be 'peft', got {init!r}")
        self.num_experts, self.in_features, self.out_features = (
            num_experts,
            in_features,
            out_features,
        )
        self.r_max, self.r_init, self.r_target = r_max, r_init, r_target
        self.alpha = float(2 * r_target if alpha is None else alpha)
        self.scaling_mode = scaling
        self.scaling = lora_scale(self.alpha, r_target, scaling)
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.lora_A = nn.Parameter(
            torch.empty(num_experts, r_max, in_features, dtype=dtype, device=device)
        )
        self.lora_B = nn.Parameter(
            torch.empty(num_experts, out_features, r_max, dtype=dtype, device=device)
        )
        self.register_buffer(
            "ranks", torch.full((num_experts,), r_init, dtype=torch.int32, device=device)
        )
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PEFT's init: every ``A`` row Kaiming-uniform, every ``B`` column zero."""
        E, R, K = self.lora_A.shape
        self.lora_A.copy_(
            kaiming_uniform_rows(E * R, K, generator, self.lora_A.dtype, self.lora_A.device).view(
                E, R, K
            )
        )
        self.lora_B.zero_()

    def draw_rows(self, count: int, generator: torch.Generator | None) -> torch.Tensor:
        """``count`` new ``A`` rows with PEFT's init (``[count, K]``, the pool's dtype and device)."""
        return kaiming_uniform_rows(
            count, self.in_features, generator, self.lora_A.dtype, self.lora_A.device
        )

    @torch.no_grad()
    def grow(
        self,
        expert_ids: Sequence[int] | torch.Tensor,
        amounts: Sequence[int] | torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        seeds: Sequence[int] | None = None,
        engine: Engine | None = None,
    ) -> list[tuple[int, int, int]]:
        """Activate the next ``amounts[i]`` slots of expert ``expert_ids[i]``, in place.

        New ``A`` rows are re-drawn with PEFT's init (from ``generator``, or from
        a fresh generator seeded with ``seeds[i]`` per expert, so every process
        draws the same values); new ``B`` columns are set to zero, so the output
        does not change. The values are written through ``engine`` (default:
        :class:`~drlora_kernels.engines.LocalEngine`, the parameters themselves; a sharded
        engine writes each process's slice) and read back before ``ranks`` changes.
        Returns ``[(expert, old_rank, new_rank), ...]``.

        Raises:
            TypeError: a non-integer expert id or amount (e.g. ``1.7``).
            ValueError: an id out of range or repeated, a negative amount, or growth past ``r_max``.
            GrowthNotWrittenError: the engine's weights do not hold the written values.
        """
        ids = _integers("expert_ids", expert_ids)
        amt = _integers("amounts", amounts)
        if len(ids) != len(amt):
            raise ValueError(
                f"expert_ids and amounts must have the same length, got {len(ids)} and {len(amt)}"
            )
        if seeds is not None and len(seeds) != len(ids):
            raise ValueError(
                f"seeds must have one entry per expert id ({len(ids)}), got {len(seeds)}"
            )
        if len(set(ids)) != len(ids):
            raise ValueError(f"expert_ids must not repeat, got {ids}")
        ranks = self.ranks.tolist()
        for e, a in zip(ids, amt):
            if not 0 <= e < self.num_experts:
                raise ValueError(f"expert_ids holds {e}, expected ids in [0, {self.num_experts})")
            if a < 0:
                raise ValueError(f"amounts must be >= 0, got {a} for expert {e}")
            if ranks[e] + a > self.r_max:
                raise ValueError(
                    f"growing expert {e} by {a} from rank {ranks[e]} exceeds r_max={self.r_max}"
                )
        if engine is None:
            engine = LocalEngine()
        changes = []
        for i, (e, a) in enumerate(zip(ids, amt)):
            if a == 0:
                continue
            r = ranks[e]
            gen = generator
            if seeds is not None:
                gen = torch.Generator().manual_seed(int(seeds[i]))
            rows = self.draw_rows(a, gen)
            engine.write_growth(self, e, r, r + a, rows)
            if not engine.verify_growth(self, e, r, r + a, rows):
                label = f"{type(self).__name__}(E={self.num_experts}, K={self.in_features}, N={self.out_features})"
                raise engine.growth_not_written(label, e, r, r + a, "was not written")
            changes.append((e, r, r + a))
        if changes:
            idx = torch.tensor([c[0] for c in changes], dtype=torch.long, device=self.ranks.device)
            new = torch.tensor([c[2] for c in changes], dtype=torch.int32, device=self.ranks.device)
            self.ranks.index_copy_(0, idx, new)
        return changes

    def active_mask(self) -> torch.Tensor:
        """`[E, R]` bool: slot ``j`` of expert ``e`` is active iff ``j < ranks[e]``."""
        return torch.arange(self.r_max, device=self.ranks.device)[None, :] < self.ranks[:, None]

    @property
    def total_rank(self) -> int:
        return int(self.ranks.sum())

    def extra_repr(self) -> str:
        r = self.ranks.float()
        return (
            f"E={self.num_experts}, K={self.in_features}, N={self.out_features}, r_max={self.r_max}, "
            f"ranks(mean={r.mean():.2f}, min={int(r.min())}, max={int(r.max())}), scaling={self.scaling:g}"
        )
