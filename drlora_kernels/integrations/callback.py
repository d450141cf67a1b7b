"""``DRLoRACallback``: DR-LoRA inside a ``transformers.Trainer``.

Where each part of the method runs in the Trainer's step::

    forward (every micro-batch)      experts forward -> controller.record_routing
    backward (every micro-batch)     gradients accumulate in lora_A/lora_B .grad
    [grad clipping]                  Trainer
    on_pre_optimizer_step            controller.update_statistics(); controller.step(optimizer)
    optimizer.step()                 Trainer
    on_save                          save_drlora(<checkpoint>/drlora) (every process; rank 0 writes)
    on_log                           rank statistics added to the Trainer's logs

``on_pre_optimizer_step`` runs once per optimizer step, after the last micro-batch of a
gradient-accumulation cycle, so the statistics see complete gradients (clipped, if
``max_grad_norm`` is set: the clip scales every slot alike, so the ranking within a step
is unchanged). Gradient checkpointing is handled by the controller (a forward re-run
inside the backward is not counted twice).

Resuming: ``Trainer.train(resume_from_checkpoint=...)`` restores the pools with the model
weights; the callback then restores the controller (statistics, step counter, event log)
from ``<checkpoint>/drlora`` in ``on_train_begin``, so growth continues exactly where it
stopped. The checkpoint is found as ``<output_dir>/checkpoint-<global_step>`` unless
``resume_from_checkpoint`` is given to the callback.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..engines import detect_engine
from .checkpoint import load_drlora, save_drlora
from .transformers import DRLoRAModel, get_drlora

__all__ = ["CHECKPOINT_SUBDIR", "DRLoRACallback"]

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "drlora"


def _unwrap_optimizer(optimizer):
    # accelerate's AcceleratedOptimizer keeps the torch optimizer in ``.optimizer``
    return getattr(optimizer, "optimizer", optimizer)


class DRLoRACallback(TrainerCallback):
    """Drive a :class:`~drlora_kernels.dynamic.DRLoRAController` from a ``Trainer``.

    Args:
        model_or_handle: the attached model (see :func:`attach_drlora`) or its handle.
        resume_from_checkpoint: checkpoint directory to restore the controller from when the
            Trainer resumes, if it is not ``<output_dir>/checkpoint-<step>``.
        log_layers: add per-layer mean/min/max rank to the logs (the model mean always is).

    Create the Trainer after :func:`attach_drlora`, so its optimizer takes the LoRA pools and the
    routers (trainable from the start; the controller drops their gradients during warmup).

    Under ``torchrun`` / ``accelerate launch`` the callback binds the controller to the engine
    the Trainer prepared (:func:`~drlora_kernels.engines.detect_engine` of the model and the
    optimizer, in ``on_train_begin``): DDP, or FSDP2 (pools sharded with their decoder layer;
    attach before the Trainer shards the model). Checkpoints are saved on every process
    (sharded pools are gathered) and written by global rank 0.
    """

    def __init__(self, model_or_handle, *, resume_from_checkpoint: str | os.PathLike | None = None,
                 log_layers: bool = True) -> None:  # fmt: skip
        self.handle: DRLoRAModel = get_drlora(model_or_handle)
        self.resume_from_checkpoint = resume_from_checkpoint
        self.log_layers = log_layers
        self._pending_events: list[Any] = []

    @property
    def controller(self):
        return self.handle.controller

    # ------------------------------------------------------------------------------- setup
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.controller is None:
            if not state.max_steps or state.max_steps <= 0:
                raise ValueError(
                    "DRLoRACallback needs the Trainer's max_steps to build the growth schedule"
                )
            self.handle.setup_controller(int(state.max_steps))
        elif self.controller.total_steps != state.max_steps:
            logger.warning(
                "DR-LoRA controller was built for %d steps, the Trainer runs %d: the growth schedule follows the "
                "controller", self.controller.total_steps, state.max_steps,
            )  # fmt: skip
        if self.controller.bound_engine is None:
            # the model is prepared (DDP / FSDP2 / DeepSpeed) and the optimizer built by now
            target = model if model is not None else self.handle.model
            self.controller.bind_engine(detect_engine(target, _unwrap_optimizer(optimizer)))
        engine = self.controller.bound_engine.name
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and engine != "fsdp2":
            logger.warning(
                "accelerate was launched with FSDP but the model is not sharded (DR-LoRA engine %r): "
                "accelerate enables FSDP on GPUs only and runs plain data parallelism elsewhere",
                engine,
            )
        # DeepSpeed ZeRO steps inside accelerator.backward and owns the gradients: the
        # controller then runs from ZeRO's optimizer step (engines/deepspeed.py), not from here.
        from ..engines.deepspeed import maybe_install_deepspeed_hooks

        self._engine_driven = maybe_install_deepspeed_hooks(self.handle, optimizer)
        if state.global_step > 0:
            self._resume(args, state)
        checkpointing = getattr(args, "activation_checkpointing", None) or getattr(
            args, "gradient_checkpointing", False
        )
        if checkpointing and model is not None and hasattr(model, "enable_input_require_grads"):
            # frozen embeddings: make the checkpointed blocks see an input that requires grad
            model.enable_input_require_grads()

    def _resume(self, args, state) -> None:
        directory = Path(
            self.resume_from_checkpoint or Path(args.output_dir) / f"checkpoint-{state.global_step}"
        )
        sub = directory / CHECKPOINT_SUBDIR
        if not sub.is_dir():
            raise ValueError(
                f"resuming at step {state.global_step} but {sub} holds no DR-LoRA state; pass "
                "DRLoRACallback(..., resume_from_checkpoint=<checkpoint dir>)"
            )
        load_drlora(self.handle, sub)
        if self.controller.global_step != state.global_step:
            raise ValueError(
                f"DR-LoRA state in {sub} is at step {self.controller.global_step}, the Trainer resumes at "
                f"step {state.global_step}"
            )

    # ------------------------------------------------------------------------------ a step
    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if getattr(self, "_engine_driven", False):  # DeepSpeed: already done in ZeRO's step
            events = list(self.controller.engine.events)
            self.controller.engine.events.clear()
        else:
            self.controller.update_statistics()
            events = self.controller.step(
                _unwrap_optimizer(optimizer) if optimizer is not None else None
            )
        if events:
            self._pending_events.extend(events)
            summary = self.controller.rank_summary()
            logger.info(
                "DR-LoRA growth at step %d: %d modules grew, mean rank %.2f (total %d of budget %d)",
                events[0].step, len(events), summary["mean"], summary["total"], summary["budget"],
            )  # fmt: skip

    # ----------------------------------------------------------------------------- logging
    def rank_logs(self) -> dict[str, float]:
        """The values added to the Trainer's logs: model mean rank, events so far, per-layer stats."""
        summary = self.controller.rank_summary()
        logs: dict[str, float] = {
            "drlora/mean_rank": summary["mean"],
            "drlora/total_rank": summary["total"],
            "drlora/events": len(self.controller.event_log),
            "drlora/grown_since_last_log": len(self._pending_events),
            "drlora/router_frozen": float(self.controller.router_frozen),
        }
        if self.log_layers:
            for layer, stats in enumerate(summary["layers"]):
                for key in ("mean", "min", "max"):
                    logs[f"drlora/layer{layer}/{key}_rank"] = stats[key]
        return logs

    def on_log(self, args, state, control, logs=None, **kwargs):
        if (
            self.controller is None
            or logs is None
            or "loss" not in logs
            and "train_loss" not in logs
        ):
            return
        extra = self.rank_logs()
        self._pending_events.clear()
        logs.update(extra)  # seen by the callbacks after this one (progress bar / printer)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)  # the Trainer already appended its copy

    # -------------------------------------------------------------------------- checkpoints
    def on_save(self, args, state, control, **kwargs):
        # collective under torch.distributed (sharded pools are gathered); global rank 0 writes
        directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        save_drlora(self.handle, directory / CHECKPOINT_SUBDIR)
