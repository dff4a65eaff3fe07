//! Products with bf16 weights on Intel AMX (Sapphire Rapids and later): `ys (t × n) = xs (t × k) · Wᵀ`
//! for a row-major `(n, k)` bf16 weight, the inputs rounded to bf16 (round to nearest even), every
//! product and sum in f32 on the tile unit (`tdpbf16ps`).
//!
//! This is the vision encoder's path on such CPUs: its weights are bf16 in the checkpoint, so the
//! only rounding is of the activations (relative 2⁻⁹ per element, with f32 accumulation — finer than
//! running the model in bf16 as PyTorch does). One AMX instruction does 16 × 16 × 32 multiply-adds.
//! The encoder's attention runs on the same tiles ([`encoder_attention_tiles`]), and so do quantized
//! products of many rows ([`affine_matmul`]).
//!
//! Layout: the weight is packed once, at load ([`TileWeight`]), into 16-column × 32-input tiles in the
//! pair-interleaved order `tdpbf16ps` reads (`[n/16][k/32][16 pairs][16 columns][2]`); the inputs are
//! converted to a bf16 copy per product (rows padded to 32). The work is split over the thread pool in blocks of 256 rows × 128
//! columns; each block runs 32 × 32 output tiles (four accumulators, two input and two weight tiles).
//! The instructions are written as inline assembly (Rust's AMX intrinsics are not stable), and Linux
//! must grant the process the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), asked once.

use half::bf16;
use rayon::prelude::*;

mod affine;
mod attention;

pub use affine::{affine_matmul, TileInputs};
pub use attention::encoder_attention_tiles;

/// Rows and columns of one output tile pair (two 16-row × 16-column accumulators each way).
const TILE: usize = 32;
/// Inputs per tile step (16 pairs of bf16).
const KSTEP: usize = 32;
/// Rows and columns of output per parallel task.
const TASK_ROWS: usize = 256;
const TASK_COLS: usize = 128;

/// Whether AMX-BF16 can be used here: the CPU has it, Linux granted the tile state, and
/// `EDGEVLM_NO_AMX` is not set. Checked once.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| std::env::var_os("EDGEVLM_NO_AMX").is_none() && detect())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    const SYS_ARCH_PRCTL: i64 = 158;
    let ret: i64;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) only changes which register state the kernel
    // lets this process use; it reads no memory. The syscall clobbers rcx and r11.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// Whether [`TileWeight`] holds an `(n, k)` weight without padding (any other non-empty shape is
/// padded with zeros to multiples of 32).
pub fn supports(n: usize, k: usize) -> bool {
    n > 0 && k > 0 && n.is_multiple_of(TILE) && k.is_multiple_of(KSTEP)
}

/// Round to the nearest bf16, ties to even (NaN stays NaN).
#[inline]
pub(super) fn to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// Sixteen f32 to their nearest bf16 (ties to even; NaN stays NaN, as in [`to_bf16_bits`]) and the
/// remainders `v - bf16(v)`, which are exact.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn round_bf16(
    v: std::arch::x86_64::__m512,
) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m512) {
    use std::arch::x86_64::*;
    let u = _mm512_castps_si512(v);
    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(u), _mm512_set1_epi32(1));
    let top = _mm512_srli_epi32::<16>(_mm512_add_epi32(
        u,
        _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd),
    ));
    // A NaN keeps its top half, made quiet (the rounding add could carry it into infinity).
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(u), _mm512_set1_epi32(0x40));
    let top = _mm512_mask_mov_epi32(top, nan, quiet);
    let rounded = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(top));
    (_mm512_cvtepi32_epi16(top), _mm512_sub_ps(v, rounded))
}

/// `dst[i] = bf16(src[i])` ([`to_bf16_bits`]), sixteen at a time with AVX-512 (which every CPU with
/// AMX has).
pub(super) fn to_bf16_slice(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::has_avx512f() {
        // SAFETY: the CPU has AVX-512F; every load and store is of 16 values below `n`.
        unsafe { done = to_bf16_avx512(&src[..n], &mut dst[..n]) };
    }
    for (d, &s) in dst[done..n].iter_mut().zip(&src[done..n]) {
        *d = to_bf16_bits(s);
    }
}

/// The whole multiples of 16 of [`to_bf16_slice`]; returns how many were converted.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn to_bf16_avx512(src: &[f32], dst: &mut [u16]) -> usize {
    use std::arch::x86_64::*;
    let n = src.len() / 16 * 16;
    for i in (0..n).step_by(16) {
        let (bits, _) = round_bf16(_mm512_loadu_ps(src.as_ptr().add(i)));
        _mm256_storeu_si256(dst.as_mut_ptr().add(i).cast(), bits);
    }
    n
}

/// A bf16 `(n, k)` weight in the order the tile products read it, packed once (at load) from the
/// row-major checkpoint layout: the same bytes, reordered. Tile `(nb, kb)` holds columns `16nb..`
/// and inputs `32kb..` as `[pair p][column c][element e] = W[16nb + c][32kb + 2p + e]`. Sizes that
/// are not multiples of 32 are padded with zero columns and inputs (`n_pad`, `k_pad`): Qwen2.5-VL's
/// 3,420-wide vision MLP runs on the tiles too.
#[derive(Debug, Clone)]
pub struct TileWeight {
    n: usize,
    k: usize,
    n_pad: usize,
    k_pad: usize,
    tiles: Vec<u16>,
}

impl TileWeight {
    /// `None` where the shape is empty or `w` is not `n × k` values.
    pub fn pack(w: &[bf16], n: usize, k: usize) -> Option<Self> {
        if n == 0 || k == 0 || w.len() != n * k {
            return None;
        }
        let (n_pad, k_pad) = (n.div_ceil(TILE) * TILE, k.div_ceil(KSTEP) * KSTEP);
        let mut tiles = vec![0u16; n_pad * k_pad];
        tiles
            .par_chunks_mut(16 * k_pad)
            .enumerate()
            .for_each(|(nb, dst)| {
                for (kb, tile) in dst.chunks_exact_mut(16 * KSTEP).enumerate() {
                    for c in (0..16).filter(|c| 16 * nb + c < n) {
                        let row = &w[(16 * nb + c) * k..][..k];
                        for e in (0..KSTEP).filter(|e| kb * KSTEP + e < k) {
                            tile[(e / 2 * 16 + c) * 2 + e % 2] = row[kb * KSTEP + e].to_bits();
                        }
                    }
                }
            });
        Some(Self {
            n,
            k,
            n_pad,
            k_pad,
            tiles,
        })
    }

    /// Output size `n`.
    pub fn out_dim(&self) -> usize {
        self.n
    }

    /// Input size `k`.
    pub fn in_dim(&self) -> usize {
        self.k
    }

    /// Row `r` of `W` in f32 (exact), into `out[..k]`: for products of a few rows off the tiles.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let c = r % 16;
        let block = &self.tiles[r / 16 * 16 * self.k_pad..][..16 * self.k_pad];
        for (tile, dst) in block
            .chunks_exact(16 * KSTEP)
            .zip(out[..self.k].chunks_mut(KSTEP))
        {
            for (e, v) in dst.iter_mut().enumerate() {
                *v = f32::from_bits(u32::from(tile[(e / 2 * 16 + c) * 2 + e % 2]) << 16);
            }
        }
    }

    /// Weights of the same input size stacked row-wise (a fused projection: outputs side by side);
    /// `None` when the input sizes differ, some part has padded outputs, or there are none.
    pub fn stack(parts: &[&TileWeight]) -> Option<TileWeight> {
        let (k, k_pad) = (parts.first()?.k, parts.first()?.k_pad);
        if parts.iter().any(|p| p.k != k || p.n != p.n_pad) {
            return None;
        }
        let n = parts.iter().map(|p| p.n).sum();
        Some(TileWeight {
            n,
            k,
            n_pad: n,
            k_pad,
            tiles: parts.iter().flat_map(|p| p.tiles.iter().copied()).collect(),
        })
    }

    /// `ys (t × n) = xs (t × k) · Wᵀ` on the tiles, inputs rounded to bf16. Returns false (and leaves
    /// `ys` alone) where AMX is not available or the sizes do not fit.
    pub fn matmul(&self, xs: &[f32], ys: &mut [f32]) -> bool {
        let (n, k, n_pad, k_pad) = (self.n, self.k, self.n_pad, self.k_pad);
        if !available() || !xs.len().is_multiple_of(k) {
            return false;
        }
        let t = xs.len() / k;
        if t == 0 || ys.len() != t * n {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let t_pad = t.div_ceil(TILE) * TILE;
            // Inputs in bf16, padded rows and inputs zero.
            let mut a = vec![0u16; t_pad * k_pad];
            if k == k_pad {
                a.par_chunks_mut(k * 64)
                    .zip(xs.par_chunks(k * 64))
                    .for_each(|(dst, src)| to_bf16_slice(src, dst));
            } else {
                a.par_chunks_mut(k_pad)
                    .zip(xs.par_chunks(k))
                    .for_each(|(dst, src)| to_bf16_slice(src, &mut dst[..k]));
            }
            let (b, kb_count) = (&self.tiles, k_pad / KSTEP);
            // Output rows and columns padded too, where `t` or `n` is not a multiple of 32.
            let direct = t_pad == t && n_pad == n;
            let mut padded = if direct {
                Vec::new()
            } else {
                vec![0f32; t_pad * n_pad]
            };
            let out_addr = if direct {
                ys.as_mut_ptr() as usize
            } else {
                padded.as_mut_ptr() as usize
            };
            let tasks: Vec<(usize, usize)> = (0..t_pad)
                .step_by(TASK_ROWS)
                .flat_map(|r| (0..n_pad).step_by(TASK_COLS).map(move |c| (r, c)))
                .collect();
            tasks.into_par_iter().for_each(|(r0, c0)| {
                let rows = TASK_ROWS.min(t_pad - r0);
                let cols = TASK_COLS.min(n_pad - c0);
                // SAFETY: AMX is available (checked above); every tile load reads inside `a` (rows
                // r0.. < t_pad, k columns) or `b` (column blocks < n/16, kb < k/32), and every
                // store writes the disjoint block rows r0..r0+rows, columns c0..c0+cols of the
                // t_pad × n output, which outlives the task.
                unsafe {
                    tiles::block(
                        a.as_ptr(),
                        b.as_ptr(),
                        out_addr as *mut f32,
                        (r0, rows),
                        (c0, cols),
                        n_pad,
                        k_pad,
                        kb_count,
                    );
                }
            });
            if !direct {
                for (dst, src) in ys.chunks_exact_mut(n).zip(padded.chunks_exact(n_pad)) {
                    dst.copy_from_slice(&src[..n]);
                }
            }
            true
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod tiles {
    use super::{KSTEP, TILE};
    use std::arch::asm;

    /// The tile configuration: palette 1, eight tiles of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    pub(super) struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    pub(super) const CONFIG: Config = Config {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// Output rows `r0..r0 + rows` × columns `c0..c0 + cols` (multiples of 32) of `out` (row stride
    /// `out_stride` f32): tiles 0-3 accumulate a 32 × 32 block, tiles 4-5 hold 16 × 32 input slices (rows of `a`,
    /// stride `k` bf16), tiles 6-7 two 16-column weight tiles of `b`.
    ///
    /// # Safety
    /// AMX tile state is granted; the ranges lie inside `a` (`t_pad × k`), `b` (`n × k`, tile order)
    /// and `out` (rows `r0..r0 + rows` at stride `out_stride`, columns `c0..c0 + cols`).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn block(
        a: *const u16,
        b: *const u16,
        out: *mut f32,
        (r0, rows): (usize, usize),
        (c0, cols): (usize, usize),
        out_stride: usize,
        k: usize,
        kb_count: usize,
    ) {
        asm!("ldtilecfg [{0}]", in(reg) &CONFIG as *const Config, options(nostack, readonly));
        let a_stride = k * 2;
        for j in (c0..c0 + cols).step_by(TILE) {
            // Weight tiles of column blocks j/16 and j/16 + 1: 16 × KSTEP bf16 = 1 KB each.
            let b0 = b.add((j / 16) * kb_count * 16 * KSTEP);
            let b1 = b0.add(kb_count * 16 * KSTEP);
            for i in (r0..r0 + rows).step_by(TILE) {
                let a0 = a.add(i * k);
                let a1 = a0.add(16 * k);
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                for kb in 0..kb_count {
                    asm!(
                        "tileloadd tmm4, [{a0} + {sa}*1]",
                        "tileloadd tmm5, [{a1} + {sa}*1]",
                        "tileloadd tmm6, [{b0} + {sb}*1]",
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0.add(kb * KSTEP),
                        a1 = in(reg) a1.add(kb * KSTEP),
                        b0 = in(reg) b0.add(kb * 16 * KSTEP),
                        b1 = in(reg) b1.add(kb * 16 * KSTEP),
                        sa = in(reg) a_stride,
                        sb = in(reg) 64usize,
                        options(nostack, readonly)
                    );
                }
                let o = out.add(i * out_stride + j);
                asm!(
                    "tilestored [{o0} + {s}*1], tmm0",
                    "tilestored [{o1} + {s}*1], tmm1",
                    "tilestored [{o2} + {s}*1], tmm2",
                    "tilestored [{o3} + {s}*1], tmm3",
                    o0 = in(reg) o,
                    o1 = in(reg) o.add(16),
                    o2 = in(reg) o.add(16 * out_stride),
                    o3 = in(reg) o.add(16 * out_stride + 16),
                    s = in(reg) out_stride * 4,
                    options(nostack)
                );
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// For tests of the tile kernels: true (after saying why) where they cannot run here.
#[cfg(test)]
pub(super) fn skip_without_amx() -> bool {
    let skip = !available();
    if skip {
        eprintln!("skipped: no AMX-BF16 on this CPU (or EDGEVLM_NO_AMX is set)");
    }
    skip
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against f64 sums of the bf16-rounded inputs and weights: the tile unit's f32 accumulation is
    /// the only difference. Row counts that are and are not multiples of 32.
    #[test]
    fn matches_the_bf16_rounded_product() {
        if skip_without_amx() {
            return;
        }
        // The second shape is padded (neither size a multiple of 32).
        for (n, k) in [(96, 160), (52, 100)] {
            let w: Vec<bf16> = (0..n * k)
                .map(|i| bf16::from_f32(((i * 7919 % 211) as f32 / 105.0 - 1.0) * 0.3))
                .collect();
            for t in [32, 45, 300] {
                let xs: Vec<f32> = (0..t * k)
                    .map(|i| ((i * 13 % 29) as f32 / 7.3) - 2.0 + (i / k) as f32 * 0.01)
                    .collect();
                let mut ys = vec![f32::NAN; t * n];
                let tw = TileWeight::pack(&w, n, k).expect("a supported shape");
                assert!(tw.matmul(&xs, &mut ys));
                for i in 0..t {
                    for c in 0..n {
                        let (mut want, mut mag) = (0f64, 0f64);
                        for j in 0..k {
                            let x =
                                f64::from(bf16::from_bits(to_bf16_bits(xs[i * k + j])).to_f32());
                            let p = x * f64::from(w[c * k + j].to_f32());
                            want += p;
                            mag += p.abs();
                        }
                        let got = f64::from(ys[i * n + c]);
                        assert!(
                            (got - want).abs() <= 1e-6 * mag + 1e-6,
                            "({n}, {k}) t {t} row {i} col {c}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn packed_rows_read_back_and_stack() {
        let (n, k) = (64, 96);
        let w: Vec<bf16> = (0..n * k)
            .map(|i| bf16::from_f32(i as f32 - 3000.0))
            .collect();
        let tw = TileWeight::pack(&w, n, k).expect("a supported shape");
        let two = TileWeight::stack(&[&tw, &tw]).expect("same input size");
        let mut row = vec![0f32; k];
        for r in 0..2 * n {
            two.row_f32(r, &mut row);
            let want: Vec<f32> = w[r % n * k..][..k].iter().map(|v| v.to_f32()).collect();
            assert_eq!(row, want, "row {r}");
        }
        assert_eq!((two.out_dim(), two.in_dim()), (2 * n, k));
        // Padded: 48 outputs, 90 inputs read back exactly, and not stacked (padded outputs).
        let (n, k) = (48, 90);
        let tw = TileWeight::pack(&w[..n * k], n, k).expect("padded");
        let mut row = vec![0f32; k];
        for r in 0..n {
            tw.row_f32(r, &mut row);
            let want: Vec<f32> = w[r * k..][..k].iter().map(|v| v.to_f32()).collect();
            assert_eq!(row, want, "padded row {r}");
        }
        assert!(TileWeight::stack(&[&tw, &tw]).is_none());
        assert!(TileWeight::pack(&w[..10], 3, 4).is_none());
    }

    #[test]
    fn slices_round_like_single_values() {
        // Ties both ways, subnormals, infinities, quiet and signalling NaNs (whose rounding add would
        // carry into infinity), and a tail that is not a multiple of 16.
        let mut src = vec![
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xffff_ffff),
        ];
        src.extend(
            (0..300u32)
                .map(|i| f32::from_bits(0x3f80_0000u32.wrapping_add(i.wrapping_mul(0x8000_1234)))),
        );
        let mut dst = vec![0u16; src.len()];
        to_bf16_slice(&src, &mut dst);
        for (&s, &d) in src.iter().zip(&dst) {
            assert_eq!(d, to_bf16_bits(s), "{s:e} ({:#x})", s.to_bits());
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even 1.0.
        assert_eq!(to_bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(bf16::from_bits(to_bf16_bits(f32::NAN)).is_nan());
        assert!(!supports(48, 64) && supports(64, 64) && !supports(64, 48));
    }
}
