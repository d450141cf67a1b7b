"""The oracle: grouped variable-rank LoRA in plain PyTorch.

Written for obviousness, not speed: a Python loop over experts, slicing the
expert's token rows ``offsets[e]:offsets[e+1]`` and its active slots
``lora_a[e, :r_e]`` / ``lora_b[e, :, :r_e]``. Every other backend exposes the
same functions with the same signatures and is tested against this module.
It imports nothing from the other backends.

Conventions shared by all backends (see ``ops/__init__.py`` for the public API):

* ``x [T, K]`` rows sorted by expert; group ``e`` is ``x[offsets[e]:offsets[e+1]]``;
* ``lora_a [E, R, K]``, ``lora_b [E, N, R]``, ``w [E, N, K]`` (transformers' ``[E, out, in]``);
* ``ranks [E]`` and ``offsets [E+1]`` integer tensors; ``scale [E]`` fp32;
* ``u [T, R]`` is the shrink result ``x_e @ a_e[:r_e].T`` in the accumulation dtype
  (fp64 for fp64 inputs, else fp32), zero in columns ``>= r_e`` of group ``e``;
  the forward returns it so the backward need not recompute it;
* slots ``>= r_e`` are never read (they may hold NaN) and get exactly zero gradient.
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


def _cast(t: torch.Tensor, upcast: bool, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if upcast else t


def shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """``u[rows_e, :r_e] = x[rows_e] @ lora_a[e, :r_e].T``; other columns zero. Returns ``[T, R]``."""
    acc = acc_dtype(x.dtype)
    T, R = x.shape[0], lora_a.shape[1]
    u = torch.zeros(T, R, dtype=acc if upcast else x.dtype, device=x.device)
    for e, r, lo, hi in _groups(ranks, offsets):
        if r == 0 or hi == lo:
            continue
        u[lo:hi, :r] = _cast(x[lo:hi], upcast, acc) @ _cast(lora_a[e, :r], upcast, acc).T
    return u


def expand(
    u: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """``y[rows_e] = scale[e] * u[rows_e, :r_e] @ lora_b[e, :, :r_e].T``. Returns ``[T, N]`` in ``lora_b``'s dtype."""
    acc = acc_dtype(lora_b.dtype)
    T, N = u.shape[0], lora_b.shape[1]
    y = torch.zeros(T, N, dtype=acc if upcast else lora_b.dtype, device=u.device)
    for e, r, lo, hi in _groups(ranks, offsets):
        if r == 0 or hi == lo:
            continue
        y[lo:hi] = (
            _cast(u[lo:hi, :r], upcast, acc) @ _cast(lora_b[e, :, :r], upcast, acc).T
        ) * scale[e].to(y.dtype)
    return y.to(lora_b.dtype)


def forward(
    x: torch.Tensor,
    w: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor,
    *,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y_e = x_e @ w_e.T (if w) + scale_e * (x_e @ a_e[:r_e].T) @ b_e[:, :r_e].T``. Returns ``(y, u)``."""
    acc = acc_dtype(x.dtype)
    T, N = x.shape[0], lora_b.shape[1]
    u = shrink(x, lora_a, ranks, offsets, upcast=upcast)
    y = torch.zeros(T, N, dtype=acc if upcast else x.dtype, device=x.device)
    for e, r, lo, hi in _groups(ranks, offsets):
        if hi == lo:
            continue
        xe = _cast(x[lo:hi], upcast, acc)
        if w is not None:
            y[lo:hi] = xe @ _cast(w[e], upcast, acc).T
        if r > 0:
            y[lo:hi] += (u[lo:hi, :r].to(y.dtype) @ _cast(lora_b[e, :, :r], upcast, acc).T) * scale[
                e
            ].to(y.dtype)
    return y.to(x.dtype), u.to(acc)


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
    *,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`forward` for an incoming ``grad_y [T, N]``.

    Returns ``(dx, dw, da, db, imp_a, imp_b)``. A gradient that was not asked
    for is an empty tensor of shape ``[0]``. ``imp_a[e, j] = sum_k |a * da|``
    and ``imp_b[e, j] = sum_n |b * db|`` (fp32 ``[E, R]``) when
    ``with_importance`` (then ``da``/``db`` are computed even if not asked for).

    Math per group (fp32 accumulation): ``g = grad_y_e``, ``gb = s_e * g @ b_e[:, :r_e]``,
    ``dx_e = g @ w_e + gb @ a_e[:r_e]``, ``da_e[:r_e] = gb.T @ x_e``,
    ``db_e[:, :r_e] = s_e * g.T @ u_e[:, :r_e]``, ``dw_e = g.T @ x_e``.
    """
    acc = acc_dtype(x.dtype)
    E, R, K = lora_a.shape
    N = lora_b.shape[1]

    def empty():  # a fresh [0] tensor per unused output: custom-op outputs must not alias
        return x.new_empty(0)

    want_a = need_a or with_importance
    want_b = need_b or with_importance
    dx = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
    dw = torch.zeros(E, N, K, dtype=acc, device=x.device) if (need_w and w is not None) else None
    da = torch.zeros(E, R, K, dtype=acc, device=x.device) if want_a else None
    db = torch.zeros(E, N, R, dtype=acc, device=x.device) if want_b else None
    for e, r, lo, hi in _groups(ranks, offsets):
        if hi == lo:
            continue
        g = _cast(grad_y[lo:hi], upcast, acc)
        xe = _cast(x[lo:hi], upcast, acc)
        if dw is not None:
            dw[e] = g.T @ xe
        if dx is not None and w is not None:
            dx[lo:hi] = g @ _cast(w[e], upcast, acc)
        if r == 0:
            continue
        s = scale[e].to(acc if upcast else x.dtype)
        gb = (g @ _cast(lora_b[e, :, :r], upcast, acc)) * s
        if dx is not None:
            dx[lo:hi] += gb @ _cast(lora_a[e, :r], upcast, acc)
        if da is not None:
            da[e, :r] = gb.T @ xe
        if db is not None:
            db[e, :, :r] = (g.T @ _cast(u[lo:hi, :r], upcast, acc)) * s
    imp_a, imp_b = empty(), empty()
    if with_importance:
        imp_a, imp_b = slot_importance(lora_a, da, lora_b, db, ranks)
    return (
        dx.to(x.dtype) if dx is not None else empty(),
        dw.to(w.dtype) if dw is not None else empty(),
        da.to(lora_a.dtype) if need_a else empty(),
        db.to(lora_b.dtype) if need_b else empty(),
        imp_a,
        imp_b,
    )


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
