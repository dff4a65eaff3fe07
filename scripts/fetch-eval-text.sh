#!/usr/bin/env bash
# Fetch a public-domain English text for quantization accuracy runs: the King James Bible verses shipped in
# Debian's `verse` package, stripped to plain prose, into a cache outside git. Prints the file's path.
set -euo pipefail
cache="${EDGEVLM_CACHE:-$HOME/.cache/edgevlm}"
out="$cache/eval-text-kjv.txt"
if [ ! -s "$out" ]; then
  tmp="$(mktemp -d)"
  (cd "$tmp" && apt-get download verse >/dev/null && dpkg -x verse_*.deb x)
  mkdir -p "$cache"
  # Lines look like `R0101     "text..."`; drop the day codes and quote marks, join into paragraphs.
  sed -E 's/^R[0-9]+ +//; s/"//g' "$tmp/x/usr/share/verse/daily.verse" | tr -s ' \n' ' ' > "$out"
  rm -rf "$tmp"
fi
echo "$out"
