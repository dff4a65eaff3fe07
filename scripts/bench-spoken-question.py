#!/usr/bin/env python3
"""Time to first token of a spoken question about a 13-tile image against the same question typed:

    python3 scripts/bench-spoken-question.py [--rounds 3] [--threads 2]

Both runs are `edgevlm run` on the full-size random SmolVLM-256M (`--quant q4 --skip-vision`, the
folder scripts/compare_full_size.py writes) with the same 512x384 image (13 tiles of 512x512) and one
answer token, so the wall time is the time to first token, model loading included. The spoken run
adds `--audio tests/fixtures/audio/q16k.wav --speech-model <Whisper base>` (scripts/fetch-whisper.sh):
loading Whisper and transcribing the question come before the image. Alternated; medians.
"""
import argparse
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EDGEVLM_CACHE", Path.home() / ".cache/edgevlm"))
BIN = ROOT / "target/release/edgevlm"
QUESTION = "What color is the car park next to the red house?"


def write_png(path, w, h):
    spec = importlib.util.spec_from_file_location("bench_vs_llamacpp", ROOT / "scripts/bench-vs-llamacpp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_png(path, w, h)


def timed(args):
    t0 = time.time()
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(map(str, args))} failed: {out.stderr}")
    return time.time() - t0, out.stderr


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    vlm = CACHE / "smolvlm-256m-random"
    if not (vlm / "model.safetensors").exists():
        sys.exit(f"{vlm} is missing: run scripts/compare_full_size.py once (it writes the random weights)")
    whisper = subprocess.run(["bash", str(ROOT / "scripts/fetch-whisper.sh")], capture_output=True, text=True,
                             check=True).stdout.strip()
    image = CACHE / "image-512x384.png"
    if not image.exists():
        write_png(image, 512, 384)
    common = [str(BIN), "run", "--model", str(vlm), "--quant", "q4", "--skip-vision", "--image", str(image),
              "--max-tokens", "1", "--temperature", "0", "--threads", str(a.threads), "-v"]
    typed, spoken, speech_ms = [], [], []
    for _ in range(a.rounds):
        t, _ = timed(common + ["--prompt", QUESTION])
        typed.append(t)
        t, err = timed(common + ["--audio", str(ROOT / "tests/fixtures/audio/q16k.wav"), "--speech-model", whisper])
        spoken.append(t)
        m = re.search(r'speech: "(.*)" \((\d+) ms\)', err)
        if not m or m.group(1) != QUESTION:
            sys.exit(f"unexpected transcription: {err[:300]}")
        speech_ms.append(float(m.group(2)))
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    t, s = statistics.median(typed), statistics.median(spoken)
    print(f"CPU: {cpu}; {a.threads} threads; {a.rounds} rounds alternated")
    print(f"typed question, 13-tile image: time to first token {t:.2f} s (runs {', '.join(f'{x:.2f}' for x in typed)})")
    print(f"spoken question, same image:   time to first token {s:.2f} s (runs {', '.join(f'{x:.2f}' for x in spoken)}); "
          f"loading Whisper and transcribing {statistics.median(speech_ms):.0f} ms")
    print(f"spoken / typed: {s / t:.2f} (target <= 1.3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
