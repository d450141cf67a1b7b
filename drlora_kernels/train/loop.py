"""Plain training loops: pre-train a tiny MoE, fine-tune it with (DR-)LoRA, evaluate.

A hand-written loop rather than ``transformers.Trainer``: on a 2-core CPU the
Trainer's per-step overhead is a large share of a 0.2 s step. The fine-tuning
step follows the controller's contract (``dynamic.py``)::

    loss.backward()
    controller.update_statistics()   # routing frequency + rank importance, once per step
    controller.step(optimizer)       # growth events (zeroes new slots' optimizer state)
    optimizer.step(); optimizer.zero_grad()

Everything is seeded: the data order comes from :func:`~.data.train_batches`,
the initial ``A`` and every growth draw from the DR-LoRA config's seed.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import DRLoRAConfig
from .data import train_batches
from .memory import PeakMemory

METHODS = ("drlora", "lora", "masked")
OPTIMIZERS = ("rank_aware_adamw", "adamw")


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=True)


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch [B, S+1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``)."""
    logits = model(input_ids=batch[:, :-1]).logits
    return nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, blocks: torch.Tensor, *, batch_size: int = 16, device="cpu"
) -> float:
    """Mean next-token loss over the held-out ``blocks`` (every token weighted equally)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        batch = blocks[i : i + batch_size].to(device)
        total += lm_loss(model, batch).item() * batch.shape[0]
        n += batch.shape[0]
    model.train(was_training)
    return total / max(n, 1)


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup then cosine decay to ``floor`` (a multiplier of the base learning rate)."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


# ---------------------------------------------------------------- pre-training


@dataclass
class PretrainConfig:
    """Pre-training of the base MoE (all parameters, AdamW, cosine schedule, load-balancing loss)."""

    steps: int = 400
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.01
    aux_loss_coef: float = 0.01
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pretrain(
    model: nn.Module,
    train_blocks: torch.Tensor,
    cfg: PretrainConfig,
    *,
    device="cpu",
    progress: bool = True,
) -> list[tuple[int, float]]:
    """Train every parameter of ``model`` on ``train_blocks``; returns the ``(step, lm_loss)`` curve.

    The router's load-balancing loss (``aux_loss_coef``) is added so that all
    experts get tokens and specialise; the logged loss is the LM loss alone.
    """
    torch.manual_seed(cfg.seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )  # fmt: skip
    curve = []
    batches = train_batches(train_blocks, cfg.batch_size, cfg.steps, cfg.seed)
    bar = _progress(batches, cfg.steps, "pre-train", progress)
    for step, batch in enumerate(bar):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * cosine_lr(step, cfg.steps, cfg.warmup)
        batch = batch.to(device)
        out = model(input_ids=batch[:, :-1], output_router_logits=cfg.aux_loss_coef > 0)
        logits = out.logits
        lm = nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        loss = lm
        aux = getattr(out, "aux_loss", None)
        if aux is not None and cfg.aux_loss_coef > 0:
            loss = lm + cfg.aux_loss_coef * aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append((step, lm.item()))
        if progress and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{lm.item():.3f}")
    return curve


# ---------------------------------------------------------------- fine-tuning


@dataclass
class FinetuneConfig:
    """One fine-tuning run: the method, the optimisation and the DR-LoRA hyperparameters.

    ``method``: ``"drlora"`` (variable-rank kernels), ``"lora"`` (uniform rank
    ``r_target``, no growth, same budget) or ``"masked"`` (DR-LoRA computed the
    paper's way: all ``r_max`` ranks, masked).
    """

    method: str = "drlora"
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 2e-3
    warmup: int = 10
    weight_decay: float = 0.0
    eval_interval: int = 25
    eval_batch_size: int = 16
    seed: int = 0
    drlora: DRLoRAConfig = field(default_factory=DRLoRAConfig)
    # "adamw": torch.optim.AdamW (grown slots' moments reset, step count shared per tensor)
    optimizer: str = "rank_aware_adamw"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("steps", "batch_size", "seq_len", "eval_interval", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def method_config(self) -> DRLoRAConfig:
        """The DR-LoRA config this method runs with (LoRA: ``r_init = r_max = r_target``, no growth)."""
        cfg = self.drlora
        if self.method == "lora":
            return dataclasses.replace(cfg, r_init=cfg.r_target, r_max=cfg.r_target)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["drlora"] = self.method_config().to_dict()
        return d


def _rank_stats(handle) -> dict[str, Any]:
    ranks = [[p.ranks.tolist() for p in layer] for layer in handle.pools]
    flat = torch.tensor([r for layer in ranks for pool in layer for r in pool], dtype=torch.float32)
    return {
        "ranks": ranks,  # [layer][projection][expert]
        "projections": [list(a.projections) for _, a in handle.adapters],
        "mean": flat.mean().item(),
        "std": flat.std(unbiased=False).item(),
        "min": int(flat.min()),
        "max": int(flat.max()),
        "total": int(flat.sum()),
        "per_layer_total": [sum(sum(pool) for pool in layer) for layer in ranks],
    }


def _active_lora_parameters(handle) -> int:
    return sum(
        int(p.ranks.sum()) * (p.in_features + p.out_features)
        for layer in handle.pools
        for p in layer
    )


def make_optimizer(
    handle, params: list[nn.Parameter], cfg: FinetuneConfig
) -> torch.optim.Optimizer:
    """``RankAwareAdamW`` over the trainable parameters (per-slot step counts for grown slots).

    The config's ``new_slot_lr_scale`` / ``new_slot_lr_steps`` (an option beyond the paper)
    go to the optimizer, which applies them from its per-slot step counts.
    """
    from ..optim import RankAwareAdamW

    slots = handle.controller.slot_specs() if handle.controller is not None else None
    drl = cfg.method_config()
    return RankAwareAdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, slots=slots,
        new_slot_lr_scale=drl.new_slot_lr_scale, new_slot_lr_steps=drl.new_slot_lr_steps,
    )  # fmt: skip


def prepare_finetune(model: nn.Module, cfg: FinetuneConfig) -> tuple[Any, torch.optim.Optimizer]:
    """Attach ``cfg.method``'s adapters to ``model`` (in place); return ``(handle, optimizer)``."""
    handle, opt, _ = prepare_training(model, cfg)
    return handle, opt


def prepare_training(
    model: nn.Module, cfg: FinetuneConfig, *, parallel=None
) -> tuple[Any, torch.optim.Optimizer, nn.Module]:
    """:func:`prepare_finetune` that also returns the module to train.

    With ``parallel`` (a :class:`~.distributed.DistributedRun`, under ``torchrun``) the model is
    wrapped (DDP) or sharded (FSDP2) after attaching and before the optimizer is built.
    """
    from ..integrations.transformers import attach_drlora, get_drlora
    from .masked import use_masked_compute

    torch.manual_seed(cfg.seed)
    handle = get_drlora(attach_drlora(model, cfg.method_config(), total_steps=cfg.steps))
    if cfg.method == "masked":
        use_masked_compute(handle.pools)
    train_model = parallel.wrap(model) if parallel is not None else model
    opt = build_optimizer(handle, handle.trainable_parameters(), cfg)
    if parallel is not None and parallel.zero_stage is not None:
        from .distributed import check_optimizer

        check_optimizer(parallel.parallel, cfg.optimizer)
        train_model, opt = parallel.deepspeed_initialize(
            model, opt, micro_batch=cfg.batch_size // parallel.world
        )
    model.train()
    return handle, opt, train_model


def build_optimizer(
    handle, params: list[nn.Parameter], cfg: FinetuneConfig
) -> torch.optim.Optimizer:
    """``cfg.optimizer``'s optimizer over ``params``: torch ``AdamW`` or :func:`make_optimizer`'s."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return make_optimizer(handle, params, cfg)


def train_step(
    model: nn.Module, controller, opt: torch.optim.Optimizer, batch: torch.Tensor
) -> tuple[torch.Tensor, list]:
    """One optimizer step: loss, backward, DR-LoRA statistics and growth, update. Returns (loss, events).

    A DeepSpeed engine (``--parallel zero1|zero2``) runs the statistics and growth itself,
    inside ``engine.step()`` (:func:`~drlora_kernels.engines.deepspeed.install_deepspeed_hooks`).
    """
    if _is_deepspeed_engine(model):
        seen = len(controller.engine.events)
        loss = lm_loss(model, batch)
        model.backward(loss)
        model.step()
        return loss.detach(), controller.engine.events[seen:]
    loss = lm_loss(model, batch)
    loss.backward()
    controller.update_statistics()
    events = controller.step(opt)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach(), events


def _is_deepspeed_engine(model: nn.Module) -> bool:
    ds = sys.modules.get("deepspeed")
    return ds is not None and isinstance(model, ds.DeepSpeedEngine)


def finetune(
    model: nn.Module,
    train_blocks: torch.Tensor,
    eval_blocks: torch.Tensor,
    cfg: FinetuneConfig,
    *,
    device="cpu",
    progress: bool = True,
    on_attach: Callable[[Any], None] | None = None,
    checkpoint_dir=None,
    checkpoint_every: int = 0,
    parallel=None,
    initial_eval: bool = True,
) -> dict[str, Any]:
    """Attach DR-LoRA to ``model`` (in place), fine-tune it and return the run's record.

    The record holds the train-loss and held-out-loss curves, throughput
    (training tokens per second of wall time, evaluation excluded), peak memory,
    the final rank statistics and the growth events. Under ``torchrun`` (``parallel``, a
    :class:`~.distributed.DistributedRun`) each process trains on its share of every global
    batch and the logged loss is the mean over processes.

    With ``checkpoint_dir``, the loop's whole state is saved there every ``checkpoint_every``
    steps, and a run that finds a checkpoint there continues from it (``.resume``): the same
    result as an uninterrupted run (single process only). ``initial_eval=False`` skips the evaluation of the base
    model at step 0 (the same for every method of a study).
    """
    from . import resume

    if parallel is not None and checkpoint_dir is not None:
        raise ValueError(
            "checkpoint_dir (drlora train --resume / --checkpoint-every) is not supported under "
            "torchrun yet: run single-process, or use the Trainer + DRLoRACallback for resumable "
            "multi-process runs"
        )
    restored = (
        resume.restore_finetune(checkpoint_dir, model, cfg, build_optimizer)
        if checkpoint_dir is not None
        else None
    )
    if restored is None:
        handle, opt, train_model = prepare_training(model, cfg, parallel=parallel)
        state = resume.LoopProgress()
    else:
        handle, opt, state = restored
        train_model = model
        model.train()
    if on_attach is not None:
        on_attach(handle)
    controller = handle.controller

    record: dict[str, Any] = {"method": cfg.method, "config": cfg.to_dict()}
    if restored is not None:
        record["resumed_at_step"] = state.step
    elif initial_eval:
        state.eval_curve.append(
            (0, evaluate(model, eval_blocks, batch_size=cfg.eval_batch_size, device=device))
        )
    batches = train_batches(train_blocks, cfg.batch_size, cfg.steps, cfg.seed)
    bar = _progress(batches, cfg.steps, f"fine-tune {cfg.method:>6}", progress)
    with PeakMemory(device) as mem:
        for step, batch in enumerate(bar):
            if step < state.step:  # trained before the checkpoint: same seeded batches, skipped
                continue
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = cfg.lr * cosine_lr(step, cfg.steps, cfg.warmup)
            batch = batch.to(device)
            local = parallel.local_batch(batch) if parallel is not None else batch
            loss, step_events = train_step(train_model, controller, opt, local)
            if parallel is not None:
                loss = parallel.mean(loss)
            loss_value = loss.item()  # syncs the device, so the timing is complete
            state.step_seconds.append(time.perf_counter() - t0)
            state.train_seconds += state.step_seconds[-1]
            state.tokens += batch.shape[0] * (batch.shape[1] - 1)
            state.train_curve.append((step + 1, loss_value))
            if step_events:
                state.events.append({"step": step + 1, "events": _jsonable(step_events)})
            if (step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.steps:
                state.eval_curve.append(
                    (
                        step + 1,
                        evaluate(model, eval_blocks, batch_size=cfg.eval_batch_size, device=device),
                    )
                )
            state.step = step + 1
            if (
                checkpoint_dir is not None
                and checkpoint_every
                and state.step % checkpoint_every == 0
            ):
                resume.save_finetune(checkpoint_dir, handle, opt, state)
            if progress and hasattr(bar, "set_postfix"):
                held_out = f"{state.eval_curve[-1][1]:.3f}" if state.eval_curve else "-"
                bar.set_postfix(loss=f"{loss_value:.3f}", eval=held_out)
    final = state.eval_curve[-1][1]
    record.update(
        train_curve=state.train_curve,
        eval_curve=state.eval_curve,
        eval_loss=final,
        perplexity=math.exp(final),
        train_seconds=state.train_seconds,
        train_tokens=state.tokens,
        # Median step time: robust to other processes stealing the CPU for a while.
        tokens_per_second=state.tokens / cfg.steps / statistics.median(state.step_seconds),
        tokens_per_second_mean=(
            state.tokens / state.train_seconds if state.train_seconds > 0 else float("nan")
        ),
        peak_memory_bytes=mem.peak_bytes,
        peak_memory_kind=mem.kind,
        rank_stats=_rank_stats(handle),
        active_lora_parameters=_active_lora_parameters(handle),
        growth_events=state.events,
        handle=handle,
    )
    return record


def _jsonable(obj: Any) -> Any:
    """Best-effort conversion of controller events (dataclasses, tensors, tuples) to JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return repr(obj)
