"""Layouts beyond the common case: transposed experts at odd sizes under every base implementation,
experts that are 3-D parameters off transformers' experts interface (families.py), and refusals.

The oracle is the family's own eager forward on folded weights (``fold_into_copy``), as in
``test_families.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

from drlora_kernels.integrations.transformers import (
    attach_drlora,
    detach_drlora,
    find_experts_modules,
    get_drlora,
)

from .tiny_models import (
    build,
    fold_into_copy,
    randomize_lora,
    small_config,
    tiny_config,
    token_batch,
)

RANKS = torch.tensor([0, 1, 2, 3, 4, 5, 6, 8], dtype=torch.int32)


def _build(model_type: str, **overrides) -> nn.Module:
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(0)
    auto = AutoModelForTokenClassification if model_type == "openai_privacy_filter" else None
    if auto is None:
        return build(model_type, **overrides)
    return auto.from_config(config, dtype=torch.float32).eval()


def _check_against_folded(model: nn.Module, ids: torch.Tensor, atol: float = 1e-5) -> None:
    """Fresh pools give the base model; random ranks and pools give the folded-weight oracle."""
    base = copy.deepcopy(model)
    base.set_experts_implementation("eager")
    with torch.no_grad():
        ref = base(ids).logits
    handle = get_drlora(attach_drlora(model, small_config()))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=atol)
        randomize_lora(handle)
        for _, pool in handle.named_pools():
            pool.ranks.copy_(RANKS)
        out = model(ids).logits
        folded = fold_into_copy(base, handle)(ids).logits
    assert (out - ref).abs().max() > 1e-3
    torch.testing.assert_close(out, folded, rtol=1e-5, atol=atol)


# Transposed [E, in, out] experts whose fused row (2 * 33 fp32 = 264 bytes) is not a multiple of
# 16 bytes: torch's CPU grouped_mm refuses these strides.
TRANSPOSED = ["gpt_oss", "aria_text", "openai_privacy_filter"]


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager", "batched_mm"])
@pytest.mark.parametrize("family", TRANSPOSED)
def test_transposed_layouts_at_odd_sizes_under_every_implementation(family, implementation):
    model = _build(family, intermediate_size=33)
    experts = find_experts_modules(model)
    assert experts and experts[0][1].is_transposed
    model.set_experts_implementation(implementation)
    _check_against_folded(model, token_batch(seed=5))


def test_the_selected_eager_implementation_never_calls_grouped_mm(monkeypatch):
    import transformers.integrations.moe as moe

    model = build("gpt_oss")  # aligned sizes: grouped_mm would accept them
    calls = []
    real = moe._grouped_mm

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(moe, "_grouped_mm", spy)
    model.set_experts_implementation("eager")
    randomize_lora(attach_drlora(model, small_config()))
    with torch.no_grad():
        model(token_batch())
    assert not calls
    detach_drlora(model)
    model.set_experts_implementation("grouped_mm")
    attach_drlora(model, small_config())
    with torch.no_grad():
        model(token_batch())
    assert calls  # selected and able to take the shapes: used


# ------------------------------------------------------------------ experts off the interface


class PlainExperts(nn.Module):
    """OLMoE's experts as remote code would write them: 3-D weights, the interface's call, no decorator."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.num_experts = experts.num_experts
        self.gate_up_proj = experts.gate_up_proj
        self.down_proj = experts.down_proj
        self.act_fn = experts.act_fn

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token, slot = torch.where(top_k_index == e)
            gate, up = nn.functional.linear(hidden_states[token], self.gate_up_proj[e]).chunk(2, -1)
            y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e])
            out.index_add_(0, token, y * top_k_weights[token, slot, None])
        return out


def test_undecorated_experts_are_adapted_through_their_own_forward():
    model = build("olmoe")
    for layer in model.model.layers:
        layer.mlp.experts = PlainExperts(layer.mlp.experts)
    ids = token_batch(seed=4)
    base = copy.deepcopy(model)
    with torch.no_grad():
        ref = base(ids).logits
    handle = get_drlora(attach_drlora(model, small_config()))
    assert [a.family.name for _, a in handle.adapters] == ["topk_experts"] * 2
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=2e-6)
        randomize_lora(handle)
        for _, pool in handle.named_pools():
            pool.ranks.copy_(RANKS)
        folded = fold_into_copy(base, handle)(ids).logits
        out = model(ids).logits
        torch.testing.assert_close(out, folded, rtol=1e-5, atol=1e-5)
        handle.set_enabled(False)  # the family's own forward again
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
        handle.set_enabled(True)
    detach_drlora(model)
    assert "forward" not in vars(model.model.layers[0].mlp.experts)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)


def test_llama4_detach_restores_its_moe_forward():
    model = build("llama4_text")
    ids = token_batch(seed=2)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    randomize_lora(attach_drlora(model, small_config()))
    moe = model.model.layers[0].feed_forward
    assert "forward" in vars(moe)
    detach_drlora(model)
    assert "forward" not in vars(moe) and not hasattr(moe.experts, "drlora")
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, ref, rtol=0, atol=0)


def test_experts_that_are_not_fused_3d_parameters_are_refused_clearly():
    config = tiny_config("jetmoe")  # per-expert linear layers in a ParallelExperts module
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="has no fused experts module"):
        attach_drlora(model, small_config())
