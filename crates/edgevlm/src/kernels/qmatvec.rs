//! Products with affine-quantized weights, at the quantized size.
//!
//! `y_r = Σ_g s_rg · Σ_{i∈g} q_ri x_i + b_rg · Σ_{i∈g} x_i`. Loaded layers are held in row tiles
//! (`CodeLayout::Tiles`), and with AVX2 every decode step (batched or not) and every product of
//! fewer than 16 inputs runs the tile kernels of `kernels::qtiles` (integer sums, activations to 16
//! bits per block of 32, the bias term on exact f32 sums). 16 or more inputs (a prompt, vision
//! tiles) run on AMX tiles where the CPU has them (`amx::affine_matmul`: exact codes, inputs to 16
//! significant bits), and an exact f32 GEMM on dequantized panels otherwise.
//!
//! Without AVX2 the same sums run in f32.

use rayon::prelude::*;

use super::has_avx2;

use super::amx::TileInputs;
use crate::quant::AffineWeight;

/// Exact f32 reference: one output row for one input.
fn dot_row_f32(w: &AffineWeight, r: usize, x: &[f32], xsum: &[f32]) -> f32 {
    let gs = w.spec.group_size;
    let groups = w.in_dim / gs;
    let per_word = w.spec.per_word();
    let (bits, mask) = (w.spec.bits as usize, w.spec.max_q());
    let mut total = 0f32;
    for g in 0..groups {
        let xs = &x[g * gs..(g + 1) * gs];
        let mut lanes = [0f32; 8];
        for wi in 0..gs / per_word {
            let word = w.packed[w.word_at(r, g * gs / per_word + wi)];
            for j in 0..per_word {
                let q = ((word >> (bits * j)) & mask) as f32;
                lanes[j % 8] = q.mul_add(xs[wi * per_word + j], lanes[j % 8]);
            }
        }
        let at = w.value_at(r, g);
        total += lanes.iter().sum::<f32>() * w.scales.get(at) + w.biases.get(at) * xsum[g];
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::quant::AffineWeight;
    use std::arch::x86_64::*;

    /// Row `r` of `w` in f32, as [`AffineWeight::dequantize_row`] computes it (`s · q + b`, a fused
    /// multiply-add), eight values per step: each packed word is broadcast and shifted per lane.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dequantize_row(w: &AffineWeight, r: usize, out: &mut [f32]) {
        let k = w.in_dim;
        let gs = w.spec.group_size;
        let groups = k / gs;
        let per_word = w.spec.per_word();
        // Word d of the row at `first + stride · d` (stride 16 in row tiles).
        let first = w.packed.as_ptr().add(w.word_at(r, 0));
        let stride = if k / per_word > 1 {
            w.word_at(r, 1) - w.word_at(r, 0)
        } else {
            1
        };
        let (shifts, mask) = if per_word == 8 {
            (
                _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28),
                _mm256_set1_epi32(0xF),
            )
        } else {
            (
                _mm256_setr_epi32(0, 8, 16, 24, 0, 8, 16, 24),
                _mm256_set1_epi32(0xFF),
            )
        };
        let dst = out.as_mut_ptr();
        for g in 0..groups {
            let at = w.value_at(r, g);
            let s = _mm256_set1_ps(w.scales.get(at));
            let b = _mm256_set1_ps(w.biases.get(at));
            // SAFETY (word reads): words g·gs/per_word .. of row r exist, `stride` apart.
            let word = |d: usize| *first.add(stride * (g * gs / per_word + d)) as i32;
            // Eight values per step: one word (4-bit) or two (8-bit).
            for i in (0..gs).step_by(8) {
                let v = if per_word == 8 {
                    _mm256_set1_epi32(word(i / 8))
                } else {
                    let (w0, w1) = (word(i / 4), word(i / 4 + 1));
                    _mm256_setr_epi32(w0, w0, w0, w0, w1, w1, w1, w1)
                };
                let q = _mm256_and_si256(_mm256_srlv_epi32(v, shifts), mask);
                let x = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(q), b);
                // SAFETY: g · gs + i + 8 ≤ k = out.len().
                _mm256_storeu_ps(dst.add(g * gs + i), x);
            }
        }
    }
}

/// `ys (t × out) = xs (t × in) · Wᵀ`: few inputs on the tile kernels, many on AMX tiles with split
/// inputs (16 significant bits) where the CPU has them, or exact f32 panels.
pub fn affine_matmul(w: &AffineWeight, xs: &[f32], ys: &mut [f32]) {
    affine_matmul_with(w, xs, ys, TileInputs::Split)
}

/// [`affine_matmul`], with the inputs of products on AMX tiles held as `tile_inputs` says.
pub fn affine_matmul_with(w: &AffineWeight, xs: &[f32], ys: &mut [f32], tile_inputs: TileInputs) {
    let (k, n) = (w.in_dim, w.out_dim);
    let t = xs.len() / k;
    debug_assert_eq!(xs.len(), t * k);
    debug_assert_eq!(ys.len(), t * n);
    if t == 0 {
        return;
    }
    if t >= panel_min_inputs(w, tile_inputs) {
        panel_matmul(w, xs, ys, tile_inputs);
        return;
    }
    if super::qtiles::matmul(w, xs, ys, tile_inputs) {
        return;
    }
    exact_products(w, xs, ys);
}

/// `ys (t × n) = xs (t × k) · Wᵀ` for the tokens of a decode batch, each input's outputs
/// bit-identical to [`affine_matmul_with`] of that input alone (so a sequence answers the same
/// alone or batched), with the codes of each weight tile unpacked once per pass of up to 8 inputs.
pub fn affine_matmul_batch(w: &AffineWeight, xs: &[f32], ys: &mut [f32], tile_inputs: TileInputs) {
    let t = xs.len() / w.in_dim;
    if t <= 1 {
        affine_matmul_with(w, xs, ys, tile_inputs);
        return;
    }
    if super::qtiles::matmul(w, xs, ys, tile_inputs) {
        return;
    }
    for (x, y) in xs
        .chunks_exact(w.in_dim)
        .zip(ys.chunks_exact_mut(w.out_dim))
    {
        affine_matmul_with(w, x, y, tile_inputs);
    }
}

/// The exact f32 sums, rows in parallel (CPUs without AVX2).
fn exact_products(w: &AffineWeight, xs: &[f32], ys: &mut [f32]) {
    let (k, n) = (w.in_dim, w.out_dim);
    let sums: Vec<f32> = xs
        .chunks_exact(w.spec.group_size)
        .map(|g| g.iter().sum())
        .collect();
    let groups = k / w.spec.group_size;
    ys.par_chunks_mut(n).enumerate().for_each(|(i, y)| {
        let x = &xs[i * k..(i + 1) * k];
        let s = &sums[i * groups..(i + 1) * groups];
        for (r, v) in y.iter_mut().enumerate() {
            *v = dot_row_f32(w, r, x, s);
        }
    });
}

/// Inputs from which a product runs on dequantized weight panels (AMX tiles, or an f32 GEMM where no
/// tile kernel takes the weight): each panel is expanded once and serves every input, so the cost of
/// expanding it vanishes against the product.
const PANEL_MIN_INPUTS: usize = 16;
/// Inputs from which a product runs on panels where the CPU has no AMX but the tile kernels take the
/// weight: the f32 GEMM on dequantized panels against the tile kernels' 16-bit integer products, a
/// pass of up to four inputs over each tile. On a Zen 3 (AVX2, 2 threads), SmolLM2-135M Q4_0
/// prompts of 32 / 64 / 96 / 128 tokens took 90 / 182 / 280 / 400 ms on tiles against 157 / 228 /
/// 339 / 376 ms on panels.
const PANEL_MIN_INPUTS_WITHOUT_AMX: usize = 112;

/// Where `w`'s products switch from the tile kernels to panels: on AMX the panels' tiles take even
/// short prompts faster, and without tile kernels for `w` the alternative is the exact row-by-row
/// product. With one 8-bit code per input ([`TileInputs::Int8`]) the tile kernels stay ahead at
/// every length (Zen 3, SmolLM2 Q4_0, prompts of 128 / 256 / 512 tokens: 479 / 484 / 396-446
/// tokens/s on tiles against 344 / 340 / 361-390 on panels), so they take every product.
fn panel_min_inputs(w: &AffineWeight, tile_inputs: TileInputs) -> usize {
    if super::amx::available() || !super::qtiles::applies(w) {
        PANEL_MIN_INPUTS
    } else if tile_inputs == TileInputs::Int8 {
        usize::MAX
    } else {
        PANEL_MIN_INPUTS_WITHOUT_AMX
    }
}

/// Weight rows per panel: 64 rows of up to 1,536 inputs is 384 KB of f32, within a core's L2.
const PANEL_ROWS: usize = 64;

/// `ys = xs · Wᵀ` for many inputs, panel by panel in parallel; only one panel per task is ever
/// dequantized, exactly as `dequantize_row` does, so the product is an exact f32 GEMM.
fn panel_matmul(w: &AffineWeight, xs: &[f32], ys: &mut [f32], tile_inputs: TileInputs) {
    // On AMX the codes go through the tile unit as exact bf16 integers, the inputs as bf16 pairs
    // (or single bf16s where asked).
    if super::amx::affine_matmul(w, xs, ys, tile_inputs) {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        panel_matmul_rows(w.out_dim, w.in_dim, xs, ys, |r, row| {
            // SAFETY: AVX2 and FMA were detected; `row` holds `in_dim` values.
            unsafe { avx2::dequantize_row(w, r, row) }
        });
        return;
    }
    panel_matmul_rows(w.out_dim, w.in_dim, xs, ys, |r, row| {
        w.dequantize_row(r, row)
    });
}

/// `ys (t × n) = xs (t × k) · Wᵀ` for a weight `W (n × k)` stored in a compact form that `expand_row(r,
/// out)` writes row `r` of in f32: panels of `PANEL_ROWS` rows are expanded one at a time per worker
/// (a buffer reused across calls) and multiplied by the f32 GEMM, so the product is the exact f32
/// product of the expanded weight while only a panel of it ever exists in f32.
pub fn panel_matmul_rows(
    n: usize,
    k: usize,
    xs: &[f32],
    ys: &mut [f32],
    expand_row: impl Fn(usize, &mut [f32]) + Sync,
) {
    let t = xs.len() / k.max(1);
    assert!(
        ys.len() >= t * n && xs.len() == t * k,
        "panel product: {} inputs and {} outputs for {t} x {k} -> {n}",
        xs.len(),
        ys.len()
    );
    let panels = n.div_ceil(PANEL_ROWS);
    // Each task writes a disjoint set of output columns of `ys`, passed as an address.
    let ys_addr = ys.as_mut_ptr() as usize;
    thread_local! {
        // One panel buffer per worker thread, reused by every product (no allocation per call).
        static PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    (0..panels).into_par_iter().for_each(|p| {
        PANEL.with_borrow_mut(|panel| {
            if panel.len() < PANEL_ROWS * k {
                panel.resize(PANEL_ROWS * k, 0.0);
            }
            let r0 = p * PANEL_ROWS;
            let rows = PANEL_ROWS.min(n - r0);
            for (i, row) in panel.chunks_exact_mut(k).take(rows).enumerate() {
                expand_row(r0 + i, row);
            }
            // SAFETY: dst is the (t × rows) block of `ys` at column r0 (row stride n), disjoint between
            // tasks and inside `ys` (r0 + rows ≤ n); lhs is `xs` (t × k, row stride k); rhs is the
            // panel read as (k × rows) with column stride k. All three outlive the call.
            unsafe {
                super::sgemm::product(
                    (t, rows, k),
                    (ys_addr as *mut f32).add(r0),
                    n,
                    super::sgemm::Strided::rows(xs.as_ptr(), k),
                    super::sgemm::Strided::columns(panel.as_ptr(), k),
                    1.0,
                );
            }
        })
    });
}

/// `y = W x` for one input vector.
pub fn affine_matvec(w: &AffineWeight, x: &[f32], y: &mut [f32]) {
    affine_matmul(w, x, y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{QuantSpec, ScaleType};

    /// The kernels against f64 sums over the dequantized rows, for 1 to 40 inputs (tile kernels and
    /// panels).
    #[test]
    fn matmul_equals_dequantized_product() {
        for bits in [4, 8] {
            for gs in [32, 64, 128] {
                let (n, k) = (71, 256);
                let w: Vec<f32> = (0..n * k)
                    .map(|i| ((i * 7919 % 211) as f32 / 105.0 - 1.0) * 0.2)
                    .collect();
                let q = AffineWeight::quantize(
                    &w,
                    n,
                    k,
                    QuantSpec::new(bits, gs).unwrap(),
                    ScaleType::F32,
                    "t",
                )
                .unwrap();
                for t in [1, 3, 6, 17, 40] {
                    let xs: Vec<f32> = (0..t * k)
                        .map(|i| ((i * 13 % 29) as f32 / 14.0) - 1.0 + (i / k) as f32 * 0.1)
                        .collect();
                    let mut ys = vec![0f32; t * n];
                    affine_matmul(&q, &xs, &mut ys);
                    // Where the tile kernels take the product, each input is rounded to a step of
                    // its block's largest magnitude / (127 · 256): the sum may move by up to a step
                    // per value times its weight.
                    let rounded = t < panel_min_inputs(&q, TileInputs::Split)
                        && super::super::qtiles::applies(&q);
                    let steps: Vec<f64> = xs
                        .chunks_exact(32)
                        .map(|b| b.iter().fold(0f64, |m, v| m.max(f64::from(v.abs()))))
                        .map(|amax| if rounded { amax / (127.0 * 256.0) } else { 0.0 })
                        .collect();
                    let mut row = vec![0f32; k];
                    for r in 0..n {
                        q.dequantize_row(r, &mut row);
                        for i in 0..t {
                            let x = &xs[i * k..(i + 1) * k];
                            let want: f64 = row
                                .iter()
                                .zip(x)
                                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                                .sum();
                            let rounding: f64 = row
                                .iter()
                                .enumerate()
                                .map(|(e, a)| f64::from(a.abs()) * steps[(i * k + e) / 32])
                                .sum();
                            let got = f64::from(ys[i * n + r]);
                            assert!(
                                (got - want).abs() < 2e-4 * (1.0 + want.abs()) + rounding,
                                "bits {bits} gs {gs} t {t} row {r} input {i}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A decode batch gives each input exactly its product alone.
    #[test]
    fn batched_products_equal_each_input_alone() {
        for (bits, store) in [4u32, 8]
            .into_iter()
            .flat_map(|b| [(b, ScaleType::F32), (b, ScaleType::F16)])
        {
            // 70 rows: four whole tiles and a padded one, in several tasks; rows of an even and an
            // odd number of blocks.
            for (n, k, t) in [2, 3, 5, 8, 9]
                .into_iter()
                .flat_map(|t| [(70, 256, t), (70, 288, t)])
            {
                let w: Vec<f32> = (0..n * k)
                    .map(|i| ((i * 7919 % 211) as f32 / 105.0 - 1.0) * 0.3)
                    .collect();
                let q =
                    AffineWeight::quantize(&w, n, k, QuantSpec::new(bits, 32).unwrap(), store, "t")
                        .unwrap();
                let xs: Vec<f32> = (0..t * k)
                    .map(|i| ((i * 13 % 29) as f32 / 7.0) - 2.0 + (i / k) as f32 * 0.37)
                    .collect();
                let mut batch = vec![0f32; t * n];
                affine_matmul_batch(&q, &xs, &mut batch, TileInputs::Split);
                for (i, x) in xs.chunks_exact(k).enumerate() {
                    let mut alone = vec![0f32; n];
                    affine_matmul(&q, x, &mut alone);
                    assert_eq!(
                        &batch[i * n..(i + 1) * n],
                        &alone[..],
                        "bits {bits} {store:?} k {k}: input {i} of {t}"
                    );
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_dequantize_matches_scalar() {
        if !has_avx2() {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        // 5 rows (a padded tile) and 32 (two whole tiles).
        for ((bits, gs, store), n) in [
            (4, 32, ScaleType::F16),
            (4, 128, ScaleType::F32),
            (8, 32, ScaleType::F16),
            (8, 64, ScaleType::F32),
        ]
        .into_iter()
        .flat_map(|c| [(c, 5), (c, 32)])
        {
            let k = 256;
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
                .collect();
            let q = AffineWeight::quantize(&w, n, k, QuantSpec::new(bits, gs).unwrap(), store, "t")
                .unwrap();
            let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
            for r in 0..n {
                q.dequantize_row(r, &mut a);
                // SAFETY: AVX2 and FMA were detected.
                unsafe { avx2::dequantize_row(&q, r, &mut b) };
                for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                        "bits {bits} row {r} {i}: {x} vs {y}"
                    );
                }
            }
        }
    }

    #[test]
    fn exact_fallback_matches_too() {
        let (n, k) = (9, 64);
        let w: Vec<f32> = (0..n * k).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
        let q = AffineWeight::quantize(
            &w,
            n,
            k,
            QuantSpec::new(4, 32).unwrap(),
            ScaleType::F32,
            "t",
        )
        .unwrap();
        let x: Vec<f32> = (0..k).map(|i| (i % 5) as f32 - 2.0).collect();
        let sums: Vec<f32> = x.chunks_exact(32).map(|g| g.iter().sum()).collect();
        let mut y = vec![0f32; n];
        affine_matvec(&q, &x, &mut y);
        let mut row = vec![0f32; k];
        for (r, &yr) in y.iter().enumerate() {
            q.dequantize_row(r, &mut row);
            let want: f32 = row.iter().zip(&x).map(|(a, b)| a * b).sum();
            assert!((dot_row_f32(&q, r, &x, &sums) - want).abs() < 1e-4);
            assert!((yr - want).abs() < 1e-3, "row {r}: {yr} vs {want}");
        }
    }
}
