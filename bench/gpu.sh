#!/usr/bin/env bash
# The full GPU benchmark in one command: every suite on CUDA, then the plots.
#   bash bench/gpu.sh [extra python -m bench args]
# Writes bench/results/cuda.csv and bench/plots/cuda-*.png; exits non-zero if any
# provider disagrees with the reference (rows are still written).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA device')"
"$PY" -c "import drlora_kernels as d; print(d.build_info())"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
set +e
"$PY" -m bench --device cuda --suite all --out bench/results/cuda.csv "$@"
rc=$?
set -e
"$PY" -m bench.plot bench/results/cuda.csv --out bench/plots
exit "$rc"
