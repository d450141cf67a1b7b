"""attach_drlora on a tiny OLMoE: structure, freezing, equivalence with the base and the folded oracle."""

from __future__ import annotations

import copy

import pytest
import torch

from drlora_kernels.integrations.transformers import (
    EXPERTS_IMPLEMENTATION,
    DRLoRAAdapter,
    attach_drlora,
    get_drlora,
)

from .tiny_models import build, fold_into_copy, randomize_lora, small_config, token_batch

ATOL = 2e-6  # fp32: transformers' own eager and grouped_mm experts differ by ~1e-7 on these models


def test_pools_are_submodules_and_base_is_frozen(olmoe):
    assert attach_drlora(olmoe, small_config()) is olmoe  # PEFT habit: model = attach(model, cfg)
    handle = get_drlora(olmoe)
    assert get_drlora(handle) is handle
    assert olmoe.config._experts_implementation == EXPERTS_IMPLEMENTATION
    assert len(handle.pools) == 2 and all(len(layer) == 2 for layer in handle.pools)
    experts = olmoe.model.layers[0].mlp.experts
    assert isinstance(experts.drlora, DRLoRAAdapter)
    gu, dn = handle.pools[0]
    assert (gu.in_features, gu.out_features) == (
        experts.gate_up_proj.shape[2],
        experts.gate_up_proj.shape[1],
    )
    assert (dn.in_features, dn.out_features) == (
        experts.down_proj.shape[2],
        experts.down_proj.shape[1],
    )
    assert gu.ranks.tolist() == [2] * 8 and gu.r_max == 8 and gu.scaling == pytest.approx(8 / 4)

    keys = set(olmoe.state_dict())
    assert "model.layers.0.mlp.experts.drlora.gate_up_proj.lora_A" in keys
    assert "model.layers.1.mlp.experts.drlora.down_proj.ranks" in keys
    trainable = {n for n, p in olmoe.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".drlora." in n}
    assert len(lora) == 8  # 2 layers x 2 projections x (A, B)
    assert trainable - lora == {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"}


def test_train_router_false_freezes_everything_but_lora(olmoe):
    attach_drlora(olmoe, small_config(), train_router=False)
    assert all(".drlora." in n for n, p in olmoe.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("base_impl", ["eager", "grouped_mm"])
def test_fresh_pools_reproduce_the_base_model(base_impl):
    model = build("olmoe")
    model.set_experts_implementation(base_impl)
    ids = token_batch()
    with torch.no_grad():
        ref = model(ids).logits
        handle = get_drlora(attach_drlora(model, small_config()))
        out = model(ids).logits
    assert all(float(p.lora_B.detach().abs().max()) == 0 for _, p in handle.named_pools())
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_random_adapters_match_the_folded_oracle(olmoe):
    base = copy.deepcopy(olmoe)
    handle = get_drlora(attach_drlora(olmoe, small_config()))
    randomize_lora(handle)
    with torch.no_grad():  # ragged ranks, NaN in inactive slots: they must not be read
        for _, pool in handle.named_pools():
            pool.ranks.copy_(torch.tensor([0, 1, 2, 3, 8, 5, 6, 7], dtype=torch.int32))
            for e in range(pool.num_experts):
                r = int(pool.ranks[e])
                pool.lora_A[e, r:] = float("nan")
                pool.lora_B[e, :, r:] = float("nan")
    ids = token_batch()
    out = olmoe(ids).logits
    with torch.no_grad():
        nan_free = {
            n: (p.lora_A.nan_to_num(), p.lora_B.nan_to_num()) for n, p in handle.named_pools()
        }
        for name, pool in handle.named_pools():  # the oracle reads only active slots anyway
            pool.lora_A.copy_(nan_free[name][0])
            pool.lora_B.copy_(nan_free[name][1])
        ref = fold_into_copy(base, handle)(ids).logits
    assert (out - base(ids).logits).abs().max() > 1e-2  # the adapters do something
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=ATOL)


def test_backward_reaches_active_slots_only(olmoe):
    handle = get_drlora(attach_drlora(olmoe, small_config()))
    randomize_lora(handle)
    with torch.no_grad():
        for _, pool in handle.named_pools():
            pool.ranks.copy_(torch.arange(8, dtype=torch.int32) % 5)
    olmoe.train()
    olmoe(token_batch(), labels=token_batch()).loss.backward()
    for name, pool in handle.named_pools():
        mask = pool.active_mask()
        assert pool.lora_A.grad is not None and pool.lora_B.grad is not None, name
        assert pool.lora_A.grad[~mask].abs().max() == 0, name
        assert pool.lora_B.grad.transpose(1, 2)[~mask].abs().max() == 0, name
        assert pool.lora_A.grad[mask].abs().sum() > 0, name
    assert olmoe.model.layers[0].mlp.gate.weight.grad is not None
    assert olmoe.model.layers[0].mlp.experts.gate_up_proj.grad is None


def test_disabled_adapter_gives_the_base_model(olmoe):
    base = copy.deepcopy(olmoe)
    handle = get_drlora(attach_drlora(olmoe, small_config()))
    randomize_lora(handle)
    ids = token_batch()
    handle.set_enabled(False)
    with torch.no_grad():
        torch.testing.assert_close(olmoe(ids).logits, base(ids).logits, rtol=0, atol=ATOL)
        handle.set_enabled(True)
        assert (olmoe(ids).logits - base(ids).logits).abs().max() > 1e-2


def test_routing_is_recorded_in_training_mode_only(olmoe):
    handle = get_drlora(attach_drlora(olmoe, small_config(), total_steps=10))
    tracker = handle.controller.tracker
    ids = token_batch()
    with torch.no_grad():
        olmoe.eval()
        olmoe(ids)
        assert tracker.pending_routing()[1].sum() == 0
        olmoe.train()
        olmoe(ids)
    sums, tokens = tracker.pending_routing()
    assert tokens.tolist() == [ids.numel()] * 2
    # OLMoE applies softmax top-k weights (not renormalised): they sum to < 1 per token
    assert 0 < float(sums[0].sum()) <= ids.numel() + 1e-6


def test_errors_name_the_problem(olmoe):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    with pytest.raises(ValueError, match="LlamaForCausalLM has no fused experts module"):
        attach_drlora(dense, small_config())
    with pytest.raises(
        ValueError, match="target_modules=\\['q_proj'\\] matches no projection of OlmoeExperts"
    ):
        attach_drlora(copy.deepcopy(olmoe), small_config(target_modules=("q_proj",)))
    with pytest.raises(TypeError, match="config must be a DRLoRAConfig"):
        attach_drlora(olmoe, {"r_init": 2})
    attach_drlora(olmoe, small_config())
    with pytest.raises(ValueError, match="already has DR-LoRA attached"):
        attach_drlora(olmoe, small_config())
    with pytest.raises(ValueError, match="has no DR-LoRA adapter"):
        get_drlora(dense)


def test_single_target_adapts_only_that_projection(olmoe):
    handle = get_drlora(attach_drlora(olmoe, small_config(target_modules=("down_proj",))))
    assert [n.rsplit(".", 1)[1] for n, _ in handle.named_pools()] == ["down_proj", "down_proj"]
    randomize_lora(handle)
    out = olmoe(token_batch()).logits
    assert torch.isfinite(out).all()
