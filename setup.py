"""Build the optional native extension ``drlora_kernels._C`` with CMake.

Package metadata lives in ``pyproject.toml``; this file only drives CMake.

Environment gates (see README, "Environment variables"):

* ``DRLORA_BUILD_NATIVE=0``    skip the extension (pure-Python install, torch not needed to build);
* ``DRLORA_BUILD_NATIVE=auto`` (default) try to build; if the CUDA part fails, retry CPU-only;
  warn and continue on failure (the reason lands in ``build_info()``);
* ``DRLORA_BUILD_NATIVE=1``    a build failure is fatal (CI, releases), and so is nvcc being
  present without the CUDA kernels getting built;
* ``DRLORA_CUDA_ARCHS``        CUDA archs, e.g. ``"80;90"`` (default ``80;90``), used when nvcc is found
  (``CUDACXX``, ``PATH`` or ``/usr/local/cuda/bin/nvcc``; never a GPU query);
* ``DRLORA_WITH_CUDA=0``       do not compile the CUDA sources even when nvcc is found;
  the CUDA sources need the CUTLASS headers of the ``nvidia-cutlass`` wheel (``make install``
  installs it; CMake finds them with a Python query, or ``DRLORA_CUTLASS_INCLUDE_DIR=...``):
  nvcc without them is a build failure (strict) or a CPU-only build (auto);
* ``MAX_JOBS``                 parallel build jobs; ``DEBUG=1`` for a debug build.

The native build needs the installed torch: install with ``--no-build-isolation``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
MODE = os.environ.get("DRLORA_BUILD_NATIVE", "auto").strip().lower()
if MODE not in {"0", "1", "auto"}:
    raise SystemExit(f"DRLORA_BUILD_NATIVE must be 0, 1 or auto, got {MODE!r}")


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path = ROOT) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


def _git_sha() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True
        ).strip()
    except Exception:
        return "unknown"


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        with_cuda = os.environ.get("DRLORA_WITH_CUDA", "1") != "0"
        try:
            self._build_cmake(ext, with_cuda)
            return
        except Exception as exc:  # CalledProcessError, missing torch, missing cmake ...
            if MODE == "1":
                raise
            first_error = exc
        if with_cuda:
            # auto mode: a CUDA failure should still leave users the C++ CPU kernels
            warnings.warn(
                f"drlora_kernels: build with CUDA failed ({first_error}); retrying CPU-only.",
                stacklevel=1,
            )
            try:
                self._build_cmake(ext, False, cuda_failure=str(first_error))
                return
            except Exception as exc:
                first_error = exc
        warnings.warn(
            f"drlora_kernels: native extension not built ({first_error}); the reference and "
            "Triton backends still work. Set DRLORA_BUILD_NATIVE=1 to make this fatal.",
            stacklevel=1,
        )
        _write_build_meta(built=False, reason=str(first_error))

    def _build_cmake(self, ext: CMakeExtension, with_cuda: bool, cuda_failure: str = "") -> None:
        import pybind11
        import torch
        import torch.utils

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        ext_dir = ext_path.parent
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if os.environ.get("DEBUG", "0") == "1" else "Release"
        archs = os.environ.get("DRLORA_CUDA_ARCHS", "80;90")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_dir}",
            f"-DDRLORA_EXT_FILENAME={ext_path.name}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
            f"-DDRLORA_CUDA_ARCHS={archs}",
            f"-DDRLORA_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        nvcc = _find_nvcc() if with_cuda else None
        if nvcc:
            # point CMake at the nvcc we found (it may not be on PATH, e.g. /usr/local/cuda/bin)
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            cutlass = os.environ.get("DRLORA_CUTLASS_INCLUDE_DIR", "")
            if cutlass:
                args.append(f"-DDRLORA_CUTLASS_INCLUDE_DIR={cutlass}")
            elif not _has_cutlass_wheel():
                # CMake (which finds the headers itself) stops too; this message reaches the
                # auto-mode warning and build_info()["cuda_not_built_reason"]
                raise RuntimeError(
                    f"nvcc found at {nvcc} but not the CUTLASS headers the CUDA kernels need: "
                    f"{sys.executable} -m pip install nvidia-cutlass==4.2.0.0 "
                    "(or set DRLORA_WITH_CUDA=0 for a CPU-only build)"
                )
        if shutil.which("ninja") or _has_module("ninja"):
            args.append("-GNinja")
            if not shutil.which("ninja"):
                import ninja

                args.append(f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        cmake = _cmake_exe()
        subprocess.run([cmake, "-S", ext.sourcedir, "-B", str(build_temp), *args], check=True)
        subprocess.run([cmake, "--build", str(build_temp), "--config", cfg, "-j", jobs], check=True)
        info_file = build_temp / "drlora_build_info.txt"
        info = dict(
            line.split("=", 1) for line in info_file.read_text().splitlines() if "=" in line
        )
        if nvcc and info.get("WITH_CUDA") != "ON":
            # nvcc exists but CMake did not enable CUDA: never let that pass silently
            raise RuntimeError(f"nvcc found at {nvcc} but CMake built without the CUDA kernels")
        _write_build_meta(
            built=True,
            reason="",
            cmake_info=info,
            torch_version=torch.__version__,
            nvcc=nvcc or "",
            cuda_failure=cuda_failure,
        )
        # editable installs look for the extension in the source tree
        if self.inplace or self.editable_mode:
            target = ROOT / "drlora_kernels" / ext_path.name
            if target.resolve() != ext_path:
                # copy then rename: overwriting a loaded .so in place crashes running processes (SIGBUS)
                tmp = target.with_name(target.name + ".tmp")
                shutil.copy2(ext_path, tmp)
                os.replace(tmp, target)


def _has_module(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def _has_cutlass_wheel() -> bool:
    """Whether the ``nvidia-cutlass`` wheel (module ``cutlass_library``) is installed."""
    import importlib.util

    return importlib.util.find_spec("cutlass_library") is not None


def _find_nvcc() -> str | None:
    """nvcc from CUDACXX, PATH or the default toolkit location (never a GPU query)."""
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).is_file():
            return cand
    return None


def _cmake_exe() -> str:
    found = shutil.which("cmake")
    if found:
        return found
    import cmake  # the PyPI wheel

    return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")


def _write_build_meta(
    *,
    built: bool,
    reason: str,
    cmake_info: dict | None = None,
    torch_version: str = "",
    nvcc: str = "",
    cuda_failure: str = "",
) -> None:
    info = cmake_info or {}
    meta = {
        "native_built": built,
        "not_built_reason": reason,
        "with_cuda": info.get("WITH_CUDA", "OFF") == "ON",
        "cuda_archs": info.get("CUDA_ARCHS", ""),
        "cuda_compiler": info.get("CUDA_COMPILER", ""),
        "cxx_compiler": info.get("CXX_COMPILER", ""),
        "torch_at_build": torch_version,
        "git_sha": _git_sha(),
        "build_mode": MODE,
        # DRLORA_WITH_CUDA=0 is the one explicit way to skip the CUDA sources
        "cuda_opt_out": os.environ.get("DRLORA_WITH_CUDA", "1") == "0",
        "nvcc_at_build": nvcc,
        # auto mode only: why the CUDA kernels were dropped (the CPU build then succeeded)
        "cuda_not_built_reason": cuda_failure,
    }
    body = (
        '"""Written by setup.py at build time: what the native build produced."""\n\nBUILD_META = '
        + repr(meta)
        + "\n"
    )
    (ROOT / "drlora_kernels" / "_build_meta.py").write_text(body)


ext_modules = [] if MODE == "0" else [CMakeExtension("drlora_kernels._C")]
if MODE == "0":
    _write_build_meta(built=False, reason="DRLORA_BUILD_NATIVE=0 at install time")

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
