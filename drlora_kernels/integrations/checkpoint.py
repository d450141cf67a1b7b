"""Save and load a DR-LoRA adapter: safetensors for the tensors, JSON for everything else.

A checkpoint is a directory holding

* ``drlora_adapter.safetensors``: per adapted projection ``<name>.lora_A [E, R, K]``,
  ``<name>.lora_B [E, N, R]``, ``<name>.ranks [E]`` (``<name>`` is the qualified parameter
  name, e.g. ``model.layers.0.mlp.experts.gate_up_proj``), the trainable routers under
  ``router.<parameter name>`` (they train after warmup, so they are part of the adapter), plus
  the controller's tensors under ``controller.*`` (ranks, frequency and importance EMAs,
  pending routing);
* ``drlora_config.json``: the :class:`~drlora_kernels.config.DRLoRAConfig`, the pool
  shapes, the ranks, ``total_steps`` and the controller's step counter, schedule
  fingerprint and event log.

Under ``torch.distributed`` (DDP, FSDP2, ZeRO) saving is collective: the full tensors are
gathered through the training engine (:mod:`drlora_kernels.engines`) and only global rank 0
writes; loading reads the files on every process and writes each its part.

Writes go to a temporary sibling directory that replaces the target only when complete,
so an existing checkpoint is never left half-overwritten. Loading validates everything
(files, format, pool names and shapes, ``r_max``, rank range) and raises ``ValueError``
naming the mismatch before any tensor of the model is touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import DRLoRAConfig
from ..engines import Engine, detect_engine, is_global_writer
from ._io import atomic_directory
from .transformers import DRLoRAModel, attach_drlora, get_drlora

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "load_drlora",
    "read_drlora_config",
    "save_drlora",
]

FORMAT_VERSION = 1
WEIGHTS_NAME = "drlora_adapter.safetensors"
CONFIG_NAME = "drlora_config.json"
_CONTROLLER_PREFIX = "controller."
_ROUTER_PREFIX = "router."
# Fields of the config that change the adapter's function; they must match on load.
_FUNCTIONAL_FIELDS = ("r_max", "r_target", "alpha", "scaling", "target_modules")


def _pool_entries(handle: DRLoRAModel) -> list[dict[str, Any]]:
    entries = []
    for layer, (name, adapter) in enumerate(handle.adapters):
        for p in adapter.projections:
            pool = adapter.pool(p)
            entries.append({
                "name": f"{name}.{p}" if name else p,
                "layer": layer,
                "num_experts": pool.num_experts,
                "in_features": pool.in_features,
                "out_features": pool.out_features,
                "r_max": pool.r_max,
                "scaling": pool.scaling,
                "dtype": str(pool.lora_A.dtype).removeprefix("torch."),
            })  # fmt: skip
    return entries


def _split_controller_state(
    state: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (flattened to ``controller.<key>``) for safetensors, everything else for JSON."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors[_CONTROLLER_PREFIX + key] = value
        elif (
            isinstance(value, dict)
            and value
            and all(isinstance(v, torch.Tensor) for v in value.values())
        ):
            for k, v in value.items():
                tensors[f"{_CONTROLLER_PREFIX}{key}.{k}"] = v
            meta.setdefault("_tensor_dicts", []).append(key)
        else:
            meta[key] = value
    return tensors, meta


def _join_controller_state(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> dict[str, Any]:
    state = {k: v for k, v in meta.items() if k != "_tensor_dicts"}
    groups = set(meta.get("_tensor_dicts", []))
    for full, value in tensors.items():
        key = full[len(_CONTROLLER_PREFIX) :]
        head, _, tail = key.partition(".")
        if head in groups and tail:
            state.setdefault(head, {})[tail] = value
        else:
            state[key] = value
    return state


def save_drlora(model_or_handle, directory: str | os.PathLike) -> Path:
    """Write the adapter (pools, ranks, config, controller state) to ``directory``.

    ``directory`` is created, or atomically replaced if it already holds a DR-LoRA
    checkpoint; a non-empty directory holding anything else is refused.

    Under ``torch.distributed`` this is collective: every process calls it, the full values
    of sharded pools and routers are gathered through the training engine (FSDP2, ZeRO),
    and only global rank 0 writes; the others return once it has (or raise if it failed).

    Returns:
        The checkpoint directory.

    Raises:
        ValueError: ``directory`` exists and is not a DR-LoRA checkpoint.
        RuntimeError: the engine returned a partial tensor (never written), or rank 0 failed.
    """
    handle = get_drlora(model_or_handle)
    target = Path(directory)
    tensors = _gather_adapter(handle, _engine(handle))
    controller_meta = None
    if handle.controller is not None:
        ctensors, controller_meta = _split_controller_state(handle.controller.state_dict())
        tensors.update(ctensors)
    meta = {
        "format": FORMAT_VERSION,
        "model_class": type(handle.model).__name__,
        "config": handle.config.to_dict(),
        "total_steps": handle.total_steps,
        "pools": _pool_entries(handle),
        "ranks": {name: pool.ranks.tolist() for name, pool in handle.named_pools()},
        "controller": controller_meta,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def write() -> None:
        with atomic_directory(target, CONFIG_NAME) as tmp:
            save_file(
                tensors,
                str(tmp / WEIGHTS_NAME),
                metadata={"format": "pt", "drlora_format": str(FORMAT_VERSION)},
            )
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    _write_on_global_rank0(write, target)
    return target


# ------------------------------------------------------------- distributed collection
def _engine(handle: DRLoRAModel) -> Engine:
    """The training engine of the model: the controller's, or detected from the parameters."""
    if handle.controller is not None and handle.controller.bound_engine is not None:
        return handle.controller.bound_engine
    return detect_engine(handle.model)


def _full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The real shape of a parameter (ZeRO-3 keeps ``(0,)`` outside forward and the shape in ``ds_shape``)."""
    return tuple(getattr(param, "ds_shape", None) or param.shape)


def _gather_full(engine: Engine, key: str, param: torch.Tensor, shape) -> torch.Tensor:
    """``engine.gather_full(param)`` (collective), refusing anything but the full ``shape``."""
    value = engine.gather_full(param)
    if tuple(value.shape) != tuple(shape):
        raise RuntimeError(
            f"the {engine.name!r} engine returned {key} of shape {tuple(value.shape)} instead of the full "
            f"{tuple(shape)}: refusing to write a partial DR-LoRA adapter"
        )
    return value


def _gather_adapter(handle: DRLoRAModel, engine: Engine) -> dict[str, torch.Tensor]:
    """Full values of every pool (``lora_A``, ``lora_B``, ``ranks``) and router, on every process."""
    tensors: dict[str, torch.Tensor] = {}
    for name, pool in handle.named_pools():
        E, R, K, N = pool.num_experts, pool.r_max, pool.in_features, pool.out_features
        tensors[f"{name}.lora_A"] = _gather_full(engine, f"{name}.lora_A", pool.lora_A, (E, R, K))
        tensors[f"{name}.lora_B"] = _gather_full(engine, f"{name}.lora_B", pool.lora_B, (E, N, R))
        tensors[f"{name}.ranks"] = pool.ranks.detach().cpu()
    for name, param in handle.named_router_parameters():
        key = _ROUTER_PREFIX + name
        tensors[key] = _gather_full(engine, key, param, _full_shape(param))
    return tensors


def _write_on_global_rank0(write, target: Path) -> None:
    """Run ``write()`` on global rank 0 only; under ``torch.distributed`` every process returns
    after it (and raises if it failed), so no process goes on with a missing checkpoint."""
    error: BaseException | None = None
    if is_global_writer():
        try:
            write()
        except BaseException as exc:  # re-raised below, after telling the other processes
            error = exc
    if dist.is_available() and dist.is_initialized():
        status = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(status, src=0)
        if error is None and status[0] is not None:
            raise RuntimeError(
                f"rank 0 failed to write the DR-LoRA checkpoint {target}: {status[0]}"
            )
    if error is not None:
        raise error


def read_drlora_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``drlora_config.json`` of a checkpoint (``ValueError`` if missing or corrupted)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"no DR-LoRA checkpoint in {directory} (missing {CONFIG_NAME})")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupted DR-LoRA checkpoint {path}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(
            f"{path} has DR-LoRA format {fmt!r}, this version reads format {FORMAT_VERSION}"
        )
    for key in ("config", "pools", "ranks"):
        if key not in meta:
            raise ValueError(f"corrupted DR-LoRA checkpoint {path}: missing {key!r}")
    return meta


def _check_compatible(handle: DRLoRAModel, meta: dict[str, Any], directory) -> None:
    saved_cfg = meta["config"]
    ours = handle.config.to_dict()
    for key in _FUNCTIONAL_FIELDS:
        if saved_cfg.get(key) != ours[key]:
            raise ValueError(
                f"checkpoint {directory} was saved with {key}={saved_cfg.get(key)!r}, "
                f"the model's DR-LoRA config has {key}={ours[key]!r}"
            )
    saved = {p["name"]: p for p in meta["pools"]}
    current = {p["name"]: p for p in _pool_entries(handle)}
    if set(saved) != set(current):
        missing, extra = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
        raise ValueError(
            f"checkpoint {directory} does not match the model ({type(handle.model).__name__}): "
            f"pools missing from the checkpoint {missing[:3]}, unknown pools {extra[:3]}"
        )
    for name, entry in current.items():
        for key in ("num_experts", "in_features", "out_features", "r_max"):
            if saved[name].get(key) != entry[key]:
                raise ValueError(
                    f"checkpoint {directory}: pool {name} has {key}={saved[name].get(key)}, the model's has {entry[key]}"
                )


def _load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise ValueError(f"no DR-LoRA checkpoint in {directory} (missing {WEIGHTS_NAME})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"corrupted DR-LoRA weights {path}: {exc}") from None


def load_drlora(
    model_or_handle, directory: str | os.PathLike, *, load_controller: bool = True
) -> DRLoRAModel:
    """Load a :func:`save_drlora` checkpoint into ``model`` (attaching DR-LoRA first if needed).

    A model without DR-LoRA is attached with the saved config (and the saved ``total_steps``,
    so the controller exists when the checkpoint holds controller state). An attached model
    must match the checkpoint: same pools (names, ``E``, in/out sizes), same ``r_max``,
    ``r_target``, ``alpha``, ``scaling`` and targets.

    Args:
        model_or_handle: the model or its :class:`DRLoRAModel`.
        directory: the checkpoint directory.
        load_controller: also restore the controller's statistics, step and event log.

    Returns:
        The handle.

    Raises:
        ValueError: missing or corrupted files, or a checkpoint that does not fit the model.
    """
    directory = Path(directory)
    meta = read_drlora_config(directory)
    tensors = _load_tensors(directory)
    try:
        handle = get_drlora(model_or_handle)
    except ValueError:
        handle = None
    if handle is None:
        try:
            config = DRLoRAConfig.from_dict(meta["config"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"corrupted DR-LoRA config in {directory}: {exc}") from None
        handle = get_drlora(attach_drlora(model_or_handle, config))
    _check_compatible(handle, meta, directory)

    staged: list[tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for name, pool in handle.named_pools():
        parts = []
        for suffix, like in (
            ("lora_A", pool.lora_A),
            ("lora_B", pool.lora_B),
            ("ranks", pool.ranks),
        ):
            t = tensors.get(f"{name}.{suffix}")
            if t is None:
                raise ValueError(
                    f"corrupted DR-LoRA weights in {directory}: missing tensor {name}.{suffix}"
                )
            if tuple(t.shape) != _full_shape(like):
                raise ValueError(
                    f"DR-LoRA weights in {directory}: {name}.{suffix} has shape {tuple(t.shape)}, "
                    f"the model's has {_full_shape(like)}"
                )
            parts.append(t)
        ranks = parts[2]
        if (
            ranks.dtype.is_floating_point
            or bool((ranks < 0).any())
            or bool((ranks > pool.r_max).any())
        ):
            raise ValueError(
                f"DR-LoRA weights in {directory}: {name}.ranks must be integers in [0, {pool.r_max}]"
            )
        staged.append((pool, *parts))

    params = dict(handle.model.named_parameters())
    routers: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    for key, value in tensors.items():
        if not key.startswith(_ROUTER_PREFIX):
            continue
        name = key[len(_ROUTER_PREFIX) :]
        param = params.get(name)
        if param is None or _full_shape(param) != tuple(value.shape):
            raise ValueError(
                f"DR-LoRA weights in {directory}: router parameter {name} "
                f"{'is not in the model' if param is None else f'has shape {tuple(value.shape)}, the model has {_full_shape(param)}'}"
            )
        routers.append((param, value))

    controller_state = None
    if load_controller and meta.get("controller") is not None:
        ctensors = {k: v for k, v in tensors.items() if k.startswith(_CONTROLLER_PREFIX)}
        controller_state = _join_controller_state(ctensors, meta["controller"])
        if handle.controller is None:
            total = meta.get("total_steps")
            if not isinstance(total, int):
                raise ValueError(
                    f"corrupted DR-LoRA checkpoint {directory}: controller state without total_steps"
                )
            handle.setup_controller(total)

    if controller_state is not None:  # validates the schedule before anything changes
        handle.controller.load_state_dict(controller_state)
    engine = _engine(handle)
    with torch.no_grad():
        for pool, lora_a, lora_b, ranks in staged:
            engine.load_full(pool.lora_A, lora_a)
            engine.load_full(pool.lora_B, lora_b)
            pool.ranks.copy_(ranks)
        for param, value in routers:
            engine.load_full(param, value)
    return handle
