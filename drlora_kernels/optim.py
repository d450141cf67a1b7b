"""Optimizer state under rank growth (SPEC.md, "Optimizer state under growth").

Parameters never change shape when a pool grows, so any optimizer keeps
working, but two things go wrong with a stock Adam/AdamW:

* the moments of a newly activated slot hold whatever the slot accumulated
  before (normally zeros, since inactive slots get zero gradient; anything
  else after a re-init) -- :func:`reset_optimizer_state_for_slots` zeroes every
  per-element state tensor of the new slots at each growth event;
* the step count is per tensor: a slot activated at step 10 000 gets the bias
  correction of step 10 000 on fresh moments, so its first update is
  ``(1 - beta1) / sqrt(1 - beta2) ~= 3.16`` times too large. :class:`RankAwareAdamW`
  keeps one step count per rank slot, so a late slot gets a true first step.

:class:`RankAwareAdamW` also never touches inactive slots: AdamW's decoupled
weight decay would otherwise shrink their (unused) ``A`` rows every step, and
they would no longer hold the values drawn at initialisation (**choice**: an
inactive slot is frozen in value, moments and step count until it is activated).

**Which slots a step updates.** Growth happens between the backward and
``optimizer.step()`` (the controller's contract, SPEC.md), so at the step right
after a growth event the new slots hold no gradient: they were inactive when it
was computed. Counting that step would make their first real update
``~0.74 * lr`` instead of a true first step, and would weight-decay fresh ``A``
rows once. :class:`RankAwareAdamW` therefore remembers the ranks of its previous
step (``state["seen_ranks"]``; for the first step, the ranks at construction): the slots
active during this step's backward are exactly those, since ranks only change at
growth events. A slot is updated iff it is active now **and** was then.
(**choice**, rather than "growth after ``optimizer.step()``": the SPEC, the
controller and the Trainer callback all grow before the step, where the gradients
for the statistics are complete; and rather than "slots with a non-zero gradient":
a fresh ``A`` row has an exactly-zero gradient while its ``B`` column is zero, and
AdamW counts that step for a fresh LoRA.) If you grow at another point (after the
step, before the next forward), the new slots wait one step before their first update.

**Host syncs.** Where ``ranks`` live on the CPU, each expert's active slots are
a view and the update runs as multi-tensor ops over those views (work grows
with the active ranks; reading the ranks is free). Where ``ranks`` live on an
accelerator, reading them would stall the device once per parameter, so the
update runs masked over whole tensors with per-slot factors computed on the
device (no ``.item()``, ``.tolist()`` or ``nonzero``), as ``_foreach`` ops over all
pool parameters of a group at once. :func:`choose_slot_path` makes that choice.

**Sharded parameters.** A parameter that is a ``DTensor`` (FSDP2's ``Shard(0)``
over experts, uneven when ``E % world != 0``, or ``Shard`` on any other dim, or
``Replicate``) is updated on its local shard, with ``ranks`` sliced to the local
experts and slots from the shard's global offset. A flat partition (DeepSpeed
ZeRO) cannot be mapped to slots: it raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.optim import Optimizer
from torch.optim.adam import adam as _torch_adam

from .pool import RankPool

__all__ = [
    "RankAwareAdamW",
    "SlotSpec",
    "choose_slot_path",
    "pool_slot_specs",
    "reset_optimizer_state_for_slots",
]

SLOT_PATHS = ("auto", "views", "masked")


@dataclass(frozen=True)
class SlotSpec:
    """Where a parameter's rank slots are: ``ranks [E]`` (live, the pool's buffer) and the slot dim.

    ``dim=1`` for ``lora_A [E, R, K]`` (slot = row), ``dim=2`` for ``lora_B [E, N, R]`` (slot = column).
    """

    ranks: torch.Tensor
    dim: int

    def __post_init__(self) -> None:
        if self.dim not in (1, 2):
            raise ValueError(f"dim must be 1 (lora_A rows) or 2 (lora_B columns), got {self.dim}")
        if not isinstance(self.ranks, torch.Tensor) or self.ranks.dim() != 1:
            raise ValueError(f"ranks must be a 1-D tensor [E], got {self.ranks!r}")
        if self.ranks.dtype.is_floating_point or self.ranks.dtype == torch.bool:
            raise TypeError(f"ranks must be an integer tensor, got {self.ranks.dtype}")

    def slot_shape(self, param_shape: Sequence[int]) -> tuple[int, int, int]:
        """The broadcastable `[E, R, 1]` / `[E, 1, R]` shape of a per-slot tensor."""
        E, R = param_shape[0], param_shape[self.dim]
        return (E, R, 1) if self.dim == 1 else (E, 1, R)

    def active(self, param: torch.Tensor) -> torch.Tensor:
        """Bool mask, broadcastable to ``param``: slot ``j`` of expert ``e`` is active iff ``j < ranks[e]``."""
        R = param.shape[self.dim]
        mask = torch.arange(R, device=self.ranks.device)[None, :] < self.ranks[:, None]
        return mask.view(self.slot_shape(param.shape)).to(param.device, non_blocking=True)


def choose_slot_path(ranks: torch.Tensor) -> str:
    """How :class:`RankAwareAdamW` updates the slots of a pool whose ranks are ``ranks``.

    ``"views"`` when ``ranks`` live on the CPU: reading them costs nothing, and per-expert
    views of the active slots skip the inactive ones (4-5x faster than masking on a CPU).
    ``"masked"`` otherwise: reading ranks that live on an accelerator would stall it once
    per parameter, so the update runs over whole tensors with per-slot factors computed on
    the device (no host sync).
    """
    return "views" if ranks.device.type == "cpu" else "masked"


def _flatten_pools(pools: RankPool | Iterable) -> list[RankPool]:
    if isinstance(pools, RankPool):
        return [pools]
    out: list[RankPool] = []
    for item in pools:
        out.extend(_flatten_pools(item))
    return out


def pool_slot_specs(pools: RankPool | Iterable) -> dict[torch.Tensor, SlotSpec]:
    """The ``slots=`` mapping of :class:`RankAwareAdamW` for one pool or a (nested) list of pools."""
    specs: dict[torch.Tensor, SlotSpec] = {}
    for pool in _flatten_pools(pools):
        specs[pool.lora_A] = SlotSpec(pool.ranks, 1)
        specs[pool.lora_B] = SlotSpec(pool.ranks, 2)
    return specs


# ------------------------------------------------------------------ sharded tensors


def _dtensor_type():
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _is_dtensor(t: torch.Tensor) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a ``DTensor`` (the tensor itself otherwise)."""
    return t.to_local() if _is_dtensor(t) else t


def _global_offset(t: torch.Tensor) -> tuple[int, ...]:
    """Global index of the first element of ``t``'s local shard (zeros for a plain tensor).

    Raises:
        ValueError: a placement whose local shard is not one contiguous block of the
            global tensor (``Partial``, strided sharding).
    """
    if not _is_dtensor(t):
        return (0,) * t.dim()
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in t.placements:
        if not (type(placement) is Shard or isinstance(placement, Replicate)):
            raise ValueError(
                f"RankAwareAdamW supports DTensor parameters sharded with Shard(dim) or "
                f"replicated; got placements {t.placements} (a partial or strided placement does "
                "not map to rank slots)"
            )
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(int(o) for o in offset)


@dataclass(frozen=True)
class _LocalSlots:
    """The experts ``e0:e0+E`` and slots ``s0:s0+R`` a (possibly sharded) parameter holds locally."""

    e0: int
    E: int
    s0: int
    R: int
    dim: int  # slot dim of the 3-D parameter (1: A rows, 2: B columns)

    @classmethod
    def of(cls, t: torch.Tensor, dim: int) -> _LocalSlots:
        local = _local(t)
        offset = _global_offset(t)
        return cls(offset[0], local.shape[0], offset[dim], local.shape[dim], dim)

    def counts(self, ranks: torch.Tensor) -> torch.Tensor:
        """Active slots per local expert, within the local slot range: `[E_local]`."""
        return (ranks[self.e0 : self.e0 + self.E] - self.s0).clamp(0, self.R)

    def mask(self, ranks: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`[E_local, R_local, 1]` / `[E_local, 1, R_local]` bool: local slot active under ``ranks``."""
        slots = torch.arange(self.R, device=ranks.device)
        mask = slots[None, :] < self.counts(ranks)[:, None]
        shape = (self.E, self.R, 1) if self.dim == 1 else (self.E, 1, self.R)
        return mask.view(shape).to(device, non_blocking=True)


def _per_slot_zeros(param: torch.Tensor, dim: int) -> torch.Tensor:
    """An fp32 per-slot tensor (`[E, R, 1]` / `[E, 1, R]`) laid out like ``param``'s shards.

    For a ``DTensor`` parameter it is a ``DTensor`` on the same mesh, sharded like the
    parameter on the expert and slot dims and replicated over the third (size 1), so its
    local shard covers exactly the parameter's local experts and slots (and a distributed
    checkpoint reshards it with the parameter).
    """
    E, R = param.shape[0], param.shape[dim]
    shape = (E, R, 1) if dim == 1 else (E, 1, R)
    if not _is_dtensor(param):
        return torch.zeros(shape, dtype=torch.float32, device=param.device)
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor import zeros as dtensor_zeros

    placements = [
        p if not (isinstance(p, Shard) and p.dim not in (0, dim)) else Replicate()
        for p in param.placements
    ]
    return dtensor_zeros(
        shape, dtype=torch.float32, device_mesh=param.device_mesh, placements=placements
    )


# ------------------------------------------------------------------ growth resets


def _is_slot_state(t: torch.Tensor, param: torch.Tensor, dim: int) -> bool:
    """A state tensor laid out like ``param`` (same shape, or broadcastable with full E and slot dims)."""
    if t.dim() != param.dim() or t.shape[0] != param.shape[0] or t.shape[dim] != param.shape[dim]:
        return False
    return all(a == b or a == 1 for a, b in zip(t.shape, param.shape))


@torch.no_grad()
def reset_optimizer_state_for_slots(
    optimizer: Optimizer, pool: RankPool, grown: Sequence[tuple[int, int, int]]
) -> None:
    """Zero the optimizer state of newly activated slots (``A`` rows and ``B`` columns ``old:new``).

    Every state tensor of ``pool.lora_A`` / ``pool.lora_B`` laid out like the parameter (same
    shape -- ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, momentum buffers... -- or a
    per-slot tensor broadcastable to it, such as :class:`RankAwareAdamW`'s step counts) is
    zeroed at those slots. Scalar state (a stock Adam's ``step``) is left alone. A sharded
    (``DTensor``) state tensor is zeroed on its local shard, at the grown slots it holds.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        pool: the pool that grew.
        grown: ``[(expert, old_rank, new_rank), ...]`` as returned by ``RankPool.grow``.

    Raises:
        ValueError: an entry of ``grown`` outside the pool, or a state tensor with a placement
            that does not map to slots.
    """
    if not grown:
        return
    E, R = pool.num_experts, pool.r_max
    fresh = torch.zeros(E, R, dtype=torch.bool)
    for e, old, new in grown:
        if not (0 <= e < E and 0 <= old <= new <= R):
            raise ValueError(
                f"grown holds an invalid entry (expert={e}, old={old}, new={new}) for E={E}, r_max={R}"
            )
        fresh[e, old:new] = True
    # Index the fresh slots instead of masking whole tensors: a growth event touches a
    # few slots, and a masked_fill_ over every [E, R, K] state tensor cost more than
    # the rest of the event (measured: 12 ms of a 750 ms benchmark step).
    expert_idx, slot_idx = fresh.nonzero(as_tuple=True)
    for param, dim in ((pool.lora_A, 1), (pool.lora_B, 2)):
        state = optimizer.state.get(param)
        if not state:
            continue
        for value in state.values():
            if isinstance(value, torch.Tensor) and _is_slot_state(value, param, dim):
                _zero_slots(value, dim, expert_idx, slot_idx)


def _zero_slots(
    value: torch.Tensor, dim: int, expert_idx: torch.Tensor, slot_idx: torch.Tensor
) -> None:
    """Zero ``value[e, j]`` (slot dim ``dim``) at global indices, on the local shard of a DTensor."""
    local, offset = _local(value), _global_offset(value)
    e_idx, j_idx = expert_idx - offset[0], slot_idx - offset[dim]
    if _is_dtensor(value):  # keep the slots this process holds
        keep = (e_idx >= 0) & (e_idx < local.shape[0]) & (j_idx >= 0) & (j_idx < local.shape[dim])
        e_idx, j_idx = e_idx[keep], j_idx[keep]
    e_idx, j_idx = e_idx.to(local.device), j_idx.to(local.device)
    if dim == 1:
        local[e_idx, j_idx] = 0
    else:
        local[e_idx, :, j_idx] = 0


# ------------------------------------------------------------------ the optimizer

# Bookkeeping that Optimizer.load_state_dict would cast to the parameter's dtype.
_EXACT_STATE = {"seen_ranks": None, "param_step": torch.float32}


class RankAwareAdamW(Optimizer):
    """AdamW with one step count per rank slot, that never touches inactive slots.

    For a parameter listed in ``slots`` the state holds ``exp_avg``/``exp_avg_sq`` (parameter
    shape), ``step`` (`[E, R, 1]` for ``lora_A``, `[E, 1, R]` for ``lora_B``; fp32),
    ``seen_ranks`` (the ranks of its previous step; before the first step, the ranks at
    construction) and ``param_step`` (its number of steps). Each step, only the slots that
    were active when the gradient was computed and still are (``j < min(seen_ranks[e],
    ranks[e])``, ``ranks`` read live from the pool) have their step count incremented and get AdamW's update (decoupled weight decay, moment
    update, bias correction with their own step count); other slots keep value, moments and
    count. Combined with :func:`reset_optimizer_state_for_slots` at a growth event, a newly
    activated slot's first update is a true first Adam step (``~ lr * sign(grad)`` for a
    ``B`` column; a fresh ``A`` row follows a fresh LoRA's ``A`` under AdamW). See the module
    docstring for why the previous step's ranks.

    Parameters not in ``slots`` are updated by ``torch.optim``'s own AdamW kernel, so they
    behave exactly like :class:`torch.optim.AdamW`. Slots active from the start follow the
    same arithmetic as AdamW (equal up to float rounding).

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: as in :class:`torch.optim.AdamW`.
        slots: ``{parameter: SlotSpec}``, e.g. :func:`pool_slot_specs(pools) <pool_slot_specs>`;
            entries for parameters not in ``params`` are ignored (frozen pools).
        new_slot_lr_scale: learning-rate multiplier for slots activated by growth, during
            their first ``new_slot_lr_steps`` updates (an option beyond the paper; ``1.0`` =
            off). Slots active from the start never get it.
        new_slot_lr_steps: how many updates of a grown slot get ``new_slot_lr_scale``.
        slot_path: ``"auto"`` (:func:`choose_slot_path`), ``"views"`` or ``"masked"``.

    Raises:
        ValueError: a hyperparameter out of range, a ``slots`` entry whose parameter is not a
            3-D ``[E, ., .]`` tensor matching its ``ranks`` (e.g. a flat ZeRO partition), or,
            at :meth:`step`, a slot parameter that an engine replaced or reshaped.

    Example:
        >>> opt = RankAwareAdamW(model.parameters(), lr=1e-4, slots=pool_slot_specs(pools))
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        slots: Mapping[torch.Tensor, SlotSpec] | None = None,
        new_slot_lr_scale: float = 1.0,
        new_slot_lr_steps: int = 0,
        slot_path: str = "auto",
    ) -> None:
        from .config import validate_new_slot_lr

        if not 0.0 <= lr:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        new_slot_lr_scale, new_slot_lr_steps = validate_new_slot_lr(
            new_slot_lr_scale, new_slot_lr_steps
        )
        if slot_path not in SLOT_PATHS:
            raise ValueError(f"slot_path must be one of {SLOT_PATHS}, got {slot_path!r}")
        self.slot_path = slot_path
        super().__init__(
            params,
            dict(
                lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                new_slot_lr_scale=new_slot_lr_scale, new_slot_lr_steps=new_slot_lr_steps,
            ),
        )  # fmt: skip
        known = {p for group in self.param_groups for p in group["params"]}
        # Specs of parameters this optimizer does not train (e.g. frozen pools) are ignored.
        self.slots: dict[torch.Tensor, SlotSpec] = {
            p: s for p, s in (slots or {}).items() if p in known
        }
        self._shapes: dict[torch.Tensor, tuple[int, ...]] = {}
        # The ranks the first step's gradient is computed with (see the module docstring).
        # Kept outside self.state: a non-empty state before the first step would make
        # torch.distributed.checkpoint skip its state initialisation.
        self._initial_ranks: dict[torch.Tensor, torch.Tensor] = {}
        for p, spec in self.slots.items():
            self._check_layout(p, spec)
            self._shapes[p] = tuple(p.shape)
            self._initial_ranks[p] = spec.ranks.detach().clone()

    @staticmethod
    def _check_layout(p: torch.Tensor, spec: SlotSpec) -> None:
        if p.dim() != 3 or spec.ranks.shape != (p.shape[0],):
            raise ValueError(
                f"slots: a parameter of shape {tuple(p.shape)} needs ranks of shape [{p.shape[0]}] "
                f"and a 3-D [E, R, K] / [E, N, R] layout, got ranks {tuple(spec.ranks.shape)}; a "
                "flattened or partitioned parameter (DeepSpeed ZeRO) cannot be mapped to rank slots "
                "-- use FSDP2 (DTensor shards) or plain data parallelism with RankAwareAdamW"
            )

    def _check_engine_did_not_replace(self) -> None:
        """Raise if an engine swapped or reshaped the slot parameters behind this optimizer's back.

        DeepSpeed ZeRO-1/2 replaces ``param_groups[i]["params"]`` by flat fp32 partitions and
        ZeRO-3 empties ``param.data``: the slot update would then silently become plain AdamW.
        """
        present = {p for group in self.param_groups for p in group["params"]}
        for p, shape in self._shapes.items():
            if p not in present:
                raise ValueError(
                    "RankAwareAdamW: a parameter listed in slots= is no longer in the optimizer's "
                    "param_groups (an engine such as DeepSpeed ZeRO replaced it by a flat partition); "
                    "the per-slot update cannot run on a flat partition -- use FSDP2 or plain data "
                    "parallelism with RankAwareAdamW, or torch.optim.AdamW with "
                    "reset_optimizer_state_for_slots under ZeRO"
                )
            if tuple(p.shape) != shape:
                raise ValueError(
                    f"RankAwareAdamW: a slot parameter of shape {shape} now has shape "
                    f"{tuple(p.shape)} (an engine such as DeepSpeed ZeRO-3 partitioned it); the "
                    "per-slot update needs the [E, R, K] / [E, N, R] layout"
                )

    def load_state_dict(self, state_dict: dict) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict`, keeping the slot bookkeeping exact.

        ``Optimizer.load_state_dict`` casts every state tensor but ``step`` to the parameter's
        dtype (bf16 holds integers exactly only up to 256); ``seen_ranks`` and ``param_step``
        are restored from the saved tensors instead.
        """
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        super().load_state_dict(state_dict)
        for i, p in zip(ids, params):
            spec = self.slots.get(p)
            if spec is None or i not in saved:
                continue
            for key, dtype in _EXACT_STATE.items():
                if key in saved[i]:
                    device = spec.ranks.device if key == "seen_ranks" else _local(p).device
                    value = saved[i][key].to(device=device, dtype=dtype or spec.ranks.dtype)
                    self.state[p][key] = value

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.slots:
            self._check_engine_did_not_replace()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            plain: dict[str, list[torch.Tensor]] = {k: [] for k in ("p", "g", "m", "v", "t")}
            by_path: dict[str, list[_SlotItem]] = {"views": [], "masked": []}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("RankAwareAdamW does not support sparse gradients")
                spec = self.slots.get(p)
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["step"] = (
                        _per_slot_zeros(p, spec.dim)
                        if spec is not None
                        else torch.tensor(0.0, dtype=torch.float32)
                    )
                if spec is None:
                    for key, val in zip(
                        "pgmvt", (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])
                    ):
                        plain[key].append(val)
                    continue
                path = self.slot_path if self.slot_path != "auto" else choose_slot_path(spec.ranks)
                by_path[path].append(self._slot_item(p, state, spec))
            if by_path["views"]:
                _views_update(by_path["views"], group)
            if by_path["masked"]:
                _masked_update(by_path["masked"], group)
            for item in by_path["views"] + by_path["masked"]:
                item.seen_ranks.copy_(item.live_ranks)
            if plain["p"]:
                _torch_adam(
                    plain["p"], plain["g"], plain["m"], plain["v"], [], plain["t"],
                    decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2,
                    lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                    has_complex=any(torch.is_complex(p) for p in plain["p"]),
                )  # fmt: skip
        return loss

    def _slot_item(self, p: torch.Tensor, state: dict, spec: SlotSpec) -> _SlotItem:
        """Local tensors of one slot parameter and the ranks its gradient was computed with."""
        step = _local(state["step"])
        device = _local(p).device
        if step.device != device:  # e.g. after load_state_dict (torch keeps "step" where it was)
            step = step.to(device, torch.float32)
            if _is_dtensor(state["step"]):
                raise ValueError(
                    "a sharded per-slot step count must live on its parameter's device"
                )
            state["step"] = step
        if "param_step" not in state:
            state["param_step"] = torch.zeros((), device=device)
        seen = state.get("seen_ranks")
        if seen is None:  # the first step (or a state saved before seen_ranks existed)
            seen = state["seen_ranks"] = self._initial_ranks.get(p, spec.ranks).detach().clone()
        if seen.device != spec.ranks.device or seen.dtype != spec.ranks.dtype:
            seen = state["seen_ranks"] = seen.to(spec.ranks.device, spec.ranks.dtype)
        if tuple(p.grad.shape) != tuple(p.shape):
            raise ValueError(
                f"RankAwareAdamW: the gradient of a slot parameter has shape {tuple(p.grad.shape)}, "
                f"the parameter {tuple(p.shape)}"
            )
        return _SlotItem(
            p=_local(p),
            grad=_local(p.grad),
            exp_avg=_local(state["exp_avg"]),
            exp_avg_sq=_local(state["exp_avg_sq"]),
            step=step,
            param_step=state["param_step"],
            ranks=torch.minimum(seen, spec.ranks),
            slots=_LocalSlots.of(p, spec.dim),
            seen_ranks=seen,
            live_ranks=spec.ranks,
        )


@dataclass
class _SlotItem:
    """One slot parameter's local tensors for an update."""

    p: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor  # per slot, fp32
    param_step: torch.Tensor  # 0-d fp32: steps this parameter has taken
    ranks: torch.Tensor  # [E] global: slots active in this step's backward and now
    slots: _LocalSlots
    seen_ranks: torch.Tensor  # state["seen_ranks"], set to live_ranks after the update
    live_ranks: torch.Tensor  # the pool's ranks buffer


def _step_factors(
    item: _SlotItem, active: torch.Tensor, group: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the per-slot counts of ``active`` slots; return ``(step_size, bias2_sqrt)`` per slot.

    Bias corrections in fp64 like AdamW's Python scalars. ``step_size`` is
    ``lr / (1 - beta1**t)`` (times ``new_slot_lr_scale`` for young grown slots), 0 where
    ``active`` is false; ``bias2_sqrt`` is ``sqrt(1 - beta2**t)`` (1 where nothing was counted).
    """
    beta1, beta2 = group["betas"]
    item.param_step.add_(1)
    item.step.add_(active.to(item.step.dtype))
    t = item.step.double().clamp(min=1)
    step_size = group["lr"] / (1.0 - beta1**t)
    scale, steps = group["new_slot_lr_scale"], group["new_slot_lr_steps"]
    if scale != 1.0:
        # A grown slot has counted fewer steps than its parameter; initial slots never have.
        young = (item.step <= steps) & (item.step < item.param_step)
        step_size = torch.where(young, step_size * scale, step_size)
    step_size = (step_size * active).to(item.p.dtype)
    return step_size, (1.0 - beta2**t).sqrt().to(item.p.dtype)


def _views_update(items: list[_SlotItem], group: dict) -> None:
    """AdamW on the active slots only: work grows with the active ranks, not ``r_max``.

    Each expert's active slots are one view (``A[e, :r_e]`` rows, ``B[e, :, :r_e]``
    columns), so the update runs as multi-tensor (``_foreach``) ops over the views of all
    parameters of the group at once. Reads ``ranks`` on the host: the path for ranks on
    the CPU (:func:`choose_slot_path`).
    """
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    beta1, beta2 = group["betas"]
    ps, gs, ms, vs, step_sizes, bc2s = [], [], [], [], [], []
    for item in items:
        slots = item.slots
        step_size, bc2_sqrt = _step_factors(item, slots.mask(item.ranks, item.step.device), group)
        dim = slots.dim - 1  # the slot dim of one expert's [R, K] / [N, R] slice
        active = [(e, r) for e, r in enumerate(slots.counts(item.ranks).tolist()) if r > 0]
        for x, out in ((item.p, ps), (item.grad, gs), (item.exp_avg, ms), (item.exp_avg_sq, vs),
                       (step_size, step_sizes), (bc2_sqrt, bc2s)):  # fmt: skip
            out.extend(x[e].narrow(dim, 0, r) for e, r in active)
    if not ps:
        return
    if wd != 0:
        torch._foreach_mul_(ps, 1.0 - lr * wd)
    torch._foreach_lerp_(ms, gs, 1.0 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, bc2s)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(ms, denom)
    torch._foreach_mul_(update, step_sizes)
    torch._foreach_sub_(ps, update)


def _masked_update(items: list[_SlotItem], group: dict) -> None:
    """AdamW over whole slot tensors with per-slot factors: no host sync, one ``_foreach`` pass.

    Inactive slots get factors that leave value and moments unchanged (decay 1, moment
    weights 0 and 1, step size 0, denominator >= 1), so the result equals :func:`_views_update`.
    """
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    beta1, beta2 = group["betas"]
    ps, gs, ms, vs = [], [], [], []
    decay, w1, keep2, w2, step_sizes, bc2s, inactive = [], [], [], [], [], [], []
    for item in items:
        active = item.slots.mask(item.ranks, item.step.device)
        on = active.to(torch.float32)  # fp32 factors: in-place ops on bf16 compute in fp32 anyway
        step_size, bc2_sqrt = _step_factors(item, active, group)
        ps.append(item.p)
        gs.append(item.grad)
        ms.append(item.exp_avg)
        vs.append(item.exp_avg_sq)
        decay.append(1.0 - (lr * wd) * on)
        w1.append(((1.0 - beta1) * on).to(item.p.dtype))  # lerp wants its own dtype
        keep2.append(1.0 - (1.0 - beta2) * on)
        w2.append((1.0 - beta2) * on)
        step_sizes.append(step_size)
        bc2s.append(bc2_sqrt)
        inactive.append(1.0 - on)
    if wd != 0:
        torch._foreach_mul_(ps, decay)
    torch._foreach_lerp_(ms, gs, w1)
    torch._foreach_mul_(vs, keep2)
    sq = torch._foreach_mul(gs, gs)
    torch._foreach_mul_(sq, w2)
    torch._foreach_add_(vs, sq)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, bc2s)
    torch._foreach_add_(denom, eps)
    torch._foreach_add_(denom, inactive)  # inactive: 0 / (x + 1), never 0 / 0
    update = torch._foreach_div(ms, denom)
    torch._foreach_mul_(update, step_sizes)
    torch._foreach_sub_(ps, update)
