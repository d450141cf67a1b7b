"""Optimizer state under growth: slot resets and the rank-aware AdamW."""

from __future__ import annotations

import pytest
import torch

from drlora_kernels.optim import (
    RankAwareAdamW,
    SlotSpec,
    pool_slot_specs,
    reset_optimizer_state_for_slots,
)
from drlora_kernels.pool import RankPool

E, K, N, R = 4, 12, 10, 6
HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def make_pool(ranks, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pool = RankPool(E, K, N, R, 2, r_target=4, generator=gen)
    with torch.no_grad():
        pool.lora_B.normal_(generator=gen)
        pool.ranks.copy_(torch.tensor(ranks, dtype=torch.int32))
    return pool


def set_grads(params, gen, masks=None):
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen)
        if masks is not None and masks[i] is not None:
            g = g * masks[i]  # a pool's inactive slots get exactly zero gradient
        p.grad = g


def pool_masks(pool):
    m = pool.active_mask().float()
    return [m[:, :, None], m[:, None, :]]


def test_plain_params_match_torch_adamw_exactly():
    gen = torch.Generator().manual_seed(0)
    ours = [
        torch.nn.Parameter(torch.randn(5, 7, generator=gen)),
        torch.nn.Parameter(torch.randn(3, generator=gen)),
    ]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt, ref_opt = RankAwareAdamW(ours, **HP), torch.optim.AdamW(ref, **HP)
    for _ in range(5):
        set_grads(ours, gen)
        for p, q in zip(ours, ref):
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("ranks", [[R] * E, [0, 3, 6, 1]], ids=["all-active", "partial"])
def test_slots_active_from_start_match_adamw_and_inactive_untouched(ranks):
    pool = make_pool(ranks)
    ref = [
        torch.nn.Parameter(pool.lora_A.detach().clone()),
        torch.nn.Parameter(pool.lora_B.detach().clone()),
    ]
    before = [pool.lora_A.detach().clone(), pool.lora_B.detach().clone()]
    opt = RankAwareAdamW(pool.parameters(), **HP, slots=pool_slot_specs(pool))
    ref_opt = torch.optim.AdamW(ref, **HP)
    gen = torch.Generator().manual_seed(1)
    masks = pool_masks(pool)
    for _ in range(6):
        set_grads([pool.lora_A, pool.lora_B], gen, masks)
        for p, q in zip((pool.lora_A, pool.lora_B), ref):
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for p, q, b, m in zip((pool.lora_A, pool.lora_B), ref, before, masks):
        active = m.expand(p.shape).bool()
        torch.testing.assert_close(p[active], q[active], rtol=2e-6, atol=1e-7)
        # Inactive slots: AdamW would decay them (weight decay); ours leaves them bit-identical.
        assert torch.equal(p[~active], b[~active])
        if (~active).any():
            assert not torch.equal(q[~active], b[~active])
        st = opt.state[p]
        assert (st["exp_avg"][~active] == 0).all() and (st["exp_avg_sq"][~active] == 0).all()
        steps = st["step"].expand(p.shape)
        assert (steps[active] == 6).all() and (steps[~active] == 0).all()


def _late_slot_update(opt_cls, steps: int) -> torch.Tensor:
    """Train slots 0..1 for ``steps`` steps, activate slot 2, reset its state, take one step.

    Returns ``|update| / lr`` of the new slot's ``A`` row of expert 0.
    """
    pool = make_pool([2] * E)
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-12, weight_decay=0.0)
    kwargs = {"slots": pool_slot_specs(pool)} if opt_cls is RankAwareAdamW else {}
    opt = opt_cls(pool.parameters(), **hp, **kwargs)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        set_grads([pool.lora_A, pool.lora_B], gen, pool_masks(pool))
        opt.step()
    grown = pool.grow([0], [1], seeds=[123])
    reset_optimizer_state_for_slots(opt, pool, grown)
    set_grads([pool.lora_A, pool.lora_B], gen, pool_masks(pool))
    before = pool.lora_A[0, 2].detach().clone()
    opt.step()
    return (pool.lora_A[0, 2].detach() - before).abs() / hp["lr"]


def test_late_slot_first_update_is_true_first_step():
    steps = 3000
    stock = _late_slot_update(torch.optim.AdamW, steps)
    ours = _late_slot_update(RankAwareAdamW, steps)
    # Stock AdamW: fresh moments with the bias correction of step 3001:
    # (1 - beta1) / sqrt(1 - beta2) * sqrt(1 - beta2**t) / (1 - beta1**t) ~= 3.08 lr.
    t = steps + 1
    expected = 0.1 / 0.001**0.5 * (1 - 0.999**t) ** 0.5 / (1 - 0.9**t)
    assert expected > 3.0
    torch.testing.assert_close(stock, torch.full_like(stock, expected), rtol=1e-4, atol=0)
    # Rank-aware: a true first Adam step, lr * sign(grad).
    torch.testing.assert_close(ours, torch.ones_like(ours), rtol=1e-5, atol=0)


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.Adam, RankAwareAdamW])
def test_reset_zeroes_exactly_the_new_slots(opt_cls):
    pool = make_pool([2, 3, 0, 5])
    kwargs = {"slots": pool_slot_specs(pool)} if opt_cls is RankAwareAdamW else {}
    opt = opt_cls(pool.parameters(), lr=1e-3, **kwargs)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        set_grads([pool.lora_A, pool.lora_B], gen, pool_masks(pool))
        opt.step()
    for p in (pool.lora_A, pool.lora_B):  # arbitrary non-zero state everywhere (inactive slots too)
        for value in opt.state[p].values():
            if value.dim():
                value.uniform_(1.0, 2.0, generator=gen)
    before = {
        id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in (pool.lora_A, pool.lora_B)
    }
    grown = pool.grow([0, 2], [2, 1], seeds=[1, 2])
    assert grown == [(0, 2, 4), (2, 0, 1)]
    reset_optimizer_state_for_slots(opt, pool, grown)
    fresh = torch.zeros(E, R, dtype=torch.bool)
    fresh[0, 2:4] = True
    fresh[2, 0:1] = True
    for p, view in ((pool.lora_A, (E, R, 1)), (pool.lora_B, (E, 1, R))):
        mask = fresh.view(view)
        for key, value in opt.state[p].items():
            old = before[id(p)][key]
            if value.dim() == 0:  # stock Adam's scalar step count: left alone (the 3x issue)
                assert torch.equal(value, old)
                continue
            m = mask.expand(value.shape) if value.shape != p.shape else mask.expand(p.shape)
            assert (value[m] == 0).all(), key
            assert torch.equal(value[~m], old[~m]), key
            assert (old[m] != 0).all(), key  # so the test fails if nothing is reset


def test_state_dict_roundtrip_continues_identically():
    def run(split: bool):
        pool = make_pool([1, 4, 2, 6])
        opt = RankAwareAdamW(pool.parameters(), **HP, slots=pool_slot_specs(pool))
        gen = torch.Generator().manual_seed(4)
        for i in range(6):
            if split and i == 3:
                state = opt.state_dict()
                opt = RankAwareAdamW(pool.parameters(), **HP, slots=pool_slot_specs(pool))
                opt.load_state_dict(state)
            set_grads([pool.lora_A, pool.lora_B], gen, pool_masks(pool))
            opt.step()
        return pool.lora_A.detach(), pool.lora_B.detach()

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_validation():
    pool = make_pool([1, 1, 1, 1])
    with pytest.raises(ValueError, match="lr"):
        RankAwareAdamW(pool.parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        RankAwareAdamW(pool.parameters(), betas=(1.0, 0.9))
    assert list(RankAwareAdamW([pool.lora_A], slots=pool_slot_specs(pool)).slots) == [pool.lora_A]
    with pytest.raises(ValueError, match="ranks"):
        RankAwareAdamW(pool.parameters(), slots={pool.lora_A: SlotSpec(torch.zeros(E + 1), 1)})
    with pytest.raises(ValueError, match="dim"):
        SlotSpec(pool.ranks, 0)
    with pytest.raises(ValueError, match="invalid entry"):
        reset_optimizer_state_for_slots(torch.optim.AdamW(pool.parameters()), pool, [(0, 3, 9)])
