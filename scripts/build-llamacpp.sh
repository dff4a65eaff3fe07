#!/usr/bin/env bash
# Build llama.cpp once from the llama-cpp-python sdist on PyPI (the peer for side-by-side benchmarks).
# Prints the folder holding llama-bench, llama-perplexity, llama-quantize, llama-completion,
# llama-mtmd-cli and llama-server. Cached outside git:
#   ${EDGEVLM_CACHE:-~/.cache/edgevlm}/llama.cpp-<version>/
# LLAMA_ISA=avx2 builds a second copy (build-avx2/) held to AVX2, FMA, F16C and BMI2 (no AVX-512, no
# AVX-VNNI, no AMX): what most laptops run, for side-by-side runs on a machine that has more.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${EDGEVLM_CACHE:-$HOME/.cache/edgevlm}"
ISA="${LLAMA_ISA:-native}"
ROOT="$CACHE/llama.cpp-$VERSION"
case "$ISA" in
    native) BUILD="$ROOT/build" ;;
    avx2) BUILD="$ROOT/build-avx2" ;;
    *) echo "LLAMA_ISA must be native or avx2, not '$ISA'" >&2; exit 2 ;;
esac
BIN="$BUILD/bin"
if [[ -x "$BIN/llama-bench" && -x "$BIN/llama-perplexity" && -x "$BIN/llama-quantize" && -x "$BIN/llama-completion" && -x "$BIN/llama-server" ]]; then
    echo "$BIN"; exit 0
fi
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-$CACHE/venv/bin/python}"
[[ -x "$PY" ]] || PY="$(bash "$HERE/setup-python.sh" >&2 && echo "$CACHE/venv/bin/python")"
"$PY" -m pip install --quiet cmake >&2
CMAKE="$(dirname "$PY")/cmake"
mkdir -p "$ROOT/src"
if [[ ! -f "$ROOT/src/CMakeLists.txt" ]]; then
    TMP="$(mktemp -d)"
    # The sdist straight from PyPI's simple index (hash-checked).
    "$PY" "$HERE/pypi_file.py" llama-cpp-python "llama_cpp_python-$VERSION.tar.gz" \
        "$TMP/llama_cpp_python-$VERSION.tar.gz" >&2
    tar -xzf "$TMP"/llama_cpp_python-"$VERSION".tar.gz -C "$TMP"
    cp -r "$TMP/llama_cpp_python-$VERSION/vendor/llama.cpp/." "$ROOT/src/"
    rm -rf "$TMP"
fi
# Native build, but without AMX: this version's AMX matmul (ggml_backend_amx_mul_mat) segfaults on
# prompt batches of SmolLM2 / SmolVLM on a Xeon with AMX (seen 2026-11-26), so llama.cpp's best working
# configuration there is its AVX-512 VNNI code with weight repacking on. (-mno-* wins over -march=native.)
NO_AMX=""
grep -q amx_tile /proc/cpuinfo 2>/dev/null && NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if [[ "$ISA" == avx2 ]]; then
    CPU_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
               -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF
               -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
else
    CPU_FLAGS=(-DGGML_NATIVE=ON -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX")
fi
"$CMAKE" -S "$ROOT/src" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release "${CPU_FLAGS[@]}" \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2
"$CMAKE" --build "$BUILD" -j "$(nproc)" --target llama-bench llama-perplexity llama-completion llama-quantize llama-mtmd-cli llama-server >&2
echo "$BIN"
