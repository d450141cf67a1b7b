"""Tiny random MoE models built from transformers configs (no downloads), and test oracles.

``tiny_config(model_type)`` starts from the family's default config and shrinks
every size we know about: 2 layers, hidden 64, 8 experts (top-2), small
intermediate sizes, a 128-token vocabulary. ``build(model_type)`` returns the
causal LM in fp32 and eval mode.
"""

from __future__ import annotations

import copy
import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from drlora_kernels.config import DRLoRAConfig
from drlora_kernels.integrations.transformers import get_drlora

VOCAB = 128
HIDDEN = 64
EXPERTS = 8

_SIZES = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_experts": EXPERTS,
    "num_local_experts": EXPERTS,
    "n_routed_experts": EXPERTS,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 0,
    "max_position_embeddings": 64,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


def tiny_config(model_type: str, **overrides):
    """The family's default config, shrunk to a tiny size (``overrides`` win).

    Only sizes the family's config already has are passed, to its constructor, so
    derived fields (``layer_types``, ``qk_head_dim``...) are recomputed.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = AutoConfig.for_model(model_type)
        sizes = {k: v for k, v in _SIZES.items() if hasattr(default, k)}
        if hasattr(default, "qk_rope_head_dim"):  # MLA: head_dim follows the rope/nope split
            sizes.pop("head_dim", None)
        layer_types = getattr(default, "layer_types", None)
        settable = not isinstance(getattr(type(default), "layer_types", None), property)
        if layer_types and settable:
            sizes["layer_types"] = list(layer_types[: sizes["num_hidden_layers"]])
        return AutoConfig.for_model(model_type, **{**sizes, **overrides})


def build(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random causal LM of ``model_type`` in fp32, eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_hash_routing(model, seed)
    return model.eval()


@torch.no_grad()
def _randomize_hash_routing(model: torch.nn.Module, seed: int) -> None:
    """Fill hash routers' token -> experts tables (DeepSeek-V4's ``tid2eid``) with distinct
    random experts per token: ``from_config`` leaves them zero, which sends every token to
    expert 0 and would let a test pass without exercising the other experts."""
    gen = torch.Generator().manual_seed(seed + 7)
    for module in model.modules():
        table = getattr(module, "tid2eid", None)
        if isinstance(table, torch.Tensor):
            rows, k = table.shape
            picks = torch.stack(
                [torch.randperm(module.num_experts, generator=gen)[:k] for _ in range(rows)]
            )
            table.copy_(picks.to(table))


def small_config(**overrides) -> DRLoRAConfig:
    """A DR-LoRA config for tiny models: ranks 2..4 of 8, reference backend."""
    kw = dict(
        r_init=2,
        r_target=4,
        r_max=8,
        grow_every=2,
        warmup_steps=1,
        buffer_steps=0,
        p_grow=0.5,
        backend="reference",
    )
    kw.update(overrides)
    return DRLoRAConfig(**kw)


def randomize_lora(model_or_handle, std: float = 0.1, seed: int = 0) -> None:
    """Non-zero ``B`` (and fresh ``A``) everywhere, including inactive slots (they must not matter)."""
    handle = get_drlora(model_or_handle)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, pool in handle.named_pools():
            pool.lora_A.copy_(torch.randn(pool.lora_A.shape, generator=gen) * std)
            pool.lora_B.copy_(torch.randn(pool.lora_B.shape, generator=gen) * std)


@torch.no_grad()
def fold_into_copy(base_model, model_or_handle):
    """The oracle: a copy of the base model with ``W_e += s B_e[:, :r] A_e[:r]`` (transposed layouts too)."""
    handle = get_drlora(model_or_handle)
    folded = copy.deepcopy(base_model)
    modules = dict(folded.named_modules())
    for name, adapter in handle.adapters:
        module = modules[name]
        for param in adapter.projections:
            pool, weight = adapter.pool(param), getattr(module, param)
            for e in range(pool.num_experts):
                r = int(pool.ranks[e])
                delta = pool.scaling * pool.lora_B[e, :, :r].double() @ pool.lora_A[e, :r].double()
                weight[e] += (delta.T if adapter.layout.transposed else delta).to(weight.dtype)
    return folded


def token_batch(batch: int = 2, seq: int = 6, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def train_steps(model, steps, *, optimizer=None, lr: float = 1e-2, seed: int = 0):
    """The controller's step contract on ``token_batch`` data: ``steps`` (a count or a range of
    batch seeds) optimizer steps; returns the optimizer (AdamW over the trainable parameters)."""
    handle = get_drlora(model)
    if optimizer is None:
        optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=lr)
    model.train()
    for s in range(seed, seed + steps) if isinstance(steps, int) else steps:
        ids = token_batch(seed=s)
        model(ids, labels=ids, use_cache=False).loss.backward()
        handle.controller.update_statistics()
        handle.controller.step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
    return optimizer
