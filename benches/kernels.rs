//! `cargo bench --bench kernels`: criterion timings of the kernels at SmolLM2-135M / SmolVLM-256M
//! text-decoder shapes (hidden 576, MLP 1536, 9 query and 3 KV heads of 64, vocabulary 49,152) and
//! SmolVLM-256M vision-encoder shapes (1,024 patches of a 512x512 tile, hidden 768, 12 heads of 64,
//! MLP 3,072), plus the image processor on a 13-tile image.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgevlm::image::load_image_path;
use edgevlm::kernels::amx::TileInputs;
use edgevlm::kernels::attention::{decode_attention, CacheView, KvView};
use edgevlm::kernels::qmatvec::{affine_matmul, affine_matmul_batch};
use edgevlm::model::idefics3::{process_image, ImageProcessorConfig};
use edgevlm::model::nn::{attention, LayerNorm, RmsNorm};
use edgevlm::quant::{AffineWeight, QuantSpec, ScaleType};
use std::hint::black_box;

const HIDDEN: usize = 576;
const MLP: usize = 1536;
const VOCAB: usize = 49152;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const PATCHES: usize = 1024;
const V_HIDDEN: usize = 768;
const V_HEADS: usize = 12;
const V_MLP: usize = 3072;

/// A deterministic pseudo-random `(n, k)` weight, quantized with scales and biases held in `store`.
fn weight(n: usize, k: usize, bits: u32, store: ScaleType) -> AffineWeight {
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i.wrapping_mul(2654435761) % 1000) as f32 / 500.0 - 1.0) * 0.05)
        .collect();
    let spec = QuantSpec::new(bits, 32).expect("valid spec");
    AffineWeight::quantize(&w, n, k, spec, store, "bench").expect("quantize")
}

fn inputs(t: usize, k: usize) -> Vec<f32> {
    (0..t * k)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect()
}

/// One token through each projection shape (decode), 4- and 8-bit, scales and biases in f16 (as GGUF
/// blocks load) and f32.
fn matvec(c: &mut Criterion) {
    let mut g = c.benchmark_group("qmatvec");
    for (bits, store, kind) in [
        (4u32, ScaleType::F16, ""),
        (8, ScaleType::F16, ""),
        (4, ScaleType::F32, "_f32scales"),
        (8, ScaleType::F32, "_f32scales"),
    ] {
        for (name, n, k) in [
            ("q_o_576x576", HIDDEN, HIDDEN),
            ("kv_192x576", 192, HIDDEN),
            ("gate_up_1536x576", MLP, HIDDEN),
            ("down_576x1536", HIDDEN, MLP),
            ("head_49152x576", VOCAB, HIDDEN),
        ] {
            let w = weight(n, k, bits, store);
            let x = inputs(1, k);
            let mut y = vec![0f32; n];
            g.throughput(Throughput::Bytes((n * k * bits as usize / 8) as u64));
            g.bench_function(BenchmarkId::new(format!("q{bits}{kind}"), name), |b| {
                b.iter(|| affine_matmul(black_box(&w), black_box(&x), &mut y))
            });
        }
    }
    g.finish();
}

/// One decode step of 1, 2, 4 and 8 sequences at once (a server's batch) through the MLP shapes, 4-bit
/// with f16 scales, 16- and 8-bit activations: what each further sequence costs over the first.
fn matvec_batch(c: &mut Criterion) {
    let mut g = c.benchmark_group("qmatvec_batch");
    for (name, n, k) in [
        ("gate_up_1536x576", MLP, HIDDEN),
        ("down_576x1536", HIDDEN, MLP),
    ] {
        let w = weight(n, k, 4, ScaleType::F16);
        // 16-bit activations (the default) and one 8-bit code per input (`--int8-activations`).
        for (form, held) in [("q4", TileInputs::Split), ("q4a8", TileInputs::Int8)] {
            for t in [1usize, 2, 4, 8] {
                let x = inputs(t, k);
                let mut y = vec![0f32; t * n];
                g.throughput(Throughput::Elements((t * n * k) as u64));
                g.bench_function(BenchmarkId::new(format!("{form}_{name}"), t), |b| {
                    b.iter(|| affine_matmul_batch(black_box(&w), black_box(&x), &mut y, held))
                });
            }
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
            let w = weight(n, k, bits, ScaleType::F16);
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

fn tensor(dims: &[usize]) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(inputs(1, n), dims, &Device::Cpu).expect("tensor")
}

/// RMSNorm (decoder: one token and a 512-token chunk) and LayerNorm (vision: one tile's patches).
fn norms(c: &mut Criterion) {
    let mut g = c.benchmark_group("norm");
    let rms = RmsNorm::new(tensor(&[HIDDEN]), 1e-5);
    for t in [1usize, 512] {
        let x = tensor(&[1, t, HIDDEN]);
        g.bench_function(BenchmarkId::new("rms", format!("{t}x{HIDDEN}")), |b| {
            b.iter(|| rms.forward(black_box(&x)).expect("rms norm"))
        });
    }
    let ln = LayerNorm::new(tensor(&[V_HIDDEN]), tensor(&[V_HIDDEN]), 1e-6);
    let x = tensor(&[1, PATCHES, V_HIDDEN]);
    g.bench_function(
        BenchmarkId::new("layer", format!("{PATCHES}x{V_HIDDEN}")),
        |b| b.iter(|| ln.forward(black_box(&x)).expect("layer norm")),
    );
    g.finish();
}

/// Rotary embedding of the query heads: one position (decode) and a 512-position chunk.
fn rope(c: &mut Criterion) {
    let mut g = c.benchmark_group("rope");
    for t in [1usize, 512] {
        let x = tensor(&[1, HEADS, t, HEAD_DIM]);
        let cos = tensor(&[t, HEAD_DIM / 2]).cos().expect("cos");
        let sin = tensor(&[t, HEAD_DIM / 2]).sin().expect("sin");
        g.bench_function(
            BenchmarkId::new("q", format!("{HEADS}x{t}x{HEAD_DIM}")),
            |b| b.iter(|| candle_nn::rotary_emb::rope(black_box(&x), &cos, &sin).expect("rope")),
        );
    }
    g.finish();
}

/// Softmax over the last dimension: one decode token's scores over 512 positions, and one vision
/// tile's scores (12 heads x 1,024 x 1,024).
fn softmax(c: &mut Criterion) {
    let mut g = c.benchmark_group("softmax");
    for (name, dims) in [
        ("decode_9x512", vec![1, HEADS, 1, 512]),
        ("vision_12x1024x1024", vec![1, V_HEADS, PATCHES, PATCHES]),
    ] {
        let x = tensor(&dims);
        g.bench_function(name, |b| {
            b.iter(|| candle_nn::ops::softmax_last_dim(black_box(&x)).expect("softmax"))
        });
    }
    g.finish();
}

/// Attention: one decode position over a 512-entry cache (the decode kernel), and one vision tile's
/// full self-attention (`nn::attention`, as the vision encoder runs it).
fn attention_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    let len = 512;
    let q = inputs(1, HEADS * HEAD_DIM);
    let k = inputs(KV_HEADS * len, HEAD_DIM);
    let v = inputs(KV_HEADS * len, HEAD_DIM);
    let mut out = vec![0f32; HEADS * HEAD_DIM];
    let scale = (HEAD_DIM as f32).powf(-0.5);
    g.bench_function("decode_9q_3kv_over_512", |b| {
        b.iter(|| {
            let kv = KvView {
                k: CacheView {
                    data: &k,
                    head_stride: len * HEAD_DIM,
                },
                v: CacheView {
                    data: &v,
                    head_stride: len * HEAD_DIM,
                },
                kv_heads: KV_HEADS,
                len,
            };
            decode_attention(black_box(&q), kv, HEAD_DIM, scale, &mut out)
        })
    });
    let qv = tensor(&[1, V_HEADS, PATCHES, HEAD_DIM]);
    g.sample_size(10);
    g.bench_function("vision_12x1024x64", |b| {
        b.iter(|| attention(black_box(&qv), &qv, &qv, scale as f64, None).expect("attention"))
    });
    g.finish();
}

/// The vision MLP's activation over one tile (1,024 x 3,072), tanh form as SmolVLM uses.
fn gelu(c: &mut Criterion) {
    let mut g = c.benchmark_group("gelu");
    let x = tensor(&[PATCHES, V_MLP]);
    g.bench_function("tanh_1024x3072", |b| {
        b.iter(|| black_box(&x).gelu().expect("gelu"))
    });
    g.finish();
}

/// A vision MLP product of one tile (1,024 patches x 768 -> 3,072) with a bf16 weight: on AMX tiles
/// (where the CPU has them) and in f32 on expanded panels.
fn bf16_products(c: &mut Criterion) {
    use edgevlm::kernels::{amx, fixed16, qmatvec::panel_matmul_rows};
    use half::bf16;
    let mut g = c.benchmark_group("bf16_matmul");
    g.sample_size(10);
    let (t, k, n) = (PATCHES, V_HIDDEN, V_MLP);
    let w: Vec<bf16> = (0..n * k)
        .map(|i| bf16::from_f32(((i.wrapping_mul(2654435761) % 1000) as f32 / 500.0 - 1.0) * 0.05))
        .collect();
    let xs = inputs(t, k);
    let mut ys = vec![0f32; t * n];
    g.throughput(Throughput::Elements((t * n * k) as u64));
    // Layers pack their weight once, at load.
    if let Some(tw) = amx::TileWeight::pack(&w, n, k).filter(|_| amx::available()) {
        g.bench_function("amx_1024x768x3072", |b| {
            b.iter(|| tw.matmul(black_box(&xs), &mut ys))
        });
    }
    if let Some(fw) = fixed16::Fixed16Weight::pack(n, k, |r, row| {
        for (o, v) in row.iter_mut().zip(&w[r * k..(r + 1) * k]) {
            *o = v.to_f32();
        }
    })
    .filter(|_| fixed16::available())
    {
        g.bench_function("fixed16_1024x768x3072", |b| {
            b.iter(|| fw.matmul(black_box(&xs), &mut ys))
        });
        // fc2's shape: 3,072 inputs -> 768.
        let (xs2, mut ys2) = (inputs(t, n), vec![0f32; t * k]);
        let w2: Vec<f32> = (0..n * k).map(|i| w[i].to_f32()).collect();
        let fw2 = fixed16::Fixed16Weight::pack(k, n, |r, row| {
            row.copy_from_slice(&w2[r * n..(r + 1) * n])
        });
        if let Some(fw2) = fw2 {
            g.bench_function("fixed16_1024x3072x768", |b| {
                b.iter(|| fw2.matmul(black_box(&xs2), &mut ys2))
            });
        }
    }
    g.bench_function("f32_panels_1024x768x3072", |b| {
        b.iter(|| {
            panel_matmul_rows(n, k, black_box(&xs), &mut ys, |r, row| {
                for (o, v) in row.iter_mut().zip(&w[r * k..(r + 1) * k]) {
                    *o = v.to_f32();
                }
            })
        })
    });
    g.finish();
}

/// The SmolVLM image processor: a 2300x1500 PNG (decoded once) resized, split into 12 tiles plus the
/// global view, rescaled and normalized.
fn image_processor(c: &mut Criterion) {
    let mut g = c.benchmark_group("image_processor");
    g.sample_size(10);
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/large.png");
    let img = load_image_path(&path, &Default::default()).expect("fixture image");
    let cfg = ImageProcessorConfig::default();
    g.bench_function("2300x1500_to_13_tiles", |b| {
        b.iter(|| process_image(black_box(&img), &cfg, true).expect("process"))
    });
    g.finish();
}

criterion_group!(
    benches,
    matvec,
    matvec_batch,
    matmul,
    bf16_products,
    norms,
    rope,
    softmax,
    attention_bench,
    gelu,
    image_processor
);
criterion_main!(benches);
