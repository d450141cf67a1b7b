"""The harness's providers under pytest-benchmark, for those who prefer it.

Not collected by the test suite (``testpaths = tests``); run it explicitly::

    python -m pytest bench/bench_pytest.py --benchmark-only            # CPU shapes
    BENCH_SMOKE=1 python -m pytest bench/bench_pytest.py --benchmark-only   # tiny shapes

Each case builds the same candidate as ``python -m bench`` (fused grouped op,
forward + backward; SwiGLU block, forward + backward), verifies it against the
reference first (a mismatch fails the case) and then lets pytest-benchmark time
``step()``. ``python -m bench`` stays the tool of record (interleaved timing,
memory, CSV, ratio table).
"""

from __future__ import annotations

import os

import pytest
import torch

from bench import suites
from bench.providers import provider_list
from bench.runner import Context
from bench.verify import compare
from bench.workloads import layer_workloads, ops_workloads

SMOKE = os.environ.get("BENCH_SMOKE", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CTX = Context.create(DEVICE, smoke=SMOKE, log=lambda s: None)
TIMED = [b for b in CTX.backends if f"ours[{b}]" not in CTX.verify_only]
PROVIDERS = provider_list(TIMED, fused=True)
OPS = [w for w in ops_workloads(DEVICE, SMOKE) if w.name.startswith("ops-gate_up@")]
LAYERS = layer_workloads(DEVICE, SMOKE)


def _run(benchmark, cand, refs, dtype):
    verdict = compare(cand.outputs(), refs[cand.reference](), dtype)
    assert verdict.match, f"{cand.provider} disagrees with the reference: {verdict.detail}"
    benchmark.extra_info["max_rel_err"] = verdict.max_rel_err
    benchmark(cand.step)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("workload", OPS, ids=lambda w: w.name)
def test_fused_op_fwd_bwd(benchmark, workload, provider):
    benchmark.group = f"ops {workload.name}"
    cands, refs = suites._ops_cases(CTX, workload, "fused/fwd+bwd", [provider])
    _run(benchmark, cands[0], refs, workload.torch_dtype)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("workload", LAYERS, ids=lambda w: w.name)
def test_layer_fwd_bwd(benchmark, workload, provider):
    benchmark.group = f"layer {workload.name}"
    lp = suites.make_layer_problem(workload, CTX.device)
    cand = suites._layer_candidate(lp, provider, backward=True)
    refs = {
        "lora": lambda: suites._layer_reference(lp, True, zero_ranks=False),
        "base": lambda: suites._layer_reference(lp, True, zero_ranks=True),
    }
    _run(benchmark, cand, refs, workload.torch_dtype)
