"""The ahead-of-time compile gate of the Triton kernels (``tools/gate_triton.py``), no GPU needed.

Each test runs the gate as a subprocess without ``TRITON_INTERPRET`` (this pytest process has
the interpreted kernels loaded; the gate needs the compiled ones) and checks its verdict and
its table: every default config of every kernel compiles for sm_80 and sm_90 within shared
memory and without spills, and 16-bit dots run on tensor cores (``mma`` / ``wgmma``).
Compiles are single-threaded, ~1 s of CPU each: the defaults at the OLMoE shapes (120
compiles, ~2 min) and at the Qwen3-MoE shapes in bf16 and TF32 (48) always run; the other
autotune candidates (~100 more) are ``slow``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

GATE = Path(__file__).resolve().parents[1] / "tools" / "gate_triton.py"


def _gate(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, str(GATE), "--quiet", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=GATE.parents[1],
    )


def _rows(stdout: str) -> list[dict[str, str]]:
    """The Markdown table of the gate as dicts keyed by the column names."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def _load_gate_module():
    spec = importlib.util.spec_from_file_location("gate_triton", GATE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gate_triton"] = mod  # dataclasses resolve annotations through it
    spec.loader.exec_module(mod)
    return mod


def test_every_default_config_compiles_within_limits_on_sm80_and_sm90():
    res = _gate("--configs", "default", "--shapes", "olmoe", "--markdown")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = _rows(res.stdout)
    assert len(rows) == 2 * 5 * 12  # targets x precisions x launches (7 calls, 12 kernels)
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
    assert {r["dtype"] for r in rows} == {"bf16", "fp16", "fp32-tf32", "fp32-ieee", "fp64"}
    kernels = {r["kernel"] for r in rows}
    assert kernels == {
        "grouped_lora_shrink_kernel",
        "grouped_lora_base_expand_kernel",
        "grouped_weight_grad_kernel",
        "weight_grad_reduce_kernel",
    }
    for r in rows:
        assert r["default"] == "yes" and r["status"] == "ok", r
        limit = {"sm_80": 166912, "sm_90": 232448}[r["target"]]
        assert r["spills (B)"] == "0" and int(r["smem (B)"]) <= limit, r
        if r["kernel"] != "weight_grad_reduce_kernel":  # the reduction has no dot
            # tensor cores except fp32 IEEE (FMAs); fp64 runs DMMA (mma.sync) on both targets
            tensor_core = {"sm_80": "mma", "sm_90": "wgmma"}[r["target"]]
            want = {"fp32-ieee": "fma", "fp64": "mma"}.get(r["dtype"], tensor_core)
            assert r["dot"] == want, r


def test_qwen3_moe_defaults_compile_in_bf16_and_tf32():
    # 128 experts: a wider expert lookup (BLOCK_E=128) than OLMoE's 64
    res = _gate("--configs", "default", "--shapes", "qwen3moe", "--precisions", "bf16,fp32-tf32",
                "--markdown")  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = _rows(res.stdout)
    assert len(rows) == 2 * 2 * 12 and {r["shape"] for r in rows} == {"qwen3moe"}
    assert all(r["status"] == "ok" for r in rows)


@pytest.mark.slow
def test_every_autotune_candidate_is_clean_or_pruned():
    # the pruner must agree with the compiler: every kept candidate compiles clean
    res = _gate("--configs", "alternatives", "--shapes", "olmoe",
                "--precisions", "bf16,fp32-tf32,fp32-ieee", "--markdown")  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = _rows(res.stdout)
    assert rows and all(r["status"] == "ok" or r["status"].startswith("pruned") for r in rows)
    pruned = [r for r in rows if r["status"].startswith("pruned")]
    assert pruned and {r["target"] for r in pruned} == {"sm_80"}, "some fit sm_90 but not sm_80"


def test_judge_fails_defaults_and_kept_configs_only():
    gate = _load_gate_module()
    limit = 166912

    def judged(**kw):
        row = gate.Row("k", "role", 80, "bf16", "cfg", **kw)
        gate._judge(row, limit)
        return row

    assert judged(default=True, kept=True, spill=8).status.startswith("FAIL")
    assert judged(default=False, kept=True, smem=limit + 1).status.startswith("FAIL")
    assert judged(default=False, kept=False, spill=8, smem=limit + 1).status.startswith("pruned")
    assert judged(default=False, kept=False, error="CompilationError: x").status.startswith("FAIL")
    assert judged(default=True, kept=True, regs=200).status == "ok"
    assert judged(default=True, kept=True, spill=-1).status.startswith("FAIL")  # no ptxas report
