#!/usr/bin/env bash
# The llama.cpp peer, built once per machine into a cache outside git: llama-batched-bench,
# llama-bench, llama-perplexity and llama-quantize from the vendored source of the
# llama-cpp-python sdist on PyPI (nothing else downloaded), and our pulled SmolLM2 folder
# converted to GGUF with its own convert_hf_to_gguf.py (F32, F16, Q8_0) and llama-quantize
# (Q4_K_M, Q3_K_M). ../shared/PEERS.md has the recipe and its caveats. About 10 minutes of both
# cores the first time: never run it beside a benchmark. A second run only checks.
#
#   bash bench/peers/llama_cpp.sh [MODEL_DIR]      prints the cache folder (bin/ and gguf/ inside)
#
# Cache: $LOWRANK_CACHE_DIR/peers (default ~/.cache/lowrank-engine/peers). Python: $PYTHON
# (default the repository's .venv), which has torch, transformers and gguf; sentencepiece, which
# the converter imports even for a BPE tokenizer, goes into the cache, not into the venv.
set -euo pipefail
VERSION=0.3.36
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
MODEL=$(cd "${1:-$REPO/models/smollm2-135m}" && pwd)
CACHE=${LOWRANK_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lowrank-engine}/peers
SRC=$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp
TOOLS=(llama-batched-bench llama-bench llama-perplexity llama-quantize)
mkdir -p "$CACHE/gguf"

if [ ! -d "$SRC" ]; then
    "$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$CACHE/sdist" "llama-cpp-python==$VERSION"
    tar xzf "$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE"
fi
missing=0
for tool in "${TOOLS[@]}"; do [ -x "$SRC/build/bin/$tool" ] || missing=1; done
if [ "$missing" = 1 ]; then  # an interrupted build resumes where it stopped
    generator=$(command -v ninja >/dev/null && echo Ninja || echo "Unix Makefiles")
    cmake -S "$SRC" -B "$SRC/build" -G "$generator" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=OFF >/dev/null
    cmake --build "$SRC/build" -j "$(nproc)" --target "${TOOLS[@]}"
fi
ln -sfn "$SRC/build/bin" "$CACHE/bin"

if ! PYTHONPATH="$CACHE/site" "$PY" -c "import sentencepiece" 2>/dev/null; then
    "$PY" -m pip install --quiet --target "$CACHE/site" sentencepiece
fi
name=$(basename "$MODEL")
for type in f32 f16 q8_0; do  # written under a temporary name, renamed when complete
    out=$CACHE/gguf/$name-$type.gguf
    if [ ! -s "$out" ]; then
        PYTHONPATH="$SRC/gguf-py:$CACHE/site" "$PY" "$SRC/convert_hf_to_gguf.py" "$MODEL" --outfile "$out.tmp" \
            --outtype "$type" >"$out.log" 2>&1 || { tail -20 "$out.log" >&2; exit 1; }
        mv "$out.tmp" "$out"
    fi
done
for type in Q4_K_M Q3_K_M; do
    out=$CACHE/gguf/$name-$(echo "$type" | tr 'A-Z' 'a-z').gguf
    if [ ! -s "$out" ]; then
        "$CACHE/bin/llama-quantize" "$CACHE/gguf/$name-f16.gguf" "$out.tmp" "$type" 2 >"$out.log" 2>&1 \
            || { tail -20 "$out.log" >&2; exit 1; }
        mv "$out.tmp" "$out"
    fi
done

# Some VMs list AMX in /proc/cpuinfo without enabling its tile state: the -march=native build's AMX
# code then dies (SIGILL, SIGSEGV) on quantised GGUFs while F16/F32 run (seen on a 2-core Xeon,
# 2026-12-03). Probe Q8_0 once; if it dies, rebuild with the CPU's AVX-512/VNNI levels and no AMX.
if [ ! -e "$SRC/build/.probed" ]; then
    if ! "$CACHE/bin/llama-bench" -m "$CACHE/gguf/$name-q8_0.gguf" -p 8 -n 1 -t 2 >/dev/null 2>&1; then
        echo "llama.cpp's native build dies on Q8_0 here: rebuilding without AMX" >&2
        flags=$(grep -m1 '^flags' /proc/cpuinfo)
        on() { case " $flags " in *" $1 "*) echo ON ;; *) echo OFF ;; esac; }
        cmake -S "$SRC" -B "$SRC/build" -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2="$(on avx2)" \
            -DGGML_FMA="$(on fma)" -DGGML_F16C="$(on f16c)" -DGGML_AVX512="$(on avx512f)" \
            -DGGML_AVX512_VBMI="$(on avx512vbmi)" -DGGML_AVX512_VNNI="$(on avx512_vnni)" \
            -DGGML_AVX512_BF16="$(on avx512_bf16)" -DGGML_AVX_VNNI="$(on avx_vnni)" \
            -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF >/dev/null
        cmake --build "$SRC/build" -j "$(nproc)" --target "${TOOLS[@]}"
        "$CACHE/bin/llama-bench" -m "$CACHE/gguf/$name-q8_0.gguf" -p 8 -n 1 -t 2 >/dev/null
    fi
    touch "$SRC/build/.probed"
fi
echo "$CACHE"
