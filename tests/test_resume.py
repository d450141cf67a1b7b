"""``drlora train --resume`` continues an interrupted run and gives the uninterrupted run's result;
the README's manual-loop resume recipe works; an unavailable ``--device`` is a one-line error."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import drlora_kernels as dk
from drlora_kernels.cli import main
from drlora_kernels.train import loop

from .integrations.tiny_models import build, small_config, train_steps
from .test_cli import _save_tiny_checkpoint_with_tokenizer


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def local_model(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    ckpt, text = root / "ckpt", root / "text"
    _save_tiny_checkpoint_with_tokenizer(ckpt)
    text.mkdir()
    gen = torch.Generator().manual_seed(0)
    for d in range(30):
        ids = torch.randint(0, 60, (200,), generator=gen).tolist()
        (text / f"doc{d}.txt").write_text(" ".join(f"w{i}" for i in ids))
    return ckpt, text


def _argv(ckpt: Path, text: Path, out: Path) -> list[str]:
    argv = ["train", "--model", str(ckpt), "--data", str(text), "--method", "drlora", "lora"]
    argv += ["--steps", "12", "--batch-size", "2", "--seq-len", "32", "--eval-interval", "4"]
    argv += ["--checkpoint-every", "3", "--r-init", "2", "--r-target", "4", "--grow-every", "3"]
    argv += ["--warmup-steps", "2", "--buffer-steps", "1", "--speed-rounds", "0"]
    return argv + ["--output-dir", str(out), "--no-progress", "--threads", "1"]


def _interrupt_at(monkeypatch, call: int) -> None:
    """Make the ``call``-th training step of this process raise KeyboardInterrupt (a Ctrl-C)."""
    real, calls = loop.train_step, [0]

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step)


_SAME = ("train_curve", "eval_curve", "rank_stats", "growth_events", "eval_loss", "config")


def test_resume_gives_the_uninterrupted_result(tmp_path, local_model, monkeypatch, one_thread):
    ckpt, text = local_model
    assert main(_argv(ckpt, text, tmp_path / "straight")) == 0
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())

    run = tmp_path / "interrupted"
    _interrupt_at(monkeypatch, 8)  # drlora, step 8 of 12: its last checkpoint is at step 6
    with pytest.raises(KeyboardInterrupt):
        main(_argv(ckpt, text, run))
    assert (run / "resume" / "drlora" / "training_state.pt").is_file()
    _interrupt_at(monkeypatch, 6 + 5)  # resumed: drlora steps 7-12, then lora's step 5
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--resume", str(run), "--no-progress", "--threads", "1"])
    assert (run / "resume" / "drlora.done.json").is_file()
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--no-progress", "--threads", "1"]) == 0
    resumed = json.loads((run / "results.json").read_text())
    assert not (run / "resume").exists()  # cleaned up once complete

    for method in ("drlora", "lora"):
        a, b = straight["methods"][method], resumed["methods"][method]
        for key in _SAME:
            assert a[key] == b[key], (method, key)
    assert resumed["methods"]["drlora"]["growth_events"]  # it did grow across the interruption
    assert resumed["methods"]["lora"]["resumed_at_step"] == 3
    assert resumed["checks"] == straight["checks"]


def test_resume_refuses_other_flags_and_foreign_directories(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "drop --steps" in err and "Traceback" not in err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "no run_spec.json" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "mps", "nonsense"])
def test_an_unavailable_device_is_a_one_line_error(device, capsys):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", "--device", device, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device" in err and "Traceback" not in err, err


def test_the_readme_manual_loop_resume_recipe(tmp_path):
    """The recipe of README "Resuming a run" (two processes simulated by two fresh models)."""
    base = build("olmoe")

    def start():
        model = dk.attach_drlora(copy.deepcopy(base), small_config(), total_steps=8)
        handle = dk.get_drlora(model)
        opt = dk.RankAwareAdamW(
            handle.trainable_parameters(), lr=1e-2, slots=handle.controller.slot_specs()
        )
        return model, handle, opt

    straight = start()
    train_steps(straight[0], range(8), optimizer=straight[2])

    # --- the recipe: save every N steps ...
    model, handle, opt = start()
    train_steps(model, range(4), optimizer=opt)
    dk.save_drlora(
        model, tmp_path / "ckpt", training_state={"optimizer": opt.state_dict(), "step": 4}
    )
    del model, handle, opt
    # --- ... and in the new process: load, rebuild the optimizer, load its state, continue
    model = copy.deepcopy(base)
    handle = dk.load_drlora(
        model, tmp_path / "ckpt"
    )  # attaches with the saved config and controller
    opt = dk.RankAwareAdamW(
        handle.trainable_parameters(), lr=1e-2, slots=handle.controller.slot_specs()
    )
    state = dk.read_training_state(tmp_path / "ckpt")
    opt.load_state_dict(state["optimizer"])
    train_steps(model, range(state["step"], 8), optimizer=opt)

    ref = straight[1]
    assert handle.controller.event_log == ref.controller.event_log
    for (name, a), (_, b) in zip(ref.named_pools(), handle.named_pools()):
        assert torch.equal(a.ranks, b.ranks), name
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B), name
    for a, b in zip(ref.router_parameters, handle.router_parameters):
        assert torch.equal(a, b)
