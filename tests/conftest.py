"""Test configuration: Triton runs in its interpreter on CPU-only machines.

``TRITON_INTERPRET=1`` must be set before anything imports triton, so it is
set here, at the top of the first file pytest loads.
"""

from __future__ import annotations

import os

os.environ.setdefault("DRLORA_TRITON_AUTOTUNE", "0")
try:  # set before triton is imported by anything
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import drlora_kernels  # noqa: E402
from drlora_kernels.ops import available_backends  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if not _HAS_CUDA:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny ops are fastest (and timing-stable) on one thread; restore torch's setting afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if _HAS_CUDA else "cpu")


def _backend_params():
    params = []
    for name, (ok, why) in available_backends().items():
        marks = [] if ok else [pytest.mark.skip(reason=f"{name} backend unavailable: {why}")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=_backend_params())
def backend(request) -> str:
    """Every backend; unavailable ones show up as skipped with the reason."""
    return request.param


@pytest.fixture
def build_info():
    return drlora_kernels.build_info()
