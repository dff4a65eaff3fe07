//! Attention over the KV cache, grouped-query, in f32: one new position (decode), or a block of new
//! positions under the causal mask (a prompt, [`prefill_attention`]).
//!
//! The general path multiplies `(rep, d) × (d, len)` and `(rep, len) × (len, d)` matrices through the
//! GEMM, whose set-up dominates at these sizes (the scores of one token are a few hundred values per
//! head). Here one task takes one KV head over a run of cached positions, for all the query heads
//! that share it: a dot product per cached key (on AVX-512 / AVX2, 16 / 8 keys' sums folded into one
//! vector), a softmax in f32 (as HF's eager and SDPA paths compute it), and a weighted sum of the
//! cached values; the runs are merged by their maxima and sums (flash-decoding). On the full-size
//! SmolVLM-256M (q4, 2 threads) this took decode after a 1,024-token prompt from 74.9 to 103.5
//! tokens/s (about 70 to 93 with AVX2 only): the per-head kernel it replaced did its dot products in
//! scalar code.

use rayon::prelude::*;

use super::has_avx2;
use super::sgemm::{product, Strided};

/// Keys or values of one layer: position `j` of KV head `h` starts at `h * head_stride + j * d`.
/// Held in f32, or in f16 (a cache half the size; the decode kernel widens the values as it reads).
#[derive(Clone, Copy)]
pub struct CacheView<'a, T = f32> {
    pub data: &'a [T],
    pub head_stride: usize,
}

/// The cached keys and values one position attends to: `len` positions of `kv_heads` heads.
#[derive(Clone, Copy)]
pub struct KvView<'a, T = f32> {
    pub k: CacheView<'a, T>,
    pub v: CacheView<'a, T>,
    pub kv_heads: usize,
    pub len: usize,
}

/// A type the KV cache holds: f32, or f16 widened to f32 (exactly) as it is read.
pub trait CacheElement: Copy + Send + Sync + 'static {
    /// `src` in f32: `src` itself, or its values written into `scratch`.
    fn as_f32<'s>(src: &'s [Self], scratch: &'s mut Vec<f32>) -> &'s [f32];

    /// Sixteen values from `p`, in f32.
    ///
    /// # Safety
    /// The CPU has AVX-512F and `p` points at 16 readable values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl CacheElement for f32 {
    fn as_f32<'s>(src: &'s [f32], _: &'s mut Vec<f32>) -> &'s [f32] {
        src
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: as the caller promises.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl CacheElement for half::f16 {
    fn as_f32<'s>(src: &'s [half::f16], scratch: &'s mut Vec<f32>) -> &'s [f32] {
        use half::slice::HalfFloatSliceExt;
        scratch.resize(src.len(), 0.0);
        src.convert_to_f32_slice(scratch);
        scratch
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    unsafe fn load16(p: *const half::f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: as the caller promises (16 f16 values are 256 bits).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
}

// Plain loops, no closures: a closure's body would be compiled outside the `avx2,fma` wrapper below
// and turn `mul_add` into a library call.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut s = 0f32;
    for (x, y) in ar.iter().zip(br) {
        s = x.mul_add(*y, s);
    }
    for v in acc {
        s += v;
    }
    s
}

/// One decode task: the `rep` query heads `q` (`rep × d`) that share a KV head, over `n` of its
/// cached positions (`k`, `v`: `n × d`). `scores` (`rep × n`) is scratch; `part` receives, per query
/// head, `[max, Σ exp(s - max), Σ exp(s - max) · v (d values)]`, merged across tasks by
/// [`decode_attention`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn chunk(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    d: usize,
    scale: f32,
    scores: &mut [f32],
    part: &mut [f32],
) {
    for ((qr, s), pr) in q
        .chunks_exact(d)
        .zip(scores.chunks_exact_mut(n))
        .zip(part.chunks_exact_mut(d + 2))
    {
        let mut max = f32::NEG_INFINITY;
        for (sj, kj) in s.iter_mut().zip(k.chunks_exact(d)) {
            *sj = dot(qr, kj) * scale;
            max = max.max(*sj);
        }
        let (head, acc) = pr.split_at_mut(2);
        head[0] = max;
        head[1] = super::elementwise::exp_shifted_sum(s, max);
        acc.fill(0.0);
        for (&p, vj) in s.iter().zip(v.chunks_exact(d)) {
            for (a, &x) in acc.iter_mut().zip(vj) {
                *a = p.mul_add(x, *a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn chunk_avx2(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    d: usize,
    scale: f32,
    scores: &mut [f32],
    part: &mut [f32],
) {
    chunk(q, k, v, n, d, scale, scores, part)
}

/// [`chunk`] for heads of `8 · DV` f32 values on AVX2: the scores of 8 positions at a time, their 8
/// lane sums folded into one vector; the weighted sum of values in registers.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::kernels::x86::{hmax256, hsum256};
    use std::arch::x86_64::*;

    /// Lane `i` of the result is the sum of the 8 lanes of `v[i]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn lane_sums(v: &[__m256; 8]) -> __m256 {
        // [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7], then per 128-bit half the four
        // vectors' sums over that half.
        let h = [
            _mm256_hadd_ps(v[0], v[1]),
            _mm256_hadd_ps(v[2], v[3]),
            _mm256_hadd_ps(v[4], v[5]),
            _mm256_hadd_ps(v[6], v[7]),
        ];
        let (q0, q1) = (_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
        // Low halves plus high halves.
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(q0, q1),
            _mm256_permute2f128_ps::<0x31>(q0, q1),
        )
    }

    /// `q · k` over `8 · DV` values, in one vector of partial sums.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn products<const DV: usize>(q: &[__m256; DV], k: *const f32) -> __m256 {
        let mut a = _mm256_mul_ps(q[0], _mm256_loadu_ps(k));
        for (i, qi) in q.iter().enumerate().skip(1) {
            a = _mm256_fmadd_ps(*qi, _mm256_loadu_ps(k.add(8 * i)), a);
        }
        a
    }

    /// See [`super::chunk`].
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `q` holds `rep · 8 · DV` values, `k` and `v` `n · 8 · DV`, `scores`
    /// `rep · n` and `part` `rep · (8 · DV + 2)`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn chunk<const DV: usize>(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        rep: usize,
        n: usize,
        scale: f32,
        scores: &mut [f32],
        part: &mut [f32],
    ) {
        let d = 8 * DV;
        let sv = _mm256_set1_ps(scale);
        for r in 0..rep {
            let mut qv = [_mm256_setzero_ps(); DV];
            for (i, x) in qv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(q.as_ptr().add(r * d + 8 * i));
            }
            let s = &mut scores[r * n..(r + 1) * n];
            let mut maxes = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut j = 0;
            while j + 8 <= n {
                let mut sums = [_mm256_setzero_ps(); 8];
                for (jj, x) in sums.iter_mut().enumerate() {
                    *x = products(&qv, k.as_ptr().add((j + jj) * d));
                }
                let block = _mm256_mul_ps(lane_sums(&sums), sv);
                _mm256_storeu_ps(s.as_mut_ptr().add(j), block);
                maxes = _mm256_max_ps(maxes, block);
                j += 8;
            }
            let mut max = hmax256(maxes);
            while j < n {
                s[j] = hsum256(products(&qv, k.as_ptr().add(j * d))) * scale;
                max = max.max(s[j]);
                j += 1;
            }
            let pr = &mut part[r * (d + 2)..(r + 1) * (d + 2)];
            pr[0] = max;
            pr[1] = super::super::elementwise::exp_shifted_sum(s, max);
            let mut acc = [_mm256_setzero_ps(); DV];
            for (j, &p) in s.iter().enumerate() {
                let pv = _mm256_set1_ps(p);
                let vj = v.as_ptr().add(j * d);
                for (i, x) in acc.iter_mut().enumerate() {
                    *x = _mm256_fmadd_ps(pv, _mm256_loadu_ps(vj.add(8 * i)), *x);
                }
            }
            for (i, x) in acc.iter().enumerate() {
                _mm256_storeu_ps(pr.as_mut_ptr().add(2 + 8 * i), *x);
            }
        }
    }
}

/// [`chunk`] for heads of `16 · DV` values on AVX-512: the scores of 16 positions at a time, their
/// 16 lane sums folded into one vector; the weighted sum of values in registers.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::CacheElement;
    use std::arch::x86_64::*;

    /// Lane `i` of the result is the sum of the 16 lanes of `v[i]` (45 shuffles and adds for 16
    /// horizontal sums).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn lane_sums(v: &[__m512; 16]) -> __m512 {
        // Per 128-bit quarter, pairs: [a0+a2, b0+b2, a1+a3, b1+b3].
        let mut w = [_mm512_setzero_ps(); 8];
        for i in 0..8 {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            w[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        }
        // Per quarter, fours: the quarter's sums of v[4i..4i + 4], in order.
        let mut x = [_mm512_setzero_ps(); 4];
        for i in 0..4 {
            let (a, b) = (_mm512_castps_pd(w[2 * i]), _mm512_castps_pd(w[2 * i + 1]));
            x[i] = _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
            );
        }
        // Quarters (0, 2) + (1, 3) of two vectors, twice: quarter i ends up holding x[i]'s total.
        let z0 = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(x[0], x[1]),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(x[0], x[1]),
        );
        let z1 = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(x[2], x[3]),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(x[2], x[3]),
        );
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(z0, z1),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(z0, z1),
        )
    }

    /// `q · k` over `16 · DV` values, in one vector of partial sums.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn products<const DV: usize, T: CacheElement>(q: &[__m512; DV], k: *const T) -> __m512 {
        let mut a = _mm512_mul_ps(q[0], T::load16(k));
        for (i, qi) in q.iter().enumerate().skip(1) {
            a = _mm512_fmadd_ps(*qi, T::load16(k.add(16 * i)), a);
        }
        a
    }

    /// See [`super::chunk`].
    ///
    /// # Safety
    /// The CPU has AVX-512F, AVX2 and FMA; `q` holds `rep · 16 · DV` values, `k` and `v`
    /// `n · 16 · DV`, `scores` `rep · n` and `part` `rep · (16 · DV + 2)`.
    #[target_feature(enable = "avx2,fma,avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn chunk<const DV: usize, T: CacheElement>(
        q: &[f32],
        k: &[T],
        v: &[T],
        rep: usize,
        n: usize,
        scale: f32,
        scores: &mut [f32],
        part: &mut [f32],
    ) {
        let d = 16 * DV;
        let sv = _mm512_set1_ps(scale);
        for r in 0..rep {
            let mut qv = [_mm512_setzero_ps(); DV];
            for (i, x) in qv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(q.as_ptr().add(r * d + 16 * i));
            }
            let s = &mut scores[r * n..(r + 1) * n];
            let mut maxes = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut j = 0;
            while j + 16 <= n {
                let mut sums = [_mm512_setzero_ps(); 16];
                for (jj, x) in sums.iter_mut().enumerate() {
                    *x = products(&qv, k.as_ptr().add((j + jj) * d));
                }
                let block = _mm512_mul_ps(lane_sums(&sums), sv);
                _mm512_storeu_ps(s.as_mut_ptr().add(j), block);
                maxes = _mm512_max_ps(maxes, block);
                j += 16;
            }
            let mut max = _mm512_reduce_max_ps(maxes);
            while j < n {
                s[j] = _mm512_reduce_add_ps(products(&qv, k.as_ptr().add(j * d))) * scale;
                max = max.max(s[j]);
                j += 1;
            }
            let pr = &mut part[r * (d + 2)..(r + 1) * (d + 2)];
            pr[0] = max;
            pr[1] = super::super::elementwise::exp_shifted_sum(s, max);
            // Two sets of sums (even and odd positions) to keep twice as many FMAs in flight; both
            // stay in registers (named, not indexed by position).
            let (mut even, mut odd) = ([_mm512_setzero_ps(); DV], [_mm512_setzero_ps(); DV]);
            let mut j = 0;
            while j + 2 <= n {
                let (p0, p1) = (_mm512_set1_ps(s[j]), _mm512_set1_ps(s[j + 1]));
                let (v0, v1) = (v.as_ptr().add(j * d), v.as_ptr().add((j + 1) * d));
                for i in 0..DV {
                    even[i] = _mm512_fmadd_ps(p0, T::load16(v0.add(16 * i)), even[i]);
                    odd[i] = _mm512_fmadd_ps(p1, T::load16(v1.add(16 * i)), odd[i]);
                }
                j += 2;
            }
            if j < n {
                let p0 = _mm512_set1_ps(s[j]);
                let v0 = v.as_ptr().add(j * d);
                for (i, x) in even.iter_mut().enumerate() {
                    *x = _mm512_fmadd_ps(p0, T::load16(v0.add(16 * i)), *x);
                }
            }
            for i in 0..DV {
                let sum = _mm512_add_ps(even[i], odd[i]);
                _mm512_storeu_ps(pr.as_mut_ptr().add(2 + 16 * i), sum);
            }
        }
    }
}

/// `out (heads × d) = softmax(scale · q Kᵀ) V` for one position; query head `h` reads KV head
/// `h / (heads / kv_heads)`. `q` is `(heads, d)`; `len ≥ 1` cached positions are attended.
///
/// The work is split by KV head and by runs of positions (flash-decoding): each task reads its keys
/// and values once for all the query heads that share them, and keeps per head the running maximum,
/// the sum of exponentials and the weighted sum of values, which are merged here at the end.
///
/// Panics if a slice is shorter than the shape says (callers build them from the same shape).
pub fn decode_attention<T: CacheElement>(
    q: &[f32],
    kv: KvView<T>,
    d: usize,
    scale: f32,
    out: &mut [f32],
) {
    decode_attention_batch(&mut [DecodeQuery { q, kv, out }], d, scale);
}

/// One sequence's new position in a decode batch: its query heads, the cache they attend to, and
/// where its `heads × d` outputs go.
pub struct DecodeQuery<'a, T = f32> {
    pub q: &'a [f32],
    pub kv: KvView<'a, T>,
    pub out: &'a mut [f32],
}

/// How one query's work is split: runs of `run` positions, `runs` per KV head, `rep` query heads
/// per KV head; its tasks' partial results start at task `first` of the batch.
#[derive(Clone, Copy)]
struct Split {
    rep: usize,
    run: usize,
    runs: usize,
    first: usize,
}

/// [`decode_attention`] for the new positions of several sequences (a server's decode batch) in one
/// parallel pass: every sequence's tasks share the thread pool at once instead of one sequence
/// after another. Each sequence is split into tasks as it would be alone (the split depends on its
/// length and the thread count only) and its runs are merged in the same order, so every output is
/// bit-identical to that sequence's [`decode_attention`]. Every query has `d`-value heads.
///
/// Panics if a slice is shorter than the shape says (callers build them from the same shape).
pub fn decode_attention_batch<T: CacheElement>(
    queries: &mut [DecodeQuery<T>],
    d: usize,
    scale: f32,
) {
    if d == 0 {
        return;
    }
    // About four tasks per thread for each query, in whole 16-position blocks, 32 to 512 positions
    // each.
    let target = 4 * rayon::current_num_threads().max(1);
    let mut splits = Vec::with_capacity(queries.len());
    let mut tasks = 0;
    let mut part_len = 0;
    for DecodeQuery { q, kv, out } in queries.iter() {
        let KvView {
            k,
            v,
            kv_heads,
            len,
        } = *kv;
        if len == 0 {
            // Nothing cached to attend to: the output is left as it is.
            splits.push(Split {
                rep: 1,
                run: 0,
                runs: 0,
                first: tasks,
            });
            continue;
        }
        let heads = q.len() / d;
        assert!(
            kv_heads > 0 && heads.is_multiple_of(kv_heads) && q.len() == heads * d,
            "queries: {} values for {kv_heads}-group heads of {d}",
            q.len()
        );
        assert!(out.len() >= heads * d, "output too short");
        for (name, c) in [("keys", k), ("values", v)] {
            assert!(
                (kv_heads - 1) * c.head_stride + len * d <= c.data.len(),
                "{name}: {} values, too few for {kv_heads} heads of {len} positions",
                c.data.len()
            );
        }
        let rep = heads / kv_heads;
        let run = (len * kv_heads)
            .div_ceil(target)
            .next_multiple_of(16)
            .clamp(32, 512);
        let runs = len.div_ceil(run);
        // One part length for the whole batch (the longest), so that tasks are equal chunks.
        part_len = part_len.max(rep * (d + 2));
        splits.push(Split {
            rep,
            run,
            runs,
            first: tasks,
        });
        tasks += kv_heads * runs;
    }
    if tasks == 0 {
        return;
    }
    // Task `t` of the batch: its query, KV head and first position.
    let owner: Vec<(usize, usize, usize)> = splits
        .iter()
        .zip(queries.iter())
        .enumerate()
        .flat_map(|(i, (s, dq))| {
            (0..dq.kv.kv_heads * s.runs).map(move |t| (i, t / s.runs, t % s.runs * s.run))
        })
        .collect();
    let mut parts = vec![0f32; tasks * part_len];
    #[cfg(target_arch = "x86_64")]
    let (avx2, avx512) = (has_avx2(), super::has_avx512f());
    /// Per worker: scores, and keys and values widened to f32 for the kernels that read only f32.
    #[derive(Default)]
    struct Scratch {
        scores: Vec<f32>,
        keys: Vec<f32>,
        values: Vec<f32>,
    }
    thread_local! {
        static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
    }
    let shared: &[DecodeQuery<T>] = queries;
    parts
        .par_chunks_mut(part_len)
        .zip(owner.par_iter())
        .for_each(|(part, &(i, g, j0))| {
            let (DecodeQuery { q, kv, .. }, s) = (&shared[i], splits[i]);
            let rep = s.rep;
            let part = &mut part[..rep * (d + 2)];
            let n = s.run.min(kv.len - j0);
            let kr = &kv.k.data[g * kv.k.head_stride + j0 * d..][..n * d];
            let vr = &kv.v.data[g * kv.v.head_stride + j0 * d..][..n * d];
            let qg = &q[g * rep * d..(g + 1) * rep * d];
            SCRATCH.with_borrow_mut(|scratch| {
                let Scratch {
                    scores,
                    keys,
                    values,
                } = scratch;
                if scores.len() < rep * n {
                    scores.resize(rep * n, 0.0);
                }
                let scores = &mut scores[..rep * n];
                #[cfg(target_arch = "x86_64")]
                if avx512 && d.is_multiple_of(16) && d <= 128 {
                    // SAFETY: the CPU has AVX-512F, AVX2 and FMA; the slices hold the shapes
                    // chunk::<DV> reads (d = 16 · DV).
                    unsafe {
                        match d / 16 {
                            1 => avx512::chunk::<1, T>(qg, kr, vr, rep, n, scale, scores, part),
                            2 => avx512::chunk::<2, T>(qg, kr, vr, rep, n, scale, scores, part),
                            3 => avx512::chunk::<3, T>(qg, kr, vr, rep, n, scale, scores, part),
                            4 => avx512::chunk::<4, T>(qg, kr, vr, rep, n, scale, scores, part),
                            5 => avx512::chunk::<5, T>(qg, kr, vr, rep, n, scale, scores, part),
                            6 => avx512::chunk::<6, T>(qg, kr, vr, rep, n, scale, scores, part),
                            7 => avx512::chunk::<7, T>(qg, kr, vr, rep, n, scale, scores, part),
                            _ => avx512::chunk::<8, T>(qg, kr, vr, rep, n, scale, scores, part),
                        }
                    }
                    return;
                }
                let (kr, vr) = (T::as_f32(kr, keys), T::as_f32(vr, values));
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: the CPU has AVX2 and FMA; the slices hold the shapes chunk::<DV>
                    // reads (d = 8 · DV).
                    unsafe {
                        match d {
                            32 => avx2::chunk::<4>(qg, kr, vr, rep, n, scale, scores, part),
                            64 => avx2::chunk::<8>(qg, kr, vr, rep, n, scale, scores, part),
                            128 => avx2::chunk::<16>(qg, kr, vr, rep, n, scale, scores, part),
                            _ => chunk_avx2(qg, kr, vr, n, d, scale, scores, part),
                        }
                    }
                    return;
                }
                chunk(qg, kr, vr, n, d, scale, scores, part)
            })
        });
    // Merge the runs of each head: rescale each to the overall maximum.
    for (dq, s) in queries.iter_mut().zip(&splits).filter(|(_, s)| s.runs > 0) {
        merge_runs(&parts[s.first * part_len..], part_len, *s, d, dq);
    }
}

/// One query's outputs from its tasks' partial results (`parts`, task by task `part_len` apart,
/// KV head by KV head, run by run): per head, every run rescaled to the overall maximum.
fn merge_runs<T>(parts: &[f32], part_len: usize, s: Split, d: usize, dq: &mut DecodeQuery<T>) {
    let heads = dq.q.len() / d;
    for (h, o) in dq.out.chunks_exact_mut(d).take(heads).enumerate() {
        let (g, r) = (h / s.rep, h % s.rep);
        let head_parts = (0..s.runs).map(|c| {
            let at = (g * s.runs + c) * part_len + r * (d + 2);
            &parts[at..at + d + 2]
        });
        let max = head_parts
            .clone()
            .fold(f32::NEG_INFINITY, |m, p| m.max(p[0]));
        o.fill(0.0);
        let mut total = 0f32;
        for p in head_parts {
            let w = (p[0] - max).exp();
            total += w * p[1];
            for (x, &a) in o.iter_mut().zip(&p[2..]) {
                *x += w * a;
            }
        }
        let inv = total.recip();
        for x in o.iter_mut() {
            *x *= inv;
        }
    }
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
    /// whose capacity exceeds the attended length: head sizes the AVX-512 kernel takes (multiples of
    /// 16) and one it leaves to the others, lengths under one 16-position block, over several
    /// blocks with a tail, and over several runs (merged).
    #[test]
    fn matches_reference() {
        for (d, len) in [
            (40, 11),
            (64, 13),
            (64, 1),
            (64, 300),
            (128, 45),
            (16, 33),
            (40, 700),
        ] {
            check(d, len, false);
        }
    }

    /// The same with the cache in f16 (the reference reads the f16 values).
    #[test]
    fn matches_reference_from_an_f16_cache() {
        for (d, len) in [(40, 11), (64, 300), (128, 45)] {
            check(d, len, true);
        }
    }

    /// A decode batch of sequences of different lengths (one position, one 16-position block, several
    /// runs to merge, none cached) in one call: each output bit-identical to that sequence alone, and
    /// the output of the empty one left untouched.
    #[test]
    fn batch_equals_each_alone() {
        let (heads, kv, d) = (6, 2, 64);
        let lens = [1usize, 16, 700, 0, 45];
        let cap = 720;
        let data = |seed: usize| -> Vec<f32> {
            (0..kv * cap * d)
                .map(|i| (((i + seed) * 7 % 23) as f32 - 11.0) / 7.0)
                .collect()
        };
        let (ks, vs): (Vec<_>, Vec<_>) = (0..lens.len()).map(|s| (data(s), data(s + 9))).unzip();
        let qs: Vec<Vec<f32>> = (0..lens.len())
            .map(|s| {
                (0..heads * d)
                    .map(|i| (((i + 3 * s) * 31 % 17) as f32 - 8.0) / 9.0)
                    .collect()
            })
            .collect();
        let kvv = |s: usize| KvView {
            k: CacheView {
                data: &ks[s][..],
                head_stride: cap * d,
            },
            v: CacheView {
                data: &vs[s][..],
                head_stride: cap * d,
            },
            kv_heads: kv,
            len: lens[s],
        };
        let scale = 0.125;
        let mut outs = vec![vec![7f32; heads * d]; lens.len()];
        let mut batch: Vec<_> = outs
            .iter_mut()
            .enumerate()
            .map(|(s, out)| DecodeQuery {
                q: &qs[s],
                kv: kvv(s),
                out,
            })
            .collect();
        decode_attention_batch(&mut batch, d, scale);
        for (s, out) in outs.iter().enumerate() {
            let mut alone = vec![7f32; heads * d];
            decode_attention(&qs[s], kvv(s), d, scale, &mut alone);
            assert_eq!(out, &alone, "sequence {s} of {} positions", lens[s]);
            if lens[s] == 0 {
                assert!(out.iter().all(|&x| x == 7.0));
            } else {
                assert!(out.iter().all(|x| x.is_finite()) && out.iter().any(|&x| x != 7.0));
            }
        }
    }

    /// [`decode_attention`] of `q` over `len` positions of keys and values held as `T`, `kv` heads
    /// of `k.len() / kv` values each.
    fn attend<T: CacheElement>(
        q: &[f32],
        k: &[T],
        v: &[T],
        kv: usize,
        len: usize,
        d: usize,
        scale: f32,
    ) -> Vec<f32> {
        let head_stride = k.len() / kv;
        let view = |data| CacheView { data, head_stride };
        let mut out = vec![0f32; q.len()];
        let kvv = KvView {
            k: view(k),
            v: view(v),
            kv_heads: kv,
            len,
        };
        decode_attention(q, kvv, d, scale, &mut out);
        out
    }

    fn check(d: usize, len: usize, f16_cache: bool) {
        use half::f16;
        let (heads, kv, cap) = (6, 2, len + 3);
        let q: Vec<f32> = (0..heads * d)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) / 9.0)
            .collect();
        let stored = |x: f32| {
            if f16_cache {
                f16::from_f32(x).to_f32()
            } else {
                x
            }
        };
        let kd: Vec<f32> = (0..kv * cap * d)
            .map(|i| stored(((i * 7 % 23) as f32 - 11.0) / 7.0))
            .collect();
        let vd: Vec<f32> = (0..kv * cap * d)
            .map(|i| stored(((i * 5 % 19) as f32 - 9.0) / 3.0))
            .collect();
        let scale = 1.0 / (d as f32).sqrt();
        let out = if f16_cache {
            let half = |x: &[f32]| -> Vec<f16> { x.iter().map(|&x| f16::from_f32(x)).collect() };
            attend(&q, &half(&kd), &half(&vd), kv, len, d, scale)
        } else {
            attend(&q, &kd, &vd, kv, len, d, scale)
        };
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
                    "d {d} len {len} head {h} dim {i}: {got} vs {want}"
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
