"""The CUDA compile gate (tools/gate_cuda.py): its ptxas parsing and verdicts, and the real run.

The parser tests run everywhere (canned ``ptxas -v`` text). The gate itself compiles every
``csrc/cuda/*.cu`` for sm_80 and sm_90 (a few minutes on 2 cores) and is skipped, with the
reason, where nvcc or the CUTLASS headers (``pip install nvidia-cutlass``) are missing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "tools" / "gate_cuda.py"
_spec = importlib.util.spec_from_file_location("gate_cuda", _PATH)
gate = importlib.util.module_from_spec(_spec)
sys.modules["gate_cuda"] = gate  # dataclasses look their module up there
_spec.loader.exec_module(gate)

_REPORT = """\
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2112 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barPf' for 'sm_90'
ptxas info    : Function properties for _Z3barPf
    24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 400 bytes cmem[0]
"""


def test_parse_ptxas_reads_registers_spills_and_static_smem():
    rows = {r.kernel: r for r in gate.parse_ptxas("src", _REPORT)}
    assert set(rows) == {"_Z3fooPf", "_Z3barPf"}
    foo, bar = rows["_Z3fooPf"], rows["_Z3barPf"]
    assert (foo.cc, foo.registers, foo.static_smem, foo.spill_stores) == (80, 40, 2112, 0)
    assert (bar.cc, bar.registers, bar.stack, bar.spill_stores, bar.spill_loads) == (
        90,
        255,
        24,
        16,
        8,
    )


def test_judge_fails_spills_and_shared_memory_over_the_limit():
    rows = {r.kernel: r for r in gate.parse_ptxas("src", _REPORT)}
    gate.judge(rows["_Z3fooPf"])
    gate.judge(rows["_Z3barPf"])
    assert rows["_Z3fooPf"].problems == []
    assert any("spills" in p for p in rows["_Z3barPf"].problems)

    big = gate.Row(source="s", kernel="k", cc=80, registers=128, dynamic_smem=164 * 1024)
    gate.judge(big)
    assert any("shared memory" in p for p in big.problems)
    fits_on_h100 = gate.Row(source="s", kernel="k", cc=90, registers=128, dynamic_smem=164 * 1024)
    gate.judge(fits_on_h100)
    assert fits_on_h100.problems == []


def test_short_names_of_cutlass_and_helper_kernels():
    cutlass = "void cutlass::Kernel<cutlass::gemm::kernel::GemmGroupedPerGroupScale<... cutlass::bfloat16_t ...>>(...)"
    assert gate.short_name("gemm_row_col", cutlass) == "kRowCol<bf16>"
    mangled = (
        "_ZN7cutlass6KernelINS_4gemm6kernel24GemmGroupedPerGroupScaleINS1_6half_tEEEvNT_6ParamsE"
    )
    assert gate.short_name("gemm_shrink", mangled) == "kShrink<fp16>"
    helper = (
        "void drlora::cuda::kernels::detail::(anonymous namespace)::"
        "rank_operand_kernel<__half>(const float *, long)"
    )
    assert gate.short_name("grouped_setup", helper) == "rank_operand_kernel<fp16>"


_SKIP = None
if gate.find_nvcc() is None:
    _SKIP = "nvcc not found (CUDACXX, PATH, /usr/local/cuda/bin)"
elif gate.find_cutlass() is None:
    _SKIP = "CUTLASS headers not found (pip install nvidia-cutlass==4.2.0.0)"


@pytest.mark.slow
@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
def test_cuda_sources_compile_for_sm80_and_sm90_without_spills():
    rows, errors = gate.collect(jobs=2, log=print)
    print(gate.table(rows))
    assert not errors, "\n".join(errors)
    bad = [f"{r.kernel} sm_{r.cc}: {'; '.join(r.problems)}" for r in rows if r.problems]
    assert not bad, "\n".join(bad)
    # every CUTLASS kernel (4 kinds x 2 dtypes) was seen for both targets, with its smem
    cutlass = [r for r in rows if r.source.startswith("gemm_")]
    assert len(cutlass) == 4 * 2 * len(gate.TARGETS), gate.table(rows)
    assert all(r.dynamic_smem > 0 for r in cutlass)
