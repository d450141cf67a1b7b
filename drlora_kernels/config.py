"""``DRLoRAConfig``: every hyperparameter of the method in one place (SPEC.md's table).

Shared by the controller (``dynamic.py``), the integrations and the CLI, so
they all agree on names and defaults.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

ALLOCATIONS = ("per_layer", "global")
_LAYER_SEGMENTS = "layers|h|blocks|block|layer"  # PEFT's default layers_pattern
RESETS = ("grown", "all")


@dataclass
class DRLoRAConfig:
    """DR-LoRA hyperparameters (defaults are the paper's, SPEC.md).

    Attributes:
        r_init: active rank of every module at the start.
        r_target: mean rank per module at the end (the budget).
        r_max: slots per module, hard cap (default ``2 * r_target``).
        alpha: LoRA alpha (default ``2 * r_target``); scale is ``alpha / r_target``, fixed.
        scaling: ``"standard"`` or ``"rslora"`` (``alpha / sqrt(r_target)``).
        beta: EMA decay of routing frequency and rank importance.
        gamma: rank-penalty exponent in the saliency ``f * g / (r + 1) ** gamma``.
        grow_every: optimizer steps between growth events (T_grow).
        p_grow: max fraction of the initial free capacity one module may take per event.
        warmup_steps: first growth event and end of the router freeze (default: 3% of total steps).
        buffer_steps: no growth in the last ``buffer_steps`` steps (T_buffer).
        allocation: ``"per_layer"`` (paper) or ``"global"`` (ablation).
        reset: ``"grown"`` (reset importance of modules that grew) or ``"all"`` (Algorithm 1).
        freeze_router_during_warmup: router gets no gradient before ``warmup_steps``.
        use_frequency / use_importance: ablations (``False`` replaces that factor by 1).
        target_modules: expert projections to adapt (transformers parameter names).
        seed: seeds the initial A and every growth draw (per layer, module and event).
        backend: op backend (``None``/``"auto"``, ``"reference"``, ``"triton"``, ``"native"``).
        layers_to_transform: adapt only the MoE layers of these decoder-layer indices (PEFT's
            ``layers_to_transform``; default all). The index is the integer after the
            ``layers_pattern`` segment of the experts module's name (``model.layers.3.mlp.experts``
            -> 3). The controller's layers are the adapted ones, in model order.
        layers_pattern: the name segment before the layer index (default: ``layers``, ``h``,
            ``blocks``, ``block`` or ``layer``, as PEFT).
        rank_pattern: per-projection rank budget (PEFT's ``rank_pattern``): ``{regex: r}``; the
            first key that matches the end of a projection's qualified parameter name
            (``model.layers.0.mlp.experts.down_proj``; a key matches the whole name or a dotted
            suffix, e.g. ``down_proj`` or ``layers\\.0\\..*``) sets that pool's ``r_target`` to
            ``r`` (``1 <= r <= r_max``). What a per-pool rank means for DR-LoRA, whose ranks move:
            the pool brings ``E * r`` ranks to its layer's budget (the layer ends with exactly
            ``sum of its modules' r_target`` active ranks; ``allocation="global"`` sums all
            layers), its scale is ``alpha / r`` (PEFT's ``lora_alpha / r``), and it starts at
            ``min(r_init, r)``. Within a layer, ranks still go to the most salient modules: the
            pattern sets how much a pool brings, not what it keeps. ``r_max`` (the pool size)
            stays global.
    """

    r_init: int = 8
    r_target: int = 16
    r_max: int | None = None
    alpha: float | None = None
    scaling: str = "standard"
    beta: float = 0.9
    gamma: float = 1.2
    grow_every: int = 200
    p_grow: float = 0.1
    warmup_steps: int | None = None
    buffer_steps: int = 200
    allocation: str = "per_layer"
    reset: str = "grown"
    freeze_router_during_warmup: bool = True
    use_frequency: bool = True
    use_importance: bool = True
    target_modules: tuple[str, ...] = ("gate_up_proj", "down_proj")
    seed: int = 0
    backend: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # per-layer targets and ranks (PEFT's layers_to_transform / layers_pattern / rank_pattern)
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.r_max is None:
            self.r_max = 2 * self.r_target
        if self.alpha is None:
            self.alpha = float(2 * self.r_target)
        self.target_modules = tuple(self.target_modules)
        if not (isinstance(self.r_init, int) and self.r_init >= 0):
            raise ValueError(f"r_init must be a non-negative int, got {self.r_init!r}")
        if not (isinstance(self.r_target, int) and self.r_target > 0):
            raise ValueError(f"r_target must be a positive int, got {self.r_target!r}")
        if self.r_init > self.r_target:
            raise ValueError(f"r_init ({self.r_init}) must not exceed r_target ({self.r_target})")
        if self.r_target > self.r_max:
            raise ValueError(f"r_target ({self.r_target}) must not exceed r_max ({self.r_max})")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {self.beta}")
        if not 0.0 < self.p_grow <= 1.0:
            raise ValueError(f"p_grow must be in (0, 1], got {self.p_grow}")
        if self.grow_every <= 0:
            raise ValueError(f"grow_every must be positive, got {self.grow_every}")
        if self.buffer_steps < 0:
            raise ValueError(f"buffer_steps must be >= 0, got {self.buffer_steps}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.reset not in RESETS:
            raise ValueError(f"reset must be one of {RESETS}, got {self.reset!r}")
        if self.scaling not in ("standard", "rslora"):
            raise ValueError(f"scaling must be 'standard' or 'rslora', got {self.scaling!r}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one expert projection")
        self._validate_layer_patterns()

    # ---------------------------------------------------- per-layer targets and rank pattern
    def _validate_layer_patterns(self) -> None:
        layers = self.layers_to_transform
        if layers is not None:
            if isinstance(layers, int) and not isinstance(layers, bool):
                layers = (layers,)
            if not isinstance(layers, (list, tuple)) or not layers:
                raise ValueError(
                    f"layers_to_transform must be a non-empty list of layer indices or None, got {layers!r}"
                )
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise ValueError(
                    f"layers_to_transform must hold non-negative ints, got {list(layers)}"
                )
            self.layers_to_transform = tuple(sorted(set(layers)))
        if self.layers_pattern is not None and (
            not isinstance(self.layers_pattern, str) or not self.layers_pattern
        ):
            raise ValueError(
                f"layers_pattern must be a non-empty string or None, got {self.layers_pattern!r}"
            )
        if not isinstance(self.rank_pattern, dict):
            raise TypeError(
                f"rank_pattern must be a dict {{regex: rank}}, got {type(self.rank_pattern).__name__}"
            )
        self.rank_pattern = dict(self.rank_pattern)
        for key, r in self.rank_pattern.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"rank_pattern keys must be non-empty regex strings, got {key!r}")
            try:
                re.compile(key)
            except re.error as exc:
                raise ValueError(f"rank_pattern key {key!r} is not a valid regex: {exc}") from None
            if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= self.r_max:
                raise ValueError(
                    f"rank_pattern[{key!r}] must be an int in [1, r_max={self.r_max}], got {r!r}"
                )

    def pool_r_target(self, parameter_name: str) -> int:
        """The ``r_target`` of the pool of ``parameter_name`` (``rank_pattern``, else ``r_target``)."""
        for key, r in self.rank_pattern.items():
            if re.fullmatch(rf"(?:.*\.)?(?:{key})", parameter_name):
                return r
        return self.r_target

    def layer_index(self, module_name: str) -> int | None:
        """The decoder-layer index in ``module_name`` (for ``layers_to_transform``), or ``None``."""
        pattern = re.escape(self.layers_pattern) if self.layers_pattern else _LAYER_SEGMENTS
        match = re.search(rf"(?:^|\.)(?:{pattern})\.(\d+)(?:\.|$)", module_name)
        return int(match.group(1)) if match else None

    @property
    def is_uniform(self) -> bool:
        """Uniform LoRA baseline: starts at the target rank, never grows."""
        return self.r_init == self.r_target

    def resolved_warmup(self, total_steps: int) -> int:
        """``warmup_steps`` or, when unset, 3% of ``total_steps`` (SPEC.md)."""
        return (
            int(self.warmup_steps) if self.warmup_steps is not None else round(0.03 * total_steps)
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        if self.layers_to_transform is not None:
            d["layers_to_transform"] = list(self.layers_to_transform)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DRLoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DRLoRAConfig keys: {unknown}")
        return cls(**d)
