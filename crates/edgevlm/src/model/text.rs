//! The Llama text decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) with a KV cache.

use candle_core::{DType, Device, Tensor};

use super::kv_cache::KvCache;
use super::nn::{
    attention, silu_mul_stacked, with_cpu_f32, Embedding, Linear, ProjectionGroup, RmsNorm, Weights,
};
use crate::config::TextConfig;
use crate::error::{Error, Result};

/// Where the new tokens of a pass sit: the decoder's rotary positions, given by the caller rather
/// than implied by the cache length (a Qwen2-VL image spans fewer positions than tokens).
#[derive(Clone, Copy, Debug)]
pub enum Positions<'a> {
    /// Token `i` at position `start + i` (every axis, for multimodal RoPE).
    From(usize),
    /// Multimodal RoPE: each token's (temporal, height, width) position.
    Multi(&'a [[u32; 3]]),
}

impl Positions<'_> {
    /// The one position of a single token whose axes all agree (any text token); `None` otherwise.
    fn single(&self) -> Option<usize> {
        match self {
            Positions::From(p) => Some(*p),
            Positions::Multi([[t, h, w]]) if t == h && h == w => Some(*t as usize),
            Positions::Multi(_) => None,
        }
    }
}

/// Rotary position tables, computed in f32 exactly as HF's default RoPE does.
struct Rope {
    cos: Tensor,
    sin: Tensor,
    max_len: usize,
    inv_freq: Vec<f32>,
    /// Multimodal RoPE: the axis (0 temporal, 1 height, 2 width) each frequency pair turns with.
    axis_of_pair: Option<Vec<usize>>,
    dtype: DType,
}

impl Rope {
    fn new(cfg: &TextConfig, max_len: usize, dtype: DType, device: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let base = cfg.rope_theta as f32;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        let axis_of_pair = cfg.mrope_section.map(|sections| {
            sections
                .iter()
                .enumerate()
                .flat_map(|(axis, &n)| std::iter::repeat_n(axis, n))
                .collect::<Vec<_>>()
        });
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for p in 0..max_len {
            for &f in &inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_len, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (max_len, half), device)?.to_dtype(dtype)?,
            max_len,
            inv_freq,
            axis_of_pair,
            dtype,
        })
    }

    /// `(t, half)` cos and sin tables of multimodal positions: pair `i` of token `j` turns by
    /// `positions[j][axis(i)] · inv_freq[i]`, the same f32 product the 1-D tables hold.
    fn multi_tables(&self, positions: &[[u32; 3]], device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let axes = self.axis_of_pair.as_deref().ok_or_else(|| {
            Error::ModelInput("multimodal positions for a decoder without multimodal RoPE".into())
        })?;
        if axes.len() != half {
            return Err(Error::Internal(
                "mrope sections do not cover the head".into(),
            ));
        }
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for p in positions {
            if let Some(&far) = p.iter().find(|&&x| x as usize >= self.max_len) {
                return Err(Error::ModelInput(format!(
                    "position {far} is beyond the model's {} positions",
                    self.max_len
                )));
            }
            for (&f, &axis) in self.inv_freq.iter().zip(axes) {
                let a = p[axis] as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let t = positions.len();
        Ok((
            Tensor::from_vec(cos, (t, half), device)?.to_dtype(self.dtype)?,
            Tensor::from_vec(sin, (t, half), device)?.to_dtype(self.dtype)?,
        ))
    }

    /// Rotate `x` (heads of `d` values, one position) for position `pos` in place, exactly as candle's
    /// `rope` computes it (`x1·cos − x2·sin`, `x1·sin + x2·cos` over the two halves). False (and `x`
    /// untouched) where the tables are not f32 CPU tensors or `pos` is past them.
    fn rotate_one(&self, x: &mut [f32], d: usize, pos: usize) -> bool {
        let half = d / 2;
        if pos >= self.max_len || half == 0 {
            return false;
        }
        let rotated = with_cpu_f32(&self.cos, |cos| {
            with_cpu_f32(&self.sin, |sin| {
                let (cos, sin) = (
                    &cos[pos * half..(pos + 1) * half],
                    &sin[pos * half..(pos + 1) * half],
                );
                for head in x.chunks_exact_mut(d) {
                    let (a, b) = head.split_at_mut(half);
                    for i in 0..half {
                        let (x1, x2) = (a[i], b[i]);
                        a[i] = x1 * cos[i] - x2 * sin[i];
                        b[i] = x1 * sin[i] + x2 * cos[i];
                    }
                }
            })
        });
        matches!(rotated, Ok(Some(Ok(Some(())))))
    }

    /// Rotate `(b, heads, t, d)` for the `t` positions given.
    fn apply(&self, x: &Tensor, positions: Positions) -> Result<Tensor> {
        let t = x.dim(2)?;
        let offset = match positions {
            Positions::From(offset) => offset,
            Positions::Multi(p) => {
                if p.len() != t {
                    return Err(Error::ModelInput(format!(
                        "{} positions for {t} tokens",
                        p.len()
                    )));
                }
                let (cos, sin) = self.multi_tables(p, x.device())?;
                return Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?);
            }
        };
        if offset + t > self.max_len {
            return Err(Error::ModelInput(format!(
                "position {} is beyond the model's {} positions",
                offset + t,
                self.max_len
            )));
        }
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?)
    }
}

/// The weights of one decoder block as a checkpoint holds them, open to loaders of other file formats
/// (GGUF); [`DecoderLayer::new`] stacks the projections that share an input.
pub struct DecoderParts {
    pub input_norm: RmsNorm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub post_norm: RmsNorm,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// One decoder block: Q/K/V and gate/up each run as one stacked product where the weights allow.
pub struct DecoderLayer {
    input_norm: RmsNorm,
    /// `[q | k | v]`.
    qkv: ProjectionGroup,
    o: Linear,
    post_norm: RmsNorm,
    /// `[gate | up]`.
    gate_up: ProjectionGroup,
    intermediate: usize,
    down: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl DecoderLayer {
    pub fn new(p: DecoderParts) -> Result<Self> {
        let (q_w, kv_w) = (p.heads * p.head_dim, p.kv_heads * p.head_dim);
        let intermediate = p.gate.out_features();
        Ok(Self {
            input_norm: p.input_norm,
            qkv: ProjectionGroup::new(vec![(p.q, q_w), (p.k, kv_w), (p.v, kv_w)])?,
            o: p.o,
            post_norm: p.post_norm,
            gate_up: ProjectionGroup::new(vec![(p.gate, intermediate), (p.up, intermediate)])?,
            intermediate,
            down: p.down,
            heads: p.heads,
            kv_heads: p.kv_heads,
            head_dim: p.head_dim,
        })
    }

    fn load(w: &Weights, cfg: &TextConfig) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let a = w.pp("self_attn");
        let m = w.pp("mlp");
        let ab = cfg.attention_bias;
        let qkv_bias = ab || cfg.qkv_bias;
        Self::new(DecoderParts {
            input_norm: RmsNorm::load(&w.pp("input_layernorm"), h, cfg.rms_norm_eps)?,
            q: Linear::load(&a.pp("q_proj"), h, cfg.num_attention_heads * d, qkv_bias)?,
            k: Linear::load(&a.pp("k_proj"), h, cfg.num_key_value_heads * d, qkv_bias)?,
            v: Linear::load(&a.pp("v_proj"), h, cfg.num_key_value_heads * d, qkv_bias)?,
            o: Linear::load(&a.pp("o_proj"), cfg.num_attention_heads * d, h, ab)?,
            post_norm: RmsNorm::load(&w.pp("post_attention_layernorm"), h, cfg.rms_norm_eps)?,
            gate: Linear::load(&m.pp("gate_proj"), h, cfg.intermediate_size, cfg.mlp_bias)?,
            up: Linear::load(&m.pp("up_proj"), h, cfg.intermediate_size, cfg.mlp_bias)?,
            down: Linear::load(&m.pp("down_proj"), cfg.intermediate_size, h, cfg.mlp_bias)?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: d,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
        positions: Positions,
        mask: Option<&CausalMask>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let d = self.head_dim;
        let y = self.input_norm.forward(x)?;
        if let (1, 1, None, Some(offset)) = (t, b, mask, positions.single()) {
            let o = match &self.qkv {
                ProjectionGroup::Fused { linear, .. } => {
                    self.attend_row(&linear.forward(&y)?, rope, cache, layer, offset)?
                }
                ProjectionGroup::Separate(_) => {
                    let qkv = self.qkv.forward_each(&y)?;
                    self.attend_row_parts(&qkv, rope, cache, layer, offset)?
                }
            };
            let x = (x + self.o.forward(&o)?)?;
            return self.mlp(x, Linear::forward);
        }
        let heads = |t_: Tensor, n: usize| -> Result<Tensor> {
            Ok(t_.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?)
        };
        let mut qkv = self.qkv.forward_each(&y)?.into_iter();
        let (Some(q), Some(k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) else {
            return Err(Error::Internal("attention projections missing".into()));
        };
        let q = rope.apply(&heads(q, self.heads)?, positions)?;
        let k = rope.apply(&heads(k, self.kv_heads)?, positions)?;
        let v = heads(v, self.kv_heads)?;
        let (k, v) = cache.append(layer, &k, &v)?;
        // The rest reads the cache in the queries' type (an f16 cache widened, exactly).
        let (k, v) = (k.to_dtype(q.dtype())?, v.to_dtype(q.dtype())?);
        if mask.is_some() {
            if let Some(o) = prefill_attention(&q, &k, &v, self.kv_heads, d)? {
                let x = (x + self.o.forward(&o)?)?;
                return self.mlp(x, Linear::forward);
            }
        }
        // Grouped-query attention without copying K/V per query head: fold the `rep` query heads that
        // share a KV head into the sequence axis.
        let rep = self.heads / self.kv_heads;
        let q = q.reshape((b, self.kv_heads, rep * t, d))?;
        // Only this path needs the mask as a tensor.
        let o = if let Some(m) = mask.map(CausalMask::tensor).transpose()? {
            // Rows of the folded scores are (kv head, rep, query): query index = row % t.
            let scale = (d as f64).powf(-0.5);
            let dtype = q.dtype();
            let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
            crate::model::nn::masked_softmax(&scores, m)?
                .to_dtype(dtype)?
                .matmul(&v)?
        } else {
            attention(&q, &k, &v, (d as f64).powf(-0.5), None)?
        };
        let o = o
            .reshape((b, self.heads, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, self.heads * d))?;
        let x = (x + self.o.forward(&o)?)?;
        self.mlp(x, Linear::forward)
    }

    /// One new position of each sequence of a decode batch: `x` `(sequences, hidden)`, one row per
    /// cache, each at its own position. Products read each weight once for all rows
    /// ([`Linear::forward_batch`]); attention runs per sequence on its own cache. Every row comes out
    /// bit-identical to [`Self::forward`] of that sequence alone.
    fn decode_batch(
        &self,
        x: &Tensor,
        rope: &Rope,
        caches: &mut [&mut KvCache],
        positions: &[usize],
        layer: usize,
    ) -> Result<Tensor> {
        let y = self.input_norm.forward(x)?;
        let (fused, parts) = match &self.qkv {
            ProjectionGroup::Fused { linear, .. } => (Some(linear.forward_batch(&y)?), Vec::new()),
            ProjectionGroup::Separate(_) => (None, self.qkv.forward_each_batch(&y)?),
        };
        let batched = match &fused {
            Some(all) => self.decode_steps(all, rope, caches, positions, layer)?,
            None => None,
        };
        if let Some(o) = batched {
            let x = (x + self.o.forward_batch(&o)?)?;
            return self.mlp(x, Linear::forward_batch);
        }
        let mut outs = Vec::with_capacity(caches.len());
        for (i, (cache, &offset)) in caches.iter_mut().zip(positions).enumerate() {
            let o = match &fused {
                Some(all) => self.attend_row(&all.narrow(0, i, 1)?, rope, cache, layer, offset)?,
                None => {
                    let row = parts
                        .iter()
                        .map(|p| p.narrow(0, i, 1))
                        .collect::<std::result::Result<Vec<_>, _>>()?;
                    self.attend_row_parts(&row, rope, cache, layer, offset)?
                }
            };
            outs.push(o.reshape((1, self.heads * self.head_dim))?);
        }
        let o = Tensor::cat(&outs, 0)?;
        let x = (x + self.o.forward_batch(&o)?)?;
        self.mlp(x, Linear::forward_batch)
    }

    /// Attention of one new position from its stacked `[q | k | v]` projection row: the fast path on
    /// f32 CPU tensors ([`Self::decode_step`]), else the general one on the row's three parts.
    fn attend_row(
        &self,
        qkv: &Tensor,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
        offset: usize,
    ) -> Result<Tensor> {
        if let Some(o) = self.decode_step(qkv, rope, cache, layer, offset)? {
            return Ok(o);
        }
        let (q_w, kv_w) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let last = qkv.rank() - 1;
        let parts = [
            qkv.narrow(last, 0, q_w)?,
            qkv.narrow(last, q_w, kv_w)?,
            qkv.narrow(last, q_w + kv_w, kv_w)?,
        ];
        self.attend_row_parts(&parts, rope, cache, layer, offset)
    }

    /// Attention of one new position from its separate q, k and v rows, on any device or type:
    /// RoPE, the cache append, the decode kernel where it applies, else plain attention;
    /// `(1, 1, heads·d)`.
    fn attend_row_parts(
        &self,
        qkv: &[Tensor],
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
        offset: usize,
    ) -> Result<Tensor> {
        let d = self.head_dim;
        let [q, k, v] = qkv else {
            return Err(Error::Internal("attention projections missing".into()));
        };
        let heads =
            |t: &Tensor, n: usize| -> Result<Tensor> { Ok(t.reshape((1, n, 1, d))?.contiguous()?) };
        let q = rope.apply(&heads(q, self.heads)?, Positions::From(offset))?;
        let k = rope.apply(&heads(k, self.kv_heads)?, Positions::From(offset))?;
        let v = heads(v, self.kv_heads)?;
        let (k, v) = cache.append(layer, &k, &v)?;
        if let Some(o) = decode_attention(&q, &k, &v, self.kv_heads, d)? {
            return Ok(o);
        }
        let (k, v) = (k.to_dtype(q.dtype())?, v.to_dtype(q.dtype())?);
        let rep = self.heads / self.kv_heads;
        let q = q.reshape((1, self.kv_heads, rep, d))?;
        let o = attention(&q, &k, &v, (d as f64).powf(-0.5), None)?;
        Ok(o.reshape((1, 1, self.heads * d))?)
    }

    /// Attention of one new position from its stacked `[q | k | v]` row: [`Self::decode_steps`] for
    /// a batch of one; `(1, 1, heads·d)`. `None` where it does not apply.
    fn decode_step(
        &self,
        qkv: &Tensor,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
        offset: usize,
    ) -> Result<Option<Tensor>> {
        let row = qkv.reshape((1, qkv.elem_count()))?;
        let out = self.decode_steps(&row, rope, &mut [cache], &[offset], layer)?;
        Ok(out
            .map(|o| o.reshape((1, 1, self.heads * self.head_dim)))
            .transpose()?)
    }

    /// Attention of the new position of every sequence of a decode batch from their stacked
    /// `[q | k | v]` rows `(sequences, width)` on f32 CPU tensors, without the general path's tensor
    /// reshapes: each row's query and key rotated in place of candle's RoPE op (the same
    /// arithmetic), its keys and values written to its cache, then one attention pass over all the
    /// sequences at once
    /// ([`decode_attention_batch`](crate::kernels::attention::decode_attention_batch), each output
    /// bit-identical to the sequence's alone); `(sequences, heads·d)`. `None`, with no cache
    /// touched, where it does not apply (not f32 on the CPU, RoPE tables it does not read).
    fn decode_steps(
        &self,
        qkv: &Tensor,
        rope: &Rope,
        caches: &mut [&mut KvCache],
        positions: &[usize],
        layer: usize,
    ) -> Result<Option<Tensor>> {
        use crate::kernels::attention::{decode_attention_batch, DecodeQuery, KvView};
        let (d, heads, kv, n) = (self.head_dim, self.heads, self.kv_heads, caches.len());
        if n == 0 || positions.len() != n || qkv.dims() != [n, (heads + 2 * kv) * d] {
            return Ok(None);
        }
        let rows = with_cpu_f32(qkv, |all| -> Option<Vec<_>> {
            all.chunks_exact((heads + 2 * kv) * d)
                .zip(positions)
                .map(|(row, &offset)| {
                    let (q, rest) = row.split_at(heads * d);
                    let (k, v) = rest.split_at(kv * d);
                    let (mut q, mut k) = (q.to_vec(), k.to_vec());
                    let rotated =
                        rope.rotate_one(&mut q, d, offset) && rope.rotate_one(&mut k, d, offset);
                    rotated.then(|| (q, k, v.to_vec()))
                })
                .collect()
        })?
        .flatten();
        let Some(rows) = rows else {
            return Ok(None);
        };
        let dev = qkv.device();
        let mut cached = Vec::with_capacity(n);
        let mut queries = Vec::with_capacity(n);
        for (cache, (q, k, v)) in caches.iter_mut().zip(rows) {
            let k = Tensor::from_vec(k, (1, kv, 1, d), dev)?;
            let v = Tensor::from_vec(v, (1, kv, 1, d), dev)?;
            cached.push(cache.append(layer, &k, &v)?);
            queries.push(q);
        }
        let mut out = vec![0f32; n * heads * d];
        let scale = (d as f32).powf(-0.5);
        fn attend<T: crate::kernels::attention::CacheElement>(
            queries: &[Vec<f32>],
            views: &[KvView<T>],
            out: &mut [f32],
            d: usize,
            scale: f32,
        ) {
            let mut batch: Vec<_> = queries
                .iter()
                .zip(views)
                .zip(out.chunks_exact_mut(queries.first().map_or(1, Vec::len)))
                .map(|((q, &kv), out)| DecodeQuery { q, kv, out })
                .collect();
            decode_attention_batch(&mut batch, d, scale);
        }
        let done = match cached[0].0.dtype() {
            DType::F16 => with_cache_views::<half::f16, _>(&cached, kv, d, |views| {
                attend(&queries, views, &mut out, d, scale)
            })?,
            _ => with_cache_views::<f32, _>(&cached, kv, d, |views| {
                attend(&queries, views, &mut out, d, scale)
            })?,
        };
        match done {
            Some(()) => Ok(Some(Tensor::from_vec(out, (n, heads * d), dev)?)),
            None => Err(Error::Internal(
                "KV cache layout changed under the decode step".into(),
            )),
        }
    }

    /// The residual MLP half of the block, its products run by `forward` ([`Linear::forward`], or
    /// [`Linear::forward_batch`] for a decode batch).
    fn mlp(&self, x: Tensor, forward: fn(&Linear, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let y = self.post_norm.forward(&x)?;
        let act = match &self.gate_up {
            ProjectionGroup::Fused { linear, .. } => {
                silu_mul_stacked(&forward(linear, &y)?, self.intermediate)?
            }
            ProjectionGroup::Separate(ls) => {
                let (Some(g), Some(u)) = (ls.first(), ls.get(1)) else {
                    return Err(Error::Internal("MLP projections missing".into()));
                };
                (candle_nn::ops::silu(&forward(g, &y)?)? * forward(u, &y)?)?
            }
        };
        let y = forward(&self.down, &act)?;
        Ok((x + y)?)
    }
}

/// One new position (`q` `(1, heads, 1, d)`) over the cached keys and values `(1, kv_heads, len, d)`
/// with the dedicated decode kernel; `(1, 1, heads·d)`. `None` where it does not apply (not f32 on
/// the CPU, or a layout it does not read), and the general path runs instead.
fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kv_heads: usize,
    d: usize,
) -> Result<Option<Tensor>> {
    let q = q.contiguous()?;
    Ok(
        with_cpu_f32(&q, |qs| attend_one(qs, k, v, kv_heads, d, q.device()))?
            .transpose()?
            .flatten(),
    )
}

/// The decode kernel for the query heads `q` (`heads × d` values) over the cached keys and values;
/// `(1, 1, heads·d)` on `device`, `None` where the cache is not one [`with_cache_view`] reads.
fn attend_one(
    q: &[f32],
    k: &Tensor,
    v: &Tensor,
    kv_heads: usize,
    d: usize,
    device: &Device,
) -> Result<Option<Tensor>> {
    use crate::kernels::attention::decode_attention;
    let (scale, n) = ((d as f32).powf(-0.5), q.len());
    let mut out = vec![0f32; n];
    let done = match k.dtype() {
        DType::F16 => with_cache_view::<half::f16, _>(k, v, kv_heads, d, |kv| {
            decode_attention(q, kv, d, scale, &mut out)
        })?,
        _ => with_cache_view::<f32, _>(k, v, kv_heads, d, |kv| {
            decode_attention(q, kv, d, scale, &mut out)
        })?,
    };
    done.map(|()| Ok(Tensor::from_vec(out, (1, 1, n), device)?))
        .transpose()
}

/// The `t` new positions of `q` `(1, heads, t, d)` over the cached keys and values
/// `(1, kv_heads, offset + t, d)` under the causal mask, with the prompt kernel; `(1, t, heads·d)`.
/// `None` where it does not apply, as for [`decode_attention`].
fn prefill_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kv_heads: usize,
    d: usize,
) -> Result<Option<Tensor>> {
    let (b, heads, t, _) = q.dims4()?;
    if b != 1 {
        return Ok(None);
    }
    let out = with_cache_view(k, v, kv_heads, d, |kv| {
        with_cpu_f32(q, |qs| {
            let mut out = vec![0f32; t * heads * d];
            let scale = (d as f32).powf(-0.5);
            crate::kernels::attention::prefill_attention(qs, t, kv, d, scale, &mut out);
            out
        })
    })?;
    match out.transpose()?.flatten() {
        Some(out) => Ok(Some(Tensor::from_vec(out, (1, t, heads * d), q.device())?)),
        None => Ok(None),
    }
}

/// Run `f` on the cached keys and values `(1, kv_heads, len, d)` read in place, where they are CPU
/// tensors of `T` with positions `d` apart (`None` otherwise).
fn with_cache_view<T: candle_core::WithDType, R>(
    k: &Tensor,
    v: &Tensor,
    kv_heads: usize,
    d: usize,
    f: impl FnOnce(crate::kernels::attention::KvView<T>) -> R,
) -> Result<Option<R>> {
    with_cache_views(&[(k.clone(), v.clone())], kv_heads, d, |views| f(views[0]))
}

/// [`with_cache_view`] for several sequences' caches at once (a decode batch): `f` runs on all
/// their views, or (`None`) not at all where one of them is not read in place.
fn with_cache_views<T: candle_core::WithDType, R>(
    caches: &[(Tensor, Tensor)],
    kv_heads: usize,
    d: usize,
    f: impl FnOnce(&[crate::kernels::attention::KvView<T>]) -> R,
) -> Result<Option<R>> {
    use crate::kernels::attention::{CacheView, KvView};
    use candle_core::Storage;
    if kv_heads == 0 {
        return Ok(None);
    }
    for (k, v) in caches {
        if [k.dtype(), v.dtype()] != [T::DTYPE; 2] || v.dim(2)? != k.dim(2)? {
            return Ok(None);
        }
    }
    let held: Vec<_> = caches
        .iter()
        .map(|(k, v)| (k.dims()[2], k.storage_and_layout(), v.storage_and_layout()))
        .collect();
    // The positions of each head `d` values apart, the last head's `len` inside the storage.
    fn view<'a, T: candle_core::WithDType>(
        storage: &'a Storage,
        layout: &candle_core::Layout,
        kv_heads: usize,
        d: usize,
        len: usize,
    ) -> Result<Option<CacheView<'a, T>>> {
        let Storage::Cpu(cpu) = storage else {
            return Ok(None);
        };
        let stride = layout.stride();
        if stride.len() != 4 || stride[2] != d || stride[3] != 1 {
            return Ok(None);
        }
        let (data, start, head_stride) = (cpu.as_slice::<T>()?, layout.start_offset(), stride[1]);
        Ok(
            (start + (kv_heads - 1) * head_stride + len * d <= data.len()).then(|| CacheView {
                data: &data[start..],
                head_stride,
            }),
        )
    }
    let mut views = Vec::with_capacity(caches.len());
    for &(len, (ref kg, kl), (ref vg, vl)) in &held {
        let (Some(k), Some(v)) = (
            view::<T>(kg, kl, kv_heads, d, len)?,
            view::<T>(vg, vl, kv_heads, d, len)?,
        ) else {
            return Ok(None);
        };
        views.push(KvView {
            k,
            v,
            kv_heads,
            len,
        });
    }
    Ok(Some(f(&views)))
}

/// Llama decoder with its embedding table and LM head.
pub struct TextModel {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    dtype: DType,
    device: Device,
    cfg: TextConfig,
}

impl TextModel {
    /// Load the decoder from `model.text_model.*` and the head from `lm_head.*` (or the tied embedding).
    pub fn load(
        w: &Weights,
        head: &Weights,
        cfg: &TextConfig,
        tie_word_embeddings: bool,
    ) -> Result<Self> {
        let tied = tie_word_embeddings && !head.contains("weight");
        let table = w.pp("embed_tokens");
        let shape = [cfg.vocab_size, cfg.hidden_size];
        // An untied table is only ever looked up row by row: keep it in the checkpoint's bf16/f16
        // (rows expand exactly to f32 when looked up) instead of an f32 copy twice the size.
        let stored = table.store().raw(&table.path("weight"))?.0;
        let keep_half = !tied
            && w.opts.dtype == DType::F32
            && w.opts.device.is_cpu()
            && matches!(stored, DType::BF16 | DType::F16);
        // A quantized table (mlx-vlm quantizes embeddings too) is looked up row by row as it is.
        let embed_tokens = if table.contains("scales") {
            Embedding::Affine(std::sync::Arc::new(super::nn::load_affine(
                &table,
                cfg.hidden_size,
                cfg.vocab_size,
            )?))
        } else {
            Embedding::Dense(if keep_half {
                table
                    .store()
                    .get(&table.path("weight"), &shape, stored, &w.opts.device)?
            } else {
                table.get("weight", &shape)?
            })
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(&w.pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if tied {
            embed_tokens
                .tied_head()?
                .with_tile_inputs(w.opts.tile_inputs())
        } else {
            Linear::load(head, cfg.hidden_size, cfg.vocab_size, false)?
        };
        let norm = RmsNorm::load(&w.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        Self::from_parts(
            embed_tokens,
            layers,
            norm,
            lm_head,
            cfg,
            w.opts.dtype,
            &w.opts.device,
        )
    }

    /// Assemble a decoder from loaded parts (the RoPE tables are built here).
    pub fn from_parts(
        embed_tokens: Embedding,
        layers: Vec<DecoderLayer>,
        norm: RmsNorm,
        lm_head: Linear,
        cfg: &TextConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let rope = Rope::new(cfg, cfg.max_position_embeddings, dtype, device)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            dtype,
            device: device.clone(),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The type the decoder computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A KV cache for this model holding up to `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(self.layers.len(), capacity)
    }

    /// Token embeddings `(n, hidden)` for `ids`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(Error::ModelInput(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        self.embed_tokens.lookup(ids, self.dtype, &self.device)
    }

    /// Run `embeds` `(1, t, hidden)` at rotary positions `cache.len()..` (a Llama's; see
    /// [`Self::forward_at`]) and return logits as [`Self::forward_at`] does.
    pub fn forward(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        all_logits: bool,
    ) -> Result<Tensor> {
        self.forward_at(embeds, Positions::From(cache.len()), cache, all_logits)
    }

    /// Run `embeds` `(1, t, hidden)` at the rotary `positions` given (their keys and values go to
    /// cache slots `cache.len()..`) and return logits `(t, vocab)` for every position when
    /// `all_logits`, else `(1, vocab)` for the last one. Logits are f32.
    pub fn forward_at(
        &self,
        embeds: &Tensor,
        positions: Positions,
        cache: &mut KvCache,
        all_logits: bool,
    ) -> Result<Tensor> {
        // Run the whole pass on a worker of the thread pool: its products then split work with the
        // other workers directly, instead of each of the ~200 products per token being handed over
        // from (and back to) a thread outside the pool.
        rayon::scope(|_| self.forward_in_pool(embeds, positions, cache, all_logits))
    }

    /// One decode step for several sequences at once: `tokens[i]` goes in at rotary position
    /// `positions[i]`, appended to its own cache `caches[i]`; returns logits `(sequences, vocab)`
    /// in f32. Each row is bit-identical to [`Self::forward_at`] of that token alone on that cache,
    /// so a sequence's answer does not depend on what it was batched with; the weights are read
    /// once for all of them.
    pub fn decode_batch(
        &self,
        tokens: &[u32],
        positions: &[usize],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        if tokens.len() != caches.len() || positions.len() != caches.len() || tokens.is_empty() {
            return Err(Error::ModelInput(format!(
                "{} tokens and {} positions for {} caches",
                tokens.len(),
                positions.len(),
                caches.len()
            )));
        }
        rayon::scope(|_| {
            let mut x = self.embed(tokens)?;
            for (i, layer) in self.layers.iter().enumerate() {
                x = layer.decode_batch(&x, &self.rope, caches, positions, i)?;
            }
            for c in caches.iter_mut() {
                c.advance(1);
            }
            let x = self.norm.forward(&x)?;
            Ok(self.lm_head.forward_batch(&x)?.to_dtype(DType::F32)?)
        })
    }

    fn forward_in_pool(
        &self,
        embeds: &Tensor,
        positions: Positions,
        cache: &mut KvCache,
        all_logits: bool,
    ) -> Result<Tensor> {
        let (_, t, _) = embeds.dims3()?;
        let offset = cache.len();
        let mask = (t > 1).then(|| CausalMask::new(t, offset, embeds.device()));
        let mut x = embeds.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &self.rope, cache, i, positions, mask.as_ref())?;
        }
        cache.advance(t);
        let x = if all_logits {
            x
        } else {
            x.narrow(1, t - 1, 1)?
        };
        let x = self.norm.forward(&x)?;
        let logits = self.lm_head.forward(&x)?.squeeze(0)?;
        Ok(logits.to_dtype(DType::F32)?)
    }
}

/// The causal mask of a pass over `t` new positions after `offset` cached ones, built as a tensor only
/// if some layer takes the general attention path (the prompt kernel applies it as it goes).
struct CausalMask {
    t: usize,
    offset: usize,
    device: Device,
    tensor: std::sync::OnceLock<Tensor>,
}

impl CausalMask {
    fn new(t: usize, offset: usize, device: &Device) -> Self {
        Self {
            t,
            offset,
            device: device.clone(),
            tensor: std::sync::OnceLock::new(),
        }
    }

    fn tensor(&self) -> Result<&Tensor> {
        if let Some(m) = self.tensor.get() {
            return Ok(m);
        }
        let m = causal_mask(self.t, self.offset, &self.device)?;
        Ok(self.tensor.get_or_init(|| m))
    }
}

/// `(t, offset + t)` additive mask: query `i` sees keys `0..=offset + i`.
fn causal_mask(t: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let s = offset + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j <= offset + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (t, s), device)?)
}
