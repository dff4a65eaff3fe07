#!/usr/bin/env bash
# Build llama.cpp once from the llama-cpp-python sdist on PyPI (the peer for side-by-side benchmarks).
# Prints the folder holding llama-bench, llama-perplexity, llama-quantize, llama-completion and
# llama-mtmd-cli. Cached outside git:
#   ${EDGEVLM_CACHE:-~/.cache/edgevlm}/llama.cpp-<version>/
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${EDGEVLM_CACHE:-$HOME/.cache/edgevlm}"
ROOT="$CACHE/llama.cpp-$VERSION"
BIN="$ROOT/build/bin"
if [[ -x "$BIN/llama-bench" && -x "$BIN/llama-perplexity" && -x "$BIN/llama-quantize" && -x "$BIN/llama-completion" ]]; then
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
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$TMP" >&2
    tar -xzf "$TMP"/llama_cpp_python-"$VERSION".tar.gz -C "$TMP"
    cp -r "$TMP/llama_cpp_python-$VERSION/vendor/llama.cpp/." "$ROOT/src/"
    rm -rf "$TMP"
fi
"$CMAKE" -S "$ROOT/src" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >&2
"$CMAKE" --build "$ROOT/build" -j "$(nproc)" --target llama-bench llama-perplexity llama-completion llama-quantize llama-mtmd-cli >&2
echo "$BIN"
