"""The main job, end to end: pre-train a tiny MoE, fine-tune it three ways, report.

:func:`run_comparison` is shared by ``drlora demo`` (the embedded defaults of
:class:`RunSpec`), ``drlora train`` (user flags) and ``drlora quality`` (many
small runs). Steps:

1. load the pre-training and target corpora (local files, see :mod:`.data`);
2. pre-train the base MoE on the first, or reuse the checkpoint cached in
   ``<run_dir>/pretrained`` when its recorded settings match; a user-given local
   model (``RunSpec.model_path``) is used as is;
3. fine-tune a fresh copy of the base model on the target corpus once per
   method (uniform LoRA, DR-LoRA, masked DR-LoRA) at the same rank budget;
4. check that the masked path gives DR-LoRA's outputs (same model, both computations);
5. write ``results.json``, ``summary.txt``, ``loss_curves.png``, ``ranks_heatmap.png``
   and the adapters (``adapters/<method>``) into the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import DRLoRAConfig
from . import data as data_mod
from . import loop, models, report, speed

PRETRAIN_META = "pretrain.json"


@dataclass
class RunSpec:
    """Everything a comparison run needs. The defaults are the demo's (``make demo``)."""

    arch: str = "olmoe"
    size: str = "small"
    model_path: str | None = (
        None  # a local checkpoint instead of a model built and pre-trained here
    )
    pretrain_corpus: str = "stdlib"
    target_corpus: str = "licenses"
    target_paths: tuple[str, ...] = ()  # user files/directories instead of target_corpus
    corpus_bytes: int = 4_000_000
    methods: tuple[str, ...] = ("lora", "drlora", "masked")
    pretrain: loop.PretrainConfig = field(default_factory=loop.PretrainConfig)
    finetune: loop.FinetuneConfig = field(default_factory=loop.FinetuneConfig)
    device: str = "cpu"
    dtype: str = "fp32"
    save_adapters: bool = True
    plots: bool = True
    # after training, time this many steps of every method interleaved (0: keep the
    # step times measured during training, which drift between methods run apart)
    speed_rounds: int = 8
    # save the fine-tuning loop's state every this many steps (0: never) for --resume
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        if self.speed_rounds < 0:
            raise ValueError(f"speed_rounds must be >= 0, got {self.speed_rounds}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        bad = [m for m in self.methods if m not in loop.METHODS]
        if bad or not self.methods:
            raise ValueError(
                f"methods must be a non-empty subset of {loop.METHODS}, got {self.methods}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


#: The demo's learning rate and DR-LoRA schedule, from the quality study's 200-step LR sweep
#: (olmoe mini, mixed corpus, validation loss): 1e-2 was the best of {3e-3, 6e-3, 1e-2, 2e-2}
#: for LoRA, DR-LoRA and DR-LoRA with grow_until 0.25, and grow_until 0.25 had the lowest
#: validation loss of the three (README, "Quality study").
DEMO_LR = 1e-2
DEMO_GROW_UNTIL = 0.25


def demo_spec(*, tiny: bool = False, seed: int = 0) -> RunSpec:
    """The embedded default run of ``drlora demo`` (``tiny=True``: the seconds-long test version).

    Demo scale: ~7.5 M parameters (OLMoE-style, 8 experts, top-2, 4 layers), 300
    pre-training steps of 16 x 128 bytes, 200 fine-tuning steps of 8 x 128 bytes at
    lr 1e-2 (cosine, 3% warmup), ranks 4 -> 8 (r_max 16); the growth schedule in the paper's
    proportions (warmup 3%, 10 events, a buffer of one spacing) with the whole budget
    allocated by 25% of the run (``grow_until``, the setting the quality study supports at
    200 steps); ``p_grow`` 0.25 (the paper's 0.1 allows one rank per event at this r_max).
    """
    from ..scheduler import paper_proportions

    steps, events = (12, 2) if tiny else (200, 10)
    ranks = dict(r_init=2, r_target=4, r_max=8) if tiny else dict(r_init=4, r_target=8, r_max=16)
    drl = DRLoRAConfig(**ranks, p_grow=0.25, grow_until=DEMO_GROW_UNTIL, seed=seed,
                       **paper_proportions(steps, events))  # fmt: skip
    spec = RunSpec(
        pretrain=loop.PretrainConfig(steps=300, batch_size=16, seq_len=128, seed=seed),
        finetune=loop.FinetuneConfig(
            steps=steps, batch_size=8, seq_len=128, lr=DEMO_LR, warmup=round(0.03 * steps),
            eval_interval=20, seed=seed, drlora=drl,
        ),
    )  # fmt: skip
    if tiny:
        spec = dataclasses.replace(
            spec,
            size="tiny",
            corpus_bytes=300_000,
            speed_rounds=2,
            pretrain=loop.PretrainConfig(steps=8, batch_size=4, seq_len=32, seed=seed),
            finetune=loop.FinetuneConfig(
                steps=12, batch_size=4, seq_len=32, lr=DEMO_LR, warmup=1, eval_interval=4,
                eval_batch_size=16, seed=seed, drlora=drl,
            ),
        )  # fmt: skip
    return spec


# ---------------------------------------------------------------- the base model


def _pretrain_key(spec: RunSpec, corpus: data_mod.Corpus) -> dict[str, Any]:
    import transformers

    return {
        "arch": spec.arch,
        "size": spec.size,
        "pretrain": spec.pretrain.to_dict(),
        "corpus": {
            "name": corpus.name,
            "source": corpus.source,
            "bytes": corpus.num_bytes,
            "files": len(corpus.files),
        },
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
    }


def base_model(
    spec: RunSpec, run_dir: Path, *, progress: bool = True, log=print
) -> tuple[str, dict[str, Any]]:
    """The directory of the base model to fine-tune, and its pre-training record.

    Pre-trains and caches in ``run_dir / "pretrained"`` unless a checkpoint with
    the same settings is already there (or ``spec.model_path`` is given).
    """
    if spec.model_path is not None:
        return spec.model_path, {"source": "user checkpoint", "path": spec.model_path}
    corpus = data_mod.load_corpus(spec.pretrain_corpus, max_bytes=spec.corpus_bytes)
    key = _pretrain_key(spec, corpus)
    out = run_dir / "pretrained"
    meta_path = out / PRETRAIN_META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            log(f"reusing the pre-trained model in {out} (delete it to pre-train again)")
            return str(out), {**meta, "cached": True}
        log(f"settings changed since {out} was pre-trained: pre-training again")
    blocks = data_mod.make_blocks(corpus, spec.pretrain.seq_len)
    model = models.build_model(
        spec.arch, spec.size, seed=spec.pretrain.seed, dtype=DTYPES[spec.dtype]
    ).to(spec.device)
    log(
        f"pre-training {spec.arch}/{spec.size} ({models.count_parameters(model) / 1e6:.2f} M parameters) on "
        f"{corpus.name} ({corpus.source}, {corpus.num_bytes / 1e6:.2f} MB, {len(corpus.files)} files)"
    )
    t0 = time.perf_counter()
    curve = loop.pretrain(model, blocks.train, spec.pretrain, device=spec.device, progress=progress)
    seconds = time.perf_counter() - t0
    eval_loss = loop.evaluate(model, blocks.eval, device=spec.device)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    meta = {
        "key": key,
        "parameters": models.count_parameters(model),
        "seconds": seconds,
        "final_train_loss": curve[-1][1] if curve else None,
        "eval_loss": eval_loss,
        "curve": curve[:: max(1, len(curve) // 100)],
    }
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    log(f"pre-trained in {seconds:.0f} s: held-out loss on {corpus.name} {eval_loss:.3f}")
    return str(out), {**meta, "cached": False}


# ---------------------------------------------------------------- the comparison


def target_blocks(spec: RunSpec, tokenizer=None) -> tuple[data_mod.Corpus, data_mod.TokenBlocks]:
    """The fine-tuning corpus and its train/held-out blocks."""
    if spec.target_paths:
        corpus = data_mod.load_text_files(list(spec.target_paths), max_bytes=spec.corpus_bytes)
    else:
        corpus = data_mod.load_corpus(spec.target_corpus, max_bytes=spec.corpus_bytes)
    return corpus, data_mod.make_blocks(corpus, spec.finetune.seq_len, tokenizer=tokenizer)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _load_tokenizer(spec: RunSpec):
    """A user checkpoint's own tokenizer, if it ships one; otherwise byte tokens (``None``).

    The models built and pre-trained here save no tokenizer: they read bytes.
    """
    if spec.model_path is None or not any(
        (Path(spec.model_path) / f).is_file() for f in TOKENIZER_FILES
    ):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.model_path, local_files_only=True)


@torch.no_grad()
def masked_equals_variable_rank(handle, batch: torch.Tensor) -> float:
    """Max |logits(masked r_max) - logits(variable rank)| of the same model on ``batch``."""
    from .masked import MaskedGroupedLoRALinear

    model = handle.model
    was_training = model.training
    model.eval()
    pools = [p for layer in handle.pools for p in layer]
    classes = [type(p) for p in pools]
    try:
        for p in pools:
            p.__class__ = MaskedGroupedLoRALinear.__mro__[1]  # the variable-rank GroupedLoRALinear
        ref = model(input_ids=batch[:, :-1]).logits.float()
        for p in pools:
            p.__class__ = MaskedGroupedLoRALinear
        masked = model(input_ids=batch[:, :-1]).logits.float()
    finally:
        for p, c in zip(pools, classes):
            p.__class__ = c
        model.train(was_training)
    return (masked - ref).abs().max().item()


def run_comparison(
    spec: RunSpec,
    run_dir: str | os.PathLike,
    *,
    progress: bool = True,
    log=print,
    resume_run: bool = False,
    parallel=None,
) -> dict[str, Any]:
    """Run the whole job described by ``spec`` and write its outputs into ``run_dir``.

    With ``spec.checkpoint_every``, the fine-tuning state is checkpointed; ``resume_run=True``
    continues an interrupted run of the same ``spec`` in ``run_dir`` where it stopped
    (``drlora train --resume``, see :mod:`.resume`). Without it, a previous run's resume state
    in ``run_dir`` is discarded.

    Under ``torchrun`` (``parallel``, a :class:`~.distributed.DistributedRun`) every process
    runs this: global rank 0 pre-trains the base model and writes the outputs, every process
    trains on its share of each global batch (``speed_rounds`` is not run: tokens/s comes from
    the training steps).

    Returns the ``results.json`` payload (per-method records without live objects).
    """
    from . import resume

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume_run and (run_dir / resume.RESUME_DIR).exists():
        log(f"starting afresh: removing the resume state of an earlier run in {run_dir}")
        shutil.rmtree(run_dir / resume.RESUME_DIR)
    if resume_run and not spec.checkpoint_every:
        raise ValueError("resuming needs a run made with checkpoint_every > 0")
    if spec.checkpoint_every:
        resume.save_spec(spec, run_dir)
    t_start = time.perf_counter()
    torch.manual_seed(spec.finetune.seed)
    writer = parallel is None or parallel.is_main
    if not writer:
        parallel.barrier()  # rank 0 pre-trains (or finds the cache) first
    path, pre = base_model(spec, run_dir, progress=progress and writer, log=log)
    if writer and parallel is not None:
        parallel.barrier()
    tokenizer = _load_tokenizer(spec)
    corpus, blocks = target_blocks(spec, tokenizer)
    log(
        f"fine-tuning on {corpus.name} ({corpus.source}, {corpus.num_bytes / 1e6:.2f} MB): "
        f"{blocks.train.shape[0]} train / {blocks.eval.shape[0]} held-out blocks of {blocks.seq_len} tokens"
    )
    dtype = DTYPES[spec.dtype]
    results: dict[str, dict[str, Any]] = {}
    checks: dict[str, Any] = {}
    for method in spec.methods:
        model = models.load_model(path, dtype=dtype, device=spec.device)
        cfg = dataclasses.replace(spec.finetune, method=method)
        done = resume.finished_record(run_dir, method) if spec.checkpoint_every else None
        if done is not None:  # finished before an interruption: its record and saved adapter
            log(
                f"{method}: finished before the interruption, record taken from {resume.RESUME_DIR}/"
            )
            from ..integrations.checkpoint import CONFIG_NAME, load_drlora

            adapter = run_dir / "adapters" / method
            rec = done
            handle = load_drlora(model, adapter) if (adapter / CONFIG_NAME).is_file() else None
        else:
            rec = loop.finetune(
                model, blocks.train, blocks.eval, cfg, device=spec.device,
                progress=progress and writer, parallel=parallel,
                checkpoint_dir=resume.checkpoint_dir(run_dir, method) if spec.checkpoint_every else None,
                checkpoint_every=spec.checkpoint_every,
            )  # fmt: skip
            handle = rec.pop("handle")
        if method == "drlora" and handle is not None:
            checks["masked_vs_drlora_max_abs_logit_diff"] = masked_equals_variable_rank(
                handle, blocks.eval[: min(4, blocks.eval.shape[0])].to(spec.device)
            )
        if spec.save_adapters and done is None:
            from ..integrations.checkpoint import save_drlora

            save_drlora(handle, run_dir / "adapters" / method)
        if spec.checkpoint_every and done is None:
            resume.mark_finished(run_dir, method, rec)
        results[method] = rec
        del model, handle
    if spec.speed_rounds > 0 and parallel is None:
        _interleaved_speed(spec, path, dtype, blocks.train, results, log)
    if "drlora" in results and "masked" in results:
        d, m = results["drlora"], results["masked"]
        checks["masked_same_final_ranks"] = d["rank_stats"]["ranks"] == m["rank_stats"]["ranks"]
        checks["masked_same_growth_decisions"] = _decisions(d) == _decisions(m)
        checks["masked_vs_drlora_eval_loss_diff"] = abs(d["eval_loss"] - m["eval_loss"])

    payload = {
        "spec": _spec_dict(spec),
        "environment": _environment(spec, parallel),
        "pretraining": {k: v for k, v in pre.items() if k != "curve"},
        "target_corpus": {
            "name": corpus.name,
            "source": corpus.source,
            "bytes": corpus.num_bytes,
            "files": len(corpus.files),
        },
        "methods": results,
        "checks": checks,
        "wall_seconds": time.perf_counter() - t_start,
    }
    if not writer:
        return payload
    table = report.format_table(results)
    summary = [table, "", report.format_settings(spec.finetune)]
    if checks:
        summary.append("checks: " + ", ".join(f"{k}={_short(v)}" for k, v in checks.items()))
    kind = next(iter(results.values()))["peak_memory_kind"]
    how = (
        f"methods stepped round-robin after training, {spec.speed_rounds} rounds"
        if spec.speed_rounds > 0 and parallel is None
        else "timed during training"
    )
    summary.append(
        f"peak mem = {kind}; tokens/s = tokens per step / median wall time of a training step "
        f"({how})"
    )
    (run_dir / "summary.txt").write_text("\n".join(summary) + "\n")
    report.write_json(run_dir / "results.json", payload)
    if spec.checkpoint_every:  # complete: the resume state is no longer needed
        shutil.rmtree(run_dir / resume.RESUME_DIR, ignore_errors=True)
    if spec.plots:
        title = f"{spec.arch}/{spec.size}: fine-tuning on {corpus.name}"
        report.plot_loss_curves(results, run_dir / "loss_curves.png", title=title)
        dyn = results.get("drlora") or results.get("masked")
        if dyn is not None:
            report.plot_rank_heatmap(dyn["rank_stats"], run_dir / "ranks_heatmap.png",
                                     title=f"DR-LoRA final ranks ({corpus.name})")  # fmt: skip
    return payload


def _interleaved_speed(spec: RunSpec, path, dtype, train_blocks, results, log) -> None:
    """Replace each method's tokens/s by a measurement taken with the methods interleaved.

    The training-time figure stays in the record as ``tokens_per_second_train``.
    """
    ft = spec.finetune
    log(f"timing one training step per method, interleaved ({spec.speed_rounds} rounds)")
    batches = list(
        data_mod.train_batches(train_blocks, ft.batch_size, spec.speed_rounds, ft.seed + 1)
    )
    seconds = speed.interleaved_step_seconds(
        lambda: models.load_model(path, dtype=dtype, device=spec.device),
        ft, tuple(results), batches, device=spec.device,
    )  # fmt: skip
    tokens = batches[0].shape[0] * (batches[0].shape[1] - 1)
    for method, sec in seconds.items():
        rec = results[method]
        rec["tokens_per_second_train"] = rec["tokens_per_second"]
        rec["tokens_per_second"] = tokens / sec
        rec["step_seconds_interleaved"] = sec


def _decisions(record: dict[str, Any]) -> list[tuple]:
    """The growth decisions of a run (step, layer, module, old -> new rank), without the saliency floats."""
    return [
        (ev["step"], ev["layer"], ev["module"], ev["old_rank"], ev["new_rank"])
        for step in record["growth_events"]
        for ev in step["events"]
    ]


def _short(v: Any) -> str:
    return f"{v:.2e}" if isinstance(v, float) else str(v)


def _spec_dict(spec: RunSpec) -> dict[str, Any]:
    d = dataclasses.asdict(spec)
    d["finetune"] = spec.finetune.to_dict()
    return d


def _environment(spec: RunSpec, parallel=None) -> dict[str, Any]:
    import transformers

    from ..ops import resolve_backend

    device = torch.device(spec.device)
    return {
        "processes": 1 if parallel is None else parallel.world,
        "parallel": None if parallel is None else parallel.parallel,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
        "backend": resolve_backend(spec.finetune.drlora.backend, device),
    }
