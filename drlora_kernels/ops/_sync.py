"""May the ops read a tensor's values on the host? One decision, in one place.

Reading an accelerator tensor's values on the host (``.item()``, ``.tolist()``,
``bool(t)``, ``int(t)``) waits for the device to finish everything queued before
it: a host sync that stalls the training step. The value checks of the ops
(ranks in range, offsets monotone, expert ids in range, a finite scale) therefore
read values on the host only when that is free or asked for:

* CPU tensors: free, checked eagerly with a ``ValueError`` naming the bad entry;
* ``DRLORA_CHECK=1``: a debug mode, eager host checks on every device;
* otherwise (CUDA and other accelerators), and always while ``torch.compile``
  traces: device-side asserts (``torch._assert_async``), which never sync and
  are kept in compiled graphs, so a compiled graph cannot return a silent wrong
  result for bad ranks or offsets either.

:func:`simulate_accelerator` makes CPU tensors take the accelerator path, so a
test on a CPU-only machine can prove that a training step makes no host reads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_simulate_accelerator = False


def host_checks_enabled(t: torch.Tensor) -> bool:
    """Whether value checks may read ``t`` on the host (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False
    if os.environ.get("DRLORA_CHECK", "0") == "1":
        return True
    return t.device.type == "cpu" and not _simulate_accelerator


def device_assert(cond: torch.Tensor, msg: str) -> None:
    """Assert a one-element bool tensor on its device, without a host sync.

    On CUDA a failed assert is a device-side assert (the CUDA context is lost:
    rerun with ``DRLORA_CHECK=1`` for a ``ValueError`` naming the entry). On the
    CPU, and in compiled graphs, it raises ``RuntimeError(msg)``. ``msg`` must not
    contain double quotes or backslashes (Inductor writes it into generated code).
    """
    torch._assert_async(cond, msg)


@contextlib.contextmanager
def simulate_accelerator() -> Iterator[None]:
    """Test hook: treat every tensor as an accelerator tensor (no host reads in value checks)."""
    global _simulate_accelerator
    old, _simulate_accelerator = _simulate_accelerator, True
    try:
        yield
    finally:
        _simulate_accelerator = old
