"""Export a DR-LoRA adapter as a stock PEFT LoRA adapter (``target_parameters``).

PEFT (>= 0.17) adapts a 3-D expert parameter with ``lora.ParamWrapper``. For an
expert stack with ``E`` experts and rank ``r`` it holds (peft/tuners/lora/layer.py):

* ``lora_A.weight [E*r, in]``, **expert-major**: row ``e*r + j`` is slot ``j`` of expert ``e``;
* ``lora_B.weight [out, r*E]``, **rank-major**: column ``j*E + e`` is slot ``j`` of expert ``e``
  (it reshapes to ``[out, r, E]``);
* ``scaling = lora_alpha / r``; ``in``/``out`` follow the parameter's layout as PEFT reads it:
  ``[E, out, in]``, or ``[E, in, out]`` when the experts module sets ``is_transposed``. A module
  that stores ``[E, in, out]`` without saying so (Llama4's experts) is read by PEFT as
  ``[E, out, in]``: the same low-rank update of the same parameter, with the roles of the two
  factors exchanged, so the export writes ``lora_A = B^T`` and ``lora_B = A^T`` there
  (:func:`peft_orientation_matches`).

PEFT has one rank per parameter, DR-LoRA one per expert, so each projection is exported at
its largest active rank, every expert's slots beyond its own rank are zero (in ``A`` and
``B``: the inactive slots of the pool may hold anything), the rank and alpha of each
parameter go to ``rank_pattern``/``alpha_pattern`` with ``alpha = r`` (scaling 1), and the
DR-LoRA scale is folded into ``B``.

Several targeted parameters of one module nest ``ParamWrapper``s in the order the module
registers them: the first is innermost, so its weights live under ``<module>.base_layer``.

The routers train after warmup, so they are part of the adapter: they are exported as PEFT
``modules_to_save`` (their weights under ``base_model.model.<router module>.<param>``), and a
``PeftModel`` loaded from the export uses the trained routers. The directory is written through
the same atomic machinery as :func:`~drlora_kernels.integrations.save_drlora` (``_io.py``: a kill
leaves the previous export or the new one, with a SHA-256 manifest that PEFT ignores).
"""

from __future__ import annotations

import os
import re

import torch
from safetensors.torch import save_file

from ..pool import RankPool
from ._io import atomic_directory
from .transformers import get_drlora

__all__ = ["export_peft", "peft_factors", "peft_orientation_matches", "wrapper_paths"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_orientation_matches(module: torch.nn.Module, layout) -> bool:
    """Whether PEFT reads ``module``'s weights the way the pools do (``is_transposed`` or not)."""
    return bool(getattr(module, "is_transposed", False)) == layout.transposed


@torch.no_grad()
def peft_factors(
    pool: RankPool, rank: int | None = None, *, swap: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A.weight [E*r, in], lora_B.weight [out, r*E])`` in PEFT's layout, scale folded into ``B``.

    Args:
        pool: the rank pool of one projection.
        rank: the exported rank ``r`` (default: the pool's largest active rank, at least 1).
        swap: PEFT reads the parameter transposed (:func:`peft_orientation_matches` is False):
            write ``lora_A = B^T [E*r, out]`` and ``lora_B = A^T [in, r*E]`` (same product).
    """
    E, K, N = pool.num_experts, pool.in_features, pool.out_features
    r = max(int(pool.ranks.max()), 1) if rank is None else rank
    if r < int(pool.ranks.max()):
        raise ValueError(
            f"rank={r} is below the pool's largest active rank {int(pool.ranks.max())}"
        )
    mask = pool.active_mask()[:, :r]  # [E, r]; r may exceed r_max only through the caller
    a = torch.zeros(E, r, K, dtype=torch.float32, device=pool.lora_A.device)
    b = torch.zeros(E, N, r, dtype=torch.float32, device=pool.lora_B.device)
    width = min(r, pool.r_max)
    a[:, :width] = torch.where(mask[:, :width, None], pool.lora_A[:, :width].float(), 0.0)
    b[:, :, :width] = (
        torch.where(mask[:, None, :width], pool.lora_B[:, :, :width].float(), 0.0) * pool.scaling
    )
    if swap:
        a, b = b.transpose(1, 2), a.transpose(1, 2)  # [E, r, N], [E, K, r]
    lora_a = a.reshape(E * r, a.shape[-1])
    lora_b = b.permute(1, 2, 0).reshape(b.shape[1], r * E)
    return lora_a.to(pool.lora_A.dtype), lora_b.to(pool.lora_B.dtype)


def wrapper_paths(handle) -> dict[str, str]:
    """Qualified parameter name -> module path of its PEFT ``ParamWrapper`` (``.base_layer`` nesting)."""
    paths = {}
    for name, adapter in handle.adapters:
        module = handle.model.get_submodule(name) if name else handle.model
        order = [n for n, _ in module.named_parameters(recurse=False) if n in adapter.projections]
        for i, param in enumerate(order):
            depth = len(order) - 1 - i
            prefix = f"{name}." if name else ""
            paths[f"{prefix}{param}"] = (
                (name + ".base_layer" * depth) if name else ".".join(["base_layer"] * depth)
            )
    return paths


def _router_modules(handle) -> dict[str, dict[str, torch.Tensor]]:
    """Router module name -> its state (parameters and buffers, as PEFT's ``modules_to_save`` saves it)."""
    trained = dict(handle.named_router_parameters())
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for module_name in dict.fromkeys(n.rpartition(".")[0] for n in trained):
        module = handle.model.get_submodule(module_name)
        own = {f"{module_name}.{n}" for n, _ in module.named_parameters()}
        if own - set(trained):
            raise ValueError(
                f"router module {module_name} holds parameters that DR-LoRA does not train "
                f"({sorted(own - set(trained))}): PEFT's modules_to_save would export them all"
            )
        modules[module_name] = {k: v.detach() for k, v in module.state_dict().items()}
    return modules


def export_peft(
    model_or_handle, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None
):
    """Write a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) to ``directory``.

    Load it with ``PeftModel.from_pretrained(base_model, directory)`` on the same base weights;
    its outputs equal the DR-LoRA model's (up to float rounding), trained routers included
    (``modules_to_save``). The directory is written through a temporary sibling and replaces any
    previous export as a whole (see the module docstring). :func:`import_peft` reads it back.

    Returns:
        The ``peft.LoraConfig`` written.

    Raises:
        ValueError: a projection is merged into the base weights (unmerge first), or a router
            module holds parameters that DR-LoRA does not train.
    """
    from peft import LoraConfig

    handle = get_drlora(model_or_handle)
    if any(adapter.merged for _, adapter in handle.adapters):
        raise ValueError("export_peft needs unmerged adapters: call unmerge_drlora(model) first")
    paths = wrapper_paths(handle)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    names = []
    for module_name, adapter in handle.adapters:
        module = handle.model.get_submodule(module_name) if module_name else handle.model
        swap = not peft_orientation_matches(module, adapter.layout)
        for proj in adapter.projections:
            name = f"{module_name}.{proj}" if module_name else proj
            pool = adapter.pool(proj)
            r = max(int(pool.ranks.max()), 1)
            lora_a, lora_b = peft_factors(pool, r, swap=swap)
            key = f"base_model.model.{paths[name]}"
            tensors[f"{key}.lora_A.weight"] = lora_a.detach().cpu().contiguous()
            tensors[f"{key}.lora_B.weight"] = lora_b.detach().cpu().contiguous()
            rank_pattern[re.escape(name)] = r
            names.append(name)
    routers = _router_modules(handle)
    for module_name, params in routers.items():
        for param, value in params.items():
            tensors[f"base_model.model.{module_name}.{param}"] = value.cpu().contiguous()
    r_default = max(rank_pattern.values())
    config = LoraConfig(
        r=r_default,
        lora_alpha=r_default,
        rank_pattern=dict(rank_pattern),
        alpha_pattern=dict(rank_pattern),  # alpha = r: scaling 1, the DR-LoRA scale is in B
        target_modules=[],
        target_parameters=names,
        modules_to_save=sorted(routers) or None,
        lora_dropout=0.0,
        bias="none",
        base_model_name_or_path=base_model_name_or_path,
    )
    with atomic_directory(directory, "adapter_config.json") as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return config
