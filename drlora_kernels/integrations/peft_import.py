"""Import a PEFT LoRA adapter on expert parameters (``target_parameters``) into the rank pools.

The inverse of :func:`~drlora_kernels.integrations.peft_export.export_peft`: every targeted
3-D expert parameter becomes a pool whose experts all start at the PEFT rank ``r`` of that
parameter (``rank_pattern``), filled with PEFT's factors (``lora_A.weight [E*r, in]``
expert-major, ``lora_B.weight [out, r*E]`` rank-major, see ``peft_export``), so the DR-LoRA
model computes what the ``PeftModel`` computes. PEFT's scale ``alpha_p / r`` (``alpha_p /
sqrt(r)`` with rsLoRA) is kept by folding ``alpha_p / r / s`` into ``B`` when the pool's fixed
scale ``s`` differs. Routers saved by PEFT as ``modules_to_save`` are loaded too.

Why a function of its own rather than :func:`load_drlora` accepting a PEFT directory: a PEFT
adapter has one rank per parameter, no per-expert ranks and no growth state, and it may need a
DR-LoRA config to be made up for it; a DR-LoRA checkpoint must match the model and config
exactly. Keeping the two apart keeps ``load_drlora``'s checks strict (it points here when it
is given a PEFT directory).

Without a config, the model is attached with the uniform one that reproduces the adapter
(``r_init = r_target = r_max = r``, PEFT's ``lora_alpha`` and rsLoRA flag, the targeted
projections and layers, per-parameter ranks as ``rank_pattern``): a PEFT run to compare with.
To continue it with DR-LoRA, attach (or pass) a config with the same targets and a larger
``r_target``/``r_max``: the pools start at the PEFT rank and grow from there.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..config import DRLoRAConfig
from ._io import MANIFEST_NAME, verify_directory
from .peft_export import ADAPTER_WEIGHTS, peft_orientation_matches, wrapper_paths
from .transformers import (
    DRLoRAModel,
    _experts_with_family,
    attach_drlora,
    detach_drlora,
    experts_layout,
    get_drlora,
)

__all__ = ["import_peft", "read_peft_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
# LoraConfig options whose effect DR-LoRA cannot reproduce on expert parameters
_UNSUPPORTED = {
    "use_dora": False,
    "lora_bias": False,
    "fan_in_fan_out": False,
    "layer_replication": None,
    "trainable_token_indices": None,
}


def read_peft_adapter(
    directory: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` of a PEFT adapter directory (``save_pretrained`` format).

    A directory written by :func:`export_peft` carries a manifest, which is verified.

    Raises:
        ValueError: missing or unreadable files, not a LoRA adapter, or options DR-LoRA cannot
            reproduce (DoRA, LoRA bias, ``target_modules`` besides the expert parameters...).
    """
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(
            f"no PEFT adapter in {directory} (need {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}; "
            "adapter_model.bin is not read: re-save it with safe_serialization=True)"
        )
    if (directory / MANIFEST_NAME).is_file():
        verify_directory(directory)
    try:
        config = json.loads(config_path.read_text())
        tensors = load_file(str(weights_path))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as exc:
        raise ValueError(f"unreadable PEFT adapter in {directory}: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ValueError(
            f"{config_path} is not a LoRA adapter (peft_type={config.get('peft_type')!r})"
        )
    if not config.get("target_parameters"):
        raise ValueError(
            f"{config_path} has no target_parameters: import_peft reads LoRA adapters on 3-D expert "
            "parameters (LoraConfig(target_parameters=[...]))"
        )
    if config.get("target_modules"):
        raise ValueError(
            f"{config_path} also adapts target_modules={config['target_modules']}: DR-LoRA adapts the "
            "experts only, those layers would be dropped"
        )
    for key, neutral in _UNSUPPORTED.items():
        if config.get(key, neutral) not in (neutral, [], {}):
            raise ValueError(
                f"{config_path}: {key}={config[key]!r} is not supported by import_peft"
            )
    return config, tensors


def _pattern(patterns: dict[str, Any], name: str, default):
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), name)
    return patterns.get(key, default)


def _targeted(model, peft_config: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """``[(experts_module_name, projection, family)]`` the adapter targets (PEFT's name matching)."""
    keys = list(peft_config["target_parameters"])
    out = []
    for name, module, family in _experts_with_family(model):
        layout = experts_layout(module) if family is None else family.layout(module)
        for proj in layout.projections:
            full = f"{name}.{proj}" if name else proj
            if full in keys or any(full.endswith(f".{k}") for k in keys):
                out.append((name, proj, family))
    if not out:
        raise ValueError(
            f"target_parameters={keys} match no expert projection of {type(model).__name__}"
        )
    return out


def _derived_config(peft_config: dict[str, Any], targeted, model) -> DRLoRAConfig:
    """The uniform DR-LoRA config that reproduces the adapter (module docstring)."""
    r_default = int(peft_config.get("r", 8))
    ranks = {
        f"{n}.{p}" if n else p: int(
            _pattern(peft_config.get("rank_pattern") or {}, f"{n}.{p}", r_default)
        )
        for n, p, _ in targeted
    }
    r_max = max(ranks.values())
    projections = tuple(dict.fromkeys(p for _, p, _ in targeted))
    cfg = DRLoRAConfig(
        r_init=r_max, r_target=r_max, r_max=r_max,
        alpha=float(peft_config.get("lora_alpha", r_default)),
        scaling="rslora" if peft_config.get("use_rslora") else "standard",
        target_modules=projections,
        rank_pattern={re.escape(name): r for name, r in ranks.items() if r != r_max},
    )  # fmt: skip
    modules = {n for n, _, _ in targeted}
    all_modules = [n for n, _, _ in _experts_with_family(model)]
    if set(all_modules) != modules:
        layers = sorted({cfg.layer_index(n) for n in modules})
        if None in layers:
            raise ValueError(
                "the adapter targets only some MoE layers, and their names carry no layer index: "
                "pass a DRLoRAConfig with the targets yourself"
            )
        cfg.layers_to_transform = tuple(layers)
    return cfg


def import_peft(
    model_or_handle,
    directory: str | os.PathLike,
    *,
    config: DRLoRAConfig | None = None,
    total_steps: int | None = None,
) -> DRLoRAModel:
    """Fill the rank pools with a PEFT ``target_parameters`` LoRA adapter, at its ranks.

    Args:
        model_or_handle: the base model the adapter was trained on (attached or not), or its handle.
        directory: the PEFT adapter directory (``PeftModel.save_pretrained`` or :func:`export_peft`).
        config: the DR-LoRA config to attach with when ``model`` has no DR-LoRA yet (default: the
            uniform config that reproduces the adapter, see the module docstring). Its targets
            must be exactly the adapter's.
        total_steps: create the growth controller for a run of this many steps (to continue training).

    Returns:
        The handle; the model's outputs are the ``PeftModel``'s (up to float rounding).

    Raises:
        ValueError: an unsupported or unreadable adapter, targets that differ from the pools,
            a PEFT rank above a pool's ``r_max``, or (with a controller) imported ranks above the
            layer's budget. The model is left as it was (attached by this call: detached again).
    """
    directory = Path(directory)
    peft_config, tensors = read_peft_adapter(directory)
    try:
        handle = get_drlora(model_or_handle)
    except ValueError:
        handle = None
    model = handle.model if handle is not None else model_or_handle
    targeted = _targeted(model, peft_config)
    attached_here = handle is None
    if attached_here:
        cfg = config if config is not None else _derived_config(peft_config, targeted, model)
        handle = get_drlora(attach_drlora(model, cfg))
    try:
        if total_steps is not None and handle.controller is None:
            handle.setup_controller(total_steps)
        _fill(handle, peft_config, tensors, targeted, directory)
    except BaseException:
        if attached_here:
            detach_drlora(handle.model)
        raise
    return handle


def _fill(handle: DRLoRAModel, peft_config, tensors, targeted, directory) -> None:
    names = {f"{n}.{p}" if n else p for n, p, _ in targeted}
    pools = dict(handle.named_pools())
    if set(pools) != names:
        raise ValueError(
            f"the adapter in {directory} targets {sorted(names)[:4]}..., the model's DR-LoRA pools are "
            f"{sorted(pools)[:4]}... (attach with the same target_modules / layers_to_transform)"
        )
    paths = wrapper_paths(handle)
    r_default = int(peft_config.get("r", 8))
    alpha_default = float(peft_config.get("lora_alpha", r_default))
    staged = []
    for module_name, adapter in handle.adapters:
        module = handle.model.get_submodule(module_name) if module_name else handle.model
        matches = peft_orientation_matches(module, adapter.layout)
        for proj in adapter.projections:
            name = f"{module_name}.{proj}" if module_name else proj
            pool = pools[name]
            key = f"{_PREFIX}{paths[name]}"
            a, b = tensors.get(f"{key}.lora_A.weight"), tensors.get(f"{key}.lora_B.weight")
            if a is None or b is None:
                raise ValueError(f"PEFT adapter in {directory} has no {key}.lora_A/lora_B.weight")
            E = pool.num_experts
            r = int(_pattern(peft_config.get("rank_pattern") or {}, name, r_default))
            k_in, n_out = (
                (pool.in_features, pool.out_features)
                if matches
                else (pool.out_features, pool.in_features)
            )
            if tuple(a.shape) != (E * r, k_in) or tuple(b.shape) != (n_out, r * E):
                raise ValueError(
                    f"PEFT adapter in {directory}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                    f"expected {(E * r, k_in)} and {(n_out, r * E)} (rank {r}, {E} experts)"
                )
            if r > pool.r_max:
                raise ValueError(f"{name}: the PEFT rank {r} exceeds the pool's r_max={pool.r_max}")
            alpha = float(_pattern(peft_config.get("alpha_pattern") or {}, name, alpha_default))
            peft_scale = alpha / (math.sqrt(r) if peft_config.get("use_rslora") else r)
            a = a.reshape(E, r, k_in).float()  # [E, r, in_p]
            b = b.reshape(n_out, r, E).permute(2, 0, 1).float()  # [E, out_p, r]
            if not matches:  # PEFT sees the parameter the other way round (e.g. Llama4)
                a, b = b.transpose(1, 2), a.transpose(1, 2)
            staged.append((pool, r, a, b * (peft_scale / pool.scaling)))
    _check_budget(handle, {id(pool): r for pool, r, _, _ in staged})
    routers = _stage_routers(handle, peft_config, tensors, directory)
    with torch.no_grad():
        for pool, r, a, b in staged:
            pool.lora_A[:, :r].copy_(a)
            pool.lora_B[:, :, :r].copy_(b)
            pool.lora_B[:, :, r:].zero_()
            pool.ranks.fill_(r)
        for param, value in routers:
            param.copy_(value)


def _check_budget(handle: DRLoRAModel, ranks: dict[int, int]) -> None:
    controller = handle.controller
    if controller is None:
        return
    targets = controller.schedule.module_targets
    for layer, pools in enumerate(handle.pools):
        total = sum(ranks[id(p)] * p.num_experts for p in pools)
        budget = (
            int(targets[layer].sum())
            if targets is not None
            else controller.num_modules * handle.config.r_target
        )
        if total > budget:
            raise ValueError(
                f"the imported ranks give layer {layer} {total} active ranks, above its DR-LoRA budget "
                f"{budget}: raise r_target (and r_max) to continue this adapter with growth"
            )


def _stage_routers(handle: DRLoRAModel, peft_config, tensors, directory) -> list:
    """The router weights (and their modules' buffers) saved as PEFT ``modules_to_save``."""
    if not peft_config.get("modules_to_save"):
        return []
    routers = {name for name, _ in handle.named_router_parameters()}
    router_modules = {name.rpartition(".")[0] for name in routers}
    state = handle.model.state_dict(keep_vars=True)
    out = []
    for key, value in tensors.items():
        if not key.startswith(_PREFIX) or ".lora_" in key:
            continue
        name = key[len(_PREFIX) :]
        if name.rpartition(".")[0] not in router_modules or name not in state:
            raise ValueError(
                f"PEFT adapter in {directory} saves {name} (modules_to_save); import_peft loads only "
                f"the trainable routers of the adapted MoE layers ({sorted(router_modules)[:2]}...)"
            )
        target = state[name]
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(
                f"{name}: saved shape {tuple(value.shape)}, the model's {tuple(target.shape)}"
            )
        out.append((target, value))
    return out
