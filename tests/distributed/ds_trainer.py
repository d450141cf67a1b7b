"""Launched by tests/distributed/test_deepspeed.py: ``transformers.Trainer`` + ``DRLoRACallback``
under DeepSpeed, started by ``torchrun`` (``ds_trainer.py JSON OUT``: the JSON is passed to
``TrainingArguments(deepspeed=...)``) or by ``accelerate launch --config_file <yaml>``
(``ds_trainer.py accelerate OUT``: accelerate's DeepSpeed plugin carries the JSON).

Two Trainer runs in the same processes: uninterrupted (saving ``checkpoint-RESUME_AT``) and
resumed from that checkpoint. Writes ``OUT/rank<r>.pt``. The test runs :func:`run` with
``world=1`` in its own process as the single-process reference: accelerate gives process ``r``
the ``r``-th per-device batch of the sampler's order, so one process with a ``WORLD`` times
larger batch sees the same global batches.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed.ds_common import quiet_deepspeed  # noqa: E402

quiet_deepspeed()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from drlora_kernels.integrations.callback import DRLoRACallback  # noqa: E402
from drlora_kernels.integrations.transformers import get_drlora  # noqa: E402
from tests.distributed import ds_common as C  # noqa: E402


class Batches(torch.utils.data.Dataset):
    """``STEPS * GAS`` global micro-batches of equal-length sequences, one row per item."""

    def __init__(self) -> None:
        self.rows = torch.cat([C.global_batch(s, m) for s in range(C.STEPS) for m in range(C.GAS)])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def base_weights(model) -> dict:
    """The base model's full weights (gathered under ZeRO-3: ``zero.Init`` draws them differently)."""
    params = {n: p for n, p in model.named_parameters() if ".drlora." not in n}
    if any(hasattr(p, "ds_id") for p in params.values()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().clone() for n, p in params.items()}
    return {n: p.detach().clone() for n, p in params.items()}


def run(
    ds_json: str | None, out: Path, resume: str | None = None, world: int = C.WORLD, init=None
) -> dict:
    """One Trainer run (``world=1``: the single-process reference, a global batch per process;
    ``init``: base weights to start from, e.g. those a ZeRO-3 run drew under ``zero.Init``)."""
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        deepspeed=ds_json,
        max_steps=C.STEPS,
        per_device_train_batch_size=C.ROWS * C.WORLD // world,
        gradient_accumulation_steps=C.GAS,
        learning_rate=C.LR,
        weight_decay=C.WEIGHT_DECAY,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        save_steps=C.RESUME_AT,
        save_strategy="steps",
        logging_steps=1,
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        save_only_model=False,
    )
    torch.manual_seed(0)
    # after TrainingArguments: ZeRO-3 builds partitioned. Routers train from the start so the run
    # is comparable with the single-process one (ZeRO's Adam step count is per parameter group)
    model = C.build_model(C.drlora_config(freeze_router_during_warmup=False))
    if init is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in init:
                    p.copy_(init[name])
    initial = base_weights(model) if resume is None and world > 1 else None
    handle = get_drlora(model)
    callback = DRLoRACallback(model)
    trainer = Trainer(model=model, args=args, train_dataset=Batches(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    ctrl = handle.controller
    res = C.snapshot(handle, gather=ctrl.engine.gather_full)
    res["engine"] = ctrl.engine.name
    res["engine_driven"] = getattr(callback, "_engine_driven", False)
    res["trainer_step"] = trainer.state.global_step
    res["initial_base"] = initial
    res["logged_ranks"] = [h.get("drlora/mean_rank") for h in trainer.state.log_history]
    return res


def main(ds_json: str | None, out: Path) -> None:
    import deepspeed

    # before TrainingArguments: ZeRO-3's zero.Init reads the world size from deepspeed.comm
    deepspeed.init_distributed(dist_backend="gloo")
    res = {"full": run(ds_json, out)}
    ckpt = out / "trainer" / f"checkpoint-{C.RESUME_AT}"
    res["resumed"] = run(ds_json, out, resume=str(ckpt))
    torch.save(res, out / f"rank{dist.get_rank()}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(None if sys.argv[1] == "accelerate" else sys.argv[1], Path(sys.argv[2]))
