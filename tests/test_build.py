"""What the native build produced: ``build_info()`` is honest, and a CUDA-off build cannot hide.

If ``nvcc`` exists on this machine, the extension must have been compiled with
the CUDA kernels (CI builds with ``DRLORA_BUILD_NATIVE=1``): a build that
silently skipped them fails here. ``DRLORA_WITH_CUDA=0`` is the one documented
way to opt out, and it is recorded in the build metadata.
"""

from __future__ import annotations

import os
import shutil

import pytest

import drlora_kernels
from drlora_kernels import _native
from drlora_kernels.ops import available_backends


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None


def test_build_info_keys():
    info = drlora_kernels.build_info()
    for key in (
        "native_built",
        "native_loaded",
        "native_with_cuda",
        "not_loaded_reason",
        "with_cuda",
        "auto_order",
    ):
        assert key in info, f"build_info() lacks {key!r}: {info}"
    assert info["auto_order"]["cuda"].startswith("triton"), info["auto_order"]
    if not info["native_loaded"]:
        assert info["not_loaded_reason"], "an unloaded extension must say why"


def test_native_backend_availability_matches_build_info():
    ok, why = available_backends()["native"]
    assert ok == _native.HAS_NATIVE
    assert why


@pytest.mark.skipif(not _native.HAS_NATIVE, reason=f"native extension: {_native.NOT_LOADED_REASON}")
def test_extension_reports_its_compilers():
    info = drlora_kernels.build_info()
    assert info["ext_cpu_kernels"] is True
    assert info["ext_cxx_compiler"].strip(), info
    assert info["ext_with_cuda"] == info["native_with_cuda"]
    if info["ext_with_cuda"]:
        assert info["ext_cuda_compiler"].startswith("NVIDIA"), info
        assert info["ext_cuda_archs"], info


@pytest.mark.skipif(not _native.HAS_NATIVE, reason=f"native extension: {_native.NOT_LOADED_REASON}")
@pytest.mark.skipif(_nvcc() is None, reason="no nvcc on this machine")
def test_cuda_objects_built_when_nvcc_exists():
    info = drlora_kernels.build_info()
    if not info.get("with_cuda") and info.get("cuda_opt_out"):
        pytest.skip("built with DRLORA_WITH_CUDA=0 (recorded in the build metadata)")
    assert info["ext_with_cuda"], (
        f"nvcc exists ({_nvcc()}) but the extension was built without the CUDA kernels: {info}"
    )
    assert _native.HAS_NATIVE_CUDA
