#!/usr/bin/env python3
"""edgevlm against mistral.rs (the `mistralrs` wheel from PyPI) on the same SmolLM2-135M GGUF files, the
same prompt length, generation length and threads, run alternately; prints edgevlm / mistral.rs.

    python3 scripts/bench-vs-mistralrs.py [--threads 2] [--repetitions 3] [--quants Q4_0,Q8_0]

Needs the venv (`scripts/setup-python.sh`) with `mistralrs` installed (`pip install mistralrs`, about
26 MB) and the GGUF files that scripts/bench-vs-llamacpp.py writes (run it once first). mistral.rs
reads the tokenizer and chat template from the GGUF (no Hugging Face download; HF_HUB_OFFLINE=1 is
set), runs with its prefix cache off, and each repetition's prompt starts with a different word so
nothing is reused between requests. Its prompt length is what its `usage.prompt_tokens` reports
(the chat template included); edgevlm's bench is given that same number of prompt tokens. Speeds are
mistral.rs's own `usage` figures (avg_prompt_tok_per_sec, avg_compl_tok_per_sec) and edgevlm's bench
medians; peak RSS is each process's maximum resident set (GNU time's %M).
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
WORDS = ("the quick brown fox jumps over a lazy dog while seven wise owls watch from old oak "
         "trees near the quiet river bank").split()


def worker(model, prompt_words, gen_tokens, repetitions):
    """Runs inside the venv: one mistral.rs runner, a warm-up, then timed requests; prints JSON."""
    from mistralrs import ChatCompletionRequest, Runner, Which

    path = Path(model)
    runner = Runner(which=Which.GGUF(quantized_model_id=str(path.parent),
                                     quantized_filename=path.name),
                    prefix_cache_n=0, token_source="none")

    def ask(first, words, max_tokens):
        text = " ".join([first] + [WORDS[i % len(WORDS)] for i in range(words)])
        req = ChatCompletionRequest(model="smollm2", messages=[{"role": "user", "content": text}],
                                    max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return runner.send_chat_completion_request(req).usage

    ask("warm", 8, 4)
    rows = []
    for r in range(repetitions):
        u = ask(f"start{r}", prompt_words, gen_tokens)
        rows.append({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                     "prompt_tokens_per_s": u.avg_prompt_tok_per_sec,
                     "decode_tokens_per_s": u.avg_compl_tok_per_sec})
    print(json.dumps(rows))


def timed(cmd, env=None):
    proc = subprocess.run(["/usr/bin/time", "-f", "EDGEVLM_MAXRSS_KB=%M", *map(str, cmd)], text=True,
                          errors="replace", capture_output=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{proc.stderr[-3000:]}")
    kb = [int(l.split("=")[1]) for l in proc.stderr.splitlines() if l.startswith("EDGEVLM_MAXRSS_KB=")]
    return proc.stdout, kb[-1] / 1024.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--prompt-words", type=int, default=480)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--quants", default="Q4_0,Q8_0")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", nargs=4, metavar=("MODEL", "WORDS", "GEN", "REPS"))
    a = ap.parse_args()
    if a.worker:
        m, w, g, r = a.worker
        worker(m, int(w), int(g), int(r))
        return

    py = Path(os.environ.get("EDGEVLM_VENV", CACHE / "venv")) / "bin" / "python"
    binary = ROOT / "target" / "release" / "edgevlm"
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "edgevlm-cli"], cwd=ROOT,
                   check=True, capture_output=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAYON_NUM_THREADS=str(a.threads))
    lcpp = CACHE / "smollm2-135m-instruct" / "lcpp"
    print(f"SmolLM2-135M-Instruct, {a.threads} threads, tg{a.gen_tokens}, {a.repetitions} repetitions x "
          f"{a.rounds} alternating rounds (medians)")
    print("| weights | metric | edgevlm | mistral.rs | edgevlm / mistral.rs |")
    print("| --- | --- | --- | --- | --- |")
    for q in a.quants.split(","):
        model = lcpp / f"{q}.gguf"
        if not model.exists():
            sys.exit(f"{model} is missing: run scripts/bench-vs-llamacpp.py once first")
        runs = {"edgevlm": [], "mistral.rs": []}
        for _ in range(a.rounds):
            out, rss = timed([py, __file__, "--worker", model, a.prompt_words, a.gen_tokens,
                              a.repetitions], env=env)
            rows = json.loads(out.strip().splitlines()[-1])
            n_prompt = rows[0]["prompt_tokens"]
            runs["mistral.rs"].append({
                "prompt_tokens": n_prompt,
                "prompt_tokens_per_s": statistics.median(r["prompt_tokens_per_s"] for r in rows),
                "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in rows),
                "peak_rss_mb": rss,
            })
            out, rss = timed([binary, "bench", "--model", model, "--prompt-tokens", n_prompt,
                              "--gen-tokens", a.gen_tokens, "--threads", a.threads,
                              "--repetitions", a.repetitions, "--json"])
            r = json.loads(out)
            runs["edgevlm"].append({
                "prompt_tokens": n_prompt,
                "prompt_tokens_per_s": r["prompt_tokens_per_s"],
                "decode_tokens_per_s": r["decode_tokens_per_s"],
                "peak_rss_mb": rss,
            })
        med = {e: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for e, rs in runs.items()}
        n = med["edgevlm"]["prompt_tokens"]
        for k, label in [("prompt_tokens_per_s", f"prompt tokens/s ({n:.0f}-token prompt)"),
                         ("decode_tokens_per_s", f"decode tokens/s after the {n:.0f}-token prompt"),
                         ("peak_rss_mb", "peak RSS MB")]:
            e, m = med["edgevlm"][k], med["mistral.rs"][k]
            print(f"| {q} | {label} | {e:.1f} | {m:.1f} | {e / m:.2f} |", flush=True)


if __name__ == "__main__":
    main()
