"""Turn a router's top-k choice into the expert-sorted token layout the grouped ops take.

One implementation shared by layers, integrations and benchmarks. Everything
here has data-independent output shapes (``T*k`` rows, ``E+1`` offsets), so it
traces under ``torch.compile`` without graph breaks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenRouting:
    """The expert-sorted layout of ``T`` tokens routed to ``k`` experts each.

    Attributes:
        token_index: `[T*k]` int64, the source token of each sorted row.
        expert_index: `[T*k]` int64, the expert of each sorted row (non-decreasing).
        weights: `[T*k]`, the routing weight of each sorted row (in the router's dtype).
        offsets: `[E+1]` int32, group ``e`` is sorted rows ``offsets[e]:offsets[e+1]``.
        perm: `[T*k]` int64, the flat ``(token, slot)`` index ``t*k + j`` of each sorted row.
        num_tokens: ``T``.
    """

    token_index: torch.Tensor
    expert_index: torch.Tensor
    weights: torch.Tensor
    offsets: torch.Tensor
    perm: torch.Tensor
    num_tokens: int

    @property
    def group_sizes(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


def route_tokens(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int
) -> TokenRouting:
    """Sort ``(token, slot)`` pairs by expert (stable: ties keep token order).

    Args:
        top_k_index: `[T, k]` integer expert ids in ``[0, num_experts)``.
        top_k_weights: `[T, k]` routing weights the model applies (after its own normalisation).
        num_experts: ``E``.

    Raises:
        ValueError: shapes disagree or an expert id is out of range.
    """
    if top_k_index.dim() != 2:
        raise ValueError(f"top_k_index must be [T, k], got shape {tuple(top_k_index.shape)}")
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"top_k_weights must have the shape of top_k_index {tuple(top_k_index.shape)}, got {tuple(top_k_weights.shape)}"
        )
    if top_k_index.dtype.is_floating_point:
        raise TypeError(f"top_k_index must be an integer tensor, got {top_k_index.dtype}")
    if not torch.compiler.is_compiling() and top_k_index.numel() > 0:
        lo, hi = int(top_k_index.min()), int(top_k_index.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(
                f"top_k_index holds expert ids in [{lo}, {hi}], expected [0, {num_experts})"
            )
    T, k = top_k_index.shape
    flat = top_k_index.reshape(-1).to(torch.int64)
    perm = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return TokenRouting(
        token_index=perm // k,
        expert_index=flat[perm],
        weights=top_k_weights.reshape(-1)[perm],
        offsets=offsets,
        perm=perm,
        num_tokens=T,
    )


def gather_tokens(hidden: torch.Tensor, routing: TokenRouting) -> torch.Tensor:
    """`[T, H]` -> `[T*k, H]` rows in expert-sorted order."""
    return hidden.index_select(0, routing.token_index)


def scatter_tokens(
    y_sorted: torch.Tensor, routing: TokenRouting, *, weighted: bool = True
) -> torch.Tensor:
    """`[T*k, N]` expert-sorted rows -> `[T, N]`, summing each token's ``k`` rows (times its weights)."""
    if weighted:
        y_sorted = y_sorted * routing.weights.to(y_sorted.dtype)[:, None]
    out = y_sorted.new_zeros((routing.num_tokens, y_sorted.shape[1]))
    return out.index_add(0, routing.token_index, y_sorted)
