"""Peak memory of one phase of a run, on CUDA or CPU.

* CUDA: ``torch.cuda.max_memory_allocated`` after a reset (tensor memory only).
* CPU (Linux): the process's peak resident set size (``VmHWM``), reset at the
  start of the phase through ``/proc/self/clear_refs`` after returning freed heap
  to the OS (``malloc_trim``). This is whole-process RSS (Python, torch, the
  model, activations, allocator slack), so compare phases of one process side
  by side, not against other tools. Where the reset is not possible the value
  is the process's lifetime peak (``ru_maxrss``) and ``kind`` says so.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys

import torch


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Measure the peak memory of a ``with`` block; read ``.peak_bytes`` and ``.kind`` afterwards."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.kind = ""

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
            return self
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.kind = "cpu peak RSS of the process (VmHWM reset at start)"
        except OSError:
            self.kind = "cpu lifetime peak RSS of the process (reset unsupported)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        hwm = _vm_hwm_bytes() if "reset at start" in self.kind else None
        if hwm is None:
            scale = (
                1 if sys.platform == "darwin" else 1024
            )  # ru_maxrss: bytes on macOS, KiB on Linux
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        self.peak_bytes = int(hwm)
