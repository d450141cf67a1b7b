"""Routing frequency, rank importance and the saliency score of DR-LoRA (SPEC Eq. 5-9).

All statistics of a model live in a few stacked tensors, so the per-step update
is a handful of vectorised ops (no loop over experts) and, under data
parallelism, ONE collective:

* ``frequency [L, E]``: ``f <- beta f + (1 - beta) w`` once per optimizer step, where ``w`` is
  the sum of the routing weights the model applied to each expert over every token of the
  step (all gradient-accumulation micro-batches) divided by the number of tokens;
* ``slot_importance [L, P, E, R]``: ``g_j <- beta g_j + (1 - beta) s_j`` with
  ``s_j = ||dL/da_j * a_j||_1 * ||dL/db_j * b_j||_1`` for rank slot ``j``;
* module importance ``g_m`` = mean of ``g_j`` over the ACTIVE slots of module ``m``;
* saliency ``S_m = f_expert(m) * g_m / (r_m + 1) ** gamma``.

``L`` layers, ``P`` adapted projections (pools) per layer, ``E`` experts, ``R`` slots
(``r_max``). Module ``m = p * E + e`` is expert ``e`` of pool ``p``; both modules of one
expert share its ``f``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .engines import Engine, LocalEngine
from .pool import RankPool


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread.

    Gradient checkpointing re-runs the forward inside the backward (reentrant: inside
    ``CheckpointFunction.backward``; non-reentrant: inside the saved-tensor unpack hook),
    so a forward that sees ``in_backward()`` is a recomputation and must not be counted.
    """
    return torch._C._current_graph_task_id() != -1


def slot_scores(pool: RankPool, engine: Engine | None = None) -> torch.Tensor:
    """``s_j`` of every slot of one pool from its accumulated gradient: `[E, R]` fp32.

    Read through ``engine`` (default :class:`~drlora_kernels.engines.LocalEngine`: ``.grad``);
    for a sharded engine this is the product of this process's partial sums, not ``s_j``.
    Inactive slots (and a pool that received no gradient) score exactly zero; the controller
    instead raises for a pool with active ranks and no gradient.
    """
    sums = (engine or LocalEngine()).slot_sums(pool)
    if sums is None:
        A = pool.lora_A
        return torch.zeros(A.shape[0], A.shape[1], dtype=torch.float32, device=pool.ranks.device)
    return sums[0] * sums[1]


def saliency_score(
    frequency: torch.Tensor, importance: torch.Tensor, ranks: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Eq. 9: ``S = f * g / (r + 1) ** gamma`` (all arguments broadcast together)."""
    return frequency * importance / (ranks.to(importance.dtype) + 1.0).pow(gamma)


class SaliencyTracker:
    """EMAs of routing frequency and per-slot importance for ``L x P x E`` modules.

    Args:
        num_layers, num_pools, num_experts, r_max: ``L``, ``P``, ``E``, ``R``.
        beta: EMA decay (SPEC default 0.9).
        gamma: rank-penalty exponent of the saliency.
        use_frequency / use_importance: ablations; ``False`` replaces that factor by 1.
        device: where the statistics live (the pools' device).

    Use: :meth:`record_routing` from the MoE forward (device-side, no host sync),
    then once per optimizer step :meth:`update` with the step's slot scores, then
    :meth:`saliency` at a growth event and :meth:`reset_importance` for the modules that grew.
    """

    def __init__(
        self,
        num_layers: int,
        num_pools: int,
        num_experts: int,
        r_max: int,
        *,
        beta: float = 0.9,
        gamma: float = 1.2,
        use_frequency: bool = True,
        use_importance: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        for name, v in (
            ("num_layers", num_layers),
            ("num_pools", num_pools),
            ("num_experts", num_experts),
            ("r_max", r_max),
        ):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.shape = (num_layers, num_pools, num_experts, r_max)
        self.beta, self.gamma = float(beta), float(gamma)
        self.use_frequency, self.use_importance = bool(use_frequency), bool(use_importance)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        L, P, E, R = self.shape
        self.frequency = torch.zeros(L, E, dtype=torch.float32, device=self.device)
        self.slot_importance = torch.zeros(L, P, E, R, dtype=torch.float32, device=self.device)
        # Routing accumulators of the current optimizer step (fp64: many tokens per step).
        self._route_sum = torch.zeros(L, E, dtype=torch.float64, device=self.device)
        self._route_tokens = torch.zeros(L, dtype=torch.float64, device=self.device)

    # ----------------------------------------------------------------- routing capture
    def record_routing(
        self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> None:
        """Accumulate the routing weights one forward applied in ``layer``.

        Args:
            layer: MoE layer index in ``[0, L)``.
            top_k_index: `[T, k]` integer expert ids of each token.
            top_k_weights: `[T, k]` the weights the model applied (after its own normalisation).

        Device-side ``index_add_``, no host sync. Calls made while the autograd engine
        runs a backward (gradient-checkpoint recomputation) are ignored, so every token
        is counted once per forward.
        """
        if in_backward():
            return
        if not 0 <= layer < self.shape[0]:
            raise ValueError(f"layer must be in [0, {self.shape[0]}), got {layer}")
        if top_k_index.dim() != 2 or top_k_index.shape != top_k_weights.shape:
            raise ValueError(
                "top_k_index and top_k_weights must both have shape [T, k], got "
                f"{tuple(top_k_index.shape)} and {tuple(top_k_weights.shape)}"
            )
        if top_k_index.dtype.is_floating_point or top_k_index.dtype == torch.bool:
            raise TypeError(f"top_k_index must be an integer tensor, got {top_k_index.dtype}")
        idx = top_k_index.detach().reshape(-1).to(self.device, torch.long, non_blocking=True)
        w = top_k_weights.detach().reshape(-1).to(self.device, torch.float64, non_blocking=True)
        self._route_sum[layer].index_add_(0, idx, w)
        self._route_tokens[layer] += top_k_index.shape[0]

    def pending_routing(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's accumulated ``(weight sums [L, E], token counts [L])`` (not yet in ``f``)."""
        return self._route_sum, self._route_tokens

    # ------------------------------------------------------------------ step update
    def update(
        self,
        scores: torch.Tensor | None = None,
        *,
        partial_sums: tuple[torch.Tensor, torch.Tensor] | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        """One optimizer step's EMA update of ``f`` and ``g`` (then clears the routing sums).

        Args:
            scores: `[L, P, E, R]` per-slot ``s_j`` of this step, computed by every process from
                the full gradient (under ``torch.distributed``: averaged across processes).
            partial_sums: instead of ``scores``, when processes hold disjoint parts of the pools
                (FSDP2, ZeRO): this process's part of ``(sum_k |A*dA|, sum_n |B*dB|)``, each
                `[L, P, E, R]`; they are summed across processes, then ``s_j = imp_a * imp_b``.
            process_group: under ``torch.distributed``, routing sums, token counts and the
                importance terms are all-reduced over this group (default: the world) in ONE
                collective before the update, so every process ends with the same statistics.

        With ``use_importance=False`` neither ``scores`` nor ``partial_sums`` is needed. A layer
        that recorded no token this step keeps its ``f`` (no observation).
        """
        L, P, E, R = self.shape
        parts = [self._route_sum.reshape(-1), self._route_tokens]
        if self.use_importance:
            if (scores is None) == (partial_sums is None):
                raise ValueError(
                    "exactly one of scores and partial_sums is required when use_importance=True"
                )
            terms = [scores] if scores is not None else list(partial_sums)
            for name, t in zip(("scores",) if scores is not None else ("imp_a", "imp_b"), terms):
                if tuple(t.shape) != self.shape:
                    raise ValueError(
                        f"{name} must have shape {list(self.shape)}, got {tuple(t.shape)}"
                    )
                parts.append(t.detach().to(self.device, torch.float64).reshape(-1))
        flat = torch.cat(parts)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
            world = dist.get_world_size(process_group)
        # w = routing-weight sum / token count: both summed over processes, so the ratio is global.
        sums, tokens = flat[: L * E].view(L, E), flat[L * E : L * E + L]
        w = (sums / tokens.clamp(min=1.0)[:, None]).float()
        ema = self.beta * self.frequency + (1.0 - self.beta) * w
        self.frequency.copy_(torch.where((tokens > 0)[:, None], ema, self.frequency))
        if self.use_importance:
            terms = flat[L * E + L :].view(-1, L, P, E, R)
            if scores is not None:
                s = (terms[0] / world).float()  # mean over processes
            else:  # the complete sums first, then the product (fp32, like one process)
                s = terms[0].float() * terms[1].float()
            self.slot_importance.mul_(self.beta).add_(s, alpha=1.0 - self.beta)
        self._route_sum.zero_()
        self._route_tokens.zero_()

    # ------------------------------------------------------------------- read-outs
    def module_importance(self, ranks: torch.Tensor) -> torch.Tensor:
        """``g_m``: mean of ``g_j`` over the active slots ``j < r_m``; `[L, P, E]` (0 for rank 0)."""
        r = ranks.to(self.device, torch.long)
        active = torch.arange(self.shape[3], device=self.device) < r[..., None]
        total = torch.where(active, self.slot_importance, 0.0).sum(dim=-1)
        return total / r.clamp(min=1).to(total.dtype)

    def saliency(self, ranks: torch.Tensor) -> torch.Tensor:
        """``S_m`` of every module: `[L, P * E]` (module ``m = p * E + e``).

        Args:
            ranks: `[L, P, E]` current active ranks.
        """
        L, P, E, _ = self.shape
        if tuple(ranks.shape) != (L, P, E):
            raise ValueError(f"ranks must have shape [{L}, {P}, {E}], got {tuple(ranks.shape)}")
        ones = torch.ones(L, P, E, device=self.device)
        f = self.frequency[:, None, :].expand(L, P, E) if self.use_frequency else ones
        g = self.module_importance(ranks) if self.use_importance else ones
        return saliency_score(f, g, ranks.to(self.device), self.gamma).reshape(L, P * E)

    def reset_importance(self, modules: torch.Tensor) -> None:
        """Zero the per-slot EMAs (hence ``g_m``) of the modules where ``modules [L, P, E]`` is True."""
        mask = modules.to(self.device, torch.bool)[..., None]
        self.slot_importance.masked_fill_(mask, 0.0)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "frequency": self.frequency.clone(),
            "slot_importance": self.slot_importance.clone(),
            "route_sum": self._route_sum.clone(),
            "route_tokens": self._route_tokens.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, dst in (
            ("frequency", self.frequency),
            ("slot_importance", self.slot_importance),
            ("route_sum", self._route_sum),
            ("route_tokens", self._route_tokens),
        ):
            src = state[key]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"state[{key!r}] has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
                )
            dst.copy_(src)
