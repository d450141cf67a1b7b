"""The ``drlora::`` custom ops of every backend, their fakes, and the one autograd formula.

The backend contract is three primitives (DESIGN.md), plain functions in every backend
module, with these semantics for every expert ``e`` (``rows_e = offsets[e]:offsets[e+1]``,
``r_e = ranks[e]``; slots ``>= r_e`` are never read and come out exactly zero)::

    shrink(x, lora_a, ranks, offsets, scale=None) -> u
        u[rows_e, :r_e] = scale[e] * x[rows_e] @ lora_a[e, :r_e].T      # [T, R] fp32 (fp64)
    base_expand(x, w, u, lora_b, ranks, offsets, scale) -> y
        y[rows_e] = x[rows_e] @ w[e].T (if w) + scale[e] * u[rows_e, :r_e] @ lora_b[e, :, :r_e].T
    weight_grad(grad_y, x, u, gb, ranks, offsets, scale, need_a, need_b, need_w) -> (da, db, dw)
        da[e, :r_e] = gb[rows_e, :r_e].T @ x[rows_e]
        db[e, :, :r_e] = scale[e] * grad_y[rows_e].T @ u[rows_e, :r_e]
        dw[e] = grad_y[rows_e].T @ x[rows_e]          # a gradient not asked for: empty [0]

``lora_a``, ``lora_b`` and ``w`` may have any strides: the backward passes transposed
views. :func:`define_ops` wraps each available backend's functions as
``torch.library.custom_op``s ``drlora::{shrink,base_expand,weight_grad}_<backend>`` with
one fake implementation per primitive (output shapes never depend on data, so
``torch.compile`` does not recompile when group sizes change). A backend may also provide
a fused backward (``lora_backward``, on the devices in ``FUSED_BACKWARD_DEVICES``): the
same contract as :func:`lora_backward`, in one pass where that pays (the native CPU path).

Forward and backward of the user-facing ops are composed from the primitives once, here
(:func:`lora_forward`, :func:`lora_backward`, :class:`GroupedLoRAFunction`), from
``ctx.needs_input_grad``, with keyword arguments::

    forward:  u = shrink(x, A);  y = base_expand(x, W, u, B, scale)
    backward: gb = shrink(dY, B^T, scale);  dX = base_expand(dY, W^T, gb, A^T, 1)
              (dA, dB, dW) = weight_grad(dY, x, u, gb, scale)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import torch

from .backends import DESCRIPTORS, describe_backend

__all__ = [
    "BackendOps",
    "GroupedLoRAFunction",
    "Grads",
    "define_ops",
    "get_ops",
    "lora_backward",
    "lora_forward",
    "plain_ops",
]


@dataclass(frozen=True)
class BackendOps:
    """The primitives of one backend as callables (its custom ops, or plain functions).

    Attributes:
        name: the backend.
        shrink, base_expand, weight_grad: the three primitives (called with keyword arguments).
        fused_backward: a fused :func:`lora_backward` of the same contract, or ``None``.
        fused_devices: device types on which ``fused_backward`` is used.
    """

    name: str
    shrink: Callable[..., torch.Tensor]
    base_expand: Callable[..., torch.Tensor]
    weight_grad: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    fused_backward: Callable[..., tuple[torch.Tensor, ...]] | None = None
    fused_devices: tuple[str, ...] = ()


class Grads(NamedTuple):
    """Gradients of the grouped LoRA op; ``None`` where not asked for."""

    dx: torch.Tensor | None
    da: torch.Tensor | None
    db: torch.Tensor | None
    dw: torch.Tensor | None


# ---------------------------------------------------------------- composition (written once)


def lora_forward(
    ops: BackendOps,
    *,
    x: torch.Tensor,
    w: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, u)``: ``u = x A^T`` per expert, ``y = x W^T (if w) + scale u B^T``."""
    u = ops.shrink(x=x, lora_a=lora_a, ranks=ranks, offsets=offsets)
    y = ops.base_expand(
        x=None if w is None else x, w=w, u=u, lora_b=lora_b, ranks=ranks, offsets=offsets,
        scale=scale,
    )  # fmt: skip
    return y, u


def lora_backward(
    ops: BackendOps,
    *,
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
    need_a: bool,
    need_b: bool,
    need_w: bool,
    fused: bool = True,
) -> Grads:
    """Gradients of :func:`lora_forward` for ``grad_y [T, N]`` (contiguous); only those asked for.

    ``fused=False`` composes the three primitives even where the backend has a fused backward
    (tests compare the two).
    """
    need_w = need_w and w is not None
    if fused and ops.fused_backward is not None and grad_y.device.type in ops.fused_devices:
        dx, da, db, dw = ops.fused_backward(
            grad_y=grad_y, x=x, w=w, lora_a=lora_a, lora_b=lora_b, u=u, ranks=ranks,
            offsets=offsets, scale=scale, need_x=need_x, need_a=need_a, need_b=need_b,
            need_w=need_w,
        )  # fmt: skip
        return Grads(
            dx if need_x else None, da if need_a else None, db if need_b else None,
            dw if need_w else None,
        )  # fmt: skip
    gb = None
    if need_x or need_a:  # gb = scale * dY @ B[:, :r]
        gb = ops.shrink(
            x=grad_y, lora_a=lora_b.transpose(1, 2), ranks=ranks, offsets=offsets, scale=scale
        )
    dx = None
    if need_x:  # dX = dY @ W + gb @ A[:r]  (gb already carries the scale)
        dx = ops.base_expand(
            x=None if w is None else grad_y, w=None if w is None else w.transpose(1, 2), u=gb,
            lora_b=lora_a.transpose(1, 2), ranks=ranks, offsets=offsets,
            scale=torch.ones_like(scale),
        )  # fmt: skip
    da = db = dw = None
    if need_a or need_b or need_w:
        da, db, dw = ops.weight_grad(
            grad_y=grad_y, x=x, u=u, gb=gb, ranks=ranks, offsets=offsets, scale=scale,
            need_a=need_a, need_b=need_b, need_w=need_w,
        )  # fmt: skip
    return Grads(dx, da if need_a else None, db if need_b else None, dw if need_w else None)


class GroupedLoRAFunction(torch.autograd.Function):
    """Autograd of ``y = x W^T (if w) + scale (x A^T) B^T`` per expert on one backend's ops.

    ``apply(x, w, lora_a, lora_b, ranks, offsets, scale, backend)`` with validated, contiguous
    inputs (the public ops in :mod:`drlora_kernels.ops` call it). ``ranks``, ``offsets`` and
    ``scale`` get no gradient (``scale`` is refused earlier if it requires one).
    """

    @staticmethod
    def forward(ctx, x, w, lora_a, lora_b, ranks, offsets, scale, backend):
        y, u = lora_forward(
            get_ops(backend), x=x, w=w, lora_a=lora_a, lora_b=lora_b, ranks=ranks,
            offsets=offsets, scale=scale,
        )  # fmt: skip
        ctx.backend = backend
        ctx.save_for_backward(x, w, lora_a, lora_b, u, ranks, offsets, scale)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w, lora_a, lora_b, u, ranks, offsets, scale = ctx.saved_tensors
        need_x, need_w, need_a, need_b = ctx.needs_input_grad[:4]
        g = lora_backward(
            get_ops(ctx.backend), grad_y=grad_y.contiguous(), x=x, w=w, lora_a=lora_a,
            lora_b=lora_b, u=u, ranks=ranks, offsets=offsets, scale=scale, need_x=need_x,
            need_a=need_a, need_b=need_b, need_w=need_w,
        )  # fmt: skip
        return g.dx, g.dw, g.da, g.db, None, None, None, None


# ---------------------------------------------------------------- fake implementations
# Each promises the shapes/dtypes of the real op from the arguments' shapes alone.


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shrink_fake(x, lora_a, ranks, offsets, scale=None):
    # u: [T, R] in the accumulation dtype
    torch._check(lora_a.shape[2] == x.shape[1])
    return x.new_empty((x.shape[0], lora_a.shape[1]), dtype=_acc(x.dtype))


def _base_expand_fake(x, w, u, lora_b, ranks, offsets, scale):
    # y: [T, N] in lora_b's dtype
    torch._check(lora_b.shape[2] == u.shape[1])
    return u.new_empty((u.shape[0], lora_b.shape[1]), dtype=lora_b.dtype)


def _weight_grad_fake(grad_y, x, u, gb, ranks, offsets, scale, *, need_a, need_b, need_w):
    # da [E, R, K], db [E, N, R], dw [E, N, K] in x's dtype; not asked for: empty [0]
    E, R, K, N = ranks.shape[0], u.shape[1], x.shape[1], grad_y.shape[1]
    da = x.new_empty((E, R, K)) if need_a else x.new_empty(0)
    db = x.new_empty((E, N, R)) if need_b else x.new_empty(0)
    dw = x.new_empty((E, N, K)) if need_w else x.new_empty(0)
    return da, db, dw


def _fused_backward_fake(
    grad_y, x, w, lora_a, lora_b, u, ranks, offsets, scale, *, need_x, need_a, need_b, need_w
):
    # (dx [T, K], da [E, R, K], db [E, N, R], dw [E, N, K]); not asked for: empty [0]
    dx = x.new_empty(x.shape) if need_x else x.new_empty(0)
    da = lora_a.new_empty(lora_a.shape) if need_a else x.new_empty(0)
    db = lora_b.new_empty(lora_b.shape) if need_b else x.new_empty(0)
    dw = w.new_empty(w.shape) if (need_w and w is not None) else x.new_empty(0)
    return dx, da, db, dw


# ---------------------------------------------------------------- op definitions

_ops: dict[str, BackendOps] = {}


def define_ops(name: str, mod: ModuleType, device_types: tuple[str, ...] | None) -> BackendOps:
    """Wrap ``mod``'s primitives as the ``drlora::*_<name>`` custom ops (one fake each)."""
    lib = f"drlora::{{}}_{name}"

    @torch.library.custom_op(lib.format("shrink"), mutates_args=(), device_types=device_types)
    def shrink(
        x: torch.Tensor,
        lora_a: torch.Tensor,
        ranks: torch.Tensor,
        offsets: torch.Tensor,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return mod.shrink(x, lora_a, ranks, offsets, scale)

    @torch.library.custom_op(lib.format("base_expand"), mutates_args=(), device_types=device_types)
    def base_expand(
        x: torch.Tensor | None,
        w: torch.Tensor | None,
        u: torch.Tensor,
        lora_b: torch.Tensor,
        ranks: torch.Tensor,
        offsets: torch.Tensor,
        scale: torch.Tensor,
    ) -> torch.Tensor:
        return mod.base_expand(x, w, u, lora_b, ranks, offsets, scale)

    @torch.library.custom_op(lib.format("weight_grad"), mutates_args=(), device_types=device_types)
    def weight_grad(
        grad_y: torch.Tensor,
        x: torch.Tensor,
        u: torch.Tensor,
        gb: torch.Tensor | None,
        ranks: torch.Tensor,
        offsets: torch.Tensor,
        scale: torch.Tensor,
        *,
        need_a: bool,
        need_b: bool,
        need_w: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return mod.weight_grad(
            grad_y, x, u, gb, ranks, offsets, scale, need_a=need_a, need_b=need_b, need_w=need_w
        )

    shrink.register_fake(_shrink_fake)
    base_expand.register_fake(_base_expand_fake)
    weight_grad.register_fake(_weight_grad_fake)

    fused, fused_devices = None, tuple(getattr(mod, "FUSED_BACKWARD_DEVICES", ()))
    if getattr(mod, "lora_backward", None) is not None and fused_devices:

        @torch.library.custom_op(
            lib.format("lora_backward"), mutates_args=(), device_types=fused_devices
        )
        def fused(
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
            return mod.lora_backward(
                grad_y, x, w, lora_a, lora_b, u, ranks, offsets, scale,
                need_x=need_x, need_a=need_a, need_b=need_b, need_w=need_w,
            )  # fmt: skip

        fused.register_fake(_fused_backward_fake)
    return BackendOps(name, shrink, base_expand, weight_grad, fused, fused_devices)


def get_ops(name: str) -> BackendOps:
    """The ``drlora::*_<name>`` custom ops of an available backend (defined on first use).

    Raises:
        BackendUnavailableError: the backend is not available (the message says why).
    """
    if name not in _ops:
        backend = describe_backend(name)
        _ops[name] = define_ops(name, backend.module(), backend.device_types)
    return _ops[name]


def plain_ops(name: str, **kwargs) -> BackendOps:
    """A backend's primitives as plain functions (no custom op), ``kwargs`` bound to each.

    For tests and benchmarks, e.g. the oracle in the input dtype:
    ``lora_forward(plain_ops("reference", upcast=False), x=..., ...)``.
    """
    mod = describe_backend(name).module()
    fused = getattr(mod, "lora_backward", None)
    return BackendOps(
        name,
        functools.partial(mod.shrink, **kwargs),
        functools.partial(mod.base_expand, **kwargs),
        functools.partial(mod.weight_grad, **kwargs),
        None if fused is None else functools.partial(fused, **kwargs),
        tuple(getattr(mod, "FUSED_BACKWARD_DEVICES", ())),
    )


def define_available_ops() -> None:
    """Define the custom ops of every available backend now, not lazily inside a traced region."""
    for name, backend in DESCRIPTORS.items():
        if backend.is_available()[0]:
            get_ops(name)
