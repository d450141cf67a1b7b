"""drlora_kernels: fused variable-rank grouped LoRA kernels and DR-LoRA training for MoE models.

Layers of the package (imports go one way, top to bottom):

* integrations (transformers, PEFT, Trainer callback)
* layers (``GroupedLoRALinear``, ``DRLoRAExperts``)
* ops (grouped LoRA ops and backends), pool (padded rank pool), saliency, scheduler
"""

from __future__ import annotations

from ._native import build_info
from .layers import DRLoRAExperts, GroupedLoRALinear
from .ops import (
    BackendUnavailableError,
    available_backends,
    get_backend,
    grouped_lora,
    grouped_lora_backward,
    grouped_lora_base,
    lora_expand,
    lora_shrink,
    route_tokens,
    set_backend,
    slot_importance,
)
from .pool import RankPool, lora_scale

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DRLoRAExperts",
    "GroupedLoRALinear",
    "RankPool",
    "__version__",
    "available_backends",
    "build_info",
    "get_backend",
    "grouped_lora",
    "grouped_lora_backward",
    "grouped_lora_base",
    "lora_expand",
    "lora_scale",
    "lora_shrink",
    "route_tokens",
    "set_backend",
    "slot_importance",
]
