"""Input checks shared by every backend: one place, errors that name the argument.

Every public op validates here before it reaches a kernel, so a bad shape,
dtype, device, rank or offset table becomes a ``ValueError``/``TypeError``
naming the argument instead of a crash (or a silent wrong answer) inside a
kernel. Shape, dtype and device checks are always eager. Value checks
(ranks in ``[0, r_max]``, offsets ``0 = o_0 <= ... <= o_E = T``, a finite
scale, expert ids in range) read the values on the host only where
:func:`~drlora_kernels.ops._sync.host_checks_enabled` allows it (CPU tensors,
``DRLORA_CHECK=1``); on accelerators and inside compiled graphs they are
device-side asserts, so a training step makes no host sync and a compiled
graph still cannot return a silent wrong result.

The integer tensors leave here as contiguous int32 (what every backend indexes):
strided, expanded and int64 views are accepted and converted.
"""

from __future__ import annotations

import math

import torch

from ._sync import device_assert, host_checks_enabled

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
#: row counts and offsets are int32 in every backend
MAX_ROWS = 2**31 - 1


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
    # non-tensors are left to the type checks that follow (a TypeError naming them)
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    if not items:
        return
    ref_name, ref = items[0]
    for name, t in items[1:]:
        if t.device != ref.device:
            raise ValueError(
                f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must share a device"
            )


def as_index(name: str, t: object, length: int, what: str) -> torch.Tensor:
    """A 1-D integer tensor of ``length`` entries, returned as contiguous int32 (no copy if it is one)."""
    check_tensor(name, t, ndim=1, dtypes=INDEX_DTYPES)
    if t.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}] ({what}), got {tuple(t.shape)}")
    return t.to(torch.int32).contiguous()


def check_ranks(ranks: torch.Tensor, num_experts: int, r_max: int) -> torch.Tensor:
    """Validate ``ranks [E]`` (``0 <= ranks[e] <= r_max``); returns it contiguous int32."""
    out = as_index("ranks", ranks, num_experts, "one per expert")
    if not host_checks_enabled(ranks):
        device_assert(
            ((ranks >= 0) & (ranks <= r_max)).all(),
            f"ranks out of range: expected 0 <= ranks[e] <= r_max = {r_max} for every expert e",
        )
    elif ranks.numel() > 0:
        bad = [(e, r) for e, r in enumerate(ranks.tolist()) if not 0 <= r <= r_max]
        if bad:
            e, r = bad[0]
            raise ValueError(
                f"ranks out of range: ranks[{e}] = {r}, expected 0 <= rank <= r_max = {r_max}"
            )
    return out


def check_offsets(offsets: torch.Tensor, num_experts: int, num_rows: int) -> torch.Tensor:
    """Validate ``offsets [E+1]`` (``0 = o_0 <= ... <= o_E = num_rows``); returns it contiguous int32."""
    out = as_index("offsets", offsets, num_experts + 1, "num_experts + 1")
    if num_rows > MAX_ROWS:
        raise ValueError(f"at most {MAX_ROWS} token rows are supported, got {num_rows}")
    if not host_checks_enabled(offsets):
        ok = (offsets[0] == 0) & (offsets[-1] == num_rows)
        # no sizes in the message: formatting a symbolic T would specialise compiled graphs
        device_assert(
            ok & (offsets[1:] >= offsets[:-1]).all(),
            "offsets must start at 0, be non-decreasing and end at the number of token rows of x",
        )
        return out
    off = offsets.tolist()
    if off[0] != 0:
        raise ValueError(f"offsets[0] must be 0, got {off[0]}")
    if off[-1] != num_rows:
        raise ValueError(
            f"offsets[-1] must equal the number of token rows of x ({num_rows}), got {off[-1]}"
        )
    for e in range(num_experts):
        if off[e + 1] < off[e]:
            raise ValueError(
                f"offsets must be non-decreasing: offsets[{e}] = {off[e]} > offsets[{e + 1}] = {off[e + 1]}"
            )
    return out


def check_expert_ids(top_k_index: torch.Tensor, num_experts: int) -> None:
    """Expert ids in ``[0, num_experts)`` (eager on the host, else a device-side assert)."""
    if top_k_index.numel() == 0:
        return
    if not host_checks_enabled(top_k_index):
        device_assert(
            ((top_k_index >= 0) & (top_k_index < num_experts)).all(),
            f"top_k_index holds an expert id outside [0, {num_experts})",
        )
        return
    lo, hi = int(top_k_index.min()), int(top_k_index.max())
    if lo < 0 or hi >= num_experts:
        raise ValueError(
            f"top_k_index holds expert ids in [{lo}, {hi}], expected [0, {num_experts})"
        )


def as_scale(scale: float | torch.Tensor, num_experts: int, device: torch.device) -> torch.Tensor:
    """Normalise ``scale`` (a float or an ``[E]`` / 0-d tensor) to a contiguous fp32 ``[E]`` tensor.

    Raises:
        TypeError: not a number or a float tensor.
        ValueError: wrong shape or device, a non-finite value, or a tensor that requires
            grad (the ops treat the scale as a constant, SPEC ``alpha / r_target``: a
            gradient would silently be dropped; a learned per-expert scale is the same
            function as scaling ``lora_B``, so pass ``scale.detach()``).
    """
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
        return torch.full((num_experts,), float(scale), dtype=torch.float32, device=device)
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"scale must be a float or a tensor, got {type(scale).__name__}")
    check_tensor("scale", scale, dtypes=FLOAT_DTYPES)
    if scale.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "scale requires grad, but the grouped LoRA ops treat it as a constant and would "
            "give it no gradient; pass scale.detach() (a trainable per-expert scale is the "
            "same function as scaling lora_B)"
        )
    if scale.dim() == 0:
        scale = scale.expand(num_experts)
    elif scale.shape != (num_experts,):
        raise ValueError(
            f"scale must be a float or have shape [{num_experts}], got {tuple(scale.shape)}"
        )
    if scale.device != device:
        raise ValueError(f"scale is on {scale.device} but x is on {device}")
    out = scale.detach().to(torch.float32).contiguous()
    if not host_checks_enabled(out):
        device_assert(torch.isfinite(out).all(), "scale must be finite (no NaN or Inf)")
    else:
        bad = [(e, v) for e, v in enumerate(out.tolist()) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"scale must be finite: scale[{bad[0][0]}] = {bad[0][1]}")
    return out


def check_lora_inputs(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    offsets: torch.Tensor,
    w: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a grouped LoRA problem; returns ``(ranks, offsets)`` as contiguous int32."""
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
    return check_ranks(ranks, E, R), check_offsets(offsets, E, T)
