#!/usr/bin/env bash
# One unattended run that proves every CUDA path on a bare GPU machine and brings the figures back.
#
#   GPU_COMMIT=<sha> bash bench/gpu.sh      on the GPU machine (the device tool's `run`; the sha filled in
#                                          here: the tree travels without .git)
#   GPU_DRY_RUN=1 bash bench/gpu.sh                                here, on CPU (CI runs it: tests/test_gpu_script.py)
#   python bench/gpu_report.py DIR                                 back here: DIR -> bench/results/gpu-<device>-<date>.md
#
# It installs nothing and needs no model files: the engine stage builds random real-shaped models
# (bench/synthetic.py). Each stage runs under `timeout` with its own budget (465 s in all on one GPU, under
# the device tool's 10-minute command: with a machine's start that is most of a 15-minute lease,
# so plan one run, not two); a stage that fails or runs out of time is recorded, keeps what it
# finished (bench/pytest_sigterm.py), and the next one runs. Everything lands in $OUT (default
# bench/results/raw/), at most 8 files (what the device tool brings back):
#   env.json      device, driver, versions, commit, measured copy bandwidth and bf16 matmul rate
#   stages.jsonl  one line per stage: name, exit status, seconds, budget, timed out
#   tests.xml     the CUDA tests (JUnit XML)            kernels.json  low-rank GEMM benchmarks
#   latent.json   latent attention benchmarks           engine.json   the engine on the 8B shape
#   tp.json       TP=2 against one process, with two GPUs (bench/tensor_parallel.py --report renders it)
#   log.txt       every stage's output, in order
# The dry run (GPU_DRY_RUN=1) runs every stage at tiny sizes, the Triton tests under the
# interpreter, so the script cannot rot between the rare GPU draws.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DRY=${GPU_DRY_RUN:-0}
OUT=${OUT:-bench/results/raw}
mkdir -p "$OUT"
rm -f "$OUT"/env.json "$OUT"/stages.jsonl "$OUT"/tests.xml "$OUT"/kernels.json "$OUT"/latent.json \
    "$OUT"/engine.json "$OUT"/tp.json "$OUT"/log.txt
LOG="$OUT/log.txt"
export PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Autotuning timings reused across stages (the same shapes recur); `-o addopts` drops `-m 'not slow'`:
# the production-size kernel cases run here, where they take seconds.
export TRITON_CACHE_AUTOTUNING=1
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -p pytest_sigterm -o addopts="-ra" --durations=15)

if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    SYNTH=${SYNTH:-$(mktemp -d)}
    SHAPE=tiny-llama
    TESTS=(tests/test_engine_cuda.py tests/test_lowrank_gemm.py::test_dispatch_runs_the_kernel_here
           tests/test_paged_decode.py::test_dispatch_sends_decode_steps_to_the_kernel
           tests/test_latent_attention.py::test_dispatch_runs_the_kernel_from_device_lengths)
    KERNELS=("bench/bench_kernels.py::test_lowrank_gemm[ours-smollm2.q-8]"
             "bench/bench_kernels.py::test_lowrank_gemm[two-gemms-smollm2.q-8]"
             "bench/bench_kernels.py::test_lowrank_gemm[dense-smollm2.q-8]")
    LATENT=("bench/bench_latent_attention.py::test_decode_attention[latent-smollm2-1-1024]"
            "bench/bench_latent_attention.py::test_decode_attention[sdpa-smollm2-1-1024]")
    ENGINE=("bench/bench_engine.py::test_generate[ours-dense-1]" "bench/bench_engine.py::test_generate[ours-r0.4-1]"
            "bench/bench_engine.py::test_generate[ours-r0.4-kv0.5-1]" "bench/bench_engine.py::test_generate[hf-dense-1]")
    ENV_ARGS=(--dry)
    TP_ARGS=(--rounds 1 --tokens 4 --batches 1)
    BUDGET_TP=${BUDGET_TP:-120}
    BUDGET_ENV=${BUDGET_ENV:-60} BUDGET_TESTS=${BUDGET_TESTS:-120} BUDGET_KERNELS=${BUDGET_KERNELS:-60}
    BUDGET_LATENT=${BUDGET_LATENT:-60} BUDGET_ENGINE=${BUDGET_ENGINE:-120}
else
    export TRITON_INTERPRET=0
    # The 8B shape's folders: ~16 GB dense (kept for transformers) and ~10 GB per compressed one,
    # each deleted once loaded (BENCH_SYNTHETIC_DISPOSABLE): in memory where /dev/shm holds that.
    if [ -z "${SYNTH:-}" ]; then
        if [ "$(df --output=avail -BG /dev/shm 2>/dev/null | tail -n 1 | tr -dc 0-9)" -ge 40 ] 2>/dev/null; then
            SYNTH=/dev/shm/lowrank-synthetic
        else
            SYNTH=/tmp/lowrank-synthetic
        fi
    fi
    export BENCH_SYNTHETIC_DISPOSABLE=1
    SHAPE=${BENCH_SHAPE:-llama3-8b}
    # The engine test first: the kernel tests are many, and a budget cut keeps what ran.
    TESTS=(tests/test_engine_cuda.py tests/test_lowrank_gemm.py tests/test_paged_decode.py tests/test_latent_attention.py
           tests/test_quant_gemm_triton.py tests/test_kv_int8.py::test_triton_decode_reads_the_int8_cache
           tests/test_backend.py
           tests/test_heal.py::test_healing_on_cuda_lowers_the_kl_through_the_compiled_kernels)
    KERNELS=(bench/bench_kernels.py)
    LATENT=(bench/bench_latent_attention.py)
    ENGINE=(bench/bench_engine.py)
    ENV_ARGS=()
    TP_ARGS=(--rounds 2 --tokens 32 --batches 1 16)
    BUDGET_TP=${BUDGET_TP:-120}  # spent only where there are two GPUs
    BUDGET_ENV=${BUDGET_ENV:-30} BUDGET_TESTS=${BUDGET_TESTS:-110} BUDGET_KERNELS=${BUDGET_KERNELS:-60}
    BUDGET_LATENT=${BUDGET_LATENT:-40} BUDGET_ENGINE=${BUDGET_ENGINE:-225}
fi

# stage NAME BUDGET_SECONDS COMMAND...: run it under its time box, log it, record how it ended.
stage() {
    local name=$1 budget=$2
    shift 2
    echo "=== $name (budget ${budget}s): $*" >>"$LOG"
    local start rc ms
    start=$(date +%s%N)
    timeout --kill-after=15 "$budget" "$@" >>"$LOG" 2>&1
    rc=$?
    ms=$((($(date +%s%N) - start) / 1000000))
    local timed_out=false
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then timed_out=true; fi
    printf '{"stage": "%s", "rc": %d, "seconds": %d.%03d, "budget": %d, "timed_out": %s}\n' \
        "$name" "$rc" $((ms / 1000)) $((ms % 1000)) "$budget" "$timed_out" >>"$OUT/stages.jsonl"
    echo "=== $name: exit $rc after $((ms / 1000)) s" >>"$LOG"
    echo "gpu.sh: $name exit $rc"
}

if [ "$DRY" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu.sh needs a CUDA GPU: torch.cuda.is_available() is False (GPU_DRY_RUN=1 for the CPU dry run)" >&2
    exit 2
fi
{ echo "=== machine"; df -h /tmp /dev/shm 2>&1; free -g 2>&1; nvidia-smi 2>&1 | head -n 15; } >>"$LOG"
stage env "$BUDGET_ENV" "$PY" bench/gpu_env.py "$OUT/env.json" "${ENV_ARGS[@]}"
# Correctness needs no tuning: the kernels' pinned configs (kernels/lowrank_gemm.py, LOWRANK_AUTOTUNE).
LOWRANK_AUTOTUNE=0 stage tests "$BUDGET_TESTS" "${PYTEST[@]}" --benchmark-disable --junitxml="$OUT/tests.xml" "${TESTS[@]}"
stage kernels "$BUDGET_KERNELS" "${PYTEST[@]}" --benchmark-enable --benchmark-json="$OUT/kernels.json" "${KERNELS[@]}"
stage latent "$BUDGET_LATENT" "${PYTEST[@]}" --benchmark-enable --benchmark-json="$OUT/latent.json" "${LATENT[@]}"
export BENCH_SYNTHETIC="$SYNTH" BENCH_SHAPE="$SHAPE"
stage engine "$BUDGET_ENGINE" "${PYTEST[@]}" --benchmark-enable --benchmark-json="$OUT/engine.json" "${ENGINE[@]}"
# Tensor parallelism needs two devices: TP=2 against one process (and the communication it measures);
# on one GPU the stage says so and passes. The dry run cuts a tiny model across 2 CPU processes.
stage tensor-parallel "$BUDGET_TP" bash -c 'if [ "$0" = 1 ] || [ "$("$1" -c "import torch; print(torch.cuda.device_count())")" -ge 2 ]; then
        exec "$1" bench/tensor_parallel.py --shape "$2" --tp 2 --folders "$3" --json "$4" "${@:5}"
    else echo "tensor-parallel: fewer than 2 GPUs, nothing to compare"; fi' \
    "$DRY" "$PY" "$SHAPE" "$SYNTH" "$OUT/tp.json" "${TP_ARGS[@]}"
# The log is the one file that can grow past what comes back (16 MiB a file): keep its end.
if [ "$(stat -c %s "$LOG")" -gt $((15 << 20)) ]; then
    tail -c $((15 << 20)) "$LOG" >"$LOG.tail" && mv "$LOG.tail" "$LOG"
fi
cat "$OUT/stages.jsonl"
