"""The paper's implementation of DR-LoRA, for the speed comparison: compute all ``r_max`` ranks, then mask.

DR-LoRA as published keeps every LoRA at ``r_max`` and multiplies the inactive
rank slots by a 0/1 mask, so it pays for ``r_max`` ranks from the first step.
:class:`MaskedGroupedLoRALinear` reproduces that on top of the same grouped op
and backend as the variable-rank path: it masks ``A`` and ``B`` per slot and
calls the op with every rank forced to ``r_max``. The result equals the
variable-rank path's up to float rounding (masked slots add exact zeros), the
inactive slots receive exactly zero gradient (``d(A * m) / dA = m``), so the
controller sees the same statistics and takes the same decisions. Only the cost
differs, which is what the demo measures.
"""

from __future__ import annotations

import torch

from ..layers import GroupedLoRALinear
from ..ops import grouped_lora, grouped_lora_base


class MaskedGroupedLoRALinear(GroupedLoRALinear):
    """A :class:`GroupedLoRALinear` that computes all ``r_max`` slots and masks the inactive ones."""

    def forward(
        self, x: torch.Tensor, offsets: torch.Tensor, base_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        mask = self.active_mask().to(self.lora_A.dtype)  # [E, R]
        lora_a = self.lora_A * mask[:, :, None]
        lora_b = self.lora_B * mask[:, None, :]
        full = torch.full_like(self.ranks, self.r_max)
        if base_weight is None:
            return grouped_lora(
                x, lora_a, lora_b, full, offsets, self.scaling, backend=self.backend
            )
        return grouped_lora_base(
            x, base_weight, lora_a, lora_b, full, offsets, self.scaling, backend=self.backend
        )


def use_masked_compute(pools: list[list[GroupedLoRALinear]]) -> int:
    """Switch every pool of ``pools[layer][i]`` to the masked ``r_max`` computation, in place.

    Parameters, buffers and state-dict keys are unchanged (only the class of each
    pool is swapped for its masked subclass). Returns the number of pools switched.

    Raises:
        TypeError: a pool is not a :class:`GroupedLoRALinear`.
    """
    n = 0
    for layer in pools:
        for pool in layer:
            if not isinstance(pool, GroupedLoRALinear):
                raise TypeError(
                    f"pools must hold GroupedLoRALinear modules, got {type(pool).__name__}"
                )
            if type(pool) is GroupedLoRALinear:
                pool.__class__ = MaskedGroupedLoRALinear
            n += 1
    return n
