#!/usr/bin/env python3
"""Full-size check: random weights at the real Qwen2.5-VL-3B-Instruct shapes (or, with `--family
qwen2-vl`, Qwen2-VL-2B-Instruct's), transformers vs edgevlm.

1. Builds (once) a random-weight model with the published configuration (below),
   saved in bf16 with the real tokenizer and chat template (scripts/fetch-qwen-tokenizer.sh) and the
   real preprocessor settings into a cache outside git (~/.cache/edgevlm/qwen2.5-vl-3b-random, or
   $EDGEVLM_QWEN_FULL_MODEL): ~7.5 GB. The same folder is the input for speed and memory benchmarks.
2. Runs transformers (f32, PIL image processor) greedily for 16 steps on a 1024x768 image + prompt and
   records the top-5 logprobs of each step.
3. Runs the edgevlm CLI (`--logprobs 5 --json`, f32) on the same inputs and compares step by step.

Needs ~16 GB of memory (the f32 reference), one model at a time.
Usage: python scripts/compare_qwen_full_size.py [--edgevlm target/release/edgevlm] [--image PATH]
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import (AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2VLConfig, Qwen2VLForConditionalGeneration)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_full_size import compare_steps, run_edgevlm  # noqa: E402
from make_qwen_fixtures import ImageTextProcessor, randomize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("EDGEVLM_QWEN_FULL_MODEL",
                            Path.home() / ".cache" / "edgevlm" / "qwen2.5-vl-3b-random"))
STEPS = 16
TOP = 5
PROMPT = "Describe this image."
# Qwen2.5-VL-3B-Instruct's config.json and preprocessor_config.json as published.
TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
            num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
            rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
VISION = dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
              in_channels=3, out_hidden_size=2048, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
              tokens_per_second=2)
# Qwen2-VL-2B-Instruct's.
TEXT_2B = dict(TEXT, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
               num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768)
VISION_2B = dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, in_channels=3,
                 hidden_act="quick_gelu", patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
FAMILIES = {
    "qwen2.5-vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, TEXT, VISION, "qwen2.5-vl-3b-random",
                   "EDGEVLM_QWEN_FULL_MODEL"),
    "qwen2-vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, TEXT_2B, VISION_2B, "qwen2-vl-2b-random",
                 "EDGEVLM_QWEN2_FULL_MODEL"),
}
PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}


def build_model(family="qwen2.5-vl"):
    global CACHE
    config_cls, model_cls, text, vision, folder, env = FAMILIES[family]
    CACHE = Path(os.environ.get(env, Path.home() / ".cache" / "edgevlm" / folder))
    if (CACHE / "model.safetensors.index.json").exists() or (CACHE / "model.safetensors").exists():
        return model_cls
    print(f"building random full-size {family} in {CACHE}", flush=True)
    tok_dir = Path(subprocess.check_output(["bash", str(ROOT / "scripts" / "fetch-qwen-tokenizer.sh")],
                                           text=True).strip())
    cfg = config_cls(text_config=text, vision_config=vision, image_token_id=151655,
                           video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
                           tie_word_embeddings=True)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = model_cls(cfg)
    torch.set_default_dtype(torch.float32)
    randomize(model, seed=1)
    model.save_pretrained(CACHE, safe_serialization=True)
    del model
    gc.collect()
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.json"]:
        (CACHE / f).write_bytes((tok_dir / f).read_bytes())
    (CACHE / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
    (CACHE / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643, "do_sample": False}))
    return model_cls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--edgevlm", default=str(ROOT / "target" / "release" / "edgevlm"))
    ap.add_argument("--image", default=None, help="default: tests/fixtures/images/large.png at 1024x768")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--edgevlm-args", default="", help="extra `edgevlm run` flags, space-separated")
    ap.add_argument("--family", choices=sorted(FAMILIES), default="qwen2.5-vl")
    ap.add_argument("--skip-reference", action="store_true",
                    help="reuse the transformers result saved by an earlier run")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    model_cls = build_model(args.family)
    image = args.image
    if image is None:
        image = str(CACHE / "photo-1024x768.png")
        if not Path(image).exists():
            Image.open(ROOT / "tests" / "fixtures" / "images" / "large.png").convert("RGB") \
                .resize((1024, 768), Image.BICUBIC).save(image)

    ref_path = CACHE / f"reference-{Path(image).stem}.json"
    if args.skip_reference and ref_path.exists():
        ref = json.loads(ref_path.read_text())
    else:
        tokenizer = AutoTokenizer.from_pretrained(CACHE)
        chat_template = json.loads((CACHE / "chat_template.json").read_text())["chat_template"]
        ip = Qwen2VLImageProcessorPil(**{k: v for k, v in PREPROCESSOR.items()
                                         if k not in ("image_processor_type", "processor_class")})
        processor = ImageTextProcessor(image_processor=ip, tokenizer=tokenizer, chat_template=chat_template)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=prompt, images=[Image.open(image)], return_tensors="pt")
        model = model_cls.from_pretrained(CACHE, dtype=torch.float32).eval()
        t0 = time.time()
        out = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                             pad_token_id=151643)
        hf_s = time.time() - t0
        n = inputs["input_ids"].shape[1]
        steps = []
        for logits in out.logits:
            lp = torch.log_softmax(logits[0].float(), -1)
            top = torch.topk(lp, TOP)
            steps.append([[i, v] for i, v in zip(top.indices.tolist(), top.values.tolist())])
        ref = {"prompt_tokens": n, "tokens": out.sequences[0, n:].tolist(), "steps": steps, "seconds": hf_s,
               "decoded": {str(i): tokenizer.decode([i]) for i in
                           set(out.sequences[0, n:].tolist()) | {i for s in steps for i, _ in s}}}
        ref_path.write_text(json.dumps(ref))
        del model, out
        gc.collect()

    ev_content, ev_s = run_edgevlm(args.edgevlm, CACHE, image, args.threads,
                                   ["--ignore-eos", *args.edgevlm_args.split()])
    decoded = {}
    for i, text in ref["decoded"].items():
        decoded.setdefault(text, int(i))
    compare_steps(ref["tokens"], [{i: v for i, v in step} for step in ref["steps"]], decoded, ev_content)
    print(f"prompt tokens {ref['prompt_tokens']}; wall time: transformers (image + 16 steps) {ref['seconds']:.1f}s, "
          f"edgevlm (load + image + 16 steps) {ev_s:.1f}s")


if __name__ == "__main__":
    main()
