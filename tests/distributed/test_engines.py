"""The engine layer in one process: detection, the local engine, and every silent-failure path.

Each "no silent failure" rule of the engine interface is provoked here and must raise:
statistics without a gradient, a growth write that does not reach the weights, a write an
optimizer's master copy reverts, optimizer state that cannot be reset per slot, a checkpoint
of partial tensors, non-integer growth requests.
"""

from __future__ import annotations

import pytest
import torch

from drlora_kernels.config import DRLoRAConfig
from drlora_kernels.dynamic import DRLoRAController
from drlora_kernels.engines import (
    Engine,
    GrowthNotWrittenError,
    LocalEngine,
    detect_engine,
    fingerprint,
)
from drlora_kernels.engines.fsdp import FSDP2Engine, local_box
from drlora_kernels.integrations import attach_drlora, get_drlora, save_drlora
from drlora_kernels.ops import route_tokens, slot_importance
from drlora_kernels.pool import RankPool
from tests.helpers import pool_lora

E, K, N, R, T = 4, 16, 12, 8, 24
CFG = DRLoRAConfig(
    r_init=2, r_target=4, r_max=R, p_grow=0.5, grow_every=2, warmup_steps=1, buffer_steps=0
)


def _pools(layers: int = 1) -> list[list[RankPool]]:
    gen = torch.Generator().manual_seed(0)
    return [[RankPool(E, K, N, R, 2, r_target=4, generator=gen)] for _ in range(layers)]


def _backward(pools, ctrl, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    loss = 0.0
    for l, layer in enumerate(pools):
        w, idx = torch.randn(T, E, generator=gen).softmax(-1).topk(2, dim=-1)
        ctrl.record_routing(l, idx, w)
        rt = route_tokens(idx, w, E)
        x = torch.randn(T, K, generator=gen)[rt.token_index]
        for pool in layer:
            loss = loss + (pool_lora(pool, x, rt.offsets) - 1).square().mean()
    loss.backward()


def _params(pools):
    return [t for layer in pools for pool in layer for t in (pool.lora_A, pool.lora_B)]


def _train(pools, ctrl, opt, steps: int) -> None:
    for step in range(steps):
        _backward(pools, ctrl, seed=step)
        ctrl.update_statistics()
        ctrl.step(opt)
        opt.step()
        opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- detection
def test_detect_engine_on_plain_parameters_is_local():
    engine = detect_engine(_pools()[0][0])
    assert isinstance(engine, LocalEngine) and engine.name == "local"
    assert not engine.sums_are_partial
    ctrl = DRLoRAController(_pools(), CFG, 10)
    assert ctrl.bound_engine is None and ctrl.engine.name == "local"


def test_controller_takes_an_engine_and_checks_it():
    with pytest.raises(TypeError, match="engine must be"):
        DRLoRAController(_pools(), CFG, 10, engine="ddp")
    engine = LocalEngine("custom")
    ctrl = DRLoRAController(_pools(), CFG, 10, engine=engine)
    assert ctrl.bound_engine is engine and ctrl.engine is engine


def test_the_first_statistics_call_binds_the_detected_engine():
    pools = _pools()
    ctrl = DRLoRAController(pools, CFG, 10)
    _backward(pools, ctrl)
    ctrl.update_statistics()
    assert isinstance(ctrl.bound_engine, LocalEngine)


def test_local_engine_slot_sums_are_the_ops_importance():
    pools = _pools()
    pool = pools[0][0]
    assert LocalEngine().slot_sums(pool) is None  # no gradient yet
    _backward(pools, DRLoRAController(pools, CFG, 10))
    imp_a, imp_b = LocalEngine().slot_sums(pool)
    ref_a, ref_b = slot_importance(
        pool.lora_A.detach(), pool.lora_A.grad, pool.lora_B.detach(), pool.lora_B.grad, pool.ranks
    )
    assert torch.equal(imp_a, ref_a) and torch.equal(imp_b, ref_b)


def test_local_box_and_fingerprint():
    t = torch.randn(3, 4, 5)
    assert local_box(t) == (slice(0, 3), slice(0, 4), slice(0, 5))
    u = t.clone()
    assert torch.equal(fingerprint([t, u]), fingerprint([t.clone(), u.clone()]))
    u[1, 2, 3] += 1e-6
    assert not torch.equal(fingerprint([t, u]), fingerprint([t, t]))
    # the FSDP2 engine leaves sharded (DTensor) tensors out; plain ones count as with any engine
    assert torch.equal(FSDP2Engine().checksum([t]), LocalEngine().checksum([t]))


# ------------------------------------------------------------------ no gradient -> error
def test_statistics_without_gradient_raise_naming_the_engine_and_the_fix():
    pools = _pools()
    ctrl = DRLoRAController(pools, CFG, 10)
    _backward(pools, ctrl)
    for p in _params(pools):  # zero_grad before the statistics: the classic mistake
        p.grad = None
    with pytest.raises(RuntimeError, match=r"no gradient .*'local' engine.*update_statistics\(\)"):
        ctrl.update_statistics()


def test_statistics_without_gradient_are_fine_when_nothing_needs_them():
    pools = _pools()
    ctrl = DRLoRAController(pools, DRLoRAConfig(**{**CFG.to_dict(), "use_importance": False}), 10)
    _backward(pools, ctrl)
    for p in _params(pools):
        p.grad = None
    ctrl.update_statistics()  # use_importance=False: no gradient needed
    pools = _pools()
    for pool in pools[0]:
        pool.ranks.zero_()  # no active rank: no gradient flows, nothing to measure
    DRLoRAController(pools, DRLoRAConfig(**{**CFG.to_dict(), "r_init": 0}), 10).update_statistics()


# --------------------------------------------------------------- growth writes -> error
class _WritesNothing(LocalEngine):
    """An engine whose writes miss the trained weights (e.g. it writes a copy)."""

    def write_growth(self, pool, expert, old, new, a_rows):
        pass


def test_a_growth_write_that_does_not_reach_the_weights_raises():
    pool = _pools()[0][0]
    with pytest.raises(GrowthNotWrittenError, match="was not written under the 'broken' engine"):
        pool.grow([1], [2], seeds=[7], engine=_WritesNothing("broken"))
    assert pool.ranks.tolist() == [2] * E  # nothing changed


class _MasterCopyAdamW(torch.optim.Optimizer):
    """A naive mixed-precision optimizer: trains fp32 master copies, copies them over the weights."""

    def __init__(self, params, lr=1e-2):
        params = list(params)
        super().__init__(params, {"lr": lr})
        self.masters = [p.detach().clone().requires_grad_(True) for p in params]
        self.inner = torch.optim.AdamW(self.masters, lr=lr)

    @torch.no_grad()
    def step(self, closure=None):
        for p, m in zip(self.param_groups[0]["params"], self.masters):
            m.grad = None if p.grad is None else p.grad.clone()
        self.inner.step()
        for p, m in zip(self.param_groups[0]["params"], self.masters):
            p.copy_(m)  # growth written into p is overwritten by the stale master


def test_a_growth_write_reverted_by_a_master_copy_raises_after_the_optimizer_step():
    pools = _pools()
    ctrl = DRLoRAController(pools, CFG, 10)
    opt = _MasterCopyAdamW(_params(pools))
    _train(pools, ctrl, opt, 1)  # step 0
    _backward(pools, ctrl, seed=1)
    ctrl.update_statistics()
    assert ctrl.step(opt)  # the event at step 1 writes the new slots ...
    opt.step()  # ... which the master copy overwrites
    opt.zero_grad(set_to_none=True)
    _backward(pools, ctrl, seed=2)
    with pytest.raises(
        GrowthNotWrittenError, match="reverted by the optimizer step under the 'local' engine"
    ):
        ctrl.update_statistics()


def test_growth_survives_a_stock_optimizer_step():
    """The post-step check passes with a real optimizer (zero gradient on new A rows, decay only)."""
    pools = _pools()
    ctrl = DRLoRAController(pools, CFG, 10)
    opt = torch.optim.AdamW(_params(pools), lr=0.1, weight_decay=0.1)
    _train(pools, ctrl, opt, 6)
    assert len({ev.step for ev in ctrl.event_log}) >= 2


# ------------------------------------------------------- optimizer state per slot -> error
def test_optimizer_state_not_laid_out_like_the_pool_raises():
    pools = _pools()
    pool = pools[0][0]
    opt = torch.optim.AdamW(_params(pools), lr=1e-2)
    opt.state[pool.lora_A] = {
        "step": torch.tensor(3.0),
        "exp_avg": torch.zeros(pool.lora_A.numel()),
    }
    with pytest.raises(
        RuntimeError, match="'local' engine: the moments of grown slots cannot be reset"
    ):
        LocalEngine().reset_optimizer_slots(opt, pool, [(0, 2, 3)])


def test_reset_optimizer_slots_zeroes_the_new_slots():
    pools = _pools()
    ctrl = DRLoRAController(pools, CFG, 10)
    opt = torch.optim.AdamW(_params(pools), lr=1e-2)
    _train(pools, ctrl, opt, 1)
    pool = pools[0][0]
    LocalEngine().reset_optimizer_slots(opt, pool, [(1, 2, 4)])
    FSDP2Engine().reset_optimizer_slots(opt, pool, [(2, 3, 5)])  # plain tensors: the whole box
    for key in ("exp_avg", "exp_avg_sq"):
        a, b = opt.state[pool.lora_A][key], opt.state[pool.lora_B][key]
        assert (a[1, 2:4] == 0).all() and (b[1, :, 2:4] == 0).all()
        assert (a[2, 3:5] == 0).all() and (b[2, :, 3:5] == 0).all()
        assert (b[0, :, :2] != 0).any()  # other slots keep their moments


# ---------------------------------------------------------------- checkpoints -> error
class _PartialGather(LocalEngine):
    """An engine that hands back its local partition instead of the full tensor."""

    def gather_full(self, tensor):
        return tensor.detach()[:1].clone()


def test_a_checkpoint_of_partial_tensors_is_refused(tmp_path):
    from tests.integrations.tiny_models import build, small_config

    model = attach_drlora(build("olmoe"), small_config(), total_steps=4)
    get_drlora(model).controller.bind_engine(_PartialGather("zero-like"))
    with pytest.raises(RuntimeError, match="'zero-like' engine returned .* refusing to write"):
        save_drlora(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


# ------------------------------------------------------------ non-integer growth -> error
@pytest.mark.parametrize(
    "ids, amounts, name",
    [
        ([0], [1.7], "amounts"),
        ([0.9], [1], "expert_ids"),
        ([True], [1], "expert_ids"),
        (torch.tensor([0]), torch.tensor([1.0]), "amounts"),
        (torch.tensor([0.0]), [1], "expert_ids"),
    ],
)
def test_grow_rejects_non_integer_ids_and_amounts(ids, amounts, name):
    pool = _pools()[0][0]
    with pytest.raises(TypeError, match=name):
        pool.grow(ids, amounts)
    assert pool.ranks.tolist() == [2] * E


def test_grow_accepts_integer_tensors_and_numpy_like_ints():
    pool = _pools()[0][0]
    assert pool.grow(torch.tensor([0, 2]), torch.tensor([1, 2], dtype=torch.int32)) == [
        (0, 2, 3),
        (2, 2, 4),
    ]
    assert pool.grow([torch.tensor(1)], [torch.tensor(1)]) == [(1, 2, 3)]


def test_the_engine_base_class_is_an_interface():
    with pytest.raises(NotImplementedError):
        Engine().slot_sums(_pools()[0][0])
