#!/usr/bin/env bash
# Issue 20's GPU check as one prepared run (at most 10 minutes on one H200 with 16 cores): the `gpu` tests, then
# bench_extract.py on 3000 mixed JPEGs (tiles none/dynamic x decode exact/fast, loader alone, encoder alone with
# MFU, end to end, a sleeping encoder, preprocessing cost, --decode fast fidelity). Results: benchmarks/results/
# extract-cuda_*.{json,md}; the test summary is printed. Run from anywhere: bash benchmarks/gpu_extract.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 200 "$PY" -m pytest -q -p no:cacheprovider -m gpu -s tests/integration/test_gpu.py tests/integration/test_export.py 2>&1 | grep -E "^\[gpu\]|passed|failed|skipped|Error|assert" | tail -30
timeout 380 "$PY" benchmarks/bench_extract.py --images 3000 --note "One prepared run (benchmarks/gpu_extract.sh)."
