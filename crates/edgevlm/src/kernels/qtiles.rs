//! Products of a few inputs (decode steps, batched or not) with 4- and 8-bit weights held in row
//! tiles ([`CodeLayout::Tiles`]): one vector lane per weight row, so the codes of sixteen rows come
//! from one 64-byte load (4-bit words split into low and high nibbles by two masks and a shift) and
//! meet the activations in `vpdpbusd` (AVX-512 VNNI, AVX-VNNI), `vpmaddubsw` (AVX2, 4-bit) or
//! `vpmaddwd` on widened codes (AVX2, 8-bit), each activation quad or pair broadcast from memory.
//! Per block of 32 inputs the integer sums of all sixteen rows are converted and scaled with one
//! instruction each, and the unpacked codes serve every input of the pass (up to eight on AVX-512,
//! four on AVX2), which is what makes a batch of decode steps cost less than its inputs alone.
//!
//! The activations keep 16 bits: per block of 32 each input is rounded to `256 · hi + lo` steps
//! of `amax / (127 · 256)` with `hi` in -127..=127 and `lo` in -128..=127, two 8-bit codes
//! that go through the same instructions (two integer sums, joined by a shift and an add): as fine
//! as 16-bit codes per block, 256 times finer than llama.cpp's 8-bit activations (Q8_0), which on
//! SmolLM2-135M cost a KL divergence of 0.025 and a tenth of the top-1 tokens where these lose
//! nothing measurable (`quant-eval --decode`, see benches/README.md). The bias term uses the exact
//! f32 sums of each group. Every instruction set computes the same integer sums and float steps, and
//! each input the same instructions whatever else shares its pass: outputs are bit-identical across
//! CPUs and alone or batched.
//!
//! Opt-in ([`TileInputs::Int8`], `--int8-activations`): one code per input, llama.cpp's rounding
//! with an f32 scale, and the bias term on the sums of the rounded inputs. The kernels skip the low
//! codes (half the `vpmaddubsw` of a batch on AVX2), at the accuracy cost benches/README.md states.

use rayon::prelude::*;

use super::amx::TileInputs;
use crate::quant::{AffineWeight, CodeLayout, TILE_ROWS};

/// Inputs per activation scale.
const BLOCK: usize = 32;

/// Activations rounded for the tile kernels: per input and block of 32, the 32 high codes then the
/// 32 low codes (each in the order the kernels unpack the words in, [`code_slot`]), so that an
/// input's value `e` is `scale · (256 · hi[e] + lo[e])`; a scale per block; the exact sum per
/// weight group. With one code per input ([`TileInputs::Int8`]) every low code is 0 and the kernels
/// skip them.
#[derive(Default)]
pub(super) struct ByteInputs {
    codes: Vec<i8>,
    /// Whether the low codes count (else all are 0).
    two_codes: bool,
    /// For 8-bit layers, each input's `256 · hi + lo` as one 16-bit code (|code| ≤ 32,639), in
    /// order: the AVX2 form without VNNI widens 8-bit weights and multiplies 16-bit pairs.
    wide: Vec<i16>,
    scales: Vec<f32>,
    sums: Vec<f32>,
}

/// The largest magnitude in a block of activations, or (`Err`) the scale to keep for a block that
/// has none to round by: 0 for all zeros (they stay zero), NaN where a value is not finite (its
/// outputs become non-finite).
fn block_amax(x: &[f32]) -> Result<f32, f32> {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    match amax {
        a if !a.is_finite() => Err(f32::NAN),
        0.0 => Err(0.0),
        a => Ok(a),
    }
}

/// `y` rounded to the nearest integer, ties to even, without a libm call (|y| ≤ 2^22): adding
/// 1.5 · 2^23 leaves a float whose unit in the last place is 1.
#[inline(always)]
fn round_even(y: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (y + MAGIC) - MAGIC
}

/// Where input `e` of a block sits among its activation codes: 4-bit words hold eight inputs, the
/// even ones in low nibbles (their quad first), the odd ones in high nibbles; 8-bit words hold four
/// in order.
#[inline]
fn code_slot(e: usize, bits: u32) -> usize {
    if bits == 4 {
        let j = e % 8;
        e - j + (j & 1) * 4 + (j >> 1)
    } else {
        e
    }
}

/// `xs` (`t × k`) rounded for a layer of `bits`-bit codes in groups of `gs`, to two codes per input
/// unless `one_code`.
#[cfg(test)]
fn quantize(xs: &[f32], k: usize, gs: usize, bits: u32, one_code: bool) -> ByteInputs {
    let mut out = ByteInputs::default();
    quantize_into(xs, k, gs, bits, one_code, &mut out);
    out
}

/// [`quantize`] into `out`'s buffers (reused from product to product: no allocation per token).
fn quantize_into(xs: &[f32], k: usize, gs: usize, bits: u32, one_code: bool, out: &mut ByteInputs) {
    let ByteInputs {
        codes,
        two_codes,
        wide,
        scales,
        sums,
    } = out;
    *two_codes = !one_code;
    codes.clear();
    codes.resize(2 * xs.len(), 0);
    scales.clear();
    scales.resize(xs.len() / BLOCK, 0.0);
    sums.clear();
    if one_code {
        // Filled from the rounded inputs below.
        sums.resize(xs.len() / gs, 0.0);
    } else {
        sums.extend(xs.chunks_exact(gs).map(|g| g.iter().sum::<f32>()));
    }
    #[cfg(target_arch = "x86_64")]
    let vector = super::has_avx2();
    for ((x, c), s) in xs
        .chunks_exact(BLOCK)
        .zip(codes.chunks_exact_mut(2 * BLOCK))
        .zip(scales.iter_mut())
    {
        let amax = match block_amax(x) {
            Ok(amax) => amax,
            Err(scale) => {
                *s = scale;
                continue;
            }
        };
        *s = amax / (127.0 * 256.0);
        let inv = 127.0 / amax;
        #[cfg(target_arch = "x86_64")]
        if vector {
            // SAFETY: the CPU has AVX2 and FMA; `x` holds a block, `c` twice as many codes.
            unsafe { round_block(x, inv, bits == 4, one_code, c) };
            continue;
        }
        let round = round_even;
        let (hi, lo) = c.split_at_mut(BLOCK);
        for (e, &v) in x.iter().enumerate() {
            let y = v * inv;
            let h = round(y);
            // |y - h| ≤ 1/2, so the rest is at most 128 steps of 1/256; an exact half (+128)
            // saturates to 127, an error of one such step.
            let slot = code_slot(e, bits);
            hi[slot] = h as i8;
            // (With one code the low ones keep the 0 they were cleared to.)
            if !one_code {
                lo[slot] = round((y - h) * 256.0) as i8;
            }
        }
    }
    if one_code {
        rounded_sums(codes, scales, gs / BLOCK, sums);
    }
    wide.clear();
    if bits == 8 {
        wide.extend(codes.chunks_exact(2 * BLOCK).flat_map(|c| {
            let (hi, lo) = c.split_at(BLOCK);
            hi.iter()
                .zip(lo)
                .map(|(&h, &l)| 256 * i16::from(h) + i16::from(l))
        }));
    }
    debug_assert_eq!(xs.len() % k, 0);
}

/// Each group's sum of its rounded inputs (one code each; `per_group` blocks a group), in place of
/// the exact sums: the bias term then meets the same rounded inputs as the scale term, so the
/// product is exactly that of the rounded inputs with the weights, and the rounding errors meet the
/// weights `s · q + b`, centred near 0, rather than `s · q` alone (codes 0..15, all of one sign,
/// with the exact sums for the bias). On SmolLM2-135M's Q4_1 file that is the difference between a
/// mean KL divergence of 0.029 and (measured) benches/README.md's figure.
fn rounded_sums(codes: &[i8], scales: &[f32], per_group: usize, sums: &mut [f32]) {
    for (g, sum) in sums.iter_mut().enumerate() {
        *sum = (g * per_group..(g + 1) * per_group)
            .map(|b| {
                let hi = &codes[2 * BLOCK * b..2 * BLOCK * b + BLOCK];
                let steps: i32 = hi.iter().map(|&c| i32::from(c)).sum();
                scales[b] * (256 * steps) as f32
            })
            .sum();
    }
}

/// One block's high and low codes (`c`: 32 of each) on AVX2, the same values as the scalar loop
/// of [`quantize_into`]: the same float steps, `vroundps` rounding to nearest-even as `round_even`
/// does, then packed to bytes and (4-bit) put in [`code_slot`] order by one byte shuffle. With
/// `one_code` the low codes are neither computed nor stored.
///
/// # Safety
/// The CPU has AVX2; `x` holds 32 values and `c` 64 codes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn round_block(x: &[f32], inv: f32, four: bool, one_code: bool, c: &mut [i8]) {
    use std::arch::x86_64::*;
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let (inv, steps) = (_mm256_set1_ps(inv), _mm256_set1_ps(256.0));
    let mut hi = [_mm256_setzero_si256(); 4];
    let mut lo = [_mm256_setzero_si256(); 4];
    for j in 0..4 {
        let y = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(8 * j)), inv);
        let h = _mm256_round_ps::<NEAREST>(y);
        hi[j] = _mm256_cvtps_epi32(h);
        if !one_code {
            let l = _mm256_round_ps::<NEAREST>(_mm256_mul_ps(_mm256_sub_ps(y, h), steps));
            lo[j] = _mm256_cvtps_epi32(l);
        }
    }
    // Packing interleaves the 128-bit halves: 4-value runs come out as 0, 2, 4, 6, 1, 3, 5, 7.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    // Within each 8 codes, the even ones first (the byte order `code_slot` gives a 4-bit word).
    let slots = _mm256_setr_epi8(
        0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15, 0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12,
        14, 9, 11, 13, 15,
    );
    let parts = if one_code { 1 } else { 2 };
    for (v, at) in [(hi, 0), (lo, BLOCK)].into_iter().take(parts) {
        let words = _mm256_packs_epi16(
            _mm256_packs_epi32(v[0], v[1]),
            _mm256_packs_epi32(v[2], v[3]),
        );
        let mut bytes = _mm256_permutevar8x32_epi32(words, order);
        if four {
            bytes = _mm256_shuffle_epi8(bytes, slots);
        }
        _mm256_storeu_si256(c.as_mut_ptr().add(at) as *mut __m256i, bytes);
    }
}

/// The instruction set a tile kernel runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    /// 256-bit `vpmaddubsw`, eight rows per register.
    Avx2,
    /// 256-bit `vpdpbusd` (AVX-VNNI).
    AvxVnni,
    /// 512-bit `vpdpbusd`, sixteen rows per register.
    Avx512Vnni,
}

impl Isa {
    /// The best this CPU has (within `EDGEVLM_NO_AVX512` / `EDGEVLM_NO_AVXVNNI`), `None` without
    /// AVX2, FMA and F16C.
    pub(super) fn detect() -> Option<Self> {
        if super::has_avx512_vnni() {
            Some(Isa::Avx512Vnni)
        } else if super::has_avx_vnni() {
            Some(Isa::AvxVnni)
        } else if super::has_avx2() {
            Some(Isa::Avx2)
        } else {
            None
        }
    }

    /// Every form this CPU can run (for tests).
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut isas = Vec::new();
        if super::has_avx2() {
            isas.push(Isa::Avx2);
        }
        if super::has_avx_vnni() {
            isas.push(Isa::AvxVnni);
        }
        if super::has_avx512_vnni() {
            isas.push(Isa::Avx512Vnni);
        }
        isas
    }

    /// Inputs per pass over a tile.
    fn inputs_per_pass(self) -> usize {
        match self {
            Isa::Avx512Vnni => 8,
            _ => 4,
        }
    }
}

/// Tile kernel: the tile `Pass` points at, for inputs `i0 .. i0 + N`, its 16 outputs for input
/// `i0 + i` stored at `ys.at + i · ys.stride`.
#[cfg(target_arch = "x86_64")]
type TileFn = unsafe fn(&Pass, &ByteInputs, usize, Outputs);

/// Where a tile kernel stores: input `i0`'s first output of the tile at `at`, the next input's
/// `stride` values on.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Outputs {
    at: *mut f32,
    stride: usize,
}

/// The kernel for `N` inputs on `isa`: 4- or 8-bit codes, f16 or f32 group values, two activation
/// codes per input or one.
#[cfg(target_arch = "x86_64")]
fn kernel<const N: usize>(isa: Isa, four: bool, half: bool, two: bool) -> TileFn {
    macro_rules! forms {
        ($($f:ident)::+) => {
            match (four, half, two) {
                (true, true, true) => $($f)::+::<N, 4, true, true>,
                (true, true, false) => $($f)::+::<N, 4, true, false>,
                (true, false, true) => $($f)::+::<N, 4, false, true>,
                (true, false, false) => $($f)::+::<N, 4, false, false>,
                (false, true, true) => $($f)::+::<N, 8, true, true>,
                (false, true, false) => $($f)::+::<N, 8, true, false>,
                (false, false, true) => $($f)::+::<N, 8, false, true>,
                (false, false, false) => $($f)::+::<N, 8, false, false>,
            }
        };
    }
    match isa {
        Isa::Avx512Vnni => forms!(avx512::tile),
        Isa::AvxVnni => forms!(avx2::tile_vnni),
        // 8-bit codes on AVX2 read the activations' 16-bit form, whatever their count: one form.
        Isa::Avx2 => match (four, half, two) {
            (true, true, true) => avx2::tile::<N, 4, true, true>,
            (true, true, false) => avx2::tile::<N, 4, true, false>,
            (true, false, true) => avx2::tile::<N, 4, false, true>,
            (true, false, false) => avx2::tile::<N, 4, false, false>,
            (false, true, _) => avx2::tile::<N, 8, true, true>,
            (false, false, _) => avx2::tile::<N, 8, false, true>,
        },
    }
}

/// Whether [`matmul`] takes `w`: held in row tiles, on a CPU with AVX2.
pub(super) fn applies(w: &AffineWeight) -> bool {
    cfg!(target_arch = "x86_64") && w.layout == CodeLayout::Tiles && Isa::detect().is_some()
}

/// `ys (t × out) = xs (t × in) · Wᵀ` on the tile kernels, where they apply, the inputs rounded to
/// one 8-bit code each for [`TileInputs::Int8`], else two: `false` (nothing written) unless `w` is
/// held in row tiles and the CPU has AVX2.
pub(super) fn matmul(w: &AffineWeight, xs: &[f32], ys: &mut [f32], inputs: TileInputs) -> bool {
    match Isa::detect() {
        Some(isa) => matmul_on(w, xs, ys, isa, inputs),
        None => false,
    }
}

fn matmul_on(w: &AffineWeight, xs: &[f32], ys: &mut [f32], isa: Isa, inputs: TileInputs) -> bool {
    if w.layout != CodeLayout::Tiles || !cfg!(target_arch = "x86_64") {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let (k, n) = (w.in_dim, w.out_dim);
        let t = xs.len() / k;
        debug_assert_eq!(ys.len(), t * n);
        thread_local! {
            // The rounded inputs of this thread's products, buffers reused.
            static INPUTS: std::cell::RefCell<ByteInputs> = std::cell::RefCell::new(ByteInputs::default());
        }
        // A product started while this thread's buffers are in use (a task it picked up while
        // waiting) gets its own.
        let mut own = ByteInputs::default();
        INPUTS.with(|cell| {
            let mut held = cell.try_borrow_mut();
            let xi = match held.as_deref_mut() {
                Ok(xi) => xi,
                Err(_) => &mut own,
            };
            let one_code = inputs == TileInputs::Int8;
            quantize_into(xs, k, w.spec.group_size, w.spec.bits, one_code, xi);
            run_tiles(w, xi, t, ys, isa);
        });
    }
    true
}

/// The tile kernels over every tile of `w` for the `t` rounded inputs `xi`, tiles split across the
/// thread pool.
#[cfg(target_arch = "x86_64")]
fn run_tiles(w: &AffineWeight, xi: &ByteInputs, t: usize, ys: &mut [f32], isa: Isa) {
    let n = w.out_dim;
    let (four, half, two) = (w.spec.bits == 4, w.scales.is_f16(), xi.two_codes);
    let per_pass = isa.inputs_per_pass();
    let kernels: [TileFn; 8] = [
        kernel::<1>(isa, four, half, two),
        kernel::<2>(isa, four, half, two),
        kernel::<3>(isa, four, half, two),
        kernel::<4>(isa, four, half, two),
        kernel::<5>(isa, four, half, two),
        kernel::<6>(isa, four, half, two),
        kernel::<7>(isa, four, half, two),
        kernel::<8>(isa, four, half, two),
    ];
    let tiles = n.div_ceil(TILE_ROWS);
    let tasks = task_count(tiles, rayon::current_num_threads());
    let ys_addr = ys.as_mut_ptr() as usize;
    (0..tasks).into_par_iter().for_each(|task| {
        // A last tile of fewer than 16 rows stores into `spare` (16 outputs per input of a
        // pass), and its rows are copied out.
        let mut spare = [0f32; TILE_ROWS * 8];
        // SAFETY: `w` is held in row tiles (checked by the caller).
        let first = unsafe { Pass::first(w) };
        for tile in task * tiles / tasks..(task + 1) * tiles / tasks {
            // SAFETY: `tile` is one of `w`'s tiles.
            let p = unsafe { first.at(tile) };
            let (r0, rows) = (tile * TILE_ROWS, TILE_ROWS.min(n - tile * TILE_ROWS));
            let mut i0 = 0;
            while i0 < t {
                let m = per_pass.min(t - i0);
                // SAFETY: the kernel's CPU features were detected; tile `tile` and inputs
                // i0..i0 + m exist; a whole tile's outputs are inside `ys` (t × n, which
                // outlives the loop), written by this task only, a last tile's inside `spare`.
                unsafe {
                    let ys = (ys_addr as *mut f32).add(i0 * n + r0);
                    if rows == TILE_ROWS {
                        kernels[m - 1](&p, xi, i0, Outputs { at: ys, stride: n });
                    } else {
                        let at = spare.as_mut_ptr();
                        kernels[m - 1](
                            &p,
                            xi,
                            i0,
                            Outputs {
                                at,
                                stride: TILE_ROWS,
                            },
                        );
                        for i in 0..m {
                            std::ptr::copy_nonoverlapping(
                                at.add(i * TILE_ROWS),
                                ys.add(i * n),
                                rows,
                            );
                        }
                    }
                }
                i0 += m;
            }
        }
    });
}

/// How many tasks the `tiles` of a product are split into, each taking `tiles / tasks` of them or
/// one more: about four per thread and at most 16 tiles each, in a multiple of the thread count
/// (where there are tiles enough), so that the threads' halves of the split are equal. (Fixed
/// runs of tiles left a 576-row product's 36 tiles as nine tasks, one thread doing five of them
/// while the other waited after four.)
fn task_count(tiles: usize, threads: usize) -> usize {
    let threads = threads.max(1);
    let tasks = (threads * 4).max(tiles.div_ceil(16));
    tasks.next_multiple_of(threads).min(tiles).max(1)
}

/// Where one tile's data and one pass's inputs lie.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Pass {
    /// The tile's packed words: word `d` of its sixteen rows at `codes + 64 d`.
    codes: *const u8,
    /// Its scales and biases, group `g` of its sixteen rows at `16 g` (f16 or f32).
    scales: *const u8,
    biases: *const u8,
    /// Bytes of one tile's codes.
    tile_bytes: usize,
    /// Bytes of one tile's scales (or biases).
    values_bytes: usize,
    k: usize,
    groups: usize,
    blocks_per_group: usize,
}

#[cfg(target_arch = "x86_64")]
impl Pass {
    /// The first tile of `w` (the sizes worked out once per product, not per tile).
    ///
    /// # Safety
    /// `w` is held in [`CodeLayout::Tiles`].
    unsafe fn first(w: &AffineWeight) -> Self {
        let groups = w.groups();
        let vb = if w.scales.is_f16() { 2 } else { 4 };
        Pass {
            codes: w.packed.as_ptr() as *const u8,
            scales: w.scales.as_ptr(),
            biases: w.biases.as_ptr(),
            tile_bytes: TILE_ROWS * w.words_per_row() * 4,
            values_bytes: TILE_ROWS * groups * vb,
            k: w.in_dim,
            groups,
            blocks_per_group: w.spec.group_size / BLOCK,
        }
    }

    /// Tile `tile` of the weight whose [`Pass::first`] this is.
    ///
    /// # Safety
    /// The weight has that tile.
    #[inline(always)]
    unsafe fn at(&self, tile: usize) -> Self {
        Pass {
            codes: self.codes.add(tile * self.tile_bytes),
            scales: self.scales.add(tile * self.values_bytes),
            biases: self.biases.add(tile * self.values_bytes),
            ..*self
        }
    }

    /// Fetch the line of the next tile's codes that lies where line `line` of this tile's does
    /// (the tiles follow one another; past the last one the address points nowhere, harmlessly).
    #[inline(always)]
    unsafe fn prefetch_next(&self, line: usize) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let at = self.codes.wrapping_add(self.tile_bytes + 64 * line);
        _mm_prefetch::<_MM_HINT_T0>(at as *const i8);
    }

    /// Input `i`'s high codes of block `b` as 32-bit quads; its low ones follow 8 quads on.
    #[inline(always)]
    unsafe fn quads(&self, xi: &ByteInputs, i: usize, b: usize) -> *const i32 {
        xi.codes.as_ptr().add(2 * (i * self.k + b * BLOCK)) as *const i32
    }
}

/// Packed 32-bit words per row and block of 32 inputs for `bits`-bit codes (4 or 8): a constant
/// in each kernel form, so that its loop over a block's words unrolls.
#[cfg(target_arch = "x86_64")]
const fn words_per_block(bits: u32) -> usize {
    BLOCK * bits as usize / 32
}

/// Input `input`'s scale of block `b` (of `blocks`), unchecked.
///
/// # Safety
/// `xi` holds that input's block scales.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block_scale(xi: &ByteInputs, input: usize, blocks: usize, b: usize) -> f32 {
    debug_assert!(input * blocks + b < xi.scales.len());
    *xi.scales.get_unchecked(input * blocks + b)
}

/// Input `input`'s sum of group `g` (of `groups`), unchecked.
///
/// # Safety
/// `xi` holds that input's group sums.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn group_sum(xi: &ByteInputs, input: usize, groups: usize, g: usize) -> f32 {
    debug_assert!(input * groups + g < xi.sums.len());
    *xi.sums.get_unchecked(input * groups + g)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{ByteInputs, Outputs, Pass, BLOCK};

    use std::arch::x86_64::*;

    /// Sixteen rows' group values `g` (f16 or f32) in f32.
    #[inline(always)]
    unsafe fn values<const HALF: bool>(p: *const u8, g: usize) -> __m512 {
        if HALF {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.add(32 * g) as *const __m256i))
        } else {
            _mm512_loadu_ps((p as *const f32).add(16 * g))
        }
    }

    /// One tile for `N` inputs (see [`super::TileFn`]): 4-bit words split into low and high
    /// nibbles (each against its own activation quad), 8-bit words taken whole; the high and low
    /// activation codes into two sums joined as `256 · high + low` per block (the high ones alone
    /// unless `TWO`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn tile<
        const N: usize,
        const BITS: u32,
        const HALF: bool,
        const TWO: bool,
    >(
        p: &Pass,
        xi: &ByteInputs,
        i0: usize,
        ys: Outputs,
    ) {
        let blocks = p.k / BLOCK;
        let nibble = _mm512_set1_epi8(0x0F);
        let mut out = [_mm512_setzero_ps(); N];
        for g in 0..p.groups {
            let s = values::<HALF>(p.scales, g);
            for b in g * p.blocks_per_group..(g + 1) * p.blocks_per_group {
                let mut high = [_mm512_setzero_si512(); N];
                let mut low = [_mm512_setzero_si512(); N];
                let words = super::words_per_block(BITS);
                for d in 0..words {
                    let line = words * b + d;
                    p.prefetch_next(line);
                    let words = _mm512_loadu_si512(p.codes.add(line * 64) as *const _);
                    let dot = |acc: __m512i, x: *const i32, q: usize| -> __m512i {
                        if BITS == 4 {
                            let lo = _mm512_and_si512(words, nibble);
                            let hi = _mm512_and_si512(_mm512_srli_epi16(words, 4), nibble);
                            let acc = _mm512_dpbusd_epi32(acc, lo, _mm512_set1_epi32(*x.add(q)));
                            _mm512_dpbusd_epi32(acc, hi, _mm512_set1_epi32(*x.add(q + 1)))
                        } else {
                            _mm512_dpbusd_epi32(acc, words, _mm512_set1_epi32(*x.add(q)))
                        }
                    };
                    let q = if BITS == 4 { 2 * d } else { d };
                    for i in 0..N {
                        let x = p.quads(xi, i0 + i, b);
                        high[i] = dot(high[i], x, q);
                        if TWO {
                            low[i] = dot(low[i], x.add(BLOCK / 4), q);
                        }
                    }
                }
                for i in 0..N {
                    // (`low` stays 0 with one code.)
                    let sums = _mm512_add_epi32(_mm512_slli_epi32(high[i], 8), low[i]);
                    let x = super::block_scale(xi, i0 + i, blocks, b);
                    let f = _mm512_mul_ps(s, _mm512_set1_ps(x));
                    out[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), f, out[i]);
                }
            }
            let bias = values::<HALF>(p.biases, g);
            for (i, o) in out.iter_mut().enumerate() {
                let sum = super::group_sum(xi, i0 + i, p.groups, g);
                *o = _mm512_fmadd_ps(bias, _mm512_set1_ps(sum), *o);
            }
        }
        for (i, o) in out.iter().enumerate() {
            _mm512_storeu_ps(ys.at.add(i * ys.stride), *o);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{ByteInputs, Outputs, Pass, BLOCK};

    use std::arch::x86_64::*;

    /// Eight rows' (half `h` of the tile's) group values `g` in f32.
    #[inline(always)]
    unsafe fn values<const HALF: bool>(p: *const u8, g: usize, h: usize) -> __m256 {
        if HALF {
            _mm256_cvtph_ps(_mm_loadu_si128(p.add(32 * g + 16 * h) as *const __m128i))
        } else {
            _mm256_loadu_ps((p as *const f32).add(16 * g + 8 * h))
        }
    }

    /// How one AVX2 kernel form reads a block: every input's integer sums of the block's rows for
    /// half a tile. A trait with `#[inline(always)]` methods rather than a closure: a closure
    /// defined outside a `target_feature` function that LLVM leaves outlined (as it did once a
    /// form had two callers) runs without AVX2 and calls every intrinsic, 3x slower.
    trait BlockSums<const N: usize> {
        /// The sums of block `b`, half `h` of the tile, for inputs `i0 .. i0 + N`.
        unsafe fn sums(p: &Pass, xi: &ByteInputs, i0: usize, b: usize, h: usize) -> [__m256i; N];
    }

    /// The walk both AVX2 forms share: for each half of the tile (eight rows), group and block,
    /// `S::sums` gives every input's integer sums of the block's rows, which are scaled by the
    /// group's and the input's block scales, joined by the bias terms and stored.
    #[inline(always)]
    unsafe fn walk<const N: usize, const HALF: bool, S: BlockSums<N>>(
        p: &Pass,
        xi: &ByteInputs,
        i0: usize,
        ys: Outputs,
    ) {
        let blocks = p.k / BLOCK;
        for h in 0..2 {
            let mut out = [_mm256_setzero_ps(); N];
            for g in 0..p.groups {
                let s = values::<HALF>(p.scales, g, h);
                for b in g * p.blocks_per_group..(g + 1) * p.blocks_per_group {
                    let sums = S::sums(p, xi, i0, b, h);
                    for (i, (o, sums)) in out.iter_mut().zip(sums).enumerate() {
                        let x = super::block_scale(xi, i0 + i, blocks, b);
                        let f = _mm256_mul_ps(s, _mm256_set1_ps(x));
                        *o = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), f, *o);
                    }
                }
                let bias = values::<HALF>(p.biases, g, h);
                for (i, o) in out.iter_mut().enumerate() {
                    let sum = _mm256_set1_ps(super::group_sum(xi, i0 + i, p.groups, g));
                    *o = _mm256_fmadd_ps(bias, sum, *o);
                }
            }
            for (i, o) in out.iter().enumerate() {
                _mm256_storeu_ps(ys.at.add(i * ys.stride + 8 * h), *o);
            }
        }
    }

    /// Half `h` of line `d` of block `b` (32 bytes: eight rows' words; `words` lines a block),
    /// fetching the next tile's line on the first half.
    #[inline(always)]
    unsafe fn line(p: &Pass, words: usize, b: usize, d: usize, h: usize) -> *const u8 {
        let line = words * b + d;
        if h == 0 {
            p.prefetch_next(line);
        }
        p.codes.add(line * 64 + 32 * h)
    }

    /// The high and low activation codes into two sums joined as `256 · high + low` per block
    /// (the high ones alone unless `TWO`): with `VNNI` by `vpdpbusd` (4-bit words split into
    /// nibbles, 8-bit ones whole); otherwise (4-bit only) by `vpmaddubsw` on the nibbles against
    /// their two activation quads, into 16-bit sums that stay within 8 · 2 · 15 · 128 = 30,720 per
    /// block, widened with their weights (256, 1) by `vpmaddwd`.
    struct Codes<const BITS: u32, const VNNI: bool, const TWO: bool>;

    impl<const N: usize, const BITS: u32, const VNNI: bool, const TWO: bool> BlockSums<N>
        for Codes<BITS, VNNI, TWO>
    {
        #[inline(always)]
        unsafe fn sums(p: &Pass, xi: &ByteInputs, i0: usize, b: usize, h: usize) -> [__m256i; N] {
            debug_assert!(VNNI || BITS == 4);
            let nibble = _mm256_set1_epi8(0x0F);
            // Per input, the sums of its [high, low] codes.
            let mut acc = [[_mm256_setzero_si256(); 2]; N];
            let per_block = super::words_per_block(BITS);
            for d in 0..per_block {
                let words = _mm256_loadu_si256(line(p, per_block, b, d, h) as *const __m256i);
                let lo = _mm256_and_si256(words, nibble);
                let hi = _mm256_and_si256(_mm256_srli_epi16(words, 4), nibble);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let x = p.quads(xi, i0 + i, b);
                    let parts = if TWO { 2 } else { 1 };
                    for (part, a) in acc.iter_mut().enumerate().take(parts) {
                        let x = x.add(part * BLOCK / 4);
                        if BITS == 8 {
                            let x = _mm256_set1_epi32(*x.add(d));
                            *a = _mm256_dpbusd_avx_epi32(*a, words, x);
                            continue;
                        }
                        let x0 = _mm256_set1_epi32(*x.add(2 * d));
                        let x1 = _mm256_set1_epi32(*x.add(2 * d + 1));
                        if VNNI {
                            *a = _mm256_dpbusd_avx_epi32(*a, lo, x0);
                            *a = _mm256_dpbusd_avx_epi32(*a, hi, x1);
                        } else {
                            let pair = _mm256_add_epi16(
                                _mm256_maddubs_epi16(lo, x0),
                                _mm256_maddubs_epi16(hi, x1),
                            );
                            *a = _mm256_add_epi16(*a, pair);
                        }
                    }
                }
            }
            // A plain loop, not `acc.map(closure)`: the closure could be outlined without AVX2.
            let weights = [_mm256_set1_epi16(256), _mm256_set1_epi16(1)];
            let mut sums = [_mm256_setzero_si256(); N];
            for (s, &[high, low]) in sums.iter_mut().zip(&acc) {
                *s = match (TWO, VNNI) {
                    (false, true) => _mm256_slli_epi32(high, 8),
                    (false, false) => _mm256_madd_epi16(high, weights[0]),
                    (true, true) => _mm256_add_epi32(_mm256_slli_epi32(high, 8), low),
                    (true, false) => _mm256_add_epi32(
                        _mm256_madd_epi16(high, weights[0]),
                        _mm256_madd_epi16(low, weights[1]),
                    ),
                };
            }
            sums
        }
    }

    /// 8-bit codes on AVX2 without VNNI: `vpmaddubsw` would saturate on codes up to 255, so the
    /// codes are widened to 16 bits (four rows per register, two lanes per row) and `vpmaddwd`
    /// multiplies them by pairs of the 16-bit activation codes `256 · hi + lo` (the same integer
    /// sums as the other forms: a block's stays below 32 · 255 · 32,639 < 2³¹; a low code of 0
    /// with one code per input); one horizontal add per block folds each row's two lanes.
    struct WideCodes;

    impl<const N: usize> BlockSums<N> for WideCodes {
        #[inline(always)]
        unsafe fn sums(p: &Pass, xi: &ByteInputs, i0: usize, b: usize, h: usize) -> [__m256i; N] {
            // Per input, rows 0-3 and rows 4-7 of the half, two lanes per row.
            let mut acc = [[_mm256_setzero_si256(); 2]; N];
            let per_block = super::words_per_block(8);
            for d in 0..per_block {
                let at = line(p, per_block, b, d, h);
                let rows = [
                    _mm256_cvtepu8_epi16(_mm_loadu_si128(at as *const __m128i)),
                    _mm256_cvtepu8_epi16(_mm_loadu_si128(at.add(16) as *const __m128i)),
                ];
                for (i, acc) in acc.iter_mut().enumerate() {
                    // Inputs 4d .. 4d + 4 of the block, as two pairs, in every row.
                    let x = xi.wide.as_ptr().add((i0 + i) * p.k + b * BLOCK + 4 * d);
                    let x = _mm256_set1_epi64x((x as *const i64).read_unaligned());
                    for (a, r) in acc.iter_mut().zip(&rows) {
                        *a = _mm256_add_epi32(*a, _mm256_madd_epi16(*r, x));
                    }
                }
            }
            // Lanes (r0 r0 r1 r1 | r2 r2 r3 r3) and (r4 ..): pairs added, rows put back in order.
            let mut sums = [_mm256_setzero_si256(); N];
            for (s, &[lo4, hi4]) in sums.iter_mut().zip(&acc) {
                *s = _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo4, hi4), 0b11_01_10_00);
            }
            sums
        }
    }

    /// One tile for `N` inputs on AVX2: [`Codes`] (4-bit) or [`WideCodes`] (8-bit).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile<
        const N: usize,
        const BITS: u32,
        const HALF: bool,
        const TWO: bool,
    >(
        p: &Pass,
        xi: &ByteInputs,
        i0: usize,
        ys: Outputs,
    ) {
        if BITS == 8 {
            walk::<N, HALF, WideCodes>(p, xi, i0, ys)
        } else {
            walk::<N, HALF, Codes<4, false, TWO>>(p, xi, i0, ys)
        }
    }

    /// One tile for `N` inputs on AVX-VNNI ([`Codes`]).
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub(super) unsafe fn tile_vnni<
        const N: usize,
        const BITS: u32,
        const HALF: bool,
        const TWO: bool,
    >(
        p: &Pass,
        xi: &ByteInputs,
        i0: usize,
        ys: Outputs,
    ) {
        walk::<N, HALF, Codes<BITS, true, TWO>>(p, xi, i0, ys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{QuantSpec, ScaleType};

    fn layer(out: usize, inp: usize, bits: u32, gs: usize, store: ScaleType) -> AffineWeight {
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 700.0)
            .collect();
        let spec = QuantSpec::new(bits, gs).expect("spec");
        AffineWeight::quantize(&w, out, inp, spec, store, "w").expect("quantize")
    }

    fn inputs(t: usize, k: usize) -> Vec<f32> {
        (0..t * k)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 40.0 + if i % 61 == 0 { 3.0 } else { 0.0 })
            .collect()
    }

    /// The exact product of the rounded activations (one code each or two) with the dequantized
    /// weight, in f64.
    fn reference(w: &AffineWeight, xs: &[f32], one_code: bool) -> Vec<f64> {
        let (k, n) = (w.in_dim, w.out_dim);
        let xi = quantize(xs, k, w.spec.group_size, w.spec.bits, one_code);
        let mut row = vec![0f32; k];
        let t = xs.len() / k;
        let mut ys = vec![0f64; t * n];
        for r in 0..n {
            w.dequantize_row(r, &mut row);
            for i in 0..t {
                let mut y = 0f64;
                for (e, &wv) in row.iter().enumerate() {
                    let (blk, slot) = ((i * k + e) / BLOCK, code_slot(e % BLOCK, w.spec.bits));
                    let (hi, lo) = (
                        xi.codes[2 * BLOCK * blk + slot],
                        xi.codes[2 * BLOCK * blk + BLOCK + slot],
                    );
                    let q = 256 * i32::from(hi) + i32::from(lo);
                    let xq = f64::from(q) * f64::from(xi.scales[blk]);
                    // With two codes the bias part of w multiplies the exact inputs, only scale · q
                    // the rounded ones; with one code both multiply the rounded ones.
                    let g = w.value_at(r, e / w.spec.group_size);
                    let (s, b) = (f64::from(w.scales.get(g)), f64::from(w.biases.get(g)));
                    let qw = (f64::from(wv) - b) / s;
                    let xb = if one_code {
                        xq
                    } else {
                        f64::from(xs[i * k + e])
                    };
                    y += s * qw.round() * xq + b * xb;
                }
                ys[i * n + r] = y;
            }
        }
        ys
    }

    /// Every kernel form, group size, value type and activation rounding against the f64 product of
    /// the same rounded activations, every form bit-identical to the others, and every input
    /// bit-identical to that input computed alone.
    #[test]
    fn tile_kernels_equal_the_exact_product_and_batch_like_alone() {
        for held in [TileInputs::Split, TileInputs::Int8] {
            tile_kernels_with(held);
        }
    }

    fn tile_kernels_with(held: TileInputs) {
        let cases = [
            (4, 32, ScaleType::F16),
            (4, 64, ScaleType::F32),
            (4, 128, ScaleType::F16),
            (8, 32, ScaleType::F32),
            (8, 64, ScaleType::F16),
        ];
        for (bits, gs, store) in cases {
            let (n, k) = (48, 256);
            let w = layer(n, k, bits, gs, store);
            assert_eq!(w.layout, CodeLayout::Tiles);
            assert_eq!(w.scales.is_f16(), store == ScaleType::F16);
            let t = 11;
            let xs = inputs(t, k);
            let want = reference(&w, &xs, held == TileInputs::Int8);
            let mut first: Option<Vec<f32>> = None;
            for isa in Isa::available() {
                let mut ys = vec![f32::NAN; t * n];
                assert!(matmul_on(&w, &xs, &mut ys, isa, held));
                // The same integer sums and float steps on every instruction set.
                match &first {
                    Some(f) => {
                        assert_eq!(&ys, f, "{isa:?} {held:?} {bits}-bit gs {gs}, first form")
                    }
                    None => first = Some(ys.clone()),
                }
                for (i, (&y, &r)) in ys.iter().zip(&want).enumerate() {
                    assert!(
                        (f64::from(y) - r).abs() <= 1e-4 * (1.0 + r.abs()),
                        "{isa:?} {held:?} {bits}-bit gs {gs} output {i}: {y} vs {r}"
                    );
                }
                for i in 0..t {
                    let mut alone = vec![0f32; n];
                    assert!(matmul_on(
                        &w,
                        &xs[i * k..(i + 1) * k],
                        &mut alone,
                        isa,
                        held
                    ));
                    assert_eq!(alone, ys[i * n..(i + 1) * n], "{isa:?} {held:?} input {i}");
                }
            }
        }
    }

    /// Tasks cover every tile once, at most 16 (and at least one) each, in a multiple of the thread
    /// count where the tiles allow it.
    #[test]
    fn tasks_split_the_tiles_evenly() {
        for (tiles, threads, want) in [
            (36, 2, 8),
            (12, 2, 8),
            (3072, 2, 192),
            (3, 4, 3),
            (96, 3, 12),
            (1, 1, 1),
        ] {
            let tasks = task_count(tiles, threads);
            assert_eq!(tasks, want, "{tiles} tiles, {threads} threads");
            let sizes: Vec<usize> = (0..tasks)
                .map(|t| (t + 1) * tiles / tasks - t * tiles / tasks)
                .collect();
            assert_eq!(sizes.iter().sum::<usize>(), tiles);
            assert!(sizes.iter().all(|&n| (1..=16).contains(&n)), "{sizes:?}");
        }
    }

    /// The AVX2 rounding gives the scalar loop's codes exactly, in both orders, and with one code
    /// leaves the low codes untouched.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_rounding_equals_scalar() {
        if !crate::kernels::has_avx2() {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        let x: Vec<f32> = (0..32)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 3.0 + if i == 5 { 0.5 } else { 0.0 })
            .collect();
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let inv = 127.0 / amax;
        for bits in [4, 8] {
            let mut want = vec![0i8; 64];
            for (e, &v) in x.iter().enumerate() {
                let y = v * inv;
                let h = round_even(y);
                want[code_slot(e, bits)] = h as i8;
                want[BLOCK + code_slot(e, bits)] = round_even((y - h) * 256.0) as i8;
            }
            let mut got = vec![0i8; 64];
            // SAFETY: AVX2 was checked; 32 values, 64 codes.
            unsafe { round_block(&x, inv, bits == 4, false, &mut got) };
            assert_eq!(got, want, "{bits}-bit order");
            let mut one = vec![0i8; 64];
            // SAFETY: as above.
            unsafe { round_block(&x, inv, bits == 4, true, &mut one) };
            assert_eq!(
                one[..BLOCK],
                want[..BLOCK],
                "{bits}-bit high codes, one code"
            );
            assert!(one[BLOCK..].iter().all(|&c| c == 0), "{bits}-bit low codes");
        }
    }

    /// The two codes hold each input to within a step of amax / (127 · 256) (half a step but where
    /// an exact half saturates).
    #[test]
    fn activation_codes_round_to_half_a_step() {
        let k = 64;
        let xs = inputs(1, k);
        let xi = quantize(&xs, k, 32, 4, false);
        for (e, &x) in xs.iter().enumerate() {
            let (blk, slot) = (e / BLOCK, code_slot(e % BLOCK, 4));
            let (hi, lo) = (
                xi.codes[2 * BLOCK * blk + slot],
                xi.codes[2 * BLOCK * blk + BLOCK + slot],
            );
            let s = xi.scales[blk];
            let v = (256 * i32::from(hi) + i32::from(lo)) as f32 * s;
            // Half a step, or a whole one where an exact half saturated to 127.
            let bound = if lo == i8::MAX { 1.0 } else { 0.5 } * s * 1.0001;
            assert!((v - x).abs() <= bound, "input {e}: {v} vs {x}");
        }
        assert_eq!(xi.sums.len(), 2);
        assert!((xi.sums[0] - xs[..32].iter().sum::<f32>()).abs() < 1e-6);
    }

    /// One code per input ([`TileInputs::Int8`]): each input to the nearest of 255 steps of its
    /// block's largest magnitude / 127, llama.cpp's Q8_0 rounding with an f32 scale, and the low
    /// codes all 0 (the vector and scalar roundings alike, both code orders).
    #[test]
    fn one_code_rounds_to_the_block_max_over_127() {
        let k = 96;
        let xs = inputs(2, k);
        for bits in [4, 8] {
            let xi = quantize(&xs, k, 32, bits, true);
            assert!(!xi.two_codes);
            for (blk, x) in xs.chunks_exact(BLOCK).enumerate() {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                // The kernels' scale is that of the `256 · hi + lo` form: 256 times finer.
                assert_eq!(xi.scales[blk], amax / (127.0 * 256.0));
                let (hi, lo) = xi.codes[2 * BLOCK * blk..2 * BLOCK * (blk + 1)].split_at(BLOCK);
                assert!(lo.iter().all(|&c| c == 0), "block {blk}: low codes");
                for (e, &v) in x.iter().enumerate() {
                    let want = (v * 127.0 / amax).round_ties_even() as i8;
                    assert_eq!(
                        hi[code_slot(e, bits)],
                        want,
                        "{bits}-bit block {blk} input {e}"
                    );
                }
                if bits == 8 {
                    let wide = &xi.wide[BLOCK * blk..BLOCK * (blk + 1)];
                    assert!(wide.iter().zip(hi).all(|(&w, &h)| w == 256 * i16::from(h)));
                }
                // Each group's sum is that of its rounded inputs.
                let rounded: f32 = hi.iter().map(|&c| f32::from(c) * amax / 127.0).sum();
                assert!(
                    (xi.sums[blk] - rounded).abs() <= 1e-5 * amax,
                    "block {blk} sum"
                );
                let exact: f32 = x.iter().sum();
                assert!(xi.sums[blk] != exact, "block {blk}: the exact sum was kept");
            }
        }
    }
}
