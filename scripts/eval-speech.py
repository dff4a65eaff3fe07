#!/usr/bin/env python3
"""Word error rate and speed of `edgevlm transcribe` against faster-whisper on the same Whisper base
weights (scripts/fetch-whisper.sh: the HF conversion for edgevlm, the CTranslate2 original for
faster-whisper), same clips, greedy, English, 2 threads:

    python3 -m venv ~/.cache/edgevlm/venv-audio && ~/.cache/edgevlm/venv-audio/bin/pip install \
        -r scripts/requirements-audio.txt
    ~/.cache/edgevlm/venv-audio/bin/python scripts/eval-speech.py [--rounds 2] [--skip-wer] [--skip-speed]
        [--isa native|avx2]

Needs espeak-ng and sox (Debian). The clips: 20 sentences spoken by espeak-ng (22.05 kHz), the same
resampled by sox to 8 kHz and 48 kHz; for speed, the sentences joined into a 30 s and a 5 min clip
(16 kHz). WER: lower-cased, punctuation stripped, per set and per sentence. Speed: real-time factor
(transcription seconds / audio seconds, model loading excluded) and peak RSS of a process that loads
and transcribes, f32 and int8 (edgevlm --quant q8; faster-whisper compute_type int8), alternated.
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EDGEVLM_CACHE", Path.home() / ".cache/edgevlm"))
CLIPS = CACHE / "speech-eval"
BIN = ROOT / "target/release/edgevlm"

SENTENCES = [
    "What color is the car parked next to the red house?",
    "How many people are standing on the bridge?",
    "Is there a dog sleeping under the wooden table?",
    "Can you read the sign above the bakery door?",
    "What is the woman in the blue coat holding?",
    "Describe the weather in this picture.",
    "Are the street lights on or off?",
    "Which animal is closest to the camera?",
    "My name is Maria Lopez and I live in Madrid.",
    "Please ask Doctor Patel to call me back tomorrow morning.",
    "Thomas Anderson flew from Boston to Chicago on Friday.",
    "The meeting with Sarah and Kenji starts at half past nine.",
    "I left my keys on the kitchen counter again.",
    "Could you turn the music down a little?",
    "We need milk, eggs, bread and some fresh apples.",
    "The train to the airport leaves every twenty minutes.",
    "It is going to rain later, so take an umbrella.",
    "How far is it from here to the nearest pharmacy?",
    "She planted tomatoes and basil in the garden last spring.",
    "Thank you for waiting, your order is almost ready.",
]


def normalize(text):
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    return " ".join(text.split())


def wer(ref, hyp):
    import jiwer
    return jiwer.wer(normalize(ref), normalize(hyp))


def make_clips():
    CLIPS.mkdir(parents=True, exist_ok=True)
    sets = {"22k": [], "8k": [], "48k": []}
    for i, s in enumerate(SENTENCES):
        base = CLIPS / f"s{i:02d}-22k.wav"
        if not base.exists():
            subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(base), s], check=True)
        sets["22k"].append(base)
        for rate, tag in ((8000, "8k"), (48000, "48k")):
            out = CLIPS / f"s{i:02d}-{tag}.wav"
            if not out.exists():
                subprocess.run(["sox", str(base), "-r", str(rate), "-b", "16", str(out)], check=True)
            sets[tag].append(out)
    long = {}
    for secs, tag in ((30, "30s"), (300, "5min")):
        out = CLIPS / f"long-{tag}.wav"
        if not out.exists():
            parts, total = [], 0.0
            while total < secs:
                for p in sets["22k"]:
                    parts.append(str(p))
                    total += float(subprocess.run(["soxi", "-D", str(p)], capture_output=True, text=True,
                                                  check=True).stdout)
                    if total >= secs:
                        break
            subprocess.run(["sox", *parts, "-r", "16000", "-b", "16", str(out), "trim", "0", str(secs)], check=True)
        long[tag] = out
    return sets, long


def edgevlm_transcribe(path, model, quant=None):
    args = [str(BIN), "transcribe", str(path), "--model", str(model), "--language", "en",
            "--temperature", "0", "--threads", "2", "-v"]
    if quant:
        args += ["--quant", quant]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"edgevlm failed on {path}: {out.stderr}")
    m = re.search(r"transcribe (\d+) ms .* peak RSS ([\d.]+) MB", out.stderr)
    return out.stdout.strip(), float(m.group(1)) / 1e3, float(m.group(2))


FW_CHILD = r"""
import json, resource, sys, time
from faster_whisper import WhisperModel
path, model, compute = sys.argv[1:4]
m = WhisperModel(model, device="cpu", compute_type=compute, cpu_threads=2, num_workers=1)
t0 = time.time()
segs, info = m.transcribe(path, language="en", beam_size=1, best_of=1, temperature=0.0,
                          vad_filter=False)
text = "".join(s.text for s in segs).strip()
secs = time.time() - t0
print(json.dumps({"text": text, "secs": secs, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def faster_whisper_transcribe(path, ct2, compute="float32"):
    out = subprocess.run([sys.executable, "-c", FW_CHILD, str(path), str(ct2), compute],
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    if out.returncode != 0:
        sys.exit(f"faster-whisper failed on {path}: {out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["text"], r["secs"], r["rss_mb"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--skip-wer", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--isa", choices=["native", "avx2"], default="native",
                   help="avx2: both engines held to AVX2/FMA (edgevlm's EDGEVLM_NO_* variables and a "
                        "build without the GEMM's AVX-512 kernels; CTranslate2's CT2_FORCE_CPU_ISA=AVX2 "
                        "with MKL_ENABLE_INSTRUCTIONS / ONEDNN_MAX_CPU_ISA)")
    a = p.parse_args()
    global BIN
    if a.isa == "avx2":
        # CTranslate2's own kernels, and the MKL / oneDNN GEMMs it calls (which pick their instruction
        # set themselves: MKL's int8 GEMM would use AVX-512 VNNI otherwise).
        os.environ.update(EDGEVLM_NO_AVX512="1", EDGEVLM_NO_AVXVNNI="1", EDGEVLM_NO_AMX="1",
                          CT2_FORCE_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2",
                          DNNL_MAX_CPU_ISA="AVX2")
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "edgevlm-cli", "--no-default-features",
                        "--target-dir", str(ROOT / "target/avx2")], cwd=ROOT, check=True, capture_output=True)
        BIN = ROOT / "target/avx2/release/edgevlm"
    model = Path(subprocess.run(["bash", str(ROOT / "scripts/fetch-whisper.sh")], capture_output=True, text=True,
                                check=True).stdout.strip())
    ct2 = model / "ct2"
    if not BIN.exists():
        subprocess.run(["cargo", "build", "--release", "-p", "edgevlm-cli"], cwd=ROOT, check=True)
    sets, long = make_clips()
    print(f"CPU: {cpu_name()}; 2 threads; instruction sets: {a.isa}")
    results = {}
    if not a.skip_wer:
        import jiwer
        print("\n| set | precision | edgevlm WER | faster-whisper WER | sentences differing |")
        print("| --- | --- | --- | --- | --- |")
        per_sentence = []
        for ours_q, fw_c, label in ((None, "float32", "f32"), ("q8", "int8", "int8")):
            for tag, clips in sets.items():
                ours, theirs, differ = [], [], 0
                for i, clip in enumerate(clips):
                    t_e, _, _ = edgevlm_transcribe(clip, model, ours_q)
                    t_f, _, _ = faster_whisper_transcribe(clip, ct2, fw_c)
                    ours.append(t_e)
                    theirs.append(t_f)
                    differ += normalize(t_e) != normalize(t_f)
                    w_e, w_f = wer(SENTENCES[i], t_e), wer(SENTENCES[i], t_f)
                    per_sentence.append((label, tag, i, w_e, w_f, t_e, t_f))
                refs = [normalize(r) for r in SENTENCES]
                we = jiwer.wer(refs, [normalize(h) for h in ours])
                wf = jiwer.wer(refs, [normalize(h) for h in theirs])
                results[f"wer_{label}_{tag}"] = (we, wf)
                print(f"| {tag} | {label} | {100 * we:.1f}% | {100 * wf:.1f}% | {differ} of {len(clips)} |",
                      flush=True)
        print("\nPer sentence where either engine erred (precision, set, #, edgevlm WER, faster-whisper WER):")
        for label, tag, i, w_e, w_f, t_e, t_f in per_sentence:
            if w_e or w_f:
                print(f"  {label} {tag} #{i:02d} {100 * w_e:.0f}% / {100 * w_f:.0f}%: {t_e!r} | {t_f!r}")
    if not a.skip_speed:
        print("\n| clip | precision | edgevlm RTF | faster-whisper RTF | ratio | edgevlm peak RSS MB | faster-whisper peak RSS MB |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for tag, clip in long.items():
            dur = float(subprocess.run(["soxi", "-D", str(clip)], capture_output=True, text=True).stdout)
            for ours_q, fw_c, label in ((None, "float32", "f32"), ("q8", "int8", "int8")):
                e_t, f_t, e_m, f_m = [], [], [], []
                for _ in range(a.rounds):
                    _, s, m = edgevlm_transcribe(clip, model, ours_q)
                    e_t.append(s), e_m.append(m)
                    _, s, m = faster_whisper_transcribe(clip, ct2, fw_c)
                    f_t.append(s), f_m.append(m)
                e, f = min(e_t) / dur, min(f_t) / dur
                print(f"| {tag} | {label} | {e:.3f} | {f:.3f} | {e / f:.2f} | {max(e_m):.0f} | {max(f_m):.0f} |",
                      flush=True)
    return 0


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
