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
``"native"``); see :func:`drlora_kernels.ops.backends.resolve_backend`. Inputs are
validated here, once, for every backend (:mod:`~drlora_kernels.ops._validate`):
``ranks``/``offsets`` may be int32 or int64, strided or expanded views (they are
converted to contiguous int32); their values are checked without a host sync on
accelerators (:mod:`~drlora_kernels.ops._sync`). Autograd is composed from the
backend's three primitives in :mod:`~drlora_kernels.ops.registry`.
"""

from __future__ import annotations

import torch

from .. import _native as _native_mod
from . import _validate
from .backends import (
    BACKENDS,
    Backend,
    BackendUnavailableError,
    available_backends,
    backend_module,
    describe_backend,
    get_backend,
    resolve_backend,
    set_backend,
)
from .registry import GroupedLoRAFunction, define_available_ops, get_ops
from .routing import TokenRouting, gather_tokens, route_tokens, scatter_tokens

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailableError",
    "TokenRouting",
    "available_backends",
    "backend_module",
    "describe_backend",
    "gather_tokens",
    "get_backend",
    "get_ops",
    "grouped_lora",
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
        ranks: `[E]` int32/int64 active ranks, ``0 <= ranks[e] <= R`` (any strides).
        offsets: `[E+1]` int32/int64 group boundaries, ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == T``.
        scale: a finite float or an `[E]` (or 0-d) tensor of per-expert scales (SPEC:
            ``alpha / r_target``); a constant: a tensor that requires grad is refused.
        backend: ``None`` (configured default), ``"auto"``, ``"reference"``, ``"triton"`` or ``"native"``.

    Returns:
        `[T, N]` in ``x``'s dtype.

    Raises:
        ValueError / TypeError: naming the bad argument (shape, dtype, device, rank range,
            offsets, non-finite scale, a scale that requires grad). Value checks run on the
            host for CPU tensors (or with ``DRLORA_CHECK=1``); on accelerators and in compiled
            graphs they are device-side asserts (``RuntimeError`` / a CUDA device assert).
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
    ranks, offsets = _validate.check_lora_inputs(x, lora_a, lora_b, ranks, offsets, w=w)
    scale_t = _validate.as_scale(scale, lora_a.shape[0], x.device)
    name = resolve_backend(backend, x.device)
    return GroupedLoRAFunction.apply(
        x.contiguous(), None if w is None else w.contiguous(), lora_a.contiguous(),
        lora_b.contiguous(), ranks, offsets, scale_t, name,
    )  # fmt: skip


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    *,
    scale: float | torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Shrink ``U_e = scale_e X_e A_e[:r_e]^T`` (forward only; an inference primitive).

    Args:
        x: `[T, K]`; lora_a: `[E, R, K]`; ranks, offsets: as in :func:`grouped_lora`.
        scale: ``None`` (1) or as in :func:`grouped_lora`.

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
    E = lora_a.shape[0]
    ranks = _validate.check_ranks(ranks, E, lora_a.shape[1])
    offsets = _validate.check_offsets(offsets, E, x.shape[0])
    scale_t = None if scale is None else _validate.as_scale(scale, E, x.device)
    ops = get_ops(resolve_backend(backend, x.device))
    return ops.shrink(
        x=x.contiguous(), lora_a=lora_a.contiguous(), ranks=ranks, offsets=offsets, scale=scale_t
    )


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
    E = lora_b.shape[0]
    ranks = _validate.check_ranks(ranks, E, lora_b.shape[2])
    offsets = _validate.check_offsets(offsets, E, u.shape[0])
    scale_t = _validate.as_scale(scale, E, u.device)
    ops = get_ops(resolve_backend(backend, u.device))
    return ops.base_expand(
        x=None, w=None, u=u.contiguous(), lora_b=lora_b.contiguous(), ranks=ranks,
        offsets=offsets, scale=scale_t,
    )  # fmt: skip


def slot_importance(
    lora_a: torch.Tensor,
    grad_a: torch.Tensor,
    lora_b: torch.Tensor,
    grad_b: torch.Tensor,
    ranks: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot importance sums from accumulated gradients: ``(sum_k |A*dA|, sum_n |B*dB|)``, fp32 `[E, R]`.

    This is the package's one importance path (SPEC Eq. 6): it reads the complete
    gradient of the step (``.grad`` after all micro-batches, or an engine's equivalent),
    so it is right under gradient accumulation, and per-shard ``[E, R]`` partial sums
    of a sharded gradient add up exactly to the sums of the whole. Slots
    ``>= ranks[e]`` are exactly zero and never read. On the CPU the native extension
    (when loaded) computes it reading the active slots only; elsewhere, under
    ``torch.compile`` or with inputs that need a graph, the reference does.
    """
    from .reference import slot_importance as _ref

    ranks = _validate.as_index("ranks", ranks, lora_a.shape[0], "one per expert")
    if _native_importance_applies(lora_a, grad_a, lora_b, grad_b, ranks):
        return _native_mod._C.slot_importance(lora_a, grad_a, lora_b, grad_b, ranks)
    return _ref(lora_a, grad_a, lora_b, grad_b, ranks)


def _native_importance_applies(*tensors: torch.Tensor) -> bool:
    if not _native_mod.HAS_NATIVE or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


define_available_ops()
