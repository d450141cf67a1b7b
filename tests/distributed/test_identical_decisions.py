"""Two CPU processes (gloo) with different data make identical growth decisions."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from drlora_kernels.config import DRLoRAConfig
from drlora_kernels.dynamic import DRLoRAController
from drlora_kernels.ops import route_tokens
from drlora_kernels.pool import RankPool
from drlora_kernels.saliency import slot_scores
from tests.helpers import pool_lora

WORLD = 2
L, P, E, K, N, R, TOP_K, T = 2, 2, 4, 16, 12, 8, 2, 10
TOTAL = 14
CFG = dict(
    r_init=2, r_target=4, r_max=R, p_grow=0.5, grow_every=3, warmup_steps=2, buffer_steps=2, seed=3
)


def _pools(cfg: DRLoRAConfig) -> list[list[RankPool]]:
    gen = torch.Generator().manual_seed(0)  # same initial pools on every process
    return [
        [RankPool(E, K, N, R, cfg.r_init, r_target=cfg.r_target, generator=gen) for _ in range(P)]
        for _ in range(L)
    ]


def _forward_backward(pools, ctrl, gen) -> None:
    loss = 0.0
    for l, layer in enumerate(pools):
        # Skewed, process-specific routing so the local frequencies really differ.
        logits = torch.randn(T, E, generator=gen) + torch.linspace(0, 2, E) * (
            1 if dist.get_rank() else -1
        )
        w, idx = logits.softmax(-1).topk(TOP_K, dim=-1)
        ctrl.record_routing(l, idx, w)
        rt = route_tokens(idx, w, E)
        x = torch.randn(T, K, generator=gen)[rt.token_index]
        for pool in layer:
            y = pool_lora(pool, x, rt.offsets)
            loss = loss + (y - torch.randn(y.shape, generator=gen)).square().mean()
    loss.backward()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        cfg = DRLoRAConfig(**CFG)
        pools = _pools(cfg)
        params = [t for layer in pools for pool in layer for t in (pool.lora_A, pool.lora_B)]
        ctrl = DRLoRAController(pools, cfg, TOTAL)
        opt = torch.optim.SGD(params, lr=0.05)
        gen = torch.Generator().manual_seed(100 + rank)  # different data on each process
        local_route, local_scores = None, None
        for step in range(TOTAL):
            _forward_backward(pools, ctrl, gen)
            if step == 1:  # what each process saw before the all-reduce (B != 0 from step 1)
                local_route = ctrl.tracker.pending_routing()[0].clone()
                local_scores = torch.stack(
                    [torch.stack([slot_scores(p) for p in layer]) for layer in pools]
                )
            ctrl.update_statistics()
            ctrl.step(opt)
            for p in params:  # DDP-like gradient averaging, after the statistics saw local grads
                dist.all_reduce(p.grad)
                p.grad /= WORLD
            opt.step()
            opt.zero_grad(set_to_none=True)
        result = {
            "ranks": ctrl.ranks().clone(),
            "events": [ev.to_dict() for ev in ctrl.event_log],
            "hash": ctrl.decision_hash(),
            "f": ctrl.tracker.frequency.clone(),
            "g": ctrl.tracker.slot_importance.clone(),
            "params": [p.detach().clone() for p in params],
            "local_route": local_route,
            "local_scores": local_scores,
        }
        # The debug check must catch a divergence on every process.
        if rank == 1:
            pools[0][0].ranks[0] -= 1
        try:
            ctrl.check_consistency()
            result["mismatch_raised"] = False
        except RuntimeError:
            result["mismatch_raised"] = True
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_make_identical_decisions(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(WORLD))
    # The processes saw different routing and gradients ...
    assert not torch.allclose(r0["local_route"], r1["local_route"])
    assert r0["local_scores"].abs().sum() > 0
    assert not torch.allclose(r0["local_scores"], r1["local_scores"])
    # ... yet hold identical statistics and made identical decisions.
    assert torch.equal(r0["f"], r1["f"]) and torch.equal(r0["g"], r1["g"])
    assert r0["events"] == r1["events"] and len(r0["events"]) > 0
    assert r0["hash"] == r1["hash"]
    assert torch.equal(r0["ranks"], r1["ranks"])
    assert (r0["ranks"].reshape(L, -1).sum(1) == P * E * CFG["r_target"]).all()
    for a, b in zip(r0["params"], r1["params"]):  # identical pools after growth (seeded draws)
        assert torch.equal(a, b)
    assert r0["mismatch_raised"] and r1["mismatch_raised"]
