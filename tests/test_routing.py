"""The token-sorting helper: permutation, offsets, gather and weighted scatter."""

from __future__ import annotations

import torch

import drlora_kernels as dk
from drlora_kernels.ops import gather_tokens, scatter_tokens


def test_route_gather_scatter_roundtrip():
    T, k, E, H = 13, 3, 5, 7
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    wts = torch.rand(T, k)
    routing = dk.route_tokens(idx, wts, E)
    assert routing.offsets.dtype == torch.int32 and routing.offsets.tolist()[-1] == T * k
    sizes = routing.group_sizes.tolist()
    assert sizes == torch.bincount(idx.flatten(), minlength=E).tolist()
    assert (routing.expert_index[1:] >= routing.expert_index[:-1]).all()
    hidden = torch.randn(T, H)
    x = gather_tokens(hidden, routing)
    # per-expert transform, then weighted combine, vs a direct loop
    scales = torch.randn(E)
    y_sorted = x * scales[routing.expert_index][:, None]
    out = scatter_tokens(y_sorted, routing)
    expected = torch.zeros(T, H)
    for t in range(T):
        for j in range(k):
            expected[t] += wts[t, j] * scales[idx[t, j]] * hidden[t]
    torch.testing.assert_close(out, expected)


def test_stable_order_within_expert():
    idx = torch.tensor([[1], [0], [1], [1], [0]])
    routing = dk.route_tokens(idx, torch.ones(5, 1), 3)
    assert routing.token_index.tolist() == [1, 4, 0, 2, 3]
    assert routing.offsets.tolist() == [0, 2, 5, 5]
