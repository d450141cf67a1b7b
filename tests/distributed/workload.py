"""One small DR-LoRA fine-tuning run in a plain user loop, the same under every engine.

``run(parallel=...)`` trains a tiny random OLMoE with DR-LoRA for a few optimizer steps over
fixed GLOBAL batches: one process takes the whole batch, each of ``world`` processes its
``1/world`` rows (DDP averages the gradients, FSDP2 reduce-scatters them), so every engine
should end with the same ranks, the same growth decisions and (within float tolerance) the
same LoRA weights. It returns what the tests compare, gathered to full tensors on every
process. Under ``torch.distributed`` it must be called on every process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from drlora_kernels.integrations import attach_drlora, get_drlora, load_drlora, save_drlora
from tests.integrations.tiny_models import build, small_config

STEPS = 8
GLOBAL_BATCH = 4
SEQ = 8
VOCAB = 128
# events at steps 2, 4 and 6 (the last one spends the remaining budget)
CONFIG = dict(grow_every=2, warmup_steps=2, buffer_steps=1, p_grow=0.5, seed=5)
PLACEMENTS = ("dim0", "dim1", "dim2", "hsdp")


def global_batches(steps: int = STEPS, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen) for _ in range(steps)]


def world_and_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def local_rows(batch: torch.Tensor) -> torch.Tensor:
    """This process's contiguous share of a global batch."""
    world, rank = world_and_rank()
    per = batch.shape[0] // world
    return batch[rank * per : (rank + 1) * per]


def build_attached(
    num_experts: int = 8, total_steps: int = STEPS, checkpointing: str | None = None
) -> torch.nn.Module:
    """The tiny OLMoE with DR-LoRA attached (``checkpointing``: ``"reentrant"`` / ``"non-reentrant"``
    gradient checkpointing of the decoder layers)."""
    model = build("olmoe", num_experts=num_experts)
    model = attach_drlora(model, small_config(**CONFIG), total_steps=total_steps)
    if checkpointing is not None:
        reentrant = checkpointing == "reentrant"
        model.activation_checkpointing_enable({"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()  # frozen embeddings: give the blocks an input with grad
    return model.train()


_POOL_DIM = {"dim0": 0, "dim1": 1, "dim2": 2, "hsdp": 0}


def shard_fsdp2(model: torch.nn.Module, placement: str = "dim0") -> torch.nn.Module:
    """``fully_shard`` every decoder layer, then the root; pools placed as ``placement`` says.

    ``dim0``: whole experts per process (FSDP2's default); ``dim1``: ``A`` split on the slot
    dim, ``B`` on its output dim; ``dim2``: ``A`` split on its input dim, ``B`` on the slot
    dim; ``hsdp``: a 2-D mesh (replicate over every process, shard over one).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    world, _ = world_and_rank()
    mesh = None
    if placement == "hsdp":
        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    pool_params = {
        id(t) for layer in get_drlora(model).pools for p in layer for t in (p.lora_A, p.lora_B)
    }

    def placement_fn(param):
        return Shard(_POOL_DIM[placement] if id(param) in pool_params else 0)

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, shard_placement_fn=placement_fn)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement_fn)
    return model


def wrap(model: torch.nn.Module, parallel: str, placement: str = "dim0"):
    """``(model to call, model that holds the adapter)`` for ``parallel`` in none/ddp/fsdp2
    (``unsynchronised``: several processes, no gradient synchronisation: a user error)."""
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, find_unused_parameters=False), model
    if parallel == "fsdp2":
        return shard_fsdp2(model, placement), model
    return model, model


def attach_after_sharding() -> None:
    """The wrong order: ``fully_shard`` first, then ``attach_drlora`` (must raise)."""
    from torch.distributed.fsdp import fully_shard

    model = build("olmoe")
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    attach_drlora(model, small_config(**CONFIG), total_steps=STEPS)


def run_partly_sharded() -> None:
    """Only the first decoder layer sharded: its pools are DTensors, the others plain (must raise)."""
    from torch.distributed.fsdp import fully_shard

    model = build_attached()
    fully_shard(model.model.layers[0])
    train_steps(model, model, optimizer_for(model), global_batches(1))


def run_bound_too_early() -> None:
    """The local engine bound explicitly, then the model sharded (must raise)."""
    from drlora_kernels.engines import LocalEngine

    model = build_attached()
    get_drlora(model).controller.bind_engine(LocalEngine())
    shard_fsdp2(model)
    train_steps(model, model, optimizer_for(model), global_batches(1))


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def optimizer_for(model: torch.nn.Module, kind: str = "adamw", lr: float = 1e-2):
    """``torch.optim.AdamW`` or ``RankAwareAdamW`` over the pools and routers (build it AFTER
    wrapping: ``fully_shard`` replaces the parameters)."""
    handle = get_drlora(model)
    if kind == "rank_aware":
        from drlora_kernels.optim import RankAwareAdamW

        slots = handle.controller.slot_specs()
        return RankAwareAdamW(handle.trainable_parameters(), lr=lr, slots=slots)
    return torch.optim.AdamW(handle.trainable_parameters(), lr=lr)


def train_steps(call_model, model, opt, batches, *, accumulation: int = 1) -> list[dict]:
    """Optimizer steps over ``batches`` (global), ``accumulation`` micro-batches each.

    Returns per step: the importance EMA's total after the statistics update and the
    routers' full values after the optimizer step.
    """
    handle = get_drlora(model)
    ctrl = handle.controller
    log = []
    for batch in batches:
        rows = local_rows(batch)
        for micro in rows.chunk(accumulation):
            (lm_loss(call_model, micro) / accumulation).backward()
        ctrl.update_statistics()
        importance = float(ctrl.tracker.slot_importance.abs().sum())
        ctrl.step(opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        routers = [ctrl.engine.gather_full(p) for p in handle.router_parameters]
        log.append({"importance": importance, "routers": routers})
    return log


def snapshot(model) -> dict[str, Any]:
    """Full values (gathered through the engine) of everything the tests compare."""
    handle = get_drlora(model)
    ctrl = handle.controller
    engine = ctrl.engine
    return {
        "engine": engine.name,
        "ranks": ctrl.ranks().cpu().clone(),
        "events": [ev.to_dict() for ev in ctrl.event_log],
        "decision_hash": ctrl.decision_hash(),
        "step": ctrl.global_step,
        "pools": {
            name: (engine.gather_full(p.lora_A), engine.gather_full(p.lora_B))
            for name, p in handle.named_pools()
        },
        "routers": {name: engine.gather_full(p) for name, p in handle.named_router_parameters()},
        "frequency": ctrl.tracker.frequency.clone(),
        "slot_importance": ctrl.tracker.slot_importance.clone(),
    }


def run(
    parallel: str = "none",
    *,
    placement: str = "dim0",
    num_experts: int = 8,
    accumulation: int = 1,
    checkpointing: str | None = None,
    optimizer: str = "adamw",
    save_dir: str | Path | None = None,
    save_at: int | None = None,
) -> dict[str, Any]:
    """Train ``STEPS`` steps; with ``save_dir``/``save_at`` also save there after step ``save_at``
    (adapter via save_drlora, optimizer via torch DCP) and add ``"resumed"``: a fresh model
    loaded from it and trained to the end."""
    batches = global_batches()
    model = build_attached(num_experts, checkpointing=checkpointing)
    call_model, model = wrap(model, parallel, placement)
    opt = optimizer_for(model, optimizer)
    if save_at is None:
        log = train_steps(call_model, model, opt, batches, accumulation=accumulation)
        return {**snapshot(model), "log": log}
    log = train_steps(call_model, model, opt, batches[:save_at], accumulation=accumulation)
    save_drlora(model, Path(save_dir) / "drlora")
    _save_optimizer(call_model, opt, Path(save_dir) / "optim")
    log += train_steps(call_model, model, opt, batches[save_at:], accumulation=accumulation)
    result = {**snapshot(model), "log": log}

    fresh = build("olmoe", num_experts=num_experts)
    load_drlora(fresh, Path(save_dir) / "drlora")  # attaches with the saved config and state
    fresh.train()
    call_fresh, fresh = wrap(fresh, parallel, placement)
    opt2 = optimizer_for(fresh, optimizer)
    _load_optimizer(call_fresh, opt2, Path(save_dir) / "optim")
    train_steps(call_fresh, fresh, opt2, batches[save_at:], accumulation=accumulation)
    result["resumed"] = snapshot(fresh)
    return result


def _save_optimizer(call_model, opt, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optim": get_optimizer_state_dict(call_model, opt)}, checkpoint_id=str(path))


def _load_optimizer(call_model, opt, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    state = {"optim": get_optimizer_state_dict(call_model, opt)}  # the structure DCP fills in
    dcp.load(state, checkpoint_id=str(path))
    set_optimizer_state_dict(call_model, opt, state["optim"])


# ----------------------------------------------------------------------------- comparisons
def decisions(result: dict) -> list[tuple]:
    return [
        (e["step"], e["layer"], e["module"], e["old_rank"], e["new_rank"]) for e in result["events"]
    ]


def assert_identical(a: dict, b: dict) -> None:
    """Two processes' views of the same run: bit for bit."""
    assert a["events"] == b["events"] and a["decision_hash"] == b["decision_hash"]
    assert torch.equal(a["ranks"], b["ranks"]) and a["step"] == b["step"]
    for name in a["pools"]:
        for x, y in zip(a["pools"][name], b["pools"][name]):
            assert torch.equal(x, y), name
    for name in a["routers"]:
        assert torch.equal(a["routers"][name], b["routers"][name]), name
    assert torch.equal(a["slot_importance"], b["slot_importance"])
    assert torch.equal(a["frequency"], b["frequency"])


def assert_same_run(got: dict, ref: dict, *, rtol: float = 1e-3, atol: float = 1e-4) -> None:
    """The same training run computed another way: same decisions, weights within tolerance."""
    assert got["step"] == ref["step"] == STEPS
    assert decisions(got) == decisions(ref) and len(decisions(ref)) > 0
    assert len({e["step"] for e in ref["events"]}) >= 2  # several growth events
    torch.testing.assert_close(
        torch.tensor([e["saliency"] for e in got["events"]]),
        torch.tensor([e["saliency"] for e in ref["events"]]),
        rtol=1e-3,
        atol=1e-12,
    )
    assert torch.equal(got["ranks"], ref["ranks"])
    for name in ref["pools"]:
        for x, y in zip(got["pools"][name], ref["pools"][name]):
            torch.testing.assert_close(
                x, y, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
            )
    for name in ref["routers"]:
        torch.testing.assert_close(got["routers"][name], ref["routers"][name], rtol=rtol, atol=atol)
    torch.testing.assert_close(got["frequency"], ref["frequency"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        got["slot_importance"], ref["slot_importance"], rtol=1e-3, atol=1e-12
    )
    # importance is real: non-zero once B has left zero (from the second step on)
    assert float(got["slot_importance"].abs().sum()) > 0
    assert all(entry["importance"] > 0 for entry in got["log"][1:])
