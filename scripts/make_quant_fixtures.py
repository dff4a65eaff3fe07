#!/usr/bin/env python3
"""Reference affine group quantization from MLX (pinned in requirements-mlx.txt) for the Rust tests.

For bits 4 and 8, group sizes 32/64/128 and scale dtypes float32/float16/bfloat16 (and bits 2, 3, 5,
6 with bfloat16 scales), quantizes a small random matrix with `mx.quantize` and stores, with MLX's own
safetensors writer:
  w (the input), wq (packed uint32), scales, biases, deq (`mx.dequantize` output)
in tests/fixtures/quant/mlx_b{bits}_g{group}_{dtype}.safetensors (~380 KB in all).

Run: ~/.cache/edgevlm/venv/bin/pip install -r scripts/requirements-mlx.txt
     ~/.cache/edgevlm/venv/bin/python scripts/make_quant_fixtures.py
"""
from pathlib import Path

import mlx.core as mx

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "quant"


def write(w, bits, group, dtype_name):
    """`w` quantized and dequantized by MLX, saved as one fixture."""
    wq, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    deq = mx.dequantize(wq, scales, biases, group_size=group, bits=bits)
    name = OUT / f"mlx_b{bits}_g{group}_{dtype_name}.safetensors"
    mx.save_safetensors(str(name), {"w": w, "wq": wq, "scales": scales, "biases": biases, "deq": deq},
                        metadata={"bits": str(bits), "group_size": str(group)})
    print(name.name, wq.shape, scales.dtype)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    mx.random.seed(0)
    for dtype_name, dtype in [("f32", mx.float32), ("f16", mx.float16), ("bf16", mx.bfloat16)]:
        w = (mx.random.normal((8, 256)) * 0.05).astype(dtype)
        for bits in (4, 8):
            for group in (32, 64, 128):
                write(w, bits, group, dtype_name)
    # Widths MLX also packs (as one little-endian bit stream over the uint32 words), read by widening
    # the codes to 4 or 8 bits: bf16 scales (as mlx-vlm writes them) only, to keep the fixtures small.
    w = (mx.random.normal((8, 256)) * 0.05).astype(mx.bfloat16)
    for bits in (2, 3, 5, 6):
        for group in (32, 64, 128):
            write(w, bits, group, "bf16")


if __name__ == "__main__":
    main()
