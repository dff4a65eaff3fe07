#!/usr/bin/env bash
# The client environment the server tests use: the official `openai` package and `selenium` (pinned in
# requirements-clients.txt) in a virtual environment outside git, plus Debian's chromium and
# chromium-driver for the chat page's browser test. Prints the environment's python.
set -euo pipefail
venv="${EDGEVLM_CLIENT_VENV:-$HOME/.cache/edgevlm/venv-clients}"
here="$(cd "$(dirname "$0")" && pwd)"
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y -q chromium chromium-driver >&2 || { apt-get update -q >&2 && apt-get install -y -q chromium chromium-driver >&2; }
  else
    echo "chromium and chromium-driver are missing: sudo apt-get install chromium chromium-driver" >&2
  fi
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet -r "$here/requirements-clients.txt" >&2
echo "$venv/bin/python"
