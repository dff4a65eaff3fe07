//! Encoder self-attention (every position of a sequence attends to every other) on AMX tiles: the
//! two products of each head, `S = scale · Q·Kᵀ` and `O = P·V`, with queries, keys, values and the
//! softmax numerators `P` rounded to bf16 and every sum in f32 — as the vision encoder's projections
//! on this path round their inputs. The softmax itself (maximum, `exp`, sum) runs in f32; `P` is left
//! unnormalised and each output row is divided by its f32 sum at the end.
//!
//! One task takes one head of one sequence (or a part of its queries, where heads × sequences are
//! fewer than twice the threads): it packs that head's keys and values once into the tile order
//! `tdpbf16ps` reads its second operand in (keys as the columns of `S`, values as the columns of
//! `O`), then runs 32 queries at a time through `S`, the softmax and `O`, with every buffer
//! (packed keys and values, 32 rows of scores and of `P`) reused per worker: 448 KB at 1,024
//! positions of 64 values.

use rayon::prelude::*;

use super::available;
use crate::kernels::encoder_attention::{EncoderAttention, EncoderAttentionShape};

/// Queries per step, and the multiple of 32 that sequence length and head size must be.
const BLOCK: usize = 32;

/// Per-worker buffers, grown to the largest shape seen.
#[derive(Default)]
struct Scratch {
    /// Keys in tile order as the `(seq, d)` second operand of `S`.
    keys: Vec<u16>,
    /// Values in tile order as the `(d, seq)` second operand of `O`.
    values: Vec<u16>,
    /// 32 scaled queries, row-major `(32, d)` bf16.
    queries: Vec<u16>,
    /// 32 rows of scores, then of softmax numerators, f32 `(32, seq)`.
    scores: Vec<f32>,
    /// The numerators in bf16, row-major `(32, seq)`.
    weights: Vec<u16>,
    /// Two key or value rows in bf16, while packing.
    rows: Vec<u16>,
}

/// The attention of [`crate::kernels::encoder_attention::encoder_attention`] on AMX tiles. Returns
/// false (and leaves `out` alone) where AMX is not available or the shape is not one it takes
/// (sequence length and head size multiples of 32).
///
/// Panics as [`EncoderAttention::check`] says.
pub fn encoder_attention_tiles(a: &EncoderAttention, out: &mut [f32]) -> bool {
    let EncoderAttention {
        q,
        k,
        v,
        shape,
        scale,
        key_bias,
    } = *a;
    let EncoderAttentionShape {
        batch,
        seq,
        heads,
        head_dim: d,
    } = shape;
    if !available() || seq == 0 || d == 0 || !seq.is_multiple_of(BLOCK) || !d.is_multiple_of(BLOCK)
    {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        a.check(out);
        let hd = heads * d;
        let out_addr = out.as_mut_ptr() as usize;
        thread_local! {
            static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
        }
        // Fewer heads × sequences than twice the threads: each head's queries split in parts (each
        // part packs the head's keys and values again, a few % of its work).
        let blocks = seq / BLOCK;
        let splits = (2 * rayon::current_num_threads())
            .div_ceil(batch * heads)
            .clamp(1, blocks);
        (0..batch * heads * splits)
            .into_par_iter()
            .for_each(|task| {
                let (b, h, part) = (
                    task / (heads * splits),
                    task / splits % heads,
                    task % splits,
                );
                let queries = blocks * part / splits * BLOCK..blocks * (part + 1) / splits * BLOCK;
                let row0 = b * seq;
                let col = h * d;
                SCRATCH.with_borrow_mut(|s| {
                    s.keys.resize(seq * d, 0);
                    s.values.resize(seq * d, 0);
                    s.queries.resize(BLOCK * d, 0);
                    s.scores.resize(BLOCK * seq, 0.0);
                    s.weights.resize(BLOCK * seq, 0);
                    s.rows.resize(2 * d, 0);
                    pack_keys(|j| k.row(row0 + j, col, d), seq, &mut s.rows, &mut s.keys);
                    pack_values(|j| v.row(row0 + j, col, d), seq, &mut s.rows, &mut s.values);
                    let bias = key_bias.map(|kb| &kb[row0..row0 + seq]);
                    for q0 in queries.clone().step_by(BLOCK) {
                        for (i, dst) in s.queries.chunks_exact_mut(d).enumerate() {
                            for (y, &x) in dst.iter_mut().zip(q.row(row0 + q0 + i, col, d)) {
                                *y = super::to_bf16_bits(x * scale);
                            }
                        }
                        // SAFETY: AMX is available (checked above). `queries` is 32 × d and `keys` the
                        // seq × d weight in tile order, so the product's loads stay inside them; it
                        // writes the 32 × seq `scores`.
                        unsafe {
                            super::tiles::block(
                                s.queries.as_ptr(),
                                s.keys.as_ptr(),
                                s.scores.as_mut_ptr(),
                                (0, BLOCK),
                                (0, seq),
                                seq,
                                d,
                                d / super::KSTEP,
                            );
                        }
                        let mut sums = [0f32; BLOCK];
                        for ((row, w), sum) in s
                            .scores
                            .chunks_exact_mut(seq)
                            .zip(s.weights.chunks_exact_mut(seq))
                            .zip(&mut sums)
                        {
                            *sum = crate::kernels::elementwise::softmax_numerators(row, bias);
                            super::to_bf16_slice(row, w);
                        }
                        let o = (out_addr as *mut f32).wrapping_add((row0 + q0) * hd + col);
                        // SAFETY: as above, `weights` is 32 × seq and `values` the d × seq weight in tile
                        // order. The output block, rows row0+q0.. (32 of them, inside the batch·seq rows
                        // of `out`) and columns col..col+d, is written by this task only (tasks differ in
                        // sequence or head).
                        unsafe {
                            super::tiles::block(
                                s.weights.as_ptr(),
                                s.values.as_ptr(),
                                o,
                                (0, BLOCK),
                                (0, d),
                                hd,
                                seq,
                                seq / super::KSTEP,
                            );
                            for (i, sum) in sums.iter().enumerate() {
                                let row = std::slice::from_raw_parts_mut(o.add(i * hd), d);
                                let inv = 1.0 / sum;
                                for x in row {
                                    *x *= inv;
                                }
                            }
                        }
                    }
                })
            });
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (q, k, v, scale, key_bias, out, batch, heads);
        false
    }
}

/// Keys as the `(n = seq, k = d)` second operand of `S = Q·Kᵀ`: tile `(16-key block kb, 32-value
/// step ds)` holds `[pair p][key c]` as u32 pairs `(K[16kb + c][32ds + 2p], K[16kb + c][32ds + 2p +
/// 1])`. Each key row is rounded to bf16 first (into `row`, d values), sixteen at a time, and then
/// lies in pairs already.
fn pack_keys<'a>(key: impl Fn(usize) -> &'a [f32], seq: usize, row: &mut [u16], dst: &mut [u16]) {
    let d = key(0).len();
    let row = &mut row[..d];
    for (kb, block) in dst.chunks_exact_mut(16 * d).enumerate().take(seq / 16) {
        for c in 0..16 {
            super::to_bf16_slice(key(16 * kb + c), row);
            for (tile, pairs) in block.chunks_exact_mut(512).zip(row.chunks_exact(32)) {
                for (p, pair) in pairs.chunks_exact(2).enumerate() {
                    tile[(p * 16 + c) * 2..][..2].copy_from_slice(pair);
                }
            }
        }
    }
}

/// Values as the `(n = d, k = seq)` second operand of `O = P·V`: tile `(16-value block vb, 32-key
/// step ks)` holds `[pair p][value c]` as u32 pairs of `V[32ks + 2p][16vb + c]` and the same value of
/// the next key. Two key rows are rounded to bf16 at a time (into `rows`, 2·d values) and
/// interleaved: each tile row is then 16 consecutive pairs.
fn pack_values<'a>(
    value: impl Fn(usize) -> &'a [f32],
    seq: usize,
    rows: &mut [u16],
    dst: &mut [u16],
) {
    let steps = seq / 32;
    let d = value(0).len();
    let (even, odd) = rows[..2 * d].split_at_mut(d);
    for j in (0..seq).step_by(2) {
        super::to_bf16_slice(value(j), even);
        super::to_bf16_slice(value(j + 1), odd);
        let (ks, p) = (j / 32, j % 32 / 2);
        for (vb, (even, odd)) in even.chunks_exact(16).zip(odd.chunks_exact(16)).enumerate() {
            let at = ((vb * steps + ks) * 16 + p) * 32;
            for (c, pair) in dst[at..at + 32].chunks_exact_mut(2).enumerate() {
                pair[0] = even[c];
                pair[1] = odd[c];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::amx::skip_without_amx;
    use crate::kernels::encoder_attention::testing::{worst, Problem};
    use half::bf16;

    /// Against an f64 reference of the same bf16 roundings: two sequences of 96 positions, 2 heads of
    /// 64, q/k/v interleaved in one fused row of stride 3·128 + 8, padding keys masked in the second
    /// sequence.
    #[test]
    fn matches_the_bf16_rounded_reference() {
        if skip_without_amx() {
            return;
        }
        let shape = EncoderAttentionShape {
            batch: 2,
            seq: 96,
            heads: 2,
            head_dim: 64,
        };
        let p = Problem::new(shape, 8, 16, 40.0);
        let run = || {
            let mut out = vec![f32::NAN; 2 * 96 * 128];
            assert!(encoder_attention_tiles(&p.attention(), &mut out));
            out
        };
        let out = run();
        // On three threads each head's three query blocks split in two parts (one and two blocks):
        // the same values.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("a pool");
        assert_eq!(pool.install(run), out);
        // Only f32 accumulation (and the exp polynomial) differ from the rounded reference; the
        // bf16 roundings themselves move the result by about 1e-2 of these values (|v| < 2.7).
        let r16 =
            |x: f32| f64::from(bf16::from_bits(crate::kernels::amx::to_bf16_bits(x)).to_f32());
        let rounded = worst(&out, &p.reference(&r16));
        assert!(
            rounded < 2e-5,
            "max |error| against the bf16-rounded reference {rounded}"
        );
        let exact = worst(&out, &p.reference(&|x| x.into()));
        assert!(exact < 3e-2, "max |error| against f32 attention {exact}");
    }
}
