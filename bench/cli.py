"""Command line of the harness: ``python -m bench [--smoke] [--suite ...] [--device ...] [--out ...]``.

Runs the chosen suites in one process, writes one CSV (every row verified,
timed rows with provenance), prints the time and ratio tables, and exits
non-zero when any provider disagreed with the reference or raised.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import SUITES

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Verify every provider against the reference, then time them side by side "
        "(suites: ops, layer, model, scaling). Exits 1 if any provider disagrees.",
    )
    p.add_argument("--suite", choices=(*SUITES, "all"), default="all",
                   help="which suite to run (default: all)")  # fmt: skip
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")  # fmt: skip
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, few repeats, one thread: seconds; checks the harness and "
                        "every provider's agreement with the reference (CI)")  # fmt: skip
    p.add_argument("--out", default=None,
                   help="CSV path (default: bench/results/<device>[-smoke].csv)")  # fmt: skip
    p.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: all cores; 1 with --smoke)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=None,
                   help="at least this many interleaved timing rounds per workload (default 5; "
                        "more rounds steady the medians on a noisy machine, at the cost of time)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    threads = args.threads or (1 if args.smoke else None)
    if threads is not None:
        # A smoke run checks agreement, not speed; one thread keeps it fast and steady on a
        # loaded machine (OpenMP threads competing for busy cores slow tiny ops 100x).
        torch.set_num_threads(threads)

    from .model_suite import run_model
    from .report import (
        format_ratio_table,
        format_summary,
        format_time_table,
        run_metadata,
        write_csv,
    )
    from .runner import Context
    from .suites import run_layer, run_ops, run_scaling

    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    if args.rounds is not None and args.rounds < 1:
        print(f"bench: --rounds must be >= 1, got {args.rounds}", file=sys.stderr)
        return 2
    ctx = Context.create(device, args.smoke, log=log, min_rounds=args.rounds)
    log(f"bench: device={device} threads={torch.get_num_threads()} smoke={args.smoke} "
        f"backends={ctx.backends}")  # fmt: skip
    for name, why in ctx.skipped.items():
        log(f"bench: backend {name} skipped: {why}")

    runners = {"ops": run_ops, "layer": run_layer, "scaling": run_scaling, "model": run_model}
    suites = SUITES if args.suite == "all" else (args.suite,)
    start, rows = time.perf_counter(), []
    for suite in suites:
        rows += runners[suite](ctx)
    elapsed = time.perf_counter() - start

    out = (
        Path(args.out)
        if args.out
        else DEFAULT_OUT / f"{device}{'-smoke' if args.smoke else ''}.csv"
    )
    write_csv(rows, out, run_metadata(ctx.device), append=args.append)
    print("\n" + format_time_table(rows) + "\n")
    print(format_ratio_table(rows) + "\n")
    print("Headline (ours vs the baselines, same run):\n\n" + format_summary(rows) + "\n")
    bad = [r for r in rows if not r["match"]]
    print(f"bench: {len(rows)} rows ({len(rows) - len(bad)} verified) in {elapsed:.0f} s -> {out}")
    for r in bad:
        print(f"bench: MISMATCH {r['suite']} {r['workload']} {r['mode']} {r['provider']}: "
              f"{r['note']}", file=sys.stderr)  # fmt: skip
    return 1 if bad else 0
