#!/usr/bin/env python3
"""Check that edgevlm reads an mlx-vlm checkpoint (the layout mlx-community publishes) as MLX does.

1. `mlx_vlm convert -q --q-bits BITS` of a Hugging Face SmolVLM folder (default: the full-size
   random-weight SmolVLM-256M that scripts/compare_full_size.py caches) into the cache.
   mlx-vlm renames the tensors (`language_model.*`, `vision_model.*`, `connector.*`, `lm_head` under
   the language model), stores the patch conv as (out, kh, kw, in) and quantizes the text model, the
   connector, the LM head and the token embeddings.
2. MLX dequantizes every quantized tensor (`mx.dequantize`), and the result is written back in the
   Hugging Face layout (transformers' names, the conv as (out, in, kh, kw)): a full-precision model
   holding exactly MLX's values.
3. `edgevlm run` (greedy, top-5 logprobs) on both folders with the same image and prompt: the
   quantized checkpoint must follow its dequantized reference step for step.

Needs `pip install -r scripts/requirements-mlx.txt` in the venv (mlx-cpu runs on Linux).

Usage: python scripts/check_mlx_vlm_checkpoint.py [--model DIR] [--bits 4 | --quant-predicate mixed_4_6]
       [--steps 16]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("EDGEVLM_CACHE", Path.home() / ".cache" / "edgevlm"))
PROMPT = "Describe this image."


def hf_name(name):
    """transformers' name of an mlx-vlm Idefics3 or Qwen2-VL tensor (the inverse of mlx-vlm's
    `sanitize`)."""
    if name.startswith("language_model.lm_head"):
        return name[len("language_model."):]
    if name.startswith("language_model.model."):
        return name[len("language_model."):]
    if name.startswith("vision_tower."):
        return "visual." + name[len("vision_tower."):]
    if name.startswith("language_model."):
        return "model.text_model." + name[len("language_model."):]
    return "model." + name


def mlx_vlm_input(model, staging):
    """`model`, or for a Qwen2-VL / Qwen2.5-VL folder written by transformers 5 (a nested
    `text_config`, `rope_parameters`), a staging folder beside it with the config in the 4.x layout the
    hub's checkpoints have and mlx-vlm reads (text settings at the top level, `rope_scaling` with
    `mrope_section`), the other files linked."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    if cfg.get("model_type") not in ("qwen2_5_vl", "qwen2_vl") or "text_config" not in cfg:
        return model
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for f in Path(model).iterdir():
        if f.name != "config.json":
            (staging / f.name).symlink_to(f.resolve())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters", {})
    for k, v in text.items():
        if k != "model_type":
            cfg.setdefault(k, v)
    cfg["rope_theta"] = rope.get("rope_theta", 1000000.0)
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    vision = cfg["vision_config"]
    vision.pop("rope_parameters", None)
    vision["model_type"] = cfg["model_type"]
    if "in_channels" in vision:
        vision["in_chans"] = vision.pop("in_channels")
    (staging / "config.json").write_text(json.dumps(cfg, indent=1))
    return str(staging)


def dequantized_reference(qdir, out):
    cfg = json.loads((qdir / "config.json").read_text())
    q = cfg.pop("quantization")
    cfg.pop("quantization_config", None)
    weights = {}
    for f in sorted(qdir.glob("model*.safetensors")):
        weights.update(mx.load(str(f)))
    ref = {}
    quantized = 0
    for name, v in weights.items():
        if name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] + ".weight" in weights:
            continue
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix and prefix + ".scales" in weights:
            layer = q[prefix] if isinstance(q.get(prefix), dict) else q
            # In f32: `scale * q + bias` exactly as edgevlm computes it (in bf16 MLX would round it).
            v = mx.dequantize(v, weights[prefix + ".scales"].astype(mx.float32),
                              weights[prefix + ".biases"].astype(mx.float32),
                              group_size=layer["group_size"], bits=layer["bits"])
            quantized += 1
        elif name.endswith("patch_embedding.weight") and v.ndim == 4:
            v = v.transpose(0, 3, 1, 2)
        elif name.endswith("patch_embed.proj.weight") and v.ndim == 5:
            v = v.transpose(0, 4, 1, 2, 3)
        ref[hf_name(name)] = v
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), ref, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in qdir.iterdir():
        if f.suffix in (".json", ".jinja", ".txt") and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, out / f.name)
    return quantized, len(ref)


def run(binary, model, image, steps, threads):
    out = subprocess.run(
        [binary, "run", "--model", model, "--image", image, "--prompt", PROMPT, "--max-tokens",
         str(steps), "--logprobs", "5", "--threads", str(threads), "--json"],
        capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"edgevlm run on {model} failed:\n{out.stderr[-3000:]}")
    content = json.loads(out.stdout)["choices"][0]["logprobs"]["content"]
    return [(s["token"], {t["token"]: t["logprob"] for t in s["top_logprobs"]}) for s in content]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(CACHE / "smolvlm-256m-random"))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--quant-predicate", default=None,
                   help="mlx-vlm's mixed recipe, e.g. mixed_4_6 (6-bit layers among 4-bit ones)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--image", default=str(ROOT / "tests" / "fixtures" / "images" / "wide.png"))
    p.add_argument("--tag", default="", help="name prefix of the cached outputs (default: none, SmolVLM)")
    a = p.parse_args()
    tag = a.quant_predicate or f"q{a.bits}"
    qdir = CACHE / f"mlx-vlm-{a.tag}{tag}"
    refdir = CACHE / f"mlx-vlm-{a.tag}{tag}-dequantized"
    for d in (qdir, refdir):
        shutil.rmtree(d, ignore_errors=True)
    recipe = ["--quant-predicate", a.quant_predicate] if a.quant_predicate else ["--q-bits", str(a.bits)]
    source = mlx_vlm_input(a.model, CACHE / f"mlx-vlm-{a.tag}input")
    subprocess.run([sys.executable, "-m", "mlx_vlm", "convert", "--hf-path", source, "--mlx-path", str(qdir),
                    "-q", *recipe], check=True, capture_output=True)
    quantized, total = dequantized_reference(qdir, refdir)
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "edgevlm-cli"], check=True, cwd=ROOT)
    binary = str(ROOT / "target" / "release" / "edgevlm")
    got = run(binary, str(qdir), a.image, a.steps, a.threads)
    want = run(binary, str(refdir), a.image, a.steps, a.threads)
    worst, agree = 0.0, 0
    for (tq, lq), (tr, lr) in zip(got, want):
        if tq != tr:
            break
        agree += 1
        worst = max([worst] + [abs(v - lq[k]) for k, v in lr.items() if k in lq])
    print(f"mlx-vlm {tag} checkpoint: {quantized} of {total} tensors quantized by MLX; "
          f"edgevlm on it against MLX's dequantized values: {agree}/{len(want)} greedy steps agree, "
          f"max |d logprob| over the top-5 {worst:.3e}")
    if agree != len(want) or worst > 1e-2:
        sys.exit("the quantized checkpoint does not follow its dequantized reference")


if __name__ == "__main__":
    main()
