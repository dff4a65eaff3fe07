#!/usr/bin/env python3
"""Build the tiny random-weight Qwen2.5-VL and Qwen2-VL models and the golden outputs the Rust parity
tests (tests/qwen_parity.rs) check.

Reference: HF transformers (pinned in scripts/requirements.txt), with the PIL-based
`Qwen2VLImageProcessorPil` and the real Qwen2.5-VL tokenizer and chat template that
scripts/fetch-qwen-tokenizer.sh writes into a cache outside git.

Writes (committed, ~18 MB in all; the 151,936-row embedding tables dominate, hence a 24-wide text model:
each model.safetensors stays under 8 MiB):
  models/tiny-qwen2.5-vl/, models/tiny-qwen2-vl/   config.json, generation_config.json,
                                                    preprocessor_config.json, model.safetensors (bf16)
  tests/fixtures/images/halves.png                  126x70: smart_resize meets round-half-to-even
  tests/fixtures/qwen/                              processor.json, cases.json, logits.safetensors

Run:  scripts/setup-python.sh && ~/.cache/edgevlm/venv/bin/python scripts/make_qwen_fixtures.py
"""
import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5_VLProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

ROOT = Path(__file__).resolve().parent.parent
IMG_DIR = ROOT / "tests" / "fixtures" / "images"
GOLD_DIR = ROOT / "tests" / "fixtures" / "qwen"
GEN_TOKENS = 20
# Qwen2.5-VL-3B-Instruct's preprocessor_config.json, but for max_pixels: 28*28*80 keeps the tiny
# tests' images to at most 80 merged tokens each (the real value, 12845056, is a per-request choice).
PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 62720, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 151655, 151656, 151652, 151653


def text_config(hidden, heads, kv_heads, head_dim, layers, inter, section):
    return dict(vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                max_position_embeddings=4096, rms_norm_eps=1e-6, hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section},
                tie_word_embeddings=True)


def tiny_qwen25():
    vision = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=24,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                  fullatt_block_indexes=[1, 3], hidden_act="silu", in_channels=3, tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text_config(24, 2, 1, 12, 2, 64, [2, 2, 2]), vision_config=vision,
                            image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
                            vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
                            tie_word_embeddings=True)


def tiny_qwen2():
    vision = dict(depth=2, embed_dim=32, hidden_size=24, mlp_ratio=2, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu", in_channels=3)
    return Qwen2VLConfig(text_config=text_config(24, 2, 1, 12, 2, 64, [2, 2, 2]), vision_config=vision,
                         image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
                         vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
                         tie_word_embeddings=True)


def randomize(model, seed=0):
    """Weights with enough spread that logits have clear margins (HF's 0.02 init makes them flat)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                std = 0.1 if "embed_tokens" in name else 1.0 / fan_in ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif ("norm" in name or "ln_q" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


class ImageTextProcessor(Qwen2_5_VLProcessor):
    """The real processor without its video half (whose processor needs torchvision, not installed)."""

    def check_argument_for_proper_class(self, attribute_name, arg):
        if attribute_name == "video_processor" and arg is None:
            return None
        return super().check_argument_for_proper_class(attribute_name, arg)


def sha256_f32(a):
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def conv(n_images, text="Describe this image."):
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def main():
    torch.set_grad_enabled(False)
    tok_dir = Path(subprocess.check_output(["bash", str(ROOT / "scripts" / "fetch-qwen-tokenizer.sh")],
                                           text=True).strip())
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    chat_template = json.loads((tok_dir / "chat_template.json").read_text())["chat_template"]
    image_processor = Qwen2VLImageProcessorPil(**{k: v for k, v in PREPROCESSOR.items()
                                                  if k not in ("image_processor_type", "processor_class")})
    processor = ImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=chat_template)

    halves = np.random.default_rng(7).integers(0, 256, size=(70, 126, 3)).astype(np.uint8)
    Image.fromarray(halves).save(IMG_DIR / "halves.png", optimize=True)
    names = ["small.png", "wide.png", "tall.png", "grey.png", "alpha.png", "large.png", "halves.png"]
    images = {n: Image.open(IMG_DIR / n) for n in names}
    GOLD_DIR.mkdir(parents=True, exist_ok=True)

    # ---- processor (both families share it) -------------------------------------------------
    proc_gold = []
    for name in names:
        for max_pixels in (PREPROCESSOR["max_pixels"], 28 * 28 * 16):
            out = image_processor(images=[images[name]], return_tensors="np",
                                  size={"shortest_edge": PREPROCESSOR["min_pixels"], "longest_edge": max_pixels})
            pv = out["pixel_values"]
            proc_gold.append({"image": name, "max_pixels": max_pixels,
                              "grid_thw": out["image_grid_thw"][0].tolist(),
                              "pixel_values_shape": list(pv.shape), "pixel_values_sha256": sha256_f32(pv),
                              "pixel_values_sample": pv.reshape(-1)[::997].astype(float).tolist()})
            print(name, max_pixels, pv.shape, proc_gold[-1]["grid_thw"])
    (GOLD_DIR / "processor.json").write_text(json.dumps(proc_gold))

    # ---- models ------------------------------------------------------------------------------
    tensors, cases = {}, []
    conversations = {
        "one_image": ("wide.png", conv(1)),
        "two_images": ("halves.png+large.png", [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                         {"type": "text", "text": " with "}, {"type": "image"},
                                         {"type": "text", "text": "."}]}]),
        "text_only": (None, [{"role": "user", "content": "What is 2+2?"}]),
    }
    for family, make, cls in [("qwen2.5-vl", tiny_qwen25, Qwen2_5_VLForConditionalGeneration),
                              ("qwen2-vl", tiny_qwen2, Qwen2VLForConditionalGeneration)]:
        model_dir = ROOT / "models" / f"tiny-{family}"
        torch.manual_seed(0)
        model = cls(make())
        randomize(model)
        model = model.to(torch.bfloat16)
        model_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(model_dir, safe_serialization=True)
        (model_dir / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
             "do_sample": False}, indent=1))
        (model_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
        model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
        for case, (image_names, messages) in conversations.items():
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
            imgs = [images[n] for n in image_names.split("+")] if image_names else None
            inputs = processor(text=prompt, images=imgs, return_tensors="pt")
            gen = model.generate(**inputs, max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS,
                                 do_sample=False, eos_token_id=None, pad_token_id=151643)
            n = inputs["input_ids"].shape[1]
            cont = gen[0, n:].tolist()
            kw = {k: v for k, v in inputs.items() if k not in ("attention_mask",)}
            out = model(**kw)
            position_ids, _ = model.model.get_rope_index(
                inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"))
            tensors[f"{family}.{case}.last_prompt_logits"] = out.logits[0, -1].float().contiguous()
            cases.append({"family": family, "case": case,
                          "images": image_names.split("+") if image_names else [], "messages": messages,
                          "prompt": prompt, "prompt_ids": inputs["input_ids"][0].tolist(),
                          "grid_thw": inputs["image_grid_thw"].tolist() if imgs else [],
                          "position_ids": position_ids[:, 0].tolist(), "continuation": cont})
            print(family, case, n, cont)
    save_file(tensors, GOLD_DIR / "logits.safetensors")
    (GOLD_DIR / "cases.json").write_text(json.dumps(cases))
    print("done")


if __name__ == "__main__":
    main()
