//! Attention over the KV cache, grouped-query, in f32: one new position (decode), or a block of new
//! positions under the causal mask (a prompt, [`prefill_attention`]).
//!
//! The general path multiplies `(rep, d) × (d, len)` and `(rep, len) × (len, d)` matrices through the
//! GEMM, whose set-up dominates at these sizes (the scores of one token are a few hundred values per
//! head). Here each query head is one task: a dot product per cached key, a softmax in f32 (as HF's
//! eager and SDPA paths compute it), and a weighted sum of the cached values.

use rayon::prelude::*;

use super::has_avx2;
use super::sgemm::{product, Strided};

/// Keys or values of one layer: position `j` of KV head `h` starts at `h * head_stride + j * d`.
#[derive(Clone, Copy)]
pub struct CacheView<'a> {
    pub data: &'a [f32],
    pub head_stride: usize,
}

/// The cached keys and values one position attends to: `len` positions of `kv_heads` heads.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub k: CacheView<'a>,
    pub v: CacheView<'a>,
    pub kv_heads: usize,
    pub len: usize,
}

// Plain loops, no closures or iterator adapters: those would be compiled outside the `avx2,fma`
// wrapper below and turn `mul_add` into a library call.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        for j in 0..8 {
            acc[j] = a[i + j].mul_add(b[i + j], acc[j]);
        }
        i += 8;
    }
    let mut s = 0f32;
    while i < n {
        s = a[i].mul_add(b[i], s);
        i += 1;
    }
    for v in acc {
        s += v;
    }
    s
}

/// One query head: `out = softmax(scale · K q) V` over positions `0..len`.
#[inline(always)]
fn head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    len: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let d = q.len();
    scores.resize(len, 0.0);
    let mut max = f32::NEG_INFINITY;
    for j in 0..len {
        let s = dot(q, &k[j * d..(j + 1) * d]) * scale;
        scores[j] = s;
        max = max.max(s);
    }
    let inv = super::elementwise::exp_shifted_sum(&mut scores[..len], max).recip();
    if d == 64 {
        // The common head size: the 64 sums stay in registers across all positions.
        let mut acc = [0f32; 64];
        for j in 0..len {
            let p = scores[j];
            let vj = &v[j * 64..(j + 1) * 64];
            for i in 0..64 {
                acc[i] = p.mul_add(vj[i], acc[i]);
            }
        }
        for i in 0..64 {
            out[i] = acc[i] * inv;
        }
        return;
    }
    for o in out.iter_mut() {
        *o = 0.0;
    }
    for j in 0..len {
        let p = scores[j];
        let vj = &v[j * d..(j + 1) * d];
        for i in 0..d {
            out[i] = p.mul_add(vj[i], out[i]);
        }
    }
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// [`head`] compiled for AVX-512 (16-lane dot products and weighted sums).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn head_avx512(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    len: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    head(q, k, v, len, scale, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_avx2(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    len: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    head(q, k, v, len, scale, scores, out)
}

/// `out (heads × d) = softmax(scale · q Kᵀ) V` for one position; query head `h` reads KV head
/// `h / (heads / kv_heads)`. `q` is `(heads, d)`; `len ≥ 1` cached positions are attended.
pub fn decode_attention(q: &[f32], kv: KvView, d: usize, scale: f32, out: &mut [f32]) {
    let KvView {
        k,
        v,
        kv_heads,
        len,
    } = kv;
    let heads = q.len() / d;
    let rep = heads / kv_heads.max(1);
    let avx2 = has_avx2();
    // AVX-512F comes with the VNNI check (the same CPUs), which is cached.
    let avx512 = super::has_avx512_vnni();
    thread_local! {
        static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    out.par_chunks_mut(d).enumerate().for_each(|(h, o)| {
        let g = h / rep;
        let kh = &k.data[g * k.head_stride..g * k.head_stride + len * d];
        let vh = &v.data[g * v.head_stride..g * v.head_stride + len * d];
        let qh = &q[h * d..(h + 1) * d];
        SCORES.with_borrow_mut(|scores| {
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: the CPU has AVX-512F, AVX2 and FMA (checked above).
                unsafe { head_avx512(qh, kh, vh, len, scale, scores, o) };
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                unsafe { head_avx2(qh, kh, vh, len, scale, scores, o) };
                return;
            }
            let _ = (avx2, avx512);
            head(qh, kh, vh, len, scale, scores, o)
        })
    });
}

/// Queries per prompt-attention task: the scores of 64 queries over 2,048 keys are 512 KB.
const QUERY_BLOCK: usize = 64;

/// `out (t × heads·d)`: causal attention of the `t` new positions `offset..offset + t` over the
/// cached positions `0..kv.len` (`kv.len = offset + t`), query `i` seeing keys `0..=offset + i`;
/// query head `h` reads KV head `h / (heads / kv_heads)`. `q` is `(heads, t, d)`, row-major.
///
/// One task takes one block of queries of one head: its scores against the keys the block can see
/// (the GEMM, with the scale folded in), a softmax in place over each row's visible prefix (the
/// masked tail set to 0, as `exp(-inf)` is), and the weighted sum of values written straight into
/// the output's row layout. Only a block's scores ever exist, in a buffer reused per worker; the
/// general path materialises every head's `t × (offset + t)` scores several times over.
///
/// Panics if a slice is shorter than the shape says (callers build them from the same shape).
pub fn prefill_attention(q: &[f32], t: usize, kv: KvView, d: usize, scale: f32, out: &mut [f32]) {
    let KvView {
        k,
        v,
        kv_heads,
        len,
    } = kv;
    if t == 0 || d == 0 {
        return;
    }
    assert!(len >= t, "{t} new positions but only {len} cached");
    let heads = q.len() / (t * d);
    assert!(
        heads > 0 && kv_heads > 0 && heads.is_multiple_of(kv_heads) && q.len() == heads * t * d,
        "queries: {} values for {t} positions of {kv_heads}-group heads of {d}",
        q.len()
    );
    assert!(out.len() >= t * heads * d, "output too short");
    for (name, c) in [("keys", k), ("values", v)] {
        assert!(
            (kv_heads - 1) * c.head_stride + len * d <= c.data.len(),
            "{name}: {} values, too few for {kv_heads} heads of {len} positions",
            c.data.len()
        );
    }
    let offset = len - t;
    let rep = heads / kv_heads;
    let hd = heads * d;
    let blocks = t.div_ceil(QUERY_BLOCK);
    let out_addr = out.as_mut_ptr() as usize;
    thread_local! {
        static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    // Later blocks see more keys: hand them out first, so that the short ones fill the gaps.
    (0..heads * blocks).into_par_iter().for_each(|task| {
        let h = task % heads;
        let q0 = (blocks - 1 - task / heads) * QUERY_BLOCK;
        let qn = QUERY_BLOCK.min(t - q0);
        // Keys visible to the block's last query.
        let keys = offset + q0 + qn;
        let g = h / rep;
        SCORES.with_borrow_mut(|scores| {
            if scores.len() < qn * keys {
                scores.resize(qn * keys, 0.0);
            }
            let scores = &mut scores[..qn * keys];
            // SAFETY: the reads stay inside the slices, as asserted above: rows q0..q0 + qn of head
            // h of `q` (d values each), positions 0..keys ≤ len of KV head g (stride d); `scores`
            // holds qn × keys values. The output block (rows q0..q0 + qn, columns h·d..(h+1)·d, row
            // stride heads·d) is written by this task only.
            unsafe {
                // scores (qn × keys) = scale · Q_blk (qn × d) · Kᵀ (d × keys)
                product(
                    (qn, keys, d),
                    scores.as_mut_ptr(),
                    keys,
                    Strided::rows(q.as_ptr().add((h * t + q0) * d), d),
                    Strided::columns(k.data.as_ptr().add(g * k.head_stride), d),
                    scale,
                );
            }
            for (i, row) in scores.chunks_exact_mut(keys).enumerate() {
                let visible = offset + q0 + i + 1;
                let (seen, masked) = row.split_at_mut(visible);
                super::elementwise::softmax_rows(seen, visible, None);
                masked.fill(0.0);
            }
            // SAFETY: as above.
            unsafe {
                // out block (qn × d) = P (qn × keys) · V (keys × d)
                product(
                    (qn, d, keys),
                    (out_addr as *mut f32).add(q0 * hd + h * d),
                    hd,
                    Strided::rows(scores.as_ptr(), keys),
                    Strided::rows(v.data.as_ptr().add(g * v.head_stride), d),
                    1.0,
                );
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a direct f64 softmax-attention, with GQA (6 query heads over 2 KV heads) and a cache
    /// whose capacity exceeds the attended length.
    #[test]
    fn matches_reference() {
        for (d, len) in [(40, 11), (64, 13), (64, 1)] {
            check(d, len);
        }
    }

    fn check(d: usize, len: usize) {
        let (heads, kv, cap) = (6, 2, 13);
        let q: Vec<f32> = (0..heads * d)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) / 9.0)
            .collect();
        let kd: Vec<f32> = (0..kv * cap * d)
            .map(|i| ((i * 7 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let vd: Vec<f32> = (0..kv * cap * d)
            .map(|i| ((i * 5 % 19) as f32 - 9.0) / 3.0)
            .collect();
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; heads * d];
        let view = |data| CacheView {
            data,
            head_stride: cap * d,
        };
        let kvv = KvView {
            k: view(&kd),
            v: view(&vd),
            kv_heads: kv,
            len,
        };
        decode_attention(&q, kvv, d, scale, &mut out);
        for h in 0..heads {
            let g = h / (heads / kv);
            let s: Vec<f64> = (0..len)
                .map(|j| {
                    (0..d)
                        .map(|i| f64::from(q[h * d + i]) * f64::from(kd[g * cap * d + j * d + i]))
                        .sum::<f64>()
                        * f64::from(scale)
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for i in 0..d {
                let want: f64 = (0..len)
                    .map(|j| e[j] / z * f64::from(vd[g * cap * d + j * d + i]))
                    .sum();
                let got = f64::from(out[h * d + i]);
                assert!(
                    (got - want).abs() < 1e-5,
                    "head {h} dim {i}: {got} vs {want}"
                );
            }
        }
    }

    /// The prompt kernel against an f64 causal reference: GQA (6 heads over 2), new positions after
    /// a cached prefix (offset 5) and without one, more positions than one query block.
    #[test]
    fn prefill_matches_causal_reference() {
        for (d, offset, t) in [(64, 0, 70), (40, 5, 9), (64, 3, 1)] {
            let (heads, kv, cap) = (6, 2, offset + t + 4);
            let q: Vec<f32> = (0..heads * t * d)
                .map(|i| ((i * 31 % 17) as f32 - 8.0) / 9.0)
                .collect();
            let kd: Vec<f32> = (0..kv * cap * d)
                .map(|i| ((i * 7 % 23) as f32 - 11.0) / 7.0)
                .collect();
            let vd: Vec<f32> = (0..kv * cap * d)
                .map(|i| ((i * 5 % 19) as f32 - 9.0) / 3.0)
                .collect();
            let scale = 1.0 / (d as f32).sqrt();
            let mut out = vec![f32::NAN; t * heads * d];
            let view = |data| CacheView {
                data,
                head_stride: cap * d,
            };
            let kvv = KvView {
                k: view(&kd),
                v: view(&vd),
                kv_heads: kv,
                len: offset + t,
            };
            prefill_attention(&q, t, kvv, d, scale, &mut out);
            for h in 0..heads {
                let g = h / (heads / kv);
                for i in 0..t {
                    let qi = &q[(h * t + i) * d..(h * t + i + 1) * d];
                    let s: Vec<f64> = (0..=offset + i)
                        .map(|j| {
                            (0..d)
                                .map(|c| f64::from(qi[c]) * f64::from(kd[g * cap * d + j * d + c]))
                                .sum::<f64>()
                                * f64::from(scale)
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..d {
                        let want: f64 = (0..=offset + i)
                            .map(|j| e[j] / z * f64::from(vd[g * cap * d + j * d + c]))
                            .sum();
                        let got = f64::from(out[i * heads * d + h * d + c]);
                        assert!(
                            (got - want).abs() < 1e-5,
                            "d {d} offset {offset} head {h} query {i} dim {c}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
