"""Turn a router's top-k choice into the expert-sorted token layout the grouped ops take.

One implementation shared by layers, integrations and benchmarks. Everything
here has data-independent output shapes (``T*k`` rows, ``E+1`` offsets), so it
traces under ``torch.compile`` without graph breaks, and nothing reads a device
tensor on the host: the expert-id check is a device-side assert on accelerators
(see :mod:`~drlora_kernels.ops._sync`), and the offsets come from a
``searchsorted`` of the sorted expert ids (``bincount`` on CUDA reads the maximum
id on the host to size its output: a sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validate import check_expert_ids


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
        ValueError: shapes disagree or an expert id is out of range (on accelerators the
            range check is a device-side assert, see :mod:`~drlora_kernels.ops._sync`).
        TypeError: ``top_k_index`` is not an integer tensor.
    """
    if top_k_index.dim() != 2:
        raise ValueError(f"top_k_index must be [T, k], got shape {tuple(top_k_index.shape)}")
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"top_k_weights must have the shape of top_k_index {tuple(top_k_index.shape)}, got {tuple(top_k_weights.shape)}"
        )
    if top_k_index.dtype.is_floating_point or top_k_index.dtype == torch.bool:
        raise TypeError(f"top_k_index must be an integer tensor, got {top_k_index.dtype}")
    check_expert_ids(top_k_index, num_experts)
    T, k = top_k_index.shape
    flat = top_k_index.reshape(-1).to(torch.int64)
    perm = torch.argsort(flat, stable=True)
    expert_index = flat[perm]
    # offsets[e] = number of rows routed to experts < e
    bounds = torch.arange(num_experts + 1, dtype=torch.int64, device=flat.device)
    offsets = torch.searchsorted(expert_index, bounds, out_int32=True)
    return TokenRouting(
        token_index=perm // k,
        expert_index=expert_index,
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
