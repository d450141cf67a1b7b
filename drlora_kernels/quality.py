"""``drlora quality``: does DR-LoRA beat uniform LoRA at the same rank budget, and why?

A grid of small, honest experiments (longer than the demo; not run in CI):
architectures (OLMoE-, Qwen2-MoE-, Mixtral-style tiny configs) x target corpora x
seeds, each base model pre-trained on the Python standard library (cached per
architecture and seed), then fine-tuned once per variant:

* ``lora``          uniform LoRA at ``r_target`` (the baseline);
* ``drlora``        DR-LoRA as in SPEC.md (per-layer allocation, gamma 1.2);
* ``global``        ablation: one budget across all layers;
* ``gamma0``        ablation: no rank penalty (gamma = 0);
* ``no-importance`` ablation: saliency from routing frequency only;
* ``no-frequency``  ablation: saliency from rank importance only.

The result is the final held-out loss of each run, summarised as mean +- std over
seeds per (architecture, corpus) and overall, plus the paired difference
DR-LoRA - LoRA (negative = DR-LoRA better). Writes ``quality.md`` and
``quality.json`` to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

VARIANTS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora"},
    "drlora": {},
    "global": {"allocation": "global"},
    "gamma0": {"gamma": 0.0},
    "no-importance": {"use_importance": False},
    "no-frequency": {"use_frequency": False},
}
DEFAULT_ARCHS = ("olmoe", "qwen2_moe", "mixtral")
DEFAULT_CORPORA = ("licenses", "c-headers", "copyright")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``drlora quality``."""
    p.add_argument(
        "--archs", nargs="+", default=list(DEFAULT_ARCHS), help="olmoe qwen2_moe mixtral"
    )
    p.add_argument(
        "--corpora",
        nargs="+",
        default=list(DEFAULT_CORPORA),
        help="target corpora (see drlora train --corpus)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--size", default="mini", help="model size preset (tiny, mini, small)")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--r-init", type=int, default=4)
    p.add_argument("--r-target", type=int, default=8)
    p.add_argument("--r-max", type=int, default=16)
    p.add_argument("--grow-every", type=int, default=20)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--buffer-steps", type=int, default=20)
    p.add_argument("--p-grow", type=float, default=0.25)
    p.add_argument("--output-dir", default="runs/quality")
    p.add_argument("--no-progress", action="store_true")


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _cell(xs: list[float], digits: int = 4) -> str:
    m, s = _mean_std(xs)
    return "-" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def summarize(runs: list[dict[str, Any]], variants: list[str]) -> str:
    """The markdown report: held-out loss per (arch, corpus) and variant, and DR-LoRA - LoRA."""
    keys = sorted({(r["arch"], r["corpus"]) for r in runs})
    by = {}
    for r in runs:
        by.setdefault((r["arch"], r["corpus"], r["variant"]), {})[r["seed"]] = r["eval_loss"]
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        f"Held-out loss (nats/byte), mean ± std over seeds {seeds}; lower is better.",
        "",
        "| arch | corpus | " + " | ".join(variants) + " | drlora − lora |",
        "|---|---|" + "---|" * (len(variants) + 1),
    ]

    def diffs(arch_corpus: list[tuple[str, str]]) -> list[float]:
        out = []
        for a, c in arch_corpus:
            d, lo = by.get((a, c, "drlora"), {}), by.get((a, c, "lora"), {})
            out += [d[s] - lo[s] for s in seeds if s in d and s in lo]
        return out

    for a, c in keys:
        cells = [_cell(list(by.get((a, c, v), {}).values())) for v in variants]
        lines.append(f"| {a} | {c} | " + " | ".join(cells) + f" | {_cell(diffs([(a, c)]))} |")
    overall = [
        _cell([x for (a, c) in keys for x in by.get((a, c, v), {}).values()]) for v in variants
    ]
    lines.append("| **all** | | " + " | ".join(overall) + f" | **{_cell(diffs(keys))}** |")
    d = diffs(keys)
    if d:
        wins = sum(x < 0 for x in d)
        lines += [
            "",
            f"DR-LoRA beats LoRA in {wins} of {len(d)} paired runs (same arch, corpus, seed).",
        ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the grid described by ``args`` (see :func:`add_arguments`) and write the report."""
    from .config import DRLoRAConfig
    from .train import loop, models
    from .train.pipeline import RunSpec, base_model, target_blocks

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    runs: list[dict[str, Any]] = []
    results_path = out / "quality.json"
    settings = {
        k: v
        for k, v in vars(args).items()
        if k not in ("func", "command", "no_progress", "threads")
    }
    # Floating-point results depend on the thread count (GEMM reduction order): record it.
    environment = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    for arch in args.archs:
        for seed in args.seeds:
            pre = loop.PretrainConfig(
                steps=args.pretrain_steps,
                batch_size=2 * args.batch_size,
                seq_len=args.seq_len,
                seed=seed,
            )
            base_spec = RunSpec(arch=arch, size=args.size, pretrain=pre)
            path, _ = base_model(base_spec, out / f"{arch}-seed{seed}", progress=progress)
            for corpus in args.corpora:
                drl = DRLoRAConfig(
                    r_init=args.r_init, r_target=args.r_target, r_max=args.r_max, grow_every=args.grow_every,
                    warmup_steps=args.warmup_steps, buffer_steps=args.buffer_steps, p_grow=args.p_grow, seed=seed,
                )  # fmt: skip
                ft = loop.FinetuneConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                                         eval_interval=args.steps, seed=seed, drlora=drl)  # fmt: skip
                _, blocks = target_blocks(
                    dataclasses.replace(base_spec, target_corpus=corpus, finetune=ft)
                )
                for variant in args.variants:
                    opts = dict(VARIANTS[variant])
                    method = opts.pop("method", "drlora")
                    cfg = dataclasses.replace(
                        ft, method=method, drlora=dataclasses.replace(drl, **opts)
                    )
                    model = models.load_model(path)
                    rec = loop.finetune(model, blocks.train, blocks.eval, cfg, progress=progress)
                    rec.pop("handle")
                    runs.append({
                        "arch": arch, "corpus": corpus, "seed": seed, "variant": variant,
                        "eval_loss": rec["eval_loss"], "base_eval_loss": rec["eval_curve"][0][1],
                        "rank_std": rec["rank_stats"]["std"], "tokens_per_second": rec["tokens_per_second"],
                    })  # fmt: skip
                    print(
                        f"{arch:>9} {corpus:>10} seed {seed} {variant:>13}: held-out loss {rec['eval_loss']:.4f}"
                    )
                    results_path.write_text(
                        json.dumps(
                            {"args": settings, "environment": environment, "runs": runs}, indent=1
                        )
                        + "\n"
                    )
    table = summarize(runs, list(args.variants))
    cmd = "drlora quality " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in settings.items()
        if k != "output_dir"
    )
    header = f"# DR-LoRA vs LoRA quality study\n\nCommand: `{cmd}`\n\nWall time: {time.perf_counter() - t0:.0f} s.\n\n"
    (out / "quality.md").write_text(header + table + "\n")
    print()
    print(table)
    print(f"\nwrote {out / 'quality.md'} and {results_path}")
    return 0
