//! Element-wise f32 kernels on the vision encoder's hot path: a vectorised `exp`, the tanh-form GELU
//! and a row softmax, split across the pool.
//!
//! candle runs unary maps on one thread with libm's scalar `tanhf`/`expm1f`; one SmolVLM tile has
//! 3.1 M GELU inputs and 12.6 M attention scores per layer, so those scalar calls were about a fifth of
//! the encoder's time. The `exp` here is Cephes' single-precision polynomial (relative error about
//! 2e-7, i.e. 1-2 ulp), evaluated eight lanes at a time with AVX2+FMA; other CPUs use `f32::exp`.

use rayon::prelude::*;

use super::has_avx2;

/// Elements per parallel task (large enough that dispatch costs nothing next to the work).
const CHUNK: usize = 1 << 14;

/// `exp(x)` for one value, the same polynomial as the vector form (for remainders and tests).
#[inline(always)]
fn exp_poly(x: f32) -> f32 {
    if x < -87.336_54 {
        return 0.0;
    }
    let x = x.min(88.376_26);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 0.166_666_65);
    p = p.mul_add(r, 0.5);
    let y = p.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Eight `exp`s: Cephes' range reduction by ln 2 in two parts, a degree-5 polynomial, and the
    /// power of two built in the exponent bits; inputs below -87.34 give 0 (as `expf` underflows).
    #[inline(always)]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.336_54));
        let x = _mm256_min_ps(x, _mm256_set1_ps(88.376_26));
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.336_54));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693_359_4), x);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.166_666_65));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let y = _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
        _mm256_andnot_ps(underflow, y)
    }

    /// `x / (1 + exp(-2u))` with `u = √(2/π)(x + 0.044715 x³)`: the tanh-form GELU
    /// `0.5 x (1 + tanh u)` rewritten without cancellation.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gelu_tanh(xs: &[f32], out: &mut [f32]) {
        let n = xs.len().min(out.len());
        let n8 = n / 8 * 8;
        let c = _mm256_set1_ps(-2.0 * 0.797_884_6);
        let a = _mm256_set1_ps(0.044_715);
        let one = _mm256_set1_ps(1.0);
        let (src, dst) = (xs.as_ptr(), out.as_mut_ptr());
        let mut i = 0;
        while i < n8 {
            let x = _mm256_loadu_ps(src.add(i));
            let x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
            let t = _mm256_mul_ps(c, _mm256_fmadd_ps(a, x3, x));
            let e = exp8(t);
            _mm256_storeu_ps(dst.add(i), _mm256_div_ps(x, _mm256_add_ps(one, e)));
            i += 8;
        }
        for j in n8..n {
            out[j] = super::gelu_tanh_one(xs[j]);
        }
    }

    /// `out[i] = silu(g[i]) · u[i]` with `silu(x) = x / (1 + exp(-x))`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        let n = out.len().min(g.len()).min(u.len());
        let n8 = n / 8 * 8;
        let one = _mm256_set1_ps(1.0);
        let zero = _mm256_setzero_ps();
        let (gp, up, op) = (g.as_ptr(), u.as_ptr(), out.as_mut_ptr());
        let mut i = 0;
        while i < n8 {
            let x = _mm256_loadu_ps(gp.add(i));
            let e = exp8(_mm256_sub_ps(zero, x));
            let s = _mm256_div_ps(x, _mm256_add_ps(one, e));
            _mm256_storeu_ps(op.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(up.add(i))));
            i += 8;
        }
        for j in n8..n {
            out[j] = super::silu_one(g[j]) * u[j];
        }
    }

    /// In place `row[j] = exp(row[j] - max)`; returns the sum.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sum(row: &mut [f32], max: f32) -> f32 {
        let n = row.len();
        let n8 = n / 8 * 8;
        let p = row.as_mut_ptr();
        let mv = _mm256_set1_ps(max);
        let mut s8 = _mm256_setzero_ps();
        let mut i = 0;
        while i < n8 {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv));
            _mm256_storeu_ps(p.add(i), e);
            s8 = _mm256_add_ps(s8, e);
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), s8);
        let mut sum = 0f32;
        for v in lanes {
            sum += v;
        }
        for v in &mut row[n8..] {
            *v = super::exp_poly(*v - max);
            sum += *v;
        }
        sum
    }

    /// One row in place: `exp(row + bias - max)`, the numerators of its softmax; returns their sum.
    /// A row with every key masked becomes all ones (see [`super::softmax_numerators`]).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn numerators(row: &mut [f32], bias: Option<&[f32]>) -> f32 {
        let n = row.len();
        let n8 = n / 8 * 8;
        let p = row.as_mut_ptr();
        if let Some(b) = bias {
            let bp = b.as_ptr();
            let mut i = 0;
            while i < n8 {
                let s = _mm256_add_ps(_mm256_loadu_ps(p.add(i)), _mm256_loadu_ps(bp.add(i)));
                _mm256_storeu_ps(p.add(i), s);
                i += 8;
            }
            for j in n8..n {
                row[j] += b[j];
            }
        }
        let mut m8 = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < n8 {
            m8 = _mm256_max_ps(m8, _mm256_loadu_ps(p.add(i)));
            i += 8;
        }
        let mut max = crate::kernels::x86::hmax256(m8);
        for &v in &row[n8..] {
            max = max.max(v);
        }
        if max == f32::NEG_INFINITY {
            row.fill(1.0);
            return n as f32;
        }
        exp_sum(row, max)
    }

    /// One row in place: `softmax(row + bias)`, in f32.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax_row(row: &mut [f32], bias: Option<&[f32]>) {
        let n = row.len();
        let n8 = n / 8 * 8;
        let p = row.as_mut_ptr();
        let sum = numerators(row, bias);
        let inv = _mm256_set1_ps(1.0 / sum);
        let mut i = 0;
        while i < n8 {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), inv));
            i += 8;
        }
        let inv = 1.0 / sum;
        for v in &mut row[n8..] {
            *v *= inv;
        }
    }
}

/// The same kernels sixteen lanes wide, for CPUs with AVX-512F (the same polynomial and operations
/// per element as [`avx2`], so the same values).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Sixteen `exp`s, as [`super::avx2::exp8`].
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp16(x: __m512) -> __m512 {
        let underflow = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(-87.336_54));
        let x = _mm512_min_ps(x, _mm512_set1_ps(88.376_26));
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.336_54));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693_359_4), x);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.166_666_65));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
        let y = _mm512_add_ps(
            _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
            _mm512_set1_ps(1.0),
        );
        let pow2 = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        let y = _mm512_mul_ps(y, _mm512_castsi512_ps(pow2));
        _mm512_maskz_mov_ps(!underflow, y)
    }

    /// As [`super::avx2::gelu_tanh`].
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu_tanh(xs: &[f32], out: &mut [f32]) {
        let n = xs.len().min(out.len());
        let n16 = n / 16 * 16;
        let c = _mm512_set1_ps(-2.0 * 0.797_884_6);
        let a = _mm512_set1_ps(0.044_715);
        let one = _mm512_set1_ps(1.0);
        let (src, dst) = (xs.as_ptr(), out.as_mut_ptr());
        for i in (0..n16).step_by(16) {
            let x = _mm512_loadu_ps(src.add(i));
            let x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
            let t = _mm512_mul_ps(c, _mm512_fmadd_ps(a, x3, x));
            let e = exp16(t);
            _mm512_storeu_ps(dst.add(i), _mm512_div_ps(x, _mm512_add_ps(one, e)));
        }
        for j in n16..n {
            out[j] = super::gelu_tanh_one(xs[j]);
        }
    }

    /// As [`super::avx2::numerators`]: the bias added in the maximum's pass, `exp` and the sum in
    /// the second.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn numerators(row: &mut [f32], bias: Option<&[f32]>) -> f32 {
        let n = row.len();
        let n16 = n / 16 * 16;
        let p = row.as_mut_ptr();
        let mut m16 = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..n16).step_by(16) {
            let mut s = _mm512_loadu_ps(p.add(i));
            if let Some(b) = bias {
                s = _mm512_add_ps(s, _mm512_loadu_ps(b.as_ptr().add(i)));
                _mm512_storeu_ps(p.add(i), s);
            }
            m16 = _mm512_max_ps(m16, s);
        }
        let mut max = _mm512_reduce_max_ps(m16);
        for j in n16..n {
            if let Some(b) = bias {
                row[j] += b[j];
            }
            max = max.max(row[j]);
        }
        if max == f32::NEG_INFINITY {
            row.fill(1.0);
            return n as f32;
        }
        let mv = _mm512_set1_ps(max);
        let mut s16 = _mm512_setzero_ps();
        for i in (0..n16).step_by(16) {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), mv));
            _mm512_storeu_ps(p.add(i), e);
            s16 = _mm512_add_ps(s16, e);
        }
        let mut sum = _mm512_reduce_add_ps(s16);
        for v in &mut row[n16..] {
            *v = super::exp_poly(*v - max);
            sum += *v;
        }
        sum
    }
}

#[inline(always)]
fn gelu_tanh_one(x: f32) -> f32 {
    let u = 0.797_884_6 * 0.044_715f32.mul_add(x * x * x, x);
    x / (1.0 + (-2.0 * u).exp())
}

#[inline(always)]
fn silu_one(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Rows of a stacked `[gate | up]` output (`2·width` values each) to rows of `silu(gate) · up`
/// (`width` values each) in `out`.
pub fn silu_mul_rows(gate_up: &[f32], width: usize, out: &mut [f32]) {
    let avx2 = has_avx2();
    let rows_per_task = (CHUNK / width.max(1)).max(1);
    out.par_chunks_mut(rows_per_task * width.max(1))
        .zip(gate_up.par_chunks(rows_per_task * 2 * width.max(1)))
        .for_each(|(o, gu)| {
            for (o, gu) in o.chunks_exact_mut(width).zip(gu.chunks_exact(2 * width)) {
                let (g, u) = gu.split_at(width);
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: the CPU has AVX2 and FMA (checked above).
                    unsafe { avx2::silu_mul(g, u, o) };
                    continue;
                }
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = silu_one(g) * u;
                }
            }
        });
    let _ = avx2;
}

fn gelu_tanh_chunk(xs: &[f32], out: &mut [f32], avx2: bool) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx512f() {
        // SAFETY: the CPU has AVX-512F.
        unsafe { avx512::gelu_tanh(xs, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the CPU has AVX2 and FMA (checked by the caller).
        unsafe { avx2::gelu_tanh(xs, out) };
        return;
    }
    let _ = avx2;
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = gelu_tanh_one(x);
    }
}

/// `out = 0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))` (PyTorch's `gelu(approximate="tanh")`), one
/// parallel pass from `xs` into `out`.
pub fn gelu_tanh(xs: &[f32], out: &mut [f32]) {
    let avx2 = has_avx2();
    out.par_chunks_mut(CHUNK)
        .zip(xs.par_chunks(CHUNK))
        .for_each(|(o, x)| gelu_tanh_chunk(x, o, avx2));
}

/// `erf(x)` in f32 by the odd/even rational approximation that XLA and Eigen use for f32 (inputs
/// clamped to ±4, where erf is ±1 in f32): within 2e-7 of libm's `erff` (unit test), branch-free, so
/// a loop of it vectorizes.
#[inline(always)]
fn erf_rational(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2.mul_add(-2.726_142_3e-10, 2.770_681_4e-8);
    p = x2.mul_add(p, -2.101_024e-6);
    p = x2.mul_add(p, -5.692_506_4e-5);
    p = x2.mul_add(p, -7.349_906_3e-4);
    p = x2.mul_add(p, -2.954_600_1e-3);
    p = x2.mul_add(p, -1.609_603_3e-2);
    let mut q = x2.mul_add(-1.456_607_2e-5, -2.133_740_6e-4);
    q = x2.mul_add(q, -1.682_827e-3);
    q = x2.mul_add(q, -7.373_329_2e-3);
    q = x2.mul_add(q, -1.426_473_9e-2);
    x * p / q
}

#[inline(always)]
fn gelu_erf_chunk_generic(xs: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = 0.5 * x * (1.0 + erf_rational(x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_erf_chunk_avx2(xs: &[f32], out: &mut [f32]) {
    gelu_erf_chunk_generic(xs, out)
}

/// `out = 0.5 x (1 + erf(x / √2))` (PyTorch's exact `gelu`), one parallel pass from `xs` into `out`.
pub fn gelu_erf(xs: &[f32], out: &mut [f32]) {
    let avx2 = has_avx2();
    out.par_chunks_mut(CHUNK)
        .zip(xs.par_chunks(CHUNK))
        .for_each(|(o, x)| {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU has AVX2 and FMA.
                unsafe { gelu_erf_chunk_avx2(x, o) };
                return;
            }
            let _ = avx2;
            gelu_erf_chunk_generic(x, o);
        });
}

/// In place `xs[j] = exp(xs[j] - max)`, returning the sum (the vectorised exponential where the CPU
/// has AVX2, relative error < 3e-7).
pub fn exp_shifted_sum(xs: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2::exp_sum(xs, max) };
    }
    let mut sum = 0f32;
    for v in xs.iter_mut() {
        *v = exp_poly(*v - max);
        sum += *v;
    }
    sum
}

/// In place, each row (`row_len` values) becomes `softmax(row + bias)`; `bias` (`row_len` values, 0
/// or -inf for masked keys) is shared by all rows. Runs on the calling thread.
pub fn softmax_rows(xs: &mut [f32], row_len: usize, bias: Option<&[f32]>) {
    let avx2 = has_avx2();
    for row in xs.chunks_exact_mut(row_len.max(1)) {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU has AVX2 and FMA.
            unsafe { avx2::softmax_row(row, bias) };
            continue;
        }
        softmax_row_scalar(row, bias);
    }
    let _ = avx2;
}

/// In place `row = exp(row + bias - max)`, the numerators of the row's softmax; returns their sum.
/// `bias` (0 or -inf for masked keys) is as in [`softmax_rows`]. A row with every key masked
/// becomes all ones (a uniform softmax; HF's gives NaN there).
pub fn softmax_numerators(row: &mut [f32], bias: Option<&[f32]>) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx512f() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { avx512::numerators(row, bias) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2::numerators(row, bias) };
    }
    if let Some(b) = bias {
        for (x, b) in row.iter_mut().zip(b) {
            *x += b;
        }
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        row.fill(1.0);
        return row.len() as f32;
    }
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = exp_poly(*x - max);
        sum += *x;
    }
    sum
}

fn softmax_row_scalar(row: &mut [f32], bias: Option<&[f32]>) {
    let inv = 1.0 / softmax_numerators(row, bias);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn erf_gelu_matches_libm() {
        let mut worst = 0f64;
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            let got = f64::from(erf_rational(x));
            if x.abs() <= 3.0 {
                worst = worst.max((got - libm_erf(f64::from(x))).abs());
            } else {
                // erfc(3) = 2.2e-5: beyond 3, erf is within that of ±1.
                assert!(
                    (got - f64::from(x.signum())).abs() < 2.3e-5,
                    "erf({x}) = {got}"
                );
            }
        }
        assert!(worst < 3e-7, "erf off by {worst}");
        let xs: Vec<f32> = (0..5000).map(|i| (i as f32 - 2500.0) * 0.0016).collect();
        let mut out = vec![0f32; xs.len()];
        gelu_erf(&xs, &mut out);
        for (&x, &g) in xs.iter().zip(&out) {
            let want =
                0.5 * f64::from(x) * (1.0 + libm_erf(f64::from(x) / std::f64::consts::SQRT_2));
            assert!(
                (f64::from(g) - want).abs() < 1e-6 * (1.0 + want.abs()),
                "gelu({x})"
            );
        }
    }

    /// erf in f64 by its Maclaurin series (Abramowitz-Stegun 7.1.5; accurate to about 1e-12 for
    /// |x| <= 3, where the terms' cancellation stays small).
    fn libm_erf(x: f64) -> f64 {
        let mut term = x;
        let mut sum = x;
        let x2 = x * x;
        for n in 1..200 {
            term *= -x2 / n as f64;
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() < 1e-18 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    use super::*;

    fn rel(a: f32, b: f64) -> f64 {
        ((a as f64 - b) / b.abs().max(1e-30)).abs()
    }

    /// The polynomial against f64 `exp` over the whole useful range, scalar and vector forms.
    #[test]
    fn exp_is_within_two_ulp() {
        let xs: Vec<f32> = (-8734..8837).map(|i| i as f32 * 0.01 + 0.003).collect();
        let mut worst = 0f64;
        for &x in &xs {
            worst = worst.max(rel(exp_poly(x), (x as f64).exp()));
        }
        assert!(worst < 3e-7, "scalar exp relative error {worst}");
        assert_eq!(exp_poly(-100.0), 0.0);
        assert_eq!(exp_poly(f32::NEG_INFINITY), 0.0);
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            use std::arch::x86_64::*;
            let mut worst = 0f64;
            for c in xs.chunks_exact(8) {
                let mut out = [0f32; 8];
                // SAFETY: AVX2 checked above; 8 values in and out.
                unsafe {
                    _mm256_storeu_ps(out.as_mut_ptr(), avx2::exp8(_mm256_loadu_ps(c.as_ptr())));
                }
                for (o, &x) in out.iter().zip(c) {
                    worst = worst.max(rel(*o, (x as f64).exp()));
                }
            }
            assert!(worst < 3e-7, "vector exp relative error {worst}");
            let mut out = [1f32; 8];
            let inf = [f32::NEG_INFINITY, -90.0, -1e30, 0.0, 1.0, -87.0, 2.0, 3.0];
            // SAFETY: as above.
            unsafe {
                _mm256_storeu_ps(out.as_mut_ptr(), avx2::exp8(_mm256_loadu_ps(inf.as_ptr())))
            };
            assert_eq!(&out[..3], &[0.0, 0.0, 0.0]);
            assert_eq!(out[3], 1.0);
        }
    }

    /// GELU against the f64 tanh formula, with lengths that leave vector remainders.
    #[test]
    fn gelu_matches_tanh_formula() {
        let xs: Vec<f32> = (0..20_011)
            .map(|i| (i as f32 - 10_000.0) * 1.3e-3)
            .collect();
        let mut ys = vec![0f32; xs.len()];
        gelu_tanh(&xs, &mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let x64 = x as f64;
            let want = 0.5
                * x64
                * (1.0
                    + ((2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64.powi(3)))
                        .tanh());
            assert!(
                (y as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "gelu({x}) = {y}, want {want}"
            );
        }
    }

    /// `silu(gate) · up` over stacked rows against f64, with a width that leaves vector remainders.
    #[test]
    fn silu_mul_matches_formula() {
        let (rows, width) = (5, 37);
        let gu: Vec<f32> = (0..rows * 2 * width)
            .map(|i| ((i * 7919 % 211) as f32 - 105.0) / 11.0)
            .collect();
        let mut out = vec![0f32; rows * width];
        silu_mul_rows(&gu, width, &mut out);
        for r in 0..rows {
            for j in 0..width {
                let g = f64::from(gu[r * 2 * width + j]);
                let u = f64::from(gu[r * 2 * width + width + j]);
                let want = g / (1.0 + (-g).exp()) * u;
                let got = f64::from(out[r * width + j]);
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{got} vs {want}"
                );
            }
        }
    }

    /// Softmax with a key mask against f64, including a fully masked row.
    #[test]
    fn softmax_rows_with_mask() {
        let n = 37;
        let mut bias = vec![0f32; n];
        bias[3] = f32::NEG_INFINITY;
        bias[30] = f32::NEG_INFINITY;
        let mut xs: Vec<f32> = (0..3 * n)
            .map(|i| ((i * 7919 % 97) as f32 - 48.0) * 0.37)
            .collect();
        let orig = xs.clone();
        softmax_rows(&mut xs, n, Some(&bias));
        for r in 0..3 {
            let row = &orig[r * n..(r + 1) * n];
            let m = row
                .iter()
                .zip(&bias)
                .map(|(&x, &b)| (x + b) as f64)
                .fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = row
                .iter()
                .zip(&bias)
                .map(|(&x, &b)| ((x + b) as f64 - m).exp())
                .collect();
            let s: f64 = e.iter().sum();
            for j in 0..n {
                let got = xs[r * n + j] as f64;
                assert!(
                    (got - e[j] / s).abs() < 1e-6,
                    "row {r} col {j}: {got} vs {}",
                    e[j] / s
                );
            }
            assert_eq!(xs[r * n + 3], 0.0);
        }
        let mut all = vec![1f32; n];
        softmax_rows(&mut all, n, Some(&vec![f32::NEG_INFINITY; n]));
        assert!(all.iter().all(|&p| (p - 1.0 / n as f32).abs() < 1e-7));
    }

    /// The numerators every width computes (AVX-512, AVX2, scalar) agree element by element, with the
    /// bias added, masked keys 0 and a tail past the last full vector; a fully masked row is all ones.
    #[test]
    fn numerators_agree_across_widths() {
        let n = 16 * 40 + 7;
        let bias: Vec<f32> = (0..n)
            .map(|j| if j % 13 == 5 { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        let row: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 211) as f32 - 105.0) * 0.21)
            .collect();
        let reference = |row: &[f32]| -> (Vec<f32>, f32) {
            let mut r = row.to_vec();
            for (x, b) in r.iter_mut().zip(&bias) {
                *x += b;
            }
            let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for x in r.iter_mut() {
                *x = exp_poly(*x - max);
            }
            let sum = r.iter().sum();
            (r, sum)
        };
        let (want, want_sum) = reference(&row);
        let mut got = row.clone();
        let sum = softmax_numerators(&mut got, Some(&bias));
        for (j, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 2e-7 * w.abs(), "key {j}: {g} vs {w}");
        }
        assert!((sum - want_sum).abs() < 1e-5 * want_sum);
        assert_eq!(got[5], 0.0);
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::has_avx512f() {
            let (mut wide, mut narrow) = (row.clone(), row.clone());
            // SAFETY: the CPU has AVX-512F, and so AVX2 and FMA (has_avx512f checks both).
            let (s16, s8) = unsafe {
                (
                    avx512::numerators(&mut wide, Some(&bias)),
                    avx2::numerators(&mut narrow, Some(&bias)),
                )
            };
            assert_eq!(wide, narrow);
            assert!((s16 - s8).abs() < 1e-5 * s8);
        }
        let mut masked = row.clone();
        let all = vec![f32::NEG_INFINITY; n];
        assert_eq!(softmax_numerators(&mut masked, Some(&all)), n as f32);
        assert!(masked.iter().all(|&x| x == 1.0));
    }
}
