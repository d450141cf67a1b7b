"""Verify-then-time machinery shared by every suite.

A suite turns one *family* (the rank profiles of one shape, in one mode) into
:class:`Candidate`\\ s (a provider at one profile with a timed ``step`` and an
``outputs`` call for verification). :func:`measure` verifies each candidate
against its reference, times all matching ones of the family interleaved in one
group (so every ratio the report takes is between calls measured side by side),
measures their peak memory and returns one result row each.
A candidate that mismatches or raises is recorded with ``match=False`` and not
timed; the command line exits non-zero when any such row exists.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from drlora_kernels.ops import BACKENDS, describe_backend

from .providers import ours
from .timing import MEMORY_METHOD, SMOKE_POLICY, TimingPolicy, peak_memory_bytes, time_interleaved
from .verify import compare


@dataclass
class Candidate:
    """A provider bound to one workload and mode.

    ``step()`` is what gets timed (one forward, forward+backward or training step);
    ``outputs()`` runs it once and returns the named tensors to verify;
    ``reference`` names the entry of the references dict to compare with;
    ``columns`` are the row's workload columns (set by the suite).
    """

    provider: str
    step: Callable[[], object]
    outputs: Callable[[], dict[str, torch.Tensor]]
    reference: str = "lora"
    columns: dict = field(default_factory=dict)


@dataclass
class Context:
    """Run-wide settings: device, smoke mode, the backends to use and the timing policy."""

    device: torch.device
    smoke: bool
    backends: list[str]
    policy: TimingPolicy
    skipped: dict[str, str] = field(default_factory=dict)
    verify_only: frozenset[str] = frozenset()
    log: Callable[[str], None] = print

    @classmethod
    def create(
        cls,
        device: str,
        smoke: bool,
        log: Callable[[str], None] = print,
        min_rounds: int | None = None,
    ) -> Context:
        dev = torch.device(device)
        backends, skipped = select_backends(dev, smoke)
        policy = SMOKE_POLICY if smoke else TimingPolicy()
        if min_rounds is not None:
            policy = dataclasses.replace(
                policy, min_repeats=min_rounds, max_repeats=max(policy.max_repeats, min_rounds)
            )
        # Triton's interpreter on a CPU is correct but not a speed: verify it, never time it.
        verify_only = frozenset(ours(b) for b in backends if b == "triton" and dev.type == "cpu")
        return cls(dev, smoke, backends, policy, skipped, verify_only, log)


def select_backends(device: torch.device, smoke: bool) -> tuple[list[str], dict[str, str]]:
    """The backends ``ours[...]`` runs on for ``device``, and why the others are skipped.

    Triton on a CPU runs in its interpreter: correct but thousands of times
    slower than compiled code, so it joins only ``--smoke`` runs there, and
    only to be verified (:attr:`Context.verify_only`).
    """
    chosen, skipped = [], {}
    for name in BACKENDS:
        ok, why = describe_backend(name).supports(device)
        if not ok:
            skipped[name] = why
            continue
        if name == "triton" and device.type == "cpu" and not smoke:
            skipped[name] = "Triton interpreter on CPU: verified (not timed) in --smoke only"
            continue
        chosen.append(name)
    return chosen, skipped


def measure(
    ctx: Context,
    candidates: list[Candidate],
    references: dict[str, Callable[[], dict[str, torch.Tensor]]],
    dtype: torch.dtype,
) -> list[dict]:
    """Verify every candidate, time the matching ones side by side, return one row each.

    ``tokens_per_s`` uses each candidate's ``columns["tokens"]``.
    """
    refs = {name: fn() for name, fn in references.items()}
    rows, timed = [], {}
    for i, cand in enumerate(candidates):
        row = dict(cand.columns, provider=cand.provider, match=False, max_rel_err=float("nan"),
                   note="")  # fmt: skip
        try:
            verdict = compare(cand.outputs(), refs[cand.reference], dtype)
            row.update(match=verdict.match, max_rel_err=verdict.max_rel_err, note=verdict.detail)
        except Exception as exc:  # recorded, not raised: the run reports every provider
            row["note"] = f"raised {type(exc).__name__}: {exc}"
            ctx.log(traceback.format_exc(limit=3))
        if cand.provider in ctx.verify_only:
            row["note"] = (row["note"] + "; " if row["note"] else "") + "verified only, not timed"
        elif row["match"]:
            timed[i] = cand.step
        if not row["match"]:
            ctx.log(f"  MISMATCH {row.get('workload')} {row.get('mode')} {cand.provider}: "
                    f"{row['note']}")  # fmt: skip
        rows.append(row)
    timings = time_interleaved(timed, ctx.device, ctx.policy)
    for i, row in enumerate(rows):
        t = timings.get(i)
        if t is None:
            continue
        row.update(
            median_ms=t.median_ms,
            min_ms=t.min_ms,
            max_ms=t.max_ms,
            repeats=t.repeats,
            tokens_per_s=row["tokens"] / (t.median_ms / 1e3),
            peak_mem_mb=peak_memory_bytes(timed[i], ctx.device) / 2**20,
            mem_method=MEMORY_METHOD[ctx.device.type],
        )
    return rows
