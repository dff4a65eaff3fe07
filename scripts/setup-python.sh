#!/usr/bin/env bash
# Create the reference Python environment (transformers + torch) in a cache outside git.
set -euo pipefail
venv="${EDGEVLM_VENV:-$HOME/.cache/edgevlm/venv}"
here="$(cd "$(dirname "$0")" && pwd)"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet -r "$here/requirements.txt"
echo "$venv/bin/python"
