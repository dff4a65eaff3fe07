#!/usr/bin/env python3
"""Build the tiny random-weight Idefics3 model and the golden outputs the Rust parity tests check.

Reference: HF transformers (pinned in scripts/requirements.txt), with the PIL-based
`Idefics3ImageProcessorPil` and the real SmolVLM-256M tokenizer, chat template and processor settings
read from ../shared/models/smolvlm-256m-instruct.

Writes (committed, ~7 MB in all):
  models/tiny-idefics3/            config.json, generation_config.json, model.safetensors (bf16)
  tests/fixtures/images/           the input images
  tests/fixtures/golden/           processor.json, template.json, text.json, logits.safetensors

Run:  scripts/setup-python.sh && ~/.cache/edgevlm/venv/bin/python scripts/make_fixtures.py
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from transformers import AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "models" / "smolvlm-256m-instruct"
MODEL_DIR = ROOT / "models" / "tiny-idefics3"
IMG_DIR = ROOT / "tests" / "fixtures" / "images"
GOLD_DIR = ROOT / "tests" / "fixtures" / "golden"
TOPK = 16
GEN_TOKENS = 20


def make_images():
    """Deterministic test images: photo-like noise at several shapes, grey, alpha, and a large one."""
    IMG_DIR.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)

    def noisy(w, h, channels=3):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([(x * 255 / max(w - 1, 1)), (y * 255 / max(h - 1, 1)), ((x + y) * 127 / max(w + h, 1))], -1)
        base = base[..., :channels] if channels <= 3 else base
        noise = rng.integers(-40, 40, size=base.shape)
        return np.clip(base + noise, 0, 255).astype(np.uint8)

    images = {}
    images["small.png"] = Image.fromarray(noisy(40, 30))
    images["wide.png"] = Image.fromarray(noisy(300, 60))
    images["tall.png"] = Image.fromarray(noisy(50, 260))
    images["grey.png"] = Image.fromarray(noisy(64, 48)[..., 0], mode="L")
    rgba = np.concatenate([noisy(120, 90), rng.integers(0, 256, size=(90, 120, 1)).astype(np.uint8)], -1)
    rgba[:10, :, 3] = 0  # fully transparent band
    rgba[10:20, :, 3] = 255  # fully opaque band
    images["alpha.png"] = Image.fromarray(rgba, mode="RGBA")
    # Large enough to be downscaled (longest edge > 2048) and split: smooth content compresses well.
    big = Image.new("RGB", (2300, 1500), (30, 60, 90))
    d = ImageDraw.Draw(big)
    r = np.random.default_rng(7)
    for _ in range(60):
        x0, y0 = int(r.integers(0, 2200)), int(r.integers(0, 1400))
        d.rectangle([x0, y0, x0 + int(r.integers(20, 400)), y0 + int(r.integers(20, 300))],
                    fill=tuple(int(c) for c in r.integers(0, 256, 3)))
    for i in range(0, 2300, 7):
        d.line([(i, 0), (2300 - i, 1500)], fill=(i % 256, 255 - i % 256, 128), width=1)
    images["large.png"] = big
    for name, im in images.items():
        im.save(IMG_DIR / name, optimize=True)
    # Re-open from disk, exactly as a user's file would be.
    return {name: Image.open(IMG_DIR / name) for name in images}


def tiny_config(real):
    text = dict(real["text_config"])
    for k in ["perceiver_config", "transformers.js_config", "_name_or_path", "architectures"]:
        text.pop(k, None)
    text.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, max_position_embeddings=4096)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=512, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    return Idefics3Config(text_config=text, vision_config=vision, scale_factor=real["scale_factor"],
                          image_token_id=real["image_token_id"], tie_word_embeddings=False,
                          vocab_size=real["vocab_size"])


def randomize(model, seed=0):
    """Weights with enough spread that logits have clear margins (HF's 0.02 init makes them flat)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p.shape[1] if p.dim() == 2 else int(np.prod(p.shape[1:]))
                std = 0.6 if "embed" in name or "position_embedding" in name else 1.0 / fan_in ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def sha256_f32(a):
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def main():
    torch.set_grad_enabled(False)
    if not SHARED.is_dir():
        sys.exit(f"missing {SHARED}: the real SmolVLM tokenizer/processor files are needed")
    real = json.loads((SHARED / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(SHARED)
    image_processor = Idefics3ImageProcessorPil.from_pretrained(SHARED)
    chat_template = json.loads((SHARED / "chat_template.json").read_text())["chat_template"]
    image_seq_len = json.loads((SHARED / "processor_config.json").read_text())["image_seq_len"]
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=image_seq_len, chat_template=chat_template)

    # ---- tiny model -------------------------------------------------------------------------
    torch.manual_seed(0)
    cfg = tiny_config(real)
    model = Idefics3ForConditionalGeneration(cfg)
    randomize(model)
    model = model.to(torch.bfloat16)
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(MODEL_DIR, safe_serialization=True)
    (MODEL_DIR / "generation_config.json").write_text(
        (SHARED / "generation_config.json").read_text())
    # Reload in f32: the reference runs on exactly the bf16 values, upcast.
    model = Idefics3ForConditionalGeneration.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()

    images = make_images()
    GOLD_DIR.mkdir(parents=True, exist_ok=True)

    # ---- processor ------------------------------------------------------------------------
    def conv(n_images, text="Describe this image."):
        return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]

    proc_gold = []
    for name in sorted(images):
        for split in (True, False):
            prompt = processor.apply_chat_template(conv(1), add_generation_prompt=True)
            out = processor(text=prompt, images=[images[name]], return_tensors="np",
                            do_image_splitting=split)
            pv = out["pixel_values"][0]
            mask = out["pixel_attention_mask"][0]
            proc_gold.append({
                "image": name, "split": split, "prompt": prompt,
                "input_ids": out["input_ids"][0].tolist(),
                "pixel_values_shape": list(pv.shape), "pixel_values_sha256": sha256_f32(pv),
                "pixel_values_sample": pv.reshape(-1)[::9973].astype(float).tolist(),
                "pixel_attention_mask_sum": int(mask.sum()), "pixel_attention_mask_shape": list(mask.shape),
            })
            print(name, split, pv.shape, len(proc_gold[-1]["input_ids"]))
    (GOLD_DIR / "processor.json").write_text(json.dumps(proc_gold))

    # ---- chat template --------------------------------------------------------------------
    conversations = {
        "single_image": conv(1),
        "text_only": [{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}],
        "system_multi_turn": [
            {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A gradient."}]},
            {"role": "user", "content": [{"type": "text", "text": "And the colours?"}]},
        ],
        "multi_image_interleaved": [
            {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                         {"type": "text", "text": " with "}, {"type": "image"},
                                         {"type": "text", "text": "."}]},
        ],
    }
    template_gold = []
    for name, messages in conversations.items():
        for agp in (True, False):
            template_gold.append({"name": name, "add_generation_prompt": agp, "messages": messages,
                                  "rendered": processor.apply_chat_template(messages, add_generation_prompt=agp)})
    (GOLD_DIR / "template.json").write_text(json.dumps(template_gold, indent=1))

    # ---- logits ----------------------------------------------------------------------------
    tensors = {}
    cases = []
    for case, image_name, messages in [
        ("image_wide", "wide.png", conv(1)),
        ("text_only", None, conversations["text_only"]),
        ("two_images", "small.png+tall.png", conversations["multi_image_interleaved"]),
    ]:
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        imgs = [images[n] for n in image_name.split("+")] if image_name else None
        inputs = processor(text=prompt, images=imgs, return_tensors="pt")
        gen = model.generate(**inputs, max_new_tokens=GEN_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=2)
        prompt_len = inputs["input_ids"].shape[1]
        cont = gen[0, prompt_len:].tolist()
        full = torch.tensor([inputs["input_ids"][0].tolist() + cont])
        kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        logits = model(input_ids=full, **kw).logits[0].float()
        steps = logits[prompt_len - 1: prompt_len - 1 + len(cont)]
        top = torch.topk(steps, TOPK, dim=-1)
        tensors[f"{case}.last_prompt_logits"] = logits[prompt_len - 1].contiguous()
        tensors[f"{case}.topk_values"] = top.values.contiguous()
        tensors[f"{case}.topk_ids"] = top.indices.to(torch.int64).contiguous()
        cases.append({"case": case, "images": image_name.split("+") if image_name else [],
                      "messages": messages, "prompt_ids": inputs["input_ids"][0].tolist(),
                      "continuation": cont})
        print(case, prompt_len, cont)

    # Vision encoder with a partially padded tile (exercises the patch mask and position bucketing).
    px = processor.image_processor(images=[images["small.png"]], return_tensors="pt", do_image_splitting=False)
    pv = px["pixel_values"][0]
    pmask = torch.zeros((1, 512, 512), dtype=torch.long)
    pmask[:, :300, :200] = 1
    pv = pv * pmask[:, None]
    feats = model.model.get_image_features(pv[None], pmask[None]).pooler_output[0]
    # The Rust test rebuilds these inputs from small.png (unsplit) and the mask rectangle below.
    tensors["masked_tile.features"] = feats.float().contiguous()

    save_file(tensors, GOLD_DIR / "logits.safetensors")
    (GOLD_DIR / "text.json").write_text(json.dumps({"topk": TOPK, "cases": cases,
                                                    "masked_tile": {"image": "small.png", "rows": 300, "cols": 200}}))
    print("done")


if __name__ == "__main__":
    main()
