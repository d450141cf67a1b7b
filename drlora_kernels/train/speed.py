"""Training-step time of several methods, measured interleaved.

The comparison run trains its methods one after the other, so a step time taken
during training drifts with whatever else the machine does in that minute (on a
shared 2-core machine: +-10% between methods). Here every method gets a fresh
copy of the model, and their steps are timed round-robin on the same batches:
method A step, method B step, ..., repeated. Slow phases of the machine then hit
all methods alike, and the ratios between them are stable.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from . import loop


def interleaved_step_seconds(
    load_model: Callable[[], torch.nn.Module],
    finetune_cfg: loop.FinetuneConfig,
    methods: tuple[str, ...],
    batches: list[torch.Tensor],
    *,
    warmup: int = 2,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Median wall time of one training step per method, methods stepped round-robin.

    Args:
        load_model: returns a fresh base model (called once per method).
        finetune_cfg: the run's fine-tuning config (``method`` is replaced per method).
        methods: e.g. ``("lora", "drlora", "masked")``.
        batches: token blocks ``[B, S]``, one per timed round (the same for every method).
        warmup: untimed steps per method first (allocator, lazy init).

    Every method does its full step (loss, backward, DR-LoRA statistics, growth event
    if one is due, optimizer update) exactly as :func:`loop.finetune` does. All the
    methods' models (and optimizer states) are alive at once: memory grows with
    ``len(methods)``.
    """
    if not batches:
        raise ValueError("batches must hold at least one batch")
    runs = {}
    for method in methods:
        cfg = dataclasses.replace(finetune_cfg, method=method)
        model = load_model()
        handle, opt = loop.prepare_finetune(model, cfg)
        runs[method] = (model, handle.controller, opt)
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(warmup + len(batches)):
        batch = batches[(i - warmup) % len(batches)].to(device)
        for method, (model, controller, opt) in runs.items():
            t0 = time.perf_counter()
            loss, _ = loop.train_step(model, controller, opt, batch)
            loss.item()  # syncs the device
            if i >= warmup:
                seconds[method].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in seconds.items()}
