"""DRLoRAController end to end on tiny pools: growth, events, freeze, resets, resume."""

from __future__ import annotations

import io

import pytest
import torch

from drlora_kernels.config import DRLoRAConfig
from drlora_kernels.dynamic import DRLoRAController, growth_seed
from drlora_kernels.ops import route_tokens
from drlora_kernels.optim import RankAwareAdamW
from drlora_kernels.pool import RankPool, kaiming_uniform_rows
from tests.helpers import pool_lora

L, P, E, K, N, R, TOP_K, T = 2, 2, 4, 16, 12, 8, 2, 12
TOTAL = 20
BASE = dict(
    r_init=2, r_target=4, r_max=R, p_grow=0.5, grow_every=3, warmup_steps=2, buffer_steps=2, seed=7
)
EVENTS = [2, 5, 8, 11, 14]  # t_end = 18, (18 - 2) // 3 = 5 events


def make_pools(cfg: DRLoRAConfig, seed: int = 0) -> list[list[RankPool]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        [RankPool(E, K, N, R, cfg.r_init, r_target=cfg.r_target, generator=gen) for _ in range(P)]
        for _ in range(L)
    ]


def all_params(pools):
    return [t for layer in pools for pool in layer for t in (pool.lora_A, pool.lora_B)]


def forward_backward(pools, ctrl, step: int, *, micro_batches: int = 2) -> None:
    """Deterministic data per step (so a resumed run sees the same batches)."""
    gen = torch.Generator().manual_seed(1000 + step)
    for _ in range(micro_batches):
        loss = 0.0
        for l, layer in enumerate(pools):
            w, idx = torch.randn(T, E, generator=gen).softmax(-1).topk(TOP_K, dim=-1)
            ctrl.record_routing(l, idx, w)
            rt = route_tokens(idx, w, E)
            x = torch.randn(T, K, generator=gen)[rt.token_index]
            for pool in layer:
                y = pool_lora(pool, x, rt.offsets)
                loss = loss + (y - torch.randn(y.shape, generator=gen)).square().mean()
        loss.backward()


def train(pools, ctrl, opt, steps, *, on_step=None):
    all_events = []
    for _ in range(steps):
        step = ctrl.global_step
        forward_backward(pools, ctrl, step)
        ctrl.update_statistics()
        if on_step is not None:
            on_step(step, "before")
        events = ctrl.step(opt)
        if on_step is not None:
            on_step(step, "after")
        all_events.append((step, events))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return all_events


def test_training_run_grows_to_budget_at_schedule_steps():
    cfg = DRLoRAConfig(**BASE)
    pools = make_pools(cfg)
    ctrl = DRLoRAController(pools, cfg, TOTAL)
    assert ctrl.schedule.events == EVENTS
    opt = RankAwareAdamW(all_params(pools), lr=1e-2, slots=ctrl.slot_specs())
    x = torch.randn(T, K)
    offsets = torch.tensor([0, 3, 5, 9, T], dtype=torch.int32)
    seen = {}

    def probe(step, when):
        pool = pools[1][0]
        with torch.no_grad():
            seen[when] = pool_lora(pool, x, offsets)
        if when == "after" and step in EVENTS:  # growth never changes the output
            torch.testing.assert_close(seen["after"], seen["before"], rtol=1e-6, atol=1e-7)

    history = train(pools, ctrl, opt, TOTAL, on_step=probe)
    steps_with_events = [s for s, ev in history if ev]
    # Q = ceil(8 * 2 / 5) = 4 per layer and event: the budget is spent after 4 events.
    assert ctrl.schedule.quota == 4
    assert steps_with_events == EVENTS[:4]
    ranks = ctrl.ranks()
    assert (ranks.reshape(L, -1).sum(1) == P * E * cfg.r_target).all()
    assert ranks.max() <= R and ranks.unique().numel() > 1  # not uniform: saliency decided
    # The event log replays to the final ranks and is self-consistent.
    replay = torch.full((L, P, E), cfg.r_init)
    for ev in ctrl.event_log:
        assert ev.module == ev.pool * E + ev.expert and ev.step in EVENTS
        assert replay[ev.layer, ev.pool, ev.expert] == ev.old_rank < ev.new_rank
        replay[ev.layer, ev.pool, ev.expert] = ev.new_rank
    assert torch.equal(replay, ranks.long())
    assert ctrl.rank_summary()["mean"] == cfg.r_target


def test_new_slots_are_seeded_draws_and_state_is_reset():
    cfg = DRLoRAConfig(**BASE)
    pools = make_pools(cfg)
    ctrl = DRLoRAController(pools, cfg, TOTAL)
    opt = torch.optim.AdamW(all_params(pools), lr=1e-2)
    train(pools, ctrl, opt, EVENTS[0])  # up to (not including) the first event
    forward_backward(pools, ctrl, EVENTS[0])
    ctrl.update_statistics()
    events = ctrl.step(opt)
    assert events and all(ev.step == EVENTS[0] for ev in events)
    for ev in events:
        pool = pools[ev.layer][ev.pool]
        gen = torch.Generator().manual_seed(growth_seed(cfg.seed, ev.layer, ev.module, 0))
        expected = kaiming_uniform_rows(ev.new_rank - ev.old_rank, K, gen, torch.float32, "cpu")
        assert torch.equal(pool.lora_A[ev.expert, ev.old_rank : ev.new_rank], expected)
        assert (pool.lora_B[ev.expert, :, ev.old_rank : ev.new_rank] == 0).all()
        for param, sl in ((pool.lora_A, (ev.expert, slice(ev.old_rank, ev.new_rank))),
                          (pool.lora_B, (ev.expert, slice(None), slice(ev.old_rank, ev.new_rank)))):  # fmt: skip
            st = opt.state[param]
            assert (st["exp_avg"][sl] == 0).all() and (st["exp_avg_sq"][sl] == 0).all()


@pytest.mark.parametrize("reset", ["grown", "all"])
def test_importance_reset_modes(reset):
    cfg = DRLoRAConfig(**{**BASE, "reset": reset})
    pools = make_pools(cfg)
    ctrl = DRLoRAController(pools, cfg, TOTAL)
    opt = torch.optim.SGD(all_params(pools), lr=0.1)
    train(pools, ctrl, opt, EVENTS[0])
    forward_backward(pools, ctrl, EVENTS[0])
    ctrl.update_statistics()
    g_before = ctrl.tracker.slot_importance.clone()
    f_before = ctrl.tracker.frequency.clone()
    events = ctrl.step(opt)
    grown = torch.zeros(L, P, E, dtype=torch.bool)
    for ev in events:
        grown[ev.layer, ev.pool, ev.expert] = True
    g = ctrl.tracker.slot_importance
    assert (g[grown] == 0).all()
    if reset == "grown":
        assert torch.equal(g[~grown], g_before[~grown]) and (g[~grown] > 0).any()
    else:
        assert (g == 0).all()
    assert torch.equal(ctrl.tracker.frequency, f_before)  # f is never reset


def run_with_optional_resume(split_at: int | None, allocation: str = "per_layer"):
    cfg = DRLoRAConfig(**{**BASE, "allocation": allocation})
    pools = make_pools(cfg)
    ctrl = DRLoRAController(pools, cfg, TOTAL)
    opt = RankAwareAdamW(all_params(pools), lr=1e-2, slots=ctrl.slot_specs())
    if split_at is None:
        train(pools, ctrl, opt, TOTAL)
        return pools, ctrl
    train(pools, ctrl, opt, split_at)
    buf = io.BytesIO()
    torch.save(
        {
            "model": [[p.state_dict() for p in layer] for layer in pools],
            "ctrl": ctrl.state_dict(),
            "opt": opt.state_dict(),
        },
        buf,
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    pools2 = make_pools(cfg, seed=99)  # different init: everything must come from the checkpoint
    for layer, states in zip(pools2, ckpt["model"]):
        for pool, state in zip(layer, states):
            pool.load_state_dict(state)
    ctrl2 = DRLoRAController(pools2, cfg, TOTAL)
    ctrl2.load_state_dict(ckpt["ctrl"])
    opt2 = RankAwareAdamW(all_params(pools2), lr=1e-2, slots=ctrl2.slot_specs())
    opt2.load_state_dict(ckpt["opt"])
    assert ctrl2.global_step == split_at
    train(pools2, ctrl2, opt2, TOTAL - split_at)
    return pools2, ctrl2


@pytest.mark.parametrize("split_at", [7, EVENTS[2]], ids=["between-events", "at-event"])
def test_resume_mid_run_equals_uninterrupted(split_at):
    pools_a, ctrl_a = run_with_optional_resume(None)
    pools_b, ctrl_b = run_with_optional_resume(split_at)
    assert torch.equal(ctrl_a.ranks(), ctrl_b.ranks())
    assert ctrl_a.event_log == ctrl_b.event_log
    assert ctrl_a.decision_hash() == ctrl_b.decision_hash()
    for a, b in zip(all_params(pools_a), all_params(pools_b)):
        assert torch.equal(a, b)


def test_global_allocation_meets_total_budget():
    pools, ctrl = run_with_optional_resume(None, allocation="global")
    assert int(ctrl.ranks().sum()) == L * P * E * 4
    assert ctrl.event_log


def test_uniform_baseline_never_grows():
    cfg = DRLoRAConfig(r_init=4, r_target=4, r_max=R)
    pools = make_pools(cfg)
    ctrl = DRLoRAController(pools, cfg, total_steps=5)  # far too short for events: must not raise
    opt = torch.optim.AdamW(all_params(pools), lr=1e-2)
    history = train(pools, ctrl, opt, 5)
    assert all(not ev for _, ev in history) and ctrl.event_log == []
    assert (ctrl.ranks() == 4).all()


@pytest.mark.parametrize("freeze", [True, False])
def test_router_in_optimizer_from_start_still_during_warmup_then_trains(freeze):
    """SPEC: the router is in the optimizer from the start, gets no update before warmup_steps
    (not even weight decay), then trains; ``requires_grad`` never changes (DDP, optimizers)."""
    cfg = DRLoRAConfig(**{**BASE, "warmup_steps": 3, "freeze_router_during_warmup": freeze})
    router = torch.nn.Linear(K, E)
    router.requires_grad_(False)  # attach froze the base model: the controller makes it trainable
    ctrl = DRLoRAController(make_pools(cfg), cfg, TOTAL, router_parameters=router.parameters())
    # built right after the controller, as a user would: the router must be in it
    opt = torch.optim.AdamW(router.parameters(), lr=0.1, weight_decay=0.5)
    assert all(p.requires_grad for p in router.parameters())
    moved = []
    for _ in range(5):
        before = router.weight.detach().clone()
        router(torch.randn(4, K)).square().sum().backward()
        frozen = ctrl.router_frozen
        ctrl.step(opt)
        opt.step()
        opt.zero_grad()
        moved.append((frozen, not torch.equal(before, router.weight)))
        assert all(p.requires_grad for p in router.parameters())
    if freeze:
        assert moved == [(True, False)] * 3 + [(False, True)] * 2
    else:
        assert moved == [(False, True)] * 5


def test_decision_hash_tracks_decisions():
    a = run_with_optional_resume(None)[1]
    cfg = DRLoRAConfig(**{**BASE, "seed": 8})
    pools = make_pools(cfg)
    ctrl = DRLoRAController(pools, cfg, TOTAL)
    assert ctrl.decision_hash() != a.decision_hash()
    ctrl.load_state_dict(a.state_dict())
    assert ctrl.decision_hash() == a.decision_hash()
    ctrl.check_consistency()  # single process: a no-op


def test_invalid_construction_and_state():
    cfg = DRLoRAConfig(**BASE)
    pools = make_pools(cfg)
    with pytest.raises(ValueError, match="r_max"):
        DRLoRAController([[RankPool(E, K, N, R + 1, 2)]], cfg, TOTAL)
    with pytest.raises(ValueError, match="experts"):
        DRLoRAController([[pools[0][0], RankPool(E + 1, K, N, R, 2)]], cfg, TOTAL)
    with pytest.raises(ValueError, match="pools"):
        DRLoRAController([pools[0], pools[1][:1]], cfg, TOTAL)
    with pytest.raises(TypeError, match="RankPool"):
        DRLoRAController([[torch.nn.Linear(2, 2)]], cfg, TOTAL)
    with pytest.raises(ValueError, match="no growth event fits"):
        DRLoRAController(pools, cfg, total_steps=4)
    state = DRLoRAController(pools, cfg, TOTAL).state_dict()
    with pytest.raises(ValueError, match="schedule"):
        DRLoRAController(pools, cfg, TOTAL + 10).load_state_dict(state)
