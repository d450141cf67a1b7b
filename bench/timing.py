"""Timing and peak-memory measurement, one policy per device.

* CUDA: ``triton.testing.do_bench`` (flushes L2, synchronises, repeats for a
  fixed time) per provider; all repeat times are kept.
* CPU: a careful ``perf_counter`` loop. The providers of one workload are timed
  **interleaved** (round-robin, one call each per round) after a warm-up, with
  the garbage collector off, so the noise of a shared machine hits every
  provider alike and the ratios stay meaningful even when absolute times drift.

Peak memory is the largest amount of memory allocated *during* one call above
what was live before it:

* CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` around the call;
* CPU: the torch profiler's allocation events (``profile_memory=True``), summed
  in time order, maximum of the running sum. This counts tensors allocated by
  PyTorch's CPU allocator (activations, gradients, workspaces), not Python
  objects or allocator caching, so it is the CPU analogue of the CUDA number.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import statistics
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Per-call wall time in milliseconds over ``repeats`` calls after warm-up."""

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    @classmethod
    def from_seconds(cls, times: list[float]) -> Timing:
        ms = [t * 1e3 for t in times]
        return cls(statistics.median(ms), min(ms), max(ms), len(ms))


@dataclass(frozen=True)
class TimingPolicy:
    """How long to measure: ``warmup`` calls, then at least ``min_repeats`` rounds and
    more until ``budget_s`` seconds (all providers together) or ``max_repeats`` rounds."""

    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 30
    budget_s: float = 6.0


SMOKE_POLICY = TimingPolicy(warmup=1, min_repeats=2, max_repeats=3, budget_s=0.2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[Hashable, Callable[[], object]], device: torch.device, policy: TimingPolicy
) -> dict[Hashable, Timing]:
    """Time every callable in ``fns``; returns ``{key: Timing}``."""
    if not fns:
        return {}
    if device.type == "cuda":
        return {name: _do_bench(fn, policy) for name, fn in fns.items()}
    for fn in fns.values():
        for _ in range(policy.warmup):
            fn()
    times: dict[Hashable, list[float]] = {name: [] for name in fns}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        deadline = time.perf_counter() + policy.budget_s
        for rnd in range(policy.max_repeats):
            if rnd >= policy.min_repeats and time.perf_counter() > deadline:
                break
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: Timing.from_seconds(t) for name, t in times.items()}


def _do_bench(fn: Callable[[], object], policy: TimingPolicy) -> Timing:
    from triton.testing import do_bench

    # do_bench returns milliseconds; "all" gives every repeat.
    ms = do_bench(fn, warmup=25, rep=100 if policy.budget_s >= 1 else 20, return_mode="all")
    return Timing(statistics.median(ms), min(ms), max(ms), len(ms))


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during one call of ``fn`` above what was live before it."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    return _cpu_peak_bytes(fn)


MEMORY_METHOD = {
    "cuda": "cuda max_memory_allocated - allocated before the call",
    "cpu": "torch profiler allocation events: max running sum during the call",
}


@contextlib.contextmanager
def _quiet_fd(fd: int):
    """Silence a file descriptor (Kineto prints start/stop lines on stderr)."""
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with _quiet_fd(2), contextlib.redirect_stderr(io.StringIO()):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for ev in sorted(events, key=lambda e: e.start_ns()):
        if ev.device_type() != torch.autograd.DeviceType.CPU:
            continue
        running += ev.nbytes()
        peak = max(peak, running)
    return peak
