"""The oracle: grouped variable-rank LoRA in plain PyTorch.

Written for obviousness, not speed: a Python loop over experts, slicing the
expert's token rows ``offsets[e]:offsets[e+1]`` and its active slots
``lora_a[e, :r_e]`` / ``lora_b[e, :, :r_e]``. It implements the three primitives of
the backend contract (``shrink``, ``base_expand``, ``weight_grad``; semantics in
:mod:`drlora_kernels.ops.registry`) with the signatures every backend has, plus an
``upcast`` option: ``upcast=False`` computes in the input dtype throughout (the
low-precision oracle of the tolerance rule in ``tests/helpers.py``). Every other
backend is tested against this module; it imports nothing from them.

Conventions shared by all backends (see ``ops/__init__.py`` for the public API):

* ``x [T, K]`` rows sorted by expert; group ``e`` is ``x[offsets[e]:offsets[e+1]]``;
* ``lora_a [E, R, K]``, ``lora_b [E, N, R]``, ``w [E, N, K]`` (transformers' ``[E, out, in]``),
  any strides (the backward passes transposed views);
* ``ranks [E]`` and ``offsets [E+1]`` int32 tensors; ``scale [E]`` fp32;
* ``u [T, R]`` (and ``gb``) in the accumulation dtype (fp64 for fp64 inputs, else fp32),
  zero in columns ``>= r_e`` of group ``e``;
* slots ``>= r_e`` are never read (they may hold NaN) and get exactly zero gradient.

It reads ``ranks`` and ``offsets`` on the host (the loop needs them): unlike the
Triton and native backends it is not free of host syncs on an accelerator.
"""

from __future__ import annotations

import torch

NAME = "reference"
DEVICE_TYPES = None  # any device


def is_available() -> tuple[bool, str]:
    return True, "plain PyTorch, always available"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 stays fp64, everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _groups(ranks: torch.Tensor, offsets: torch.Tensor):
    off = offsets.tolist()
    for e, r in enumerate(ranks.tolist()):
        yield e, int(r), off[e], off[e + 1]


def _work_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    return acc_dtype(dtype) if upcast else dtype


def shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """``u[rows_e, :r_e] = scale[e] * x[rows_e] @ lora_a[e, :r_e].T``; other columns zero.

    Returns ``[T, R]`` in the accumulation dtype (``x``'s dtype with ``upcast=False``).
    """
    dt = _work_dtype(x.dtype, upcast)
    u = torch.zeros(x.shape[0], lora_a.shape[1], dtype=dt, device=x.device)
    for e, r, lo, hi in _groups(ranks, offsets):
        if r == 0 or hi == lo:
            continue
        ue = x[lo:hi].to(dt) @ lora_a[e, :r].to(dt).T
        u[lo:hi, :r] = ue if scale is None else ue * scale[e].to(dt)
    return u


def base_expand(
    x: torch.Tensor | None,
    w: torch.Tensor | None,
    u: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """``y[rows_e] = x[rows_e] @ w[e].T (if w) + scale[e] * u[rows_e, :r_e] @ lora_b[e, :, :r_e].T``.

    Returns ``[T, N]`` in ``lora_b``'s dtype.
    """
    dt = _work_dtype(lora_b.dtype, upcast)
    y = torch.zeros(u.shape[0], lora_b.shape[1], dtype=dt, device=u.device)
    for e, r, lo, hi in _groups(ranks, offsets):
        if hi == lo:
            continue
        if w is not None:
            y[lo:hi] = x[lo:hi].to(dt) @ w[e].to(dt).T
        if r > 0:
            y[lo:hi] += (u[lo:hi, :r].to(dt) @ lora_b[e, :, :r].to(dt).T) * scale[e].to(dt)
    return y.to(lora_b.dtype)


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
    *,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(da, db, dw)`` in ``x``'s dtype; a gradient not asked for is an empty ``[0]`` tensor.

    ``da[e, :r_e] = gb[rows_e, :r_e].T @ x[rows_e]`` (``gb = scale * grad_y @ lora_b``, read
    only when ``need_a``), ``db[e, :, :r_e] = scale[e] * grad_y[rows_e].T @ u[rows_e, :r_e]``,
    ``dw[e] = grad_y[rows_e].T @ x[rows_e]``; inactive slots exactly zero.
    """
    dt = _work_dtype(x.dtype, upcast)
    E, R, K, N = ranks.shape[0], u.shape[1], x.shape[1], grad_y.shape[1]

    def zeros(*shape):
        return torch.zeros(*shape, dtype=dt, device=x.device)

    da = zeros(E, R, K) if need_a else None
    db = zeros(E, N, R) if need_b else None
    dw = zeros(E, N, K) if need_w else None
    for e, r, lo, hi in _groups(ranks, offsets):
        if hi == lo:
            continue
        g, xe = grad_y[lo:hi].to(dt), x[lo:hi].to(dt)
        if dw is not None:
            dw[e] = g.T @ xe
        if r == 0:
            continue
        if da is not None:
            da[e, :r] = gb[lo:hi, :r].to(dt).T @ xe
        if db is not None:
            db[e, :, :r] = (g.T @ u[lo:hi, :r].to(dt)) * scale[e].to(dt)
    # a fresh [0] tensor per unused output: custom-op outputs must not alias
    return tuple(x.new_empty(0) if t is None else t.to(x.dtype) for t in (da, db, dw))


def slot_importance(
    lora_a: torch.Tensor,
    grad_a: torch.Tensor,
    lora_b: torch.Tensor,
    grad_b: torch.Tensor,
    ranks: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot L1 sums of SPEC Eq. 6: ``(sum_k |a*da|, sum_n |b*db|)``, fp32 ``[E, R]``.

    Slots ``>= r_e`` are reported as exactly zero (and never read, so NaN there is harmless).
    """
    R = lora_a.shape[1]
    active = torch.arange(R, device=ranks.device)[None, :] < ranks[:, None].to(torch.long)  # [E, R]
    # Each sum involves one slot only, so masking the [E, R] sums (with where, not a
    # multiply: NaN in an inactive slot stays out) equals masking the products first,
    # at a fraction of the memory traffic.
    sum_a = (lora_a.float() * grad_a.float()).abs_().sum(dim=2)
    sum_b = (lora_b.float() * grad_b.float()).abs_().sum(dim=1)
    zero = torch.zeros((), dtype=sum_a.dtype, device=sum_a.device)
    return torch.where(active, sum_a, zero), torch.where(active, sum_b, zero)
