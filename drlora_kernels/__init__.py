"""drlora_kernels: fused variable-rank grouped LoRA kernels and DR-LoRA training for MoE models.

Layers of the package (imports go one way, top to bottom):

* integrations (transformers, PEFT, Trainer callback)
* layers (``GroupedLoRALinear``, ``DRLoRAExperts``)
* ops (grouped LoRA ops and backends), pool (padded rank pool), saliency, scheduler
"""

from __future__ import annotations

from ._native import build_info
from .config import DRLoRAConfig
from .dynamic import DRLoRAController, GrowthEvent
from .layers import DRLoRAExperts, GroupedLoRALinear
from .ops import (
    BackendUnavailableError,
    available_backends,
    get_backend,
    grouped_lora,
    grouped_lora_base,
    lora_expand,
    lora_shrink,
    route_tokens,
    set_backend,
    slot_importance,
)
from .optim import RankAwareAdamW, reset_optimizer_state_for_slots
from .pool import RankPool, lora_scale
from .saliency import SaliencyTracker
from .scheduler import GrowthSchedule

__version__ = "0.1.0"

# The integrations import transformers (seconds): load them on first use.
_INTEGRATIONS = (
    "DRLoRACallback",
    "DRLoRAModel",
    "attach_drlora",
    "detach_drlora",
    "export_peft",
    "get_drlora",
    "import_peft",
    "load_drlora",
    "merge_drlora",
    "read_training_state",
    "save_drlora",
    "unmerge_drlora",
)


def __getattr__(name: str):
    if name in _INTEGRATIONS:
        from . import integrations

        return getattr(integrations, name)
    raise AttributeError(f"module 'drlora_kernels' has no attribute {name!r}")


__all__ = [
    *_INTEGRATIONS,
    "DRLoRAConfig",
    "DRLoRAController",
    "GrowthEvent",
    "GrowthSchedule",
    "RankAwareAdamW",
    "SaliencyTracker",
    "reset_optimizer_state_for_slots",
    "BackendUnavailableError",
    "DRLoRAExperts",
    "GroupedLoRALinear",
    "RankPool",
    "__version__",
    "available_backends",
    "build_info",
    "get_backend",
    "grouped_lora",
    "grouped_lora_base",
    "lora_expand",
    "lora_scale",
    "lora_shrink",
    "route_tokens",
    "set_backend",
    "slot_importance",
]
