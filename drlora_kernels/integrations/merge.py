"""Fold the active ranks of a DR-LoRA adapter into the base expert weights, and back.

``merge_drlora`` adds ``s * B_e[:, :r_e] @ A_e[:r_e]`` to expert ``e`` of every adapted
projection (transposed for ``[E, in, out]`` layouts), one expert at a time so no full
``[E, out, in]`` delta is ever held, and marks the adapters merged: the experts then run
their base implementation, with the LoRA update inside the weights (inference speed of the
base model). ``unmerge_drlora`` subtracts the same update. The update is computed in fp32
and rounded once into the weight's dtype, so unmerging restores fp32 weights to within
float rounding (not bit for bit; low-precision weights lose more).
"""

from __future__ import annotations

import torch

from .transformers import DRLoRAModel, get_drlora

__all__ = ["merge_drlora", "unmerge_drlora"]


@torch.no_grad()
def _fold(handle: DRLoRAModel, sign: float) -> None:
    for name, adapter in handle.adapters:
        module = handle.model.get_submodule(name) if name else handle.model
        for proj in adapter.projections:
            pool = adapter.pool(proj)
            weight = getattr(module, proj)
            for e, r in enumerate(pool.ranks.tolist()):
                if r == 0:
                    continue
                delta = pool.lora_B[e, :, :r].float() @ pool.lora_A[e, :r].float()  # [out, in]
                if adapter.layout.transposed:
                    delta = delta.T
                weight[e] = (weight[e].float() + (sign * pool.scaling) * delta).to(weight.dtype)


def merge_drlora(model_or_handle) -> DRLoRAModel:
    """Fold the active ranks into the base weights; the adapters stop computing (see module doc).

    Raises:
        ValueError: already merged.
    """
    handle = get_drlora(model_or_handle)
    if any(a.merged for _, a in handle.adapters):
        raise ValueError("DR-LoRA adapters are already merged; call unmerge_drlora first")
    _fold(handle, +1.0)
    for _, adapter in handle.adapters:
        adapter.merged = True
    return handle


def unmerge_drlora(model_or_handle) -> DRLoRAModel:
    """Subtract the folded update again and let the adapters compute it (undoes :func:`merge_drlora`).

    Raises:
        ValueError: not merged.
    """
    handle = get_drlora(model_or_handle)
    if not all(a.merged for _, a in handle.adapters):
        raise ValueError("DR-LoRA adapters are not merged")
    _fold(handle, -1.0)
    for _, adapter in handle.adapters:
        adapter.merged = False
    return handle
