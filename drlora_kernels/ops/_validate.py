"""Input checks shared by every backend: one place, errors that name the argument.

Every public op validates here before it reaches a kernel, so a bad shape,
dtype, device, rank or offset table becomes a ``ValueError``/``TypeError``
naming the argument instead of a crash (or a silent wrong answer) inside a
kernel. Value checks on ``ranks``/``offsets`` read the (tiny) tensors on the
host; they are skipped while tracing (``torch.compile``), where the fake
implementations' ``torch._check`` calls take over.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def check_tensor(
    name: str, t: object, ndim: int | None = None, dtypes=FLOAT_DTYPES
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}, expected one of: {allowed}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    ref_name, ref = items[0]
    for name, t in items[1:]:
        if t.device != ref.device:
            raise ValueError(
                f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must share a device"
            )


def check_ranks(ranks: torch.Tensor, num_experts: int, r_max: int) -> None:
    check_tensor("ranks", ranks, ndim=1, dtypes=INDEX_DTYPES)
    if ranks.shape[0] != num_experts:
        raise ValueError(
            f"ranks must have shape [{num_experts}] (one per expert), got {tuple(ranks.shape)}"
        )
    if _tracing() or ranks.numel() == 0:
        return
    lo, hi = int(ranks.min()), int(ranks.max())
    if lo < 0 or hi > r_max:
        bad = int(((ranks < 0) | (ranks > r_max)).nonzero()[0])
        raise ValueError(
            f"ranks out of range: ranks[{bad}] = {int(ranks[bad])}, expected 0 <= rank <= r_max = {r_max}"
        )


def check_offsets(offsets: torch.Tensor, num_experts: int, num_tokens: int) -> None:
    check_tensor("offsets", offsets, ndim=1, dtypes=INDEX_DTYPES)
    if offsets.shape[0] != num_experts + 1:
        raise ValueError(
            f"offsets must have shape [{num_experts + 1}] (num_experts + 1), got {tuple(offsets.shape)}"
        )
    if _tracing():
        return
    off = offsets.tolist()
    if off[0] != 0:
        raise ValueError(f"offsets[0] must be 0, got {off[0]}")
    if off[-1] != num_tokens:
        raise ValueError(
            f"offsets[-1] must equal the number of token rows of x ({num_tokens}), got {off[-1]}"
        )
    for e in range(num_experts):
        if off[e + 1] < off[e]:
            raise ValueError(
                f"offsets must be non-decreasing: offsets[{e}] = {off[e]} > offsets[{e + 1}] = {off[e + 1]}"
            )


def as_scale(scale: float | torch.Tensor, num_experts: int, device: torch.device) -> torch.Tensor:
    """Normalise ``scale`` (a float or a ``[E]`` tensor) to a contiguous fp32 ``[E]`` tensor."""
    if isinstance(scale, (int, float)):
        return torch.full((num_experts,), float(scale), dtype=torch.float32, device=device)
    check_tensor("scale", scale, dtypes=FLOAT_DTYPES)
    if scale.dim() == 0:
        return scale.to(device=device, dtype=torch.float32).expand(num_experts).contiguous()
    if scale.shape != (num_experts,):
        raise ValueError(
            f"scale must be a float or have shape [{num_experts}], got {tuple(scale.shape)}"
        )
    if scale.device != device:
        raise ValueError(f"scale is on {scale.device} but x is on {device}")
    return scale.to(torch.float32).contiguous()


def check_lora_inputs(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    w: torch.Tensor | None = None,
) -> tuple[int, int, int, int, int]:
    """Validate a grouped LoRA problem; returns ``(T, K, N, E, R)``."""
    check_tensor("x", x, ndim=2)
    check_tensor("lora_a", lora_a, ndim=3)
    check_tensor("lora_b", lora_b, ndim=3)
    T, K = x.shape
    E, R, Ka = lora_a.shape
    Eb, N, Rb = lora_b.shape
    if Ka != K:
        raise ValueError(
            f"lora_a must have shape [E, R, K={K}] to match x [T, K], got {tuple(lora_a.shape)}"
        )
    if Eb != E or Rb != R:
        raise ValueError(
            f"lora_b must have shape [E={E}, N, R={R}] to match lora_a [E, R, K], got {tuple(lora_b.shape)}"
        )
    if lora_a.dtype != x.dtype or lora_b.dtype != x.dtype:
        raise TypeError(
            f"x, lora_a and lora_b must share a dtype, got x={x.dtype}, lora_a={lora_a.dtype}, lora_b={lora_b.dtype}"
        )
    if w is not None:
        check_tensor("w", w, ndim=3)
        if tuple(w.shape) != (E, N, K):
            raise ValueError(
                f"w must have shape [E={E}, N={N}, K={K}] (transformers' [E, out, in]), got {tuple(w.shape)}"
            )
        if w.dtype != x.dtype:
            raise TypeError(f"w has dtype {w.dtype} but x has {x.dtype}; they must match")
    check_same_device(x=x, lora_a=lora_a, lora_b=lora_b, ranks=ranks, offsets=offsets, w=w)
    check_ranks(ranks, E, R)
    check_offsets(offsets, E, T)
    return T, K, N, E, R
