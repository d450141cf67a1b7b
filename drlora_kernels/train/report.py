"""What a run leaves behind: the printed table, ``results.json`` and two PNGs.

* ``loss_curves.png``: held-out loss (solid) and smoothed training loss (faint)
  per method, against optimizer steps.
* ``ranks_heatmap.png``: final active rank per (layer, expert) for each adapted
  projection of the DR-LoRA run (the uniform LoRA run would be one flat colour).

Plots use matplotlib's Agg backend (no display needed); when matplotlib is not
installed the plots are skipped and the caller is told so.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.0f} MiB" if n else "-"


def format_table(results: dict[str, dict[str, Any]], baseline: str = "lora") -> str:
    """A fixed-width table of the methods' held-out loss, perplexity, speed, memory and ranks."""
    head = (
        f"{'method':<8} {'eval loss':>9} {'ppl':>7} {'tokens/s':>9} {'vs lora':>8} "
        f"{'peak mem':>9} {'LoRA params':>11} {'ranks mean/min/max/std':>24}"
    )
    lines = [head, "-" * len(head)]
    base_tps = results.get(baseline, {}).get("tokens_per_second")
    for name, r in results.items():
        rs = r["rank_stats"]
        rel = f"{r['tokens_per_second'] / base_tps:.2f}x" if base_tps else "-"
        ranks = f"{rs['mean']:.1f}/{rs['min']}/{rs['max']}/{rs['std']:.1f}"
        lines.append(
            f"{name:<8} {r['eval_loss']:>9.4f} {r['perplexity']:>7.3f} {r['tokens_per_second']:>9.0f} {rel:>8} "
            f"{_fmt_bytes(r['peak_memory_bytes']):>9} {r['active_lora_parameters']:>11,} {ranks:>24}"
        )
    return "\n".join(lines)


def format_settings(finetune) -> str:
    """One line: the fine-tuning settings a comparison table was made with.

    Args:
        finetune: the :class:`~drlora_kernels.train.loop.FinetuneConfig` of the runs.
    """
    from ..pool import lora_scale

    d = finetune.drlora
    scale = lora_scale(d.alpha, d.r_target, d.scaling)
    until = "" if d.grow_until is None else f", grow_until {d.grow_until}"
    warmup = d.warmup_steps if d.warmup_steps is not None else "3%"
    return (
        f"settings: {finetune.steps} steps x batch {finetune.batch_size} x {finetune.seq_len} "
        f"tokens, lr {finetune.lr:g} (cosine, {finetune.warmup} warmup steps); DR-LoRA ranks "
        f"{d.r_init} -> {d.r_target} (r_max {d.r_max}), growth from step {warmup} every "
        f"{d.grow_every}, buffer {d.buffer_steps}, p_grow {d.p_grow:g}{until}; LoRA at rank "
        f"{d.r_target}; alpha {d.alpha:g} (scale {scale:g})"
    )


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON (non-finite floats become ``null``)."""

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    with open(path, "w") as fh:
        json.dump(clean(payload), fh, indent=1)
        fh.write("\n")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_loss_curves(
    results: dict[str, dict[str, Any]], path: str | os.PathLike, title: str = ""
) -> bool:
    """Held-out and smoothed training loss per method; returns False when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    colors = {"lora": "tab:blue", "drlora": "tab:orange", "masked": "tab:green"}
    styles = {"masked": (0, (4, 3))}  # masked equals drlora: dash it so both stay visible
    for name, r in results.items():
        c = colors.get(name)
        steps, train = zip(*r["train_curve"])
        window = max(1, len(train) // 20)
        ax.plot(steps, _smooth(list(train), window), color=c, alpha=0.3, lw=1)
        es, ev = zip(*r["eval_curve"])
        ax.plot(
            es,
            ev,
            color=c,
            lw=2,
            ls=styles.get(name, "-"),
            marker="o",
            ms=3,
            label=f"{name} (held-out)",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(title or "fine-tuning loss: held-out (markers), training (faint, smoothed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_rank_heatmap(rank_stats: dict[str, Any], path: str | os.PathLike, title: str = "") -> bool:
    """Final rank per (layer, expert), one panel per adapted projection; False without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    import numpy as np

    ranks = np.asarray(rank_stats["ranks"])  # [L, P, E]
    L, P, E = ranks.shape
    names = rank_stats.get("projections", [[f"pool {p}" for p in range(P)]])[0]
    fig, axes = plt.subplots(
        1,
        P,
        figsize=(1.6 + 0.6 * E * P, 1.6 + 0.5 * L),
        dpi=110,
        squeeze=False,
        layout="constrained",
    )
    vmin, vmax = int(ranks.min()), int(ranks.max())
    for p in range(P):
        ax = axes[0, p]
        im = ax.imshow(ranks[:, p, :], cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        for layer in range(L):
            for e in range(E):
                v = ranks[layer, p, e]
                ax.text(e, layer, str(v), ha="center", va="center", fontsize=7,
                        color="white" if v < (vmin + vmax) / 2 else "black")  # fmt: skip
        ax.set_title(names[p] if p < len(names) else f"pool {p}", fontsize=10)
        ax.set_xlabel("expert")
        if p == 0:
            ax.set_ylabel("layer")
        ax.set_xticks(range(E))
        ax.set_yticks(range(L))
    fig.colorbar(im, ax=axes[0, :].tolist(), shrink=0.9, label="active rank")
    fig.suptitle(title or "DR-LoRA final ranks")
    fig.savefig(path)
    plt.close(fig)
    return True
