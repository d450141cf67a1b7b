"""Every supported MoE family, as a tiny random model: fresh pools = base model, adapters = folded oracle.

The oracle for non-zero adapters is the family's own eager experts forward on weights with
``s B_e[:, :r_e] A_e[:r_e]`` added (transposed for ``[E, in, out]`` layouts): independent of
our grouped path, so layout mistakes (transposition, bias, interleaved gate/up, gate-less
experts) show up as mismatches.
"""

from __future__ import annotations

import copy

import pytest
import torch

from drlora_kernels.integrations.transformers import attach_drlora, get_drlora

from .tiny_models import build, fold_into_copy, randomize_lora, small_config, token_batch

# The families the README lists, with their layouts: always tested.
CORE = [
    "olmoe",  # [E, 2I, H] / [E, H, I]
    "mixtral",
    "qwen2_moe",  # + shared expert
    "qwen3_moe",
    "deepseek_v3",  # grouped top-k routing, shared experts
    "gpt_oss",  # transposed [E, H, 2I], interleaved gate/up, biases, clamped SwiGLU
    "phimoe",
    "nemotron_h",  # no gate: up_proj [E, I, H]
    "llama4_text",  # off the interface (families.py): [E, H, 2I], scores scale the inputs
]
# Further families on transformers' experts interface that work with no extra code.
EXTENDED = [
    "afmoe", "axk1", "bailing_hybrid", "cohere2_moe", "deepseek_v2", "deepseek_v4", "ernie4_5_moe",
    "exaone_moe", "flex_olmo", "glm4_moe", "glm4_moe_lite", "granitemoe", "granitemoe_swa",
    "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "hy_v4", "jamba", "kimi_linear",
    "kolibri1", "laguna", "lara_mini", "mellum", "mimo_v2_flash", "minimax", "minimax_m2", "qwen3_next",
    "solar_open",
]  # fmt: skip
FAMILIES = [pytest.param(f, id=f) for f in CORE] + [
    pytest.param(f, id=f, marks=pytest.mark.slow) for f in EXTENDED
]
ATOL = 2e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_family(family):
    model = build(family)
    model.set_experts_implementation("eager")  # the family's own forward is the baseline
    base = copy.deepcopy(model)
    ids = token_batch(seed=3)
    with torch.no_grad():
        ref = base(ids, use_cache=False).logits
        handle = get_drlora(attach_drlora(model, small_config()))
        torch.testing.assert_close(model(ids, use_cache=False).logits, ref, rtol=0, atol=ATOL)

    randomize_lora(handle)
    with torch.no_grad():
        for _, pool in handle.named_pools():
            pool.ranks.copy_(torch.tensor([0, 1, 2, 3, 4, 5, 6, 8], dtype=torch.int32))
        folded = fold_into_copy(base, handle)(ids, use_cache=False).logits
    out = model(
        ids, labels=ids, use_cache=False
    )  # eval mode: PhiMoE's router is stochastic in training
    assert (out.logits - ref).abs().max() > 1e-3
    torch.testing.assert_close(out.logits, folded, rtol=1e-5, atol=5 * ATOL)

    model.train()
    model(ids, labels=ids, use_cache=False).loss.backward()
    for name, pool in handle.named_pools():
        active = pool.active_mask()
        grad_a, grad_b = pool.lora_A.grad, pool.lora_B.grad.transpose(1, 2)
        assert torch.isfinite(grad_a).all() and torch.isfinite(grad_b).all(), name
        assert grad_a[~active].abs().max() == 0 and grad_b[~active].abs().max() == 0, name
        assert grad_a[active].abs().sum() > 0 and grad_b[active].abs().sum() > 0, name
