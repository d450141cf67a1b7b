"""Hugging Face integrations: attach DR-LoRA to transformers MoE models, train, save, merge, export.

* :func:`attach_drlora` — rank pools on every fused experts module, experts routed through
  the grouped ops (transformers' experts interface, ``experts_implementation="drlora"``).
* :class:`DRLoRACallback` — statistics, growth, router freeze, logs and checkpoints in a ``Trainer``.
* :func:`save_drlora` / :func:`load_drlora` — safetensors + JSON, resumable mid-growth.
* :func:`merge_drlora` / :func:`unmerge_drlora` — fold the active ranks into the base weights.
* :func:`export_peft` — a stock PEFT LoRA adapter (``PeftModel.from_pretrained``), routers included.
* :func:`import_peft` — a PEFT ``target_parameters`` LoRA adapter into the pools, at its ranks.
* :func:`detach_drlora` — undo :func:`attach_drlora`.
* :mod:`.families` — experts that are 3-D parameters off the experts interface (Llama4...).

``transformers`` is imported here; ``peft`` only by :func:`export_peft` / :func:`import_peft`.
"""

from __future__ import annotations

from .callback import DRLoRACallback
from .checkpoint import load_drlora, read_training_state, save_drlora
from .merge import merge_drlora, unmerge_drlora
from .peft_export import export_peft
from .peft_import import import_peft
from .transformers import (
    DRLoRAModel,
    attach_drlora,
    detach_drlora,
    find_experts_modules,
    get_drlora,
)

__all__ = [
    "DRLoRACallback",
    "DRLoRAModel",
    "attach_drlora",
    "detach_drlora",
    "export_peft",
    "find_experts_modules",
    "get_drlora",
    "import_peft",
    "load_drlora",
    "merge_drlora",
    "read_training_state",
    "save_drlora",
    "unmerge_drlora",
]
