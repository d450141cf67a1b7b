"""What a checkpoint survives: a kill at every step of the save, bit flips, edited JSON, refused loads.

The kill test forks a child per step ``k`` that runs :func:`write_checkpoint` with every file
system call of the save counted, and ends the process (``os._exit``, no clean-up) just before the
``k``-th one; the parent then loads what is on disk. It runs twice: with Linux's atomic directory
exchange and with the two-rename fallback of other systems.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import drlora_kernels.integrations._io as io_mod
import drlora_kernels.integrations.checkpoint as ckpt_mod
from drlora_kernels.integrations.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    collect_checkpoint,
    load_drlora,
    save_drlora,
    write_checkpoint,
)
from drlora_kernels.integrations.transformers import attach_drlora, get_drlora

from .tiny_models import build, randomize_lora, small_config, token_batch, train_steps

KILLED = 75


@pytest.fixture(scope="module")
def two_states():
    """An attached OLMoE with controller, and the checkpoint contents after 3 and after 5 steps."""
    model = build("olmoe")
    attach_drlora(model, small_config(), total_steps=8)
    train_steps(model, 3)
    model.eval()
    old = collect_checkpoint(model)
    train_steps(model, 2, seed=3)
    model.eval()
    new = collect_checkpoint(model)
    assert old[1]["controller"]["event_log"] != new[1]["controller"]["event_log"]
    return model, old, new


def _same(tensors: dict, other: dict) -> bool:
    return tensors.keys() == other.keys() and all(
        torch.equal(tensors[k], other[k]) for k in tensors
    )


def _save_in_child(target: Path, state, kill_at: int, *, exchange: bool) -> int:
    """Fork; the child writes ``state`` and exits just before its ``kill_at``-th file-system call."""
    pid = os.fork()
    if pid == 0:  # the child: count the calls, die at the k-th, never return into pytest
        try:
            calls = [0]

            def counted(fn):
                def wrapper(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == kill_at:
                        os._exit(KILLED)
                    return fn(*args, **kwargs)

                return wrapper

            for owner, name in (
                (os, "replace"), (os, "rename"), (os, "fsync"), (os, "mkdir"),
                (shutil, "rmtree"), (io_mod, "_exchange"), (ckpt_mod, "save_file"),
                (Path, "write_text"), (io_mod, "_write_manifest"),
            ):  # fmt: skip
                setattr(owner, name, counted(getattr(owner, name)))
            if not exchange:
                io_mod._exchange = counted(lambda a, b: False)
            write_checkpoint(target, *state)
            os._exit(0)
        except BaseException:
            import traceback

            traceback.print_exc()
            os._exit(1)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError(f"save child hung (kill_at={kill_at})")
        time.sleep(0.01)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_a_kill_at_any_step_of_the_save_leaves_a_complete_checkpoint(
    tmp_path, two_states, exchange
):
    if exchange and not sys.platform.startswith("linux"):
        pytest.skip("the atomic exchange is Linux-only")
    model, old, new = two_states
    pristine = tmp_path / "pristine"
    write_checkpoint(pristine, *old)
    target = tmp_path / "ckpt"
    outcomes = []
    for kill_at in range(1, 60):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(pristine, target)
        code = _save_in_child(target, new, kill_at, exchange=exchange)
        assert code in (0, KILLED), f"save child failed (kill_at={kill_at}, exit {code})"
        load_drlora(model, target)  # verifies the manifest and recovers an interrupted swap
        loaded = collect_checkpoint(model)[0]
        which = "new" if _same(loaded, new[0]) else "old" if _same(loaded, old[0]) else None
        assert which is not None, (
            f"kill before call {kill_at}: the checkpoint is neither old nor new"
        )
        outcomes.append(which)
        if code == 0:
            break
    else:
        pytest.fail("the save never completed within 60 counted calls")
    assert len(outcomes) >= 8, outcomes  # the save has that many steps to be killed at
    assert outcomes[0] == "old" and outcomes[-1] == "new", outcomes
    # once the new checkpoint is in place, no later kill brings the old one back
    assert outcomes == sorted(outcomes, key=lambda w: w == "new"), outcomes
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("ckpt", "pristine")]
    assert not leftovers, f"the completed save left {leftovers}"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_stale_temp_folders_of_killed_saves_are_removed_by_the_next_save(tmp_path, two_states):
    model, old, new = two_states
    target = tmp_path / "ckpt"
    write_checkpoint(target, *old)
    for kill_at in (3, 5, 7, 9):  # killed mid-write: temp folders stay behind
        assert _save_in_child(target, new, kill_at, exchange=False) == KILLED
    assert len(list(tmp_path.iterdir())) > 1
    save_drlora(model, target)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_bit_flips_in_tensor_data_are_refused(tmp_path):
    model = build("olmoe")
    handle = get_drlora(attach_drlora(model, small_config(), total_steps=8))
    randomize_lora(handle)
    save_drlora(model, tmp_path / "a")
    weights = tmp_path / "a" / WEIGHTS_NAME
    pristine = weights.read_bytes()
    header = 8 + int.from_bytes(pristine[:8], "little")  # safetensors: u64 length + JSON header
    rng = random.Random(0)
    for _ in range(30):
        data = bytearray(pristine)
        pos = rng.randrange(header, len(data))
        data[pos] ^= 1 << rng.randrange(8)
        weights.write_bytes(bytes(data))
        with pytest.raises(ValueError, match=f"SHA-256 of {WEIGHTS_NAME}"):
            load_drlora(model, tmp_path / "a")
    weights.write_bytes(pristine)
    load_drlora(model, tmp_path / "a")


def _edit_json(directory: Path, edit, *, rehash: bool) -> None:
    meta = json.loads((directory / CONFIG_NAME).read_text())
    edit(meta)
    (directory / CONFIG_NAME).write_text(json.dumps(meta))
    if rehash:  # a consistent edit: the manifest alone would not notice
        io_mod._write_manifest(directory)


def _set_step(m):
    m["controller"]["global_step"] += 1


def _set_event_rank(m):
    m["controller"]["event_log"][-1]["new_rank"] += 1


def _set_alpha(m):
    m["config"]["alpha"] *= 2


def _set_scaling(m):
    m["pools"][0]["scaling"] *= 2


def _set_json_ranks(m):
    name = next(iter(m["ranks"]))
    m["ranks"][name][0] = (m["ranks"][name][0] + 1) % 8


@pytest.mark.parametrize(
    "edit, rehashed_match",
    [
        (_set_step, None),  # covered by the checksum only
        (_set_event_rank, "event log ends module"),
        (_set_alpha, "records scaling"),
        (_set_scaling, "records scaling"),
        (_set_json_ranks, "JSON ranks"),
    ],
    ids=["global_step", "event_log", "alpha", "pool_scaling", "ranks"],
)
def test_edited_json_is_refused(tmp_path, two_states, edit, rehashed_match):
    model, old, _ = two_states
    write_checkpoint(tmp_path / "a", *old)
    _edit_json(tmp_path / "a", edit, rehash=False)
    with pytest.raises(ValueError, match=f"SHA-256 of {CONFIG_NAME}|{CONFIG_NAME} has"):
        load_drlora(build("olmoe"), tmp_path / "a")
    if rehashed_match is not None:
        write_checkpoint(tmp_path / "b", *old)
        _edit_json(tmp_path / "b", edit, rehash=True)
        with pytest.raises(ValueError, match=rehashed_match):
            load_drlora(build("olmoe"), tmp_path / "b")


def _model_state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        model.get_experts_implementation(),
        sorted(n for n, _ in model.named_modules()),
    )


def test_a_refused_load_that_attached_detaches_again(tmp_path, two_states):
    _, old, _ = two_states
    write_checkpoint(tmp_path / "a", *old)
    _edit_json(tmp_path / "a", _set_scaling, rehash=True)
    model = build("olmoe")
    model.set_experts_implementation("eager")
    before = _model_state(model)
    ids = token_batch()
    with torch.no_grad():
        logits = model(ids).logits
    with pytest.raises(ValueError, match="records scaling"):
        load_drlora(model, tmp_path / "a")
    # pass the cross-check, fail later (a controller tensor of the wrong shape): still detached
    tensors, meta = old
    bad = dict(tensors)
    bad["controller.tracker.frequency"] = torch.zeros(3)
    write_checkpoint(tmp_path / "b", bad, meta)
    with pytest.raises(ValueError, match="frequency"):
        load_drlora(model, tmp_path / "b")
    with pytest.raises(ValueError, match="no DR-LoRA adapter"):
        get_drlora(model)
    after = _model_state(model)
    assert after[1:] == before[1:]
    assert after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][k], before[0][k]) for k in before[0])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=0)


def test_a_load_that_fails_midway_leaves_the_attached_model_unchanged(tmp_path, two_states):
    model, old, new = two_states
    write_checkpoint(tmp_path / "current", *new)
    load_drlora(model, tmp_path / "current")
    before = collect_checkpoint(model)
    bad = dict(old[0])
    bad["controller.tracker.slot_importance"] = bad["controller.tracker.slot_importance"][
        ..., :2
    ].contiguous()
    write_checkpoint(tmp_path / "bad", bad, old[1])
    with pytest.raises(ValueError, match="slot_importance"):
        load_drlora(model, tmp_path / "bad")
    after = collect_checkpoint(model)
    assert _same(after[0], before[0])
    assert after[1] == before[1]


def test_export_peft_writes_a_verified_directory(tmp_path, olmoe):
    from drlora_kernels.integrations._io import verify_directory
    from drlora_kernels.integrations.peft_export import export_peft

    randomize_lora(attach_drlora(olmoe, small_config()))
    export_peft(olmoe, tmp_path / "peft")
    manifest = verify_directory(tmp_path / "peft")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(manifest["files"])
    assert load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
