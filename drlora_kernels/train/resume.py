"""Resume an interrupted ``drlora train`` run where it stopped (``drlora train --resume RUN_DIR``).

With ``--checkpoint-every N`` (default: ``--eval-interval``) the fine-tuning loop writes its whole
state every ``N`` steps to ``<run_dir>/resume/<method>/``: the adapter (pools, ranks, routers,
the controller's statistics, step counter and event log) with :func:`save_drlora`, plus the
optimizer state, the torch RNG state and the loop's progress (step, curves, growth events,
timings) as its ``training_state``, in one atomic directory (a kill while saving leaves the
previous checkpoint). A finished method leaves ``<run_dir>/resume/<method>.done.json``; the
run's settings are in ``<run_dir>/run_spec.json``.

``--resume`` reads the settings back, skips the finished methods and continues the interrupted
one from its last checkpoint: the batches are the same seeded sequence (the ones already
trained are skipped), so the result equals an uninterrupted run's (tested), except for the
timings and the peak memory, which cover the resumed part only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import DRLoRAConfig

RESUME_DIR = "resume"
SPEC_NAME = "run_spec.json"

__all__ = [
    "RESUME_DIR",
    "SPEC_NAME",
    "LoopProgress",
    "checkpoint_dir",
    "finished_record",
    "load_spec",
    "mark_finished",
    "restore_finetune",
    "save_finetune",
    "save_spec",
]


@dataclass
class LoopProgress:
    """What the fine-tuning loop has done so far (JSON-able; saved in the training state)."""

    step: int = 0  # optimizer steps done
    train_curve: list = field(default_factory=list)
    eval_curve: list = field(default_factory=list)
    events: list = field(default_factory=list)
    train_seconds: float = 0.0
    tokens: int = 0
    step_seconds: list = field(default_factory=list)


def checkpoint_dir(run_dir: str | Path, method: str) -> Path:
    return Path(run_dir) / RESUME_DIR / method


def save_finetune(directory: Path, handle, optimizer, progress: LoopProgress) -> None:
    """Write the loop's state (adapter + optimizer + RNG + progress) to ``directory``, atomically."""
    from ..integrations.checkpoint import save_drlora

    save_drlora(
        handle,
        directory,
        training_state={
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "progress": dataclasses.asdict(progress),
        },
    )


def restore_finetune(directory: Path, model, cfg, make_optimizer):
    """``(handle, optimizer, progress)`` from :func:`save_finetune`'s checkpoint, or ``None`` if there is none.

    ``model`` is the fresh base model; the adapter is attached with the saved config, which
    must be ``cfg``'s (``ValueError`` otherwise: the run's settings changed).
    """
    from ..integrations.checkpoint import CONFIG_NAME, load_drlora, read_training_state
    from .masked import use_masked_compute

    if not (Path(directory) / CONFIG_NAME).is_file():
        from ..integrations._io import recover_directory

        if not recover_directory(directory):
            return None
    state = read_training_state(directory)
    if state is None:
        raise ValueError(
            f"{directory} holds an adapter but no training state: it cannot be resumed"
        )
    handle = load_drlora(model, directory)
    if handle.config != cfg.method_config():
        raise ValueError(
            f"the checkpoint in {directory} was made with {handle.config}, this run uses "
            f"{cfg.method_config()}: resume with the run's own settings"
        )
    if cfg.method == "masked":
        use_masked_compute(handle.pools)
    optimizer = make_optimizer(handle, handle.trainable_parameters(), cfg)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return handle, optimizer, LoopProgress(**state["progress"])


def mark_finished(run_dir: str | Path, method: str, record: dict[str, Any]) -> None:
    """Record a finished method (its JSON record) so that ``--resume`` skips it."""
    from .report import write_json

    path = Path(run_dir) / RESUME_DIR / f"{method}.done.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    write_json(tmp, record)
    tmp.replace(path)


def finished_record(run_dir: str | Path, method: str) -> dict[str, Any] | None:
    path = Path(run_dir) / RESUME_DIR / f"{method}.done.json"
    return json.loads(path.read_text()) if path.is_file() else None


# ------------------------------------------------------------------ the run's settings


def save_spec(spec, run_dir: str | Path) -> None:
    """Write ``spec`` (a :class:`~drlora_kernels.train.pipeline.RunSpec`) to ``run_dir/run_spec.json``."""
    d = dataclasses.asdict(spec)
    d["finetune"]["drlora"] = spec.finetune.drlora.to_dict()
    path = Path(run_dir) / SPEC_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(d, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def load_spec(run_dir: str | Path):
    """The :class:`~drlora_kernels.train.pipeline.RunSpec` a run was started with.

    Raises:
        ValueError: ``run_dir`` holds no ``run_spec.json`` (not a ``drlora train`` run directory).
    """
    from .loop import FinetuneConfig, PretrainConfig
    from .pipeline import RunSpec

    path = Path(run_dir) / SPEC_NAME
    if not path.is_file():
        raise ValueError(
            f"--resume {run_dir}: no {SPEC_NAME} there (not a drlora train run directory)"
        )
    d = json.loads(path.read_text())
    ft = d.pop("finetune")
    ft["drlora"] = DRLoRAConfig.from_dict(ft["drlora"])
    d["finetune"] = FinetuneConfig(**ft)
    d["pretrain"] = PretrainConfig(**d["pretrain"])
    for key in ("methods", "target_paths"):
        d[key] = tuple(d[key])
    return RunSpec(**d)
