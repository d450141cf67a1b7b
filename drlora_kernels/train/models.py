"""Tiny MoE language models built from ``transformers`` configs (no downloads).

Three architectures, all with fused ``gate_up_proj [E, 2I, H]`` /
``down_proj [E, H, I]`` experts in transformers 5.x: OLMoE (top-k experts),
Qwen2-MoE (plus a shared expert) and Mixtral. Sizes are named presets so the
demo, the quality study and the tests agree on what "tiny" means.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .data import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

ARCHITECTURES = ("olmoe", "qwen2_moe", "mixtral")


@dataclass(frozen=True)
class ModelSize:
    """Shape of a tiny MoE: hidden size, expert size, layers, heads, experts, top-k."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    experts: int
    top_k: int


SIZES: dict[str, ModelSize] = {
    # ~7.5 M parameters (OLMoE): the demo's default.
    "small": ModelSize(hidden=256, intermediate=256, layers=4, heads=4, experts=8, top_k=2),
    # ~1 M parameters: the quality study (many runs).
    "mini": ModelSize(hidden=128, intermediate=128, layers=3, heads=4, experts=8, top_k=2),
    # ~0.1 M parameters: tests.
    "tiny": ModelSize(hidden=32, intermediate=32, layers=2, heads=2, experts=4, top_k=2),
}


def build_config(
    arch: str = "olmoe", size: str | ModelSize = "small", *, max_positions: int = 1024
):
    """A ``transformers`` config for a byte-level tiny MoE of architecture ``arch``.

    Raises:
        ValueError: unknown ``arch`` or ``size``.
    """
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
        size = SIZES[size]
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=max_positions,
        num_experts_per_tok=size.top_k,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    if arch == "olmoe":
        from transformers import OlmoeConfig

        cfg = OlmoeConfig(intermediate_size=size.intermediate, num_experts=size.experts, **common)
    elif arch == "qwen2_moe":
        from transformers import Qwen2MoeConfig

        cfg = Qwen2MoeConfig(
            intermediate_size=size.intermediate,
            moe_intermediate_size=size.intermediate,
            shared_expert_intermediate_size=size.intermediate,
            num_experts=size.experts,
            norm_topk_prob=True,
            **common,
        )
    elif arch == "mixtral":
        from transformers import MixtralConfig

        cfg = MixtralConfig(
            intermediate_size=size.intermediate, num_local_experts=size.experts, **common
        )
    else:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    return cfg


def use_fast_experts(model: torch.nn.Module) -> None:
    """Run the frozen experts with transformers' ``grouped_mm`` path when it exists (pre-training speed)."""
    cfg = model.config
    if hasattr(cfg, "_experts_implementation"):
        try:
            model.set_experts_implementation("grouped_mm")  # transformers >= 5
        except (AttributeError, ValueError):
            cfg._experts_implementation = "grouped_mm"


def build_model(
    arch: str = "olmoe", size: str | ModelSize = "small", *, seed: int = 0, dtype=torch.float32
):
    """A freshly initialised causal-LM MoE (seeded), in ``dtype``."""
    from transformers import AutoModelForCausalLM

    cfg = build_config(arch, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    use_fast_experts(model)
    return model


def load_model(path: str | os.PathLike, *, dtype=torch.float32, device: str | torch.device = "cpu"):
    """A causal-LM checkpoint from a local directory (``save_pretrained`` format); never downloads."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(path):
        raise ValueError(f"model path {str(path)!r} is not a local directory")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(
        device
    )
    use_fast_experts(model)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
