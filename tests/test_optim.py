"""Optimizer state under growth: slot resets and the rank-aware AdamW."""

from __future__ import annotations

import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from drlora_kernels.optim import (
    RankAwareAdamW,
    SlotSpec,
    choose_slot_path,
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
    """Train slots 0..1 for ``steps`` steps, then grow slot 2 the controller's way and step twice.

    The controller's contract: backward (old ranks), grow + reset, ``opt.step()``; the next
    backward sees the new slot. Returns ``|update| / lr`` of the new slot's ``B`` column of
    expert 0 at its first real update (the step after the growth step).
    """
    pool = make_pool([2] * E)
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-12, weight_decay=0.0)
    kwargs = {"slots": pool_slot_specs(pool)} if opt_cls is RankAwareAdamW else {}
    opt = opt_cls(pool.parameters(), **hp, **kwargs)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        set_grads([pool.lora_A, pool.lora_B], gen, pool_masks(pool))
        opt.step()
    set_grads([pool.lora_A, pool.lora_B], gen, pool_masks(pool))  # computed at the old ranks
    grown = pool.grow([0], [1], seeds=[123])
    reset_optimizer_state_for_slots(opt, pool, grown)
    opt.step()  # the growth step: the new slot has no gradient yet
    set_grads([pool.lora_A, pool.lora_B], gen, pool_masks(pool))
    before = pool.lora_B[0, :, 2].detach().clone()
    opt.step()
    return (pool.lora_B[0, :, 2].detach() - before).abs() / hp["lr"]


def test_late_slot_first_update_is_true_first_step():
    steps = 3000
    stock = _late_slot_update(torch.optim.AdamW, steps)
    ours = _late_slot_update(RankAwareAdamW, steps)
    # Stock AdamW: fresh moments with the bias correction of step 3002:
    # (1 - beta1) / sqrt(1 - beta2) * sqrt(1 - beta2**t) / (1 - beta1**t) ~= 3.08 lr.
    t = steps + 2
    expected = 0.1 / 0.001**0.5 * (1 - 0.999**t) ** 0.5 / (1 - 0.9**t)
    assert expected > 3.0
    torch.testing.assert_close(stock, torch.full_like(stock, expected), rtol=1e-4, atol=0)
    # Rank-aware: a true first Adam step, lr * sign(grad) (not 0.74 lr: the growth step,
    # whose gradient predates the slot, is not counted).
    torch.testing.assert_close(ours, torch.ones_like(ours), rtol=1e-5, atol=0)


# ------------------------------------------------- a grown slot vs a fresh LoRA under AdamW


def lora_loss(pool: RankPool, xs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A per-expert LoRA regression through masked slots (inactive slots get exactly 0 gradient)."""
    m = pool.active_mask().to(pool.lora_A.dtype)
    a, b = pool.lora_A * m[:, :, None], pool.lora_B * m[:, None, :]
    y = pool.scaling * torch.einsum("etk,erk,enr->etn", xs.to(a.dtype), a, b)
    return (y.float() - targets).square().mean()


def run_with_growth(opt, pool, *, steps: int, grow_at: int, gen: torch.Generator, on_step=None):
    """The controller's loop: backward, (growth + reset at ``grow_at``), ``opt.step()``."""
    for step in range(steps):
        xs = torch.randn(E, 5, K, generator=gen)
        targets = torch.randn(E, 5, N, generator=gen)
        lora_loss(pool, xs, targets).backward()
        if step == grow_at:
            reset_optimizer_state_for_slots(opt, pool, pool.grow([0, 3], [2, 1], seeds=[7, 8]))
        if on_step is not None:
            on_step(step)
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_grown_slot_follows_a_fresh_lora_under_torch_adamw(weight_decay):
    """After growth, expert 0's slots 2..3 train exactly like a fresh LoRA pair under AdamW.

    ``B`` columns start at zero and get a true first step; ``A`` rows, whose gradient is zero
    while ``B`` is zero, follow a fresh LoRA's ``A`` (AdamW counts that step and decays them).
    """
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    pool = make_pool([2, 2, 2, 2])
    opt = RankAwareAdamW(pool.parameters(), **hp, slots=pool_slot_specs(pool))
    ref: dict[str, torch.nn.Parameter] = {}
    first_b_update = []

    def on_step(step):
        if step == 2:  # right after the growth: the fresh LoRA pair starts here
            ref["A"] = torch.nn.Parameter(pool.lora_A[0, 2:4].detach().clone())
            ref["B"] = torch.nn.Parameter(pool.lora_B[0, :, 2:4].detach().clone())
            ref["opt"] = torch.optim.AdamW([ref["A"], ref["B"]], **hp)
            assert (pool.lora_A.grad[0, 2:4] == 0).all() and (
                pool.lora_B.grad[0, :, 2:4] == 0
            ).all()
            ref["before"] = (pool.lora_A[0, 2:4].detach().clone(), ref["B"].detach().clone())
        elif step > 2:
            ref["A"].grad = pool.lora_A.grad[0, 2:4].clone()
            ref["B"].grad = pool.lora_B.grad[0, :, 2:4].clone()
            if step == 3:
                assert (ref["A"].grad == 0).all() and (ref["B"].grad != 0).all()
                first_b_update.append(ref["B"].detach().clone())
            ref["opt"].step()

    run_with_growth(opt, pool, steps=8, grow_at=2, gen=torch.Generator().manual_seed(5),
                    on_step=on_step)  # fmt: skip
    # The growth step (2) left the new slots alone: nothing counted, nothing decayed.
    torch.testing.assert_close(pool.lora_A[0, 2:4], ref["A"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pool.lora_B[0, :, 2:4], ref["B"], rtol=1e-6, atol=1e-7)
    assert opt.state[pool.lora_B]["step"][0, 0, 2:4].tolist() == [5.0, 5.0]  # steps 3..7
    assert opt.state[pool.lora_B]["step"][0, 0, :2].tolist() == [8.0, 8.0]


def test_grown_slot_first_b_update_is_lr_sign_grad():
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-12, weight_decay=0.0)
    pool = make_pool([2, 2, 2, 2])
    opt = RankAwareAdamW(pool.parameters(), **hp, slots=pool_slot_specs(pool))
    seen = {}

    def on_step(step):
        if step == 3:
            seen["grad"] = pool.lora_B.grad[0, :, 2:4].clone()
            seen["before"] = pool.lora_B[0, :, 2:4].detach().clone()

    run_with_growth(opt, pool, steps=4, grow_at=2, gen=torch.Generator().manual_seed(6),
                    on_step=on_step)  # fmt: skip
    update = pool.lora_B[0, :, 2:4].detach() - seen["before"]
    torch.testing.assert_close(update, -hp["lr"] * seen["grad"].sign(), rtol=1e-5, atol=0)


# ------------------------------------------------- learning-rate multiplier for grown slots


def test_new_slot_lr_scale_applies_to_grown_slots_only_for_their_first_steps():
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-12, weight_decay=0.0)

    def updates(scale):
        """B updates of 7 steps, growth at step 2; gradients that do not depend on the weights."""
        pool = make_pool([2, 2, 2, 2])
        kw = dict(new_slot_lr_scale=scale, new_slot_lr_steps=2) if scale != 1.0 else {}
        opt = RankAwareAdamW(pool.parameters(), **hp, slots=pool_slot_specs(pool), **kw)
        gen = torch.Generator().manual_seed(9)
        out = []
        for step in range(7):
            set_grads([pool.lora_A, pool.lora_B], gen, pool_masks(pool))
            if step == 2:
                reset_optimizer_state_for_slots(opt, pool, pool.grow([0], [2], seeds=[1]))
            before = pool.lora_B.detach().clone()
            opt.step()
            out.append(pool.lora_B.detach() - before)
        return out

    base, boosted = updates(1.0), updates(3.0)
    for step, (u1, u3) in enumerate(zip(base, boosted)):
        torch.testing.assert_close(u3[:, :, :2], u1[:, :, :2], rtol=0, atol=0)  # initial slots
        new = u1[0, :, 2:4]
        factor = 3.0 if step in (3, 4) else 1.0  # the grown slots' first two updates
        torch.testing.assert_close(u3[0, :, 2:4], factor * new, rtol=1e-5, atol=1e-8)
        assert (new != 0).all() if step >= 3 else (new == 0).all()
    with pytest.raises(ValueError, match="new_slot_lr_steps"):
        RankAwareAdamW([torch.nn.Parameter(torch.zeros(2))], new_slot_lr_scale=2.0)


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
            if value.dim() == p.dim():
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
            if value.dim() != p.dim():  # stock Adam's scalar step count: left alone (the 3x
                assert torch.equal(value, old)  # issue); RankAwareAdamW's seen_ranks, param_step
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
        RankAwareAdamW(
            pool.parameters(),
            slots={pool.lora_A: SlotSpec(torch.zeros(E + 1, dtype=torch.int32), 1)},
        )
    with pytest.raises(TypeError, match="integer"):
        SlotSpec(torch.zeros(E), 1)
    with pytest.raises(ValueError, match="slot_path"):
        RankAwareAdamW(pool.parameters(), slot_path="fast")
    with pytest.raises(ValueError, match="dim"):
        SlotSpec(pool.ranks, 0)
    with pytest.raises(ValueError, match="invalid entry"):
        reset_optimizer_state_for_slots(torch.optim.AdamW(pool.parameters()), pool, [(0, 3, 9)])


# ------------------------------------------------- the sync-free (masked) path


def _trained(slot_path: str, *, weight_decay: float = 0.1, dtype=torch.float32, **kw):
    pool = make_pool([2, 0, 3, 5]).to(dtype)
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    opt = RankAwareAdamW(pool.parameters(), **hp, slots=pool_slot_specs(pool), slot_path=slot_path,
                         **kw)  # fmt: skip
    run_with_growth(opt, pool, steps=6, grow_at=2, gen=torch.Generator().manual_seed(11))
    return pool, opt


def test_choose_slot_path():
    assert choose_slot_path(torch.zeros(3, dtype=torch.int32)) == "views"
    assert choose_slot_path(torch.zeros(3, dtype=torch.int32, device="meta")) == "masked"


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_views_and_masked_paths_agree(weight_decay, scale):
    kw = dict(new_slot_lr_scale=scale, new_slot_lr_steps=2) if scale != 1.0 else {}
    (pv, ov), (pm, om) = (
        _trained(path, weight_decay=weight_decay, **kw) for path in ("views", "masked")
    )
    for a, b in ((pv.lora_A, pm.lora_A), (pv.lora_B, pm.lora_B)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq", "step", "param_step", "seen_ranks"):
            torch.testing.assert_close(ov.state[a][key], om.state[b][key], rtol=1e-5, atol=1e-8)


def test_views_and_masked_paths_agree_in_bf16():
    (pv, _), (pm, _) = (_trained(path, dtype=torch.bfloat16) for path in ("views", "masked"))
    for a, b in ((pv.lora_A, pm.lora_A), (pv.lora_B, pm.lora_B)):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")


def test_masked_path_never_reads_tensor_values_on_the_host(monkeypatch):
    pools = {}
    for path in ("masked", "views"):
        pool = make_pool([2, 0, 3, 5])
        opt = RankAwareAdamW(
            pool.parameters(), lr=1e-2, slots=pool_slot_specs(pool), slot_path=path
        )
        run_with_growth(opt, pool, steps=2, grow_at=1, gen=torch.Generator().manual_seed(12))
        lora_loss(pool, torch.randn(E, 5, K), torch.randn(E, 5, N)).backward()
        pools[path] = (pool, opt, pool.lora_B.detach().clone())

    def host_read(*args, **kwargs):
        raise AssertionError("host read of a tensor value")

    with monkeypatch.context() as m:
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, host_read)
        pools["masked"][1].step()
        with pytest.raises(AssertionError, match="host read"):  # the patch does catch reads
            pools["views"][1].step()
    pool, _, before = pools["masked"]
    assert not torch.equal(pool.lora_B.detach(), before)


# ------------------------------------------------- engines that repartition parameters


def test_flat_partitions_and_reshaped_parameters_raise():
    pool = make_pool([2, 2, 2, 2])
    opt = RankAwareAdamW(pool.parameters(), lr=1e-2, slots=pool_slot_specs(pool))
    flat = torch.nn.Parameter(torch.zeros(pool.lora_A.numel() + pool.lora_B.numel()))
    flat.grad = torch.ones_like(flat)
    opt.param_groups[0]["params"] = [flat]  # what DeepSpeed ZeRO-1/2 does to a client optimizer
    with pytest.raises(ValueError, match="flat partition"):
        opt.step()

    pool = make_pool([2, 2, 2, 2])
    opt = RankAwareAdamW(pool.parameters(), lr=1e-2, slots=pool_slot_specs(pool))
    pool.lora_A.data = torch.empty(0)  # what ZeRO-3 does to a partitioned parameter
    pool.lora_A.grad = torch.empty(0)
    with pytest.raises(ValueError, match="ZeRO-3"):
        opt.step()
    with pytest.raises(ValueError, match="ZeRO"):  # already partitioned when the optimizer is built
        RankAwareAdamW([pool.lora_A], slots={pool.lora_A: SlotSpec(pool.ranks, 1)})


def test_state_dict_keeps_the_slot_bookkeeping_exact_in_bf16():
    pool, opt = _trained("views", dtype=torch.bfloat16)
    opt.state[pool.lora_A]["param_step"].fill_(1001)  # not a bf16 number
    state = opt.state_dict()
    again = RankAwareAdamW(pool.parameters(), lr=1e-2, slots=pool_slot_specs(pool))
    again.load_state_dict(state)
    st = again.state[pool.lora_A]
    assert st["param_step"].dtype == torch.float32 and float(st["param_step"]) == 1001
    assert st["seen_ranks"].dtype == torch.int32 and torch.equal(st["seen_ranks"], pool.ranks)
    assert st["exp_avg"].dtype == torch.bfloat16


# ------------------------------------------------- sharded parameters (DTensor, FSDP2's layout)

WORLD = 2
E_UNEVEN = 5  # 3 + 2 experts over two processes


def _sharded_run(mesh, placement, slot_path: str) -> dict:
    """Train a DTensor-sharded pool and a full one on the same gradients; compare."""
    from torch.distributed.tensor import distribute_tensor

    ref = RankPool(E_UNEVEN, K, N, R, 2, r_target=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref.lora_B.normal_(generator=torch.Generator().manual_seed(1))
        ref.ranks.copy_(torch.tensor([2, 0, 3, 6, 1], dtype=torch.int32))
    ranks = ref.ranks.clone()
    shard = types.SimpleNamespace(
        lora_A=torch.nn.Parameter(distribute_tensor(ref.lora_A.detach().clone(), mesh, [placement])),
        lora_B=torch.nn.Parameter(distribute_tensor(ref.lora_B.detach().clone(), mesh, [placement])),
        num_experts=E_UNEVEN, r_max=R,
    )  # fmt: skip
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    opt_ref = RankAwareAdamW(ref.parameters(), **hp, slots=pool_slot_specs(ref))
    specs = {shard.lora_A: SlotSpec(ranks, 1), shard.lora_B: SlotSpec(ranks, 2)}
    opt = RankAwareAdamW([shard.lora_A, shard.lora_B], **hp, slots=specs, slot_path=slot_path)
    gen = torch.Generator().manual_seed(2)  # the same gradients on every process
    for step in range(5):
        grads = [torch.randn(p.shape, generator=gen) * m for p, m in
                 zip((ref.lora_A, ref.lora_B), pool_masks(ref))]  # fmt: skip
        for p, q, g in zip((ref.lora_A, ref.lora_B), (shard.lora_A, shard.lora_B), grads):
            p.grad = g
            q.grad = distribute_tensor(g.clone(), mesh, [placement])
        if step == 2:  # growth between backward and step, on both
            grown = [(1, 0, 3), (4, 1, 3)]  # ranks only: the values stay equal on both sides
            ref.ranks[1], ref.ranks[4] = 3, 3
            ranks.copy_(ref.ranks)
            reset_optimizer_state_for_slots(opt_ref, ref, grown)
            reset_optimizer_state_for_slots(opt, shard, grown)
        opt_ref.step()
        opt.step()
    out = {}
    for name, p, q in (("A", ref.lora_A, shard.lora_A), ("B", ref.lora_B, shard.lora_B)):
        out[name] = (q.full_tensor() - p.detach()).abs().max().item()
        for key in ("exp_avg", "exp_avg_sq", "step"):
            out[f"{name}.{key}"] = (
                (opt.state[q][key].full_tensor() - opt_ref.state[p][key]).abs().max().item()
            )
    out["changed"] = (ref.lora_A.detach() - RankPool(E_UNEVEN, K, N, R, 2, r_target=4,
                      generator=torch.Generator().manual_seed(0)).lora_A).abs().max().item()  # fmt: skip
    return out


def _dtensor_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        mesh = init_device_mesh("cpu", (WORLD,))
        results = {}
        for name, placement in (("shard0", Shard(0)), ("shard1", Shard(1)), ("shard2", Shard(2)),
                                ("replicate", Replicate())):  # fmt: skip
            for path in ("views", "masked"):
                results[f"{name}/{path}"] = _sharded_run(mesh, placement, path)
        partial = torch.nn.Parameter(
            DTensor.from_local(torch.zeros(E_UNEVEN, R, K), mesh, [Partial()])
        )
        try:
            RankAwareAdamW(
                [partial], slots={partial: SlotSpec(torch.ones(E_UNEVEN, dtype=torch.int32), 1)}
            )
            partial.grad = partial.detach().clone()
            RankAwareAdamW(
                [partial], slots={partial: SlotSpec(torch.ones(E_UNEVEN, dtype=torch.int32), 1)}
            ).step()
            results["partial_error"] = ""
        except ValueError as exc:
            results["partial_error"] = str(exc)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_dtensor_shards_update_like_the_full_parameter(tmp_path):
    """Two gloo processes: FSDP2's uneven Shard(0) over experts, Shard on R/K/N, Replicate."""
    mp.spawn(
        _dtensor_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True
    )
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert "placements" in results.pop("partial_error")
        for name, diffs in results.items():
            assert diffs.pop("changed") > 0, name  # the run did train
            for key, diff in diffs.items():
                assert diff <= 1e-6, (rank, name, key, diff)


def test_growth_before_the_first_step_is_not_counted_and_state_starts_empty():
    """An event at step 0 (warmup_steps=0): the first gradient predates the new slots."""
    pool = make_pool([2, 2, 2, 2])
    opt = RankAwareAdamW(pool.parameters(), lr=1e-2, slots=pool_slot_specs(pool))
    assert not opt.state  # torch.distributed.checkpoint initialises an empty state itself
    set_grads([pool.lora_A, pool.lora_B], torch.Generator().manual_seed(0), pool_masks(pool))
    reset_optimizer_state_for_slots(opt, pool, pool.grow([1], [3], seeds=[4]))
    before = pool.lora_A[1, 2:5].detach().clone()
    opt.step()
    assert torch.equal(pool.lora_A[1, 2:5], before)  # not decayed, not counted
    assert opt.state[pool.lora_A]["step"][1, 2:5, 0].tolist() == [0.0, 0.0, 0.0]
    assert opt.state[pool.lora_A]["step"][1, :2, 0].tolist() == [1.0, 1.0]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_distributed_checkpoint_initialises_the_state():
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    pool = make_pool([2, 0, 3, 5])
    opt = RankAwareAdamW(pool.parameters(), lr=1e-2, slots=pool_slot_specs(pool))
    _init_optim_state(opt)
    assert set(opt.state[pool.lora_B]) >= {"exp_avg", "exp_avg_sq", "step", "seen_ranks"}
