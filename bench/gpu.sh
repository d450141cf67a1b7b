#!/usr/bin/env bash
# The first GPU run in one command, unattended (budget: under 10 minutes on an A100/H100):
#   1. the gpu-marked tests: Triton kernels at OLMoE-like shapes in fp32/fp16/bf16, the zipf row
#      split, CUDA-graph capture, bit-identical reruns in the deterministic mode, TF32 following
#      torch.get_float32_matmul_precision(), and the training step under
#      torch.cuda.set_sync_debug_mode("error") (a host sync fails the test);
#   2. the compile gate's resource table (tools/gate_triton.py: CPU only, runs beside step 1);
#   3. the bench CSV in bf16 at the OLMoE-1B-7B and Qwen3-30B-A3B MoE layer shapes (layer suite),
#      then the plots.
#   bash bench/gpu.sh
# Writes bench/results/cuda-gpu-tests.log, bench/results/cuda-gate.txt, bench/results/cuda.csv,
# bench/plots/cuda-*.png. Every step runs even if an earlier one failed; the exit code is
# non-zero if any failed (a test, a gate check, a bench provider disagreeing with the reference,
# or a step hitting its time limit).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=bench/results
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA device')" || exit 2
"$PY" -c "import drlora_kernels as d; print(d.build_info())"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
start=$(date +%s)
failed=()

# 2. the compile gate (CPU) in the background while the GPU runs the tests
env -u TRITON_INTERPRET timeout 420 "$PY" tools/gate_triton.py --configs default --quiet \
    > "$OUT/cuda-gate.txt" 2>&1 &
gate_pid=$!

# 1. the gpu-marked tests
timeout 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/cuda-gpu-tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("gpu tests")

wait "$gate_pid" || failed+=("compile gate")
tail -n 3 "$OUT/cuda-gate.txt"

# 3. the layer bench in bf16: OLMoE-1B-7B (the registry's GPU shape), then Qwen3-30B-A3B
timeout 180 "$PY" -m bench --device cuda --suite layer --out "$OUT/cuda.csv" \
    || failed+=("bench layer olmoe")
timeout 180 "$PY" - "$OUT/cuda.csv" <<'EOF' || failed+=("bench layer qwen3-moe")
# Qwen3-30B-A3B: 128 experts, top-8, hidden 2048, expert intermediate 768 (same r_max/mean rank)
import sys

from bench import workloads
from bench.cli import main

workloads.SHAPES["gpu"] = dict(workloads.SHAPES["gpu"], E=128, H=2048, I=768)
sys.exit(main(["--device", "cuda", "--suite", "layer", "--out", sys.argv[1], "--append"]))
EOF
"$PY" -m bench.plot "$OUT/cuda.csv" --out bench/plots || failed+=("plots")

echo "bench/gpu.sh: $(( $(date +%s) - start )) s"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "bench/gpu.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "bench/gpu.sh: all steps passed"
