#!/usr/bin/env bash
# On a machine with a CUDA GPU: the CUDA tests (kernels at every size, the slow ones too), then the
# kernel benchmarks (low-rank GEMM, latent attention), then their tables in bench/results/. Run from anywhere:
#   bash bench/gpu.sh            (PY=python3 bash bench/gpu.sh to pick the interpreter)
# Logs and the raw pytest-benchmark JSON go to $OUT (default bench/results/raw/).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
OUT=${OUT:-bench/results/raw}
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh needs a CUDA GPU: torch.cuda.is_available() is False')"
"$PY" -m pytest -q -p no:cacheprovider tests/test_lowrank_gemm.py tests/test_paged_decode.py \
    tests/test_latent_attention.py tests/test_heal.py::test_healing_on_cuda_lowers_the_kl_through_the_compiled_kernels \
    -o addopts="-ra --benchmark-disable" 2>&1 | tee "$OUT/cuda-tests.log"
"$PY" -m pytest -q -p no:cacheprovider bench/bench_kernels.py --benchmark-enable \
    --benchmark-json="$OUT/kernels.json" 2>&1 | tee "$OUT/kernels-bench.log" | tail -n 5
"$PY" bench/kernels_report.py "$OUT/kernels.json"
"$PY" -m pytest -q -p no:cacheprovider bench/bench_latent_attention.py --benchmark-enable \
    --benchmark-json="$OUT/latent.json" 2>&1 | tee "$OUT/latent-bench.log" | tail -n 5
"$PY" bench/latent_report.py "$OUT/latent.json"
# The engine benchmark needs the real model folder (no network on a lent GPU machine: bring
# models/smollm2-135m along, e.g. split into pieces under the transfer limit and joined there).
if [ -f models/smollm2-135m/model.safetensors ]; then
    "$PY" -m pytest -q -p no:cacheprovider bench/bench_engine.py --benchmark-enable \
        --benchmark-json="$OUT/engine.json" 2>&1 | tee "$OUT/engine-bench.log" | tail -n 5
    "$PY" bench/engine_report.py "$OUT/engine.json"
else
    echo "bench/gpu.sh: models/smollm2-135m is missing: engine benchmark skipped" >&2
fi
