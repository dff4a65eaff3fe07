#!/usr/bin/env python3
"""Whisper fixtures and golden outputs from the reference, transformers 5.24 (scripts/requirements.txt):

    bash scripts/fetch-whisper.sh            # the real base weights, converted (needed for the goldens)
    ~/.cache/edgevlm/venv/bin/python scripts/make_whisper_fixtures.py

Writes:
- tests/fixtures/audio/q16k.wav, q22k.wav: two spoken questions from espeak-ng (Debian), one resampled
  to 16 kHz by sox (features compared exactly), one at espeak's own 22.05 kHz (through our resampler).
- models/tiny-whisper/: a random WhisperForConditionalGeneration (d_model 32, 2+2 layers, float16
  weights) with the generation/preprocessor configs of the base conversion (its tokenizer is the base
  model's, linked by the tests).
- tests/fixtures/whisper/*.json + *.bin: WhisperFeatureExtractor features of q16k.wav, the tiny
  model's and the real base model's encoder outputs, teacher-forced decoder logits and greedy tokens.
  Large arrays are stored strided (every `stride`-th value, raw little-endian f32) to stay small.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUDIO = os.path.join(ROOT, "tests/fixtures/audio")
GOLD = os.path.join(ROOT, "tests/fixtures/whisper")
TINY = os.path.join(ROOT, "models/tiny-whisper")
BASE = os.path.join(os.environ.get("EDGEVLM_CACHE", os.path.expanduser("~/.cache/edgevlm")), "whisper-base")

SENTENCES = {
    "q16k": ("What color is the car parked next to the red house?", 150, 16000),
    "q22k": ("How many people are standing on the bridge?", 160, None),
    # More clips for greedy tokens only (16 kHz: the features are transformers' own input).
    "names16k": ("My name is Maria Lopez and I live in Madrid.", 150, 16000),
    "shop16k": ("We need milk, eggs, bread and some fresh apples.", 140, 16000),
    "sign16k": ("Can you read the sign above the bakery door?", 170, 16000),
}
GREEDY_ONLY = ("names16k", "shop16k", "sign16k")


def speak():
    os.makedirs(AUDIO, exist_ok=True)
    for name, (text, speed, rate) in SENTENCES.items():
        out = os.path.join(AUDIO, name + ".wav")
        raw = out + ".espeak.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", str(speed), "-w", raw, text], check=True)
        if rate:
            subprocess.run(["sox", raw, "-r", str(rate), "-b", "16", out], check=True)
            os.remove(raw)
        else:
            os.replace(raw, out)


def read_wav16(path):
    import wave
    with wave.open(path) as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return data.astype(np.float32) / 32768.0, w.getframerate()


def save(name, array, stride):
    flat = np.ascontiguousarray(np.asarray(array, dtype=np.float32).reshape(-1))
    flat[::stride].astype("<f4").tofile(os.path.join(GOLD, name + ".bin"))
    return {"file": name + ".bin", "shape": list(np.asarray(array).shape), "stride": stride}


def goldens(model_dir, tag, features, prompt, steps, strides):
    model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    x = torch.from_numpy(features)[None]
    with torch.no_grad():
        enc = model.model.encoder(x).last_hidden_state[0]
        out = model.generate(x, language="en", task="transcribe", max_new_tokens=steps,
                             return_dict_in_generate=True)
        seq = out.sequences[0].tolist()
        # transformers returns the generated tokens (after the forced prompt) here.
        generated = [t for t in seq if t not in prompt] if seq[:len(prompt)] != prompt else seq[len(prompt):]
        ids = torch.tensor([prompt + generated])
        logits = model(encoder_outputs=(enc[None],), decoder_input_ids=ids).logits[0]
        lang_logits = model(encoder_outputs=(enc[None],), decoder_input_ids=ids[:, :1]).logits[0, -1]
    lang_ids = json.load(open(os.path.join(model_dir, "generation_config.json")))["lang_to_id"]
    best = max(lang_ids.items(), key=lambda kv: lang_logits[kv[1]].item())
    return {
        "encoder": save(f"{tag}-encoder", enc.numpy(), strides[0]),
        "logits": save(f"{tag}-logits", logits.numpy(), strides[1]),
        "logits_top5": [[[int(i), float(v)] for v, i in zip(*torch.topk(row, 5))] for row in logits],
        "prompt": prompt,
        "generated": generated,
        "detected_language": best[0],
    }


def main():
    speak()
    os.makedirs(GOLD, exist_ok=True)
    if not os.path.exists(os.path.join(BASE, "model.safetensors")):
        sys.exit(f"{BASE} is missing: run scripts/fetch-whisper.sh first")
    torch.manual_seed(0)
    cfg = WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        vocab_size=51865, num_mel_bins=80, max_source_positions=1500,
                        max_target_positions=448, pad_token_id=50257, bos_token_id=50257,
                        eos_token_id=50257, decoder_start_token_id=50258)
    tiny = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in tiny.parameters():
            p.mul_(4.0)  # std 0.08 instead of 0.02: logits that tell tokens apart
    os.makedirs(TINY, exist_ok=True)
    tiny.half().save_pretrained(TINY)
    # WhisperConfig's own suppress lists (begin: [220, 50256]) are not the tokenizer's; generation
    # settings come from the base model's generation_config.json, copied below.
    with open(os.path.join(TINY, "config.json")) as f:
        tiny_cfg = json.load(f)
    for key in ("begin_suppress_tokens", "suppress_tokens"):
        tiny_cfg.pop(key, None)
    with open(os.path.join(TINY, "config.json"), "w") as f:
        json.dump(tiny_cfg, f, indent=2)
    for f in ("generation_config.json", "preprocessor_config.json"):
        shutil.copy(os.path.join(BASE, f), os.path.join(TINY, f))
    # The tokenizer (1.6 MB) is not committed: tests link the base model's (scripts/fetch-whisper.sh).
    shutil.copy(os.path.join(BASE, "tokenizer.json"), os.path.join(TINY, "tokenizer.json"))
    # save_pretrained wrote a generation_config of its own; the base one (language ids) replaces it.

    fe = WhisperFeatureExtractor.from_pretrained(BASE)
    audio, rate = read_wav16(os.path.join(AUDIO, "q16k.wav"))
    assert rate == 16000
    features = fe(audio, sampling_rate=16000, return_tensors="np").input_features[0]
    assert np.all(features[:, 400:] == features[0, -1]), "the fixture's speech runs past 4 s"
    prompt = [50258, 50259, 50359, 50363]  # <|startoftranscript|><|en|><|transcribe|><|notimestamps|>
    gold = {
        "transformers": __import__("transformers").__version__,
        "audio": "tests/fixtures/audio/q16k.wav",
        # The first 400 frames whole (3.5 s of speech, then silence); every later frame is silence,
        # one value (checked here), so tests rebuild transformers' exact features.
        "features": dict(save("q16k-features", features[:, :400], 1), frames=int(features.shape[1]),
                         tail_value=float(features[0, -1])),
        "tiny": goldens(TINY, "tiny", features, prompt, 12, (7, 13)),
        "base": goldens(BASE, "base", features, prompt, 30, (37, 101)),
    }
    from transformers import WhisperTokenizer
    tok = WhisperTokenizer.from_pretrained(BASE)
    gold["base"]["text"] = tok.decode(gold["base"]["generated"], skip_special_tokens=True)
    # The 22.05 kHz clip: transformers is handed our reference resampling (torchaudio-free: numpy's
    # own band-limited FFT resampling), its transcript the check.
    audio22, rate22 = read_wav16(os.path.join(AUDIO, "q22k.wav"))
    n16 = round(len(audio22) * 16000 / rate22)
    spec = np.fft.rfft(audio22)
    keep = n16 // 2 + 1
    audio16 = np.fft.irfft(spec[:keep], n16) * (n16 / len(audio22))
    f22 = fe(audio16.astype(np.float32), sampling_rate=16000, return_tensors="np").input_features
    model = WhisperForConditionalGeneration.from_pretrained(BASE, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.from_numpy(f22), language="en", task="transcribe", max_new_tokens=40)
    gold["base_q22k_text"] = tok.decode(out[0], skip_special_tokens=True)
    # Greedy tokens of the real base weights on more clips (language given, no timestamps).
    gold["base_greedy"] = {}
    for name in GREEDY_ONLY:
        clip, clip_rate = read_wav16(os.path.join(AUDIO, name + ".wav"))
        assert clip_rate == 16000
        f = fe(clip, sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            out = model.generate(f, language="en", task="transcribe", max_new_tokens=60)
        tokens = [t for t in out[0].tolist() if t < 50257]
        gold["base_greedy"][name] = {"tokens": tokens, "text": tok.decode(tokens, skip_special_tokens=True)}
    os.remove(os.path.join(TINY, "tokenizer.json"))
    with open(os.path.join(GOLD, "goldens.json"), "w") as f:
        json.dump(gold, f, indent=1)
    print(json.dumps({k: gold[k] for k in ("base_q22k_text",)}), gold["base"]["text"], gold["base"]["generated"],
          gold["tiny"]["generated"])


if __name__ == "__main__":
    main()
