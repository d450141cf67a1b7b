"""Grouped variable-rank LoRA ops: the public functional API.

All ops take tokens already sorted by expert (see :mod:`drlora_kernels.ops.routing`):
group ``e`` is rows ``offsets[e]:offsets[e+1]`` of ``x``; expert ``e`` uses only
its first ``ranks[e]`` LoRA slots. Semantics, for every expert ``e``::

    rows = slice(offsets[e], offsets[e+1]); r = ranks[e]
    U[rows, :r]  = X[rows] @ A[e, :r].T                      # shrink   (fp32)
    Y[rows]      = scale[e] * U[rows, :r] @ B[e, :, :r].T     # expand
    Y[rows]     += X[rows] @ W[e].T                           # grouped_lora_base only

Empty groups and rank-0 experts cost nothing; slots ``>= ranks[e]`` are never
read (they may hold anything, NaN included) and receive exactly zero gradient.
Accumulation is fp32 (fp64 for fp64 inputs); outputs are in the input dtype.

Every op takes ``backend=`` (``"auto"``, ``"reference"``, ``"triton"``,
``"native"``); see :func:`drlora_kernels.ops.registry.resolve_backend`.
"""

from __future__ import annotations

import torch

from .. import _native as _native_mod
from . import _validate
from .registry import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    backend_module,
    get_backend,
    get_ops,
    resolve_backend,
    set_backend,
)
from .routing import TokenRouting, gather_tokens, route_tokens, scatter_tokens

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "TokenRouting",
    "available_backends",
    "backend_module",
    "gather_tokens",
    "get_backend",
    "get_ops",
    "grouped_lora",
    "grouped_lora_backward",
    "grouped_lora_base",
    "lora_expand",
    "lora_shrink",
    "resolve_backend",
    "route_tokens",
    "scatter_tokens",
    "set_backend",
    "slot_importance",
]


def grouped_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: float | torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-expert LoRA update ``Y_e = scale_e * (X_e A_e[:r_e]^T) B_e[:, :r_e]^T`` (differentiable).

    Semantics:
        ``Y[offsets[e]:offsets[e+1]] = scale[e] * X[...] @ A[e, :r_e].T @ B[e, :, :r_e].T``

    Args:
        x: `[T, K]` expert-sorted token rows, fp32/fp16/bf16/fp64.
        lora_a: `[E, R, K]` LoRA A slots (PEFT's ``lora_A`` layout per expert), same dtype as ``x``.
        lora_b: `[E, N, R]` LoRA B slots (PEFT's ``lora_B`` layout per expert), same dtype as ``x``.
        ranks: `[E]` int32/int64 active ranks, ``0 <= ranks[e] <= R``.
        offsets: `[E+1]` int32/int64 group boundaries, ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == T``.
        scale: a float or an `[E]` tensor of per-expert scales (SPEC: ``alpha / r_target``).
        backend: ``None`` (configured default), ``"auto"``, ``"reference"``, ``"triton"`` or ``"native"``.

    Returns:
        `[T, N]` in ``x``'s dtype.

    Raises:
        ValueError / TypeError: naming the bad argument (shape, dtype, device, rank range, offsets).
        BackendUnavailableError: an explicitly requested backend is not available.

    Example:
        >>> y = grouped_lora(x, A, B, ranks, offsets, scale=2.0)
    """
    return _lora_forward(x, None, lora_a, lora_b, ranks, offsets, scale, backend)


def grouped_lora_base(
    x: torch.Tensor,
    w: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: float | torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Base expert GEMM plus LoRA in one grouped op: ``Y_e = X_e W_e^T + scale_e (X_e A_e^T) B_e^T``.

    Args:
        w: `[E, N, K]` frozen (or trainable) expert weights in transformers' ``[E, out, in]`` layout.
        Other arguments as in :func:`grouped_lora`.

    Returns:
        `[T, N]` in ``x``'s dtype. Gradients flow to ``x``, ``lora_a``, ``lora_b`` and ``w`` (if it requires grad).
    """
    return _lora_forward(x, w, lora_a, lora_b, ranks, offsets, scale, backend)


def _lora_forward(x, w, lora_a, lora_b, ranks, offsets, scale, backend):
    _validate.check_lora_inputs(x, lora_a, lora_b, ranks, offsets, w=w)
    scale_t = _validate.as_scale(scale, lora_a.shape[0], x.device)
    name = resolve_backend(backend, x.device)
    y, _ = get_ops(name)["forward"](
        x.contiguous(), None if w is None else w.contiguous(), lora_a.contiguous(), lora_b.contiguous(),
        ranks, offsets, scale_t,
    )  # fmt: skip
    return y


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Shrink ``U_e = X_e A_e[:r_e]^T`` (forward only; an inference primitive).

    Returns:
        `[T, R]` fp32 (fp64 for fp64 ``x``); columns ``>= ranks[e]`` of group ``e`` are zero.
        The output shape never depends on the ranks, so ``torch.compile`` does not recompile.
    """
    _validate.check_tensor("x", x, ndim=2)
    _validate.check_tensor("lora_a", lora_a, ndim=3)
    if lora_a.shape[2] != x.shape[1]:
        raise ValueError(
            f"lora_a must have shape [E, R, K={x.shape[1]}], got {tuple(lora_a.shape)}"
        )
    if lora_a.dtype != x.dtype:
        raise TypeError(f"x and lora_a must share a dtype, got {x.dtype} and {lora_a.dtype}")
    _validate.check_same_device(x=x, lora_a=lora_a, ranks=ranks, offsets=offsets)
    _validate.check_ranks(ranks, lora_a.shape[0], lora_a.shape[1])
    _validate.check_offsets(offsets, lora_a.shape[0], x.shape[0])
    name = resolve_backend(backend, x.device)
    return get_ops(name)["shrink"](x.contiguous(), lora_a.contiguous(), ranks, offsets)


def lora_expand(
    u: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: float | torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Expand ``Y_e = scale_e U_e[:, :r_e] B_e[:, :r_e]^T`` (forward only; an inference primitive).

    Args:
        u: `[T, R]` fp32 (or fp64) shrink output.
        lora_b: `[E, N, R]`.

    Returns:
        `[T, N]` in ``lora_b``'s dtype.
    """
    _validate.check_tensor("u", u, ndim=2, dtypes=(torch.float32, torch.float64))
    _validate.check_tensor("lora_b", lora_b, ndim=3)
    if lora_b.shape[2] != u.shape[1]:
        raise ValueError(
            f"lora_b must have shape [E, N, R={u.shape[1]}] to match u [T, R], got {tuple(lora_b.shape)}"
        )
    _validate.check_same_device(u=u, lora_b=lora_b, ranks=ranks, offsets=offsets)
    _validate.check_ranks(ranks, lora_b.shape[0], lora_b.shape[2])
    _validate.check_offsets(offsets, lora_b.shape[0], u.shape[0])
    scale_t = _validate.as_scale(scale, lora_b.shape[0], u.device)
    name = resolve_backend(backend, u.device)
    return get_ops(name)["expand"](u.contiguous(), lora_b.contiguous(), ranks, offsets, scale_t)


def grouped_lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: float | torch.Tensor,
    *,
    w: torch.Tensor | None = None,
    with_importance: bool = True,
    backend: str | None = None,
) -> dict[str, torch.Tensor]:
    """Explicit (non-autograd) backward with the fused per-slot importance sums.

    Recomputes the shrink, then returns ``{"dx", "da", "db", "imp_a", "imp_b"}``
    (plus ``"dw"`` when ``w`` is given) where ``imp_a[e, j] = sum_k |A*dA|`` and
    ``imp_b[e, j] = sum_n |B*dB|`` (SPEC Eq. 6), fp32 `[E, R]`, zero for inactive slots.
    """
    _validate.check_lora_inputs(x, lora_a, lora_b, ranks, offsets, w=w)
    _validate.check_tensor("grad_y", grad_y, ndim=2)
    if grad_y.shape != (x.shape[0], lora_b.shape[1]):
        raise ValueError(
            f"grad_y must have shape [{x.shape[0]}, {lora_b.shape[1]}], got {tuple(grad_y.shape)}"
        )
    scale_t = _validate.as_scale(scale, lora_a.shape[0], x.device)
    ops = get_ops(resolve_backend(backend, x.device))
    args = (
        x.contiguous(),
        None if w is None else w.contiguous(),
        lora_a.contiguous(),
        lora_b.contiguous(),
    )
    _, u = ops["forward"](*args, ranks, offsets, scale_t)
    dx, dw, da, db, imp_a, imp_b = ops["backward"](
        grad_y.contiguous(), args[0], args[1], args[2], args[3], u, ranks, offsets, scale_t,
        True, w is not None, True, True, with_importance,
    )  # fmt: skip
    out = {"dx": dx, "da": da, "db": db}
    if w is not None:
        out["dw"] = dw
    if with_importance:
        out["imp_a"], out["imp_b"] = imp_a, imp_b
    return out


def slot_importance(
    lora_a: torch.Tensor,
    grad_a: torch.Tensor,
    lora_b: torch.Tensor,
    grad_b: torch.Tensor,
    ranks: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot importance sums from accumulated gradients: ``(sum_k |A*dA|, sum_n |B*dB|)``, fp32 `[E, R]`.

    Slots ``>= ranks[e]`` are exactly zero and never read. On the CPU the native
    extension (when loaded) computes it reading the active slots only; elsewhere,
    under ``torch.compile`` or with inputs that need a graph, the reference does.
    """
    from .reference import slot_importance as _ref

    if _native_importance_applies(lora_a, grad_a, lora_b, grad_b, ranks):
        return _native_mod._C.slot_importance(lora_a, grad_a, lora_b, grad_b, ranks)
    return _ref(lora_a, grad_a, lora_b, grad_b, ranks)


def _native_importance_applies(*tensors: torch.Tensor) -> bool:
    if not _native_mod.HAS_NATIVE or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _define_available_ops() -> None:
    # Define the custom ops of every available backend now, not lazily inside a traced region.
    for name, (ok, _) in available_backends().items():
        if ok:
            get_ops(name)


_define_available_ops()
