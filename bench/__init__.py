"""Throughput harness for drlora_kernels: ``python -m bench --help``.

Suites (``--suite``): ``ops`` (grouped LoRA ops), ``layer`` (one SwiGLU MoE
expert block), ``model`` (a tiny OLMoE training step) and ``scaling`` (over
tokens and mean rank). Every provider is verified against the reference
before it is timed; see ``bench/README.md``.

Importing this package sets ``TRITON_INTERPRET=1`` when no CUDA device is
present (before anything imports Triton), as ``tests/conftest.py`` does, so
the Triton backend can be verified on CPU machines (with autotuning reduced to
one config there: ``DRLORA_TRITON_AUTOTUNE=0``).
"""

from __future__ import annotations

import os

try:  # must run before drlora_kernels (and so triton) is imported
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("DRLORA_TRITON_AUTOTUNE", "0")
except ImportError:  # pragma: no cover - torch is a hard dependency of the package
    pass

SUITES = ("ops", "layer", "model", "scaling")

__all__ = ["SUITES"]
