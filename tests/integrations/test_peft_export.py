"""export_peft: stock PEFT loads the adapter on a fresh base model and reproduces our outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

from drlora_kernels.integrations.peft_export import export_peft
from drlora_kernels.integrations.transformers import attach_drlora, get_drlora

from .tiny_models import build, randomize_lora, small_config, token_batch


# PEFT 0.21 checks rank_pattern keys against module names, not parameter names, so it warns that
# they "matched nothing" although it applies them (the per-projection shapes below load only if it does).
@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")
@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "nemotron_h"])
def test_peft_loads_the_export_and_matches(tmp_path, family):
    model = build(family)
    base = copy.deepcopy(model)
    handle = get_drlora(attach_drlora(model, small_config(alpha=5.0)))
    randomize_lora(handle)
    with (
        torch.no_grad()
    ):  # per-expert ranks, a different maximum per projection, garbage in inactive slots
        for i, (_, pool) in enumerate(handle.named_pools()):
            pool.ranks.copy_(torch.tensor([0, 1, 2, 3, 4, 5, 6, 8 - i % 3], dtype=torch.int32))
            for e in range(pool.num_experts):
                pool.lora_A[e, int(pool.ranks[e]) :] = 1e3
                pool.lora_B[e, :, int(pool.ranks[e]) :] = 1e3
    ids = token_batch(seed=2)
    with torch.no_grad():
        ours = model(ids, use_cache=False).logits
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(n for n, _ in handle.named_pools())
    assert sorted(config["rank_pattern"].values()) == sorted(
        int(p.ranks.max()) for _, p in handle.named_pools()
    )
    assert (
        config["alpha_pattern"] == config["rank_pattern"]
    )  # scaling 1: the scale is folded into B

    loaded = PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    with torch.no_grad():
        theirs = loaded(ids, use_cache=False).logits
        plain = loaded.get_base_model()
        with loaded.disable_adapter():
            assert (
                plain(ids, use_cache=False).logits - ours
            ).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
