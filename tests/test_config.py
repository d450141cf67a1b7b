"""DRLoRAConfig: the one place the method's hyperparameters are validated."""

from __future__ import annotations

import dataclasses

import pytest

from drlora_kernels.config import FIELD_RULES, DRLoRAConfig, validate_field
from drlora_kernels.pool import RankPool
from drlora_kernels.scheduler import GrowthSchedule


def test_defaults_are_the_papers_and_derived():
    cfg = DRLoRAConfig()
    assert (cfg.r_init, cfg.r_target, cfg.r_max, cfg.alpha) == (8, 16, 32, 32.0)
    assert cfg.grow_until is None and cfg.new_slot_lr_scale == 1.0
    assert DRLoRAConfig.from_dict(cfg.to_dict()) == cfg


def test_every_field_has_a_rule():
    assert {f.name for f in dataclasses.fields(DRLoRAConfig)} == set(FIELD_RULES)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(r_init=4.0), TypeError, "r_init"),
        (dict(r_init=True), TypeError, "r_init"),
        (dict(r_init=-1), ValueError, "r_init"),
        (dict(r_target=0), ValueError, "r_target"),
        (dict(r_max=16.0), TypeError, "r_max"),
        (dict(r_init=9, r_target=8), ValueError, "r_init"),
        (dict(r_target=8, r_max=4), ValueError, "r_target"),
        (dict(alpha=0.0), ValueError, "alpha"),
        (dict(alpha="16"), TypeError, "alpha"),
        (dict(beta=1.0), ValueError, "beta"),
        (dict(gamma=-0.5), ValueError, "gamma"),
        (dict(gamma=float("inf")), ValueError, "gamma"),
        (dict(grow_every=0), ValueError, "grow_every"),
        (dict(grow_every=2.5), TypeError, "grow_every"),
        (dict(p_grow=0.0), ValueError, "p_grow"),
        (dict(p_grow=True), TypeError, "p_grow"),
        (dict(warmup_steps=-1), ValueError, "warmup_steps"),
        (dict(warmup_steps=1.5), TypeError, "warmup_steps"),
        (dict(buffer_steps=-1), ValueError, "buffer_steps"),
        (dict(grow_until=0), ValueError, "grow_until"),
        (dict(grow_until=1.01), ValueError, "grow_until"),
        (dict(grow_until=False), TypeError, "grow_until"),
        (dict(new_slot_lr_scale=0.0), ValueError, "new_slot_lr_scale"),
        (dict(new_slot_lr_steps=-1), ValueError, "new_slot_lr_steps"),
        (dict(new_slot_lr_scale=2.0), ValueError, "new_slot_lr_steps=0"),
        (dict(allocation="random"), ValueError, "allocation"),
        (dict(reset="none"), ValueError, "reset"),
        (dict(scaling="bogus"), ValueError, "scaling"),
        (dict(use_frequency=1), TypeError, "use_frequency"),
        (dict(target_modules=()), ValueError, "target_modules"),
        (dict(target_modules="down_proj"), TypeError, "target_modules"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_invalid_fields(kwargs, error, match):
    with pytest.raises(error, match=match):
        DRLoRAConfig(**kwargs)


def test_valid_options_beyond_the_paper():
    cfg = DRLoRAConfig(grow_until=0.25, new_slot_lr_scale=2.0, new_slot_lr_steps=10)
    assert cfg.grow_until == 0.25
    assert DRLoRAConfig(grow_until=150).grow_until == 150
    assert DRLoRAConfig(target_modules=["down_proj"]).target_modules == ("down_proj",)


def test_schedule_and_pool_use_the_config_rules():
    # The same rule, the same message, wherever the value comes in.
    for build in (
        lambda: DRLoRAConfig(r_init=2, r_target=4, r_max=8, p_grow=1.5),
        lambda: GrowthSchedule(3000, 8, 2, 4, 8, p_grow=1.5),
    ):
        with pytest.raises(ValueError, match=r"p_grow must be a finite number in \(0.0, 1.0\]"):
            build()
    for build in (
        lambda: DRLoRAConfig(r_max=8.0),
        lambda: GrowthSchedule(3000, 8, 2, 4, 8.0),
        lambda: RankPool(4, 8, 8, 8.0, 2),
    ):
        with pytest.raises(TypeError, match="r_max must be an int"):
            build()
    with pytest.raises(KeyError, match="no validation rule"):
        validate_field("not_a_field", 1)
