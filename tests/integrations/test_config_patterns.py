"""Per-layer targets (``layers_to_transform``) and per-pool ranks (``rank_pattern``), honoured by attach,
the schedule and the checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch

from drlora_kernels.config import DRLoRAConfig
from drlora_kernels.integrations.checkpoint import load_drlora, save_drlora
from drlora_kernels.integrations.transformers import attach_drlora, get_drlora
from drlora_kernels.pool import lora_scale

from .tiny_models import build, randomize_lora, small_config, token_batch, train_steps


def test_layers_to_transform_adapts_only_those_layers(tmp_path):
    model = build("olmoe")
    base = copy.deepcopy(model)
    handle = get_drlora(attach_drlora(model, small_config(layers_to_transform=[1])))
    assert [n for n, _ in handle.adapters] == ["model.layers.1.mlp.experts"]
    assert not hasattr(model.model.layers[0].mlp.experts, "drlora")
    randomize_lora(handle)
    ids = token_batch()
    with torch.no_grad():
        # layer 0 is the base model's: its output (the input of layer 1) is unchanged
        ours = model(ids, output_hidden_states=True).hidden_states
        theirs = base(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=0)
    assert (ours[2] - theirs[2]).abs().max() > 1e-4

    save_drlora(model, tmp_path / "a")
    fresh = build("olmoe")
    load_drlora(fresh, tmp_path / "a")
    assert get_drlora(fresh).config.layers_to_transform == (1,)
    with pytest.raises(ValueError, match="layers_to_transform"):
        load_drlora(attach_drlora(build("olmoe"), small_config()), tmp_path / "a")


def test_rank_pattern_sets_each_pools_budget_scale_and_start():
    cfg = small_config(
        r_init=3, r_target=4, r_max=8, rank_pattern={"down_proj": 2, r"layers\.1\..*": 6}
    )
    model = build("olmoe")
    handle = get_drlora(attach_drlora(model, cfg, total_steps=12))
    expect = {  # first matching key wins, as in PEFT
        "model.layers.0.mlp.experts.gate_up_proj": 4,
        "model.layers.0.mlp.experts.down_proj": 2,
        "model.layers.1.mlp.experts.gate_up_proj": 6,
        "model.layers.1.mlp.experts.down_proj": 2,
    }
    for name, pool in handle.named_pools():
        r = expect[name]
        assert pool.r_target == r, name
        assert pool.scaling == pytest.approx(lora_scale(cfg.alpha, r)), name
        assert int(pool.ranks.max()) == min(3, r), name
    train_steps(model, 12)  # the run ends with each layer at the sum of its modules' targets
    totals = [sum(int(p.ranks.sum()) for p in layer) for layer in handle.pools]
    assert totals == [8 * (4 + 2), 8 * (6 + 2)]
    assert handle.controller.rank_summary()["budget"] == sum(totals)


def test_rank_pattern_with_a_uniform_config_grows_the_patterned_layers_only():
    cfg = small_config(r_init=4, r_target=4, r_max=8, rank_pattern={r"layers\.1\..*": 6})
    model = build("olmoe")
    handle = get_drlora(attach_drlora(model, cfg, total_steps=12))
    assert handle.controller.schedule.num_events > 0
    train_steps(model, 12)
    totals = [sum(int(p.ranks.sum()) for p in layer) for layer in handle.pools]
    assert totals == [16 * 4, 16 * 6]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(rank_pattern={"down_proj": 99}),
            r"rank_pattern\['down_proj'\] must be an int in \[1, r_max",
        ),
        (dict(rank_pattern={"(": 2}), "not a valid regex"),
        (dict(rank_pattern=[("down_proj", 2)]), "rank_pattern must be a dict"),
        (dict(layers_to_transform=[-1]), "non-negative ints"),
        (dict(layers_to_transform=[]), "non-empty list"),
        (dict(layers_pattern=""), "layers_pattern"),
    ],
)
def test_invalid_patterns_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DRLoRAConfig(r_init=2, r_target=4, r_max=8, **kwargs)


def test_layers_that_select_nothing_are_refused():
    with pytest.raises(ValueError, match="selects none of the MoE layers"):
        attach_drlora(build("olmoe"), small_config(layers_to_transform=[7]))
    with pytest.raises(ValueError, match="cannot read a layer index"):
        attach_drlora(
            build("olmoe"), small_config(layers_to_transform=[0], layers_pattern="blocks")
        )


def test_patterns_round_trip_through_the_dict():
    cfg = DRLoRAConfig(
        r_init=2, r_target=4, rank_pattern={"down_proj": 2}, layers_to_transform=(3, 1)
    )
    assert cfg.layers_to_transform == (1, 3)
    assert DRLoRAConfig.from_dict(cfg.to_dict()) == cfg
