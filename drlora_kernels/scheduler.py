"""The growth schedule of DR-LoRA (SPEC.md, "Growth schedule", Eq. 11-12).

A :class:`GrowthSchedule` knows *when* ranks grow (the event steps), *how much*
each layer may grow per event (the quota ``Q``) and per module (the ``cap``),
and turns one event's saliency scores into integer rank grants. It holds no
state and touches no model: ``allocate`` is a pure function of its inputs, so
every process that sees the same saliencies makes the same decision.

Arithmetic (``M`` modules per layer)::

    t_end    = total_steps - buffer_steps
    T_events = floor((t_end - warmup_steps) / grow_every)
    events   = warmup_steps + k * grow_every,  k = 0 .. T_events - 1
    Q        = ceil(M * (r_target - r_init) / T_events)
    cap      = floor((r_max - r_init) * p_grow)

At the last event both the cap and the quota are lifted (SPEC step 5: every
layer must end with exactly ``M * r_target`` active ranks; lifting only the cap
would leave a shortfall whenever earlier events were cap-limited, e.g. when
``M * cap < Q``).

Option beyond the paper, ``grow_until = U`` (a step, or a fraction of
``total_steps`` rounded to a step; SPEC step 6): the same number of events
``n = min(T_events, U - warmup_steps + 1)``, spaced evenly so the last one is at
``U``::

    events   = warmup_steps + floor(k * (U - warmup_steps) / (n - 1)),  k = 0 .. n - 1
    Q        = ceil(M * (r_target - r_init) / n)

(``n == 1``: one event at ``warmup_steps``). ``warmup_steps <= U < t_end`` is required.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch

from .config import (
    WARMUP_FRACTION,
    check_int,
    check_ranks,
    resolve_grow_until,
    validate_field,
)

if TYPE_CHECKING:
    from .config import DRLoRAConfig

__all__ = ["WARMUP_FRACTION", "GrowthSchedule", "paper_proportions"]


def paper_proportions(total_steps: int, events: int = 10) -> dict[str, int]:
    """``warmup_steps``, ``grow_every`` and ``buffer_steps`` in the paper's proportions.

    Warmup 3% of the run, ``events`` growth events and a buffer of one event spacing
    (about ``1 / events`` of the growth span): ``grow_every = floor((total_steps - warmup)
    / (events + 1))``, ``buffer_steps = grow_every``. That gives exactly ``events`` events
    (Eq. 11) whenever ``grow_every > events``, e.g. at 200 steps: warmup 6, every 17,
    buffer 17; at 600: 18, 52, 52.

    Raises:
        ValueError: too few steps for ``events`` events.
    """
    total_steps = check_int("total_steps", total_steps, minimum=1)
    events = check_int("events", events, minimum=1)
    warmup = round(WARMUP_FRACTION * total_steps)
    grow_every = (total_steps - warmup) // (events + 1)
    if grow_every < 1:
        raise ValueError(f"total_steps={total_steps} is too few for {events} growth events")
    return {"warmup_steps": warmup, "grow_every": grow_every, "buffer_steps": grow_every}


class GrowthSchedule:
    """When and by how much module ranks grow under the fixed budget.

    Args:
        total_steps: optimizer steps of the whole run.
        num_modules: ``M``, modules (expert x adapted projection) per layer.
        r_init: starting rank of every module.
        r_target: mean rank per module at the end (the budget ``M * r_target`` per layer).
        r_max: hard cap on a module's rank (pool size).
        warmup_steps: first event; ``None`` means ``round(0.03 * total_steps)``.
        grow_every: steps between events (``T_grow``).
        buffer_steps: no event in the last ``buffer_steps`` steps (``T_buffer``).
        p_grow: max fraction of the initial free capacity one module may take per event.
        allocation: ``"per_layer"`` (each layer has its own budget) or ``"global"``
            (one pool over all ``L * M`` modules, budget ``L * M * r_target``, quota ``L * Q``).
        reset: ``"grown"`` or ``"all"``; recorded here for the controller (the schedule itself
            does not touch statistics).
        module_targets: optional ``[L][M]`` per-module ``r_target`` (the config's ``rank_pattern``):
            the budget of a row is the sum of its modules' targets instead of ``M * r_target``,
            and its quota ``ceil((budget - sum of min(r_init, target)) / T_events)``.
        grow_until: ``None`` (the paper's schedule), or the step (``int``) / fraction of
            ``total_steps`` (``float``) by which the whole budget is allocated.

    The hyperparameters are validated by the rules of
    :class:`~drlora_kernels.config.DRLoRAConfig` (:func:`~drlora_kernels.config.validate_field`).

    Raises:
        TypeError: a non-integer step count or rank.
        ValueError: ``r_init > r_target``, ``r_target > r_max``, a non-positive size, an unknown
            ``allocation``/``reset``, (when ranks must grow) no event fits before
            ``total_steps - buffer_steps``, or ``grow_until`` before ``warmup_steps`` or
            inside the buffer.

    The uniform baseline (``r_init == r_target``) has no events and never raises for lack of them.

    Example:
        >>> s = GrowthSchedule(37_997, 128, 32, 64, 128)
        >>> len(s.events), s.quota, s.cap
        (183, 23, 9)
    """

    def __init__(
        self,
        total_steps: int,
        num_modules: int,
        r_init: int,
        r_target: int,
        r_max: int,
        *,
        warmup_steps: int | None = None,
        grow_every: int = 200,
        buffer_steps: int = 200,
        p_grow: float = 0.1,
        allocation: str = "per_layer",
        reset: str = "grown",
        module_targets=None,
        grow_until: int | float | None = None,
    ) -> None:
        self.total_steps = check_int("total_steps", total_steps, minimum=1)
        self.num_modules = check_int("num_modules", num_modules, minimum=1)
        self.r_init = validate_field("r_init", r_init)
        self.r_target = validate_field("r_target", r_target)
        self.r_max = validate_field("r_max", r_max)
        check_ranks(self.r_init, self.r_target, self.r_max)
        self.grow_every = validate_field("grow_every", grow_every)
        self.buffer_steps = validate_field("buffer_steps", buffer_steps)
        if warmup_steps is None:
            warmup_steps = round(WARMUP_FRACTION * total_steps)
        self.warmup_steps = validate_field("warmup_steps", warmup_steps)
        self.p_grow = validate_field("p_grow", p_grow)
        self.allocation = validate_field("allocation", allocation)
        self.reset = validate_field("reset", reset)
        self.grow_until = resolve_grow_until(grow_until, self.total_steps)
        self.t_end = total_steps - buffer_steps
        self.cap = math.floor((r_max - r_init) * self.p_grow)

        self.events: list[int] = []
        self.quota = 0
        self._event_index: dict[int, int] = {}
        self.module_targets = _module_targets(module_targets, num_modules, r_max)
        self.row_quota = torch.zeros(0, dtype=torch.int64)
        grow_rows = (  # per layer: the ranks its modules gain from r_init to their targets
            None
            if self.module_targets is None
            else (self.module_targets - self.module_targets.clamp(max=r_init)).sum(1)
        )
        growth = r_target - r_init if grow_rows is None else int(grow_rows.max())
        if growth <= 0:  # uniform LoRA: nothing to grow, no events
            return
        n_events = (
            (self.t_end - self.warmup_steps) // grow_every if self.t_end > self.warmup_steps else 0
        )
        if n_events <= 0:
            raise ValueError(
                f"no growth event fits: warmup_steps={self.warmup_steps}, grow_every={grow_every} and "
                f"total_steps - buffer_steps = {self.t_end} leave no step for growth "
                f"(need total_steps >= warmup_steps + grow_every + buffer_steps)"
            )
        if self.grow_until is None:
            self.events = [self.warmup_steps + k * grow_every for k in range(n_events)]
        else:
            self.events = self._events_until(n_events)
        self.quota = math.ceil(num_modules * (r_target - r_init) / len(self.events))
        if grow_rows is not None:
            self.row_quota = torch.ceil(grow_rows.double() / len(self.events)).to(torch.int64)
            self.quota = int(self.row_quota.max())
        if self.cap == 0 and n_events > 1:
            warnings.warn(
                f"cap = floor((r_max - r_init) * p_grow) = 0 (r_max={r_max}, r_init={r_init}, "
                f"p_grow={p_grow}): no module grows before the last event, which then allocates "
                "the whole budget",
                stacklevel=2,
            )
        self._event_index = {s: k for k, s in enumerate(self.events)}

    def _events_until(self, n_events: int) -> list[int]:
        """``n_events`` (at most one per step) spaced evenly from ``warmup_steps`` to ``grow_until``."""
        start, until = self.warmup_steps, self.grow_until
        if not start <= until < self.t_end:
            raise ValueError(
                f"grow_until resolves to step {until}, which must lie in [warmup_steps={start}, "
                f"total_steps - buffer_steps = {self.t_end}): growth starts at warmup_steps and "
                "no event may fall in the buffer"
            )
        n = min(n_events, until - start + 1)
        if n == 1:
            return [start]
        return [start + (k * (until - start)) // (n - 1) for k in range(n)]

    @classmethod
    def from_config(
        cls, cfg: DRLoRAConfig, total_steps: int, num_modules: int, *, module_targets=None
    ) -> GrowthSchedule:
        """The schedule of a :class:`~drlora_kernels.config.DRLoRAConfig` (``module_targets``:
        the pools' ``r_target`` per module when ``cfg.rank_pattern`` makes them differ)."""
        return cls(
            total_steps,
            num_modules,
            cfg.r_init,
            cfg.r_target,
            int(cfg.r_max),
            warmup_steps=cfg.resolved_warmup(total_steps),
            grow_every=cfg.grow_every,
            buffer_steps=cfg.buffer_steps,
            p_grow=cfg.p_grow,
            allocation=cfg.allocation,
            reset=cfg.reset,
            module_targets=module_targets,
            grow_until=cfg.grow_until,
        )

    @property
    def num_events(self) -> int:
        return len(self.events)

    def event_index(self, step: int) -> int | None:
        """Index ``k`` of the event at ``step``, or ``None`` when ``step`` is not an event."""
        return self._event_index.get(step)

    def is_last_event(self, step: int) -> bool:
        return bool(self.events) and step == self.events[-1]

    def allocate(
        self, saliency: torch.Tensor, ranks: torch.Tensor, *, last_event: bool
    ) -> torch.Tensor:
        """Rank grants of one growth event (SPEC steps 1-3 and 5).

        Per layer (per row; one row over all modules for ``allocation="global"``):
        ``budget = min(Q, M * r_target - sum(r))``; walk the modules by descending
        saliency (ties: lower module index first) and grant
        ``n = min(cap, r_max - r, budget)`` until the budget is spent. At the last
        event the cap and the quota are lifted, so the row ends at exactly its target.

        Args:
            saliency: `[L, M]` float, finite.
            ranks: `[L, M]` integer, current active ranks.
            last_event: whether this is the schedule's last event.

        Returns:
            `[L, M]` int64 grants on the CPU (>= 0, ``ranks + grants <= r_max``).

        Raises:
            ValueError: wrong shapes, non-finite saliency, a rank outside ``[0, r_max]``,
                or a row already above its budget.
        """
        if saliency.dim() != 2 or saliency.shape[1] != self.num_modules:
            raise ValueError(
                f"saliency must have shape [L, M={self.num_modules}], got {tuple(saliency.shape)}"
            )
        if tuple(ranks.shape) != tuple(saliency.shape):
            raise ValueError(
                f"ranks must have the shape of saliency {tuple(saliency.shape)}, got {tuple(ranks.shape)}"
            )
        if ranks.dtype.is_floating_point or ranks.dtype == torch.bool:
            raise TypeError(f"ranks must be an integer tensor, got {ranks.dtype}")
        sal = saliency.detach().to("cpu", torch.float64)
        r = ranks.detach().to("cpu", torch.int64)
        if not torch.isfinite(sal).all():
            raise ValueError("saliency must be finite (got NaN or inf)")
        if (r < 0).any() or (r > self.r_max).any():
            raise ValueError(
                f"ranks must lie in [0, r_max={self.r_max}], got min {int(r.min())}, max {int(r.max())}"
            )
        L, M = sal.shape
        if self.module_targets is not None:
            target, quota = self._row_budgets(L)
            if self.allocation == "global":
                sal, r = sal.reshape(1, L * M), r.reshape(1, L * M)
        elif self.allocation == "global":
            sal, r = sal.reshape(1, L * M), r.reshape(1, L * M)
            target, quota = L * M * self.r_target, L * self.quota
        else:
            target, quota = M * self.r_target, self.quota
        remaining = target - r.sum(dim=1)  # [rows]
        if (remaining < 0).any():
            raise ValueError(
                f"active ranks already exceed the budget {_listed(target)} per {'model' if self.allocation == 'global' else 'layer'}: "
                f"sums {r.sum(dim=1).tolist()}"
            )
        room = self.r_max - r
        if last_event:
            budget, per_module = remaining, room
        else:
            budget, per_module = remaining.clamp(max=quota), room.clamp(max=self.cap)
        # Greedy walk, vectorised: module i (in saliency order) takes min(capacity_i, budget
        # left after the modules before it). A stable sort on -saliency breaks ties by index.
        order = torch.sort(-sal, dim=1, stable=True).indices
        cap_sorted = per_module.gather(1, order)
        before = cap_sorted.cumsum(dim=1) - cap_sorted
        grant_sorted = torch.minimum(cap_sorted, (budget[:, None] - before).clamp(min=0))
        grants = torch.zeros_like(r).scatter_(1, order, grant_sorted)
        return grants.reshape(L, M)

    def _row_budgets(self, num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(budget, quota)`` per row from ``module_targets`` (one row for ``allocation="global"``)."""
        targets = self.module_targets
        if targets.shape[0] != num_layers:
            raise ValueError(
                f"saliency has {num_layers} layers, module_targets has {targets.shape[0]}"
            )
        budget, quota = targets.sum(1), self.row_quota
        if self.allocation == "global":
            return budget.sum().reshape(1), quota.sum().reshape(1)
        return budget, quota

    def __repr__(self) -> str:
        return (
            f"GrowthSchedule(total_steps={self.total_steps}, M={self.num_modules}, "
            f"r {self.r_init}->{self.r_target} (max {self.r_max}), events={self.num_events} "
            f"[{self.events[0] if self.events else '-'}..{self.events[-1] if self.events else '-'}], "
            f"Q={self.quota}, cap={self.cap}, allocation={self.allocation!r}"
            + (f", grow_until={self.grow_until})" if self.grow_until is not None else ")")
        )


def _module_targets(module_targets, num_modules: int, r_max: int) -> torch.Tensor | None:
    if module_targets is None:
        return None
    t = torch.as_tensor(module_targets, dtype=torch.int64)
    if t.dim() != 2 or t.shape[1] != num_modules or t.shape[0] == 0:
        raise ValueError(
            f"module_targets must be [L, M={num_modules}] ints, got shape {tuple(t.shape)}"
        )
    if (t < 1).any() or (t > r_max).any():
        raise ValueError(f"module_targets must lie in [1, r_max={r_max}]")
    return t


def _listed(target) -> object:
    return target.tolist() if isinstance(target, torch.Tensor) else target
