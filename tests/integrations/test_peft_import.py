"""PEFT in and out: export -> import gives the same logits, a PEFT-trained adapter imports to the
PeftModel's logits, trained routers travel with the export, and an imported adapter keeps training
with DR-LoRA growth."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from drlora_kernels.config import DRLoRAConfig
from drlora_kernels.integrations.peft_export import export_peft
from drlora_kernels.integrations.peft_import import import_peft
from drlora_kernels.integrations.transformers import attach_drlora, get_drlora

from .tiny_models import build, randomize_lora, small_config, token_batch, train_steps

pytestmark = pytest.mark.filterwarnings(
    "ignore:The following (rank|alpha)_pattern keys did not match"
)
FAMILIES = ["olmoe", "gpt_oss", "llama4_text", "nemotron_h"]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@torch.no_grad()
def _move_routers(handle, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in handle.router_parameters:
        p.add_(torch.randn(p.shape, generator=gen) * 0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_then_import_gives_identical_logits(tmp_path, family):
    model = build(family)
    fresh, peft_base = copy.deepcopy(model), copy.deepcopy(model)
    handle = get_drlora(attach_drlora(model, small_config(alpha=5.0)))
    randomize_lora(handle)
    with torch.no_grad():
        for i, (_, pool) in enumerate(handle.named_pools()):
            pool.ranks.copy_(torch.tensor([0, 1, 2, 3, 4, 5, 6, 8 - i % 3], dtype=torch.int32))
    _move_routers(handle)  # routers train after warmup: the export must carry them
    ids = token_batch(seed=2)
    ours = _logits(model, ids)
    export_peft(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"]

    theirs = _logits(PeftModel.from_pretrained(peft_base, str(tmp_path / "peft")), ids)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    imported = import_peft(fresh, tmp_path / "peft")
    assert imported is get_drlora(fresh)
    torch.testing.assert_close(_logits(fresh, ids), ours, rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(handle.named_pools(), imported.named_pools()):
        assert int(b.ranks.min()) == int(b.ranks.max()) == int(a.ranks.max()), name


def _peft_trained(family: str, lora_config: LoraConfig, steps: int = 2):
    """A PEFT adapter trained with peft's own API (random init of B, a few AdamW steps)."""
    model = build(family)
    fresh = copy.deepcopy(model)
    peft_model = get_peft_model(model, lora_config)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    peft_model.train()
    for s in range(steps):
        ids = token_batch(seed=10 + s)
        peft_model(ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
    return peft_model.eval(), fresh


def _targets(model_type: str) -> list[str]:
    prefix = {"llama4_text": "feed_forward", "nemotron_h": "mixer"}.get(model_type, "mlp")
    up = "up_proj" if model_type == "nemotron_h" else "gate_up_proj"
    return [f"{prefix}.experts.{up}", f"{prefix}.experts.down_proj"]


@pytest.mark.parametrize(
    "family, options",
    [
        ("olmoe", {}),
        ("gpt_oss", {"use_rslora": True}),
        ("llama4_text", {"rank_pattern": {"down_proj": 3}, "alpha_pattern": {"down_proj": 2.0}}),
        ("nemotron_h", {}),
    ],
)
def test_a_peft_trained_adapter_imports_to_the_peft_models_logits(tmp_path, family, options):
    config = LoraConfig(
        target_modules=[], target_parameters=_targets(family), r=4, lora_alpha=8,
        lora_dropout=0.0, init_lora_weights=False, **options,
    )  # fmt: skip
    peft_model, fresh = _peft_trained(family, config)
    ids = token_batch(seed=7)
    theirs = _logits(peft_model, ids)
    with peft_model.disable_adapter():
        assert (_logits(peft_model, ids) - theirs).abs().max() > 1e-3
    peft_model.save_pretrained(tmp_path / "peft")

    handle = import_peft(fresh, tmp_path / "peft")
    torch.testing.assert_close(_logits(fresh, ids), theirs, rtol=1e-5, atol=1e-5)
    down = [p for n, p in handle.named_pools() if n.endswith("down_proj")]
    expected = options.get("rank_pattern", {}).get("down_proj", 4)
    assert all(int(p.ranks.max()) == expected for p in down)


def test_a_peft_adapter_on_some_layers_attaches_those_layers_only(tmp_path):
    config = LoraConfig(
        target_modules=[], target_parameters=["model.layers.1.mlp.experts.gate_up_proj"],
        r=2, lora_alpha=4, lora_dropout=0.0, init_lora_weights=False,
    )  # fmt: skip
    peft_model, fresh = _peft_trained("olmoe", config, steps=1)
    ids = token_batch(seed=8)
    theirs = _logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    handle = import_peft(fresh, tmp_path / "peft")
    assert [n for n, _ in handle.named_pools()] == ["model.layers.1.mlp.experts.gate_up_proj"]
    assert handle.config.layers_to_transform == (1,)
    torch.testing.assert_close(_logits(fresh, ids), theirs, rtol=1e-5, atol=1e-5)


def test_an_imported_adapter_continues_training_with_growth(tmp_path):
    config = LoraConfig(
        target_modules=[], target_parameters=_targets("olmoe"), r=2, lora_alpha=4,
        lora_dropout=0.0, init_lora_weights=False,
    )  # fmt: skip
    peft_model, fresh = _peft_trained("olmoe", config, steps=1)
    ids = token_batch(seed=9)
    theirs = _logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")

    too_small = DRLoRAConfig(r_init=1, r_target=1, r_max=8, grow_every=2, warmup_steps=1,
                             buffer_steps=0, backend="reference")  # fmt: skip
    with pytest.raises(ValueError, match="above its DR-LoRA budget"):
        import_peft(fresh, tmp_path / "peft", config=too_small, total_steps=8)
    with pytest.raises(ValueError, match="no DR-LoRA adapter"):
        get_drlora(fresh)  # the refused import detached again

    grow = small_config(r_init=2, r_target=4, r_max=8)
    handle = import_peft(fresh, tmp_path / "peft", config=grow, total_steps=8)
    torch.testing.assert_close(_logits(fresh, ids), theirs, rtol=1e-5, atol=1e-5)
    train_steps(fresh, 8, seed=20)
    assert handle.controller.event_log
    for layer in handle.pools:
        assert sum(int(p.ranks.sum()) for p in layer) == 4 * 2 * 8  # r_target * M, reached


def test_refusals(tmp_path):
    model = build("olmoe")
    with pytest.raises(ValueError, match="no PEFT adapter"):
        import_peft(model, tmp_path)
    config = LoraConfig(target_modules=["q_proj"], target_parameters=_targets("olmoe"), r=2)
    peft_model = get_peft_model(build("olmoe"), config)
    peft_model.save_pretrained(tmp_path / "mixed")
    with pytest.raises(ValueError, match="also adapts target_modules"):
        import_peft(model, tmp_path / "mixed")
    # load_drlora points PEFT directories here
    from drlora_kernels.integrations.checkpoint import load_drlora

    with pytest.raises(ValueError, match="import_peft"):
        load_drlora(model, tmp_path / "mixed")
    assert not hasattr(model, "_drlora_handle")
