#!/usr/bin/env python3
"""SmolVLM vision on a CPU held to AVX2, edgevlm's three product paths beside llama.cpp's AVX2 build.

Alternates, per round, one cold run each of: edgevlm with the 16-bit integer products on AVX-VNNI,
the same on plain AVX2 (EDGEVLM_NO_AVXVNNI=1), the exact f32 path (`--f32-vision`), and
`llama-mtmd-cli` built with LLAMA_ISA=avx2; all with EDGEVLM_NO_AVX512=1 EDGEVLM_NO_AMX=1, the
`target/avx2` binary (built by `bench-vs-llamacpp.py --isa avx2`), 2 threads, the full-size random
SmolVLM-256M and the 13-tile 512x384 image of `bench-vs-llamacpp.py`, whose run functions it reuses.
Prints the medians as a Markdown table.

Usage: python3 scripts/bench-vision-paths.py [--rounds 3]
"""
import argparse
import importlib.util
import os
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("bench", HERE / "bench-vs-llamacpp.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

PATHS = [
    ("edgevlm, AVX-VNNI, 16-bit products", {}, ""),
    ("edgevlm, AVX2, 16-bit products", {"EDGEVLM_NO_AVXVNNI": "1"}, ""),
    ("edgevlm, AVX2, `--f32-vision`", {"EDGEVLM_NO_AVXVNNI": "1"}, "--f32-vision"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=32)
    a = ap.parse_args()
    a.vlm_text_quant = "Q4_1"
    os.environ.update(EDGEVLM_NO_AVX512="1", EDGEVLM_NO_AMX="1", LLAMA_ISA="avx2")
    bin_dir = Path(bench.sh(["bash", bench.ROOT / "scripts/build-llamacpp.sh"]).strip())
    folder, text, mmproj, image = bench.ensure_vlm(bin_dir, "smolvlm", a.vlm_text_quant)
    binary = bench.ROOT / "target" / "avx2" / "release" / "edgevlm"
    if not binary.exists():
        raise SystemExit(f"{binary} is missing: run scripts/bench-vs-llamacpp.py --isa avx2 first")
    runs = {}
    for r in range(a.rounds):
        for name, env, args in PATHS:
            os.environ.pop("EDGEVLM_NO_AVXVNNI", None)
            os.environ.update(env)
            a.edgevlm_args = args
            runs.setdefault(name, []).append(bench.edgevlm_vlm(binary, folder, image, a))
        os.environ["EDGEVLM_NO_AVXVNNI"] = "1"
        runs.setdefault("llama.cpp, AVX2", []).append(bench.llama_mtmd(bin_dir, text, mmproj, image, a))
        print(f"round {r + 1}:", {k: round(v[-1]["vision_ms_per_tile"]) for k, v in runs.items()}, flush=True)

    def med(name, key):
        return statistics.median(x[key] for x in runs[name])

    ref_v, ref_t = med("llama.cpp, AVX2", "vision_ms_per_tile"), med("llama.cpp, AVX2", "ttft_ms")
    print("| engine | vision ms per tile | / llama.cpp | TTFT ms | / llama.cpp |")
    print("| --- | --- | --- | --- | --- |")
    for name in runs:
        v, t = med(name, "vision_ms_per_tile"), med(name, "ttft_ms")
        print(f"| {name} | {v:.1f} | {v / ref_v:.2f} | {t:.0f} | {t / ref_t:.2f} |")


if __name__ == "__main__":
    main()
