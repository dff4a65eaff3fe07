#!/usr/bin/env python3
"""Check that MLX reads a checkpoint written by `edgevlm quantize` as intended.

Loads OUT/model.safetensors with `mx.load`, dequantizes every quantized layer with `mx.dequantize` using
config.json's bits/group size, and compares it with the full-precision weight in SRC: prints the relative
RMS error per layer kind and fails if any layer's packed shape or error is off.

Usage: python scripts/check_mlx_checkpoint.py SRC_DIR OUT_DIR
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

import mlx.core as mx


def main(src, out):
    q = json.loads((Path(out) / "config.json").read_text())["quantization"]
    bits, gs = q["bits"], q["group_size"]
    qw = mx.load(str(Path(out) / "model.safetensors"))
    ref = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        ref.update(mx.load(str(f)))
    errs = defaultdict(list)
    n = 0
    for name in sorted(qw):
        if not name.endswith(".scales"):
            continue
        prefix = name[: -len(".scales")]
        w = mx.dequantize(qw[prefix + ".weight"], qw[name], qw[prefix + ".biases"], group_size=gs, bits=bits)
        r = ref[prefix + ".weight"].astype(mx.float32)
        assert w.shape == r.shape, f"{prefix}: {w.shape} vs {r.shape}"
        rel = (mx.sqrt(mx.mean((w.astype(mx.float32) - r) ** 2)) / mx.sqrt(mx.mean(r ** 2))).item()
        kind = prefix.split(".")[-1]
        errs[kind].append(rel)
        n += 1
    print(f"{n} quantized layers read by MLX {mx.__version__} ({bits}-bit, group {gs}); relative RMS error:")
    worst = 0.0
    for kind, v in sorted(errs.items()):
        print(f"  {kind:20s} mean {sum(v) / len(v):.4f}  max {max(v):.4f}  ({len(v)} layers)")
        worst = max(worst, max(v))
    limit = 0.2 if bits == 4 else 0.02
    if worst > limit:
        sys.exit(f"relative error {worst:.4f} exceeds {limit}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
