"""Uniform-rank DR-LoRA equals stock PEFT LoRA (target_parameters) on the same model and weights.

The copy into PEFT's ``ParamWrapper`` layout is written out here on purpose (not taken
from ``peft_export``): ``lora_A.weight [E*r, in]`` expert-major, ``lora_B.weight [out, r*E]``
rank-major (peft/tuners/lora/layer.py ``get_delta_weight``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from drlora_kernels.integrations.transformers import attach_drlora, get_drlora

from .tiny_models import build, randomize_lora, small_config, token_batch

R = 4


def _peft_wrappers(peft_model):
    from peft.tuners.lora.layer import ParamWrapper

    return {
        f"{name.replace('base_model.model.', '', 1).replace('.base_layer', '')}.{m.parameter_name}": m
        for name, m in peft_model.named_modules()
        if isinstance(m, ParamWrapper)
    }


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "gpt_oss"])
def test_logits_and_lora_gradients_match_peft(family):
    model = build(family)
    base = copy.deepcopy(model)
    handle = get_drlora(
        attach_drlora(
            model, small_config(r_init=R, r_target=R, r_max=8, alpha=6.0), train_router=False
        )
    )
    randomize_lora(handle, std=0.2)
    names = [n for n, _ in handle.named_pools()]

    peft_model = get_peft_model(
        base,
        LoraConfig(
            target_modules=[], target_parameters=names, r=R, lora_alpha=6.0, lora_dropout=0.0
        ),
    )
    wrappers = _peft_wrappers(peft_model)
    assert set(wrappers) == set(names)
    with torch.no_grad():
        for name, pool in handle.named_pools():
            w = wrappers[name]
            E, N, K = pool.num_experts, pool.out_features, pool.in_features
            assert w.scaling["default"] == pytest.approx(pool.scaling)
            w.lora_A["default"].weight.copy_(pool.lora_A[:, :R].reshape(E * R, K))
            w.lora_B["default"].weight.copy_(
                pool.lora_B[:, :, :R].permute(1, 2, 0).reshape(N, R * E)
            )

    ids = token_batch(seed=1)
    model.train()
    peft_model.train()
    ours = model(ids, labels=ids)
    theirs = peft_model(ids, labels=ids)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    ours.loss.backward()
    theirs.loss.backward()
    for name, pool in handle.named_pools():
        w = wrappers[name]
        E, N, K = pool.num_experts, pool.out_features, pool.in_features
        grad_a = w.lora_A["default"].weight.grad.reshape(E, R, K)
        grad_b = w.lora_B["default"].weight.grad.reshape(N, R, E).permute(2, 0, 1)
        torch.testing.assert_close(pool.lora_A.grad[:, :R], grad_a, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(
            pool.lora_B.grad[:, :, :R], grad_b, rtol=1e-4, atol=1e-6, msg=name
        )
        assert (
            pool.lora_A.grad[:, R:].abs().max() == 0 and pool.lora_B.grad[:, :, R:].abs().max() == 0
        )
