//! f32 matrix-vector product `y = W x` for one token (decode), with `W` row-major `(out, in)`.
//!
//! The general GEMM treats a single row as a tiny matrix and runs far below memory bandwidth; here each
//! output is a contiguous dot product, rows are split across the thread pool, and the inner loop uses
//! AVX2+FMA when the CPU has them (checked at run time), else the compiler's portable vector code.

use candle_core::{Storage, Tensor};
use rayon::prelude::*;

/// Rows per parallel task: large enough to amortise scheduling, small enough to balance 2–16 threads.
const ROWS_PER_TASK: usize = 64;

#[inline(always)]
fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..16 {
            acc[j] = x[j].mul_add(y[j], acc[j]);
        }
    }
    let mut s = 0f32;
    for v in acc {
        s += v;
    }
    for (x, y) in ra.iter().zip(rb) {
        s = x.mul_add(*y, s);
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_generic(a, b)
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_generic(a, b)
}

/// `out[r] = row_dot(r)` for every row, rows split across the thread pool.
fn par_rows(out: &mut [f32], row_dot: impl Fn(usize) -> f32 + Sync) {
    out.par_chunks_mut(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(chunk, ys)| {
            for (i, y) in ys.iter_mut().enumerate() {
                *y = row_dot(chunk * ROWS_PER_TASK + i);
            }
        });
}

/// `out[j] = dot(w[j*k..(j+1)*k], x)` for all rows, in parallel.
pub fn matvec_f32(w: &[f32], x: &[f32], out: &mut [f32]) {
    let k = x.len();
    debug_assert_eq!(w.len(), k * out.len());
    par_rows(out, |r| dot(&w[r * k..(r + 1) * k], x));
}

/// `w · x` for an f16 row, widened in registers (F16C) as it is read: no f32 copy of the weight.
fn dot_f16(w: &[half::f16], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if super::has_avx512f() {
            // SAFETY: the CPU has AVX-512F (and F16C with it); the slices are read within bounds.
            return unsafe { dot_f16_avx512(w, x) };
        }
        if super::has_avx2() {
            // SAFETY: the CPU has AVX2, FMA and F16C.
            return unsafe { dot_f16_avx2(w, x) };
        }
    }
    w.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn dot_f16_avx512(w: &[half::f16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len().min(x.len());
    let (wp, xp) = (w.as_ptr() as *const u16, x.as_ptr());
    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i + 32 <= n {
        let w0 = _mm512_cvtph_ps(_mm256_loadu_si256(wp.add(i) as *const __m256i));
        let w1 = _mm512_cvtph_ps(_mm256_loadu_si256(wp.add(i + 16) as *const __m256i));
        a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp.add(i)), a0);
        a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(i + 16)), a1);
        i += 32;
    }
    let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    while i < n {
        s += w[i].to_f32() * x[i];
        i += 1;
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_avx2(w: &[half::f16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len().min(x.len());
    let (wp, xp) = (w.as_ptr() as *const u16, x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, a) in acc.iter_mut().enumerate() {
            let wv = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(i + 8 * j) as *const __m128i));
            *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(i + 8 * j)), *a);
        }
        i += 32;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut s = super::x86::hsum256(sum);
    while i < n {
        s += w[i].to_f32() * x[i];
        i += 1;
    }
    s
}

/// `out[j] = dot(w[j*k..(j+1)*k], x)` for an f16 weight, rows in parallel: a decode step's product
/// reads the 16-bit weight once, half the bytes of an f32 copy, widening it in registers.
pub fn matvec_f16(w: &[half::f16], x: &[f32], out: &mut [f32]) {
    let k = x.len();
    debug_assert_eq!(w.len(), k * out.len());
    par_rows(out, |r| dot_f16(&w[r * k..(r + 1) * k], x));
}

/// `x (1, in) · Wᵀ` for a contiguous f32 CPU weight `(out, in)`; `None` when the fast path does not apply
/// (other device or dtype, or a layout it does not read), so the caller falls back to the GEMM.
pub fn try_matvec(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (out_dim, k) = w.dims2()?;
    if x.elem_count() != k || !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return Ok(None);
    }
    let (ws, wl) = w.storage_and_layout();
    let (xs, xl) = x.storage_and_layout();
    let (Storage::Cpu(ws), Storage::Cpu(xs)) = (&*ws, &*xs) else {
        return Ok(None);
    };
    let (Some((w0, w1)), Some((x0, x1))) = (wl.contiguous_offsets(), xl.contiguous_offsets())
    else {
        return Ok(None);
    };
    let (Ok(wv), Ok(xv)) = (ws.as_slice::<f32>(), xs.as_slice::<f32>()) else {
        return Ok(None);
    };
    let mut y = vec![0f32; out_dim];
    matvec_f32(&wv[w0..w1], &xv[x0..x1], &mut y);
    Ok(Some(Tensor::from_vec(y, (1, out_dim), x.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_rows_match_the_widened_product() {
        for (n, k) in [(1, 1), (3, 17), (130, 512), (65, 33), (7, 2048)] {
            let w: Vec<half::f16> = (0..n * k)
                .map(|i| half::f16::from_f32(((i * 7919) % 113) as f32 / 57.0 - 1.0))
                .collect();
            let x: Vec<f32> = (0..k).map(|i| ((i * 31) % 17) as f32 / 9.0 - 0.9).collect();
            let mut y = vec![0f32; n];
            matvec_f16(&w, &x, &mut y);
            for r in 0..n {
                let want: f64 = (0..k)
                    .map(|c| f64::from(w[r * k + c].to_f32()) * f64::from(x[c]))
                    .sum();
                assert!(
                    (f64::from(y[r]) - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{n}x{k} row {r}: {} vs {want}",
                    y[r]
                );
            }
        }
    }

    #[test]
    fn matches_naive_product_at_odd_sizes() {
        for (n, k) in [(1, 1), (3, 17), (130, 576), (65, 33)] {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919) % 113) as f32 / 57.0 - 1.0)
                .collect();
            let x: Vec<f32> = (0..k).map(|i| ((i * 31) % 17) as f32 / 9.0 - 0.9).collect();
            let mut y = vec![0f32; n];
            matvec_f32(&w, &x, &mut y);
            for r in 0..n {
                let want: f64 = (0..k)
                    .map(|c| f64::from(w[r * k + c]) * f64::from(x[c]))
                    .sum();
                assert!(
                    (f64::from(y[r]) - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{n}x{k} row {r}"
                );
            }
        }
    }
}
