"""``drlora train`` under ``torchrun``: process group, data sharding, DDP / FSDP2 wrapping.

``torchrun --nproc_per_node N -m drlora_kernels train ...`` (or the ``drlora`` script) starts N
processes; :func:`init_from_env` reads torchrun's environment and joins them (gloo on the CPU,
nccl on CUDA, one GPU per process by ``LOCAL_RANK``). Every process then runs the same
pipeline: the SAME global batches as one process would, each process taking its contiguous
``1 / N`` of the rows (so ``--batch-size`` must divide by N), gradients averaged by the engine,
growth decided identically everywhere (the controller's all-reduced statistics). Only global
rank 0 pre-trains the base model, prints, and writes files.

Engines (``--parallel``):

* ``ddp``: :class:`torch.nn.parallel.DistributedDataParallel` (``find_unused_parameters=False``);
* ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on every decoder layer
  (``model._no_split_modules``), then the root, AFTER attaching DR-LoRA and before the
  optimizer is built;
* ``zero1`` / ``zero2``: DeepSpeed ZeRO stage 1 / 2 (the paper's engine) around
  ``torch.optim.AdamW``: ``deepspeed.initialize`` after attaching, then
  :func:`~drlora_kernels.engines.deepspeed.install_deepspeed_hooks`, so statistics and growth
  run inside ``engine.step()`` on ZeRO's gradient partitions and fp32 master. ZeRO-3 needs the
  model built under ``deepspeed.zero.Init`` and is left to the Trainer and plain-loop paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

PARALLEL = ("ddp", "fsdp2", "zero1", "zero2")


def check_optimizer(parallel: str | None, optimizer: str) -> None:
    """Refuse ``RankAwareAdamW`` under ZeRO (``--parallel zero1|zero2``): ZeRO hands the
    optimizer flat partitions, on which its per-slot state cannot run.

    Raises:
        ValueError: ``parallel`` is a ZeRO stage and ``optimizer`` is not ``"adamw"``.
    """
    if (parallel or "").startswith("zero") and optimizer != "adamw":
        raise ValueError(
            f"--parallel {parallel} runs DeepSpeed ZeRO, which hands the optimizer flat "
            f"partitions that RankAwareAdamW cannot run on: use --optimizer adamw "
            f"(got {optimizer!r})"
        )


@dataclass(frozen=True)
class DistributedRun:
    """This process's place in a ``torchrun`` job and the engine that wraps the model.

    Attributes:
        world, rank, local_rank: torchrun's ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``.
        parallel: one of :data:`PARALLEL`.
        device: this process's device (``cuda:<local_rank>`` on GPUs).
    """

    world: int
    rank: int
    local_rank: int
    parallel: str
    device: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global batch (contiguous ``1 / world`` of them)."""
        if batch.shape[0] % self.world:
            raise ValueError(
                f"the global batch of {batch.shape[0]} rows does not split over {self.world} processes: "
                "choose --batch-size divisible by the number of processes"
            )
        per = batch.shape[0] // self.world
        return batch[self.rank * per : (self.rank + 1) * per]

    @property
    def zero_stage(self) -> int | None:
        """The DeepSpeed ZeRO stage of ``zero1``/``zero2``, else ``None``."""
        return int(self.parallel[len("zero") :]) if self.parallel.startswith("zero") else None

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to call for training steps (DR-LoRA must be attached already). Under ZeRO
        the model is returned as is: :meth:`deepspeed_initialize` wraps it with its optimizer."""
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.local_rank] if self.device.startswith("cuda") else None
            return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)
        if self.zero_stage is not None:
            return model
        return shard_decoder_layers(model)

    def deepspeed_initialize(self, model: nn.Module, optimizer, micro_batch: int):
        """ZeRO-``zero_stage`` around ``optimizer`` (torch ``AdamW``) with DR-LoRA driven from
        ``engine.step()``. Returns ``(engine, zero_optimizer)``.

        Raises:
            ValueError: DeepSpeed is not installed.
            TypeError: ``optimizer`` is a ``RankAwareAdamW`` (ZeRO hands it flat partitions).
        """
        if not self.device.startswith("cuda"):
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
        try:
            import deepspeed
        except ImportError as exc:
            raise ValueError(
                f"--parallel {self.parallel} needs DeepSpeed (pip install deepspeed): {exc}"
            ) from None
        from ..engines.deepspeed import install_deepspeed_hooks

        dtype = next(model.parameters()).dtype
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": self.zero_stage},
            "bf16": {"enabled": dtype == torch.bfloat16},
            "fp16": {"enabled": dtype == torch.float16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        engine, zero_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )
        install_deepspeed_hooks(engine)
        return engine, zero_optimizer

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over the processes (for the logged loss)."""
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world

    def barrier(self) -> None:
        dist.barrier()


def shard_decoder_layers(model: nn.Module) -> nn.Module:
    """FSDP2: ``fully_shard`` every block named in ``model._no_split_modules``, then the root.

    Call after :func:`~drlora_kernels.integrations.attach_drlora` (the pools are sharded with
    their layer, on the expert dim) and before building the optimizer.
    """
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} names no decoder block (_no_split_modules): cannot choose what "
            "to shard with FSDP2"
        )
    for module in list(model.modules())[1:]:
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    return model


def init_from_env(parallel: str | None, device: str) -> DistributedRun | None:
    """Join the ``torchrun`` job described by the environment; ``None`` for a single process.

    Args:
        parallel: one of :data:`PARALLEL`, or ``None`` for ``"ddp"``.
        device: ``"cpu"`` (gloo) or ``"cuda"`` (nccl; this process uses ``cuda:<LOCAL_RANK>``).

    Raises:
        ValueError: an unknown ``parallel``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel is not None and parallel not in PARALLEL:
        raise ValueError(f"--parallel must be one of {PARALLEL}, got {parallel!r}")
    if world <= 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return DistributedRun(world, rank, local_rank, parallel or "ddp", device)


def shutdown(run: DistributedRun | None) -> None:
    if run is not None and dist.is_initialized():
        dist.destroy_process_group()
