"""Run a function on 2 CPU processes (gloo) and collect what each returns.

``run_on_processes(fn, tmp_path, *args)`` starts ``WORLD`` processes with ``torch.multiprocessing``
(spawn), initialises a gloo process group in each, calls ``fn(*args)`` and returns the list of
per-rank results (``torch.save``-able). One process raising fails the call (the others are
stopped). ``fn`` must be importable (a module-level function).
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _worker(rank: int, fn, args, out_dir: str, world: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    store = os.path.join(out_dir, "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = fn(*args)
    except BaseException:
        Path(out_dir, f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_on_processes(fn, tmp_path: Path, *args, world: int = WORLD) -> list:
    """``[fn(*args) on rank r for r in range(world)]``, each in its own process of a gloo group."""
    out = Path(tmp_path) / f"spawn-{fn.__name__}"
    out.mkdir(parents=True, exist_ok=True)
    try:
        mp.spawn(_worker, args=(fn, args, str(out), world), nprocs=world, join=True)
    except mp.ProcessRaisedException as exc:
        errors = sorted(out.glob("error*.txt"))
        detail = errors[0].read_text() if errors else str(exc)
        raise RuntimeError(f"a process failed:\n{detail}") from None
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def first_error(tmp_path: Path, fn) -> str:
    """The traceback text a failed process of :func:`run_on_processes` left (``""`` if none)."""
    errors = sorted((Path(tmp_path) / f"spawn-{fn.__name__}").glob("error*.txt"))
    return errors[0].read_text() if errors else ""
