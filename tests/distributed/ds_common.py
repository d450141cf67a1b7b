"""Shared by the DeepSpeed tests and the scripts they launch: model, data, configs, the reference.

Every run trains the tiny OLMoE of ``tests.integrations.tiny_models`` for ``STEPS`` optimizer
steps of ``GAS`` micro-batches. A global micro-batch is ``WORLD * ROWS`` sequences; process
``r`` of ``WORLD`` trains rows ``[r * ROWS, (r + 1) * ROWS)``, the single-process reference
trains all of them, so both see the same global batches (equal-length sequences: the mean
loss over the global batch is the mean of the per-process means that ZeRO averages).
"""

from __future__ import annotations

import os

import torch

STEPS, GAS, WORLD, ROWS, SEQ = 6, 2, 2, 2, 8
RESUME_AT = 3  # optimizer steps before the interruption (between growth events)
LR, WEIGHT_DECAY = 1e-2, 0.01


def quiet_deepspeed() -> None:
    """Skip DeepSpeed's op probing and its JIT-compiled shared-memory all-reduce (a C++ build of
    minutes on a cold CI machine): the processes then talk through plain gloo."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {}


def drlora_config(**overrides):
    from tests.integrations.tiny_models import small_config

    kw = dict(warmup_steps=2, grow_every=1, buffer_steps=0, seed=5)
    kw.update(overrides)
    return small_config(**kw)


def ds_config(stage: int, **zero) -> dict:
    """A minimal DeepSpeed config (fp32; the client optimizer is torch's AdamW)."""
    z = {"stage": stage}
    if stage == 3:
        z["stage3_param_persistence_threshold"] = 0  # partition even the tiny pools and routers
    z.update(zero)
    return {
        "train_micro_batch_size_per_gpu": ROWS,
        "gradient_accumulation_steps": GAS,
        "zero_optimization": z,
        "steps_per_print": 10**9,
    }


def global_batch(step: int, micro: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randint(3, 128, (WORLD * ROWS, SEQ), generator=gen)


def local_batch(step: int, micro: int, rank: int) -> torch.Tensor:
    return global_batch(step, micro)[rank * ROWS : (rank + 1) * ROWS]


def build_model(config, steps: int = STEPS):
    """The tiny OLMoE with DR-LoRA attached and a controller for ``steps`` steps, in train mode."""
    from drlora_kernels.integrations.transformers import attach_drlora
    from tests.integrations.tiny_models import build

    model = attach_drlora(build("olmoe"), config, total_steps=steps)
    return model.train()


def make_optimizer(handle):
    return torch.optim.AdamW(handle.trainable_parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


def snapshot(handle, gather=None) -> dict:
    """What the tests compare: ranks, events, statistics, full pool and router values (CPU)."""
    gather = gather or (lambda t: t.detach().cpu().clone())
    ctrl = handle.controller
    return {
        "step": ctrl.global_step,
        "ranks": ctrl.ranks().cpu().clone(),
        "events": [ev.to_dict() for ev in ctrl.event_log],
        "frequency": ctrl.tracker.frequency.cpu().clone(),
        "importance": ctrl.tracker.slot_importance.cpu().clone(),
        "pools": {
            name: (gather(pool.lora_A), gather(pool.lora_B)) for name, pool in handle.named_pools()
        },
        "routers": {name: gather(p) for name, p in handle.named_router_parameters()},
    }


def reference_run(config, steps: int = STEPS) -> dict:
    """The package's single-process path over the same global batches (LocalEngine, AdamW)."""
    from drlora_kernels.integrations.transformers import get_drlora

    torch.manual_seed(0)
    model = build_model(config, steps)
    handle = get_drlora(model)
    opt = make_optimizer(handle)
    for step in range(steps):
        for micro in range(GAS):
            x = global_batch(step, micro)
            (model(input_ids=x, labels=x).loss / GAS).backward()
        handle.controller.update_statistics()
        handle.controller.step(opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return snapshot(handle)
