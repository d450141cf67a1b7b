"""``transformers.Trainer`` + ``DRLoRACallback`` on the tests' workload, as a user would launch it.

Run by the tests under ``torchrun --nproc_per_node 2`` (DDP), under ``accelerate launch`` with
``examples/accelerate/fsdp2.yaml`` (FSDP2), and in the test process itself (one process)::

    python tests/distributed/trainer_run.py OUT_DIR [--accumulation N] [--checkpointing]

Two trainings in one launch: an uninterrupted one (checkpoints every ``SAVE_EVERY`` steps),
then a fresh model resumed from the first checkpoint (mid-growth) to the end. Each process
writes ``OUT_DIR/rank<r>.pt``: ``{"run": snapshot, "resumed": snapshot}`` (see ``workload.snapshot``).

The data: the workload's global batches in order (a sequential sampler), so step ``k`` sees the
same ``GLOBAL_BATCH`` rows whatever the number of processes (each takes ``1 / world`` of them).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # launched as a script
    sys.path.insert(0, str(ROOT))

from transformers import Trainer, TrainingArguments  # noqa: E402

from drlora_kernels.integrations import DRLoRACallback, attach_drlora  # noqa: E402
from tests.distributed import workload  # noqa: E402
from tests.integrations.tiny_models import build, small_config  # noqa: E402

SAVE_EVERY = 3  # checkpoint-3 lies between the events at steps 2 and 4
# accelerate enables FSDP only on GPU-like devices: on a CPU-only machine it silently runs
# DDP (distributed_type MULTI_CPU) whatever the config says. With this variable set, the
# script makes accelerate's state FSDP on the gloo processes, as it is on GPUs.
FSDP_ON_CPU = "DRLORA_TEST_ACCELERATE_FSDP_ON_CPU"


def _accelerate_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


class Blocks(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.cat(workload.global_batches())

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class InOrderTrainer(Trainer):
    """The samples in order, so every launch sees the same global batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def _arguments(out: Path, world: int, accumulation: int, checkpointing: bool) -> TrainingArguments:
    per_device = workload.GLOBAL_BATCH // world // accumulation
    return TrainingArguments(
        output_dir=str(out), max_steps=workload.STEPS, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation, learning_rate=1e-2, lr_scheduler_type="constant",
        max_grad_norm=0.0, save_strategy="steps", save_steps=SAVE_EVERY, logging_steps=1,
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
        ddp_find_unused_parameters=False, activation_checkpointing=checkpointing,
    )  # fmt: skip


def train(
    out: Path, *, world: int, accumulation: int = 1, checkpointing: bool = False, resume=None
):
    model = attach_drlora(build("olmoe"), small_config(**workload.CONFIG)).train()
    trainer = InOrderTrainer(
        model=model,
        args=_arguments(out, world, accumulation, checkpointing),
        train_dataset=Blocks(),
        callbacks=[DRLoRACallback(model, resume_from_checkpoint=resume)],
    )
    trainer.train(resume_from_checkpoint=resume)
    return {**workload.snapshot(model), "log": []}  # per-step log: the plain-loop tests


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if os.environ.get(FSDP_ON_CPU) == "1":
        _accelerate_fsdp_on_cpu()
    out = Path(args.out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    kw = dict(world=world, accumulation=args.accumulation, checkpointing=args.checkpointing)
    result = {"run": train(out / "run", **kw)}
    checkpoint = out / "run" / f"checkpoint-{SAVE_EVERY}"
    result["resumed"] = train(out / "resumed", resume=str(checkpoint), **kw)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    torch.save(result, out / f"rank{rank}.pt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
