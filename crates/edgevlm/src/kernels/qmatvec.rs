//! Products with affine-quantized weights, at the quantized size.
//!
//! One token: `y_r = Σ_g (s_rg · Σ_{i∈g} q_ri x_i + b_rg · Σ_{i∈g} x_i)`, codes unpacked in registers,
//! rows split across the thread pool. Several tokens: blocks of rows are dequantized into a small f32
//! buffer and multiplied with the GEMM, so no call ever expands the whole weight.

use rayon::prelude::*;

use crate::quant::AffineWeight;

const ROWS_PER_TASK: usize = 32;
/// Rows dequantized per GEMM block.
pub const BLOCK_ROWS: usize = 256;

/// Lane-wise `acc[j] += q_j · x_j` over one group of 4-bit codes (8 per word).
#[inline(always)]
fn group_lanes_4bit(words: &[u32], x: &[f32], acc: &mut [f32; 8]) {
    for (w, xs) in words.iter().zip(x.chunks_exact(8)) {
        for j in 0..8 {
            acc[j] = (((w >> (4 * j)) & 0xF) as f32).mul_add(xs[j], acc[j]);
        }
    }
}

/// The same for 8-bit codes (4 per word, two words per 8 lanes).
#[inline(always)]
fn group_lanes_8bit(words: &[u32], x: &[f32], acc: &mut [f32; 8]) {
    for (w, xs) in words.chunks_exact(2).zip(x.chunks_exact(8)) {
        for j in 0..4 {
            acc[j] = (((w[0] >> (8 * j)) & 0xFF) as f32).mul_add(xs[j], acc[j]);
            acc[4 + j] = (((w[1] >> (8 * j)) & 0xFF) as f32).mul_add(xs[4 + j], acc[4 + j]);
        }
    }
}

#[inline(always)]
fn rows_generic(w: &AffineWeight, x: &[f32], xsum: &[f32], row0: usize, ys: &mut [f32]) {
    let gs = w.spec.group_size;
    let groups = w.in_dim / gs;
    let words_per_group = gs / w.spec.per_word();
    let words_per_row = w.in_dim / w.spec.per_word();
    let four = w.spec.bits == 4;
    for (i, y) in ys.iter_mut().enumerate() {
        let r = row0 + i;
        let row = &w.packed[r * words_per_row..(r + 1) * words_per_row];
        let scales = &w.scales[r * groups..(r + 1) * groups];
        let biases = &w.biases[r * groups..(r + 1) * groups];
        // Per-group partial sums stay in lanes and are scaled there; one horizontal sum per row.
        let mut total = [0f32; 8];
        let mut bias_part = 0f32;
        for g in 0..groups {
            let words = &row[g * words_per_group..(g + 1) * words_per_group];
            let xs = &x[g * gs..(g + 1) * gs];
            let mut lanes = [0f32; 8];
            if four {
                group_lanes_4bit(words, xs, &mut lanes);
            } else {
                group_lanes_8bit(words, xs, &mut lanes);
            }
            let s = scales[g];
            for j in 0..8 {
                total[j] = lanes[j].mul_add(s, total[j]);
            }
            bias_part = biases[g].mul_add(xsum[g], bias_part);
        }
        *y = total.iter().sum::<f32>() + bias_part;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(w: &AffineWeight, x: &[f32], xsum: &[f32], row0: usize, ys: &mut [f32]) {
    rows_generic(w, x, xsum, row0, ys)
}

fn rows(w: &AffineWeight, x: &[f32], xsum: &[f32], row0: usize, ys: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { rows_avx2(w, x, xsum, row0, ys) };
        }
    }
    rows_generic(w, x, xsum, row0, ys)
}

/// `y = W x` for one input vector.
pub fn affine_matvec(w: &AffineWeight, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), w.in_dim);
    debug_assert_eq!(y.len(), w.out_dim);
    let xsum: Vec<f32> = x
        .chunks_exact(w.spec.group_size)
        .map(|g| g.iter().sum())
        .collect();
    y.par_chunks_mut(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(c, ys)| rows(w, x, &xsum, c * ROWS_PER_TASK, ys));
}

/// Dequantize rows `start..start + n` into `out` (`n × in`).
pub fn dequantize_block(w: &AffineWeight, start: usize, n: usize, out: &mut [f32]) {
    out.par_chunks_mut(w.in_dim)
        .enumerate()
        .take(n)
        .for_each(|(i, row)| w.dequantize_row(start + i, row));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantSpec;

    #[test]
    fn matvec_equals_dequantized_product() {
        for bits in [4, 8] {
            for gs in [32, 64, 128] {
                let (n, k) = (70, 256);
                let w: Vec<f32> = (0..n * k)
                    .map(|i| ((i * 7919 % 211) as f32 / 105.0 - 1.0) * 0.2)
                    .collect();
                let q = AffineWeight::quantize(&w, n, k, QuantSpec::new(bits, gs).unwrap(), "t")
                    .unwrap();
                let x: Vec<f32> = (0..k)
                    .map(|i| ((i * 13 % 29) as f32 / 14.0) - 1.0)
                    .collect();
                let mut y = vec![0f32; n];
                affine_matvec(&q, &x, &mut y);
                let mut row = vec![0f32; k];
                for (r, &yr) in y.iter().enumerate() {
                    q.dequantize_row(r, &mut row);
                    let want: f64 = row
                        .iter()
                        .zip(&x)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum();
                    assert!(
                        (f64::from(yr) - want).abs() < 1e-4,
                        "bits {bits} gs {gs} row {r}: {yr} vs {want}"
                    );
                }
            }
        }
    }
}
