"""GrowthSchedule: the paper's arithmetic, budget invariants, tie-breaking, validation."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from drlora_kernels.config import DRLoRAConfig
from drlora_kernels.scheduler import GrowthSchedule

OLMOE = dict(total_steps=37_997, num_modules=128, r_init=32, r_target=64, r_max=128)


def simulate(schedule: GrowthSchedule, num_layers: int, seed: int = 0) -> tuple[torch.Tensor, list]:
    """Run every event with random saliencies; returns final ranks and (step, ranks) after each event."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.full((num_layers, schedule.num_modules), schedule.r_init, dtype=torch.int64)
    history = []
    for k, step in enumerate(schedule.events):
        sal = torch.rand(num_layers, schedule.num_modules, generator=gen, dtype=torch.float64)
        grants = schedule.allocate(sal, ranks, last_event=k == schedule.num_events - 1)
        ranks = ranks + grants
        history.append((step, ranks.clone(), grants))
    return ranks, history


def test_olmoe_schedule_arithmetic():
    s = GrowthSchedule(**OLMOE)
    assert s.warmup_steps == 1140
    assert s.num_events == 183
    assert s.quota == 23
    assert s.cap == 9
    assert s.events[0] == 1140 and s.events[-1] == 1140 + 182 * 200
    assert s.events[-1] <= 37_997 - 200


def test_olmoe_mean_rank_trajectory():
    s = GrowthSchedule(**OLMOE)
    final, history = simulate(s, num_layers=2)
    expected = {6000: 36.49, 12000: 41.88, 18000: 47.27, 24000: 52.66, 30000: 58.05}
    for t, mean in expected.items():
        ranks = [r for step, r, _ in history if step <= t][-1]
        assert float(ranks.double().mean()) == pytest.approx(mean, abs=0.01), t
    assert float(final.double().mean()) == 64.0
    assert (final.sum(dim=1) == 128 * 64).all()


def test_olmoe_from_config_matches():
    cfg = DRLoRAConfig(r_init=32, r_target=64, r_max=128)
    s = GrowthSchedule.from_config(cfg, 37_997, 128)
    assert (s.num_events, s.quota, s.cap, s.warmup_steps) == (183, 23, 9, 1140)


@pytest.mark.parametrize("allocation", ["per_layer", "global"])
@pytest.mark.parametrize(
    "total,M,r_init,r_target,r_max,p_grow",
    [
        (3000, 16, 4, 8, 16, 0.1),
        (2500, 12, 2, 8, 16, 0.25),
        (5000, 8, 0, 6, 7, 1.0),
        (500, 4, 2, 8, 16, 0.1),  # M * cap < Q: only the lifted last event can close the gap
    ],
)
def test_budget_invariants(allocation, total, M, r_init, r_target, r_max, p_grow):
    with (
        pytest.warns(UserWarning)
        if math.floor((r_max - r_init) * p_grow) == 0
        else contextlib.nullcontext()
    ):
        s = GrowthSchedule(
            total,
            M,
            r_init,
            r_target,
            r_max,
            grow_every=100,
            buffer_steps=100,
            p_grow=p_grow,
            allocation=allocation,
        )
    if (total, M) == (500, 4):
        assert M * s.cap < s.quota
    L = 3
    final, history = simulate(s, num_layers=L, seed=1)
    for k, (_, ranks, grants) in enumerate(history):
        assert (grants >= 0).all()
        assert (ranks <= r_max).all()
        if allocation == "per_layer":
            assert (ranks.sum(dim=1) <= M * r_target).all()
            if k < s.num_events - 1:
                assert (grants <= s.cap).all()
                assert (grants.sum(dim=1) <= s.quota).all()
        else:
            assert ranks.sum() <= L * M * r_target
            if k < s.num_events - 1:
                assert (grants <= s.cap).all()
                assert grants.sum() <= L * s.quota
    if allocation == "per_layer":
        assert (final.sum(dim=1) == M * r_target).all()
    else:
        assert final.sum() == L * M * r_target
    again, _ = simulate(s, num_layers=L, seed=1)
    assert torch.equal(final, again)


def test_greedy_walk_and_tie_break():
    s = GrowthSchedule(
        10_000, 6, 2, 4, 16, warmup_steps=0, grow_every=1000, buffer_steps=0, p_grow=0.25
    )
    # Q = ceil(6 * 2 / 10) = 2, cap = floor(14 * 0.25) = 3
    assert (s.quota, s.cap) == (2, 3)
    ranks = torch.full((1, 6), 2)
    sal = torch.tensor([[0.1, 0.5, 0.5, 0.9, 0.0, 0.5]])
    assert s.allocate(sal, ranks, last_event=False).tolist() == [[0, 0, 0, 2, 0, 0]]
    s2 = GrowthSchedule(
        10_000, 6, 2, 6, 16, warmup_steps=0, grow_every=1000, buffer_steps=0, p_grow=0.25
    )
    assert (s2.quota, s2.cap) == (3, 3)
    # Module 3 first (cap 3 takes the whole quota)...
    assert s2.allocate(sal, ranks, last_event=False).tolist() == [[0, 0, 0, 3, 0, 0]]
    # ... unless it is near r_max; then the tie 1, 2, 5 is broken by index.
    ranks = torch.tensor([[2, 2, 2, 15, 2, 2]])
    assert s2.allocate(sal, ranks, last_event=False).tolist() == [[0, 2, 0, 1, 0, 0]]


def test_last_event_lifts_cap_and_quota():
    s = GrowthSchedule(
        10_000, 4, 2, 8, 16, warmup_steps=0, grow_every=1000, buffer_steps=0, p_grow=0.1
    )
    assert s.cap == 1
    ranks = torch.tensor([[2, 3, 2, 4]])
    sal = torch.tensor([[0.3, 0.2, 0.9, 0.1]])
    g = s.allocate(sal, ranks, last_event=True)
    assert int((ranks + g).sum()) == 32
    # Highest saliency first, each up to r_max.
    assert g.tolist() == [[7, 0, 14, 0]]


def test_global_allocation_uses_one_pool():
    s = GrowthSchedule(
        10_000,
        3,
        2,
        4,
        16,
        warmup_steps=0,
        grow_every=1000,
        buffer_steps=0,
        p_grow=0.5,
        allocation="global",
    )
    # Q = ceil(3 * 2 / 10) = 1 per layer, so L * Q = 2 over both layers; cap = 7.
    sal = torch.tensor([[0.1, 0.2, 0.3], [0.9, 0.8, 0.0]])
    g = s.allocate(sal, torch.full((2, 3), 2), last_event=False)
    assert g.tolist() == [[0, 0, 0], [2, 0, 0]]


def test_uniform_schedule_has_no_events():
    s = GrowthSchedule(100, 8, 16, 16, 32)
    assert s.events == [] and s.quota == 0
    s = GrowthSchedule(5, 8, 16, 16, 16, buffer_steps=200)  # no event would fit, but none is needed
    assert s.events == []


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r_init=8, r_target=4, r_max=16), "r_init"),
        (dict(r_init=4, r_target=32, r_max=16), "r_target"),
        (dict(total_steps=300), "no growth event fits"),
        (dict(total_steps=1000, warmup_steps=900), "no growth event fits"),
        (dict(p_grow=0.0), "p_grow"),
        (dict(allocation="random"), "allocation"),
        (dict(reset="none"), "reset"),
        (dict(num_modules=0), "num_modules"),
    ],
)
def test_invalid_settings(kwargs, match):
    base = dict(total_steps=3000, num_modules=8, r_init=4, r_target=8, r_max=16)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        GrowthSchedule(**base)


def test_allocate_rejects_bad_input():
    s = GrowthSchedule(3000, 4, 2, 4, 8, p_grow=0.5)
    ok = torch.full((1, 4), 2)
    with pytest.raises(ValueError, match="saliency"):
        s.allocate(torch.rand(1, 5), ok, last_event=False)
    with pytest.raises(ValueError, match="finite"):
        s.allocate(torch.tensor([[float("nan"), 0, 0, 0]]), ok, last_event=False)
    with pytest.raises(ValueError, match="budget"):
        s.allocate(torch.rand(1, 4), torch.full((1, 4), 5), last_event=False)
    with pytest.raises(ValueError, match="r_max"):
        s.allocate(torch.rand(1, 4), torch.tensor([[9, 0, 0, 0]]), last_event=False)
    with pytest.raises(TypeError, match="ranks"):
        s.allocate(torch.rand(1, 4), ok.float(), last_event=False)


# ---------------------------------------------------------------- grow_until (beyond the paper)

SHORT = dict(total_steps=200, num_modules=16, r_init=4, r_target=8, r_max=16)
SHORT_KW = dict(warmup_steps=10, grow_every=20, buffer_steps=20, p_grow=0.25)


def test_grow_until_spaces_the_papers_events_to_fit():
    paper = GrowthSchedule(**SHORT, **SHORT_KW)
    assert paper.events == [10, 30, 50, 70, 90, 110, 130, 150] and paper.quota == 8
    s = GrowthSchedule(**SHORT, **SHORT_KW, grow_until=45)
    assert s.grow_until == 45
    assert s.events == [10, 15, 20, 25, 30, 35, 40, 45]  # 8 events, (45 - 10) / 7 = 5 apart
    assert s.quota == paper.quota and s.cap == paper.cap
    # A fraction of total_steps: step round(0.25 * 200) = 50; floor(k * 40 / 7) after step 10.
    f = GrowthSchedule(**SHORT, **SHORT_KW, grow_until=0.25)
    assert f.grow_until == 50
    assert f.events == [10, 15, 21, 27, 32, 38, 44, 50]


def test_grow_until_with_fewer_steps_than_events_grows_every_step():
    s = GrowthSchedule(**SHORT, **SHORT_KW, grow_until=13)
    assert s.events == [10, 11, 12, 13]
    assert s.quota == math.ceil(16 * 4 / 4)
    one = GrowthSchedule(**SHORT, **SHORT_KW, grow_until=10)
    assert one.events == [10] and one.quota == 64


@pytest.mark.parametrize("until", [12, 45, 0.5, 179, 1 / 3])
def test_grow_until_allocates_the_whole_budget_by_then(until):
    s = GrowthSchedule(**SHORT, **SHORT_KW, grow_until=until)
    final, history = simulate(s, num_layers=2, seed=3)
    assert history[-1][0] == s.grow_until and all(step <= s.grow_until for step, _, _ in history)
    assert (final.sum(dim=1) == 16 * 8).all()
    steps = [step for step, _, _ in history]
    assert steps == sorted(set(steps))  # distinct, increasing


def test_grow_until_from_config_and_uniform():
    cfg = DRLoRAConfig(r_init=4, r_target=8, r_max=16, grow_until=0.25, **SHORT_KW)
    s = GrowthSchedule.from_config(cfg, 200, 16)
    assert s.events[-1] == 50 and "grow_until=50" in repr(s)
    assert GrowthSchedule(200, 16, 8, 8, 16, grow_until=5).events == []  # nothing to grow


@pytest.mark.parametrize(
    "until,error,match",
    [
        (5, ValueError, "warmup_steps=10"),  # before growth starts
        (180, ValueError, "buffer"),  # t_end = 180: inside the buffer
        (0.95, ValueError, "buffer"),
        (0, ValueError, "grow_until"),
        (1.5, ValueError, "grow_until"),
        (-0.1, ValueError, "grow_until"),
        (True, TypeError, "grow_until"),
        ("50", TypeError, "grow_until"),
    ],
)
def test_grow_until_rejects(until, error, match):
    with pytest.raises(error, match=match):
        GrowthSchedule(**SHORT, **SHORT_KW, grow_until=until)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(total_steps=300.0), TypeError),
        (dict(r_init=4.0), TypeError),
        (dict(grow_every=True), TypeError),
        (dict(buffer_steps=-1), ValueError),
        (dict(warmup_steps=-1), ValueError),
        (dict(p_grow=float("nan")), ValueError),
    ],
)
def test_invalid_types_and_ranges(kwargs, error):
    base = dict(total_steps=3000, num_modules=8, r_init=4, r_target=8, r_max=16)
    base.update(kwargs)
    with pytest.raises(error, match=next(iter(kwargs))):
        GrowthSchedule(**base)


@pytest.mark.parametrize("total", [200, 600, 3000, 37_997])
def test_paper_proportions_give_ten_events_and_a_tenth_buffer(total):
    from drlora_kernels.scheduler import paper_proportions

    p = paper_proportions(total)
    assert p["warmup_steps"] == round(0.03 * total) and p["buffer_steps"] == p["grow_every"]
    s = GrowthSchedule(total, 16, 4, 8, 16, p_grow=0.25, **p)
    assert s.num_events == 10
    assert s.events[-1] + p["grow_every"] <= s.t_end  # the last event one spacing before the buffer
    with pytest.raises(ValueError, match="too few"):
        paper_proportions(10)
