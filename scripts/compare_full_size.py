#!/usr/bin/env python3
"""Full-size check: random weights at the real SmolVLM-256M shapes, transformers vs edgevlm.

1. Builds (once) a random-weight model from ../shared/models/smolvlm-256m-instruct/config.json, saved in
   bf16 with the real tokenizer/processor files into a cache outside git
   (~/.cache/edgevlm/smolvlm-256m-random, or $EDGEVLM_FULL_MODEL). The same folder is the input for
   speed and memory benchmarks.
2. Runs transformers (f32, PIL image processor) greedily for 16 steps on an image + prompt and records the
   top-5 logprobs of each step.
3. Runs the edgevlm CLI (`--logprobs 5 --json`, f32) on the same inputs and compares step by step.

Usage: python scripts/compare_full_size.py [--edgevlm target/release/edgevlm] [--image PATH]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import randomize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "models" / "smolvlm-256m-instruct"
CACHE = Path(os.environ.get("EDGEVLM_FULL_MODEL", Path.home() / ".cache" / "edgevlm" / "smolvlm-256m-random"))
STEPS = 16
TOP = 5
PROMPT = "Describe this image."


def build_model():
    if (CACHE / "model.safetensors").exists():
        return
    print(f"building random full-size SmolVLM-256M in {CACHE}", flush=True)
    torch.manual_seed(0)
    cfg = Idefics3Config.from_pretrained(SHARED)
    model = Idefics3ForConditionalGeneration(cfg)
    randomize(model, seed=1)
    model.to(torch.bfloat16).save_pretrained(CACHE, safe_serialization=True)
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json",
              "processor_config.json", "generation_config.json", "special_tokens_map.json"]:
        shutil.copy(SHARED / f, CACHE / f)


def run_edgevlm(binary, model, image, threads, extra):
    """`edgevlm run` greedily for STEPS tokens with the top-TOP logprobs (its timing summary printed):
    (the per-step logprob entries, wall seconds including load)."""
    t0 = time.time()
    res = subprocess.run(
        [binary, "run", "--model", str(model), "--image", image, "--prompt", PROMPT,
         "--max-tokens", str(STEPS), "--logprobs", str(TOP), "--threads", str(threads), "--verbose", *extra],
        capture_output=True, text=True)
    seconds = time.time() - t0
    if res.returncode != 0:
        sys.exit(f"edgevlm failed: {res.stderr}")
    print(res.stderr.strip())
    return json.loads(res.stdout)["choices"][0]["logprobs"]["content"], seconds


def compare_steps(hf_tokens, hf_steps, decoded, ev_content):
    """Print step by step whether edgevlm's greedy token is transformers' and how far their top-5
    logprobs are apart; `hf_steps[i]` maps token id -> logprob, `decoded` token text -> id."""
    worst = 0.0
    agree = 0
    for step, (hf, e) in enumerate(zip(hf_steps, ev_content)):
        ev_map = {decoded[t["token"]]: t["logprob"] for t in e["top_logprobs"] if t["token"] in decoded}
        common = [i for i in hf if i in ev_map]
        diff = max((abs(hf[i] - ev_map[i]) for i in common), default=float("nan"))
        worst = max(worst, diff)
        same_token = decoded.get(e["token"]) == hf_tokens[step]
        print(f"step {step:2d}: hf {hf_tokens[step]:6d} {'==' if same_token else '!='} edgevlm {e['token']!r:14}"
              f" top-{TOP} shared {len(common)}/{TOP}, max |dlogprob| {diff:.2e}")
        if not same_token:
            break
        agree += 1
    print(f"\n{agree}/{STEPS} greedy steps agree; max |d logprob| over the top-{TOP}: {worst:.3e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--edgevlm", default=str(ROOT / "target" / "release" / "edgevlm"))
    ap.add_argument("--image", default=str(ROOT / "tests" / "fixtures" / "images" / "large.png"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--edgevlm-args", default="",
                    help="extra `edgevlm run` flags, space-separated (e.g. --f16-kv-cache)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    build_model()

    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil.from_pretrained(CACHE),
        tokenizer=AutoTokenizer.from_pretrained(CACHE),
        image_seq_len=json.loads((CACHE / "processor_config.json").read_text())["image_seq_len"],
        chat_template=json.loads((CACHE / "chat_template.json").read_text())["chat_template"],
    )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[Image.open(args.image)], return_tensors="pt")

    model = Idefics3ForConditionalGeneration.from_pretrained(CACHE, dtype=torch.float32).eval()
    t0 = time.time()
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=2)
    hf_s = time.time() - t0
    n = inputs["input_ids"].shape[1]
    hf_tokens = out.sequences[0, n:].tolist()
    hf_steps = []
    for logits in out.logits:
        lp = torch.log_softmax(logits[0].float(), -1)
        top = torch.topk(lp, TOP)
        hf_steps.append(dict(zip(top.indices.tolist(), top.values.tolist())))

    tok = processor.tokenizer
    ev_content, ev_s = run_edgevlm(args.edgevlm, CACHE, args.image, args.threads, args.edgevlm_args.split())

    # Map edgevlm's token strings back to ids through the vocabulary's decoded forms.
    decoded = {}
    for i in set(hf_tokens) | {i for step in hf_steps for i in step}:
        decoded.setdefault(tok.decode([i]), i)
    compare_steps(hf_tokens, hf_steps, decoded, ev_content)
    print(f"prompt tokens {n}; wall time (load + image + 16 steps): transformers {hf_s:.1f}s, edgevlm {ev_s:.1f}s")


if __name__ == "__main__":
    main()
