#!/usr/bin/env python3
"""edgevlm against llama.cpp on the same GGUF weights, quantization, prompt/generation lengths and
thread count, run alternately; prints each metric as edgevlm / llama.cpp with both medians.

    python3 scripts/bench-vs-llamacpp.py [--threads 2] [--repetitions 3] [--quants Q4_1,Q8_0,Q4_0]

It builds llama.cpp once from the llama-cpp-python sdist (scripts/build-llamacpp.sh), fetches the real
SmolLM2-135M-Instruct Q4_1 GGUF (scripts/fetch-smollm2.sh), expands it to F32 with
`llama-quantize --allow-requantize` and writes Q8_0 / Q4_0 / Q4_1 from that F32 file, all cached
outside git. edgevlm reads those same files (their blocks are loaded exactly, not requantized).
Peak RSS is each process's maximum resident set (GNU time's %M).

Decode speed is measured at two depths, the same for both engines: from an empty context (llama-bench's
plain tg128; edgevlm after a 1-token prompt) and after the prompt (llama-bench `-d <prompt tokens>`;
edgevlm's decode right after its prompt). Attention over the cache makes the second slower for both.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("EDGEVLM_CACHE", Path.home() / ".cache" / "edgevlm"))


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def timed(cmd):
    """Run `cmd` under GNU time; return (stdout, that process's peak RSS in MB)."""
    proc = subprocess.run(["/usr/bin/time", "-f", "EDGEVLM_MAXRSS_KB=%M", *map(str, cmd)],
                          text=True, capture_output=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{proc.stderr[-2000:]}")
    kb = [int(l.split("=")[1]) for l in proc.stderr.splitlines() if l.startswith("EDGEVLM_MAXRSS_KB=")]
    return proc.stdout, kb[-1] / 1024.0


def ensure_models(bin_dir, quants):
    src = Path(sh(["bash", ROOT / "scripts/fetch-smollm2.sh"]).strip())
    out = src.parent / "lcpp"
    out.mkdir(exist_ok=True)
    f32 = out / "f32.gguf"
    if not f32.exists():
        sh([bin_dir / "llama-quantize", "--allow-requantize", src, f32, "F32"])
    files = {}
    for q in quants:
        p = out / f"{q}.gguf"
        if not p.exists():
            sh([bin_dir / "llama-quantize", f32, p, q])
        files[q] = p
    return files


def llama_bench(bin_dir, model, a):
    out, rss = timed([bin_dir / "llama-bench", "-m", model, "-p", a.prompt_tokens, "-n", a.gen_tokens,
                      "-d", f"0,{a.prompt_tokens}", "-t", a.threads, "-r", a.repetitions,
                      "-o", "json"])
    rows = json.loads(out)
    pp = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0 and r["n_depth"] == 0)
    tg = {r["n_depth"]: r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0}
    return {
        "prompt_tokens_per_s": statistics.median(pp["samples_ts"]),
        "decode_tokens_per_s": statistics.median(tg[0]["samples_ts"]),
        "decode_after_prompt_tokens_per_s": statistics.median(tg[a.prompt_tokens]["samples_ts"]),
        "peak_rss_mb": rss,
    }


def edgevlm_bench(binary, model, a):
    def run(prompt_tokens):
        return timed([binary, "bench", "--model", model, "--prompt-tokens", prompt_tokens,
                      "--gen-tokens", a.gen_tokens, "--threads", a.threads,
                      "--repetitions", a.repetitions, "--json"])
    out, rss = run(a.prompt_tokens)
    r = json.loads(out)
    empty, _ = run(1)
    return {
        "prompt_tokens_per_s": r["prompt_tokens_per_s"],
        "decode_tokens_per_s": json.loads(empty)["decode_tokens_per_s"],
        "decode_after_prompt_tokens_per_s": r["decode_tokens_per_s"],
        "peak_rss_mb": rss,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--quants", default="Q4_1,Q8_0,Q4_0")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per engine")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    sh(["bash", ROOT / "scripts/build-llamacpp.sh"])
    bin_dir = CACHE / "llama.cpp-0.3.36" / "build" / "bin"
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "edgevlm-cli"], cwd=ROOT,
                   check=True, capture_output=True)
    binary = ROOT / "target" / "release" / "edgevlm"
    files = ensure_models(bin_dir, a.quants.split(","))

    results = {}
    for q, model in files.items():
        runs = {"edgevlm": [], "llama.cpp": []}
        for _ in range(a.rounds):
            runs["edgevlm"].append(edgevlm_bench(binary, model, a))
            runs["llama.cpp"].append(llama_bench(bin_dir, model, a))
        results[q] = {
            eng: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for eng, rs in runs.items()
        }

    if a.json:
        print(json.dumps(results, indent=2))
        return
    print(f"SmolLM2-135M-Instruct, {a.threads} threads, pp{a.prompt_tokens} / tg{a.gen_tokens} "
          f"(tg at depth 0 and {a.prompt_tokens}), "
          f"{a.repetitions} repetitions x {a.rounds} alternating rounds (medians)")
    print("| weights | metric | edgevlm | llama.cpp | edgevlm / llama.cpp |")
    print("| --- | --- | --- | --- | --- |")
    for q, r in results.items():
        for k, label in [("prompt_tokens_per_s", "prompt tokens/s"),
                         ("decode_tokens_per_s", "decode tokens/s, empty context"),
                         ("decode_after_prompt_tokens_per_s",
                          f"decode tokens/s after the {a.prompt_tokens}-token prompt"),
                         ("peak_rss_mb", "peak RSS MB")]:
            e, l = r["edgevlm"][k], r["llama.cpp"][k]
            print(f"| {q} | {label} | {e:.1f} | {l:.1f} | {e / l:.2f} |")


if __name__ == "__main__":
    main()
