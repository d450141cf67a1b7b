"""The DR-LoRA controller: statistics, growth events, router freeze, checkpointing.

One :class:`DRLoRAController` drives all rank pools of a model. Per optimizer step::

    for micro_batch in step_batches:           # the experts' forward calls
        loss = model(micro_batch)              #   controller.record_routing(layer, idx, w)
        loss.backward()
    controller.update_statistics()             # f and g EMAs (all-reduced under DDP)
    controller.step(optimizer)                 # grows pools at an event, fixes optimizer state,
                                               #   holds the routers still during warmup
    optimizer.step(); optimizer.zero_grad()

The routers are ordinary trainable parameters from the start (SPEC: in the optimizer from
the start, in sync across data-parallel processes): their ``requires_grad`` never changes, so
DDP's reducer and an optimizer built right after attaching both see them. "Frozen during
warmup" means :meth:`DRLoRAController.step` drops their gradients (``grad = None``) before the
optimizer step, so no ``torch.optim`` optimizer moves them (no update, no weight decay).

``pools[l]`` lists the adapted projections of MoE layer ``l`` (e.g. ``[gate_up, down]``);
module ``m = pool_index * E + expert`` (both modules of an expert share its routing
frequency). The uniform LoRA baseline is the same controller with ``r_init == r_target``:
no event, nothing ever grows.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from .config import DRLoRAConfig
from .engines import Engine, detect_engine
from .optim import SlotSpec, pool_slot_specs
from .pool import RankPool
from .saliency import SaliencyTracker
from .scheduler import GrowthSchedule

STATE_FORMAT = 1


@dataclass(frozen=True)
class GrowthEvent:
    """One module's growth at one event."""

    step: int
    layer: int
    module: int
    expert: int
    pool: int
    old_rank: int
    new_rank: int
    saliency: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def growth_seed(seed: int, layer: int, module: int, event: int) -> int:
    """The seed of one module's new ``A`` rows: a hash of ``(seed, layer, module, event)``.

    Stable across processes, platforms and Python runs (unlike ``hash()``), and it does not
    depend on which other modules grew, so every process draws the same values.
    """
    digest = hashlib.blake2b(struct.pack("<4q", seed, layer, module, event), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class DRLoRAController:
    """Routing frequency, rank importance and growth for the rank pools of one model.

    Args:
        pools: ``pools[l][p]`` is the :class:`~drlora_kernels.pool.RankPool` of adapted
            projection ``p`` of MoE layer ``l``. All pools share ``E`` experts, ``r_max``
            (``config.r_max``) and a device; every layer has the same number of pools.
        config: the hyperparameters (:class:`~drlora_kernels.config.DRLoRAConfig`).
        total_steps: optimizer steps of the whole run (sets the schedule).
        router_parameters: the routers' parameters, or a function returning them (read at every
            use, so parameters an engine replaces, as ``fully_shard`` does, are followed): made
            trainable here and held still before ``warmup_steps`` when
            ``config.freeze_router_during_warmup`` (see :meth:`hold_frozen_routers`).
        process_group: group for the statistics all-reduce and the decision check
            (default: the world, when ``torch.distributed`` is initialised).
        engine: how gradients are read and growth is written
            (:class:`~drlora_kernels.engines.Engine`); default: detected from the pools'
            parameters at the first statistics or growth call (:func:`~drlora_kernels.engines.detect_engine`:
            FSDP2 for DTensor parameters, DeepSpeed ZeRO for partitioned ones, else local/DDP).

    Raises:
        ValueError: empty or inconsistent pools, or a schedule that cannot be met.
    """

    def __init__(
        self,
        pools: Sequence[Sequence[RankPool]],
        config: DRLoRAConfig,
        total_steps: int,
        *,
        router_parameters: Iterable[torch.nn.Parameter]
        | Callable[[], Iterable[torch.nn.Parameter]]
        | None = None,
        process_group: dist.ProcessGroup | None = None,
        engine: Engine | None = None,
    ) -> None:
        if not isinstance(config, DRLoRAConfig):
            raise TypeError(f"config must be a DRLoRAConfig, got {type(config).__name__}")
        self.pools = [list(layer) for layer in pools]
        self._check_pools(self.pools, config)
        first = self.pools[0][0]
        self.config = config
        self.num_layers, self.num_pools = len(self.pools), len(self.pools[0])
        self.num_experts = first.num_experts
        self.num_modules = self.num_pools * self.num_experts
        self.schedule = GrowthSchedule.from_config(
            config, total_steps, self.num_modules, module_targets=self._module_targets(config)
        )
        self.tracker = SaliencyTracker(
            self.num_layers,
            self.num_pools,
            self.num_experts,
            first.r_max,
            beta=config.beta,
            gamma=config.gamma,
            use_frequency=config.use_frequency,
            use_importance=config.use_importance,
            device=first.ranks.device,
        )
        if router_parameters is None or callable(router_parameters):
            self._routers = router_parameters
        else:
            self._routers = list(router_parameters)
        self.process_group = process_group
        self.global_step = 0
        self.event_log: list[GrowthEvent] = []
        # grown slots to check after the next optimizer step: (layer, pool, expert, old, new, seed)
        self._unverified_growth: list[tuple[int, int, int, int, int, int]] = []
        self._engine: Engine | None = None
        if engine is not None:
            self.bind_engine(engine)
        for p in self.router_parameters:
            p.requires_grad_(True)

    def _module_targets(self, config: DRLoRAConfig) -> list[list[int]] | None:
        """Per-module ``r_target`` ``[L][M]`` when ``config.rank_pattern`` gave pools their own."""
        targets = [
            [pool.r_target for pool in layer for _ in range(pool.num_experts)]
            for layer in self.pools
        ]
        if all(t == config.r_target for row in targets for t in row):
            return None
        return targets

    @staticmethod
    def _check_pools(pools: list[list[RankPool]], config: DRLoRAConfig) -> None:
        if not pools or not pools[0]:
            raise ValueError("pools must hold at least one layer with at least one RankPool")
        P = len(pools[0])
        ref = pools[0][0]
        for l, layer in enumerate(pools):
            if len(layer) != P:
                raise ValueError(
                    f"every layer must have {P} pools (as layer 0), layer {l} has {len(layer)}"
                )
            for p, pool in enumerate(layer):
                where = f"pools[{l}][{p}]"
                if not isinstance(pool, RankPool):
                    raise TypeError(f"{where} must be a RankPool, got {type(pool).__name__}")
                if pool.num_experts != ref.num_experts:
                    raise ValueError(
                        f"{where} has {pool.num_experts} experts, pools[0][0] has {ref.num_experts}"
                    )
                if pool.r_max != config.r_max:
                    raise ValueError(
                        f"{where} has r_max={pool.r_max}, config.r_max is {config.r_max}"
                    )
                if pool.ranks.device != ref.ranks.device:
                    raise ValueError(
                        f"{where} is on {pool.ranks.device}, pools[0][0] on {ref.ranks.device}"
                    )

    # --------------------------------------------------------------------- properties
    @property
    def router_parameters(self) -> list[torch.nn.Parameter]:
        """The routers' current parameters (re-read each time: an engine may replace them)."""
        if self._routers is None:
            return []
        return list(self._routers() if callable(self._routers) else self._routers)

    @property
    def engine(self) -> Engine:
        """The bound :class:`~drlora_kernels.engines.Engine`, else the one detected from the pools now.

        The first statistics or growth call binds the detected engine (:meth:`bind_engine`), so
        a model sharded after the controller was created (attach, then ``fully_shard``) is seen
        as sharded.
        """
        return self._engine if self._engine is not None else detect_engine(self._pool_parameters())

    def _pool_parameters(self) -> list[torch.Tensor]:
        return [t for layer in self.pools for pool in layer for t in (pool.lora_A, pool.lora_B)]

    def _bound(self) -> Engine:
        if self._engine is None:
            self.bind_engine(detect_engine(self._pool_parameters()))
        return self._engine

    @property
    def bound_engine(self) -> Engine | None:
        """The engine bound so far (``None`` until :meth:`bind_engine` or the first statistics or growth call)."""
        return self._engine

    def bind_engine(self, engine: Engine) -> None:
        """Use ``engine`` from now on (after checking that the pools are laid out for it).

        Raises:
            TypeError: ``engine`` is not an :class:`~drlora_kernels.engines.Engine`.
            ValueError: the pools do not fit the engine (e.g. only some of them are sharded).
        """
        if not isinstance(engine, Engine):
            raise TypeError(
                f"engine must be a drlora_kernels.engines.Engine, got {type(engine).__name__}"
            )
        engine.validate([pool for layer in self.pools for pool in layer])
        self._engine = engine

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    @property
    def warmup_steps(self) -> int:
        return self.schedule.warmup_steps

    @property
    def router_frozen(self) -> bool:
        """True before ``warmup_steps`` when ``config.freeze_router_during_warmup``."""
        return self.config.freeze_router_during_warmup and self.global_step < self.warmup_steps

    def hold_frozen_routers(self) -> None:
        """While :attr:`router_frozen`, drop the routers' gradients so no optimizer updates them.

        Called by :meth:`step` (before ``optimizer.step()``). The routers stay
        ``requires_grad=True`` throughout: toggling it would take them out of an optimizer built
        while they were frozen and out of DDP's gradient reduction (ranks drifting apart, or
        "Expected to have finished reduction" with ``find_unused_parameters=False``).
        """
        if self.router_frozen:
            for p in self.router_parameters:
                p.grad = None

    def ranks(self) -> torch.Tensor:
        """Current active ranks, `[L, P, E]` int32 on the pools' device."""
        return torch.stack([torch.stack([pool.ranks for pool in layer]) for layer in self.pools])

    def slot_specs(self) -> dict[torch.Tensor, SlotSpec]:
        """``slots=`` for :class:`~drlora_kernels.optim.RankAwareAdamW` over all pools."""
        return pool_slot_specs(self.pools)

    # --------------------------------------------------------------------- statistics
    def record_routing(
        self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> None:
        """Record the routing of one forward of MoE layer ``layer`` (see :meth:`SaliencyTracker.record_routing`)."""
        self.tracker.record_routing(layer, top_k_index, top_k_weights)

    def update_statistics(self) -> None:
        """Update ``f`` and the per-slot ``g`` with this optimizer step's routing and gradients.

        Call once per optimizer step, after ALL backward passes of the step (gradients
        complete, unscaled if AMP's GradScaler is used) and before ``optimizer.step()``.
        The gradients are read through :attr:`engine` (sharded engines' partial ``[E, R]``
        sums are summed across processes in the one statistics collective). This is the one
        importance path: the step's COMPLETE gradients (all micro-batches), never per-micro-batch
        sums from a backward kernel (an L1 of a sum is not a sum of L1s).

        Raises:
            RuntimeError: a pool with active ranks has no gradient (the importance would
                silently be zero), or the previous growth event's writes were reverted by the
                optimizer step (see :meth:`~drlora_kernels.engines.Engine.verify_growth`).
        """
        engine = self._bound()
        self._verify_growth_after_step(engine)
        if not self.config.use_importance:
            self.tracker.update(None, process_group=self.process_group)
        else:
            imp_a, imp_b = self._slot_sums(engine)
            if engine.sums_are_partial:
                self.tracker.update(partial_sums=(imp_a, imp_b), process_group=self.process_group)
            else:
                self.tracker.update(imp_a * imp_b, process_group=self.process_group)

    def _slot_sums(self, engine: Engine) -> tuple[torch.Tensor, torch.Tensor]:
        """``(imp_a, imp_b)`` `[L, P, E, R]` of this process, read through ``engine``."""
        L, P, E, R = self.tracker.shape
        imp = torch.zeros(2, L, P, E, R, dtype=torch.float32, device=self.tracker.device)
        for l, layer in enumerate(self.pools):
            for p, pool in enumerate(layer):
                sums = engine.slot_sums(pool)
                if sums is None:
                    if bool(pool.ranks.any()):
                        raise RuntimeError(
                            f"DR-LoRA saw no gradient for the rank pool of layer {l}, projection {p} "
                            f"under the {engine.name!r} engine, though it has active ranks: the rank "
                            "importance would silently be zero. Call controller.update_statistics() "
                            "after the backward of the step's last micro-batch and before "
                            "optimizer.step()/zero_grad(); keep the pools trainable; under DeepSpeed "
                            "or FSDP pass the matching engine (controller.bind_engine("
                            "detect_engine(model, optimizer)))"
                        )
                    continue
                imp[0, l, p], imp[1, l, p] = sums
        return imp[0], imp[1]

    def saliency(self) -> torch.Tensor:
        """Current saliency ``S_m`` of every module, `[L, M]`."""
        return self.tracker.saliency(self.ranks())

    # ------------------------------------------------------------------------- growth
    def step(self, optimizer: Optimizer | None = None) -> list[GrowthEvent]:
        """Run the growth event of the current step (if any), then advance the step counter.

        Call right before ``optimizer.step()``, after :meth:`update_statistics`. Before
        ``warmup_steps`` the routers' gradients are dropped (:meth:`hold_frozen_routers`). At an event:
        allocate ranks under the schedule, grow the pools in place (new ``A`` rows drawn from
        :func:`growth_seed`, new ``B`` columns zero), reset the importance of the grown modules
        (all modules with ``reset="all"``) and zero ``optimizer``'s state for the new slots.

        Returns:
            The :class:`GrowthEvent` of every module that grew at this step (empty otherwise).
        """
        self.hold_frozen_routers()
        k = self.schedule.event_index(self.global_step)
        events = self._grow(k, optimizer) if k is not None else []
        self.global_step += 1
        return events

    def _grow(self, k: int, optimizer: Optimizer | None) -> list[GrowthEvent]:
        L, P, E = self.num_layers, self.num_pools, self.num_experts
        engine = self._bound()
        ranks = self.ranks()
        saliency = self.tracker.saliency(ranks).cpu()
        last = k == self.schedule.num_events - 1
        grants = self.schedule.allocate(saliency, ranks.reshape(L, P * E), last_event=last).view(
            L, P, E
        )
        events: list[GrowthEvent] = []
        self._unverified_growth = []
        for l, layer in enumerate(self.pools):
            for p, pool in enumerate(layer):
                ids = grants[l, p].nonzero().flatten().tolist()
                if not ids:
                    continue
                seeds = [growth_seed(self.config.seed, l, p * E + e, k) for e in ids]
                changes = pool.grow(ids, grants[l, p, ids], seeds=seeds, engine=engine)
                if optimizer is not None:
                    engine.reset_optimizer_slots(optimizer, pool, changes)
                seed_of = dict(zip(ids, seeds))
                self._unverified_growth.extend(
                    (l, p, e, old, new, seed_of[e]) for e, old, new in changes
                )
                events.extend(
                    GrowthEvent(
                        self.global_step,
                        l,
                        p * E + e,
                        e,
                        p,
                        old,
                        new,
                        float(saliency[l, p * E + e]),
                    )
                    for e, old, new in changes
                )
        reset = (
            grants > 0 if self.config.reset == "grown" else torch.ones(L, P, E, dtype=torch.bool)
        )
        self.tracker.reset_importance(reset)
        self.event_log.extend(events)
        if dist.is_available() and dist.is_initialized():
            self.check_consistency()
        return events

    def _verify_growth_after_step(self, engine: Engine) -> None:
        """Raise if the last event's ``A`` rows no longer hold their draw after the optimizer step.

        Catches an engine that restores its own copy of the weights over the growth writes
        (e.g. an fp32 master copy), which would leave growth without effect.
        """
        pending, self._unverified_growth = self._unverified_growth, []
        for l, p, e, old, new, seed in pending:
            pool = self.pools[l][p]
            rows = pool.draw_rows(new - old, torch.Generator().manual_seed(seed))
            if not engine.verify_growth(pool, e, old, new, rows, after_step=True):
                raise engine.growth_not_written(
                    f"layer {l} projection {p}", e, old, new, "was reverted by the optimizer step"
                )

    # -------------------------------------------------------------------- reporting
    def rank_summary(self) -> dict[str, Any]:
        """Per-layer mean/min/max/total active rank, plus the model's mean and total."""
        r = self.ranks().reshape(self.num_layers, -1).cpu()
        rf = r.double()
        return {
            "step": self.global_step,
            "layers": [
                {
                    "mean": float(rf[l].mean()),
                    "min": int(r[l].min()),
                    "max": int(r[l].max()),
                    "total": int(r[l].sum()),
                }
                for l in range(self.num_layers)
            ],
            "mean": float(rf.mean()),
            "total": int(r.sum()),
            "budget": self.num_layers * self.num_modules * self.config.r_target
            if self.schedule.module_targets is None
            else int(self.schedule.module_targets.sum()),
            "events": len(self.event_log),
        }

    def decision_hash(self) -> str:
        """SHA-256 of the growth decisions so far (step, ranks, event log); equal on all processes."""
        h = hashlib.sha256()
        h.update(struct.pack("<q", self.global_step))
        h.update(self.ranks().cpu().to(torch.int64).numpy().tobytes())
        for ev in self.event_log:
            h.update(
                struct.pack(
                    "<7qd",
                    ev.step,
                    ev.layer,
                    ev.module,
                    ev.expert,
                    ev.pool,
                    ev.old_rank,
                    ev.new_rank,
                    ev.saliency,
                )
            )
        return h.hexdigest()

    def weight_checksum(self) -> torch.Tensor:
        """Fingerprint of this process's replicated router and LoRA weights (:meth:`Engine.checksum`)."""
        return self.engine.checksum([*self.router_parameters, *self._pool_parameters()])

    def check_consistency(self) -> None:
        """Compare the growth decisions and the weights across processes; raise if they differ.

        One collective: :meth:`decision_hash` (in three exact 20-bit pieces) and
        :meth:`weight_checksum` (replicated routers and LoRA weights: all of them under DDP; the
        unsharded ones under FSDP2) are all-reduced with MAX of ``(v, -v)``: every process
        learns whether any other holds a different value. A no-op without ``torch.distributed``.
        Collective: every process must call it (the controller does, at every growth event).

        Raises:
            RuntimeError: naming the engine, the step and what differs.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        digest = int(self.decision_hash()[:15], 16)  # 60 bits
        pieces = [float((digest >> shift) & 0xFFFFF) for shift in (40, 20, 0)]
        mine = torch.tensor([*pieces, float(self.weight_checksum())], dtype=torch.float64)
        t = torch.cat([mine, -mine]).to(self.tracker.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        t = t.cpu()
        differs = (t[:4] != mine) | (-t[4:] != mine)
        rank = dist.get_rank(self.process_group)
        if bool(differs[:3].any()):
            raise RuntimeError(
                f"DR-LoRA growth decisions differ across processes at step {self.global_step} under the "
                f"{self.engine.name!r} engine (rank {rank} hash {self.decision_hash()[:16]}): statistics "
                "were not all-reduced identically or pools diverged"
            )
        if bool(differs[3]):
            raise RuntimeError(
                f"DR-LoRA router or LoRA weights differ across processes at step {self.global_step} under "
                f"the {self.engine.name!r} engine (rank {rank} checksum {float(mine[3])!r}): the processes "
                "no longer train the same model. Their gradients are not synchronised (wrap the model in "
                "DistributedDataParallel / use the framework's engine) or a process changed its weights alone"
            )

    # ------------------------------------------------------------------- checkpoint
    def _fingerprint(self) -> dict[str, Any]:
        s = self.schedule
        return {
            "total_steps": s.total_steps,
            "shape": [self.num_layers, self.num_pools, self.num_experts, self.tracker.shape[3]],
            "events": [s.events[0], s.events[-1], s.num_events] if s.events else [],
            "quota": s.quota,
            "cap": s.cap,
            "allocation": s.allocation,
        }

    def state_dict(self) -> dict[str, Any]:
        """Growth state: ranks, statistics, step counter, event log (no RNG state: draws are seeded)."""
        return {
            "format": STATE_FORMAT,
            "schedule": self._fingerprint(),
            "global_step": self.global_step,
            "ranks": self.ranks().cpu().clone(),
            "tracker": {k: v.cpu() for k, v in self.tracker.state_dict().items()},
            "event_log": [ev.to_dict() for ev in self.event_log],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: sets the pools' ranks, statistics, step and event log.

        The pools' ``lora_A``/``lora_B`` values are part of the model checkpoint, not of this state.

        Raises:
            ValueError: the state comes from a different schedule or pool layout.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported controller state format {state.get('format')!r}")
        if state["schedule"] != self._fingerprint():
            raise ValueError(
                f"controller state was saved with schedule {state['schedule']}, this controller has "
                f"{self._fingerprint()}"
            )
        ranks = state["ranks"]
        if tuple(ranks.shape) != (self.num_layers, self.num_pools, self.num_experts):
            raise ValueError(f"state['ranks'] has shape {tuple(ranks.shape)}")
        if (ranks < 0).any() or (ranks > self.config.r_max).any():
            raise ValueError(f"state['ranks'] must lie in [0, r_max={self.config.r_max}]")
        for l, layer in enumerate(self.pools):
            for p, pool in enumerate(layer):
                pool.ranks.copy_(ranks[l, p].to(pool.ranks.device, pool.ranks.dtype))
        self.tracker.load_state_dict(state["tracker"])
        self.global_step = int(state["global_step"])
        self.event_log = [GrowthEvent(**ev) for ev in state["event_log"]]

    def __repr__(self) -> str:
        s = self.rank_summary()
        return (
            f"DRLoRAController(L={self.num_layers}, P={self.num_pools}, E={self.num_experts}, "
            f"step={self.global_step}, mean rank={s['mean']:.2f}, {self.schedule!r})"
        )
