"""merge_drlora / unmerge_drlora: same outputs merged, base weights restored after unmerge."""

from __future__ import annotations

import copy

import pytest
import torch

from drlora_kernels.integrations.merge import merge_drlora, unmerge_drlora
from drlora_kernels.integrations.transformers import attach_drlora, get_drlora

from .tiny_models import build, randomize_lora, small_config, token_batch


@pytest.mark.parametrize(
    "family", ["olmoe", "gpt_oss"]
)  # [E, out, in] and transposed [E, in, out] with bias
def test_merge_then_unmerge(family):
    model = build(family)
    base = copy.deepcopy(model)
    handle = get_drlora(attach_drlora(model, small_config()))
    randomize_lora(handle)
    with torch.no_grad():
        for _, pool in handle.named_pools():
            pool.ranks.copy_(torch.tensor([0, 1, 2, 3, 4, 5, 6, 8], dtype=torch.int32))
            pool.lora_A[0] = float("nan")  # rank 0: never read, never merged
    ids = token_batch()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("_proj")}
    with torch.no_grad():
        adapted = model(ids).logits
        assert (adapted - base(ids).logits).abs().max() > 1e-2
        merge_drlora(model)
        changed = [
            n
            for n, p in model.named_parameters()
            if n in weights and not torch.equal(p, weights[n])
        ]
        assert {n.rsplit(".", 1)[1] for n in changed} == {"gate_up_proj", "down_proj"}
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="already merged"):
            merge_drlora(model)
        unmerge_drlora(model)
        for n, p in model.named_parameters():
            if n in weights:
                torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="not merged"):
            unmerge_drlora(model)
