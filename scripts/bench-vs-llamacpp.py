#!/usr/bin/env python3
"""edgevlm against llama.cpp on the same weights, quantization, prompt/generation lengths and thread
count, run alternately; prints each metric as edgevlm / llama.cpp with both medians.

    python3 scripts/bench-vs-llamacpp.py [--threads 2] [--repetitions 3] [--quants Q4_1,Q8_0,Q4_0]
                                         [--models smollm2,smolvlm] [--isa native|avx2]

`--isa avx2` holds both engines to AVX2/FMA/F16C on any machine: edgevlm with EDGEVLM_NO_AVX512=1
EDGEVLM_NO_AVXVNNI=1 EDGEVLM_NO_AMX=1, llama.cpp built without AVX-512, AVX-VNNI or AMX (`LLAMA_ISA=avx2
scripts/build-llamacpp.sh`, a second build beside the native one).

It builds llama.cpp once from the llama-cpp-python sdist (scripts/build-llamacpp.sh), fetches the real
SmolLM2-135M-Instruct Q4_1 GGUF (scripts/fetch-smollm2.sh), expands it to F32 with
`llama-quantize --allow-requantize` and writes Q8_0 / Q4_0 / Q4_1 from that F32 file, all cached
outside git. edgevlm reads those same files (their blocks are loaded exactly, not requantized).
Peak RSS is each process's maximum resident set (GNU time's %M).

Decode speed is measured at two depths, the same for both engines: from an empty context (llama-bench's
plain tg128; edgevlm after a 1-token prompt) and after the prompt (llama-bench `-d <prompt tokens>`;
edgevlm's decode right after its prompt). Attention over the cache makes the second slower for both.

SmolVLM (`--models smolvlm`): the full-size random-weight SmolVLM-256M (scripts/compare_full_size.py
builds it) converted by llama.cpp's own `convert_hf_to_gguf.py` into a text GGUF (F16, then
`llama-quantize` to --vlm-text-quant, Q4_1 by default: 4-bit codes with a scale and a minimum per 32
weights, the layout of edgevlm's `--quant q4` groups of 32) and an F16 mmproj (the vision encoder and
connector). llama.cpp runs `llama-mtmd-cli`; edgevlm runs `bench --quant q4 --skip-vision` (text 4-bit,
vision encoder in the checkpoint's bf16, computed in f32). Both get the same 512x384 image (13 tiles of 512x512
after SmolVLM's resize to a 2048 longest edge), generate --gen-tokens tokens greedily ignoring EOS, and
are timed once per round from a cold start: vision ms per tile (llama.cpp: the median of its
per-tile "batch encoding done" times), time to first token (image encoding plus the prompt pass),
decode tokens/s after the image prompt, peak RSS. llama.cpp's last two are timed on its streamed
output (see `llama_mtmd`).

Qwen2.5-VL (`--models qwen2.5-vl`): the same, on the full-size random-weight Qwen2.5-VL-3B
(scripts/compare_qwen_full_size.py builds it, ~7.5 GB) and a 1024x768 image (one image of 999 tokens
at the default pixel budget); llama.cpp's "batch encoding done" time is its whole image.
"""

import argparse
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("EDGEVLM_CACHE", Path.home() / ".cache" / "edgevlm"))


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def timed(cmd, with_stderr=False):
    """Run `cmd` under GNU time; return (stdout, that process's peak RSS in MB) (and its stderr)."""
    # errors="replace": a random-weight model's answer need not be valid UTF-8.
    proc = subprocess.run(["/usr/bin/time", "-f", "EDGEVLM_MAXRSS_KB=%M", *map(str, cmd)],
                          text=True, errors="replace", capture_output=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{proc.stderr[-2000:]}")
    kb = [int(l.split("=")[1]) for l in proc.stderr.splitlines() if l.startswith("EDGEVLM_MAXRSS_KB=")]
    if with_stderr:
        return proc.stdout, kb[-1] / 1024.0, proc.stderr
    return proc.stdout, kb[-1] / 1024.0


def ensure_models(bin_dir, quants):
    src = Path(sh(["bash", ROOT / "scripts/fetch-smollm2.sh"]).strip())
    out = src.parent / "lcpp"
    out.mkdir(exist_ok=True)
    f32 = out / "f32.gguf"
    if not f32.exists():
        sh([bin_dir / "llama-quantize", "--allow-requantize", src, f32, "F32"])
    files = {}
    for q in quants:
        p = out / f"{q}.gguf"
        if not p.exists():
            sh([bin_dir / "llama-quantize", f32, p, q])
        files[q] = p
    return files


def llama_bench(bin_dir, model, a):
    out, rss = timed([bin_dir / "llama-bench", "-m", model, "-p", a.prompt_tokens, "-n", a.gen_tokens,
                      "-d", f"0,{a.prompt_tokens}", "-t", a.threads, "-r", a.repetitions,
                      "-o", "json"])
    rows = json.loads(out)
    pp = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0 and r["n_depth"] == 0)
    tg = {r["n_depth"]: r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0}
    return {
        "prompt_tokens_per_s": statistics.median(pp["samples_ts"]),
        "decode_tokens_per_s": statistics.median(tg[0]["samples_ts"]),
        "decode_after_prompt_tokens_per_s": statistics.median(tg[a.prompt_tokens]["samples_ts"]),
        "peak_rss_mb": rss,
    }


def edgevlm_bench(binary, model, a):
    def run(prompt_tokens):
        return timed([binary, "bench", "--model", model, "--prompt-tokens", prompt_tokens,
                      "--gen-tokens", a.gen_tokens, "--threads", a.threads,
                      "--repetitions", a.repetitions, "--json", *a.edgevlm_args.split()])
    out, rss = run(a.prompt_tokens)
    r = json.loads(out)
    empty, _ = run(1)
    return {
        "prompt_tokens_per_s": r["prompt_tokens_per_s"],
        "decode_tokens_per_s": json.loads(empty)["decode_tokens_per_s"],
        "decode_after_prompt_tokens_per_s": r["decode_tokens_per_s"],
        "peak_rss_mb": rss,
    }


def edgevlm_vision_math():
    """How edgevlm computes the bf16 vision products on this machine: on AMX tiles (inputs rounded to
    bf16, f32 sums) where the CPU has AMX-BF16 and EDGEVLM_NO_AMX is unset; else as 16-bit integer
    products (`kernels::fixed16`, `vpdpwssd` where AVX-VNNI is present and EDGEVLM_NO_AVXVNNI unset,
    `vpmaddwd` otherwise); in f32 with `--f32-vision` among the edgevlm flags."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if "amx_bf16" in flags and not os.environ.get("EDGEVLM_NO_AMX"):
        return "AMX bf16 products with f32 sums"
    if "avx_vnni" in flags and not os.environ.get("EDGEVLM_NO_AVXVNNI"):
        return "16-bit integer products (AVX-VNNI)"
    return "16-bit integer products (AVX2)"


def venv_python():
    return Path(os.environ.get("EDGEVLM_VENV", CACHE / "venv")) / "bin" / "python"


def write_png(path, width, height):
    """A deterministic RGB test image (gradients and a texture), written with the standard library."""
    rows = []
    for y in range(height):
        row = bytearray([0])
        for x in range(width):
            row += bytes((x * 255 // (width - 1), y * 255 // (height - 1), (x * 7 + y * 13) % 256))
        rows.append(bytes(row))
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"".join(rows), 9)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)


# The vision-language models compared: the random full-size folder (its builder script and cache
# variable), llama.cpp's conversion folder, and the test image size.
VLMS = {
    "smolvlm": dict(folder="smolvlm-256m-random", env="EDGEVLM_FULL_MODEL", builder="compare_full_size",
                    lcpp="smolvlm-256m-random-lcpp", image=(512, 384), name="SmolVLM-256M"),
    "qwen2.5-vl": dict(folder="qwen2.5-vl-3b-random", env="EDGEVLM_QWEN_FULL_MODEL",
                       builder="compare_qwen_full_size", lcpp="qwen2.5-vl-3b-random-lcpp",
                       image=(1024, 768), name="Qwen2.5-VL-3B"),
}


def ensure_vlm(bin_dir, which, text_quant):
    """The random full-size model folder, and llama.cpp's conversion of it: (folder, text GGUF,
    mmproj GGUF, image)."""
    spec = VLMS[which]
    py = venv_python()
    model = Path(os.environ.get(spec["env"], CACHE / spec["folder"]))
    if not any(model.glob("model*.safetensors")):
        sh([py, "-c", f"import sys; sys.path.insert(0, sys.argv[1]); import {spec['builder']} as c; "
            "c.build_model()", ROOT / "scripts"])
    out = CACHE / spec["lcpp"]
    out.mkdir(exist_ok=True)
    convert = CACHE / "llama.cpp-0.3.36" / "src" / "convert_hf_to_gguf.py"
    text_f16, mmproj = out / "text-f16.gguf", out / "mmproj-f16.gguf"
    if not text_f16.exists():
        sh([py, convert, model, "--outtype", "f16", "--outfile", text_f16])
    if not mmproj.exists():
        sh([py, convert, model, "--mmproj", "--outtype", "f16", "--outfile", mmproj])
    text = out / f"text-{text_quant}.gguf"
    if not text.exists():
        sh([bin_dir / "llama-quantize", text_f16, text, text_quant])
    w, h = spec["image"]
    image = out / f"image-{w}x{h}.png"
    if not image.exists():
        write_png(image, w, h)
    return model, text, mmproj, image


VLM_PROMPT = "Describe this image."


def llama_mtmd(bin_dir, text, mmproj, image, a):
    """One cold `llama-mtmd-cli` run. Its per-tile encode times come from its log; this build prints no
    llama_perf summary, so the first generated token and decode speed are timed on its streamed
    stdout: time to first token = first output byte - the log time of its first image encoding
    (its image preprocessing, before that line, is left out), decode tokens/s = (n - 1) / (last
    output byte - first output byte)."""
    import tempfile
    import time
    cmd = ["/usr/bin/time", "-f", "EDGEVLM_MAXRSS_KB=%M", *map(str, [
        bin_dir / "llama-mtmd-cli", "-m", text, "--mmproj", mmproj, "--image", image, "-p", VLM_PROMPT,
        "-n", a.gen_tokens, "-t", a.threads, "--temp", "0", "--ignore-eos"])]
    with tempfile.TemporaryFile() as errf:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf)
        first = last = None
        while True:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            now = time.monotonic() - t0
            if first is None and chunk.strip():
                first = now
            if first is not None:
                last = now
        proc.wait()
        errf.seek(0)
        err = errf.read().decode("utf-8", "replace")
    if proc.returncode != 0:
        sys.exit(f"llama-mtmd-cli failed:\n{err[-3000:]}")
    kb = [int(l.split("=")[1]) for l in err.splitlines() if l.startswith("EDGEVLM_MAXRSS_KB=")]
    tiles = [float(m) for m in re.findall(r"batch encoding done in (\d+(?:\.\d+)?) ms", err)]
    start = re.search(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) I encoding mtmd batch", err, re.M)
    if not tiles or not start or first is None or last is None or last <= first:
        sys.exit(f"could not read llama-mtmd-cli's timings:\n{err[-3000:]}")
    # The log's time stamps are minutes.seconds.milliseconds.microseconds since the process started.
    m, sec, ms, us = (int(g) for g in start.groups())
    encode_start = m * 60 + sec + ms / 1e3 + us / 1e6
    return {
        "image_tiles": len(tiles),
        "vision_ms_per_tile": statistics.median(tiles),
        "ttft_ms": (first - encode_start) * 1e3,
        "decode_tokens_per_s": (a.gen_tokens - 1) / (last - first),
        "peak_rss_mb": kb[-1] / 1024.0,
    }


def edgevlm_vlm(binary, model, image, a):
    out, rss = timed([binary, "bench", "--model", model, "--quant", "q4", "--skip-vision",
                      "--image", image, "--gen-tokens", a.gen_tokens, "--threads", a.threads,
                      "--repetitions", 1, "--no-warmup", "--json", *a.edgevlm_args.split()])
    r = json.loads(out)
    return {
        "image_tiles": r["image_tiles"],
        "vision_ms_per_tile": r["vision_ms_per_tile"],
        "ttft_ms": r["ttft_ms"],
        "decode_tokens_per_s": r["decode_tokens_per_s"],
        "peak_rss_mb": rss,
    }


VLM_METRICS = [("vision_ms_per_tile", "vision ms per tile (SmolVLM: 512x512; Qwen: the whole image)"),
               ("ttft_ms", "time to first token ms (image + prompt)"),
               ("decode_tokens_per_s", "decode tokens/s after the image prompt"),
               ("peak_rss_mb", "peak RSS MB")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--quants", default="Q4_1,Q8_0,Q4_0")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per engine")
    ap.add_argument("--models", default="smollm2,smolvlm")
    ap.add_argument("--vlm-text-quant", default="Q4_1")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--edgevlm-args", default="",
                    help="extra `edgevlm bench` flags, space-separated (e.g. --f16-kv-cache: llama.cpp's "
                         "KV cache is f16 by default)")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native",
                    help="avx2: both engines held to AVX2/FMA (no AVX-512, VNNI or AMX)")
    a = ap.parse_args()
    models = a.models.split(",")

    if a.isa == "avx2":
        # Inherited by every edgevlm run below, and by llama.cpp's build script.
        os.environ.update(EDGEVLM_NO_AVX512="1", EDGEVLM_NO_AVXVNNI="1", EDGEVLM_NO_AMX="1",
                          LLAMA_ISA="avx2")
    bin_dir = Path(sh(["bash", ROOT / "scripts/build-llamacpp.sh"]).strip())
    # AVX2 only: also a binary without the f32 GEMM's AVX-512 kernels, which pick the instruction set
    # themselves (the environment variables above cannot reach them); in its own target folder.
    target = ROOT / "target" / ("avx2" if a.isa == "avx2" else "")
    features = ["--no-default-features"] if a.isa == "avx2" else []
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "edgevlm-cli", *features,
                    "--target-dir", target], cwd=ROOT, check=True, capture_output=True)
    binary = target / "release" / "edgevlm"
    files = ensure_models(bin_dir, a.quants.split(",")) if "smollm2" in models else {}

    results = {}
    vlms = {}
    for which in [m for m in models if m in VLMS]:
        folder, text, mmproj, image = ensure_vlm(bin_dir, which, a.vlm_text_quant)
        runs = {"edgevlm": [], "llama.cpp": []}
        for _ in range(a.rounds):
            runs["edgevlm"].append(edgevlm_vlm(binary, folder, image, a))
            runs["llama.cpp"].append(llama_mtmd(bin_dir, text, mmproj, image, a))
        vlms[which] = {eng: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                       for eng, rs in runs.items()}
    for q, model in files.items():
        runs = {"edgevlm": [], "llama.cpp": []}
        for _ in range(a.rounds):
            runs["edgevlm"].append(edgevlm_bench(binary, model, a))
            runs["llama.cpp"].append(llama_bench(bin_dir, model, a))
        results[q] = {
            eng: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for eng, rs in runs.items()
        }

    if a.json:
        print(json.dumps({"smollm2": results, **vlms}, indent=2))
        return
    for which, vlm in vlms.items():
        w, h = VLMS[which]["image"]
        print(f"{VLMS[which]['name']} (random full-size weights), {a.threads} threads, ISA {a.isa}, {w}x{h} image "
              f"({vlm['edgevlm']['image_tiles']:.0f} / {vlm['llama.cpp']['image_tiles']:.0f} tiles), "
              f"tg{a.gen_tokens}; text {a.vlm_text_quant} (llama.cpp) / q4 groups of 32 (edgevlm); "
              f"vision f16 (llama.cpp) / bf16 weights, "
              f"{'computed in f32' if '--f32-vision' in a.edgevlm_args else edgevlm_vision_math()} (edgevlm); "
              f"KV cache f16 (llama.cpp) / {'f16' if '--f16-kv-cache' in a.edgevlm_args else 'f32'} (edgevlm); "
              f"{a.rounds} alternating rounds (medians)")
        print("| metric | edgevlm | llama.cpp | edgevlm / llama.cpp |")
        print("| --- | --- | --- | --- |")
        for k, label in VLM_METRICS:
            e, l = vlm["edgevlm"][k], vlm["llama.cpp"][k]
            print(f"| {label} | {e:.1f} | {l:.1f} | {e / l:.2f} |")
        print()
    if not results:
        return
    print(f"SmolLM2-135M-Instruct, {a.threads} threads, ISA {a.isa}, pp{a.prompt_tokens} / tg{a.gen_tokens} "
          f"(tg at depth 0 and {a.prompt_tokens}), "
          f"{a.repetitions} repetitions x {a.rounds} alternating rounds (medians)")
    print("| weights | metric | edgevlm | llama.cpp | edgevlm / llama.cpp |")
    print("| --- | --- | --- | --- | --- |")
    for q, r in results.items():
        for k, label in [("prompt_tokens_per_s", "prompt tokens/s"),
                         ("decode_tokens_per_s", "decode tokens/s, empty context"),
                         ("decode_after_prompt_tokens_per_s",
                          f"decode tokens/s after the {a.prompt_tokens}-token prompt"),
                         ("peak_rss_mb", "peak RSS MB")]:
            e, l = r["edgevlm"][k], r["llama.cpp"][k]
            print(f"| {q} | {label} | {e:.1f} | {l:.1f} | {e / l:.2f} |")


if __name__ == "__main__":
    main()
