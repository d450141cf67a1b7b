"""``drlora quality``: does DR-LoRA beat uniform LoRA at the same rank budget, fairly measured?

The study (v2) fine-tunes small pre-trained MoE models (OLMoE-, Qwen2-MoE- and
Mixtral-style, ``--size mini``, byte tokens, pre-trained on the Python standard
library and cached per architecture and seed) on target corpora, once per
variant, every method **at its own best learning rate**:

* ``lora-rinit`` / ``lora`` / ``lora-2x``: uniform LoRA at ``r_init``, ``r_target``
  (the same budget as DR-LoRA) and ``2 * r_target`` -- the bracket;
* ``drlora``: DR-LoRA with the paper's schedule (SPEC.md);
* ``drlora-until``: DR-LoRA whose whole budget is allocated by ``--grow-until``
  (an option beyond the paper);
* ``random``: the paper's schedule with random allocation (saliency replaced by
  seeded noise at every event: same quota, cap and budget);
* ``global``: the paper's ablation, one budget across all layers.

Every method trains the routers (in the optimizer from the start, still during
warmup) and uses ``RankAwareAdamW``. LoRA at rank ``r`` uses ``alpha = 2 r`` and
DR-LoRA ``alpha = 2 r_target``, so every variant has the scale 2 (README: the
paper's "alpha = 2 x r" does not say which r).

**Compute plan** (:func:`build_plan`; all runs one after another, one thread):

1. LR sweep: every variant at every ``--lrs`` value on one (arch, corpus, seed)
   (``--sweep-arch/-corpus/-seed``), per run length; the best LR of a variant is
   the one with the lowest loss on the **validation** split. The allocation
   ablations (``random``, ``global``, :data:`LR_FROM`) take DR-LoRA's best LR, so
   only the allocation differs;
2. main grid: ``--archs x --corpora x --seeds`` for the ``--main-variants`` at
   their best LR and the first ``--steps`` value; the same on ``--short-archs``
   at the other ``--steps`` values (the short-run comparison);
3. ablations: ``--ablation-archs x --corpora x --seeds`` for the
   ``--ablation-variants`` at the first ``--steps`` value.

Reported: the loss on the **test** split (held out, disjoint from the validation
split and from training), paired differences against LoRA at the same budget
(mean ± std over the paired runs) and win counts, per (arch, corpus) cell and
overall; wall time per run. The growth schedule follows the paper's proportions
at every length (:func:`paper_schedule`: warmup 3%, ~10 events, buffer of one
event spacing, about 1/10 of the growth span).

Resumable: each finished run is appended to ``runs.jsonl`` in ``--output-dir``
and skipped on restart (same settings; a changed setting is an error, not a
silent mix). ``drlora quality --report DIR`` renders ``quality.md`` from whatever
has finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

VARIANTS: dict[str, str] = {
    "lora-rinit": "uniform LoRA at r_init",
    "lora": "uniform LoRA at r_target (the same budget)",
    "lora-2x": "uniform LoRA at 2 r_target",
    "drlora": "DR-LoRA, the paper's schedule",
    "drlora-until": "DR-LoRA, whole budget allocated by --grow-until",
    "random": "the paper's schedule, random allocation",
    "global": "DR-LoRA, one budget across all layers (paper ablation)",
    "gamma0": "DR-LoRA without rank penalty (gamma = 0)",
    "no-importance": "DR-LoRA, saliency from routing frequency only",
    "no-frequency": "DR-LoRA, saliency from rank importance only",
}
#: variants that take another variant's best LR instead of a sweep of their own: the
#: allocation ablations train exactly like DR-LoRA, so that only the allocation differs
LR_FROM = {v: "drlora" for v in ("random", "global", "gamma0", "no-importance", "no-frequency")}
MAIN_VARIANTS = ("lora", "drlora", "drlora-until")
ABLATION_VARIANTS = ("lora-rinit", "lora-2x", "random", "global")
DEFAULT_ARCHS = ("olmoe", "qwen2_moe", "mixtral")
DEFAULT_CORPORA = ("mixed", "c-headers", "copyright")
DEFAULT_LRS = (3e-3, 6e-3, 1e-2, 2e-2)
BASELINE = "lora"
RESULTS = "runs.jsonl"
SETTINGS = "settings.json"
#: flags added after a study of record started: the value its settings file implies
ADDED_LATER = {"new_slot_lr_scale": 1.0, "new_slot_lr_steps": 0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``drlora quality``."""
    g = p.add_argument_group("grid")
    g.add_argument(
        "--archs", nargs="+", default=list(DEFAULT_ARCHS), help="olmoe qwen2_moe mixtral"
    )
    g.add_argument("--corpora", nargs="+", default=list(DEFAULT_CORPORA),
                   help="target corpora (drlora train --corpus); 'mixed' concatenates several kinds")  # fmt: skip
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    g.add_argument("--steps", nargs="+", type=int, default=[600, 200],
                   help="run lengths; the ablations use the first")  # fmt: skip
    g.add_argument("--lrs", nargs="+", type=float, default=list(DEFAULT_LRS),
                   help="learning rates of the sweep")  # fmt: skip
    g.add_argument("--sweep-arch", default="olmoe")
    g.add_argument("--sweep-corpus", default="mixed")
    g.add_argument("--sweep-seed", type=int, default=0)
    g.add_argument(
        "--main-variants", nargs="+", default=list(MAIN_VARIANTS), choices=list(VARIANTS)
    )
    g.add_argument("--ablation-variants", nargs="*", default=list(ABLATION_VARIANTS),
                   choices=list(VARIANTS))  # fmt: skip
    g.add_argument("--ablation-archs", nargs="*", default=["olmoe"])
    g.add_argument("--short-archs", nargs="*", default=["olmoe"],
                   help="architectures of the main grid at the second and later --steps values")  # fmt: skip
    g = p.add_argument_group("model, data and method")
    g.add_argument("--size", default="mini", help="model size preset (tiny, mini, small)")
    g.add_argument("--pretrain-steps", type=int, default=300)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--corpus-bytes", type=int, default=4_000_000)
    g.add_argument("--val-blocks", type=int, default=128, help="validation split (LR choice)")
    g.add_argument("--test-blocks", type=int, default=320, help="test split (the reported loss)")
    g.add_argument("--r-init", type=int, default=4)
    g.add_argument("--r-target", type=int, default=8)
    g.add_argument("--r-max", type=int, default=16)
    g.add_argument("--p-grow", type=float, default=0.25)
    g.add_argument("--events", type=int, default=10, help="growth events of the paper schedule")
    from .cli import add_option_flags

    add_option_flags(g, grow_until_default=0.25)  # --grow-until: the drlora-until variant
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="runs/quality-v2")
    g.add_argument("--report", metavar="DIR", default=None,
                   help="only render DIR/quality.md from the finished runs in DIR")  # fmt: skip
    g.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (background runs)")


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RunKey:
    """One fine-tuning run; ``lr=None`` means "the variant's best LR from the sweep"."""

    phase: str  # "sweep", "main" or "ablation"
    steps: int
    arch: str
    corpus: str
    seed: int
    variant: str
    lr: float | None = None

    def ident(self, lr: float) -> str:
        """What identifies the run's result (a sweep run at the best LR is a main run too)."""
        return f"{self.steps}/{self.arch}/{self.corpus}/{self.seed}/{self.variant}/{lr:g}"


def paper_schedule(steps: int, events: int = 10) -> dict[str, int]:
    """The paper's proportions at ``steps`` (:func:`~drlora_kernels.scheduler.paper_proportions`)."""
    from .scheduler import paper_proportions

    return paper_proportions(steps, events)


def build_plan(args: argparse.Namespace) -> list[RunKey]:
    """Every run of the study, in execution order.

    Sweeps first (they decide the LRs; the shortest run length first, so its evidence comes
    early), then the main grids and the ablations seed by seed, so that a study stopped
    early has every cell at the first seeds rather than some cells at every seed.
    """
    plan: list[RunKey] = []
    for steps in sorted(args.steps):
        variants = list(dict.fromkeys(args.main_variants + (
            args.ablation_variants if steps == args.steps[0] else [])))  # fmt: skip
        for variant in (v for v in variants if v not in LR_FROM):
            for lr in args.lrs:
                plan.append(RunKey("sweep", steps, args.sweep_arch, args.sweep_corpus,
                                   args.sweep_seed, variant, lr))  # fmt: skip
    grids = [("main", steps, args.archs if i == 0 else args.short_archs, args.main_variants)
             for i, steps in enumerate(args.steps)]  # fmt: skip
    grids.append(("ablation", args.steps[0], args.ablation_archs, args.ablation_variants))
    for seed in args.seeds:
        for phase, steps, archs, variants in grids:
            for arch in archs:
                for corpus in args.corpora:
                    for variant in variants:
                        plan.append(RunKey(phase, steps, arch, corpus, seed, variant))
    return plan


def count_runs(plan: list[RunKey]) -> int:
    """Distinct runs of a plan: a main or ablation run in the sweep's cell at the swept
    variant's best LR is the sweep run itself."""
    swept = {(k.steps, k.arch, k.corpus, k.seed, k.variant) for k in plan if k.phase == "sweep"}
    return sum(
        k.phase == "sweep" or (k.steps, k.arch, k.corpus, k.seed, k.variant) not in swept
        for k in plan
    )


def best_lrs(records: list[dict[str, Any]]) -> dict[tuple[int, str], float]:
    """``(steps, variant) -> lr`` with the lowest validation loss among the sweep runs
    (a variant of :data:`LR_FROM` gets its source's)."""
    best: dict[tuple[int, str], tuple[float, float]] = {}
    for r in records:
        if r["phase"] != "sweep":
            continue
        k = (r["steps"], r["variant"])
        if k not in best or r["val_loss"] < best[k][0]:
            best[k] = (r["val_loss"], r["lr"])
    out = {k: lr for k, (_, lr) in best.items()}
    for (steps, variant), lr in list(out.items()):
        for follower, source in LR_FROM.items():
            if source == variant:
                out.setdefault((steps, follower), lr)
    return out


# ---------------------------------------------------------------- one run


def variant_config(
    variant: str, base, steps: int, *, grow_until: int | float, events: int = 10
) -> tuple[str, Any]:
    """``(method, DRLoRAConfig)`` of a variant, from the study's base config and run length."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    cfg = dataclasses.replace(base, **paper_schedule(steps, events))
    if variant.startswith("lora"):
        r = {"lora-rinit": cfg.r_init, "lora": cfg.r_target, "lora-2x": 2 * cfg.r_target}[variant]
        return "lora", dataclasses.replace(cfg, r_init=r, r_target=r, r_max=r, alpha=2.0 * r)
    changes = {
        "drlora": {},
        "drlora-until": {"grow_until": grow_until},
        "random": {},
        "global": {"allocation": "global"},
        "gamma0": {"gamma": 0.0},
        "no-importance": {"use_importance": False},
        "no-frequency": {"use_frequency": False},
    }[variant]
    return "drlora", dataclasses.replace(cfg, **changes)


def use_random_allocation(handle, seed: int) -> None:
    """Replace the controller's saliency by seeded uniform noise (the ``random`` variant)."""
    tracker = handle.controller.tracker
    gen = torch.Generator().manual_seed(10_007 * seed + 17)

    def saliency(ranks: torch.Tensor) -> torch.Tensor:
        L, P, E = ranks.shape
        return torch.rand(L, P * E, generator=gen, dtype=torch.float64)

    tracker.saliency = saliency


def time_averaged_rank(record: dict[str, Any], r_init: int, num_modules: int, steps: int) -> float:
    """Mean active rank per module, averaged over the optimizer steps of a run."""
    total, mean, last = 0.0, float(r_init), 0
    for ev in record["growth_events"]:
        step = ev["step"]  # grown after the backward of step ev["step"] - 1: in every later forward
        total += mean * (step - last)
        mean += sum(e["new_rank"] - e["old_rank"] for e in ev["events"]) / num_modules
        last = step
    total += mean * (steps - last)
    return total / steps


@dataclass
class Splits:
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def make_splits(corpus, seq_len: int, val_blocks: int, test_blocks: int) -> Splits:
    """Train / validation / test blocks: every k-th block held out, alternately val and test.

    ``k`` (between 2 and 10) is the largest that holds out enough blocks for both splits.

    Raises:
        ValueError: the corpus is too small for the asked splits.
    """
    from .train import data

    n_blocks = data.token_stream(corpus).numel() // (seq_len + 1)
    every = max(2, min(10, n_blocks // (2 * max(val_blocks, test_blocks))))
    blocks = data.make_blocks(corpus, seq_len, eval_every=every, max_eval_blocks=n_blocks)
    val, test = blocks.eval[1::2][:val_blocks], blocks.eval[0::2][:test_blocks]
    if val.shape[0] < val_blocks or test.shape[0] < test_blocks:
        raise ValueError(
            f"corpus {corpus.name!r} has {n_blocks} blocks of {seq_len + 1} tokens: too few for "
            f"{val_blocks} validation and {test_blocks} test blocks"
        )
    return Splits(blocks.train, val.contiguous(), test.contiguous())


class Study:
    """Runs the plan: caches corpora splits and base models, appends results, renders the report."""

    def __init__(self, args: argparse.Namespace) -> None:
        from .config import DRLoRAConfig

        self.args = args
        self.out = Path(args.output_dir)
        self.base = DRLoRAConfig(r_init=args.r_init, r_target=args.r_target, r_max=args.r_max,
                                 p_grow=args.p_grow, new_slot_lr_scale=args.new_slot_lr_scale,
                                 new_slot_lr_steps=args.new_slot_lr_steps)  # fmt: skip
        self._splits: dict[str, Splits] = {}
        self._bases: dict[tuple[str, int], str] = {}
        if args.no_progress:  # a background run logs one line per run, no bars
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()

    def settings(self) -> dict[str, Any]:
        skip = ("func", "command", "no_progress", "threads", "output_dir", "report", "dry_run")
        return {k: v for k, v in vars(self.args).items() if k not in skip}

    def splits(self, corpus: str) -> Splits:
        if corpus not in self._splits:
            from .train import data

            c = data.load_corpus(corpus, max_bytes=self.args.corpus_bytes)
            self._splits[corpus] = make_splits(c, self.args.seq_len, self.args.val_blocks,
                                               self.args.test_blocks)  # fmt: skip
        return self._splits[corpus]

    def base_model(self, arch: str, seed: int) -> str:
        from .train import loop
        from .train.pipeline import RunSpec, base_model

        if (arch, seed) not in self._bases:
            a = self.args
            pre = loop.PretrainConfig(steps=a.pretrain_steps, batch_size=2 * a.batch_size,
                                      seq_len=a.seq_len, seed=seed)  # fmt: skip
            spec = RunSpec(arch=arch, size=a.size, pretrain=pre, corpus_bytes=a.corpus_bytes)
            path, _ = base_model(spec, self.out / "base" / f"{arch}-seed{seed}",
                                 progress=not a.no_progress)  # fmt: skip
            self._bases[(arch, seed)] = path
        return self._bases[(arch, seed)]

    def run(self, key: RunKey, lr: float) -> dict[str, Any]:
        """Fine-tune one variant; returns its record (losses, ranks, wall time)."""
        from .train import loop, models

        a = self.args
        base_path = self.base_model(key.arch, key.seed)  # pre-trained once, not timed here
        splits = self.splits(key.corpus)
        t0, cpu0 = time.perf_counter(), time.process_time()
        method, drl = variant_config(key.variant, dataclasses.replace(self.base, seed=key.seed),
                                     key.steps, grow_until=a.grow_until, events=a.events)  # fmt: skip
        ft = loop.FinetuneConfig(
            method=method, steps=key.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=lr,
            warmup=max(1, round(0.03 * key.steps)), eval_interval=key.steps, seed=key.seed,
            drlora=drl,
        )  # fmt: skip
        model = models.load_model(base_path)
        routers: list[torch.Tensor] = []

        def on_attach(handle) -> None:
            routers.extend(p.detach().clone() for p in handle.router_parameters)
            if key.variant == "random":
                use_random_allocation(handle, key.seed)

        rec = loop.finetune(model, splits.train, splits.test, ft, progress=not a.no_progress,
                            on_attach=on_attach, initial_eval=False)  # fmt: skip
        handle = rec.pop("handle")
        val_loss = loop.evaluate(model, splits.val)
        router_change = max(
            (
                (p.detach() - q).abs().max().item()
                for p, q in zip(handle.router_parameters, routers)
            ),
            default=0.0,
        )
        modules = sum(pool.num_experts for layer in handle.pools for pool in layer)
        return {
            **dataclasses.asdict(key), "lr": lr, "method": method,
            "test_loss": rec["eval_loss"], "val_loss": val_loss,
            "rank_mean": rec["rank_stats"]["mean"], "rank_std": rec["rank_stats"]["std"],
            "rank_min": rec["rank_stats"]["min"], "rank_max": rec["rank_stats"]["max"],
            "time_averaged_rank": time_averaged_rank(rec, drl.r_init, modules, key.steps),
            "events": len(rec["growth_events"]), "router_change": router_change,
            "train_seconds": rec["train_seconds"], "wall_seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - cpu0,
            "schedule": {k: getattr(drl, k) for k in ("warmup_steps", "grow_every", "buffer_steps",
                                                       "grow_until")},
        }  # fmt: skip

    # ------------------------------------------------------------ the driver
    def check_settings(self) -> None:
        """Refuse to append to a directory whose finished runs used other settings."""
        path = self.out / SETTINGS
        now = self.settings()
        if path.is_file():
            before = {**ADDED_LATER, **json.loads(path.read_text())}
            if before != json.loads(json.dumps(now)):
                changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
                raise ValueError(
                    f"{self.out} holds runs made with other settings ({', '.join(changed)}); use "
                    "another --output-dir or the same flags"
                )
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(now, indent=1) + "\n")

    def execute(self, log=print) -> int:
        plan = build_plan(self.args)
        if self.args.dry_run:
            for key in plan:
                log(f"{key.phase:>8} {key.steps:>5} {key.arch:>9} {key.corpus:>10} seed {key.seed} "
                    f"{key.variant:>13} lr {'best' if key.lr is None else f'{key.lr:g}'}")  # fmt: skip
            log(f"{count_runs(plan)} distinct runs")
            return 0
        records = load_records(self.out)
        done = {r["ident"] for r in records}
        total_steps = sum(k.steps for k in plan)
        t_start, steps_done_here, steps_done, run_seconds = time.perf_counter(), 0, 0, 0.0
        for i, key in enumerate(plan):
            lr = key.lr if key.lr is not None else best_lrs(records).get((key.steps, key.variant))
            if lr is None:
                raise RuntimeError(f"no sweep result for {key.variant} at {key.steps} steps")
            ident = key.ident(lr)
            if ident in done:
                steps_done += key.steps
                continue
            rec = {"ident": ident, **self.run(key, lr)}
            records.append(rec)
            done.add(ident)
            with open(self.out / RESULTS, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            steps_done += key.steps
            steps_done_here += key.steps
            elapsed = time.perf_counter() - t_start
            run_seconds += rec["wall_seconds"]  # pre-training excluded: it is not per step
            eta = run_seconds / steps_done_here * (total_steps - steps_done)
            log(f"[{i + 1}/{len(plan)}] {key.phase:>8} {key.steps:>4} {key.arch:>9} {key.corpus:>10} "
                f"seed {key.seed} {key.variant:>12} lr {lr:<6g} val {rec['val_loss']:.4f} "
                f"test {rec['test_loss']:.4f} ({rec['wall_seconds']:.0f} s; elapsed "
                f"{elapsed / 60:.0f} min, ETA {eta / 60:.0f} min)")  # fmt: skip
            sys.stdout.flush()
        write_report(self.out)
        log(f"wrote {self.out / 'quality.md'}")
        return 0


def load_records(out: Path) -> list[dict[str, Any]]:
    """The finished runs in ``out/runs.jsonl`` (a torn last line from a kill is ignored)."""
    path = Path(out) / RESULTS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# ---------------------------------------------------------------- the report


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _ms(xs: list[float], digits: int = 4) -> str:
    m, s = _mean_std(xs)
    return "-" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _paired(by: dict, cells: list[tuple], a: str, b: str) -> list[float]:
    """``loss(a) - loss(b)`` over the (arch, corpus, seed) runs where both exist."""
    return [by[c + (a,)] - by[c + (b,)] for c in cells if c + (a,) in by and c + (b,) in by]


def _diff(d: list[float]) -> str:
    if not d:
        return "-"
    return f"{_ms(d)} ({sum(x < 0 for x in d)}/{len(d)})"


def summarize(records: list[dict[str, Any]], settings: dict[str, Any] | None = None) -> str:
    """The markdown report of a study's finished runs (partial results render too)."""
    lines: list[str] = []
    sweep = [r for r in records if r["phase"] == "sweep"]
    best = best_lrs(records)
    if sweep:
        lrs = sorted({r["lr"] for r in sweep})
        cell = sweep[0]
        lines += [
            f"### LR sweep (validation loss; {cell['arch']}, {cell['corpus']}, seed {cell['seed']}; "
            "best in bold)",
            "",
            "| steps | variant | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
            "|---|---|" + "---|" * len(lrs),
        ]
        table: dict[tuple[int, str], dict[float, float]] = {}
        for r in sweep:
            table.setdefault((r["steps"], r["variant"]), {})[r["lr"]] = r["val_loss"]
        for (steps, variant), row in sorted(table.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
            cells = []
            for lr in lrs:
                v = row.get(lr)
                text = "-" if v is None else f"{v:.4f}"
                cells.append(f"**{text}**" if best.get((steps, variant)) == lr else text)
            lines.append(f"| {steps} | {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    evaluated = [r for r in records if r["lr"] == best.get((r["steps"], r["variant"]))]
    for steps in sorted({r["steps"] for r in evaluated}, reverse=True):
        rs = [r for r in evaluated if r["steps"] == steps]
        lines += _grid_tables(rs, steps)
    lines += _wall_times(records)
    return "\n".join(lines)


def _grid_tables(rs: list[dict[str, Any]], steps: int) -> list[str]:
    by = {(r["arch"], r["corpus"], r["seed"], r["variant"]): r["test_loss"] for r in rs}
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rs)]
    archs = sorted({r["arch"] for r in rs})
    out = []
    # Main table: the archs that ran every variant of the main grid.
    main = [v for v in ("lora", "drlora", "drlora-until") if v in variants]
    cells = sorted({(r["arch"], r["corpus"]) for r in rs if r["variant"] in main})
    seeds = sorted({r["seed"] for r in rs})
    if cells and BASELINE in variants:
        head = main
        diffs = [v for v in main if v != BASELINE]
        out += [
            f"### {steps} steps: test loss (nats/byte, mean ± std over seeds {seeds}) and paired "
            "difference to LoRA (negative = better than LoRA; wins in brackets)",
            "",
            "| arch | corpus | " + " | ".join(head) + " | "
            + " | ".join(f"{v} − lora" for v in diffs) + " |",
            "|---|---|" + "---|" * (len(head) + len(diffs)),
        ]  # fmt: skip
        for a, c in cells:
            keys = [(a, c, s) for s in seeds]
            out.append(
                f"| {a} | {c} | "
                + " | ".join(_ms([by[k + (v,)] for k in keys if k + (v,) in by]) for v in head)
                + " | " + " | ".join(_diff(_paired(by, keys, v, BASELINE)) for v in diffs) + " |"
            )  # fmt: skip
        keys = [(a, c, s) for a, c in cells for s in seeds]
        out.append(  # losses of different corpora do not pool; their paired differences do
            "| **all** | | " + " | ".join("" for _ in head) + " | "
            + " | ".join(f"**{_diff(_paired(by, keys, v, BASELINE))}**" for v in diffs) + " |"
        )  # fmt: skip
        out.append("")
    # Ablation table: every variant that ran, on the archs that ran the ablations.
    ablation = [v for v in variants if v not in main]
    if ablation:
        abl_archs = [
            a for a in archs if any(r["arch"] == a and r["variant"] in ablation for r in rs)
        ]
        keys = sorted({(r["arch"], r["corpus"], r["seed"]) for r in rs if r["arch"] in abl_archs})
        corpora = sorted({k[1] for k in keys})
        out += [
            f"### {steps} steps, ablations ({', '.join(abl_archs)}): test loss per corpus (mean ± "
            "std over seeds) and paired differences over all corpora and seeds (wins in brackets)",
            "",
            "| variant | " + " | ".join(corpora) + " | − lora | − drlora | time-averaged rank |",
            "|---|" + "---|" * (len(corpora) + 3),
        ]
        tar: dict[str, list[float]] = {}
        for r in rs:
            if (r["arch"], r["corpus"], r["seed"]) in set(keys):
                tar.setdefault(r["variant"], []).append(r["time_averaged_rank"])
        for v in (v for v in variants if v in tar):
            per_corpus = [_ms([by[k + (v,)] for k in keys if k[1] == c and k + (v,) in by])
                          for c in corpora]  # fmt: skip
            out.append(
                f"| {v} | " + " | ".join(per_corpus) + " | "
                f"{_diff(_paired(by, keys, v, BASELINE)) if v != BASELINE else ''} | "
                f"{_diff(_paired(by, keys, v, 'drlora')) if v != 'drlora' else ''} | "
                f"{statistics.fmean(tar[v]):.2f} |"
            )
        out.append("")
    return out


def _wall_times(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    rows: dict[tuple[int, str], list[float]] = {}
    for r in records:
        rows.setdefault((r["steps"], r["variant"]), []).append(r["wall_seconds"])
    total = sum(r["wall_seconds"] for r in records)
    out = [
        f"### Wall time per run (s; {len(records)} runs, {total / 3600:.2f} h in total)",
        "",
        "| steps | variant | runs | mean | min | max |",
        "|---|---|---|---|---|---|",
    ]
    for (steps, v), xs in sorted(rows.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        out.append(
            f"| {steps} | {v} | {len(xs)} | {statistics.fmean(xs):.0f} | {min(xs):.0f} | {max(xs):.0f} |"
        )
    out.append("")
    return out


def write_report(out: Path) -> str:
    """Render ``out/quality.md`` from ``out/runs.jsonl``; returns the markdown."""
    out = Path(out)
    records = load_records(out)
    settings_path = out / SETTINGS
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    cmd = "drlora quality " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in settings.items()
    )
    text = (
        "# DR-LoRA vs LoRA quality study (v2)\n\n"
        f"Settings: `{cmd} --output-dir {out}`\n\n"
        f"Finished runs: {len(records)}"
        + (f" of {count_runs(build_plan(argparse.Namespace(**settings)))}" if settings else "")
        + ".\n\n" + summarize(records, settings) + "\n"
    )  # fmt: skip
    (out / "quality.md").write_text(text)
    return text


def check_args(args: argparse.Namespace) -> None:
    """Reject a study that cannot run, before any work.

    Raises:
        ValueError: naming the flag.
    """
    from .train.data import corpus_names
    from .train.models import ARCHITECTURES

    for name in ("steps", "seeds", "lrs", "archs", "corpora", "main_variants"):
        if not getattr(args, name):
            raise ValueError(f"--{name.replace('_', '-')} must not be empty")
    for arch in [*args.archs, *args.ablation_archs, *args.short_archs, args.sweep_arch]:
        if arch not in ARCHITECTURES:
            raise ValueError(f"architecture {arch!r} is not one of {ARCHITECTURES}")
    for corpus in [*args.corpora, args.sweep_corpus]:
        if corpus not in corpus_names():
            raise ValueError(f"corpus {corpus!r} is not one of {corpus_names()}")
    if BASELINE not in args.main_variants:
        raise ValueError(f"--main-variants must include the baseline {BASELINE!r}")
    if any(lr <= 0 for lr in args.lrs):
        raise ValueError(f"--lrs must be positive, got {args.lrs}")
    for steps in args.steps:
        paper_schedule(steps, args.events)  # raises for too few steps


def run(args: argparse.Namespace) -> int:
    """``drlora quality``: run (or resume) the study described by ``args``, or ``--report`` it."""
    if args.report is not None:
        if not (Path(args.report) / RESULTS).is_file():
            print(f"drlora quality: error: no {RESULTS} in {args.report}", file=sys.stderr)
            return 2
        print(write_report(Path(args.report)))
        return 0
    try:
        check_args(args)
        study = Study(args)
        if not args.dry_run:
            study.check_settings()
    except ValueError as exc:
        print(f"drlora quality: error: {exc}", file=sys.stderr)
        return 2
    return study.execute()
