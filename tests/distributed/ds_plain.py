"""Launched by tests/distributed/test_deepspeed.py: ``torchrun --nproc_per_node 2 ds_plain.py STAGE OUT``.

A plain DeepSpeed loop (``engine.backward(loss); engine.step()``) with the controller hooked
into ZeRO's optimizer step. Writes ``OUT/rank<r>.pt`` with, per scenario:

* ``equal``: routers trained from the start (comparable with the single-process reference);
* ``full`` / ``resumed``: routers held during warmup, uninterrupted vs. saved at RESUME_AT
  (``save_drlora`` + DeepSpeed's checkpoint) and resumed in a fresh engine; under ZeRO-3 the
  model is built under ``deepspeed.zero.Init`` (partitioned before DR-LoRA is attached);
* ``errors``: the message of each provoked silent-failure path (None if nothing raised).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed.ds_common import quiet_deepspeed  # noqa: E402

quiet_deepspeed()

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from drlora_kernels.engines.deepspeed import (  # noqa: E402
    DeepSpeedEngine,
    full_shape,
    install_deepspeed_hooks,
)
from drlora_kernels.integrations.checkpoint import load_drlora, save_drlora  # noqa: E402
from drlora_kernels.integrations.transformers import get_drlora  # noqa: E402
from tests.distributed import ds_common as C  # noqa: E402


def start(stage: int, config, zero_init: bool, before_hooks=None):
    """Model (built under ``deepspeed.zero.Init`` for ZeRO-3 when asked), engine, hooks."""
    torch.manual_seed(0)
    ds = C.ds_config(stage)
    if zero_init:  # transformers builds under deepspeed.zero.Init: weights partitioned at once
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds)  # noqa: F841 (transformers holds a weak reference)
        model = C.build_model(config)
        base = [p for n, p in model.named_parameters() if ".drlora." not in n]
        assert all(p.numel() == 0 and hasattr(p, "ds_shape") for p in base), "built partitioned"
    else:
        model = C.build_model(config)
    handle = get_drlora(model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=C.make_optimizer(handle), config=ds)
    if before_hooks is not None:
        before_hooks(engine)
    install_deepspeed_hooks(engine)
    return engine, handle


def train(engine, handle, steps: range, rank: int, routers: list | None = None) -> None:
    for step in steps:
        for micro in range(C.GAS):
            x = C.local_batch(step, micro, rank)
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
        if routers is not None:
            routers.append(snapshot_routers(engine, handle))
        assert handle.controller.global_step == step + 1, "one controller step per optimizer step"


def snapshot_routers(engine, handle) -> tuple[torch.Tensor, float | None]:
    """The routers' values and the L1 norm of their Adam ``exp_avg`` (None before any step)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    ds = handle.controller.engine
    params = [p for _, p in handle.named_router_parameters()]
    values = torch.cat([ds.gather_full(p).reshape(-1) for p in params])
    if engine.global_steps == 0:
        return values, None
    moment = sum(float(safe_get_full_optimizer_state(p, "exp_avg").abs().sum()) for p in params)
    return values, moment


def moments_after_reset(handle) -> dict:
    """``exp_avg``/``exp_avg_sq`` L1 norms of slots 0:2 of expert 1 of one pool before and after
    ``reset_optimizer_slots`` of those slots, and of expert 0's slots 0:2 (not reset) after."""
    from deepspeed.utils import safe_get_full_optimizer_state

    pool = handle.pools[0][0]
    where = {
        "A": (pool.lora_A, (1, slice(0, 2)), (0, slice(0, 2))),
        "B": (pool.lora_B, (1, slice(None), slice(0, 2)), (0, slice(None), slice(0, 2))),
    }

    def norms():
        out = {}
        for name, (param, reset, kept) in where.items():
            for key in ("exp_avg", "exp_avg_sq"):
                state = safe_get_full_optimizer_state(param, key).view(tuple(full_shape(param)))
                out[f"{name}.{key}"] = (
                    float(state[reset].abs().sum()),
                    float(state[kept].abs().sum()),
                )
        return out

    before = norms()
    handle.controller.engine.reset_optimizer_slots(None, pool, [(1, 0, 2)])
    after = norms()
    return {k: (before[k][0], after[k][0], after[k][1]) for k in before}


def result(engine, handle) -> dict:
    out = C.snapshot(handle, gather=handle.controller.engine.gather_full)
    out["engine"] = handle.controller.engine.name
    out["ds_global_steps"] = engine.global_steps
    return out


def provoke(fn) -> str | None:
    try:
        fn()
    except (RuntimeError, TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def main(stage: int, out: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    zero_init = stage == 3
    res: dict = {}

    # 1. routers trainable from the start: the same run as the single-process reference (built
    # outside deepspeed.zero.Init, whose initialisation draws differ; ZeRO-3 partitions it later)
    engine, handle = start(stage, C.drlora_config(freeze_router_during_warmup=False), False)
    train(engine, handle, range(C.STEPS), rank)
    res["equal"] = result(engine, handle)
    # silent-failure path: statistics read after ZeRO consumed the gradients
    res.setdefault("errors", {})["stats_after_step"] = provoke(handle.controller.update_statistics)

    # 2. routers held during warmup; uninterrupted
    config = C.drlora_config()
    engine, handle = start(stage, config, zero_init)
    routers: list = [snapshot_routers(engine, handle)]
    train(engine, handle, range(C.STEPS), rank, routers)
    res["full"] = result(engine, handle)
    res["routers"] = routers
    res["moments"] = moments_after_reset(handle)
    res["warmup"] = handle.controller.warmup_steps

    # 3. the same run interrupted at RESUME_AT, resumed in a fresh model and engine
    ckpt = out / "ckpt"
    engine, handle = start(stage, config, zero_init)
    train(engine, handle, range(C.RESUME_AT), rank)
    save_drlora(handle, ckpt / "drlora")
    engine.save_checkpoint(str(ckpt / "ds"), tag="mid")
    dist.barrier()
    engine, handle = start(stage, config, zero_init)
    engine.load_checkpoint(str(ckpt / "ds"), tag="mid")
    load_drlora(handle, ckpt / "drlora")
    train(engine, handle, range(C.RESUME_AT, C.STEPS), rank)
    res["resumed"] = result(engine, handle)

    # 4. silent-failure path: a growth write reverted during ZeRO's step (its fp32 master values
    # from before the write copied back, as happens to a write that misses the master)
    saved: list = []
    write = DeepSpeedEngine.write_growth

    def write_and_remember(self, pool, expert, old, new, a_rows):
        for p in (pool.lora_A, pool.lora_B):
            if self._fragment(p) is not None:
                saved.append((self, p, self._master(p).clone()))
        write(self, pool, expert, old, new, a_rows)

    def revert_during_step(engine):
        step = engine.optimizer.step

        def reverting_step(*args, **kwargs):
            for ds, p, master in reversed(saved):
                ds._set_master(p, master)
            saved.clear()
            return step(*args, **kwargs)

        engine.optimizer.step = reverting_step

    DeepSpeedEngine.write_growth = write_and_remember
    try:
        engine, handle = start(stage, config, zero_init, before_hooks=revert_during_step)
        res["errors"]["write_reverted"] = provoke(
            lambda: train(engine, handle, range(C.STEPS), rank)
        )
    finally:
        DeepSpeedEngine.write_growth = write

    # 5. silent-failure path: the checkpoint of a partitioned model without the DeepSpeed engine
    if stage == 3:
        from drlora_kernels.engines import LocalEngine

        if hasattr(handle.controller, "bind_engine"):
            handle.controller.bind_engine(LocalEngine())
        else:
            handle.controller.engine = LocalEngine()
        res["errors"]["save_partition"] = provoke(lambda: save_drlora(handle, out / "bad"))
        res["bad_written"] = (out / "bad").exists()

    # 6. RankAwareAdamW inside ZeRO: a clear error, not plain AdamW in disguise
    if stage == 2:
        from drlora_kernels.optim import RankAwareAdamW

        torch.manual_seed(0)
        model = C.build_model(config)
        h = get_drlora(model)
        opt = RankAwareAdamW(h.trainable_parameters(), lr=C.LR, slots=h.controller.slot_specs())
        ds = {**C.ds_config(stage), "zero_allow_untested_optimizer": True}
        eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
        res["errors"]["rank_aware_adamw"] = provoke(lambda: install_deepspeed_hooks(eng))

    torch.save(res, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
