"""Save and load a DR-LoRA adapter: safetensors for the tensors, JSON for everything else.

A checkpoint is a directory holding

* ``drlora_adapter.safetensors``: per adapted projection ``<name>.lora_A [E, R, K]``,
  ``<name>.lora_B [E, N, R]``, ``<name>.ranks [E]`` (``<name>`` is the qualified parameter
  name, e.g. ``model.layers.0.mlp.experts.gate_up_proj``), the trainable routers under
  ``router.<parameter name>`` (they train after warmup, so they are part of the adapter), plus
  the controller's tensors under ``controller.*`` (ranks, frequency and importance EMAs,
  pending routing);
* ``drlora_config.json``: the :class:`~drlora_kernels.config.DRLoRAConfig`, the pool
  shapes and scales, the ranks, ``total_steps`` and the controller's step counter, schedule
  fingerprint and event log;
* optionally ``training_state.pt`` (``save_drlora(..., training_state=...)``): whatever the
  training loop needs to resume exactly (optimizer state, step, RNG...), in the same atomic
  directory, read back with :func:`read_training_state`;
* ``drlora_manifest.json``, written last: the SHA-256 and size of every file.

What survives what (``_io.py`` has the protocol): the directory is built beside the target and
swapped in whole once complete and fsynced, so a process killed at any point of
:func:`save_drlora` leaves either the previous checkpoint or the new one, complete, where
:func:`load_drlora` finds it; the leftovers of a killed save are cleaned up by the next save.
:func:`load_drlora` verifies the manifest (a flipped bit, a truncated file or an edited JSON is
refused), cross-checks the JSON against the tensors (ranks, scales, step counter, event log)
and validates everything against the model before the first tensor of the model changes; if
applying still fails, the model is restored exactly (a model that ``load_drlora`` attached
itself is detached again).

Saving is two steps, :func:`collect_checkpoint` (the tensors and the JSON of a handle) and
:func:`write_checkpoint` (atomic write with manifest). Under ``torch.distributed`` (DDP, FSDP2,
ZeRO) saving is collective: the full tensors are gathered through the training engine
(:mod:`drlora_kernels.engines`; a partial or ``(0,)``-shaped tensor is refused) and only global
rank 0 writes; loading reads the files on every process and writes each its part.
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
from ..pool import lora_scale
from ._io import atomic_directory, recover_directory, verify_directory
from .transformers import DRLoRAModel, attach_drlora, detach_drlora, get_drlora

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "collect_checkpoint",
    "load_drlora",
    "read_drlora_config",
    "read_training_state",
    "save_drlora",
    "write_checkpoint",
]

FORMAT_VERSION = 2  # 2: with drlora_manifest.json (SHA-256 of every file)
WEIGHTS_NAME = "drlora_adapter.safetensors"
CONFIG_NAME = "drlora_config.json"
TRAINING_STATE_NAME = "training_state.pt"
_CONTROLLER_PREFIX = "controller."
_ROUTER_PREFIX = "router."
# Fields of the config that change the adapter's function; they must match on load.
_FUNCTIONAL_FIELDS = (
    "r_max", "r_target", "alpha", "scaling", "target_modules", "layers_to_transform", "rank_pattern",
)  # fmt: skip


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
                "r_target": pool.r_target,
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


def collect_checkpoint(model_or_handle) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors (detached, CPU, contiguous) and the JSON metadata of a checkpoint of ``model``.

    The first half of :func:`save_drlora`; :func:`write_checkpoint` is the second.
    """
    handle = get_drlora(model_or_handle)
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
    # copies: a snapshot that later training steps cannot change before it is written
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    return tensors, meta


def write_checkpoint(
    directory: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    training_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``tensors`` and ``meta`` (from :func:`collect_checkpoint`) to ``directory`` atomically.

    ``training_state`` (optional) goes to ``training_state.pt`` in the same directory.

    Raises:
        ValueError: ``directory`` exists and is not a DR-LoRA checkpoint.
    """
    target = Path(directory)
    with atomic_directory(target, CONFIG_NAME) as tmp:
        save_file(
            tensors,
            str(tmp / WEIGHTS_NAME),
            metadata={"format": "pt", "drlora_format": str(FORMAT_VERSION)},
        )
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if training_state is not None:
            torch.save(training_state, tmp / TRAINING_STATE_NAME)
    return target


def save_drlora(
    model_or_handle,
    directory: str | os.PathLike,
    *,
    training_state: dict[str, Any] | None = None,
) -> Path:
    """Write the adapter (pools, ranks, routers, config, controller state) to ``directory``.

    ``directory`` is created, or replaced as a whole if it already holds a DR-LoRA checkpoint
    (a kill at any point leaves the old or the new checkpoint, complete; see the module
    docstring); a non-empty directory holding anything else is refused.

    Args:
        model_or_handle: the attached model or its handle.
        directory: the checkpoint directory.
        training_state: optional state of the training loop to resume with (e.g.
            ``{"optimizer": opt.state_dict(), "step": step}``): saved with ``torch.save`` in the
            same atomic directory and covered by the manifest; :func:`read_training_state` reads it.

    Returns:
        The checkpoint directory.

    Under ``torch.distributed`` this is collective: every process calls it, the full values
    of sharded pools and routers are gathered through the training engine (FSDP2, ZeRO),
    and only global rank 0 writes; the others return once it has (or raise if it failed).

    Raises:
        ValueError: ``directory`` exists and is not a DR-LoRA checkpoint.
        RuntimeError: the engine returned a partial tensor (never written), or rank 0 failed.
    """
    tensors, meta = collect_checkpoint(model_or_handle)
    target = Path(directory)
    _write_on_global_rank0(lambda: write_checkpoint(target, tensors, meta, training_state), target)
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


def read_training_state(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The ``training_state`` saved with :func:`save_drlora` (manifest verified), or ``None``.

    Loaded with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts
    (an optimizer's ``state_dict()``, RNG states) load; arbitrary objects are refused.

    Raises:
        ValueError: a checksum mismatch or an unreadable file.
    """
    directory = _verified(directory)
    path = directory / TRAINING_STATE_NAME
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # torch.load raises many kinds: report them as one
        raise ValueError(f"unreadable training state {path}: {exc}") from None


def _verified(directory: str | os.PathLike) -> Path:
    directory = Path(directory)
    recover_directory(directory)  # a save killed between its two renames (non-Linux fallback)
    if not (directory / CONFIG_NAME).is_file():
        hint = (
            ": it holds a PEFT adapter, read it with import_peft(model, directory)"
            if (directory / "adapter_config.json").is_file()
            else ""
        )
        raise ValueError(f"no DR-LoRA checkpoint in {directory} (missing {CONFIG_NAME}){hint}")
    verify_directory(directory)
    return directory


def read_drlora_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``drlora_config.json`` of a checkpoint, after checking the manifest.

    Raises:
        ValueError: missing files, a checksum mismatch, invalid JSON or an unsupported format.
    """
    path = _verified(directory) / CONFIG_NAME
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
        for key in ("num_experts", "in_features", "out_features", "r_max", "r_target"):
            if saved[name].get(key) != entry[key]:
                raise ValueError(
                    f"checkpoint {directory}: pool {name} has {key}={saved[name].get(key)}, the model's has {entry[key]}"
                )
        if not _same_float(saved[name].get("scaling"), entry["scaling"]):
            raise ValueError(
                f"checkpoint {directory}: pool {name} has scaling={saved[name].get('scaling')}, "
                f"the model's has {entry['scaling']}"
            )


def _same_float(a: Any, b: float) -> bool:
    return isinstance(a, (int, float)) and abs(float(a) - b) <= 1e-6 * max(1.0, abs(b))


def _cross_check(meta: dict[str, Any], tensors: dict[str, torch.Tensor], directory) -> None:
    """The JSON fields that change behaviour agree with the tensors and with each other."""
    where = f"inconsistent DR-LoRA checkpoint {directory}"
    cfg = meta["config"]
    for entry in meta["pools"]:
        name = entry.get("name")
        ranks = tensors.get(f"{name}.ranks")
        if ranks is None:
            raise ValueError(
                f"corrupted DR-LoRA weights in {directory}: missing tensor {name}.ranks"
            )
        if meta["ranks"].get(name) != ranks.tolist():
            raise ValueError(
                f"{where}: the JSON ranks of {name} differ from the {name}.ranks tensor"
            )
        try:
            expected = lora_scale(cfg["alpha"], entry["r_target"], cfg["scaling"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: pool {name}: {exc}") from None
        if not _same_float(entry.get("scaling"), expected):
            raise ValueError(
                f"{where}: pool {name} records scaling={entry.get('scaling')}, but alpha={cfg['alpha']}, "
                f"r_target={entry['r_target']} and scaling={cfg['scaling']!r} give {expected}"
            )
    controller = meta.get("controller")
    if controller is None:
        return
    step = controller.get("global_step")
    log = controller.get("event_log")
    if not isinstance(step, int) or step < 0 or not isinstance(log, list):
        raise ValueError(f"{where}: controller global_step / event_log are malformed")
    ctrl_ranks = tensors.get(_CONTROLLER_PREFIX + "ranks")
    by_layer: dict[int, list[str]] = {}
    for entry in meta["pools"]:
        by_layer.setdefault(entry["layer"], []).append(entry["name"])
    try:
        pool_ranks = torch.stack(
            [torch.stack([tensors[f"{n}.ranks"] for n in by_layer[l]]) for l in sorted(by_layer)]
        )
    except (KeyError, RuntimeError) as exc:
        raise ValueError(
            f"{where}: pool ranks do not form the controller's layout ({exc})"
        ) from None
    if ctrl_ranks is None or not torch.equal(
        ctrl_ranks.to(torch.int64), pool_ranks.to(torch.int64)
    ):
        raise ValueError(f"{where}: the controller's ranks differ from the pools' ranks")
    num_experts = pool_ranks.shape[-1]
    last_rank: dict[tuple[int, int], int] = {}
    previous_step = -1
    for ev in log:
        try:
            ev_step, layer, module, new = ev["step"], ev["layer"], ev["module"], ev["new_rank"]
        except (KeyError, TypeError):
            raise ValueError(f"{where}: malformed event {ev!r}") from None
        if not previous_step <= ev_step < step:
            raise ValueError(
                f"{where}: event at step {ev_step} is out of order or not before global_step={step}"
            )
        previous_step = ev_step
        last_rank[(layer, module)] = new
    for (layer, module), new in last_rank.items():
        p, e = divmod(module, num_experts)
        if not (0 <= layer < pool_ranks.shape[0] and 0 <= p < pool_ranks.shape[1]):
            raise ValueError(f"{where}: event of unknown module (layer {layer}, module {module})")
        if int(pool_ranks[layer, p, e]) != new:
            raise ValueError(
                f"{where}: the event log ends module {module} of layer {layer} at rank {new}, "
                f"its saved rank is {int(pool_ranks[layer, p, e])}"
            )


def _load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise ValueError(f"no DR-LoRA checkpoint in {directory} (missing {WEIGHTS_NAME})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"corrupted DR-LoRA weights {path}: {exc}") from None


def _stage_pools(handle: DRLoRAModel, tensors: dict[str, torch.Tensor], directory) -> list:
    staged = []
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
    return staged


def _stage_routers(handle: DRLoRAModel, tensors: dict[str, torch.Tensor], directory) -> list:
    params = dict(handle.model.named_parameters())
    routers = []
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
    return routers


def _snapshot(handle: DRLoRAModel, engine: Engine) -> dict[str, Any]:
    """Everything :func:`load_drlora` may change, to put back if applying fails.

    Read and written back through the engine, so a sharded or partitioned parameter (FSDP2,
    ZeRO, whose master copy the engine also restores) is restored, not just its local view.
    """
    return {
        "pools": [
            (
                pool,
                engine.gather_full(pool.lora_A),
                engine.gather_full(pool.lora_B),
                pool.ranks.clone(),
            )
            for _, pool in handle.named_pools()
        ],
        "routers": [(p, engine.gather_full(p)) for _, p in handle.named_router_parameters()],
        "controller": handle.controller,
        "controller_state": handle.controller.state_dict() if handle.controller else None,
        "total_steps": handle.total_steps,
    }


@torch.no_grad()
def _restore(handle: DRLoRAModel, snap: dict[str, Any], engine: Engine) -> None:
    for pool, lora_a, lora_b, ranks in snap["pools"]:
        engine.load_full(pool.lora_A, lora_a)
        engine.load_full(pool.lora_B, lora_b)
        pool.ranks.copy_(ranks)
    for param, value in snap["routers"]:
        engine.load_full(param, value)
    handle.controller, handle.total_steps = snap["controller"], snap["total_steps"]
    if snap["controller_state"] is not None:
        handle.controller.load_state_dict(snap["controller_state"])


def load_drlora(
    model_or_handle, directory: str | os.PathLike, *, load_controller: bool = True
) -> DRLoRAModel:
    """Load a :func:`save_drlora` checkpoint into ``model`` (attaching DR-LoRA first if needed).

    A model without DR-LoRA is attached with the saved config (and the saved ``total_steps``,
    so the controller exists when the checkpoint holds controller state). An attached model
    must match the checkpoint: same pools (names, ``E``, in/out sizes, scales), same ``r_max``,
    ``r_target``, ``alpha``, ``scaling`` and targets.

    The files are verified against the manifest and the JSON against the tensors first; a
    checkpoint that fails any check leaves the model exactly as it was (a model this call
    attached is detached again, see :func:`~drlora_kernels.integrations.detach_drlora`).

    Args:
        model_or_handle: the model or its :class:`DRLoRAModel`.
        directory: the checkpoint directory.
        load_controller: also restore the controller's statistics, step and event log.

    Returns:
        The handle.

    Raises:
        ValueError: missing or corrupted files (checksum mismatch), inconsistent metadata, or a
            checkpoint that does not fit the model.
    """
    directory = Path(directory)
    meta = read_drlora_config(directory)
    tensors = _load_tensors(directory)
    _cross_check(meta, tensors, directory)
    try:
        handle = get_drlora(model_or_handle)
    except ValueError:
        handle = None
    attached_here = handle is None
    if attached_here:
        try:
            config = DRLoRAConfig.from_dict(meta["config"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"corrupted DR-LoRA config in {directory}: {exc}") from None
        handle = get_drlora(attach_drlora(model_or_handle, config))
    try:
        _apply(handle, meta, tensors, directory, load_controller=load_controller)
    except BaseException:
        if attached_here:
            detach_drlora(handle.model)
        raise
    return handle


def _apply(handle: DRLoRAModel, meta, tensors, directory, *, load_controller: bool) -> None:
    """Validate the checkpoint against ``handle``, then copy it in (all or nothing)."""
    _check_compatible(handle, meta, directory)
    staged = _stage_pools(handle, tensors, directory)
    routers = _stage_routers(handle, tensors, directory)
    controller_state = None
    if load_controller and meta.get("controller") is not None:
        ctensors = {k: v for k, v in tensors.items() if k.startswith(_CONTROLLER_PREFIX)}
        controller_state = _join_controller_state(ctensors, meta["controller"])
        if handle.controller is None and not isinstance(meta.get("total_steps"), int):
            raise ValueError(
                f"corrupted DR-LoRA checkpoint {directory}: controller state without total_steps"
            )

    engine = _engine(handle)
    snap = _snapshot(handle, engine)
    try:
        if controller_state is not None:
            if handle.controller is None:
                handle.setup_controller(meta["total_steps"])
            handle.controller.load_state_dict(controller_state)  # validates the schedule first
        with torch.no_grad():
            for pool, lora_a, lora_b, ranks in staged:
                engine.load_full(pool.lora_A, lora_a)
                engine.load_full(pool.lora_B, lora_b)
                pool.ranks.copy_(ranks)
            for param, value in routers:
                engine.load_full(param, value)
    except BaseException:
        _restore(handle, snap, engine)
        raise
