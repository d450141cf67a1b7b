"""``nn.Module``s built on the grouped ops: thin, no logic beyond calling them.

* :class:`GroupedLoRALinear` — a :class:`~drlora_kernels.pool.RankPool` that
  applies itself (optionally fused with the base expert GEMM) to expert-sorted rows.
* :class:`DRLoRAExperts` — a SwiGLU MoE expert block (``gate_up_proj [E, 2I, H]``,
  ``down_proj [E, H, I]``, transformers' layout) with a LoRA pool on each
  projection, called like transformers' experts: ``(hidden, top_k_index, top_k_weights)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .ops import gather_tokens, grouped_lora, grouped_lora_base, route_tokens, scatter_tokens
from .pool import RankPool


class GroupedLoRALinear(RankPool):
    """Per-expert LoRA (padded rank pool) applied to expert-sorted rows.

    ``forward(x, offsets, base_weight=None)`` returns ``scale * (x A^T) B^T`` per
    group, plus ``x W_e^T`` when ``base_weight [E, N, K]`` is given (one fused op).
    """

    backend: str | None = None

    def forward(
        self, x: torch.Tensor, offsets: torch.Tensor, base_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        if base_weight is None:
            return grouped_lora(
                x, self.lora_A, self.lora_B, self.ranks, offsets, self.scaling, backend=self.backend
            )
        return grouped_lora_base(
            x,
            base_weight,
            self.lora_A,
            self.lora_B,
            self.ranks,
            offsets,
            self.scaling,
            backend=self.backend,
        )


class DRLoRAExperts(nn.Module):
    """A SwiGLU expert block with DR-LoRA on ``gate_up_proj`` and ``down_proj``.

    Computes, for every token and each of its ``k`` experts ``e`` (weight ``p``)::

        h = x @ (W_gu[e] + s B_gu A_gu).T ; g, u = h.chunk(2) ; a = act(g) * u
        y += p * a @ (W_d[e] + s B_d A_d).T

    The base weights are frozen buffers-as-parameters (``requires_grad=False``).
    """

    def __init__(
        self,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        r_max: int,
        r_init: int,
        *,
        r_target: int | None = None,
        alpha: float | None = None,
        act_fn: Callable[[torch.Tensor], torch.Tensor] = nn.functional.silu,
        backend: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
            raise ValueError(
                f"gate_up_proj must be [E, 2I, H] and down_proj [E, H, I], got {tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}"
            )
        E, two_i, H = gate_up_proj.shape
        if two_i % 2 or tuple(down_proj.shape) != (E, H, two_i // 2):
            raise ValueError(
                f"down_proj must be [E={E}, H={H}, I={two_i // 2}] to match gate_up_proj {tuple(gate_up_proj.shape)}, got {tuple(down_proj.shape)}"
            )
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(gate_up_proj, requires_grad=False)
        self.down_proj = nn.Parameter(down_proj, requires_grad=False)
        kw = dict(
            r_target=r_target,
            alpha=alpha,
            dtype=gate_up_proj.dtype,
            device=gate_up_proj.device,
            generator=generator,
        )
        self.lora_gate_up = GroupedLoRALinear(E, H, two_i, r_max, r_init, **kw)
        self.lora_down = GroupedLoRALinear(E, two_i // 2, H, r_max, r_init, **kw)
        self.lora_gate_up.backend = self.lora_down.backend = backend
        self.act_fn = act_fn

    def forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        routing = route_tokens(top_k_index, top_k_weights, self.num_experts)
        x = gather_tokens(hidden, routing)
        h = self.lora_gate_up(x, routing.offsets, self.gate_up_proj)
        gate, up = h.chunk(2, dim=-1)
        y = self.lora_down(self.act_fn(gate) * up, routing.offsets, self.down_proj)
        return scatter_tokens(y, routing)
