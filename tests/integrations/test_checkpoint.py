"""save_drlora / load_drlora: round trip, controller state, validation, atomic replacement."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from drlora_kernels.integrations._io import MANIFEST_NAME
from drlora_kernels.integrations.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_drlora,
    save_drlora,
)
from drlora_kernels.integrations.transformers import attach_drlora, get_drlora

from .tiny_models import build, randomize_lora, small_config, token_batch, train_steps


def test_round_trip_restores_pools_ranks_and_controller(tmp_path):
    model = build("olmoe")
    fresh = copy.deepcopy(model)
    handle = get_drlora(attach_drlora(model, small_config(), total_steps=8))
    train_steps(model, 3)  # events at steps 1 and 3: ranks now differ per expert
    assert handle.controller.event_log, "growth should have happened"
    save_drlora(model, tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {
        CONFIG_NAME,
        WEIGHTS_NAME,
        MANIFEST_NAME,
    }

    loaded = load_drlora(fresh, tmp_path / "ckpt")  # attaches with the saved config
    assert loaded is get_drlora(fresh) and loaded.total_steps == 8
    for (n1, p1), (n2, p2) in zip(handle.named_pools(), loaded.named_pools()):
        assert n1 == n2
        assert (
            torch.equal(p1.ranks, p2.ranks)
            and torch.equal(p1.lora_A, p2.lora_A)
            and torch.equal(p1.lora_B, p2.lora_B)
        )
    c1, c2 = handle.controller, loaded.controller
    assert c2.global_step == c1.global_step and c2.event_log == c1.event_log
    for k, v in c1.tracker.state_dict().items():
        assert torch.equal(v, c2.tracker.state_dict()[k]), k
    model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            fresh(token_batch()).logits, model(token_batch()).logits, rtol=0, atol=0
        )


def test_load_into_attached_model_without_controller(tmp_path):
    model = build("olmoe")
    handle = get_drlora(attach_drlora(model, small_config()))
    randomize_lora(handle)
    save_drlora(handle, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert meta["controller"] is None and meta["model_class"] == "OlmoeForCausalLM"
    other = build("olmoe")
    h2 = get_drlora(attach_drlora(other, small_config()))
    load_drlora(other, tmp_path / "a")
    assert h2.controller is None
    assert all(
        torch.equal(a.lora_B, b.lora_B)
        for (_, a), (_, b) in zip(handle.named_pools(), h2.named_pools())
    )


def test_mismatches_raise_before_touching_the_model(tmp_path):
    model = build("olmoe")
    randomize_lora(attach_drlora(model, small_config()))
    save_drlora(model, tmp_path / "a")

    other_rmax = build("olmoe")
    h = get_drlora(attach_drlora(other_rmax, small_config(r_max=16)))
    before = [p.lora_A.clone() for _, p in h.named_pools()]
    with pytest.raises(ValueError, match="r_max=8.*r_max=16"):
        load_drlora(other_rmax, tmp_path / "a")
    assert all(torch.equal(b, p.lora_A) for b, (_, p) in zip(before, h.named_pools()))

    wider = build("olmoe", hidden_size=32)
    with pytest.raises(ValueError, match="in_features=64, the model's has 32"):
        load_drlora(wider, tmp_path / "a")

    deeper = build("olmoe", num_hidden_layers=3)
    with pytest.raises(ValueError, match="pools missing from the checkpoint"):
        load_drlora(deeper, tmp_path / "a")


def test_corrupted_or_missing_files_raise_value_error(tmp_path):
    model = build("olmoe")
    attach_drlora(model, small_config())
    with pytest.raises(ValueError, match="no DR-LoRA checkpoint"):
        load_drlora(model, tmp_path / "nothing")
    save_drlora(model, tmp_path / "a")
    weights = tmp_path / "a" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        load_drlora(model, tmp_path / "a")
    save_drlora(model, tmp_path / "b")
    (tmp_path / "b" / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="drlora_config.json has 9 bytes"):
        load_drlora(model, tmp_path / "b")
    save_drlora(model, tmp_path / "c")
    (tmp_path / "c" / MANIFEST_NAME).unlink()
    with pytest.raises(ValueError, match=f"has no {MANIFEST_NAME}"):
        load_drlora(model, tmp_path / "c")


def test_save_replaces_atomically_and_refuses_foreign_directories(tmp_path, monkeypatch):
    model = build("olmoe")
    handle = get_drlora(attach_drlora(model, small_config()))
    save_drlora(model, tmp_path / "a")
    original = (tmp_path / "a" / WEIGHTS_NAME).read_bytes()

    randomize_lora(handle)
    import drlora_kernels.integrations.checkpoint as ckpt

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_drlora(model, tmp_path / "a")
    monkeypatch.undo()
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() == original  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp dir left behind

    save_drlora(model, tmp_path / "a")  # a complete save replaces it
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() != original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to overwrite.*holds no drlora_config.json"):
        save_drlora(model, foreign)
