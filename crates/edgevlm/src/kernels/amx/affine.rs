//! Products with affine-quantized weights on AMX tiles, for many inputs at once (a prompt, vision
//! tiles): `ys (t × n) = xs (t × k) · Wᵀ`, with the weight exact and each input held to 16
//! significant bits.
//!
//! The product is taken group by group, `y = Σ_g s_g · (Σ_{i∈g} q_i x_i) + b_g · Σ_{i∈g} x_i`:
//! - the codes `q` (0..255) are integers, exact in bf16;
//! - each input is split into two bf16 parts, `x ≈ hi + lo` (each the nearest bf16 of what is left),
//!   so `|x - hi - lo| ≤ 2⁻¹⁷|x|`: finer than the decode kernel's 16-bit block integers, and 2⁹ times
//!   finer per block than the 8-bit activations of llama.cpp's and mistral.rs's products. Every
//!   product of a code and a part is exact in f32, and `tdpbf16ps` sums them in f32;
//! - the scale and bias of each group are applied outside the tiles, in f32 (AVX-512): the four
//!   16 × 16 group sums of a 32 × 32 block are stored and folded into the block's sums, with the
//!   bias times the f32 sum of the group's (unsplit) inputs.
//!
//! Measured on SmolLM2-135M Q4_1 (`edgevlm quant-eval --configs file`, 2,044 tokens): mean KLD
//! 3.1e-8 from the f32 product of the same weights, against 1e-3 and more for the quantization
//! itself. A third part would make the split exact, at a third more tile loads, which are what
//! bounds this kernel: on the machine it was tuned on, a prompt ran 11% faster than the f32 GEMM
//! with three parts and 30% faster with two.
//!
//! The weight is expanded to bf16 codes 32 columns at a time, by the task that uses them (a buffer
//! reused per worker), never whole; the task then runs group by group over all rows, the two code
//! tiles of a group of 32 loaded once. The inputs are split once per product, up to `CHUNK_ROWS` rows
//! at a time (the split copy is 4 bytes per input).

use rayon::prelude::*;

use super::available;
#[cfg(target_arch = "x86_64")]
use super::round_bf16;
use crate::quant::AffineWeight;

/// Output rows per block and output columns per task (two tiles each way).
const BLOCK: usize = 32;
/// Inputs per tile step (16 pairs of bf16).
const KSTEP: usize = 32;
/// How finely the inputs of a quantized product are held: on AMX tiles (products of many inputs)
/// and by the row-tile kernels of decode steps ([`crate::kernels::qtiles`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileInputs {
    /// Two bf16 parts per input on AMX, `hi + lo`: 16 significant bits (|error| ≤ 2⁻¹⁷|x|); two
    /// 8-bit codes per input in the row tiles (`256 · hi + lo` steps of a block's largest value
    /// / 32,512). The default: no measurable loss against f32.
    Split,
    /// One bf16 per input (2⁻⁹ relative) on AMX, as the vision encoder's bf16 products round
    /// theirs: half the tile loads and products (vision with quantized weights, whose own error is
    /// far larger). The row tiles keep two codes.
    Bf16,
    /// One 8-bit code per input and block of 32 in the row tiles (steps of the block's largest
    /// value / 127, f32 scales), as llama.cpp rounds activations for its 4- and 8-bit blocks (its
    /// Q8_0, with f16 scales): half the integer products of [`TileInputs::Split`], so a batch of
    /// decode steps costs less, at a measured accuracy cost (benches/README.md). An opt-in
    /// (`EngineOptions::int8_activations`); AMX tiles take these inputs as one bf16 each.
    Int8,
}

impl TileInputs {
    fn parts(self) -> usize {
        match self {
            TileInputs::Split => 2,
            TileInputs::Bf16 | TileInputs::Int8 => 1,
        }
    }
}
/// Input rows split and multiplied at a time: bounds the split copy (6 MB at 1,536 inputs per row),
/// which matters for batches of vision tiles (2,048 rows).
const CHUNK_ROWS: usize = 1024;

/// `ys (t × n) = xs (t × k) · Wᵀ` on AMX tiles, the inputs held as `inputs` says. Returns false (and
/// leaves `ys` alone) where AMX is not available or the shape is not one it takes (`n` a multiple of
/// 32). Non-finite inputs give non-finite outputs.
pub fn affine_matmul(w: &AffineWeight, xs: &[f32], ys: &mut [f32], inputs: TileInputs) -> bool {
    let (n, k, gs) = (w.out_dim, w.in_dim, w.spec.group_size);
    if !available()
        || n == 0
        || !n.is_multiple_of(BLOCK)
        || !gs.is_multiple_of(KSTEP)
        || !k.is_multiple_of(gs)
        || !matches!(w.spec.bits, 4 | 8)
        || !xs.len().is_multiple_of(k)
    {
        return false;
    }
    let t = xs.len() / k;
    if t == 0 || ys.len() != t * n {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        for (x, y) in xs.chunks(CHUNK_ROWS * k).zip(ys.chunks_mut(CHUNK_ROWS * n)) {
            product(w, x, x.len() / k, y, inputs.parts());
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The inputs as the tiles read them, and the f32 sum of each group of each row. The parts
/// lie in tile order, `[32-row block][k step][part][16-row half]` tiles of 16 rows × 32 bf16 (1 KB,
/// rows past `t` zero), so that a block's tiles are read as one forward stream.
struct SplitInputs {
    tiles: Vec<u16>,
    sums: Vec<f32>,
    /// bf16 parts per input (1 or 2).
    parts: usize,
    t_pad: usize,
}

impl SplitInputs {
    /// Offset (in bf16) of the tile of rows `16·half..` of block `rb`, k step `kb`, part `p` (of
    /// `parts`).
    #[inline]
    fn tile(parts: usize, steps: usize, rb: usize, kb: usize, p: usize, half: usize) -> usize {
        (((rb * steps + kb) * parts + p) * 2 + half) * 512
    }
}

#[cfg(target_arch = "x86_64")]
fn split_inputs(xs: &[f32], k: usize, gs: usize, t: usize, parts: usize) -> SplitInputs {
    let t_pad = t.div_ceil(BLOCK) * BLOCK;
    let (groups, steps) = (k / gs, k / KSTEP);
    let mut tiles = vec![0u16; parts * t_pad * k];
    let mut sums = vec![0f32; t_pad * groups];
    tiles
        .par_chunks_mut(parts * BLOCK * k)
        .zip(sums.par_chunks_mut(BLOCK * groups))
        .zip(xs.par_chunks(BLOCK * k))
        .for_each(|((dst, s), x)| {
            for (r, (x, s)) in x
                .chunks_exact(k)
                .zip(s.chunks_exact_mut(groups))
                .enumerate()
            {
                // SAFETY: AVX-512F comes with AMX (checked by the caller); `dst` is this block's
                // steps × parts × 2 tiles and r < 32.
                unsafe { split_row(x, r, dst, s, gs, steps, parts) }
            }
        });
    SplitInputs {
        tiles,
        sums,
        parts,
        t_pad,
    }
}

/// Row `r` of a 32-row block into its parts (written into the block's tiles `dst`) and its group sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn split_row(
    x: &[f32],
    r: usize,
    dst: &mut [u16],
    sums: &mut [f32],
    gs: usize,
    steps: usize,
    parts: usize,
) {
    use std::arch::x86_64::*;
    let (half, row) = (r / 16, r % 16);
    for (g, s) in sums.iter_mut().enumerate() {
        let mut acc = _mm512_setzero_ps();
        for i in (g * gs..(g + 1) * gs).step_by(16) {
            let v = _mm512_loadu_ps(x.as_ptr().add(i));
            acc = _mm512_add_ps(acc, v);
            // v ≈ hi + lo, each the nearest bf16 (ties to even) of what is left (or just hi).
            let mut rem = v;
            for p in 0..parts {
                let (part, left) = round_bf16(rem);
                rem = left;
                let at =
                    SplitInputs::tile(parts, steps, 0, i / KSTEP, p, half) + row * 32 + i % KSTEP;
                debug_assert!(at + 16 <= dst.len());
                _mm256_storeu_si256(dst.as_mut_ptr().add(at).cast(), part);
            }
        }
        *s = _mm512_reduce_add_ps(acc);
    }
}

/// bf16 bits of the pair of 4-bit codes in each byte (low nibble first), and of each 8-bit code.
struct CodeTables {
    nibbles: [u32; 256],
    bytes: [u16; 256],
}

const fn bf16_of(q: u32) -> u16 {
    // Small integers are exact in f32 and bf16: the top half of the f32 bits.
    ((q as f32).to_bits() >> 16) as u16
}

static CODES: CodeTables = {
    let mut nibbles = [0u32; 256];
    let mut bytes = [0u16; 256];
    let mut b = 0;
    while b < 256 {
        nibbles[b] = bf16_of(b as u32 & 15) as u32 | (bf16_of(b as u32 >> 4) as u32) << 16;
        bytes[b] = bf16_of(b as u32);
        b += 1;
    }
    CodeTables { nibbles, bytes }
};

/// Columns `c0..c0 + 32` of `w` as bf16 code tiles: `[column half][k step][pair p][column c]` of u32
/// pairs `(q[c][32kb + 2p], q[c][32kb + 2p + 1])`, the order `tdpbf16ps` reads its second operand in.
fn expand_codes(w: &AffineWeight, c0: usize, tiles: &mut [u32]) {
    let steps = w.in_dim / KSTEP;
    // Byte `i` of column c's packed row, wherever the layout keeps its word.
    let byte = |c: usize, i: usize| (w.packed[w.word_at(c0 + c, i / 4)] >> (8 * (i % 4))) as u8;
    // Written in order, tile by tile; each tile reads 16 (or 32) bytes of each of its 16 rows.
    for (half, dst) in tiles.chunks_exact_mut(steps * 256).take(2).enumerate() {
        for (kb, tile) in dst.chunks_exact_mut(256).enumerate() {
            for (p, out) in tile.chunks_exact_mut(16).enumerate() {
                if w.spec.bits == 4 {
                    // Byte 16kb + p holds codes 32kb + 2p (low nibble) and 32kb + 2p + 1.
                    for (c, o) in out.iter_mut().enumerate() {
                        *o = CODES.nibbles[byte(half * 16 + c, kb * 16 + p) as usize];
                    }
                } else {
                    for (c, o) in out.iter_mut().enumerate() {
                        let at = kb * 32 + 2 * p;
                        let (b0, b1) = (byte(half * 16 + c, at), byte(half * 16 + c, at + 1));
                        *o = CODES.bytes[b0 as usize] as u32
                            | (CODES.bytes[b1 as usize] as u32) << 16;
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn product(w: &AffineWeight, xs: &[f32], t: usize, ys: &mut [f32], parts: usize) {
    let (n, k, gs) = (w.out_dim, w.in_dim, w.spec.group_size);
    let groups = k / gs;
    let inputs = split_inputs(xs, k, gs, t, parts);
    let ys_addr = ys.as_mut_ptr() as usize;
    thread_local! {
        // Per worker: the code tiles of one task's columns, their scales and biases as f32, and
        // their sums (t_pad × 32).
        static TILES: std::cell::RefCell<(Vec<u32>, Vec<f32>, Vec<f32>)> =
            const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
    }
    (0..n / BLOCK).into_par_iter().for_each(|task| {
        let c0 = task * BLOCK;
        TILES.with_borrow_mut(|(tiles, values, sums)| {
            tiles.resize(2 * (k / KSTEP) * 256, 0);
            expand_codes(w, c0, tiles);
            // `values[g]`: the 32 columns' scales, then their biases, for group g.
            values.resize(groups * 2 * BLOCK, 0.0);
            for c in 0..BLOCK {
                for g in 0..groups {
                    let at = w.value_at(c0 + c, g);
                    values[g * 2 * BLOCK + c] = w.scales.get(at);
                    values[g * 2 * BLOCK + BLOCK + c] = w.biases.get(at);
                }
            }
            sums.clear();
            sums.resize(inputs.t_pad * BLOCK, 0.0);
            // SAFETY: AMX and AVX-512F are available (checked by `affine_matmul`); the tile reads
            // stay inside `inputs.tiles` (t_pad/32 blocks of steps × parts × 2 tiles) and `tiles`
            // (2 × k/32 tiles of 256 u32); `sums` is t_pad × 32, `values` groups × 64.
            unsafe { tiles::columns(&inputs, k, gs, tiles, values, sums) };
            for (r, row) in sums.chunks_exact(BLOCK).take(t).enumerate() {
                // SAFETY: row r < t and columns c0..c0 + 32 ≤ n of `ys` (t × n), written by this
                // task only.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        row.as_ptr(),
                        (ys_addr as *mut f32).add(r * n + c0),
                        BLOCK,
                    )
                };
            }
        })
    });
}

#[cfg(target_arch = "x86_64")]
mod tiles {
    use super::{SplitInputs, BLOCK, KSTEP};
    use crate::kernels::amx::tiles::{Config, CONFIG};
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// All `t_pad` rows of the task's 32 columns into `out` (`t_pad × 32`, row-major, zeroed), group
    /// by group, each group over every 32-row block: tiles 0-3 take the four 16 × 16 sums of a block,
    /// tiles 4-5 two 16-row slices of an input part, tiles 6-7 the two 16-column code tiles of a k
    /// step (loaded once per group where a group is one k step).
    ///
    /// # Safety
    /// AMX tile state is granted and the CPU has AVX-512F; `codes` holds `2 × k/32` tiles of 256
    /// u32, `values` `k/gs × 64` floats, `out` `t_pad × 32`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn columns(
        inputs: &SplitInputs,
        k: usize,
        gs: usize,
        codes: &[u32],
        values: &[f32],
        out: &mut [f32],
    ) {
        asm!("ldtilecfg [{0}]", in(reg) &CONFIG as *const Config, options(nostack, readonly));
        let steps = k / KSTEP;
        let groups = k / gs;
        let per_group = gs / KSTEP;
        let b_half = codes.as_ptr().add(steps * 256);
        let load_codes = |kb: usize| {
            asm!(
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                b0 = in(reg) codes.as_ptr().add(kb * 256),
                b1 = in(reg) b_half.add(kb * 256),
                sb = in(reg) 64usize,
                options(nostack, readonly)
            );
        };
        let mut group_sums = [0f32; BLOCK * BLOCK];
        for g in 0..groups {
            if per_group == 1 {
                load_codes(g);
            }
            let v = values.as_ptr().add(g * 2 * BLOCK);
            let (s0, s1) = (_mm512_loadu_ps(v), _mm512_loadu_ps(v.add(16)));
            let (b0, b1) = (_mm512_loadu_ps(v.add(32)), _mm512_loadu_ps(v.add(48)));
            for rb in 0..inputs.t_pad / BLOCK {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                for kb in g * per_group..(g + 1) * per_group {
                    if per_group > 1 {
                        load_codes(kb);
                    }
                    for p in 0..inputs.parts {
                        let a0 = inputs.tiles.as_ptr().add(SplitInputs::tile(
                            inputs.parts,
                            steps,
                            rb,
                            kb,
                            p,
                            0,
                        ));
                        asm!(
                            "tileloadd tmm4, [{a0} + {sa}*1]",
                            "tileloadd tmm5, [{a1} + {sa}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            a0 = in(reg) a0,
                            a1 = in(reg) a0.add(512),
                            sa = in(reg) 64usize,
                            options(nostack, readonly)
                        );
                    }
                }
                let o = group_sums.as_mut_ptr();
                asm!(
                    "tilestored [{o0} + {s}*1], tmm0",
                    "tilestored [{o1} + {s}*1], tmm1",
                    "tilestored [{o2} + {s}*1], tmm2",
                    "tilestored [{o3} + {s}*1], tmm3",
                    o0 = in(reg) o,
                    o1 = in(reg) o.add(16),
                    o2 = in(reg) o.add(16 * BLOCK),
                    o3 = in(reg) o.add(16 * BLOCK + 16),
                    s = in(reg) BLOCK * 4,
                    options(nostack)
                );
                // out += s · group sum + b · Σx, per column.
                let sums = inputs.sums.as_ptr().add(rb * BLOCK * groups + g);
                for r in 0..BLOCK {
                    let xsum = _mm512_set1_ps(*sums.add(r * groups));
                    let gsum = group_sums.as_ptr().add(r * BLOCK);
                    let acc = out.as_mut_ptr().add((rb * BLOCK + r) * BLOCK);
                    let lo = _mm512_fmadd_ps(_mm512_loadu_ps(gsum), s0, _mm512_loadu_ps(acc));
                    let hi = _mm512_fmadd_ps(
                        _mm512_loadu_ps(gsum.add(16)),
                        s1,
                        _mm512_loadu_ps(acc.add(16)),
                    );
                    _mm512_storeu_ps(acc, _mm512_fmadd_ps(xsum, b0, lo));
                    _mm512_storeu_ps(acc.add(16), _mm512_fmadd_ps(xsum, b1, hi));
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::kernels::amx::skip_without_amx;
    use crate::quant::{QuantSpec, ScaleType};

    /// Against f64 sums over the dequantized weight: 4- and 8-bit codes, groups of 32 to 128, f16 and
    /// f32 scales, row counts that are and are not multiples of 32. The inputs' 16 significant bits
    /// (2⁻¹⁷ relative) and the tiles' f32 sums are the only differences: one bf16 part (2⁻⁹) would
    /// be 100 times outside the bound.
    #[test]
    fn matches_the_dequantized_product() {
        if skip_without_amx() {
            return;
        }
        let (n, k) = (64, 256);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 211) as f32 / 105.0 - 1.0) * 0.2 + (i % 5) as f32 * 0.01)
            .collect();
        for (bits, gs, store) in [
            (4, 32, ScaleType::F16),
            (4, 64, ScaleType::F32),
            (8, 32, ScaleType::F16),
            (8, 128, ScaleType::F32),
        ] {
            let spec = QuantSpec::new(bits, gs).expect("valid spec");
            let q = AffineWeight::quantize(&w, n, k, spec, store, "test").expect("quantizes");
            let mut deq = vec![0f32; k];
            let rows: Vec<Vec<f32>> = (0..n)
                .map(|r| {
                    q.dequantize_row(r, &mut deq);
                    deq.clone()
                })
                .collect();
            // 1,100 rows: two chunks of CHUNK_ROWS, the second partial.
            for t in [32, 45, 7, 1100] {
                let xs: Vec<f32> = (0..t * k)
                    .map(|i| {
                        ((i * 13 % 29) as f32 / 7.3) - 2.0 + (i / k) as f32 * 0.013 + 1e-4 / 3.0
                    })
                    .collect();
                // Split inputs against the exact ones; bf16 inputs against the same roundings in
                // the code terms (`s·q·bf16(x)`), the bias terms taking the f32 input sums.
                for (inputs, round) in [
                    (TileInputs::Split, (|x| x) as fn(f32) -> f32),
                    (TileInputs::Bf16, |x| half::bf16::from_f32(x).to_f32()),
                ] {
                    let mut ys = vec![f32::NAN; t * n];
                    assert!(affine_matmul(&q, &xs, &mut ys, inputs));
                    for i in 0..t {
                        for c in 0..n {
                            let (mut want, mut mag) = (0f64, 0f64);
                            for j in 0..k {
                                let x = xs[i * k + j];
                                let b = f64::from(q.biases.get(q.value_at(c, j / gs)));
                                let p = f64::from(round(x)) * (f64::from(rows[c][j]) - b)
                                    + f64::from(x) * b;
                                want += p;
                                mag += p.abs();
                            }
                            let got = f64::from(ys[i * n + c]);
                            assert!(
                                (got - want).abs() <= 1e-5 * mag,
                                "{inputs:?} {bits}-bit g{gs} t {t} row {i} col {c}: {got} vs {want} (sum of |terms| {mag})"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The parts hold each input to 2⁻¹⁷ of its size; padding rows are zero.
    #[test]
    fn parts_sum_to_the_input() {
        if skip_without_amx() {
            return;
        }
        let k = 64;
        let xs: Vec<f32> = (0..2 * k)
            .map(|i| (i as f32 * 0.7371 - 40.0).sin() * 10f32.powi(i as i32 % 9 - 4) + 1.0 / 3.0)
            .collect();
        let split = split_inputs(&xs, k, 32, 2, 2);
        assert_eq!(split.t_pad, 32);
        let f = |b: u16| f64::from(f32::from_bits(u32::from(b) << 16));
        let at = |p, r: usize, i: usize| {
            split.tiles
                [SplitInputs::tile(2, k / KSTEP, 0, i / KSTEP, p, r / 16) + r % 16 * 32 + i % 32]
        };
        let mut worst = 0f64;
        for (j, &x) in xs.iter().enumerate() {
            let parts: f64 = (0..2).map(|p| f(at(p, j / k, j % k))).sum();
            worst = worst.max((parts - f64::from(x)).abs() / f64::from(x).abs());
        }
        assert!(worst <= 2f64.powi(-17), "relative error {worst}");
        assert!(worst > 0.0, "these inputs need more than 16 bits");
        let want: f32 = xs[..32].iter().sum();
        assert!((split.sums[0] - want).abs() <= 1e-5 * want.abs().max(1.0));
        for r in 2..32 {
            for p in 0..2 {
                assert!(
                    (0..k).all(|i| at(p, r, i) == 0),
                    "padding row {r} of part {p} is zero"
                );
            }
        }
    }
}
