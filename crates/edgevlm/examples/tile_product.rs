//! One quantized product at SmolLM2-135M's MLP shape (1536 x 576, groups of 32, f16 values) run a
//! given number of times: a fixed amount of work for `valgrind --tool=callgrind`, whose instruction
//! counts are repeatable where timings on a shared machine are not.
//!
//! ```text
//! cargo build --release -p edgevlm --example tile_product
//! RAYON_NUM_THREADS=1 valgrind --tool=callgrind target/release/examples/tile_product 4 8 int8 100
//! callgrind_annotate callgrind.out.* | grep qtiles
//! ```
//!
//! Arguments: weight bits (4 or 8), inputs (1-8), activations (`int8` or `16`), repetitions.

use edgevlm::kernels::amx::TileInputs;
use edgevlm::kernels::qmatvec::affine_matmul_batch;
use edgevlm::quant::{AffineWeight, QuantSpec, ScaleType};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bits, inputs, activations, reps] = args.as_slice() else {
        return Err("usage: tile_product BITS INPUTS int8|16 REPETITIONS".into());
    };
    let (bits, t, reps): (u32, usize, usize) = (bits.parse()?, inputs.parse()?, reps.parse()?);
    let held = match activations.as_str() {
        "int8" => TileInputs::Int8,
        "16" => TileInputs::Split,
        other => return Err(format!("activations: int8 or 16, not {other}").into()),
    };
    let (n, k) = (1536usize, 576usize);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i.wrapping_mul(2654435761) % 1000) as f32 / 500.0 - 1.0) * 0.05)
        .collect();
    let w = AffineWeight::quantize(&w, n, k, QuantSpec::new(bits, 32)?, ScaleType::F16, "w")?;
    let x: Vec<f32> = (0..t * k)
        .map(|i| (i * 37 % 101) as f32 / 50.0 - 1.0)
        .collect();
    let mut y = vec![0f32; t * n];
    let start = std::time::Instant::now();
    for _ in 0..reps {
        affine_matmul_batch(&w, &x, &mut y, held);
    }
    let each = start.elapsed().as_secs_f64() / reps.max(1) as f64;
    println!(
        "{bits}-bit weight, {t} inputs, {activations} activations: {:.1} us a product, y[0] = {}",
        each * 1e6,
        y[0]
    );
    Ok(())
}
