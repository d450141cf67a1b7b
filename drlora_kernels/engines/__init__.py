"""Training engines: how the DR-LoRA controller reads gradients of, and writes into, the rank pools.

The method needs four things from whatever holds the weights (SPEC "Determinism and
distributed training"):

* the per-slot importance sums of the step's COMPLETE gradient (``slot_sums``), reduced
  across processes once when each process holds only a part (``sums_are_partial``);
* growth writes (``write_growth``) of the same seeded draw on every process, into every copy
  of the weights the engine keeps, verified after writing (``read_growth``);
* a reset of the optimizer state of the grown slots (``reset_optimizer_slots``);
* full values for checkpoints (``gather_full``, collective) and back (``load_full``), and a
  fingerprint of the replicated weights for the cross-process check (``checksum``).

Engines:

* :class:`LocalEngine` (``"local"`` / ``"ddp"``): one process, or data parallelism where every
  process holds the complete, identical (averaged) gradient and weights (DDP, accelerate's
  multi-GPU mode).
* :class:`~drlora_kernels.engines.fsdp.FSDP2Engine` (``"fsdp2"``): ``torch.distributed.fsdp.fully_shard``
  (DTensor parameters, any ``Shard``/``Replicate`` placement).
* DeepSpeed ZeRO-1/2/3 (``drlora_kernels.engines.deepspeed``, imported only when DeepSpeed is).

:func:`detect_engine` picks one from the parameters (and the optimizer). This module imports
nothing from ``integrations``; ``torch.distributed`` is used only when it is initialised.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ..ops import slot_importance

if TYPE_CHECKING:  # the pools are duck-typed here: pool.py imports this module
    from ..pool import RankPool

__all__ = [
    "Engine",
    "GrowthNotWrittenError",
    "LocalEngine",
    "detect_engine",
    "distributed_world",
    "is_global_writer",
]

# After the first optimizer step that follows growth, the grown ``A`` rows have had zero
# gradient (their ``B`` columns were zero): only weight decay (a factor ``1 - lr * wd``) or a
# stale momentum moves them. A write reverted by an engine (e.g. a master copy copied back)
# leaves an independent draw there: relative distance ~1.4. Half-way between is the threshold.
REVERTED_REL_DISTANCE = 0.5


class GrowthNotWrittenError(RuntimeError):
    """A growth write did not reach (or did not stay in) the weights the engine trains."""


def distributed_world(group=None) -> int:
    """World size of ``group`` when ``torch.distributed`` is initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def is_global_writer() -> bool:
    """True on the one process that writes files: global rank 0 (or without ``torch.distributed``)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class Engine:
    """How the DR-LoRA controller reads gradients of, and writes into, the rank pools.

    Subclasses implement the methods below for one way of holding the weights; the
    interface is documented in ``notes/ENGINES.md`` (shared with the DeepSpeed engine).

    Attributes:
        name: ``"local"``, ``"ddp"``, ``"fsdp2"``, ``"deepspeed-zero1/2/3"``: used in error messages.
        sums_are_partial: ``True`` when processes hold disjoint parts of a pool, so the
            ``[E, R]`` sums of :meth:`slot_sums` are summed across processes (then
            ``s_j = imp_a * imp_b``); ``False`` when every process holds the full gradient.
    """

    name: str = "engine"
    sums_are_partial: bool = False

    # ----------------------------------------------------------------------- statistics
    def slot_sums(self, pool: RankPool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This process's part of ``(sum_k |A*dA|, sum_n |B*dB|)``, fp32 ``[E, R]`` (global ``E``, ``R``).

        Zero where this process holds nothing; from the step's complete gradient (after all
        micro-batches, before the optimizer step). ``None``: no gradient seen for this pool.
        """
        raise NotImplementedError

    # --------------------------------------------------------------------------- growth
    def write_growth(
        self, pool: RankPool, expert: int, old: int, new: int, a_rows: torch.Tensor
    ) -> None:
        """``A[expert, old:new] = a_rows`` (``[new - old, K]``) and ``B[expert, :, old:new] = 0``.

        On every copy of the weights the engine keeps (local shard, fp32 master, low-precision
        working copy). ``a_rows`` is the same seeded draw on every process. The caller bumps
        ``pool.ranks`` afterwards.
        """
        raise NotImplementedError

    def read_growth(
        self, pool: RankPool, expert: int, old: int, new: int, a_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """What this process holds of the grown slots, read from the copy the optimizer updates.

        Returns:
            ``(held_a, expected_a, held_b)``: this process's part of ``A[expert, old:new]``,
            the matching part of ``a_rows``, and its part of ``B[expert, :, old:new]``
            (any device); ``None`` when this process holds none of them.
        """
        raise NotImplementedError

    def reset_optimizer_slots(
        self, optimizer, pool: RankPool, changes: Sequence[tuple[int, int, int]]
    ) -> None:
        """Zero the optimizer state of the new slots (``changes = [(expert, old, new)]``)."""
        raise NotImplementedError

    # ------------------------------------------------------------ checkpoints and checks
    def gather_full(self, tensor: torch.Tensor) -> torch.Tensor:
        """The full value of a pool or router parameter: a CPU copy, on every process (collective)."""
        raise NotImplementedError

    def load_full(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Write a full value into ``param`` (each process its local part / master copy)."""
        raise NotImplementedError

    def checksum(self, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        """A float64 scalar fingerprint of this process's view of the REPLICATED ``tensors``.

        Equal on every process when they hold the same values. Tensors partitioned across
        processes (each holds a different part) are left out: there is nothing to compare.
        """
        return fingerprint(tensors)

    def validate(self, pools: Sequence[RankPool]) -> None:
        """Raise ``ValueError`` if the pools are not laid out the way this engine expects.

        Called once, when the controller binds the engine (its first statistics or growth call).
        """

    # ------------------------------------------------------------------- shared checks
    def verify_growth(
        self,
        pool: RankPool,
        expert: int,
        old: int,
        new: int,
        a_rows: torch.Tensor,
        *,
        after_step: bool = False,
    ) -> bool:
        """``True`` when the grown slots hold the draw (``A``) and zeros (``B``), as far as this process sees.

        Right after writing (``after_step=False``) the values must match exactly (after the cast
        to the parameter's dtype). After the next optimizer step (``after_step=True``) the ``A``
        rows may only have moved a little (zero gradient; weight decay), so a write an engine
        reverted (an independent value back in place) fails; ``B`` is not checked then (it
        trains from that step on).
        """
        view = self.read_growth(pool, expert, old, new, a_rows)
        if view is None:
            return True
        held, expected, held_b = view
        expected = expected.to(held.device, held.dtype)
        if not after_step:
            return bool(torch.equal(held, expected)) and not bool(held_b.any())
        scale = torch.linalg.vector_norm(expected.double())
        if scale == 0:
            return True
        return float(torch.linalg.vector_norm((held - expected).double()) / scale) < (
            REVERTED_REL_DISTANCE
        )

    def growth_not_written(self, pool_name: str, expert: int, old: int, new: int, when: str):
        """The error raised when :meth:`verify_growth` fails (names the engine and the fix)."""
        return GrowthNotWrittenError(
            f"DR-LoRA growth of {pool_name} expert {expert} (slots {old}:{new}) {when} under the "
            f"{self.name!r} engine: the weights the optimizer trains do not hold the new slots, so "
            "growth would silently have no effect. The engine keeps a copy of the weights DR-LoRA "
            "did not write (e.g. an fp32 master copy): pass the matching engine to the controller "
            "(DRLoRAController(..., engine=...) or controller.bind_engine(detect_engine(model, optimizer)))"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def fingerprint(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Float64 fingerprint of plain tensors: ``sum_i (i + 1) * (sum(t_i) + pi * ||t_i||)``.

    Any drift of a value changes both terms; two reductions, no temporary copy of ``t``.
    """
    total = torch.zeros((), dtype=torch.float64)
    for i, t in enumerate(tensors):
        t = t.detach()
        term = t.sum(dtype=torch.float64) + torch.pi * torch.linalg.vector_norm(
            t, dtype=torch.float64
        )
        total += (i + 1) * term.cpu()
    return total


class LocalEngine(Engine):
    """One process, or data parallelism with replicated weights (DDP).

    The gradient a process sees after backward is complete (all micro-batches) and, under DDP,
    already averaged across processes: ``slot_sums`` reads ``.grad`` directly and nothing
    needs reducing. Writes go straight into the parameters; checkpoints read them as they are.

    Args:
        name: ``None`` (default): ``"ddp"`` when ``torch.distributed`` runs more than one
            process, else ``"local"`` (decided when first read).
    """

    def __init__(self, name: str | None = None) -> None:
        self._name = name

    @property
    def name(self) -> str:  # type: ignore[override]
        if self._name is not None:
            return self._name
        return "ddp" if distributed_world() > 1 else "local"

    def validate(self, pools):
        from .fsdp import is_dtensor

        if any(is_dtensor(p) for pool in pools for p in (pool.lora_A, pool.lora_B)):
            raise ValueError(
                f"the rank pools are sharded (DTensor parameters, FSDP2) but the {self.name!r} engine "
                "handles plain parameters: bind drlora_kernels.engines.fsdp.FSDP2Engine() (or let the "
                "controller detect it: do not bind an engine before fully_shard)"
            )

    def slot_sums(self, pool):
        self.validate([pool])
        A, B = pool.lora_A, pool.lora_B
        if A.grad is None or B.grad is None:
            return None
        return slot_importance(A.detach(), A.grad, B.detach(), B.grad, pool.ranks)

    @torch.no_grad()
    def write_growth(self, pool, expert, old, new, a_rows):
        self.validate([pool])
        pool.lora_A[expert, old:new] = a_rows.to(pool.lora_A.device, pool.lora_A.dtype)
        pool.lora_B[expert, :, old:new] = 0

    def read_growth(self, pool, expert, old, new, a_rows):
        return (
            pool.lora_A.detach()[expert, old:new],
            a_rows,
            pool.lora_B.detach()[expert, :, old:new],
        )

    def reset_optimizer_slots(self, optimizer, pool, changes):
        from ..optim import reset_optimizer_state_for_slots

        _require_slot_state(optimizer, pool, self.name)
        reset_optimizer_state_for_slots(optimizer, pool, changes)

    def gather_full(self, tensor):
        return tensor.detach().to("cpu", copy=True)

    @torch.no_grad()
    def load_full(self, param, value):
        param.copy_(value.to(param.device, param.dtype))


def _require_slot_state(optimizer, pool, engine_name: str) -> None:
    """Raise if the optimizer keeps state for a pool but none of it is laid out like the parameter.

    Such state (e.g. one flat partition per process) cannot be reset per slot, and resetting
    nothing would silently leave the grown slots with stale moments.
    """
    for param in (pool.lora_A, pool.lora_B):
        state = getattr(optimizer, "state", {}).get(param)
        if not state:
            continue
        tensors = [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        if tensors and not any(v.dim() == param.dim() for v in tensors):
            raise RuntimeError(
                f"{type(optimizer).__name__} keeps state for a LoRA pool's parameter that is not laid out "
                f"like it ({[tuple(v.shape) for v in tensors]} for {tuple(param.shape)}) under the "
                f"{engine_name!r} engine: the moments of grown slots cannot be reset. Use an optimizer "
                "with per-parameter state (torch.optim.AdamW, drlora_kernels.RankAwareAdamW) or the "
                "engine of your training framework (detect_engine(model, optimizer))"
            )


# ------------------------------------------------------------------------------ detection
def _parameters(model_or_params) -> list[torch.Tensor]:
    if isinstance(model_or_params, nn.Module):
        return list(model_or_params.parameters())
    return [p for p in model_or_params if isinstance(p, torch.Tensor)]


def _deepspeed_engine(model, optimizer) -> Engine | None:
    """The DeepSpeed ZeRO engine for ``model``/``optimizer``, or ``None`` when DeepSpeed is not in use.

    Hook for ``drlora_kernels.engines.deepspeed`` (its ``detect(model, optimizer)`` returns an
    :class:`Engine` or ``None``); imported only when the ``deepspeed`` package already is.
    """
    if "deepspeed" not in sys.modules:
        return None
    try:
        from .deepspeed import detect
    except ImportError as exc:  # the DeepSpeed engine module is missing or broken
        params = _parameters(model) if model is not None else []
        if any(hasattr(p, "ds_id") for p in params):
            raise RuntimeError(
                "the model's parameters are partitioned by DeepSpeed ZeRO-3 but the DR-LoRA DeepSpeed "
                f"engine could not be imported ({exc}); DR-LoRA cannot read or grow them"
            ) from exc
        return None
    return detect(model, optimizer)


def detect_engine(model=None, optimizer=None) -> Engine:
    """The :class:`Engine` for a model (or its pools' parameters) and, optionally, its optimizer.

    * DeepSpeed ZeRO (parameters with ``ds_id``, a DeepSpeed engine or ZeRO optimizer):
      the DeepSpeed engine;
    * DTensor parameters (``torch.distributed.fsdp.fully_shard``): :class:`~.fsdp.FSDP2Engine`;
    * anything else (one process, DDP): :class:`LocalEngine`.

    Args:
        model: an ``nn.Module`` (or an iterable of its parameters).
        optimizer: the optimizer (needed to recognise DeepSpeed ZeRO-1/2, which leaves the
            parameters plain tensors).

    Raises:
        ValueError: some pool parameters are DTensors and others are not (see
            :meth:`~.fsdp.FSDP2Engine.validate`).
    """
    engine = _deepspeed_engine(model, optimizer)
    if engine is not None:
        return engine
    from .fsdp import FSDP2Engine, is_dtensor

    params = _parameters(model) if model is not None else []
    if any(is_dtensor(p) for p in params):
        return FSDP2Engine()
    return LocalEngine()
