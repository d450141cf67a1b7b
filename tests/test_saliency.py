"""Routing frequency, rank importance and saliency against direct computations from ``.grad``."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from drlora_kernels.config import DRLoRAConfig
from drlora_kernels.dynamic import DRLoRAController
from drlora_kernels.ops import route_tokens, slot_importance
from drlora_kernels.pool import RankPool
from drlora_kernels.saliency import SaliencyTracker, in_backward
from tests.helpers import pool_lora

E, K, N, R, TOP_K = 6, 16, 20, 8, 2


def make_pools(num_layers=2, num_pools=2, seed=0, ranks=None):
    gen = torch.Generator().manual_seed(seed)
    pools = []
    for l in range(num_layers):
        layer = []
        for p in range(num_pools):
            pool = RankPool(E, K, N, R, 3, r_target=4, generator=gen)
            with torch.no_grad():  # non-zero B so that dA and the importance are non-zero
                pool.lora_B.normal_(generator=gen)
                if ranks is not None:
                    pool.ranks.copy_(torch.tensor(ranks[l][p], dtype=torch.int32))
            layer.append(pool)
        pools.append(layer)
    return pools


def random_routing(T, gen):
    logits = torch.randn(T, E, generator=gen)
    w, idx = logits.softmax(-1).topk(TOP_K, dim=-1)
    return idx, w / w.sum(-1, keepdim=True)


def run_micro_batch(pools, controller, T, gen):
    """One forward/backward of every pool on random routed tokens; returns each layer's routing."""
    routings = []
    loss = 0.0
    for l, layer in enumerate(pools):
        idx, w = random_routing(T, gen)
        routings.append((idx, w))
        if controller is not None:
            controller.record_routing(l, idx, w)
        rt = route_tokens(idx, w, E)
        x = torch.randn(T, K, generator=gen)[rt.token_index]
        for pool in layer:
            y = pool_lora(pool, x, rt.offsets)
            loss = loss + (y * torch.randn(y.shape, generator=gen)).sum()
    loss.backward()
    return routings


def direct_scores(pools):
    """s_j by explicit loops over layers, pools, experts and active slots (independent of the package)."""
    L, P = len(pools), len(pools[0])
    s = torch.zeros(L, P, E, R, dtype=torch.float64)
    for l in range(L):
        for p in range(P):
            pool = pools[l][p]
            A, gA, B, gB = (
                pool.lora_A.double(),
                pool.lora_A.grad.double(),
                pool.lora_B.double(),
                pool.lora_B.grad.double(),
            )
            for e in range(E):
                for j in range(int(pool.ranks[e])):
                    s[l, p, e, j] = (A[e, j] * gA[e, j]).abs().sum() * (
                        B[e, :, j] * gB[e, :, j]
                    ).abs().sum()
    return s


def direct_frequency(step_routings, num_layers, beta):
    """f after each step, from the raw routings (list of steps; each a list of micro-batches of per-layer routings)."""
    f = torch.zeros(num_layers, E, dtype=torch.float64)
    for micro_batches in step_routings:
        for l in range(num_layers):
            total = torch.zeros(E, dtype=torch.float64)
            tokens = 0
            for routing in micro_batches:
                idx, w = routing[l]
                for t in range(idx.shape[0]):
                    for j in range(idx.shape[1]):
                        total[idx[t, j]] += float(w[t, j])
                tokens += idx.shape[0]
            f[l] = beta * f[l] + (1 - beta) * total / tokens
    return f


def zero_grads(pools):
    for layer in pools:
        for pool in layer:
            pool.zero_grad(set_to_none=True)


RANKS = [[[3, 0, 8, 1, 5, 3], [2, 2, 7, 4, 0, 6]], [[8, 8, 1, 3, 3, 2], [5, 1, 1, 6, 3, 8]]]


@pytest.mark.parametrize(
    "use_frequency,use_importance", [(True, True), (False, True), (True, False)]
)
def test_saliency_matches_direct_computation(use_frequency, use_importance):
    pools = make_pools(ranks=RANKS)
    cfg = DRLoRAConfig(
        r_init=3,
        r_target=4,
        r_max=R,
        p_grow=0.5,
        beta=0.8,
        gamma=1.3,
        use_frequency=use_frequency,
        use_importance=use_importance,
    )
    ctrl = DRLoRAController(pools, cfg, total_steps=1000)
    gen = torch.Generator().manual_seed(1)
    step_routings = []
    g = torch.zeros(2, 2, E, R, dtype=torch.float64)
    for _ in range(3):
        step_routings.append([run_micro_batch(pools, ctrl, T=11, gen=gen)])
        g = 0.8 * g + 0.2 * direct_scores(pools)
        ctrl.update_statistics()
        zero_grads(pools)
    f = direct_frequency(step_routings, 2, 0.8)
    ranks = torch.tensor(RANKS, dtype=torch.float64)
    # g_m: mean over ACTIVE slots only (rank-0 modules: 0).
    g_m = torch.zeros(2, 2, E, dtype=torch.float64)
    for l in range(2):
        for p in range(2):
            for e in range(E):
                r = int(ranks[l, p, e])
                g_m[l, p, e] = g[l, p, e, :r].mean() if r else 0.0
    f_m = (
        f[:, None, :].expand(2, 2, E) if use_frequency else torch.ones(2, 2, E, dtype=torch.float64)
    )
    g_used = g_m if use_importance else torch.ones_like(g_m)
    expected = (f_m * g_used / (ranks + 1) ** 1.3).reshape(2, 2 * E)
    assert g_m.abs().sum() > 0 and f.abs().sum() > 0
    torch.testing.assert_close(
        ctrl.tracker.frequency.double(), f.float().double(), rtol=1e-5, atol=1e-7
    )
    if use_importance:
        torch.testing.assert_close(ctrl.tracker.slot_importance.double(), g, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(
            ctrl.tracker.module_importance(ctrl.ranks()).double(), g_m, rtol=1e-4, atol=1e-9
        )
    torch.testing.assert_close(ctrl.saliency().double(), expected, rtol=1e-4, atol=1e-9)


def test_inactive_slots_never_count():
    """NaN in inactive slots must not leak; their importance stays exactly zero."""
    pools = make_pools(ranks=RANKS)
    with torch.no_grad():
        for layer in pools:
            for pool in layer:
                inactive = ~pool.active_mask()
                pool.lora_A[inactive] = float("nan")
                pool.lora_B.permute(0, 2, 1)[inactive] = float("nan")
    ctrl = DRLoRAController(
        pools, DRLoRAConfig(r_init=3, r_target=4, r_max=R, p_grow=0.5), total_steps=1000
    )
    gen = torch.Generator().manual_seed(2)
    run_micro_batch(pools, ctrl, T=9, gen=gen)
    ctrl.update_statistics()
    g = ctrl.tracker.slot_importance
    active = torch.stack([torch.stack([p.active_mask() for p in layer]) for layer in pools])
    assert torch.isfinite(g).all() and torch.isfinite(ctrl.saliency()).all()
    assert (g[~active] == 0).all()
    assert (g[active] > 0).float().mean() > 0.9  # experts with tokens have non-zero importance


def test_importance_comes_from_the_accumulated_gradients():
    """The one importance path: ``update_statistics()`` reads ``ops.slot_importance`` of the
    step's complete gradients (s_j = sum|A*dA| * sum|B*dB| per slot, then the EMA)."""
    pools = make_pools(ranks=RANKS)
    cfg = DRLoRAConfig(r_init=3, r_target=4, r_max=R, p_grow=0.5, beta=0.9)
    ctrl = DRLoRAController(pools, cfg, 1000)
    gen = torch.Generator().manual_seed(3)
    loss = 0.0
    for l, layer in enumerate(pools):
        idx, w = random_routing(13, gen)
        ctrl.record_routing(l, idx, w)
        rt = route_tokens(idx, w, E)
        x = torch.randn(13, K, generator=gen)[rt.token_index]
        for pool in layer:
            gy = torch.randn(x.shape[0], N, generator=gen)
            loss = loss + (pool_lora(pool, x, rt.offsets) * gy).sum()
    loss.backward()
    expected = torch.stack([
        torch.stack([
            torch.mul(*slot_importance(p.lora_A.detach(), p.lora_A.grad, p.lora_B.detach(),
                                       p.lora_B.grad, p.ranks))
            for p in layer
        ])
        for layer in pools
    ])  # fmt: skip
    assert expected.abs().sum() > 0
    ctrl.update_statistics()
    torch.testing.assert_close(ctrl.tracker.slot_importance, (1 - cfg.beta) * expected)
    assert "fused_importance" not in inspect.signature(ctrl.update_statistics).parameters


def test_frequency_with_gradient_accumulation():
    """f is updated once per optimizer step from all micro-batches' tokens."""
    pools = make_pools()
    ctrl = DRLoRAController(
        pools, DRLoRAConfig(r_init=3, r_target=4, r_max=R, p_grow=0.5, beta=0.9), total_steps=1000
    )
    gen = torch.Generator().manual_seed(4)
    step_routings = []
    for sizes in ([5, 9, 2], [7], [3, 3]):  # micro-batches of different sizes
        step_routings.append([run_micro_batch(pools, ctrl, T, gen) for T in sizes])
        sums, tokens = ctrl.tracker.pending_routing()
        assert tokens.tolist() == [float(sum(sizes))] * 2
        ctrl.update_statistics()
        zero_grads(pools)
    f = direct_frequency(step_routings, 2, 0.9)
    torch.testing.assert_close(ctrl.tracker.frequency.double(), f, rtol=1e-5, atol=1e-7)
    # The step's accumulators are cleared by the update.
    assert ctrl.tracker.pending_routing()[1].sum() == 0


class _RecordingBlock(torch.nn.Module):
    def __init__(self, tracker):
        super().__init__()
        self.tracker = tracker
        self.lin = torch.nn.Linear(K, E)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        w, idx = self.lin(x).softmax(-1).topk(TOP_K, dim=-1)
        self.tracker.record_routing(0, idx, w)
        return (w[..., None] * x[:, None, :]).sum(1).tanh()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_counts_each_token_once(use_reentrant):
    tracker = SaliencyTracker(1, 1, E, R)
    plain_tracker = SaliencyTracker(1, 1, E, R)
    block = _RecordingBlock(tracker)
    x = torch.randn(10, K, requires_grad=True)
    out = checkpoint(block, x, use_reentrant=use_reentrant)
    out.sum().backward()
    assert block.calls == 2  # the forward really ran twice (recomputation in backward)
    block.tracker = plain_tracker
    block(x).sum().backward()
    sums, tokens = tracker.pending_routing()
    ref_sums, ref_tokens = plain_tracker.pending_routing()
    assert tokens.tolist() == [10.0] and ref_tokens.tolist() == [10.0]
    torch.testing.assert_close(sums, ref_sums)


def test_in_backward_detects_engine():
    seen = []
    x = torch.randn(3, requires_grad=True)
    y = x * 2
    y.register_hook(lambda g: seen.append(in_backward()))
    assert not in_backward()
    y.sum().backward()
    assert seen == [True]


def test_reset_importance_and_state_roundtrip():
    tracker = SaliencyTracker(2, 2, E, R, beta=0.5)
    scores = torch.rand(2, 2, E, R)
    tracker.record_routing(
        1, torch.tensor([[0, 1], [2, 1]]), torch.tensor([[0.5, 0.5], [0.7, 0.3]])
    )
    tracker.update(scores)
    torch.testing.assert_close(tracker.slot_importance, 0.5 * scores)
    assert tracker.frequency[0].abs().sum() == 0  # layer 0 recorded nothing: f kept
    torch.testing.assert_close(tracker.frequency[1, :3], torch.tensor([0.25, 0.4, 0.35]) * 0.5)
    state = tracker.state_dict()
    mask = torch.zeros(2, 2, E, dtype=torch.bool)
    mask[1, 0, 3] = True
    tracker.reset_importance(mask)
    assert (tracker.slot_importance[1, 0, 3] == 0).all()
    assert (tracker.slot_importance[mask.logical_not()] > 0).all()
    other = SaliencyTracker(2, 2, E, R, beta=0.5)
    other.load_state_dict(state)
    torch.testing.assert_close(other.slot_importance, 0.5 * scores)
    torch.testing.assert_close(other.frequency, tracker.frequency)


def test_record_routing_validation():
    tracker = SaliencyTracker(2, 1, E, R)
    idx, w = torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 2)
    with pytest.raises(ValueError, match="layer"):
        tracker.record_routing(2, idx, w)
    with pytest.raises(ValueError, match="top_k_weights"):
        tracker.record_routing(0, idx, w[:, :1])
    with pytest.raises(TypeError, match="top_k_index"):
        tracker.record_routing(0, idx.float(), w)
    with pytest.raises(ValueError, match="scores"):
        tracker.update(torch.rand(2, 1, E, R + 1))
