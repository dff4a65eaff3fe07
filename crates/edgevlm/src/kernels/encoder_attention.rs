//! Full (non-causal) multi-head self-attention of an encoder, in f32: every patch of a tile attends to
//! every patch of the same tile.
//!
//! The general path splits the heads out of the projections into `(batch, heads, seq, d)` copies,
//! materialises all scores of a batch at once (12 heads × 1,024² × 4 bytes = 48 MB per tile, freshly
//! allocated and page-faulted every layer), scales them in a separate pass, runs a scalar-`exp`
//! softmax, and transposes the result back. Here one task takes one block of queries of one head:
//! scores of that block (`QUERY_BLOCK × seq`, reused per worker) from the GEMM with the scale folded
//! in, a vectorised softmax in place, and the weighted sum of values written straight into the
//! output row layout the out-projection reads. Queries, keys and values are read where the
//! projection wrote them, at any row stride, so a fused QKV projection needs no split.

use rayon::prelude::*;

use super::elementwise::softmax_rows;
use super::fixed16::{self, Fixed16Weight};
use super::sgemm::{product, Strided};

/// Queries per task: scores of 128 queries over 1,024 keys are 512 KB.
const QUERY_BLOCK: usize = 128;

/// A `(rows, …)` matrix of f32 read with a row stride: row `i` starts at `data[offset + i * stride]`.
#[derive(Clone, Copy)]
pub struct StridedRows<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub stride: usize,
}

impl<'a> StridedRows<'a> {
    /// `len` values of row `r` from column `col`. Panics past the end of `data`.
    pub fn row(&self, r: usize, col: usize, len: usize) -> &'a [f32] {
        &self.data[self.offset + r * self.stride + col..][..len]
    }

    /// Value `col` of row `r`. Panics past the end of `data`.
    pub fn at(&self, r: usize, col: usize) -> f32 {
        self.data[self.offset + r * self.stride + col]
    }
}

/// The attention problem: `batch` sequences of `seq` positions, `heads` heads of `head_dim` values.
#[derive(Clone, Copy, Debug)]
pub struct EncoderAttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// One attention problem: `out[b, i, h·d..(h+1)·d] = Σ_j softmax_j(scale · q_i·k_j + key_bias[b, j])
/// v_j` for each head `h`, where row `b·seq + i` of `q`, `k`, `v` holds position `i` of sequence `b`
/// with head `h` at columns `h·d..(h+1)·d`. `key_bias` (`batch × seq`, 0 or -inf) masks padding keys.
/// `out` is `(batch·seq, heads·d)`, row-major.
#[derive(Clone, Copy)]
pub struct EncoderAttention<'a> {
    pub q: StridedRows<'a>,
    pub k: StridedRows<'a>,
    pub v: StridedRows<'a>,
    pub shape: EncoderAttentionShape,
    pub scale: f32,
    pub key_bias: Option<&'a [f32]>,
}

impl EncoderAttention<'_> {
    /// Panics if a slice, or `out`, is shorter than the shape says (callers build them from the same
    /// shape): the kernels' pointer arithmetic relies on it.
    pub fn check(&self, out: &[f32]) {
        let EncoderAttentionShape {
            batch,
            seq,
            heads,
            head_dim: d,
        } = self.shape;
        let (hd, rows) = (heads * d, batch * seq);
        for (name, m) in [("q", self.q), ("k", self.k), ("v", self.v)] {
            assert!(
                rows == 0 || m.offset + (rows - 1) * m.stride + hd <= m.data.len(),
                "{name} holds {} values, too few for {rows} rows of stride {}",
                m.data.len(),
                m.stride
            );
        }
        assert!(out.len() >= rows * hd, "output too short");
        if let Some(b) = self.key_bias {
            assert!(b.len() >= rows, "key bias too short");
        }
    }
}

/// The attention `a` into `out`. With `tiles`, on AMX where the CPU has it and the shape allows
/// (inputs rounded to bf16, f32 sums; see [`crate::kernels::amx::encoder_attention_tiles`]), or
/// where the CPU has AVX2 but no AMX in 16-bit integer products ([`fixed16_attention`]);
/// otherwise every product is f32.
///
/// Panics as [`EncoderAttention::check`] says.
pub fn encoder_attention(a: &EncoderAttention, tiles: bool, out: &mut [f32]) {
    a.check(out);
    if tiles && crate::kernels::amx::encoder_attention_tiles(a, out) {
        return;
    }
    if tiles && !crate::kernels::amx::available() && fixed16_attention(a, out) {
        return;
    }
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
    let hd = heads * d;
    let blocks = seq.div_ceil(QUERY_BLOCK);
    let out_addr = out.as_mut_ptr() as usize;
    thread_local! {
        static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    (0..batch * heads * blocks)
        .into_par_iter()
        .for_each(|task| {
            let b = task / (heads * blocks);
            let h = task / blocks % heads;
            let q0 = task % blocks * QUERY_BLOCK;
            let qn = QUERY_BLOCK.min(seq - q0);
            let row0 = b * seq;
            let col = h * d;
            SCORES.with_borrow_mut(|scores| {
                if scores.len() < qn * seq {
                    scores.resize(qn * seq, 0.0);
                }
                // SAFETY: every pointer and stride stays inside its slice, as asserted above: rows
                // row0+q0 .. row0+q0+qn of q and row0 .. row0+seq of k/v, columns col..col+d; the scores
                // buffer holds qn × seq values. The output block (rows row0+q0.., columns col..col+d) is
                // written by this task only (tasks differ in batch, head or query block).
                unsafe {
                    // scores (qn × seq) = scale · Q_blk (qn × d) · Kᵀ (d × seq)
                    product(
                        (qn, seq, d),
                        scores.as_mut_ptr(),
                        seq,
                        Strided::rows(
                            q.data.as_ptr().add(q.offset + (row0 + q0) * q.stride + col),
                            q.stride,
                        ),
                        Strided::columns(
                            k.data.as_ptr().add(k.offset + row0 * k.stride + col),
                            k.stride,
                        ),
                        scale,
                    );
                }
                let bias = key_bias.map(|kb| &kb[row0..row0 + seq]);
                softmax_rows(&mut scores[..qn * seq], seq, bias);
                // SAFETY: as above.
                unsafe {
                    // out block (qn × d) = P (qn × seq) · V (seq × d)
                    product(
                        (qn, d, seq),
                        (out_addr as *mut f32).add((row0 + q0) * hd + col),
                        hd,
                        Strided::rows(scores.as_ptr(), seq),
                        Strided::rows(
                            v.data.as_ptr().add(v.offset + row0 * v.stride + col),
                            v.stride,
                        ),
                        1.0,
                    );
                }
            })
        });
}

/// Queries per block of the 16-bit path: scores of 256 queries over 1,024 keys are 1 MB.
const FIXED16_QUERY_BLOCK: usize = 256;

/// Per worker: a block of queries gathered into rows, its scores, its outputs.
#[derive(Default)]
struct Fixed16Scratch {
    queries: Vec<f32>,
    scores: Vec<f32>,
    outputs: Vec<f32>,
}

/// The attention with both products as [`Fixed16Weight`] products (16-bit integer codes, exact
/// i32 sums per block of 32, f32 steps): per sequence and head, the keys are packed as the weight of
/// the scores (`scale` folded into its column scales) and the values, transposed, as the weight of
/// the outputs, once, and serve every block of queries; the softmax stays f32. `false` (nothing
/// written) where the CPU lacks AVX2.
///
/// The softmax numerators are rounded per block of 32 keys to 14 bits of the block's largest, the
/// queries per block of 32 values, each key and value column per head to 14 bits of its largest: on
/// the test problem below the outputs stay within 2e-3 of the exact attention, on SmolVLM's encoder
/// within the budget `tests/vision_without_amx.rs` asserts for the whole tower.
fn fixed16_attention(a: &EncoderAttention, out: &mut [f32]) -> bool {
    if !fixed16::available() {
        return false;
    }
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
    if seq == 0 || d == 0 {
        return true;
    }
    let hd = heads * d;
    let out_addr = out.as_mut_ptr() as usize;
    thread_local! {
        static SCRATCH: std::cell::RefCell<Fixed16Scratch> = std::cell::RefCell::default();
    }
    (0..batch * heads).into_par_iter().for_each(|task| {
        let (row0, col) = (task / heads * seq, task % heads * d);
        let keys = Fixed16Weight::pack(seq, d, |j, row| {
            row.copy_from_slice(k.row(row0 + j, col, d))
        });
        let values = Fixed16Weight::pack(d, seq, |c, row| {
            for (j, x) in row.iter_mut().enumerate() {
                *x = v.at(row0 + j, col + c);
            }
        });
        let (Some(mut keys), Some(values)) = (keys, values) else {
            return;
        };
        keys.scale_outputs(scale);
        let bias = key_bias.map(|kb| &kb[row0..row0 + seq]);
        let mut own = Fixed16Scratch::default();
        SCRATCH.with(|cell| {
            // The products below run on the pool: this thread may take up another head meanwhile,
            // which then uses its own buffers.
            let mut held = cell.try_borrow_mut();
            let s = match held.as_deref_mut() {
                Ok(s) => s,
                Err(_) => &mut own,
            };
            for q0 in (0..seq).step_by(FIXED16_QUERY_BLOCK) {
                let qn = FIXED16_QUERY_BLOCK.min(seq - q0);
                s.queries.clear();
                for i in 0..qn {
                    s.queries.extend_from_slice(q.row(row0 + q0 + i, col, d));
                }
                s.scores.resize(qn * seq, 0.0);
                s.outputs.resize(qn * d, 0.0);
                let scored = keys.matmul(&s.queries, &mut s.scores);
                softmax_rows(&mut s.scores, seq, bias);
                let summed = values.matmul(&s.scores, &mut s.outputs);
                debug_assert!(scored && summed, "16-bit products refused their shapes");
                for (i, o) in s.outputs.chunks_exact(d).enumerate() {
                    // SAFETY: row row0 + q0 + i < batch · seq and columns col..col + d < hd lie
                    // inside `out` (checked by `EncoderAttention::check`); only this task writes
                    // this head's columns of this sequence.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            o.as_ptr(),
                            (out_addr as *mut f32).add((row0 + q0 + i) * hd + col),
                            d,
                        );
                    }
                }
            }
        });
    });
    true
}

/// A test problem for the encoder attention kernels and its f64 reference.
#[cfg(test)]
pub(crate) mod testing {
    use super::{EncoderAttention, EncoderAttentionShape, StridedRows};

    /// `batch` sequences with q/k/v interleaved in one fused row (stride `3·heads·d + extra`), values
    /// from a fixed pattern divided by `divisor`, the last `pad` keys of the second sequence masked.
    pub struct Problem {
        pub fused: Vec<f32>,
        pub bias: Vec<f32>,
        pub stride: usize,
        pub shape: EncoderAttentionShape,
        pub scale: f32,
    }

    impl Problem {
        pub fn new(shape: EncoderAttentionShape, extra: usize, pad: usize, divisor: f32) -> Self {
            let EncoderAttentionShape {
                batch,
                seq,
                heads,
                head_dim: d,
            } = shape;
            let stride = 3 * heads * d + extra;
            let fused = (0..batch * seq * stride)
                .map(|i| ((i * 7919 % 211) as f32 - 105.0) / divisor)
                .collect();
            let mut bias = vec![0f32; batch * seq];
            for b in &mut bias[2 * seq - pad..2 * seq] {
                *b = f32::NEG_INFINITY;
            }
            Self {
                fused,
                bias,
                stride,
                shape,
                scale: 1.0 / (d as f32).sqrt(),
            }
        }

        /// The problem as the kernels take it.
        pub fn attention(&self) -> EncoderAttention<'_> {
            EncoderAttention {
                q: self.view(0),
                k: self.view(1),
                v: self.view(2),
                shape: self.shape,
                scale: self.scale,
                key_bias: Some(&self.bias),
            }
        }

        /// Queries (`part` 0), keys (1) or values (2).
        pub fn view(&self, part: usize) -> StridedRows<'_> {
            StridedRows {
                data: &self.fused,
                offset: part * self.shape.heads * self.shape.head_dim,
                stride: self.stride,
            }
        }

        /// The attention in f64 with `round` applied to the scaled queries, the keys, the softmax
        /// numerators and the values (identity: the exact attention), `(batch·seq, heads·d)`.
        pub fn reference(&self, round: &dyn Fn(f32) -> f64) -> Vec<f64> {
            let EncoderAttentionShape {
                batch,
                seq,
                heads,
                head_dim: d,
            } = self.shape;
            let hd = heads * d;
            let at = |part: usize, r: usize, c: usize| self.fused[r * self.stride + part * hd + c];
            let mut out = vec![0f64; batch * seq * hd];
            for b in 0..batch {
                for h in 0..heads {
                    for i in 0..seq {
                        let r = b * seq + i;
                        let s: Vec<f64> = (0..seq)
                            .map(|j| {
                                let dot: f64 = (0..d)
                                    .map(|c| {
                                        round(at(0, r, h * d + c) * self.scale)
                                            * round(at(1, b * seq + j, h * d + c))
                                    })
                                    .sum();
                                dot + f64::from(self.bias[b * seq + j])
                            })
                            .collect();
                        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                        let z: f64 = e.iter().sum();
                        for c in 0..d {
                            out[r * hd + h * d + c] = (0..seq)
                                .map(|j| round(e[j] as f32) * round(at(2, b * seq + j, h * d + c)))
                                .sum::<f64>()
                                / z;
                        }
                    }
                }
            }
            out
        }
    }

    /// The largest absolute difference between a kernel's output and a reference.
    pub fn worst(out: &[f32], want: &[f64]) -> f64 {
        out.iter()
            .zip(want)
            .fold(0f64, |m, (&o, &w)| m.max((f64::from(o) - w).abs()))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{worst, Problem};
    use super::*;

    /// Against an f64 reference: two sequences of 150 positions (two query blocks, the second
    /// partial), 3 heads of 40, q/k/v interleaved in one fused row of stride 3·120 + 5, padding keys
    /// masked in the second sequence.
    #[test]
    fn matches_reference() {
        let shape = EncoderAttentionShape {
            batch: 2,
            seq: 150,
            heads: 3,
            head_dim: 40,
        };
        let p = Problem::new(shape, 5, 10, 60.0);
        let mut out = vec![0f32; 2 * 150 * 120];
        encoder_attention(&p.attention(), false, &mut out);
        let worst = worst(&out, &p.reference(&|x| x.into()));
        assert!(worst < 1e-5, "max |error| {worst}");
    }

    /// The 16-bit path on the same problem: within 2e-3 of the exact attention, and the same bits
    /// on one thread as on two.
    #[test]
    fn fixed16_matches_reference() {
        if !fixed16::available() {
            eprintln!("skipped: no AVX2");
            return;
        }
        let shape = EncoderAttentionShape {
            batch: 2,
            seq: 150,
            heads: 3,
            head_dim: 40,
        };
        let p = Problem::new(shape, 5, 10, 60.0);
        let run = || {
            let mut out = vec![0f32; 2 * 150 * 120];
            assert!(fixed16_attention(&p.attention(), &mut out));
            out
        };
        let out = run();
        let worst = worst(&out, &p.reference(&|x| x.into()));
        eprintln!("16-bit attention: max |error| {worst:.2e}");
        assert!(worst < 2e-3 && worst > 0.0, "max |error| {worst}");
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("pool");
        assert_eq!(one.install(run), out);
    }
}
