"""The ``native`` backend: thin calls into the compiled extension ``drlora_kernels._C``.

CPU tensors run the C++ kernels of ``csrc/cpu`` (BLAS GEMMs on the active
slots only, parallel over experts and row blocks; fp32/bf16/fp16 with fp32
accumulation, fp64 for gradcheck). CUDA tensors run ``csrc/cuda`` when the
extension was built with nvcc (fp32/bf16/fp16). The three primitives have the
signatures of :mod:`drlora_kernels.ops.reference`; on the CPU the backward runs
fused (:func:`lora_backward`: one cache-blocked pass over each expert's rows
instead of three passes). The registry turns these functions into the
``drlora::*_native`` custom ops. The extension checks its arguments itself too
(ValueError/TypeError naming the argument; ``ranks``/``offsets`` must be
contiguous int32).
"""

from __future__ import annotations

import torch

from drlora_kernels import _native

NAME = "native"
DEVICE_TYPES = ("cpu", "cuda")
SUPPORTS_FP64 = True  # on CPU (gradcheck); the CUDA kernels take fp32 / bf16 / fp16
#: where :func:`lora_backward` (the fused backward) is used instead of the three primitives
FUSED_BACKWARD_DEVICES = ("cpu",)


def is_available() -> tuple[bool, str]:
    if not _native.HAS_NATIVE:
        return False, _native.NOT_LOADED_REASON or "native extension not loaded"
    devices = "cpu, cuda" if _native.HAS_NATIVE_CUDA else "cpu (built without CUDA)"
    return True, f"compiled extension drlora_kernels._C ({devices})"


def device_reason(device: torch.device) -> str:
    """Why the backend does not run on ``device`` ("" when it does)."""
    if device.type == "cpu":
        return "" if _native.HAS_NATIVE else "native extension not loaded"
    if device.type == "cuda" and not _native.HAS_NATIVE_CUDA:
        return "the native extension was built without CUDA"
    return "" if device.type == "cuda" else f"runs on {DEVICE_TYPES}"


def shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    return _native._C.shrink(x, lora_a, ranks, offsets, scale)


def base_expand(
    x: torch.Tensor | None,
    w: torch.Tensor | None,
    u: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    return _native._C.base_expand(x, w, u, lora_b, ranks, offsets, scale)


def weight_grad(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    u: torch.Tensor,
    gb: torch.Tensor | None,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor,
    need_a: bool,
    need_b: bool,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _native._C.weight_grad(grad_y, x, u, gb, ranks, offsets, scale, need_a, need_b, need_w)


def lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    u: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor,
    *,
    need_x: bool,
    need_a: bool,
    need_b: bool,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused CPU backward: ``(dx, da, db, dw)`` as :func:`~drlora_kernels.ops.registry.lora_backward`."""
    return _native._C.lora_backward(
        grad_y, x, w, lora_a, lora_b, u, ranks, offsets, scale,
        need_x=need_x, need_a=need_a, need_b=need_b, need_w=need_w,
    )  # fmt: skip
