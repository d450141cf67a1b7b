"""The ``native`` backend: thin calls into the compiled extension ``drlora_kernels._C``.

CPU tensors run the C++ kernels of ``csrc/cpu`` (BLAS GEMMs on the active
slots only, parallel over experts and row blocks; fp32/bf16/fp16 with fp32
accumulation, fp64 for gradcheck). CUDA tensors run the kernels of
``csrc/cuda`` when the extension was built with nvcc (fp32/bf16/fp16).
Same signatures as :mod:`drlora_kernels.ops.reference`; the registry turns
these functions into the ``drlora::*_native`` custom ops. The extension
checks its arguments itself too (ValueError/TypeError naming the argument).
"""

from __future__ import annotations

import torch

from drlora_kernels import _native

NAME = "native"
DEVICE_TYPES = ("cpu", "cuda")
SUPPORTS_FP64 = True  # on CPU (gradcheck); the CUDA kernels take fp32 / bf16 / fp16


def is_available() -> tuple[bool, str]:
    if not _native.HAS_NATIVE:
        return False, _native.NOT_LOADED_REASON or "native extension not loaded"
    devices = "cpu, cuda" if _native.HAS_NATIVE_CUDA else "cpu (built without CUDA)"
    return True, f"compiled extension drlora_kernels._C ({devices})"


def supports_device(device: torch.device) -> bool:
    """CPU always (when loaded); CUDA only if the extension was compiled with nvcc."""
    if device.type == "cpu":
        return _native.HAS_NATIVE
    return device.type == "cuda" and _native.HAS_NATIVE_CUDA


def shrink(
    x: torch.Tensor, lora_a: torch.Tensor, ranks: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    return _native._C.shrink(x, lora_a, ranks, offsets)


def expand(
    u: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    return _native._C.expand(u, lora_b, ranks, offsets, scale)


def forward(
    x: torch.Tensor,
    w: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _native._C.forward(x, w, lora_a, lora_b, ranks, offsets, scale)


def backward(
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
    return _native._C.backward(
        grad_y, x, w, lora_a, lora_b, u, ranks, offsets, scale,
        need_x, need_w, need_a, need_b, with_importance,
    )  # fmt: skip
