"""Turn a bench CSV into PNGs: ``python -m bench.plot bench/results/cpu.csv [--out bench/plots]``.

* ``<name>-rank.png``    throughput (tokens/s) vs mean rank per provider (``scaling`` suite);
  ours should fall with the active ranks, masked r_max stay flat at its r_max cost.
* ``<name>-tokens.png``  step time vs tokens per provider (``scaling`` suite).
* ``<name>-skew.png``    time relative to the frozen base per rank skew and provider
  (``layer`` fwd+bwd and ``model`` train-step suites): the cost of dynamic ranks.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from .report import read_csv

SKEW_ORDER = ("uniform", "ragged", "zipf", "rmaxfew")


def _timed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("median_ms") not in ("", None) and r.get("match") == "True"]


def plot_rank(rows: list[dict], path: Path) -> bool:
    import matplotlib.pyplot as plt

    sel = [
        r
        for r in _timed(rows)
        if r["suite"] == "scaling" and r["workload"].startswith("scaling-rank")
    ]
    if not sel:
        return False
    lines = defaultdict(list)
    for r in sel:
        lines[(r["provider"], r["rank_skew"])].append(
            (int(r["mean_rank"]), float(r["tokens_per_s"]))
        )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (prov, skew), pts in sorted(lines.items()):
        pts.sort()
        ax.plot(*zip(*pts), marker="o", linestyle="-" if skew == "uniform" else "--",
                label=f"{prov} ({skew})")  # fmt: skip
    r0 = sel[0]
    ax.set(xlabel="mean active rank", ylabel="tokens / s (fwd+bwd)",
           title=f"fused grouped LoRA op, E={r0['E']} K={r0['K']} N={r0['N']} r_max={r0['R']}, "
                 f"{r0['tokens']} tokens, {r0['device']}")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_tokens(rows: list[dict], path: Path) -> bool:
    import matplotlib.pyplot as plt

    sel = [
        r
        for r in _timed(rows)
        if r["suite"] == "scaling" and r["workload"].startswith("scaling-tokens")
    ]
    if not sel:
        return False
    lines = defaultdict(list)
    for r in sel:
        lines[(r["provider"], r["rank_skew"])].append((int(r["tokens"]), float(r["median_ms"])))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (prov, skew), pts in sorted(lines.items()):
        pts.sort()
        ax.plot(*zip(*pts), marker="o", linestyle="-" if skew == "uniform" else "--",
                label=f"{prov} ({skew})")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms per fwd+bwd",
           title=f"fused grouped LoRA op, mean rank {sel[0]['mean_rank']}, {sel[0]['device']}")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_skew(rows: list[dict], path: Path) -> bool:
    import matplotlib.pyplot as plt

    panels = [("layer", "block/fwd+bwd"), ("model", "train-step")]
    data = {}
    for suite, mode in panels:
        sel = [r for r in _timed(rows) if r["suite"] == suite and r["mode"] == mode]
        base = [float(r["median_ms"]) for r in sel if r["provider"] == "base"]
        if sel and base:
            data[(suite, mode)] = (sel, min(base))
    if not data:
        return False
    fig, axes = plt.subplots(1, len(data), figsize=(6.5 * len(data), 4.5), squeeze=False)
    for ax, ((suite, mode), (sel, base_ms)) in zip(axes[0], data.items()):
        provs = sorted({r["provider"] for r in sel if r["provider"] != "base"},
                       key=lambda p: (not p.startswith("ours["), p))  # fmt: skip
        skews = [s for s in SKEW_ORDER if any(r["rank_skew"] == s for r in sel)]
        width = 0.8 / max(1, len(provs))
        for i, prov in enumerate(provs):
            xs, ys = [], []
            for j, skew in enumerate(skews):
                hit = [r for r in sel if r["provider"] == prov and r["rank_skew"] == skew]
                if hit:
                    xs.append(j + i * width)
                    ys.append(float(hit[0]["median_ms"]) / base_ms)
            ax.bar(xs, ys, width=width, label=prov)
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(skews))], skews)
        ax.set(
            ylabel="time / frozen base", title=f"{suite} {mode} (mean rank {sel[0]['mean_rank']})"
        )
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("csv", help="a CSV written by python -m bench")
    p.add_argument(
        "--out", default=str(Path(__file__).resolve().parent / "plots"), help="output folder"
    )
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    import matplotlib

    matplotlib.use("Agg")
    rows = read_csv(args.csv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.csv).stem
    made = []
    for kind, fn in (("rank", plot_rank), ("tokens", plot_tokens), ("skew", plot_skew)):
        path = out / f"{stem}-{kind}.png"
        if fn(rows, path):
            made.append(str(path))
    print("\n".join(made) if made else "plot: nothing to plot (no timed scaling/layer/model rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
