"""Backends, the ``drlora::`` custom ops, their fake implementations and autograd.

Every backend module (``reference``, ``triton_impl``, ``native_impl``) exposes
the same plain functions (``shrink``, ``expand``, ``forward``, ``backward``)
plus ``NAME``, ``DEVICE_TYPES`` and ``is_available()``. This module wraps each
available backend's functions as ``torch.library.custom_op``s named
``drlora::<verb>_<backend>`` with one shared fake implementation per verb and
one shared autograd formula, so ``torch.compile`` sees opaque ops whose output
shapes never depend on data (no recompiles when group sizes change).

Backend choice is resolved once per call from a Python string (never from
tensor values): the ``backend=`` argument, else :func:`set_backend`, else the
``DRLORA_BACKEND`` environment variable, else ``auto`` (native > triton >
reference on CUDA; native > reference on CPU). ``auto`` silently skips a
backend that is not there; asking for one explicitly raises with the reason.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType

import torch

_BACKEND_MODULES = {
    "reference": "drlora_kernels.ops.reference",
    "triton": "drlora_kernels.ops.triton_impl",
    "native": "drlora_kernels.ops.native_impl",
}
BACKENDS = tuple(_BACKEND_MODULES)
_AUTO_ORDER = {"cuda": ("native", "triton", "reference"), "cpu": ("native", "reference")}

_modules: dict[str, ModuleType | None] = {}
_unavailable: dict[str, str] = {}
_ops: dict[str, dict[str, Callable]] = {}
_default_backend: str | None = None


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend is not usable here (the message says why)."""


def _load(name: str) -> ModuleType | None:
    if name in _modules:
        return _modules[name]
    try:
        mod = importlib.import_module(_BACKEND_MODULES[name])
        ok, why = mod.is_available()
    except ImportError as exc:
        mod, ok, why = None, False, f"import failed: {exc}"
    if not ok:
        _unavailable[name] = why
        mod = None
    _modules[name] = mod
    return mod


def available_backends() -> dict[str, tuple[bool, str]]:
    """``{backend: (available, reason)}`` for every known backend."""
    out = {}
    for name in BACKENDS:
        mod = _load(name)
        out[name] = (
            (True, mod.is_available()[1]) if mod is not None else (False, _unavailable[name])
        )
    return out


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` restores env/auto selection)."""
    global _default_backend
    if name is not None:
        _check_name(name)
    _default_backend = name


def get_backend() -> str:
    """The default backend name as configured (may be ``"auto"``)."""
    return _default_backend or os.environ.get("DRLORA_BACKEND", "auto")


def _check_name(name: str) -> None:
    if name != "auto" and name not in _BACKEND_MODULES:
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {name!r}")


def resolve_backend(name: str | None, device: torch.device) -> str:
    """Turn ``name`` (or the configured default) into a concrete, available backend for ``device``."""
    name = name or get_backend()
    _check_name(name)
    if name != "auto":
        mod = _load(name)
        if mod is None:
            raise BackendUnavailableError(
                f"backend {name!r} is not available: {_unavailable[name]}"
            )
        if not _runs_on(mod, device):
            raise BackendUnavailableError(
                f"backend {name!r} does not run on {device}: {getattr(mod, 'device_reason', lambda d: '')(device) or f'runs on {mod.DEVICE_TYPES}'}"
            )
        return name
    for cand in _AUTO_ORDER.get(device.type, ("reference",)):
        mod = _load(cand)
        if mod is not None and _runs_on(mod, device):
            return cand
    return "reference"


def _runs_on(mod: ModuleType, device: torch.device) -> bool:
    if mod.DEVICE_TYPES is not None and device.type not in mod.DEVICE_TYPES:
        return False
    supports = getattr(mod, "supports_device", None)
    return supports is None or bool(supports(device))


# ---------------------------------------------------------------- fake implementations
# Each promises the shapes/dtypes of the real op from the arguments' shapes alone.


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shrink_fake(x, lora_a, ranks, offsets):
    # u: [T, R] in the accumulation dtype
    return x.new_empty((x.shape[0], lora_a.shape[1]), dtype=_acc(x.dtype))


def _expand_fake(u, lora_b, ranks, offsets, scale):
    # y: [T, N] in lora_b's dtype
    return lora_b.new_empty((u.shape[0], lora_b.shape[1]))


def _forward_fake(x, w, lora_a, lora_b, ranks, offsets, scale):
    # (y [T, N] in x's dtype, u [T, R] in the accumulation dtype)
    torch._check(lora_a.shape[2] == x.shape[1])
    return x.new_empty((x.shape[0], lora_b.shape[1])), x.new_empty(
        (x.shape[0], lora_a.shape[1]), dtype=_acc(x.dtype)
    )


def _backward_fake(
    grad_y,
    x,
    w,
    lora_a,
    lora_b,
    u,
    ranks,
    offsets,
    scale,
    need_x,
    need_w,
    need_a,
    need_b,
    with_importance,
):
    # gradients that were not asked for are empty [0] tensors; importance is fp32 [E, R]
    E, R = lora_a.shape[0], lora_a.shape[1]
    dx = x.new_empty(x.shape) if need_x else x.new_empty(0)
    dw = w.new_empty(w.shape) if (need_w and w is not None) else x.new_empty(0)
    da = lora_a.new_empty(lora_a.shape) if need_a else x.new_empty(0)
    db = lora_b.new_empty(lora_b.shape) if need_b else x.new_empty(0)
    if with_importance:
        imp = (x.new_empty((E, R), dtype=torch.float32), x.new_empty((E, R), dtype=torch.float32))
    else:
        imp = (x.new_empty(0), x.new_empty(0))
    return dx, dw, da, db, *imp


# ---------------------------------------------------------------- op definitions


def _define_ops(name: str, mod: ModuleType) -> dict[str, Callable]:
    dt = mod.DEVICE_TYPES
    lib = f"drlora::{{}}_{name}"

    @torch.library.custom_op(lib.format("shrink"), mutates_args=(), device_types=dt)
    def shrink_op(
        x: torch.Tensor, lora_a: torch.Tensor, ranks: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        return mod.shrink(x, lora_a, ranks, offsets)

    @torch.library.custom_op(lib.format("expand"), mutates_args=(), device_types=dt)
    def expand_op(
        u: torch.Tensor,
        lora_b: torch.Tensor,
        ranks: torch.Tensor,
        offsets: torch.Tensor,
        scale: torch.Tensor,
    ) -> torch.Tensor:
        return mod.expand(u, lora_b, ranks, offsets, scale)

    @torch.library.custom_op(lib.format("lora_fwd"), mutates_args=(), device_types=dt)
    def fwd_op(
        x: torch.Tensor,
        w: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        ranks: torch.Tensor,
        offsets: torch.Tensor,
        scale: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return mod.forward(x, w, lora_a, lora_b, ranks, offsets, scale)

    @torch.library.custom_op(lib.format("lora_bwd"), mutates_args=(), device_types=dt)
    def bwd_op(
        grad_y: torch.Tensor,
        x: torch.Tensor,
        w: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        u: torch.Tensor,
        ranks: torch.Tensor,
        offsets: torch.Tensor,
        scale: torch.Tensor,
        need_x: bool,
        need_w: bool,
        need_a: bool,
        need_b: bool,
        with_importance: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return mod.backward(
            grad_y,
            x,
            w,
            lora_a,
            lora_b,
            u,
            ranks,
            offsets,
            scale,
            need_x,
            need_w,
            need_a,
            need_b,
            with_importance,
        )

    shrink_op.register_fake(_shrink_fake)
    expand_op.register_fake(_expand_fake)
    fwd_op.register_fake(_forward_fake)
    bwd_op.register_fake(_backward_fake)

    def setup_context(ctx, inputs, output):
        x, w, lora_a, lora_b, ranks, offsets, scale = inputs
        _, u = output
        ctx.mark_non_differentiable(u)
        ctx.save_for_backward(x, w, lora_a, lora_b, u, ranks, offsets, scale)

    def backward(ctx, grad_y, _grad_u):
        x, w, lora_a, lora_b, u, ranks, offsets, scale = ctx.saved_tensors
        need_x, need_w, need_a, need_b = ctx.needs_input_grad[:4]
        dx, dw, da, db, _, _ = bwd_op(
            grad_y.contiguous(), x, w, lora_a, lora_b, u, ranks, offsets, scale,
            need_x, need_w and w is not None, need_a, need_b, False,
        )  # fmt: skip
        return (
            dx if need_x else None,
            dw if (need_w and w is not None) else None,
            da if need_a else None,
            db if need_b else None,
            None,
            None,
            None,
        )

    fwd_op.register_autograd(backward, setup_context=setup_context)
    return {"shrink": shrink_op, "expand": expand_op, "forward": fwd_op, "backward": bwd_op}


def get_ops(name: str) -> dict[str, Callable]:
    """The ``drlora::*_<name>`` custom ops for an available backend (defined on first use)."""
    if name not in _ops:
        mod = _load(name)
        if mod is None:
            raise BackendUnavailableError(
                f"backend {name!r} is not available: {_unavailable[name]}"
            )
        _ops[name] = _define_ops(name, mod)
    return _ops[name]


def backend_module(name: str) -> ModuleType:
    """The implementation module of an available backend (plain functions, no autograd)."""
    mod = _load(name)
    if mod is None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {_unavailable[name]}")
    return mod
