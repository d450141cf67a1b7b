"""The implementations compared side by side, as grouped projections.

A *projection* maps expert-sorted rows ``x [rows, K]`` to ``y [rows, N]`` for a
stack of experts: ``y_e = x_e W_e^T + s_e (x_e A_e[:r_e]^T) B_e[:, :r_e]^T``
(``fused``, base + LoRA) or the LoRA term alone (``lora``). Every provider is
built by :func:`make_projection` and called as ``proj(x, offsets, expert_index)``
so the same code serves the op suites (fixed routing) and the layer suite
(routing computed inside the step).

Providers (``PROVIDERS``):

* ``ours[<backend>]`` — :func:`drlora_kernels.ops.grouped_lora_base` /
  :func:`~drlora_kernels.ops.grouped_lora` on one backend: only active ranks.
* ``masked-rmax`` — the paper's implementation: all ``r_max`` ranks computed
  with ``grouped_mm`` over the full ``A``/``B``, the inactive ones masked after
  the shrink (so gradients of inactive slots are zero, FLOPs are not saved).
* ``peft-wba`` — PEFT's ``target_parameters`` path: rebuild ``W + s * B @ A``
  per expert on every forward (``baddbmm``), then one ``grouped_mm``.
* ``loop`` — a per-expert Python loop of dense matmuls (transformers' eager experts + LoRA).
* ``base`` — the frozen expert GEMM alone through ``grouped_mm``: the floor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from drlora_kernels.ops import grouped_lora, grouped_lora_base

Projection = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

BASELINES = ("masked-rmax", "peft-wba", "loop", "base")


def ours(backend: str) -> str:
    """Provider name of our ops on ``backend``."""
    return f"ours[{backend}]"


def backend_of(provider: str) -> str | None:
    """``"ours[native]"`` -> ``"native"``; ``None`` for a baseline."""
    if provider.startswith("ours[") and provider.endswith("]"):
        return provider[5:-1]
    return None


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x_e @ w_e.T`` for ``w [E, N, K]`` (transformers' layout) with ``offsets [E+1]``."""
    return F.grouped_mm(x, w.transpose(-2, -1), offs=offsets[1:])


def make_projection(
    provider: str,
    w: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    scale: torch.Tensor,
) -> Projection:
    """Bind a provider to one expert stack; ``w=None`` builds the LoRA-only variant.

    ``lora_a [E, R, K]``, ``lora_b [E, N, R]``, ``ranks [E]`` int32 and ``scale [E]``
    fp32 are captured by reference, so gradients reach the caller's leaves.
    """
    backend = backend_of(provider)
    if backend is not None:
        if w is None:
            return lambda x, offsets, _idx: grouped_lora(
                x, lora_a, lora_b, ranks, offsets, scale, backend=backend
            )
        return lambda x, offsets, _idx: grouped_lora_base(
            x, w, lora_a, lora_b, ranks, offsets, scale, backend=backend
        )
    if provider == "masked-rmax":
        return _masked_rmax(w, lora_a, lora_b, ranks, scale)
    if provider == "peft-wba":
        return _peft_wba(w, lora_a, lora_b, ranks, scale)
    if provider == "loop":
        return _loop(w, lora_a, lora_b, ranks, scale)
    if provider == "base":
        if w is None:
            raise ValueError("provider 'base' needs a base weight w (fused mode only)")
        return lambda x, offsets, _idx: _grouped_mm(x, w, offsets)
    raise ValueError(
        f"unknown provider {provider!r}; expected ours[<backend>] or one of {BASELINES}"
    )


def _masked_rmax(w, lora_a, lora_b, ranks, scale) -> Projection:
    R = lora_a.shape[1]
    # [E, R] multiplier: scale_e on active slots, 0 on inactive ones.
    slot_mult = (torch.arange(R, device=ranks.device)[None, :] < ranks[:, None]).to(lora_a.dtype)
    slot_mult = slot_mult * scale[:, None].to(lora_a.dtype)

    def proj(x, offsets, expert_index):
        u = _grouped_mm(x, lora_a, offsets)  # all r_max ranks: [rows, R]
        y = _grouped_mm(u * slot_mult[expert_index], lora_b, offsets)
        return y if w is None else y + _grouped_mm(x, w, offsets)

    return proj


def _peft_wba(w, lora_a, lora_b, ranks, scale) -> Projection:
    # PEFT keeps one rank for all experts; a ragged profile is stored at its max rank
    # with the unused rows of A zeroed (the cheapest faithful way to express it).
    r_hi = int(ranks.max())
    uniform = bool((ranks == r_hi).all())
    row_mask = (torch.arange(r_hi, device=ranks.device)[None, :] < ranks[:, None]).to(lora_a.dtype)
    s = float(scale[0])
    if not bool((scale == s).all()):
        raise ValueError(
            "peft-wba models PEFT's single scaling: scale must be equal for all experts"
        )

    def proj(x, offsets, _idx):
        a = lora_a[:, :r_hi] if uniform else lora_a[:, :r_hi] * row_mask[:, :, None]
        b = lora_b[:, :, :r_hi]
        if w is None:
            w_eff = torch.bmm(b, a) * s
        else:
            w_eff = torch.baddbmm(w, b, a, alpha=s)  # PEFT's _LoraFactorsProxy
        return _grouped_mm(x, w_eff, offsets)

    return proj


def _loop(w, lora_a, lora_b, ranks, scale) -> Projection:
    ranks_l = ranks.tolist()
    scale_l = scale.tolist()

    def proj(x, offsets, _idx):
        bounds = offsets.tolist()
        outs = []
        for e, r in enumerate(ranks_l):
            xe = x[bounds[e] : bounds[e + 1]]
            ye = xe @ w[e].T if w is not None else xe.new_zeros(xe.shape[0], lora_b.shape[1])
            if r > 0 and xe.shape[0] > 0:
                ye = ye + (xe @ lora_a[e, :r].T) @ lora_b[e, :, :r].T * scale_l[e]
            outs.append(ye)
        return torch.cat(outs)

    return proj


def provider_list(backends: list[str], fused: bool, *, loop: bool = True) -> list[str]:
    """Providers in table order: ours per backend, then the baselines that apply."""
    out = [ours(b) for b in backends] + ["masked-rmax", "peft-wba"]
    if loop:
        out.append("loop")
    if fused:
        out.append("base")
    return out
