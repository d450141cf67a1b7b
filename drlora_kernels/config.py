"""``DRLoRAConfig``: every hyperparameter of the method in one place (SPEC.md's table).

Shared by the controller (``dynamic.py``), the integrations and the CLI, so
they all agree on names and defaults. This module is also the one place where
the method's hyperparameters are **validated**: each field has one rule in
:data:`FIELD_RULES` (type and range) and the rules between fields are in
:func:`check_ranks` / :func:`validate_new_slot_lr`. :class:`~.scheduler.GrowthSchedule`
and :class:`~.pool.RankPool`, which can be built without a config, call the same
validators (:func:`validate_field`, :func:`check_int`) instead of re-implementing them.

To add a field: declare it on :class:`DRLoRAConfig`, add its rule to
:data:`FIELD_RULES` (a :class:`FieldRule` or any ``value -> value`` callable that
raises ``TypeError``/``ValueError`` naming the field), and a cross-field rule to
``DRLoRAConfig._check_cross_fields`` if it has one.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

ALLOCATIONS = ("per_layer", "global")
_LAYER_SEGMENTS = "layers|h|blocks|block|layer"  # PEFT's default layers_pattern
RESETS = ("grown", "all")
SCALINGS = ("standard", "rslora")
BACKENDS = (None, "auto", "reference", "triton", "native")
WARMUP_FRACTION = 0.03  # SPEC: growth starts (and the router thaws) at 3% of the run by default


# ---------------------------------------------------------------- shared validators


def check_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]``.

    Raises:
        TypeError: ``value`` is not an integer (``bool`` and integral floats are rejected).
        ValueError: ``value`` is out of range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "-inf" if minimum is None else minimum
        hi = "inf" if maximum is None else maximum
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite ``float`` in the interval ``low..high`` (open ends as asked).

    Raises:
        TypeError: ``value`` is not a real number (``bool`` is rejected).
        ValueError: ``value`` is not finite or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    bad = not math.isfinite(value)
    bad |= low is not None and (value <= low if low_open else value < low)
    bad |= high is not None and (value >= high if high_open else value > high)
    if bad:
        interval = (
            f"{'(' if low_open else '['}{'-inf' if low is None else low}, "
            f"{'inf' if high is None else high}{')' if high_open else ']'}"
        )
        raise ValueError(f"{name} must be a finite number in {interval}, got {value}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``, else ``ValueError`` naming ``name``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_type(name: str, value: Any, cls: type) -> Any:
    """``value`` if it is an instance of ``cls``, else ``TypeError`` naming ``name``."""
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__} {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    return check_type(name, value, bool)


def check_ranks(r_init: int, r_target: int, r_max: int) -> None:
    """The cross-field rank rule: ``0 <= r_init <= r_target <= r_max``, ``r_target > 0``."""
    if r_init > r_target:
        raise ValueError(f"r_init ({r_init}) must not exceed r_target ({r_target})")
    if r_target > r_max:
        raise ValueError(
            f"r_target ({r_target}) must not exceed r_max ({r_max}): M * r_target is not reachable"
        )


def check_grow_until(value: Any) -> int | float | None:
    """``grow_until``: ``None`` (the paper's schedule), a step (``int >= 1``) or a fraction
    of ``total_steps`` (``float`` in ``(0, 1]``). The type tells which: ``1`` is step 1,
    ``1.0`` the whole run."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return check_int("grow_until", value, minimum=1)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return check_float("grow_until", value, low=0.0, high=1.0, low_open=True)
    raise TypeError(
        f"grow_until must be None, a step (int) or a fraction of total_steps (float), "
        f"got {type(value).__name__} {value!r}"
    )


def resolve_grow_until(grow_until: int | float | None, total_steps: int) -> int | None:
    """The step by which the whole budget is allocated (``None``: the paper's schedule)."""
    grow_until = check_grow_until(grow_until)
    if isinstance(grow_until, float):
        return round(grow_until * total_steps)
    return grow_until


def validate_new_slot_lr(scale: Any, steps: Any) -> tuple[float, int]:
    """The learning-rate multiplier of newly grown slots and how many of their updates get it.

    Raises:
        ValueError: ``scale <= 0``, ``steps < 0``, or a multiplier other than 1 with
            ``steps == 0`` (it would silently do nothing).
    """
    scale = check_float("new_slot_lr_scale", scale, low=0.0, low_open=True)
    steps = check_int("new_slot_lr_steps", steps, minimum=0)
    if scale != 1.0 and steps == 0:
        raise ValueError(
            f"new_slot_lr_scale={scale} has no effect with new_slot_lr_steps=0: set how many "
            "updates of a newly grown slot get the multiplier"
        )
    return scale, steps


def _optional(rule: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda name, v: None if v is None else rule(name, v)


def _target_modules(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of parameter names, got {value!r}")
    value = tuple(value)
    if not value:
        raise ValueError(f"{name} must name at least one expert projection")
    for v in value:
        if not isinstance(v, str) or not v:
            raise TypeError(f"{name} must hold non-empty strings, got {v!r}")
    return value


def _layers_to_transform(name: str, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name} must be a non-empty list of layer indices or None, got {value!r}")
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in value):
        raise ValueError(f"{name} must hold non-negative ints, got {list(value)}")
    return tuple(sorted(set(value)))


def _layers_pattern(name: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")
    return value


def _rank_pattern(name: str, value: Any) -> dict[str, int]:
    """``{regex: rank}``; the ranks' upper bound (``r_max``) is a cross-field check."""
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict {{regex: rank}}, got {type(value).__name__}")
    for key, r in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name} keys must be non-empty regex strings, got {key!r}")
        try:
            re.compile(key)
        except re.error as exc:
            raise ValueError(f"{name} key {key!r} is not a valid regex: {exc}") from None
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{name}[{key!r}] must be an int in [1, r_max], got {r!r}")
    return dict(value)


#: field name -> rule(name, value) returning the (normalised) value or raising TypeError/ValueError
FIELD_RULES: dict[str, Callable[[str, Any], Any]] = {
    "r_init": lambda n, v: check_int(n, v, minimum=0),
    "r_target": lambda n, v: check_int(n, v, minimum=1),
    "r_max": lambda n, v: check_int(n, v, minimum=1),
    "alpha": lambda n, v: check_float(n, v, low=0.0, low_open=True),
    "scaling": lambda n, v: check_choice(n, v, SCALINGS),
    "beta": lambda n, v: check_float(n, v, low=0.0, high=1.0, high_open=True),
    "gamma": lambda n, v: check_float(n, v, low=0.0),
    "grow_every": lambda n, v: check_int(n, v, minimum=1),
    "p_grow": lambda n, v: check_float(n, v, low=0.0, high=1.0, low_open=True),
    "warmup_steps": _optional(lambda n, v: check_int(n, v, minimum=0)),
    "buffer_steps": lambda n, v: check_int(n, v, minimum=0),
    "grow_until": lambda n, v: check_grow_until(v),
    "new_slot_lr_scale": lambda n, v: check_float(n, v, low=0.0, low_open=True),
    "new_slot_lr_steps": lambda n, v: check_int(n, v, minimum=0),
    "allocation": lambda n, v: check_choice(n, v, ALLOCATIONS),
    "reset": lambda n, v: check_choice(n, v, RESETS),
    "freeze_router_during_warmup": check_bool,
    "use_frequency": check_bool,
    "use_importance": check_bool,
    "target_modules": _target_modules,
    "seed": lambda n, v: check_int(n, v, minimum=0, maximum=2**63 - 1),
    "backend": lambda n, v: check_choice(n, v, BACKENDS),
    "extra": lambda n, v: check_type(n, v, dict),
    "layers_to_transform": _layers_to_transform,
    "layers_pattern": _layers_pattern,
    "rank_pattern": _rank_pattern,
}


def validate_field(name: str, value: Any) -> Any:
    """Validate one hyperparameter by its :class:`DRLoRAConfig` field rule; returns it normalised.

    Raises:
        KeyError: ``name`` has no rule in :data:`FIELD_RULES` (every config field needs one).
        TypeError, ValueError: as the field's rule.
    """
    rule = FIELD_RULES.get(name)
    if rule is None:
        raise KeyError(f"{name!r} has no validation rule in drlora_kernels.config.FIELD_RULES")
    return rule(name, value)


@dataclass
class DRLoRAConfig:
    """DR-LoRA hyperparameters (defaults are the paper's, SPEC.md), validated on creation.

    Attributes:
        r_init: active rank of every module at the start.
        r_target: mean rank per module at the end (the budget).
        r_max: slots per module, hard cap (default ``2 * r_target``).
        alpha: LoRA alpha (default ``2 * r_target``); scale is ``alpha / r_target``, fixed.
        scaling: ``"standard"`` or ``"rslora"`` (``alpha / sqrt(r_target)``).
        beta: EMA decay of routing frequency and rank importance.
        gamma: rank-penalty exponent in the saliency ``f * g / (r + 1) ** gamma``.
        grow_every: optimizer steps between growth events (T_grow). With ``grow_until`` it
            sets the number of events (as in the paper's schedule), not their spacing.
        p_grow: max fraction of the initial free capacity one module may take per event.
        warmup_steps: first growth event and end of the router freeze (default: 3% of total steps).
        buffer_steps: no growth in the last ``buffer_steps`` steps (T_buffer).
        grow_until: option beyond the paper: allocate the whole budget by this step (``int``)
            or fraction of the total steps (``float`` in (0, 1]); the events are spaced evenly
            from ``warmup_steps`` to it. ``None`` (default): the paper's schedule.
        new_slot_lr_scale: option beyond the paper: learning-rate multiplier of a newly grown
            slot during its first ``new_slot_lr_steps`` updates (``RankAwareAdamW``); 1 = off.
        new_slot_lr_steps: how many updates of a grown slot get ``new_slot_lr_scale``.
        allocation: ``"per_layer"`` (paper) or ``"global"`` (ablation).
        reset: ``"grown"`` (reset importance of modules that grew) or ``"all"`` (Algorithm 1).
        freeze_router_during_warmup: router gets no update before ``warmup_steps``.
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

    Raises:
        TypeError: a field of the wrong type (e.g. a float or bool rank).
        ValueError: a field out of range, or fields that contradict each other.
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
    grow_until: int | float | None = None
    new_slot_lr_scale: float = 1.0
    new_slot_lr_steps: int = 0
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
        for f in dataclasses.fields(self):
            if f.name in ("r_max", "alpha"):
                continue  # defaults derived from r_target below
            setattr(self, f.name, validate_field(f.name, getattr(self, f.name)))
        if self.r_max is None:
            self.r_max = 2 * self.r_target
        if self.alpha is None:
            self.alpha = float(2 * self.r_target)
        self.r_max = validate_field("r_max", self.r_max)
        self.alpha = validate_field("alpha", self.alpha)
        self._check_cross_fields()

    def _check_cross_fields(self) -> None:
        check_ranks(self.r_init, self.r_target, self.r_max)
        validate_new_slot_lr(self.new_slot_lr_scale, self.new_slot_lr_steps)
        for key, r in self.rank_pattern.items():
            if r > self.r_max:
                raise ValueError(
                    f"rank_pattern[{key!r}] must be an int in [1, r_max={self.r_max}], got {r!r}"
                )

    # ---------------------------------------------------- per-layer targets and rank pattern
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
            int(self.warmup_steps)
            if self.warmup_steps is not None
            else round(WARMUP_FRACTION * total_steps)
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
