#!/usr/bin/env bash
# Type-check (and lint) the `--features cuda` build on a machine without a GPU or a CUDA install.
#
# NVIDIA publishes the CUDA compiler and headers as PyPI wheels; this fetches pinned ones into a cache
# outside git ($EDGEVLM_CACHE/cuda-13.5, about 350 MB unpacked), lays them out as a toolkit root, and
# runs `cargo clippy --features cuda --all-targets` against it. candle-kernels' build script compiles
# every kernel to PTX with that nvcc (about 6 minutes on 2 cores, once per target folder).
#
#   scripts/check-cuda-build.sh            # into target/cuda-check
#
# cudarc 0.19 knows CUDA up to 13.4: CUDARC_CUDA_VERSION=13040 selects those bindings. Linking a
# binary needs the toolkit's libraries (cuBLAS, cuRAND, NVRTC, the driver stub), which these wheels
# do not hold: on a CUDA machine, `cargo build --release --features cuda` with its own toolkit.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${EDGEVLM_CACHE:-$HOME/.cache/edgevlm}"
VERSION=13.5.37
TOOLKIT="$CACHE/cuda-13.5/nvidia/cu13"
if [[ ! -x "$TOOLKIT/bin/nvcc" || ! -x "$TOOLKIT/nvvm/bin/cicc" ]]; then
    PIP=(python3 -m pip)
    [[ -x "$CACHE/venv/bin/python" ]] && PIP=("$CACHE/venv/bin/python" -m pip)
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    "${PIP[@]}" download --quiet --no-deps -d "$TMP" \
        "nvidia-cuda-nvcc==$VERSION" "nvidia-cuda-crt==$VERSION" "nvidia-nvvm==$VERSION" \
        "nvidia-cuda-runtime==$VERSION" "nvidia-cuda-cccl==13.3.5.0.6" >&2
    mkdir -p "$CACHE/cuda-13.5"
    python3 - "$CACHE/cuda-13.5" "$TMP"/*.whl <<'PY'
import os, stat, sys, zipfile
dest, wheels = sys.argv[1], sys.argv[2:]
for whl in wheels:
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            path = z.extract(info, dest)
            if "/bin/" in info.filename:  # wheels drop the executable bit
                os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
PY
fi
export CUDA_ROOT="$TOOLKIT" CUDA_PATH="$TOOLKIT" PATH="$TOOLKIT/bin:$PATH"
export CUDARC_CUDA_VERSION=13040 CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cuda-check}"
cd "$ROOT"
cargo clippy --release --locked --features cuda --workspace --all-targets -- -D warnings
