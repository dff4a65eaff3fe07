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

/// `out[j] = dot(w[j*k..(j+1)*k], x)` for all rows, in parallel.
pub fn matvec_f32(w: &[f32], x: &[f32], out: &mut [f32]) {
    let k = x.len();
    debug_assert_eq!(w.len(), k * out.len());
    out.par_chunks_mut(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(chunk, ys)| {
            let row0 = chunk * ROWS_PER_TASK;
            for (i, y) in ys.iter_mut().enumerate() {
                let r = row0 + i;
                *y = dot(&w[r * k..(r + 1) * k], x);
            }
        });
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
