"""The backends: what each one is, whether it is usable here, and which one a call gets.

A backend is a module (``reference``, ``triton_impl``, ``native_impl``) that implements
the backend contract: three plain functions with fixed signatures (see
:mod:`drlora_kernels.ops.registry`)::

    shrink(x, lora_a, ranks, offsets, scale=None) -> u
    base_expand(x, w, u, lora_b, ranks, offsets, scale) -> y
    weight_grad(grad_y, x, u, gb, ranks, offsets, scale, need_a, need_b, need_w) -> (da, db, dw)

plus ``is_available() -> (bool, reason)`` and, optionally, ``device_reason(device) -> str``
(or ``supports_device(device) -> bool``) and a fused backward (``lora_backward`` with
``FUSED_BACKWARD_DEVICES``). A module that lacks one of the three primitives is reported
unavailable with that reason.

Each backend is described by a :class:`Backend` (a frozen dataclass: name, device types,
module) that ``bench/`` uses too. Backend choice is resolved from a Python string, never
from tensor values: the ``backend=`` argument, else :func:`set_backend`, else the
``DRLORA_BACKEND`` environment variable, else ``auto`` — on CUDA ``triton``, then
``native``, then ``reference``; on the CPU ``native``, then ``reference``. ``auto`` skips a
backend that is not there; asking for one explicitly raises
:class:`BackendUnavailableError` with the reason.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch

#: the functions every backend module implements (the backend contract)
CONTRACT = ("shrink", "base_expand", "weight_grad")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend is not usable here (the message says why)."""


# name -> (module or None, reason); filled on first use, tests may patch it
_loaded: dict[str, tuple[ModuleType | None, str]] = {}


@dataclass(frozen=True)
class Backend:
    """One backend: its name, the device types it may run on, and its implementation module.

    Attributes:
        name: ``"reference"``, ``"triton"`` or ``"native"`` (the suffix of its ``drlora::`` ops).
        device_types: device types it can run on at all (``None``: any); whether it does
            here is :meth:`supports`.
        module_path: the module implementing the backend contract.
    """

    name: str
    device_types: tuple[str, ...] | None
    module_path: str

    def _load(self) -> tuple[ModuleType | None, str]:
        if self.name not in _loaded:
            _loaded[self.name] = _import_backend(self.module_path)
        return _loaded[self.name]

    def is_available(self) -> tuple[bool, str]:
        """``(available, reason)``: importable, its own check passes, it implements the contract."""
        mod, why = self._load()
        return mod is not None, why

    def module(self) -> ModuleType:
        """The implementation module (plain functions, no autograd).

        Raises:
            BackendUnavailableError: the backend is not available (the message says why).
        """
        mod, why = self._load()
        if mod is None:
            raise BackendUnavailableError(f"backend {self.name!r} is not available: {why}")
        return mod

    def supports(self, device: torch.device | str) -> tuple[bool, str]:
        """``(True, "")`` if the backend is available and runs on ``device``, else ``(False, why)``."""
        device = torch.device(device)
        mod, why = self._load()
        if mod is None:
            return False, why
        if self.device_types is not None and device.type not in self.device_types:
            return False, f"runs on {', '.join(self.device_types)}, not {device.type}"
        reason = getattr(mod, "device_reason", None)
        if reason is not None:
            why = reason(device)
            return (not why), why
        runs = getattr(mod, "supports_device", None)
        if runs is not None and not runs(device):
            return False, f"does not support device {device}"
        return True, ""


def _import_backend(path: str) -> tuple[ModuleType | None, str]:
    try:
        mod = importlib.import_module(path)
        ok, why = mod.is_available()
    except ImportError as exc:
        return None, f"import failed: {exc}"
    if not ok:
        return None, why
    missing = [f for f in CONTRACT if not callable(getattr(mod, f, None))]
    if missing:
        return None, (
            f"{path} does not implement the backend contract: no {', '.join(missing)} "
            f"(it must define {', '.join(CONTRACT)})"
        )
    return mod, why


#: every backend this package knows, by name
DESCRIPTORS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("reference", None, "drlora_kernels.ops.reference"),
        Backend("triton", ("cpu", "cuda"), "drlora_kernels.ops.triton_impl"),
        Backend("native", ("cpu", "cuda"), "drlora_kernels.ops.native_impl"),
    )
}
BACKENDS = tuple(DESCRIPTORS)
#: ``auto`` tries these in order; any other device type gets the reference. The native CUDA
#: (CUTLASS) kernels compile in CI but have never run on a GPU: ``auto`` does not pick them
#: until a GPU run says they are right (``backend="native"`` still selects them explicitly).
AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("native", "reference")}

_default_backend: str | None = None


def describe_backend(name: str) -> Backend:
    """The :class:`Backend` descriptor of ``name``.

    Raises:
        ValueError: ``name`` is not a known backend.
    """
    if name not in DESCRIPTORS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return DESCRIPTORS[name]


def available_backends() -> dict[str, tuple[bool, str]]:
    """``{backend: (available, reason)}`` for every known backend."""
    return {name: b.is_available() for name, b in DESCRIPTORS.items()}


def backend_module(name: str) -> ModuleType:
    """The implementation module of an available backend (plain functions, no autograd)."""
    return describe_backend(name).module()


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
    if name != "auto" and name not in DESCRIPTORS:
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {name!r}")


def resolve_backend(name: str | None, device: torch.device) -> str:
    """Turn ``name`` (or the configured default) into a concrete, available backend for ``device``.

    Raises:
        ValueError: an unknown name.
        BackendUnavailableError: an explicitly requested backend is unavailable or does
            not run on ``device``.
    """
    name = name or get_backend()
    _check_name(name)
    if name != "auto":
        backend = DESCRIPTORS[name]
        backend.module()  # raises with the reason when unavailable
        ok, why = backend.supports(device)
        if not ok:
            raise BackendUnavailableError(f"backend {name!r} does not run on {device}: {why}")
        return name
    for cand in AUTO_ORDER.get(device.type, ("reference",)):
        if DESCRIPTORS[cand].supports(device)[0]:
            return cand
    return "reference"
