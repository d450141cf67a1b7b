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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.optim import Optimizer
from torch.optim.adam import adam as _torch_adam

from .pool import RankPool

__all__ = ["RankAwareAdamW", "SlotSpec", "pool_slot_specs", "reset_optimizer_state_for_slots"]


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

    def slot_shape(self, param_shape: Sequence[int]) -> tuple[int, int, int]:
        """The broadcastable `[E, R, 1]` / `[E, 1, R]` shape of a per-slot tensor."""
        E, R = param_shape[0], param_shape[self.dim]
        return (E, R, 1) if self.dim == 1 else (E, 1, R)

    def active(self, param: torch.Tensor) -> torch.Tensor:
        """Bool mask, broadcastable to ``param``: slot ``j`` of expert ``e`` is active iff ``j < ranks[e]``."""
        R = param.shape[self.dim]
        mask = torch.arange(R, device=self.ranks.device)[None, :] < self.ranks[:, None]
        return mask.view(self.slot_shape(param.shape)).to(param.device, non_blocking=True)


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
    zeroed at those slots. Scalar state (a stock Adam's ``step``) is left alone.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        pool: the pool that grew.
        grown: ``[(expert, old_rank, new_rank), ...]`` as returned by ``RankPool.grow``.
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
                e_idx, j_idx = expert_idx.to(value.device), slot_idx.to(value.device)
                if dim == 1:
                    value[e_idx, j_idx] = 0
                else:
                    value[e_idx, :, j_idx] = 0


class RankAwareAdamW(Optimizer):
    """AdamW with one step count per rank slot, that never touches inactive slots.

    For a parameter listed in ``slots`` the state holds ``exp_avg``/``exp_avg_sq`` (parameter
    shape) and ``step`` (`[E, R, 1]` for ``lora_A``, `[E, 1, R]` for ``lora_B``; fp32). Each
    step, only the ACTIVE slots (``j < ranks[e]``, read live from the pool) have their step
    count incremented and get AdamW's update (decoupled weight decay, moment update, bias
    correction with their own step count); inactive slots keep value, moments and count.
    Combined with :func:`reset_optimizer_state_for_slots` at a growth event, a newly
    activated slot gets a true first Adam step (``~ lr * sign(grad)``).

    Parameters not in ``slots`` are updated by ``torch.optim``'s own AdamW kernel, so they
    behave exactly like :class:`torch.optim.AdamW`. Slots active from the start follow the
    same arithmetic as AdamW (equal up to float rounding).

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: as in :class:`torch.optim.AdamW`.
        slots: ``{parameter: SlotSpec}``, e.g. :func:`pool_slot_specs(pools) <pool_slot_specs>`;
            entries for parameters not in ``params`` are ignored.

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
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        known = {p for group in self.param_groups for p in group["params"]}
        # Specs of parameters this optimizer does not train (e.g. frozen pools) are ignored.
        self.slots: dict[torch.Tensor, SlotSpec] = {
            p: s for p, s in (slots or {}).items() if p in known
        }
        for p, spec in self.slots.items():
            if p.dim() != 3 or spec.ranks.shape != (p.shape[0],):
                raise ValueError(
                    f"slots: a parameter of shape {tuple(p.shape)} needs ranks of shape [{p.shape[0]}] "
                    f"and a 3-D layout, got ranks {tuple(spec.ranks.shape)}"
                )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            plain: dict[str, list[torch.Tensor]] = {k: [] for k in ("p", "g", "m", "v", "t")}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("RankAwareAdamW does not support sparse gradients")
                spec = self.slots.get(p)
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["step"] = (
                        torch.zeros(spec.slot_shape(p.shape), dtype=torch.float32, device=p.device)
                        if spec is not None
                        else torch.tensor(0.0, dtype=torch.float32)
                    )
                if spec is not None:
                    self._slot_update(p, p.grad, state, spec, group, beta1, beta2)
                    continue
                for key, val in zip(
                    "pgmvt", (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])
                ):
                    plain[key].append(val)
            if plain["p"]:
                _torch_adam(
                    plain["p"], plain["g"], plain["m"], plain["v"], [], plain["t"],
                    decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2,
                    lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                    has_complex=any(torch.is_complex(p) for p in plain["p"]),
                )  # fmt: skip
        return loss

    @staticmethod
    def _slot_update(p, grad, state, spec: SlotSpec, group, beta1: float, beta2: float) -> None:
        """AdamW on the active slots only: work grows with the active ranks, not ``r_max``.

        Each expert's active slots are one view (``A[e, :r_e]`` rows, ``B[e, :, :r_e]``
        columns), so the update runs as multi-tensor (``_foreach``) ops over those views.
        Reading ``ranks`` costs one host sync per parameter on CUDA.
        """
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        step = state["step"]
        if step.device != p.device:  # e.g. after load_state_dict (torch keeps "step" where it was)
            step = state["step"] = step.to(p.device, torch.float32)
        step.add_(spec.active(p).to(step.dtype))  # [E, R, 1] / [E, 1, R]: tiny
        # Bias corrections in fp64 like AdamW's Python scalars, per slot.
        t = step.double()
        step_size = (lr / (1.0 - beta1**t)).to(p.dtype)
        bc2_sqrt = (1.0 - beta2**t).sqrt().to(p.dtype)
        dim = spec.dim - 1  # the slot dim of one expert's [R, K] / [N, R] slice
        active = [(e, r) for e, r in enumerate(spec.ranks.tolist()) if r > 0]
        if not active:
            return

        def views(x: torch.Tensor) -> list[torch.Tensor]:
            return [x[e].narrow(dim, 0, r) for e, r in active]

        ps, gs = views(p), views(grad)
        ms, vs = views(state["exp_avg"]), views(state["exp_avg_sq"])
        if wd != 0:
            torch._foreach_mul_(ps, 1.0 - lr * wd)
        torch._foreach_lerp_(ms, gs, 1.0 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, views(bc2_sqrt))
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(ms, denom)
        torch._foreach_mul_(update, views(step_size))
        torch._foreach_sub_(ps, update)
