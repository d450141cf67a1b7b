"""Guarded loading of the compiled extension ``drlora_kernels._C``.

The package works without it (reference and Triton backends). When the import
fails the reason is recorded and reported by :func:`build_info`; nothing is
printed unless a user asks for ``backend="native"`` explicitly.
``DRLORA_DISABLE_NATIVE=1`` forces the pure-Python path at run time.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

_C: ModuleType | None = None
NOT_LOADED_REASON = ""

if os.environ.get("DRLORA_DISABLE_NATIVE", "0") == "1":
    NOT_LOADED_REASON = "disabled by DRLORA_DISABLE_NATIVE=1"
else:
    try:
        import torch  # noqa: F401  (the extension links against libtorch)

        from drlora_kernels import _C  # type: ignore[attr-defined,no-redef]
    except ImportError as exc:
        _C = None
        NOT_LOADED_REASON = f"extension not importable: {exc}"
        logger.debug("drlora_kernels native extension not loaded: %s", exc)

HAS_NATIVE: bool = _C is not None
HAS_NATIVE_CUDA: bool = bool(_C is not None and _C.build_info().get("with_cuda", False))


def _build_meta() -> dict[str, Any]:
    try:
        from drlora_kernels._build_meta import BUILD_META

        return dict(BUILD_META)
    except ImportError:
        return {
            "native_built": False,
            "not_built_reason": "no build metadata (package not installed with setup.py?)",
        }


def build_info() -> dict[str, Any]:
    """What the native build produced and what is loaded now.

    Keys: ``native_loaded``, ``native_with_cuda``, ``not_loaded_reason``,
    ``auto_order`` (what ``backend="auto"`` tries, per device type: on CUDA the
    Triton kernels first, the native CUDA kernels only after them) plus the
    build-time record (``native_built``, ``with_cuda``, ``cuda_archs``,
    compilers, ``torch_at_build``, ``git_sha``, ``build_mode``) and the loaded
    extension's own record (``ext_*``, e.g. ``ext_primitives``).
    """
    from .ops.backends import AUTO_ORDER

    info = _build_meta()
    info["native_loaded"] = HAS_NATIVE
    info["native_with_cuda"] = HAS_NATIVE_CUDA
    info["not_loaded_reason"] = NOT_LOADED_REASON
    info["auto_order"] = {dev: " > ".join(order) for dev, order in AUTO_ORDER.items()}
    if _C is not None:
        info.update({f"ext_{k}": v for k, v in _C.build_info().items()})
    return info
