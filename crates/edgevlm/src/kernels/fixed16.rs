//! Products of many inputs with a 16-bit weight on x86 CPUs without AMX: both operands as 16-bit
//! integers, multiplied by `vpmaddwd` (16 multiply-adds per instruction where an f32 FMA does 8;
//! `vpdpwssd` fuses its add on AVX-VNNI), the sums exact in i32 and scaled in f32.
//!
//! This is the vision encoder's path where the CPU has AVX2 but no AMX tiles: a tile's 1,024 patches make its products bound by arithmetic, and on such CPUs f32
//! FMAs leave half of the multiplier's width unused.
//!
//! Numbers: weight row `r` is held as `scale_r · q` with `|q| ≤ 8191` (14 bits of the row's largest
//! value; a bf16 checkpoint's values carry 8 significant bits). Each input row is rounded per block of
//! 32 values to `s_b · q`, `|q| ≤ 8191` (a relative step of 1.2e-4 of the block's largest value:
//! finer than the bf16 rounding the AMX path gives each input, and an outlier only coarsens its own
//! block). A block's 32 products are summed exactly in i32 (16 pairs of at most 2 · 8191² stay below
//! 2³¹), converted to f32 and scaled by `s_b`; the blocks are summed in f32 and the row scale applied
//! last. A block holding a NaN or an infinity makes its row's outputs NaN.
//!
//! Layout: panels of 16 output columns; inside a panel, for each pair of inputs `(2j, 2j + 1)`, the
//! 16 columns' two weights side by side (`[n/16][k/2][16][2]`): what `vpmaddwd` reads against one
//! input pair broadcast to every lane. The inputs are rounded once per product and shared by every
//! panel. The work is split over the thread pool in blocks of rows × four panels; the AVX2 kernel
//! keeps three rows × 16 columns of i32 block sums and f32 totals in registers, the AVX-VNNI one five
//! rows of sums (`vpdpwssd` waits on its own sum: ten in flight) with the totals in L1.

use rayon::prelude::*;

/// The largest code: 14 bits, so that a block's sums cannot overflow i32.
const LEVELS: f32 = 8191.0;
/// Inputs per scaled block.
const BLOCK: usize = 32;
/// Output columns per panel.
const COLS: usize = 16;
/// Input rows the kernels carry at once at most (the AVX2 kernel three, the AVX-VNNI one five).
const ROWS: usize = 5;
/// Input rows and panels per parallel task.
const TASK_ROWS: usize = 90;
const TASK_PANELS: usize = 4;

/// Whether these products can run here: an x86 CPU with AVX2 and FMA.
pub fn available() -> bool {
    super::has_avx2()
}

/// A weight `W (n × k)` packed for [`Fixed16Weight::matmul`].
#[derive(Debug)]
pub struct Fixed16Weight {
    n: usize,
    k: usize,
    /// `k` rounded up to whole blocks (the padding holds zeros).
    k_pad: usize,
    /// One per output column, `n` rounded up to whole panels (the padding holds zeros).
    scales: Vec<f32>,
    panels: Vec<i16>,
}

impl Fixed16Weight {
    /// Packs the weight whose row `r` `row(r, out)` writes in f32; `None` for an empty shape.
    pub fn pack(n: usize, k: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Option<Self> {
        if n == 0 || k == 0 {
            return None;
        }
        let k_pad = k.div_ceil(BLOCK) * BLOCK;
        let n_pad = n.div_ceil(COLS) * COLS;
        let mut scales = vec![0f32; n_pad];
        let mut panels = vec![0i16; n_pad * k_pad];
        panels
            .par_chunks_mut(COLS * k_pad)
            .zip(scales.par_chunks_mut(COLS))
            .enumerate()
            .for_each(|(p, (panel, scales))| {
                let mut values = vec![0f32; k];
                for (c, scale) in scales.iter_mut().enumerate() {
                    let r = p * COLS + c;
                    if r >= n {
                        break;
                    }
                    row(r, &mut values);
                    let (s, inv) = scale_of(&values);
                    *scale = s;
                    for (j, v) in values.iter().enumerate() {
                        panel[(j / 2) * 2 * COLS + 2 * c + j % 2] = code(*v, inv);
                    }
                }
            });
        Some(Self {
            n,
            k,
            k_pad,
            scales,
            panels,
        })
    }

    /// The weights of `parts` one after another (the rows of a fused projection); `None` unless they
    /// share `k` and every part but the last fills whole panels.
    pub fn stack(parts: &[&Fixed16Weight]) -> Option<Self> {
        let first = parts.first()?;
        let (k, k_pad) = (first.k, first.k_pad);
        let (last, rest) = parts.split_last()?;
        if parts.iter().any(|p| p.k != k) || rest.iter().any(|p| p.n % COLS != 0) {
            return None;
        }
        Some(Self {
            n: rest.iter().map(|p| p.n).sum::<usize>() + last.n,
            k,
            k_pad,
            scales: parts
                .iter()
                .flat_map(|p| p.scales.iter().copied())
                .collect(),
            panels: parts
                .iter()
                .flat_map(|p| p.panels.iter().copied())
                .collect(),
        })
    }

    /// Every output multiplied by `factor`, folded into the column scales (so into the f32 step
    /// where each column's sums are scaled anyway).
    pub fn scale_outputs(&mut self, factor: f32) {
        for s in &mut self.scales {
            *s *= factor;
        }
    }

    pub fn out_dim(&self) -> usize {
        self.n
    }

    pub fn in_dim(&self) -> usize {
        self.k
    }

    /// `ys (t × n) = xs (t × k) · Wᵀ`; `false` (nothing written) where the CPU lacks AVX2 or the
    /// lengths do not fit the shape.
    pub fn matmul(&self, xs: &[f32], ys: &mut [f32]) -> bool {
        let k = self.k;
        if !available() || !xs.len().is_multiple_of(k) || ys.len() != xs.len() / k * self.n {
            return false;
        }
        if xs.is_empty() {
            return true;
        }
        thread_local! {
            // The rounded inputs, reused by the products this thread starts.
            static INPUTS: std::cell::RefCell<Inputs> = std::cell::RefCell::default();
        }
        let isa = Isa::detect();
        INPUTS.with(|cell| match cell.try_borrow_mut() {
            Ok(mut inputs) => self.product_with(isa, &mut inputs, xs, ys),
            // A product started from inside another on this thread (a stolen task): its own buffers.
            Err(_) => self.product_with(isa, &mut Inputs::default(), xs, ys),
        });
        true
    }

    /// [`Self::matmul`] by the kernel `isa` names (which the CPU has).
    fn product_with(&self, isa: Isa, inputs: &mut Inputs, xs: &[f32], ys: &mut [f32]) {
        inputs.round(xs, self.k, self.k_pad);
        let t = xs.len() / self.k;
        let panels = self.scales.len() / COLS;
        let groups = panels.div_ceil(TASK_PANELS);
        // Each task writes a disjoint block of `ys`, passed as an address.
        let ys_addr = ys.as_mut_ptr() as usize;
        let inputs = &*inputs;
        (0..t.div_ceil(TASK_ROWS) * groups)
            .into_par_iter()
            .for_each(|task| {
                let (r0, g) = ((task / groups) * TASK_ROWS, task % groups);
                let r1 = (r0 + TASK_ROWS).min(t);
                for p in g * TASK_PANELS..((g + 1) * TASK_PANELS).min(panels) {
                    let c0 = p * COLS;
                    let cols = COLS.min(self.n - c0);
                    let mut r = r0;
                    while r < r1 {
                        let rows = isa.rows().min(r1 - r);
                        let mut out = [[0f32; COLS]; ROWS];
                        self.panel_rows(isa, p, inputs, r, rows, &mut out);
                        for (i, o) in out.iter().take(rows).enumerate() {
                            // SAFETY: row r + i < t and columns c0..c0 + cols < n lie inside `ys`
                            // (t × n); no other task writes this row's columns of this panel.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    o.as_ptr(),
                                    (ys_addr as *mut f32).add((r + i) * self.n + c0),
                                    cols,
                                );
                            }
                        }
                        r += rows;
                    }
                }
            });
    }

    /// Rows `r .. r + rows` (at most [`ROWS`]) of the rounded inputs times panel `p`, scaled.
    fn panel_rows(
        &self,
        isa: Isa,
        p: usize,
        inputs: &Inputs,
        r: usize,
        rows: usize,
        out: &mut [[f32; COLS]; ROWS],
    ) {
        let panel = &self.panels[p * COLS * self.k_pad..(p + 1) * COLS * self.k_pad];
        let scales = &self.scales[p * COLS..(p + 1) * COLS];
        let blocks = self.k_pad / BLOCK;
        let codes = &inputs.codes[r * self.k_pad..(r + rows) * self.k_pad];
        let steps = &inputs.steps[r * blocks..(r + rows) * blocks];
        let args = Panel {
            panel,
            scales,
            codes,
            steps,
            k_pad: self.k_pad,
        };
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `Isa::detect` saw AVX2 and FMA (and AVX-VNNI for `Vnni`); `args` holds
            // `rows` whole input rows and one whole panel.
            unsafe {
                match (isa, rows) {
                    (Isa::Vnni, 5) => x86::panel_vnni::<5>(&args, out),
                    (Isa::Vnni, 4) => x86::panel_vnni::<4>(&args, out),
                    (Isa::Vnni, 3) => x86::panel_vnni::<3>(&args, out),
                    (Isa::Vnni, 2) => x86::panel_vnni::<2>(&args, out),
                    (Isa::Vnni, _) => x86::panel_vnni::<1>(&args, out),
                    (Isa::Avx2, 3) => x86::panel_avx2::<3>(&args, out),
                    (Isa::Avx2, 2) => x86::panel_avx2::<2>(&args, out),
                    (Isa::Avx2, _) => x86::panel_avx2::<1>(&args, out),
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = isa;
            panel_exact(&args, rows, out);
        }
    }
}

/// Which form of the kernel runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Isa {
    Avx2,
    /// `vpdpwssd` on 256-bit registers.
    Vnni,
}

impl Isa {
    /// Input rows per kernel call.
    fn rows(self) -> usize {
        match self {
            Isa::Avx2 => 3,
            Isa::Vnni => 5,
        }
    }

    fn detect() -> Self {
        if super::has_avx_vnni() {
            Isa::Vnni
        } else {
            Isa::Avx2
        }
    }
}

/// The operands of one kernel call.
struct Panel<'a> {
    panel: &'a [i16],
    scales: &'a [f32],
    codes: &'a [i16],
    steps: &'a [f32],
    k_pad: usize,
}

/// The inputs of a product rounded per block: `codes` (t × k_pad) and `steps` (t × k_pad / 32).
#[derive(Default)]
struct Inputs {
    codes: Vec<i16>,
    steps: Vec<f32>,
}

impl Inputs {
    fn round(&mut self, xs: &[f32], k: usize, k_pad: usize) {
        let t = xs.len() / k;
        let blocks = k_pad / BLOCK;
        self.codes.resize(t * k_pad, 0);
        self.steps.resize(t * blocks, 0.0);
        self.codes
            .par_chunks_mut(k_pad)
            .zip(self.steps.par_chunks_mut(blocks))
            .zip(xs.par_chunks(k))
            .with_min_len(16)
            .for_each(|((codes, steps), x)| round_row(x, codes, steps));
    }
}

/// The row scale of `values` and its inverse (0 for a row of zeros; NaN where a value is not finite).
fn scale_of(values: &[f32]) -> (f32, f32) {
    let mut max = 0f32;
    let mut finite = true;
    for v in values {
        max = max.max(v.abs());
        finite &= v.is_finite();
    }
    if !finite {
        (f32::NAN, 0.0)
    } else if max < 1e-30 {
        // Too small to invert in f32 (and nothing the sums would notice): held as zeros.
        (0.0, 0.0)
    } else {
        (max / LEVELS, LEVELS / max)
    }
}

/// `v` in steps of `1 / inv`, rounded to nearest even (as `vcvtps2dq` rounds).
#[inline]
fn code(v: f32, inv: f32) -> i16 {
    // Adding 1.5 · 2^23 leaves a float whose last place is 1: the sum rounds to the nearest integer,
    // ties to even, without a libm call (`round_ties_even` is one on a baseline x86-64 build);
    // exact for |v · inv| ≤ 2^22, and `inv` keeps it within LEVELS.
    const MAGIC: f32 = 12_582_912.0;
    (((v * inv) + MAGIC) - MAGIC).clamp(-LEVELS, LEVELS) as i16
}

/// One input row in blocks of 32: `codes` (`k_pad` values, zero past the row) and `steps`.
fn round_row(x: &[f32], codes: &mut [i16], steps: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        let whole = x.len() / BLOCK;
        // SAFETY: AVX2 was detected; the first `whole` blocks lie inside `x`, `codes` and `steps`.
        unsafe { x86::round_blocks(&x[..whole * BLOCK], codes, steps) };
        if whole * BLOCK < x.len() {
            round_blocks_exact(
                &x[whole * BLOCK..],
                &mut codes[whole * BLOCK..],
                &mut steps[whole..],
            );
        }
        return;
    }
    round_blocks_exact(x, codes, steps);
}

/// [`round_row`] in plain Rust, one block at a time (the last block may be short).
fn round_blocks_exact(x: &[f32], codes: &mut [i16], steps: &mut [f32]) {
    for ((xb, cb), step) in x
        .chunks(BLOCK)
        .zip(codes.chunks_mut(BLOCK))
        .zip(steps.iter_mut())
    {
        let (s, inv) = scale_of(xb);
        *step = s;
        for (c, v) in cb.iter_mut().zip(xb) {
            *c = code(*v, inv);
        }
        cb[xb.len()..].fill(0);
    }
    let used = x.len().div_ceil(BLOCK);
    steps[used..].fill(0.0);
    codes[used * BLOCK..].fill(0);
}

/// The kernel's arithmetic in plain Rust, in the same order (so it gives the same bits): per block the
/// exact i32 sum, converted to f32 and fused-multiply-added with the step, the row scale last.
#[cfg(any(test, not(target_arch = "x86_64")))]
fn panel_exact(a: &Panel, rows: usize, out: &mut [[f32; COLS]; ROWS]) {
    let blocks = a.k_pad / BLOCK;
    for (i, o) in out.iter_mut().take(rows).enumerate() {
        for (c, o) in o.iter_mut().enumerate() {
            let mut total = 0f32;
            for b in 0..blocks {
                let mut sum = 0i32;
                for j in b * BLOCK..(b + 1) * BLOCK {
                    let w = a.panel[(j / 2) * 2 * COLS + 2 * c + j % 2];
                    sum += i32::from(w) * i32::from(a.codes[i * a.k_pad + j]);
                }
                total = (sum as f32).mul_add(a.steps[i * blocks + b], total);
            }
            *o = total * a.scales[c];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Panel, BLOCK, COLS, LEVELS, ROWS};
    use std::arch::x86_64::*;

    /// The kernel on AVX2: `vpmaddwd` and `vpaddd`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn panel_avx2<const R: usize>(a: &Panel, out: &mut [[f32; COLS]; ROWS]) {
        panel_with::<R>(a, out)
    }

    /// The kernel on AVX-VNNI: `vpdpwssd`, whose sum is its own input (five cycles from one to the
    /// next): five rows' ten sums in flight; the f32 totals live in `out` (read and written once
    /// per block).
    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub(super) unsafe fn panel_vnni<const R: usize>(a: &Panel, out: &mut [[f32; COLS]; ROWS]) {
        let blocks = a.k_pad / BLOCK;
        let w = a.panel.as_ptr();
        for o in out.iter_mut() {
            *o = [0.0; COLS];
        }
        for b in 0..blocks {
            let mut sums = [[_mm256_setzero_si256(); 2]; R];
            for j in 0..BLOCK / 2 {
                step_vnni(a, w, b * BLOCK / 2 + j, &mut sums);
            }
            for (i, (o, s)) in out.iter_mut().zip(&sums).enumerate() {
                let step = _mm256_set1_ps(*a.steps.get_unchecked(i * blocks + b));
                for (c, sum) in s.iter().enumerate() {
                    let sum = *sum;
                    let at = o.as_mut_ptr().add(8 * c);
                    let t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), step, _mm256_loadu_ps(at));
                    _mm256_storeu_ps(at, t);
                }
            }
        }
        for o in out.iter_mut().take(R) {
            for c in 0..2 {
                let at = o.as_mut_ptr().add(8 * c);
                let scale = _mm256_loadu_ps(a.scales.as_ptr().add(8 * c));
                _mm256_storeu_ps(at, _mm256_mul_ps(_mm256_loadu_ps(at), scale));
            }
        }
    }

    /// Pair `pair` of the panel against the `R` rows' inputs, into `sums` by `vpdpwssd`.
    #[inline(always)]
    unsafe fn step_vnni<const R: usize>(
        a: &Panel,
        w: *const i16,
        pair: usize,
        sums: &mut [[__m256i; 2]; R],
    ) {
        let w0 = _mm256_loadu_si256(w.add(pair * 2 * COLS) as *const __m256i);
        let w1 = _mm256_loadu_si256(w.add(pair * 2 * COLS + COLS) as *const __m256i);
        for (i, s) in sums.iter_mut().enumerate() {
            let x = (a.codes.as_ptr().add(i * a.k_pad + 2 * pair) as *const i32).read_unaligned();
            let x = _mm256_set1_epi32(x);
            dpwssd(&mut s[0], x, w0);
            dpwssd(&mut s[1], x, w1);
        }
    }

    /// `acc += madd(x, w)` as one `vpdpwssd` (VEX-encoded). Written as assembly because LLVM splits
    /// the intrinsic into `vpmaddwd` + `vpaddd` in unrolled loops, which halves its speed.
    #[inline]
    #[target_feature(enable = "avx2,avxvnni")]
    unsafe fn dpwssd(acc: &mut __m256i, x: __m256i, w: __m256i) {
        std::arch::asm!(
            "{{vex}} vpdpwssd {acc}, {x}, {w}",
            acc = inout(ymm_reg) *acc,
            x = in(ymm_reg) x,
            w = in(ymm_reg) w,
            options(pure, nomem, nostack, preserves_flags),
        );
    }

    /// `R` input rows times one panel: per block of 32 inputs, 16 pair steps of two weight vectors
    /// (columns 0-7 and 8-15) against each row's broadcast pair into i32 sums, then each sum
    /// converted and accumulated in f32 with its row's step; the column scales last.
    #[inline(always)]
    unsafe fn panel_with<const R: usize>(a: &Panel, out: &mut [[f32; COLS]; ROWS]) {
        let blocks = a.k_pad / BLOCK;
        let w = a.panel.as_ptr();
        let mut total = [[_mm256_setzero_ps(); 2]; R];
        for b in 0..blocks {
            let mut sums = [[_mm256_setzero_si256(); 2]; R];
            for j in 0..BLOCK / 2 {
                let pair = b * BLOCK / 2 + j;
                let w0 = _mm256_loadu_si256(w.add(pair * 2 * COLS) as *const __m256i);
                let w1 = _mm256_loadu_si256(w.add(pair * 2 * COLS + COLS) as *const __m256i);
                for (i, s) in sums.iter_mut().enumerate() {
                    let x = (a.codes.as_ptr().add(i * a.k_pad + 2 * pair) as *const i32)
                        .read_unaligned();
                    let x = _mm256_set1_epi32(x);
                    s[0] = _mm256_add_epi32(s[0], _mm256_madd_epi16(x, w0));
                    s[1] = _mm256_add_epi32(s[1], _mm256_madd_epi16(x, w1));
                }
            }
            for (i, (t, s)) in total.iter_mut().zip(&sums).enumerate() {
                let step = _mm256_set1_ps(*a.steps.get_unchecked(i * blocks + b));
                t[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[0]), step, t[0]);
                t[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[1]), step, t[1]);
            }
        }
        let scale = [
            _mm256_loadu_ps(a.scales.as_ptr()),
            _mm256_loadu_ps(a.scales.as_ptr().add(8)),
        ];
        for (o, t) in out.iter_mut().zip(&total) {
            _mm256_storeu_ps(o.as_mut_ptr(), _mm256_mul_ps(t[0], scale[0]));
            _mm256_storeu_ps(o.as_mut_ptr().add(8), _mm256_mul_ps(t[1], scale[1]));
        }
    }

    /// Whole blocks of `x` rounded as [`super::round_blocks_exact`] rounds them (the same bits):
    /// the block's largest magnitude, its step and inverse, the codes by `vcvtps2dq` (nearest even)
    /// packed to 16 bits.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn round_blocks(x: &[f32], codes: &mut [i16], steps: &mut [f32]) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        for (b, xb) in x.chunks_exact(BLOCK).enumerate() {
            let v: [__m256; 4] = std::array::from_fn(|q| _mm256_loadu_ps(xb.as_ptr().add(8 * q)));
            // A value that is not finite has its exponent bits all set: |v| ≥ infinity as integers.
            let bits = v.map(|v| _mm256_castps_si256(_mm256_and_ps(v, abs_mask)));
            let inf = _mm256_set1_epi32(0x7F80_0000 - 1);
            let bad = bits.iter().fold(_mm256_setzero_si256(), |acc, b| {
                _mm256_or_si256(acc, _mm256_cmpgt_epi32(*b, inf))
            });
            let cb = codes.as_mut_ptr().add(b * BLOCK);
            if _mm256_movemask_epi8(bad) != 0 {
                *steps.get_unchecked_mut(b) = f32::NAN;
                std::ptr::write_bytes(cb, 0, BLOCK);
                continue;
            }
            // Finite magnitudes order as their bit patterns do.
            let m = _mm256_max_epi32(
                _mm256_max_epi32(bits[0], bits[1]),
                _mm256_max_epi32(bits[2], bits[3]),
            );
            let m = _mm_max_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
            let m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0b01_00_11_10));
            let m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0b10_11_00_01));
            let max = f32::from_bits(_mm_cvtsi128_si32(m) as u32);
            let (step, inv) = if max < 1e-30 {
                (0.0, 0.0)
            } else {
                (max / LEVELS, LEVELS / max)
            };
            *steps.get_unchecked_mut(b) = step;
            let inv = _mm256_set1_ps(inv);
            let q = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, inv)));
            // packs interleaves 128-bit halves: [q0 lo, q1 lo, q0 hi, q1 hi] -> put them in order.
            let lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0b11_01_10_00);
            let hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0b11_01_10_00);
            _mm256_storeu_si256(cb as *mut __m256i, lo);
            _mm256_storeu_si256(cb.add(16) as *mut __m256i, hi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(n: usize, k: usize) -> Vec<f32> {
        (0..n * k)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 3000.0)
            .collect()
    }

    /// Inputs with an outlier every 61 values and a block of zeros.
    fn inputs(t: usize, k: usize) -> Vec<f32> {
        (0..t * k)
            .map(|i| {
                if (64..96).contains(&(i % k)) {
                    return 0.0;
                }
                ((i * 31 % 97) as f32 - 48.0) / 40.0 + if i % 61 == 0 { 30.0 } else { 0.0 }
            })
            .collect()
    }

    fn abs(v: &[f32]) -> impl Iterator<Item = f64> + '_ {
        v.iter().map(|v| f64::from(v.abs()))
    }

    /// The kernels this CPU can run.
    fn isas() -> Vec<Isa> {
        let mut isas = vec![Isa::Avx2];
        if crate::kernels::has_avx_vnni() {
            isas.push(Isa::Vnni);
        }
        isas
    }

    fn packed(w: &[f32], n: usize, k: usize) -> Fixed16Weight {
        Fixed16Weight::pack(n, k, |r, out| out.copy_from_slice(&w[r * k..(r + 1) * k]))
            .expect("pack")
    }

    /// The kernels give exactly the plain-Rust arithmetic's bits (every row count, a padded last
    /// panel and block), and that arithmetic stays within the rounding's bound of the f64 product.
    #[test]
    fn products_match_the_exact_arithmetic_and_f64() {
        if !available() {
            eprintln!("skipped: no AVX2");
            return;
        }
        for (n, k) in [(40, 100), (64, 768), (17, 33)] {
            let w = weight(n, k);
            let q = packed(&w, n, k);
            for (isa, t) in isas()
                .into_iter()
                .flat_map(|isa| [1, 2, 3, 4, 5, 7, 100].map(|t| (isa, t)))
            {
                let xs = inputs(t, k);
                let mut ys = vec![0f32; t * n];
                q.product_with(isa, &mut Inputs::default(), &xs, &mut ys);
                let mut inputs = Inputs::default();
                inputs.round(&xs, k, q.k_pad);
                let mut plain = Inputs {
                    codes: vec![0; t * q.k_pad],
                    steps: vec![0.0; t * q.k_pad / BLOCK],
                };
                for (i, x) in xs.chunks(k).enumerate() {
                    let blocks = q.k_pad / BLOCK;
                    round_blocks_exact(
                        x,
                        &mut plain.codes[i * q.k_pad..(i + 1) * q.k_pad],
                        &mut plain.steps[i * blocks..(i + 1) * blocks],
                    );
                }
                assert_eq!(inputs.codes, plain.codes, "{n}x{k} t {t}: codes");
                assert_eq!(inputs.steps, plain.steps, "{n}x{k} t {t}: steps");
                for i in 0..t {
                    for p in 0..n.div_ceil(COLS) {
                        let mut out = [[0f32; COLS]; ROWS];
                        let a = Panel {
                            panel: &q.panels[p * COLS * q.k_pad..(p + 1) * COLS * q.k_pad],
                            scales: &q.scales[p * COLS..(p + 1) * COLS],
                            codes: &inputs.codes[i * q.k_pad..(i + 1) * q.k_pad],
                            steps: &inputs.steps[i * q.k_pad / BLOCK..(i + 1) * q.k_pad / BLOCK],
                            k_pad: q.k_pad,
                        };
                        panel_exact(&a, 1, &mut out);
                        for (c, want_bits) in out[0].iter().enumerate().take(n - p * COLS) {
                            let r = p * COLS + c;
                            let got = ys[i * n + r];
                            assert_eq!(
                                got.to_bits(),
                                want_bits.to_bits(),
                                "{isa:?} {n}x{k} t {t} ({i}, {r})"
                            );
                            let want: f64 = (0..k)
                                .map(|j| f64::from(w[r * k + j]) * f64::from(xs[i * k + j]))
                                .sum();
                            // The rounding's bound: half an input step per block against that
                            // block's weights, half a weight step against every input, and f32's
                            // rounding of the sums.
                            let (wr, x) = (&w[r * k..(r + 1) * k], &xs[i * k..(i + 1) * k]);
                            let w_step = abs(wr).fold(0f64, f64::max) / f64::from(LEVELS);
                            let bound: f64 = x
                                .chunks(BLOCK)
                                .zip(wr.chunks(BLOCK))
                                .map(|(xb, wb)| {
                                    let x_step = abs(xb).fold(0f64, f64::max) / f64::from(LEVELS);
                                    x_step / 2.0 * abs(wb).sum::<f64>()
                                })
                                .sum::<f64>()
                                + w_step / 2.0 * abs(x).sum::<f64>()
                                + 1e-6 * abs(wr).zip(abs(x)).map(|(a, b)| a * b).sum::<f64>();
                            assert!(
                                (f64::from(got) - want).abs() <= bound,
                                "{n}x{k} t {t} ({i}, {r}): {got} vs {want} (bound {bound})"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Single-thread speed of the kernel on one panel and three rows held in L1 (`cargo test
    /// --release -p edgevlm --lib fixed16::tests::kernel_speed -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn kernel_speed() {
        let (n, k) = (16, 768);
        let q = packed(&weight(n, k), n, k);
        let mut inputs = Inputs::default();
        inputs.round(&super::tests::inputs(ROWS, k), k, q.k_pad);
        for isa in isas() {
            let rows = isa.rows();
            let reps = 200_000;
            let start = std::time::Instant::now();
            let mut out = [[0f32; COLS]; ROWS];
            for _ in 0..reps {
                q.panel_rows(isa, 0, &inputs, 0, rows, &mut out);
                std::hint::black_box(&mut out);
            }
            let s = start.elapsed().as_secs_f64();
            eprintln!(
                "{isa:?}: {:.1} GMAC/s",
                (reps * rows * 16 * k) as f64 / s / 1e9
            );
        }
    }

    /// A value that is not finite makes its row NaN and leaves the other rows alone; empty shapes
    /// pack to nothing; a stack equals its parts.
    #[test]
    fn nan_rows_and_stacks() {
        if !available() {
            eprintln!("skipped: no AVX2");
            return;
        }
        let (n, k) = (32, 64);
        let w = weight(n, k);
        let q = packed(&w, n, k);
        let mut xs = inputs(2, k);
        xs[5] = f32::INFINITY;
        let mut ys = vec![0f32; 2 * n];
        assert!(q.matmul(&xs, &mut ys));
        assert!(ys[..n].iter().all(|y| y.is_nan()));
        assert!(ys[n..].iter().all(|y| y.is_finite()));
        assert!(Fixed16Weight::pack(0, 4, |_, _| {}).is_none());
        assert!(!q.matmul(&xs[..k + 1], &mut ys));

        let halves = [packed(&w[..16 * k], 16, k), packed(&w[16 * k..], 16, k)];
        let stacked = Fixed16Weight::stack(&[&halves[0], &halves[1]]).expect("stack");
        let xs = inputs(5, k);
        let (mut a, mut b) = (vec![0f32; 5 * n], vec![0f32; 5 * n]);
        assert!(q.matmul(&xs, &mut a) && stacked.matmul(&xs, &mut b));
        assert_eq!(a, b);
        let odd = packed(&w[..8 * k], 8, k);
        assert!(Fixed16Weight::stack(&[&odd, &halves[0]]).is_none());
    }
}
