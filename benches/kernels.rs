//! `cargo bench --bench kernels`: criterion timings of the kernels at SmolLM2-135M / SmolVLM-256M
//! text-decoder shapes (hidden 576, MLP 1536, 9 query and 3 KV heads of 64, vocabulary 49,152).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgevlm::kernels::qmatvec::affine_matmul;
use edgevlm::quant::{AffineWeight, QuantSpec};
use std::hint::black_box;

const HIDDEN: usize = 576;
const MLP: usize = 1536;
const VOCAB: usize = 49152;

/// A deterministic pseudo-random `(n, k)` weight, quantized.
fn weight(n: usize, k: usize, bits: u32) -> AffineWeight {
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i.wrapping_mul(2654435761) % 1000) as f32 / 500.0 - 1.0) * 0.05)
        .collect();
    let spec = QuantSpec::new(bits, 32).expect("valid spec");
    AffineWeight::quantize(&w, n, k, spec, "bench").expect("quantize")
}

fn inputs(t: usize, k: usize) -> Vec<f32> {
    (0..t * k)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect()
}

/// One token through each projection shape (decode), 4- and 8-bit.
fn matvec(c: &mut Criterion) {
    let mut g = c.benchmark_group("qmatvec");
    for bits in [4u32, 8] {
        for (name, n, k) in [
            ("q_o_576x576", HIDDEN, HIDDEN),
            ("kv_192x576", 192, HIDDEN),
            ("gate_up_1536x576", MLP, HIDDEN),
            ("down_576x1536", HIDDEN, MLP),
            ("head_49152x576", VOCAB, HIDDEN),
        ] {
            let w = weight(n, k, bits);
            let x = inputs(1, k);
            let mut y = vec![0f32; n];
            g.throughput(Throughput::Bytes((n * k * bits as usize / 8) as u64));
            g.bench_function(BenchmarkId::new(format!("q{bits}"), name), |b| {
                b.iter(|| affine_matmul(black_box(&w), black_box(&x), &mut y))
            });
        }
    }
    g.finish();
}

/// A 512-token prompt through the MLP shapes (prefill).
fn matmul(c: &mut Criterion) {
    let mut g = c.benchmark_group("qmatmul_512");
    g.sample_size(10);
    for bits in [4u32, 8] {
        for (name, n, k) in [
            ("gate_1536x576", MLP, HIDDEN),
            ("down_576x1536", HIDDEN, MLP),
        ] {
            let w = weight(n, k, bits);
            let x = inputs(512, k);
            let mut y = vec![0f32; 512 * n];
            g.throughput(Throughput::Elements((512 * n * k) as u64));
            g.bench_function(BenchmarkId::new(format!("q{bits}"), name), |b| {
                b.iter(|| affine_matmul(black_box(&w), black_box(&x), &mut y))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, matvec, matmul);
criterion_main!(benches);
