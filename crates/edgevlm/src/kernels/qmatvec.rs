//! Products with affine-quantized weights, at the quantized size.
//!
//! Layers held in row tiles (`CodeLayout::Tiles`: every layer whose row count is a multiple of 16)
//! run their products of fewer than 16 inputs, and every batched decode step, on the tile kernels
//! of `kernels::qtiles`. The row kernels below serve the other layers (and the same sums without
//! AVX2); products of 16 or more inputs go to AMX or the panel GEMM for every layout.
//!
//! `y_r = Σ_g s_rg · Σ_{i∈g} q_ri x_i + b_rg · Σ_{i∈g} x_i`. On AVX2 the inner sums are integer dot
//! products: the activations are rounded to **16-bit** integers per block of 32 (relative error below
//! 1e-5 of the block's largest value, about 250× finer than the 8-bit activations llama.cpp and
//! mistral.rs use), the codes are spread into 16-bit lanes without a shuffle (masks and shifts; the
//! activation codes are stored in the order that leaves them in), and `vpmaddwd` multiplies and pairs
//! them on 256-bit registers (with AVX-VNNI `vpdpwssd` multiplies and accumulates in one instruction;
//! with AVX-512 VNNI two blocks go through one 512-bit step). On AVX2 the 16-bit activations cost one
//! instruction per row and block over llama.cpp's 8-bit `vpmaddubsw` form (10 against 9 vector
//! operations). The bias term uses the exact f32 sums of `x`. Scales and biases are read in the f16 or f32
//! they are held in. Rows are split across the thread pool. One token
//! (decode) runs tiles of four weight rows that share each activation load and prefetch the next tile;
//! a few inputs share each unpacked weight row, four at a time; 16 or more inputs (a prompt, vision
//! tiles) run on AMX tiles where the CPU has them (`amx::affine_matmul`: exact codes, inputs to 16
//! significant bits), and an f32 GEMM on dequantized panels otherwise.
//!
//! Without AVX2 the same sums run in f32.

use rayon::prelude::*;

use super::{has_avx2, has_avx512_vnni, has_avx_vnni};

use super::amx::TileInputs;
use crate::quant::AffineWeight;

/// Values per activation block (one scale each).
const BLOCK: usize = 32;
/// Inputs that share one pass over a weight row.
const INPUT_TILE: usize = 4;

/// Activations prepared for one weight: 16-bit codes per block of 32 in the order the kernels unpack
/// the packed weight bytes in (see [`quantize_inputs`]), a scale per block, and the exact sum per
/// weight group.
struct QuantizedInputs {
    codes: Vec<i16>,
    scales: Vec<f32>,
    sums: Vec<f32>,
}

fn quantize_inputs(w: &AffineWeight, xs: &[f32]) -> QuantizedInputs {
    let k = w.in_dim;
    let gs = w.spec.group_size;
    let four = w.spec.bits == 4;
    let mut codes = vec![0i16; xs.len()];
    let mut scales = vec![0f32; xs.len() / BLOCK];
    let sums = xs.chunks_exact(gs).map(|g| g.iter().sum()).collect();
    for ((x, c), s) in xs
        .chunks_exact(BLOCK)
        .zip(codes.chunks_exact_mut(BLOCK))
        .zip(scales.iter_mut())
    {
        let amax = match block_amax(x) {
            Ok(amax) => amax,
            Err(scale) => {
                *s = scale;
                continue;
            }
        };
        *s = amax / 32767.0;
        let inv = 32767.0 / amax;
        let code = |v: f32| round_even(v * inv) as i16;
        // The order the kernels unpack a block's packed bytes in (see `avx2::unpack`): 4-bit codes
        // as four planes of eight (elements 4i, then 4i + 1, 4i + 2, 4i + 3), 8-bit codes as two
        // of sixteen (elements 2i, then 2i + 1).
        if four {
            for (e, &v) in x.iter().enumerate() {
                c[(e & 3) * 8 + (e >> 2)] = code(v);
            }
        } else {
            for (e, &v) in x.iter().enumerate() {
                c[(e & 1) * 16 + (e >> 1)] = code(v);
            }
        }
    }
    debug_assert_eq!(xs.len() % k, 0);
    QuantizedInputs {
        codes,
        scales,
        sums,
    }
}

/// The largest magnitude in a block of activations, or (`Err`) the scale to keep for a block that
/// has none to round by: 0 for all zeros (they stay zero), NaN where a value is not finite (its
/// outputs become non-finite).
pub(super) fn block_amax(x: &[f32]) -> Result<f32, f32> {
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
pub(super) fn round_even(y: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (y + MAGIC) - MAGIC
}

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

/// Scale or bias `i` of a layer whose group values start at `p`, stored in f16 (`HALF`) or f32.
///
/// # Safety
/// `p` points at the layer's group values of that type and `i` is inside them; where `HALF`, the
/// caller is compiled with F16C.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn group_value<const HALF: bool>(p: *const u8, i: usize) -> f32 {
    use std::arch::x86_64::*;
    if HALF {
        let bits = *(p as *const u16).add(i);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    } else {
        *(p as *const f32).add(i)
    }
}

/// Groups of a row tile whose f16 scales are converted to f32 at once (rows of up to 8,192 inputs
/// at groups of 32 in one go, longer ones in parts).
#[cfg(target_arch = "x86_64")]
const MAX_STAGED_GROUPS: usize = 256;

/// Stack room for the staged scales of one row tile.
#[cfg(target_arch = "x86_64")]
type ScaleStage = [std::mem::MaybeUninit<f32>; ROW_TILE * MAX_STAGED_GROUPS];

/// The scales of groups `g0 .. g0 + n` (n ≤ `MAX_STAGED_GROUPS`) of the row tile starting at `scales`
/// (`groups` per row) as f32: `(p, stride)` with row j, group g0 + i at `p[j * stride + i]` — in place
/// for f32, converted into `stage` for f16.
///
/// # Safety
/// `scales` points at `ROW_TILE * groups` values of the type `HALF` says, `g0 + n ≤ groups`; the
/// caller has F16C and AVX.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn stage_scales<const HALF: bool>(
    scales: *const u8,
    groups: usize,
    g0: usize,
    n: usize,
    stage: &mut ScaleStage,
) -> (*const f32, usize) {
    use std::arch::x86_64::*;
    if !HALF {
        return ((scales as *const f32).add(g0), groups);
    }
    let dst = stage.as_mut_ptr() as *mut f32;
    for j in 0..ROW_TILE {
        let (src, out) = (
            scales.add(2 * (j * groups + g0)),
            dst.add(j * MAX_STAGED_GROUPS),
        );
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(src.add(2 * i) as *const __m128i));
            _mm256_storeu_ps(out.add(i), v);
            i += 8;
        }
        while i < n {
            *out.add(i) = group_value::<true>(src, i);
            i += 1;
        }
    }
    (dst as *const f32, MAX_STAGED_GROUPS)
}

/// The bias term of one row, `Σ_g b_g · xsum_g`, eight groups at a time.
///
/// # Safety
/// `biases` points at `groups` values of the type `HALF` says, `sums` at `groups` f32; the caller has
/// AVX, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn bias_term<const HALF: bool>(biases: *const u8, sums: *const f32, groups: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    let mut g = 0;
    while g + 8 <= groups {
        let b = if HALF {
            _mm256_cvtph_ps(_mm_loadu_si128(biases.add(2 * g) as *const __m128i))
        } else {
            _mm256_loadu_ps((biases as *const f32).add(g))
        };
        acc = _mm256_fmadd_ps(b, _mm256_loadu_ps(sums.add(g)), acc);
        g += 8;
    }
    let v = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    let v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
    let mut total = _mm_cvtss_f32(v);
    while g < groups {
        total = group_value::<HALF>(biases, g).mul_add(*sums.add(g), total);
        g += 1;
    }
    total
}

/// Where a row tile's data lie: rows `r .. r + ROW_TILE` of a layer's packed codes, their group scales
/// and biases (`vb` bytes each: f16 or f32), and the next tile's, to prefetch (addresses only, made
/// with `wrapping_add`: past the last tile they point nowhere, harmlessly).
#[cfg(target_arch = "x86_64")]
struct TilePointers {
    groups: usize,
    blocks: usize,
    blocks_per_group: usize,
    vb: usize,
    rows: [*const u8; ROW_TILE],
    scales: *const u8,
    biases: *const u8,
    next: *const u8,
    /// Bytes of the next tile's codes to fetch per block of this one.
    line_per_block: usize,
    next_scales: *const i8,
    next_biases: *const i8,
}

#[cfg(target_arch = "x86_64")]
impl TilePointers {
    /// # Safety
    /// Rows `r..r + ROW_TILE` of `w` exist and `w` holds `BITS`-bit codes and group values of the
    /// type `HALF` says.
    #[inline(always)]
    unsafe fn new<const BITS: u32, const HALF: bool>(w: &AffineWeight, r: usize) -> Self {
        let k = w.in_dim;
        let groups = k / w.spec.group_size;
        let blocks = k / BLOCK;
        let row_bytes = k * BITS as usize / 8;
        // SAFETY (all loads the kernels make through these): rows `r..r + ROW_TILE` exist (the caller
        // checks), each holds `row_bytes` packed bytes and `groups` scales and biases.
        let base = (w.packed.as_ptr() as *const u8).add(r * row_bytes);
        let vb = if HALF { 2 } else { 4 };
        let scales = w.scales.as_ptr().add(r * groups * vb);
        let biases = w.biases.as_ptr().add(r * groups * vb);
        let tile_bytes = ROW_TILE * row_bytes;
        TilePointers {
            groups,
            blocks,
            blocks_per_group: w.spec.group_size / BLOCK,
            vb,
            rows: std::array::from_fn(|j| base.add(j * row_bytes)),
            scales,
            biases,
            next: base.wrapping_add(tile_bytes),
            line_per_block: tile_bytes / blocks,
            next_scales: scales.wrapping_add(ROW_TILE * groups * vb) as *const i8,
            next_biases: biases.wrapping_add(ROW_TILE * groups * vb) as *const i8,
        }
    }

    /// Fetch the next tile's scales and biases (a few lines: they are needed only once this tile
    /// is done).
    #[inline(always)]
    unsafe fn prefetch_values(&self) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = ROW_TILE * self.groups * self.vb;
        let mut at = 0;
        while at < bytes {
            _mm_prefetch::<_MM_HINT_T0>(self.next_scales.wrapping_add(at));
            _mm_prefetch::<_MM_HINT_T0>(self.next_biases.wrapping_add(at));
            at += 64;
        }
    }

    /// Fetch the next tile's codes in step with block `b` of this one (two lines for 8-bit codes).
    #[inline(always)]
    unsafe fn prefetch_block<const BITS: u32>(&self, b: usize) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let ahead = self.next.wrapping_add(b * self.line_per_block) as *const i8;
        _mm_prefetch::<_MM_HINT_T0>(ahead);
        if BITS == 8 {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
        }
    }

    /// Row `j`'s bias term for an input whose group sums start at `sums`.
    ///
    /// # Safety
    /// As [`bias_term`]: `sums` holds `groups` values; the caller has AVX, FMA and F16C.
    #[inline(always)]
    unsafe fn bias<const HALF: bool>(&self, j: usize, sums: *const f32) -> f32 {
        bias_term::<HALF>(
            self.biases.add(j * self.groups * self.vb),
            sums,
            self.groups,
        )
    }
}

/// The vector arithmetic a single-input row-tile kernel is built from (see [`row_tile`]).
#[cfg(target_arch = "x86_64")]
trait TileMath {
    /// One row's running sum.
    type Acc: Copy;
    /// One block of 32 activation codes, loaded.
    type X;
    /// The codes of one block of a weight row, in 16-bit lanes.
    type W;
    unsafe fn zero() -> Self::Acc;
    unsafe fn load_x(codes: *const i16) -> Self::X;
    /// The codes of block `b` of the packed row.
    unsafe fn unpack<const BITS: u32>(row: *const u8, b: usize) -> Self::W;
    /// `acc + w · x · scale`.
    unsafe fn fma_block(acc: Self::Acc, w: &Self::W, x: &Self::X, scale: f32) -> Self::Acc;
    /// The row's total (for 4-bit rows with the lanes' scaling undone, see [`avx2::unpack`]).
    unsafe fn sum<const BITS: u32>(acc: Self::Acc) -> f32;
}

/// Rows `r .. r + ROW_TILE` of `w` for inputs `i0 .. i0 + INPUTS`: each block of activations is
/// loaded once and serves all the tile's rows, whose sums stay in registers; scales are staged to
/// f32 per tile, and the bias term is one vector dot per row at the end. The next tile's rows,
/// scales and biases follow this tile's in memory: the codes are fetched a line per block while this
/// one computes (the scales and biases all at its start), so that the loads rarely wait on memory
/// (single-thread speed on out-of-cache weights 4.2 -> 2.9 ns per row and block on Zen 1). Every (row, input) pair goes through the same operations
/// in the same order whatever `INPUTS` is, so an input's outputs are bit-identical alone and in a
/// batch; with several inputs the weight rows are read from memory once for all of them.
/// `out[i * ROW_TILE + j]` receives row `r + j` for input `i0 + i`.
///
/// # Safety
/// Rows `r..r + ROW_TILE` and inputs `i0..i0 + INPUTS` exist; `qi` was made for `w`; the caller is
/// compiled with the features `M`'s arithmetic and F16C need.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_tile<M: TileMath, const BITS: u32, const HALF: bool, const INPUTS: usize>(
    w: &AffineWeight,
    r: usize,
    qi: &QuantizedInputs,
    i0: usize,
    out: &mut [f32],
) {
    const ROWS: usize = ROW_TILE;
    let k = w.in_dim;
    let t = TilePointers::new::<BITS, HALF>(w, r);
    let rows = t.rows;
    let mut stage: ScaleStage = [std::mem::MaybeUninit::uninit(); ROWS * MAX_STAGED_GROUPS];
    let mut acc = [[M::zero(); ROWS]; INPUTS];
    let codes = qi.codes.as_ptr().add(i0 * k);
    let in_scales = qi.scales.as_ptr().add(i0 * t.blocks);
    t.prefetch_values();
    let mut b = 0;
    for g0 in (0..t.groups).step_by(MAX_STAGED_GROUPS) {
        let n = MAX_STAGED_GROUPS.min(t.groups - g0);
        let (staged, stride) = stage_scales::<HALF>(t.scales, t.groups, g0, n, &mut stage);
        for g in 0..n {
            let sw: [f32; ROWS] = std::array::from_fn(|j| *staged.add(j * stride + g));
            for _ in 0..t.blocks_per_group {
                t.prefetch_block::<BITS>(b);
                let xs: [M::X; INPUTS] =
                    std::array::from_fn(|i| M::load_x(codes.add(i * k + b * BLOCK)));
                let sx: [f32; INPUTS] = std::array::from_fn(|i| *in_scales.add(i * t.blocks + b));
                for j in 0..ROWS {
                    // Each block of codes is unpacked once for all the inputs.
                    let wj = M::unpack::<BITS>(rows[j], b);
                    for i in 0..INPUTS {
                        acc[i][j] = M::fma_block(acc[i][j], &wj, &xs[i], sw[j] * sx[i]);
                    }
                }
                b += 1;
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        let sums = qi.sums.as_ptr().add((i0 + i) * t.groups);
        for j in 0..ROWS {
            out[i * ROWS + j] = M::sum::<BITS>(acc[j]) + t.bias::<HALF>(j, sums);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{row_tile, AffineWeight, QuantizedInputs, TileMath, BLOCK, INPUT_TILE};
    use std::arch::x86_64::*;

    /// The 32 codes of block `b` of a packed row in 16-bit lanes, in two vectors that pair with an
    /// input's codes as [`super::quantize_inputs`] orders them. With no shuffle: 8-bit codes are the
    /// low and the high bytes of the block's 16-bit words (elements 2i, then 2i + 1). For 4-bit codes
    /// the 16 bytes are loaded into both halves of a register and masked so that each 16-bit word
    /// keeps one nibble: the low half its lowest (element 4i), the high half the next, *in place*
    /// (16 · element 4i + 1); the second vector does the same for the word's high byte (elements
    /// 4i + 2 and 16 · (4i + 3)). The products of the high halves are 16 times too large, exactly:
    /// lanes 4-7 of every eight-lane sum are taken back by [`NIBBLE_FIX`] once per row.
    #[inline(always)]
    pub(super) unsafe fn unpack<const BITS: u32>(row: *const u8, b: usize) -> (__m256i, __m256i) {
        if BITS == 4 {
            let q = _mm256_broadcastsi128_si256(_mm_loadu_si128(row.add(16 * b) as *const __m128i));
            let m = nibble_mask();
            (
                _mm256_and_si256(q, m),
                _mm256_and_si256(_mm256_srli_epi16::<8>(q), m),
            )
        } else {
            let q = _mm256_loadu_si256(row.add(32 * b) as *const __m256i);
            (
                _mm256_and_si256(q, _mm256_set1_epi16(0xFF)),
                _mm256_srli_epi16::<8>(q),
            )
        }
    }

    /// Keeps the lowest nibble of each 16-bit word in the low 128 bits, the second one in the high.
    #[inline(always)]
    unsafe fn nibble_mask() -> __m256i {
        _mm256_setr_m128i(_mm_set1_epi16(0x000F), _mm_set1_epi16(0x00F0))
    }

    /// What each lane of a 4-bit row's eight-lane f32 sum is multiplied by before the lanes are
    /// added (see [`unpack`]); 8-bit rows need none.
    pub(super) const NIBBLE_FIX: [f32; 8] = [1.0, 1.0, 1.0, 1.0, 0.0625, 0.0625, 0.0625, 0.0625];

    /// The sum of a row's eight lanes, 4-bit lanes 4-7 divided by 16 first (exact: a power of two).
    #[inline(always)]
    pub(super) unsafe fn row_sum<const BITS: u32>(acc: __m256) -> f32 {
        let acc = if BITS == 4 {
            _mm256_mul_ps(acc, _mm256_loadu_ps(NIBBLE_FIX.as_ptr()))
        } else {
            acc
        };
        crate::kernels::x86::hsum256(acc)
    }

    /// Output row `r` for `n ≤ INPUT_TILE` inputs starting at input `i0`; results go to `out[j]`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows<const BITS: u32>(
        w: &AffineWeight,
        r: usize,
        qi: &QuantizedInputs,
        i0: usize,
        n: usize,
        out: &mut [f32; INPUT_TILE],
    ) {
        let k = w.in_dim;
        let gs = w.spec.group_size;
        let groups = k / gs;
        let blocks = k / BLOCK;
        let blocks_per_group = gs / BLOCK;
        let row_bytes = k * BITS as usize / 8;
        // SAFETY (all loads below): the packed row holds `row_bytes` bytes, the codes `k` per input,
        // and every offset stays inside them because `k` is a multiple of the group size ≥ 32.
        let row = (w.packed.as_ptr() as *const u8).add(r * row_bytes);
        let mut acc = [_mm256_setzero_ps(); INPUT_TILE];
        for g in 0..groups {
            let s = w.scales.get(r * groups + g);
            for b in g * blocks_per_group..(g + 1) * blocks_per_group {
                let (lo, hi) = unpack::<BITS>(row, b);
                for (j, a) in acc.iter_mut().enumerate().take(n) {
                    let i = i0 + j;
                    let x = qi.codes.as_ptr().add(i * k + b * BLOCK);
                    let x0 = _mm256_loadu_si256(x as *const __m256i);
                    let x1 = _mm256_loadu_si256(x.add(16) as *const __m256i);
                    let dot =
                        _mm256_add_epi32(_mm256_madd_epi16(lo, x0), _mm256_madd_epi16(hi, x1));
                    let f = _mm256_set1_ps(s * qi.scales[i * blocks + b]);
                    *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), f, *a);
                }
            }
        }
        for j in 0..n {
            let sums = &qi.sums[(i0 + j) * groups..(i0 + j + 1) * groups];
            let bias: f32 = sums
                .iter()
                .enumerate()
                .map(|(g, s)| w.biases.get(r * groups + g) * s)
                .sum();
            out[j] = row_sum::<BITS>(acc[j]) + bias;
        }
    }

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

    /// The arithmetic of the AVX2 row-tile kernel: a block's 32 codes in 16-bit lanes in two
    /// vectors, two `vpmaddwd` and an add for its eight partial sums (with `VNNI`, AVX-VNNI's
    /// `vpdpwssd` on 256-bit registers multiplies, pairs and accumulates in one instruction: the same
    /// integer sums, so the same results bit for bit), one convert and one multiply-add by the
    /// block's scale. (A 128-bit form, kept while Zen 1 was the AVX2 machine at hand, needed twice the
    /// instructions on cores with full-width 256-bit integer units.)
    pub struct Avx<const VNNI: bool>;

    impl<const VNNI: bool> TileMath for Avx<VNNI> {
        type Acc = __m256;
        type X = (__m256i, __m256i);
        type W = (__m256i, __m256i);

        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }

        #[inline(always)]
        unsafe fn load_x(codes: *const i16) -> (__m256i, __m256i) {
            let x = codes as *const __m256i;
            (_mm256_loadu_si256(x), _mm256_loadu_si256(x.add(1)))
        }

        #[inline(always)]
        unsafe fn unpack<const BITS: u32>(row: *const u8, b: usize) -> (__m256i, __m256i) {
            unpack::<BITS>(row, b)
        }

        #[inline(always)]
        unsafe fn fma_block(
            acc: __m256,
            q: &(__m256i, __m256i),
            x: &(__m256i, __m256i),
            scale: f32,
        ) -> __m256 {
            let dot = if VNNI {
                let zero = _mm256_setzero_si256();
                _mm256_dpwssd_avx_epi32(_mm256_dpwssd_avx_epi32(zero, q.0, x.0), q.1, x.1)
            } else {
                _mm256_add_epi32(_mm256_madd_epi16(q.0, x.0), _mm256_madd_epi16(q.1, x.1))
            };
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale), acc)
        }

        #[inline(always)]
        unsafe fn sum<const BITS: u32>(v: __m256) -> f32 {
            row_sum::<BITS>(v)
        }
    }

    /// Rows `r .. r + ROW_TILE` for inputs `i0 .. i0 + INPUTS`, see [`row_tile`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_row_tile<const BITS: u32, const HALF: bool, const INPUTS: usize>(
        w: &AffineWeight,
        r: usize,
        qi: &QuantizedInputs,
        i0: usize,
        out: &mut [f32],
    ) {
        row_tile::<Avx<false>, BITS, HALF, INPUTS>(w, r, qi, i0, out)
    }

    /// [`dot_row_tile`] with AVX-VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub unsafe fn dot_row_tile_vnni<const BITS: u32, const HALF: bool, const INPUTS: usize>(
        w: &AffineWeight,
        r: usize,
        qi: &QuantizedInputs,
        i0: usize,
        out: &mut [f32],
    ) {
        row_tile::<Avx<true>, BITS, HALF, INPUTS>(w, r, qi, i0, out)
    }
}

/// The row-tile kernel for CPUs with AVX-512 VNNI (Intel Ice Lake and later, AMD Zen 4 and later):
/// the same 16-bit activation codes, scales and integer block sums as the AVX2 kernel, two blocks per
/// step on 512-bit registers. A block's 32 codes are spread into 16-bit lanes as [`avx2::unpack`]
/// spreads them (masks and shifts, no shuffle; the two blocks' bytes are one load for 8-bit codes,
/// two 16-byte broadcasts for 4-bit ones), and two `vpdpwssd` leave block `b`'s eight partial sums in
/// lanes 0-7 and block `b + 1`'s in lanes 8-15, which one `vcvtdq2ps` and one multiply-add (by the two
/// blocks' scales) take to f32. Per (row, input) and 64 codes that is 5 instructions where the 256-bit
/// `vpmaddwd` form needs 10: the products of several inputs
/// with one weight tile cost little more than one. The integer sums are exact and the same as the
/// AVX2 kernel's; only the order in which the f32 block results are added differs.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{
        stage_scales, AffineWeight, QuantizedInputs, ScaleStage, TilePointers, BLOCK,
        MAX_STAGED_GROUPS, ROW_TILE,
    };
    use std::arch::x86_64::*;

    /// Blocks `b` and `b + 1` of a packed row in 16-bit lanes, as [`super::avx2::unpack`] lays out
    /// one block: block `b` in the low 256 bits, `b + 1` in the high. For 4-bit codes the 32-bit
    /// sums' lanes 4-7 and 12-15 come out 16 times too large ([`row_sum`] takes that back).
    #[inline(always)]
    unsafe fn unpack_pair<const BITS: u32>(row: *const u8, b: usize) -> (__m512i, __m512i) {
        if BITS == 4 {
            let half = |b: usize| {
                _mm256_broadcastsi128_si256(_mm_loadu_si128(row.add(16 * b) as *const __m128i))
            };
            let q = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(half(b)), half(b + 1));
            let m = _mm512_broadcast_i64x4(_mm256_setr_m128i(
                _mm_set1_epi16(0x000F),
                _mm_set1_epi16(0x00F0),
            ));
            (
                _mm512_and_si512(q, m),
                _mm512_and_si512(_mm512_srli_epi16::<8>(q), m),
            )
        } else {
            // Two blocks of 32 bytes are one 64-byte load.
            let q = _mm512_loadu_si512(row.add(32 * b) as *const __m512i);
            (
                _mm512_and_si512(q, _mm512_set1_epi16(0xFF)),
                _mm512_srli_epi16::<8>(q),
            )
        }
    }

    /// The sum of a row's 16 lanes, for 4-bit rows lanes 4-7 and 12-15 divided by 16 first.
    #[inline(always)]
    unsafe fn row_sum<const BITS: u32>(acc: __m512) -> f32 {
        if BITS == 4 {
            let fix = _mm256_loadu_ps(super::avx2::NIBBLE_FIX.as_ptr());
            let lo = _mm256_mul_ps(_mm512_castps512_ps256(acc), fix);
            let hi = _mm256_mul_ps(
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc))),
                fix,
            );
            crate::kernels::x86::hsum256(_mm256_add_ps(lo, hi))
        } else {
            _mm512_reduce_add_ps(acc)
        }
    }

    /// An input's codes of blocks `b` and `b + 1` in the layout of [`unpack_pair`].
    #[inline(always)]
    unsafe fn load_pair(codes: *const i16, b: usize) -> (__m512i, __m512i) {
        let (p, n) = (
            codes.add(BLOCK * b) as *const __m256i,
            codes.add(BLOCK * b + BLOCK) as *const __m256i,
        );
        (
            _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_loadu_si256(p)),
                _mm256_loadu_si256(n),
            ),
            _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_loadu_si256(p.add(1))),
                _mm256_loadu_si256(n.add(1)),
            ),
        )
    }

    /// Two scales as one vector: `a` in lanes 0-7, `b` in lanes 8-15.
    #[inline(always)]
    unsafe fn pair_of(a: f32, b: f32) -> __m512 {
        // (`vinsertf64x4` needs only AVX-512 F, where `vinsertf32x8` needs DQ.)
        let lo = _mm512_castps_pd(_mm512_castps256_ps512(_mm256_set1_ps(a)));
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(
            lo,
            _mm256_castps_pd(_mm256_set1_ps(b)),
        ))
    }

    /// Rows `r .. r + ROW_TILE` of `w` for inputs `i0 .. i0 + INPUTS`, as `super::row_tile` lays them
    /// out (`out[i * ROW_TILE + j]`), two blocks per step. Every (row, input) pair goes through the
    /// same operations in the same order whatever `INPUTS` is (bit-identical alone and batched); the
    /// next tile's rows, scales and biases are prefetched a line per block.
    ///
    /// # Safety
    /// Rows `r..r + ROW_TILE` and inputs `i0..i0 + INPUTS` exist; `qi` was made for `w`; the CPU has
    /// AVX-512 F/BW/VL/VNNI and F16C.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_row_tile<const BITS: u32, const HALF: bool, const INPUTS: usize>(
        w: &AffineWeight,
        r: usize,
        qi: &QuantizedInputs,
        i0: usize,
        out: &mut [f32],
    ) {
        const ROWS: usize = ROW_TILE;
        let k = w.in_dim;
        let t = TilePointers::new::<BITS, HALF>(w, r);
        let rows = t.rows;
        let mut stage: ScaleStage = [std::mem::MaybeUninit::uninit(); ROWS * MAX_STAGED_GROUPS];
        let (mut staged, mut stride, mut g0) = (std::ptr::null::<f32>(), 0, usize::MAX);
        let mut acc = [[_mm512_setzero_ps(); ROWS]; INPUTS];
        let codes: [*const i16; INPUTS] =
            std::array::from_fn(|i| qi.codes.as_ptr().add((i0 + i) * k));
        let in_scales: [*const f32; INPUTS] =
            std::array::from_fn(|i| qi.scales.as_ptr().add((i0 + i) * t.blocks));
        let pairs = t.blocks / 2;
        t.prefetch_values();
        for p in 0..pairs {
            let b = 2 * p;
            let (ga, gb) = (b / t.blocks_per_group, (b + 1) / t.blocks_per_group);
            // The t.scales of t.groups from `ga` on, unless those of `ga..=gb` are staged already.
            if g0 == usize::MAX || gb >= g0 + MAX_STAGED_GROUPS {
                let n = MAX_STAGED_GROUPS.min(t.groups - ga);
                (staged, stride) = stage_scales::<HALF>(t.scales, t.groups, ga, n, &mut stage);
                g0 = ga;
            }
            t.prefetch_block::<BITS>(b);
            t.prefetch_block::<BITS>(b + 1);
            let xs: [(__m512i, __m512i); INPUTS] = std::array::from_fn(|i| load_pair(codes[i], b));
            let sx: [__m512; INPUTS] =
                std::array::from_fn(|i| pair_of(*in_scales[i].add(b), *in_scales[i].add(b + 1)));
            for j in 0..ROWS {
                let (lo, hi) = unpack_pair::<BITS>(rows[j], b);
                let sw = pair_of(
                    *staged.add(j * stride + ga - g0),
                    *staged.add(j * stride + gb - g0),
                );
                for i in 0..INPUTS {
                    let zero = _mm512_setzero_si512();
                    let dot =
                        _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(zero, lo, xs[i].0), hi, xs[i].1);
                    acc[i][j] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(dot),
                        _mm512_mul_ps(sw, sx[i]),
                        acc[i][j],
                    );
                }
            }
        }
        // An odd block out: its eight partial sums go to lanes 0-7.
        let mut last = [[_mm256_setzero_ps(); ROWS]; INPUTS];
        if t.blocks % 2 == 1 {
            let b = t.blocks - 1;
            let g = b / t.blocks_per_group;
            if g0 == usize::MAX || g >= g0 + MAX_STAGED_GROUPS {
                let n = MAX_STAGED_GROUPS.min(t.groups - g);
                (staged, stride) = stage_scales::<HALF>(t.scales, t.groups, g, n, &mut stage);
                g0 = g;
            }
            for j in 0..ROWS {
                // A last block of its own, on 256-bit registers.
                let (lo, hi) = super::avx2::unpack::<BITS>(rows[j], b);
                let sw = *staged.add(j * stride + g - g0);
                for i in 0..INPUTS {
                    let x = codes[i].add(BLOCK * b) as *const __m256i;
                    let zero = _mm256_setzero_si256();
                    let dot = _mm256_dpwssd_epi32(
                        _mm256_dpwssd_epi32(zero, lo, _mm256_loadu_si256(x)),
                        hi,
                        _mm256_loadu_si256(x.add(1)),
                    );
                    let scale = _mm256_set1_ps(sw * *in_scales[i].add(b));
                    last[i][j] = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), scale);
                }
            }
        }
        for i in 0..INPUTS {
            let sums = qi.sums.as_ptr().add((i0 + i) * t.groups);
            for j in 0..ROWS {
                out[i * ROWS + j] = row_sum::<BITS>(acc[i][j])
                    + super::avx2::row_sum::<BITS>(last[i][j])
                    + t.bias::<HALF>(j, sums);
            }
        }
    }
}

/// The row-tile kernel for `INPUTS` inputs, a layer's code width and group-value type, on `isa`.
/// Calling it needs the features `isa` names (AVX2, FMA and F16C in every case).
#[cfg(target_arch = "x86_64")]
type TileKernel = unsafe fn(&AffineWeight, usize, &QuantizedInputs, usize, &mut [f32]);

/// Which form of the row-tile kernel runs.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TileIsa {
    /// 256-bit `vpmaddwd`.
    Avx2,
    /// 256-bit `vpdpwssd` (AVX-VNNI).
    AvxVnni,
    /// 512-bit `vpdpwssd`, two blocks per step (AVX-512 VNNI).
    Avx512Vnni,
}

#[cfg(target_arch = "x86_64")]
impl TileIsa {
    /// The best form this CPU has (within what `EDGEVLM_NO_AVX512` / `EDGEVLM_NO_AVXVNNI` allow);
    /// the caller has checked AVX2, FMA and F16C.
    fn detect() -> Self {
        if has_avx512_vnni() {
            TileIsa::Avx512Vnni
        } else if has_avx_vnni() {
            TileIsa::AvxVnni
        } else {
            TileIsa::Avx2
        }
    }

    /// Every form this CPU can run (for tests).
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut isas = vec![TileIsa::Avx2];
        if has_avx_vnni() {
            isas.push(TileIsa::AvxVnni);
        }
        if has_avx512_vnni() {
            isas.push(TileIsa::Avx512Vnni);
        }
        isas
    }
}

#[cfg(target_arch = "x86_64")]
fn tile_kernel<const INPUTS: usize>(w: &AffineWeight, isa: TileIsa) -> TileKernel {
    use TileIsa::*;
    match (isa, w.spec.bits == 4, w.scales.is_f16()) {
        (Avx512Vnni, true, true) => vnni::dot_row_tile::<4, true, INPUTS>,
        (Avx512Vnni, true, false) => vnni::dot_row_tile::<4, false, INPUTS>,
        (Avx512Vnni, false, true) => vnni::dot_row_tile::<8, true, INPUTS>,
        (Avx512Vnni, false, false) => vnni::dot_row_tile::<8, false, INPUTS>,
        (AvxVnni, true, true) => avx2::dot_row_tile_vnni::<4, true, INPUTS>,
        (AvxVnni, true, false) => avx2::dot_row_tile_vnni::<4, false, INPUTS>,
        (AvxVnni, false, true) => avx2::dot_row_tile_vnni::<8, true, INPUTS>,
        (AvxVnni, false, false) => avx2::dot_row_tile_vnni::<8, false, INPUTS>,
        (Avx2, true, true) => avx2::dot_row_tile::<4, true, INPUTS>,
        (Avx2, true, false) => avx2::dot_row_tile::<4, false, INPUTS>,
        (Avx2, false, true) => avx2::dot_row_tile::<8, true, INPUTS>,
        (Avx2, false, false) => avx2::dot_row_tile::<8, false, INPUTS>,
    }
}

/// Weight rows that one pass of the single-input kernel computes together.
const ROW_TILE: usize = 4;

/// Rows per parallel task: a few tasks per thread, never tiny ones, a whole number of row tiles.
fn rows_per_task(out_dim: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    (out_dim / (threads * 4)).clamp(16, 256) / ROW_TILE * ROW_TILE
}

/// `ys (t × out) = xs (t × in) · Wᵀ`: one pass over each weight row serves up to four inputs; many
/// inputs run on AMX tiles with split inputs (16 significant bits) where the CPU has them.
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
    if t >= PANEL_MIN_INPUTS {
        panel_matmul(w, xs, ys, tile_inputs);
        return;
    }
    if super::qtiles::matmul(w, xs, ys) {
        return;
    }
    let chunk = rows_per_task(n);
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        let qi = quantize_inputs(w, xs);
        let four = w.spec.bits == 4;
        if t == 1 {
            let tile = tile_kernel::<1>(w, TileIsa::detect());
            // One token: tiles of ROW_TILE rows share each activation load.
            ys.par_chunks_mut(chunk).enumerate().for_each(|(c, y)| {
                let r0 = c * chunk;
                let tiles = y.len() / ROW_TILE;
                for (ti, yt) in y.chunks_exact_mut(ROW_TILE).enumerate() {
                    // SAFETY: the kernel's CPU features were detected above; rows r0 + 4ti .. + 4
                    // exist.
                    unsafe { tile(w, r0 + ti * ROW_TILE, &qi, 0, yt) }
                }
                let mut out = [0f32; INPUT_TILE];
                for (r, yr) in y.iter_mut().enumerate().skip(tiles * ROW_TILE) {
                    // SAFETY: as above.
                    unsafe {
                        if four {
                            avx2::dot_rows::<4>(w, r0 + r, &qi, 0, 1, &mut out)
                        } else {
                            avx2::dot_rows::<8>(w, r0 + r, &qi, 0, 1, &mut out)
                        }
                    }
                    *yr = out[0];
                }
            });
            return;
        }
        // Outputs are computed weight-row-major into a transposed buffer, then laid out `(t, out)`.
        let mut yt = vec![0f32; n * t];
        yt.par_chunks_mut(chunk * t)
            .enumerate()
            .for_each(|(c, block)| {
                let mut out = [0f32; INPUT_TILE];
                for (ri, yrow) in block.chunks_exact_mut(t).enumerate() {
                    let r = c * chunk + ri;
                    for i0 in (0..t).step_by(INPUT_TILE) {
                        let m = INPUT_TILE.min(t - i0);
                        // SAFETY: AVX2 and FMA were detected above.
                        unsafe {
                            if four {
                                avx2::dot_rows::<4>(w, r, &qi, i0, m, &mut out)
                            } else {
                                avx2::dot_rows::<8>(w, r, &qi, i0, m, &mut out)
                            }
                        }
                        yrow[i0..i0 + m].copy_from_slice(&out[..m]);
                    }
                }
            });
        for (r, col) in yt.chunks_exact(t).enumerate() {
            for (i, &v) in col.iter().enumerate() {
                ys[i * n + r] = v;
            }
        }
        return;
    }
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

/// `ys (t × n) = xs (t × k) · Wᵀ` for the tokens of a decode batch, each input's outputs
/// bit-identical to [`affine_matmul`] of that input alone (so a sequence answers the same alone or
/// batched), with each weight row read from memory once per four inputs instead of once per input.
pub fn affine_matmul_batch(w: &AffineWeight, xs: &[f32], ys: &mut [f32]) {
    let (k, n) = (w.in_dim, w.out_dim);
    let t = xs.len() / k;
    debug_assert_eq!(xs.len(), t * k);
    debug_assert_eq!(ys.len(), t * n);
    if t <= 1 {
        affine_matmul(w, xs, ys);
        return;
    }
    if super::qtiles::matmul(w, xs, ys) {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        let qi = quantize_inputs(w, xs);
        let isa = TileIsa::detect();
        let four = w.spec.bits == 4;
        let kernels = [
            tile_kernel::<1>(w, isa),
            tile_kernel::<2>(w, isa),
            tile_kernel::<3>(w, isa),
            tile_kernel::<4>(w, isa),
        ];
        // As the one-input product: rows in whole tiles of ROW_TILE through the tile kernel, the
        // last few through `dot_rows` (both compute each input on its own).
        let tiled = n / ROW_TILE * ROW_TILE;
        let chunk = rows_per_task(n);
        let ys_addr = ys.as_mut_ptr() as usize;
        (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let (r0, r1) = (c * chunk, ((c + 1) * chunk).min(n));
            // SAFETY: each task writes only the outputs of its own rows r0..r1, for every input.
            let ys = unsafe { std::slice::from_raw_parts_mut(ys_addr as *mut f32, t * n) };
            let mut out = [0f32; ROW_TILE * INPUT_TILE];
            let mut r = r0;
            while r < r1.min(tiled) {
                let mut i0 = 0;
                while i0 < t {
                    let m = INPUT_TILE.min(t - i0);
                    // SAFETY: AVX2, FMA and F16C (and VNNI where chosen) were detected; rows
                    // r..r + ROW_TILE and inputs i0..i0 + m exist.
                    unsafe { kernels[m - 1](w, r, &qi, i0, &mut out) };
                    for i in 0..m {
                        ys[(i0 + i) * n + r..][..ROW_TILE]
                            .copy_from_slice(&out[i * ROW_TILE..(i + 1) * ROW_TILE]);
                    }
                    i0 += m;
                }
                r += ROW_TILE;
            }
            let mut one = [0f32; INPUT_TILE];
            for r in r.max(tiled)..r1 {
                let mut i0 = 0;
                while i0 < t {
                    let m = INPUT_TILE.min(t - i0);
                    // SAFETY: AVX2 and FMA were detected; row r and inputs i0..i0 + m exist.
                    unsafe {
                        if four {
                            avx2::dot_rows::<4>(w, r, &qi, i0, m, &mut one)
                        } else {
                            avx2::dot_rows::<8>(w, r, &qi, i0, m, &mut one)
                        }
                    }
                    for (i, &v) in one.iter().take(m).enumerate() {
                        ys[(i0 + i) * n + r] = v;
                    }
                    i0 += m;
                }
            }
        });
        return;
    }
    for (x, y) in xs.chunks_exact(k).zip(ys.chunks_exact_mut(n)) {
        affine_matmul(w, x, y);
    }
}

/// Inputs from which a product runs on dequantized weight panels and an f32 GEMM: each panel is
/// dequantized once and serves every input, so the cost of expanding it vanishes against the product.
const PANEL_MIN_INPUTS: usize = 16;
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
    use crate::quant::{CodeLayout, QuantSpec, ScaleType};

    /// The kernels against f64 sums over the dequantized rows, for 1 to 6 inputs.
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
                    let mut row = vec![0f32; k];
                    for r in 0..n {
                        q.dequantize_row(r, &mut row);
                        for i in 0..t {
                            let want: f64 = row
                                .iter()
                                .zip(&xs[i * k..(i + 1) * k])
                                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                                .sum();
                            let got = f64::from(ys[i * n + r]);
                            assert!(
                                (got - want).abs() < 2e-4 * (1.0 + want.abs()),
                                "bits {bits} gs {gs} t {t} row {r} input {i}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Both single-input row-tile kernels (AVX2 and, where the CPU has it, AVX-512 VNNI) against f64
    /// sums over the dequantized rows, for every bit width and group size.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn batched_products_equal_each_input_alone() {
        for (bits, store) in [4u32, 8]
            .into_iter()
            .flat_map(|b| [(b, ScaleType::F32), (b, ScaleType::F16)])
        {
            // 70 rows: tiles of 4 and two left over, in several tasks; rows of an even and an odd
            // number of blocks.
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
                affine_matmul_batch(&q, &xs, &mut batch);
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

    #[test]
    fn row_tile_kernels_equal_dequantized_product() {
        if !has_avx2() {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        let isas = TileIsa::available();
        eprintln!("row-tile kernels checked: {isas:?}");
        for (bits, store) in [4u32, 8]
            .into_iter()
            .flat_map(|b| [(b, ScaleType::F32), (b, ScaleType::F16)])
        {
            // An odd number of blocks (a last block on its own), and more groups than one staging
            // of scales holds.
            for (gs, k) in [(32, 416), (32, 8288), (64, 384), (128, 384)] {
                let n = 8;
                let w: Vec<f32> = (0..n * k)
                    .map(|i| ((i * 7919 % 211) as f32 / 105.0 - 1.0) * 0.3)
                    .collect();
                let q =
                    AffineWeight::quantize(&w, n, k, QuantSpec::new(bits, gs).unwrap(), store, "t")
                        .unwrap();
                assert_eq!(q.scales.is_f16(), store == ScaleType::F16);
                let x: Vec<f32> = (0..k).map(|i| ((i * 13 % 29) as f32 / 7.0) - 2.0).collect();
                let qi = quantize_inputs(&q, &x);
                let mut row = vec![0f32; k];
                for r0 in (0..n).step_by(ROW_TILE) {
                    let mut got = vec![[0f32; ROW_TILE]; isas.len()];
                    for (isa, got) in isas.iter().zip(&mut got) {
                        // SAFETY: `available` lists the forms whose features were detected; rows
                        // r0..r0 + 4 exist.
                        unsafe { tile_kernel::<1>(&q, *isa)(&q, r0, &qi, 0, got) };
                    }
                    // The 256-bit forms add the same integer sums in the same order.
                    if let Some(i) = isas.iter().position(|&i| i == TileIsa::AvxVnni) {
                        assert_eq!(got[0], got[i], "AVX-VNNI and AVX2 differ");
                    }
                    for j in 0..ROW_TILE {
                        q.dequantize_row(r0 + j, &mut row);
                        let want: f64 = row
                            .iter()
                            .zip(&x)
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum();
                        // Rounding the activations to 16 bits moves each by at most amax / 65534:
                        // the bound, plus f32 accumulation.
                        let amax = x.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
                        let wsum: f64 = row.iter().map(|v| f64::from(v.abs())).sum();
                        let tol = wsum * amax / 65534.0 + 1e-5 * wsum * amax / 32.0 + 1e-6;
                        for (kernel, g) in isas.iter().zip(&got) {
                            let got = f64::from(g[j]);
                            assert!(
                                (got - want).abs() < tol,
                                "{kernel:?}: bits {bits} gs {gs} {store:?} row {}: {got} vs {want}",
                                r0 + j
                            );
                        }
                    }
                }
            }
        }
    }

    /// The vector row expansion equals the scalar one up to the fused multiply-add's rounding.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_dequantize_matches_scalar() {
        if !has_avx2() {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        // 5 rows are held row-major, 32 in two row tiles.
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
            assert_eq!(q.layout == CodeLayout::Tiles, n == 32);
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
