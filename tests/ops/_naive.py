"""A per-token loop, written independently of the package: the check on the oracle itself."""

from __future__ import annotations

import torch


def naive_forward(x, w, lora_a, lora_b, ranks, offsets, scale):
    """``y[t] = x[t] W_e^T + s_e (A_e[:r_e] x[t])^T B_e[:, :r_e]^T`` for the expert ``e`` owning row ``t``."""
    off = [int(o) for o in offsets]
    rows = []
    for t in range(x.shape[0]):
        e = max(i for i in range(len(off) - 1) if off[i] <= t < off[i + 1])
        r = int(ranks[e])
        yt = torch.zeros(lora_b.shape[1], dtype=x.dtype)
        if w is not None:
            yt = yt + w[e] @ x[t]
        if r > 0:
            yt = yt + scale[e] * (lora_b[e, :, :r] @ (lora_a[e, :r] @ x[t]))
        rows.append(yt)
    if not rows:
        return x.new_zeros(0, lora_b.shape[1])
    return torch.stack(rows)
