"""Run metadata, the CSV of record and the ratio table printed after a run.

Every CSV row carries the provenance of its run (git sha, torch/triton/
transformers/peft versions, the native build, the machine, the thread count),
so a CSV file is self-describing wherever it ends up.

Ratios are taken **within one run** between rows of comparable workloads
(equal shapes, routing, dtype and mean rank; see :meth:`Workload.shape_key`):

* ``dynamic/uniform``   ours at a skewed rank profile / ours at the uniform one;
* ``ours/peft``         ours / PEFT at the uniform mean rank (the same rank budget):
                        ``peft-wba`` in op suites, real PEFT at model level;
* ``ours/masked-rmax``  ours / the paper's masked implementation;
* ``(base+lora)/base``  ours / the frozen base alone (fused, layer and model suites).

Below 1 means ours is faster, except ``(base+lora)/base`` which is the overhead
of training the adapters on top of the frozen model (>= 1).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path

import torch

COLUMNS = [
    "suite", "workload", "mode", "provider", "match", "max_rel_err",
    "median_ms", "min_ms", "max_ms", "repeats", "tokens_per_s", "peak_mem_mb",
    "E", "K", "N", "R", "top_k", "tokens", "rows", "rank_profile", "rank_skew", "mean_rank",
    "group_profile", "dtype", "device", "threads", "note", "mem_method",
    "git_sha", "torch", "triton", "transformers", "peft", "backend_build", "machine", "timestamp",
]  # fmt: skip

REPO = Path(__file__).resolve().parents[1]


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: say so in the row instead of failing
        return "n/a"


def _git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, text=True,
                             capture_output=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               text=True, capture_output=True, check=True).stdout.strip()  # fmt: skip
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    """``"<cpu model> x<cores>"`` plus the GPU name on CUDA."""
    desc = f"{_cpu_model()} x{os.cpu_count()}"
    if device.type == "cuda":
        desc += f"; {torch.cuda.get_device_name(device)}"
    return desc


def backend_build() -> str:
    """The native build in one compact JSON string (the keys that tell builds apart)."""
    import drlora_kernels

    info = drlora_kernels.build_info()
    keep = ("native_loaded", "native_with_cuda", "with_cuda", "cuda_archs", "build_mode",
            "git_sha", "torch_at_build", "not_loaded_reason")  # fmt: skip
    return json.dumps({k: info[k] for k in keep if k in info and info[k] not in ("", None)})


def run_metadata(device: torch.device) -> dict:
    return dict(
        device=str(device),
        threads=torch.get_num_threads(),
        git_sha=_git_sha(),
        torch=torch.__version__,
        triton=_version("triton"),
        transformers=_version("transformers"),
        peft=_version("peft"),
        backend_build=backend_build(),
        machine=machine(device),
        timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def write_csv(rows: list[dict], path: str | os.PathLike, meta: dict, append: bool = False) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not (append and path.exists())
    with path.open("w" if new else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**meta, **row})


def read_csv(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- ratios

_KEY = (
    "suite",
    "mode",
    "E",
    "K",
    "N",
    "R",
    "top_k",
    "tokens",
    "mean_rank",
    "group_profile",
    "dtype",
)


def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if v == v else None  # NaN -> None


def ratio_rows(rows: Iterable[dict]) -> list[dict]:
    """Ratio records ``{kind, suite, mode, workload, ours, other, ratio}`` from timed rows."""
    timed = [
        r for r in rows if _num(r.get("median_ms")) is not None and str(r.get("match")) == "True"
    ]
    by_key: dict[tuple, list[dict]] = {}
    for r in timed:
        by_key.setdefault(tuple(str(r[k]) for k in _KEY), []).append(r)
    out = []
    for group in by_key.values():
        ours = [r for r in group if r["provider"].startswith("ours[")]

        def find(provider, skew, group=group):
            cands = [r for r in group if r["provider"] == provider]
            if provider in ("peft", "peft-wba"):
                # PEFT has one rank for all experts: the same budget is its uniform mean rank
                skew = "uniform"
            exact = [r for r in cands if r["rank_skew"] == skew]
            if provider == "base":  # the frozen base does not depend on the ranks
                exact = exact or cands
            return (exact or [None])[0]

        for o in ours:
            t = float(o["median_ms"])
            pairs = []
            if o["rank_skew"] != "uniform":
                pairs.append(("dynamic/uniform", find(o["provider"], "uniform")))
            for kind, prov in (("ours/peft", "peft"), ("ours/peft", "peft-wba"),
                               ("ours/masked-rmax", "masked-rmax"),
                               ("(base+lora)/base", "base")):  # fmt: skip
                pairs.append((kind, find(prov, o["rank_skew"])))
            for kind, other in pairs:
                if other is None or other is o:
                    continue
                out.append(dict(kind=kind, suite=o["suite"], mode=o["mode"],
                                workload=o["workload"], ours=o["provider"],
                                other=f"{other['provider']}@{other['rank_profile']}",
                                ratio=t / float(other["median_ms"])))  # fmt: skip
    return out


def format_ratio_table(rows: Iterable[dict]) -> str:
    """A markdown table of every ratio of the run."""
    recs = ratio_rows(rows)
    if not recs:
        return "(no ratios: nothing was timed)"
    order = {"dynamic/uniform": 0, "ours/peft": 1, "ours/masked-rmax": 2, "(base+lora)/base": 3}
    recs.sort(key=lambda r: (order[r["kind"]], r["suite"], r["mode"], r["workload"], r["ours"]))
    lines = [
        "| ratio | suite | mode | workload | ours | vs | ratio |",
        "|---|---|---|---|---|---|---:|",
    ]
    for r in recs:
        lines.append(f"| {r['kind']} | {r['suite']} | {r['mode']} | {r['workload']} | {r['ours']} "
                     f"| {r['other']} | {r['ratio']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def format_time_table(rows: Iterable[dict]) -> str:
    """A markdown table of every row: time, throughput, memory and the verification verdict."""
    lines = ["| suite | mode | workload | provider | match | median ms (min-max) | tokens/s | peak MiB |",
             "|---|---|---|---|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        med = _num(r.get("median_ms"))
        if med is None:
            timing, tps, mem = "-", "-", "-"
        else:
            timing = f"{med:.2f} ({float(r['min_ms']):.2f}-{float(r['max_ms']):.2f})"
            tps = f"{float(r['tokens_per_s']):,.0f}"
            mem = f"{float(r['peak_mem_mb']):.1f}"
        lines.append(f"| {r['suite']} | {r['mode']} | {r['workload']} | {r['provider']} "
                     f"| {r['match']} | {timing} | {tps} | {mem} |")  # fmt: skip
    return "\n".join(lines)


HEADLINE = (("layer", "block/fwd+bwd"), ("model", "train-step"), ("ops", "fused/fwd+bwd"))


def format_summary(rows: Iterable[dict]) -> str:
    """The headline table: per suite and rank profile, ours and its ratios to the baselines.

    One line per ``(suite, mode, workload, ours[backend])`` of the headline modes (the
    ``layer`` block forward + backward, the ``model`` training step and the fused op
    forward + backward), with ``x base``, ``x uniform``, ``x PEFT``, ``x masked r_max``.
    """
    rows = list(rows)
    ratios: dict[tuple, dict[str, float]] = {}
    for r in ratio_rows(rows):
        ratios.setdefault((r["suite"], r["mode"], r["workload"], r["ours"]), {})[r["kind"]] = r[
            "ratio"
        ]
    lines = ["| suite | mode | workload | provider | median ms | tokens/s | peak MiB | x base "
             "| x uniform | x PEFT | x masked r_max |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for suite, mode in HEADLINE:
        for r in rows:
            if (r["suite"], r["mode"]) != (suite, mode) or not r["provider"].startswith("ours["):
                continue
            if _num(r.get("median_ms")) is None:
                continue
            rat = ratios.get((suite, mode, r["workload"], r["provider"]), {})

            def cell(kind, rat=rat):
                return f"{rat[kind]:.3f}" if kind in rat else "-"

            lines.append(
                f"| {suite} | {mode} | {r['workload']} | {r['provider']} | "
                f"{float(r['median_ms']):.1f} | {float(r['tokens_per_s']):,.0f} | "
                f"{float(r['peak_mem_mb']):.1f} | {cell('(base+lora)/base')} | "
                f"{cell('dynamic/uniform')} | {cell('ours/peft')} | {cell('ours/masked-rmax')} |"
            )
    return "\n".join(lines)
