//! Whisper (`WhisperForConditionalGeneration`): a convolutional front end and a pre-LayerNorm
//! transformer encoder over 30 s of log-mel frames, and a decoder with causal self-attention (a KV
//! cache) and cross-attention over the encoded audio, its head tied to the token embedding.
//!
//! The projections are the engine's [`Linear`] layers (dense f32, 16-bit weights computed in f32, or
//! 8-/4-bit affine codes on the same kernels as the VLM decoders); the encoder's attention runs the
//! encoder-attention kernel, the decoder's the KV-cache kernels of [`crate::kernels::attention`].
//! The decoder's caches are plain f32 buffers on the CPU: Whisper runs on the CPU.

pub mod config;

use candle_core::{DType, Device, Tensor};

pub use config::WhisperConfig;

use super::nn::{
    fused_qkv_attention, gelu_erf, Embedding, LayerNorm, Linear, LinearWeight, LoadOptions,
    ProjectionGroup, Weights,
};
use crate::error::{Error, Result};
use crate::kernels::attention::{decode_attention, prefill_attention, CacheView, KvView};
use crate::kernels::encoder_attention::EncoderAttentionShape;

/// LayerNorm epsilon of every Whisper norm (torch's default).
const LN_EPS: f64 = 1e-5;

/// The values of a CPU tensor (any layout), as f32.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// `[q | k | v]` projections with Whisper's missing k bias stood in by zeros, so the three stack.
fn qkv_group(w: &Weights, d: usize) -> Result<ProjectionGroup> {
    let q = Linear::load(&w.pp("q_proj"), d, d, true)?;
    let k = Linear::load(&w.pp("k_proj"), d, d, false)?.with_bias(Tensor::zeros(
        d,
        w.opts.dtype,
        &w.opts.device,
    )?);
    let v = Linear::load(&w.pp("v_proj"), d, d, true)?;
    ProjectionGroup::new(vec![(q, d), (k, d), (v, d)])
}

/// A kernel-size-3, padding-1 Conv1d as one product over gathered windows.
struct Conv1d {
    /// `(out, in · 3)`, the weight's own `(out, in, 3)` order.
    linear: Linear,
    in_channels: usize,
    stride: usize,
}

impl Conv1d {
    fn load(w: &Weights, in_channels: usize, out: usize, stride: usize) -> Result<Self> {
        let weight = w
            .get("weight", &[out, in_channels, 3])?
            .reshape((out, in_channels * 3))?;
        let bias = w.get("bias", &[out])?;
        Ok(Self {
            linear: Linear::dense(
                &weight.to_dtype(DType::F32)?,
                Some(bias.to_dtype(DType::F32)?),
            )?,
            in_channels,
            stride,
        })
    }

    /// `x` `(in, frames)` row-major (channels first, as the mel features are) → `(frames / stride,
    /// out)` rows, GELU applied.
    fn forward_channels_first(&self, x: &[f32], frames: usize) -> Result<Tensor> {
        let c = self.in_channels;
        let out_frames = frames.div_ceil(self.stride);
        let mut cols = vec![0f32; out_frames * c * 3];
        for (t, row) in cols.chunks_exact_mut(c * 3).enumerate() {
            let centre = (t * self.stride) as isize;
            for ch in 0..c {
                for k in 0..3 {
                    let src = centre + k as isize - 1;
                    if (0..frames as isize).contains(&src) {
                        row[ch * 3 + k] = x[ch * frames + src as usize];
                    }
                }
            }
        }
        let cols = Tensor::from_vec(cols, (out_frames, c * 3), &Device::Cpu)?;
        gelu_erf(&self.linear.forward(&cols)?)
    }

    /// `x` `(frames, in)` rows → `(frames / stride, out)` rows, GELU applied.
    fn forward_rows(&self, x: &[f32], frames: usize) -> Result<Tensor> {
        let c = self.in_channels;
        let out_frames = frames.div_ceil(self.stride);
        let mut cols = vec![0f32; out_frames * c * 3];
        for (t, row) in cols.chunks_exact_mut(c * 3).enumerate() {
            let centre = (t * self.stride) as isize;
            for k in 0..3 {
                let src = centre + k as isize - 1;
                if (0..frames as isize).contains(&src) {
                    let from = &x[src as usize * c..][..c];
                    for (ch, &v) in from.iter().enumerate() {
                        row[ch * 3 + k] = v;
                    }
                }
            }
        }
        let cols = Tensor::from_vec(cols, (out_frames, c * 3), &Device::Cpu)?;
        gelu_erf(&self.linear.forward(&cols)?)
    }
}

struct EncoderLayer {
    ln1: LayerNorm,
    qkv: ProjectionGroup,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    /// Attention on AMX tiles (bf16 inputs, f32 sums) where the CPU has them.
    tiles: bool,
}

impl EncoderLayer {
    fn load(w: &Weights, cfg: &WhisperConfig) -> Result<Self> {
        let d = cfg.d_model;
        let a = w.pp("self_attn");
        Ok(Self {
            ln1: LayerNorm::load(&w.pp("self_attn_layer_norm"), d, LN_EPS)?,
            qkv: qkv_group(&a, d)?,
            out: Linear::load(&a.pp("out_proj"), d, d, true)?,
            ln2: LayerNorm::load(&w.pp("final_layer_norm"), d, LN_EPS)?,
            fc1: Linear::load(&w.pp("fc1"), d, cfg.encoder_ffn_dim, true)?,
            fc2: Linear::load(&w.pp("fc2"), cfg.encoder_ffn_dim, d, true)?,
            heads: cfg.encoder_attention_heads,
            tiles: w.opts.bf16_tiles,
        })
    }

    /// `x` `(n, d)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        let y = self.ln1.forward(x)?;
        let parts = self.qkv.forward_each(&y)?;
        let qkv = Tensor::cat(&parts, 1)?.contiguous()?;
        let shape = EncoderAttentionShape {
            batch: 1,
            seq: n,
            heads: self.heads,
            head_dim: d / self.heads,
        };
        let o = fused_qkv_attention(&qkv, shape, self.tiles, None)?
            .ok_or_else(|| Error::Unsupported("whisper runs on the CPU in f32".into()))?
            .reshape((n, d))?;
        let x = (x + self.out.forward(&o)?)?;
        let y = gelu_erf(&self.fc1.forward(&self.ln2.forward(&x)?)?)?;
        Ok((x + self.fc2.forward(&y)?)?)
    }
}

/// The audio encoder.
pub struct Encoder {
    conv1: Conv1d,
    conv2: Conv1d,
    positions: Tensor,
    layers: Vec<EncoderLayer>,
    norm: LayerNorm,
    cfg: WhisperConfig,
}

impl Encoder {
    fn load(w: &Weights, cfg: &WhisperConfig) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Self {
            conv1: Conv1d::load(&w.pp("conv1"), cfg.num_mel_bins, d, 1)?,
            conv2: Conv1d::load(&w.pp("conv2"), d, d, 2)?,
            positions: w
                .pp("embed_positions")
                .get("weight", &[cfg.max_source_positions, d])?
                .to_dtype(DType::F32)?,
            layers: (0..cfg.encoder_layers)
                .map(|i| EncoderLayer::load(&w.pp("layers").pp(i), cfg))
                .collect::<Result<_>>()?,
            norm: LayerNorm::load(&w.pp("layer_norm"), d, LN_EPS)?,
            cfg: cfg.clone(),
        })
    }

    /// Encode one window of log-mel features `(n_mels, 2 · max_source_positions)`, row-major, into
    /// `(max_source_positions, d)`.
    pub fn forward(&self, mel: &[f32]) -> Result<Tensor> {
        let frames = self.cfg.window_frames();
        if mel.len() != self.cfg.num_mel_bins * frames {
            return Err(Error::ModelInput(format!(
                "whisper encoder: {} mel values, expected {} bins x {frames} frames",
                mel.len(),
                self.cfg.num_mel_bins
            )));
        }
        let x = self.conv1.forward_channels_first(mel, frames)?;
        let x = self.conv2.forward_rows(&values(&x)?, frames)?;
        let mut x = (x + &self.positions)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        self.norm.forward(&x)
    }
}

struct DecoderLayer {
    ln_self: LayerNorm,
    self_qkv: ProjectionGroup,
    self_out: Linear,
    ln_cross: LayerNorm,
    cross_q: Linear,
    cross_k: Linear,
    cross_v: Linear,
    cross_out: Linear,
    ln_ffn: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl DecoderLayer {
    fn load(w: &Weights, cfg: &WhisperConfig) -> Result<Self> {
        let d = cfg.d_model;
        let s = w.pp("self_attn");
        let c = w.pp("encoder_attn");
        Ok(Self {
            ln_self: LayerNorm::load(&w.pp("self_attn_layer_norm"), d, LN_EPS)?,
            self_qkv: qkv_group(&s, d)?,
            self_out: Linear::load(&s.pp("out_proj"), d, d, true)?,
            ln_cross: LayerNorm::load(&w.pp("encoder_attn_layer_norm"), d, LN_EPS)?,
            cross_q: Linear::load(&c.pp("q_proj"), d, d, true)?,
            cross_k: Linear::load(&c.pp("k_proj"), d, d, false)?,
            cross_v: Linear::load(&c.pp("v_proj"), d, d, true)?,
            cross_out: Linear::load(&c.pp("out_proj"), d, d, true)?,
            ln_ffn: LayerNorm::load(&w.pp("final_layer_norm"), d, LN_EPS)?,
            fc1: Linear::load(&w.pp("fc1"), d, cfg.decoder_ffn_dim, true)?,
            fc2: Linear::load(&w.pp("fc2"), cfg.decoder_ffn_dim, d, true)?,
        })
    }
}

/// Rows `(n, heads · d)` as `(heads, n, d)`, appended at position `at` of a `(heads, capacity, d)`
/// buffer.
fn scatter_heads(
    rows: &[f32],
    n: usize,
    heads: usize,
    d: usize,
    dst: &mut [f32],
    capacity: usize,
    at: usize,
) {
    for (i, row) in rows.chunks_exact(heads * d).take(n).enumerate() {
        for (h, part) in row.chunks_exact(d).enumerate() {
            dst[(h * capacity + at + i) * d..][..d].copy_from_slice(part);
        }
    }
}

/// One layer's cross-attention keys or values: f32, or f16 in the fast (quantized) mode, half the
/// bytes every decode step reads (1,500 positions x 512 per layer, the largest read of a step).
enum CrossValues {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
}

impl CrossValues {
    fn new(values: Vec<f32>, half: bool) -> Self {
        if half {
            CrossValues::F16(values.iter().map(|&v| half::f16::from_f32(v)).collect())
        } else {
            CrossValues::F32(values)
        }
    }
}

/// Cross-attention of each row of `q` `(rows, heads · hd)` over the `len` positions of `k`, `v`,
/// `(heads, hd, len)` given as `shape`.
fn cross_attend(
    q: &[f32],
    (k, v): (&CrossValues, &CrossValues),
    shape: (usize, usize, usize),
    scale: f32,
    out: &mut [f32],
) {
    fn run<T: crate::kernels::attention::CacheElement>(
        q: &[f32],
        (k, v): (&[T], &[T]),
        (heads, hd, len): (usize, usize, usize),
        scale: f32,
        out: &mut [f32],
    ) {
        let view = |data| CacheView {
            data,
            head_stride: len * hd,
        };
        let kv = KvView {
            k: view(k),
            v: view(v),
            kv_heads: heads,
            len,
        };
        for (qi, oi) in q
            .chunks_exact(heads * hd)
            .zip(out.chunks_exact_mut(heads * hd))
        {
            decode_attention(qi, kv, hd, scale, oi);
        }
    }
    match (k, v) {
        (CrossValues::F32(k), CrossValues::F32(v)) => run(q, (k, v), shape, scale, out),
        (CrossValues::F16(k), CrossValues::F16(v)) => run(q, (k, v), shape, scale, out),
        // Built together by `Decoder::start`, always of one type.
        _ => unreachable!("cross keys and values of different types"),
    }
}

/// One window's decoding state: the cross-attention keys and values of its encoded audio and the
/// self-attention cache of the tokens so far.
pub struct DecoderState {
    /// Per layer `(heads, source positions, d)`.
    cross_k: Vec<CrossValues>,
    cross_v: Vec<CrossValues>,
    source_len: usize,
    /// Per layer `(heads, max_target_positions, d)`.
    self_k: Vec<Vec<f32>>,
    self_v: Vec<Vec<f32>>,
    len: usize,
}

impl DecoderState {
    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forget the tokens (keep the audio): decode the same window again from the start.
    pub fn clear_tokens(&mut self) {
        self.len = 0;
    }

    /// Keep only the first `len` tokens.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

/// The text decoder.
pub struct Decoder {
    embed: Embedding,
    positions: Tensor,
    layers: Vec<DecoderLayer>,
    norm: LayerNorm,
    head: Linear,
    cfg: WhisperConfig,
    /// Cross-attention keys and values held in f16 (the quantized, fast mode).
    half_cross: bool,
}

impl Decoder {
    fn load(w: &Weights, cfg: &WhisperConfig) -> Result<Self> {
        let d = cfg.d_model;
        // The head is the embedding table (tied): loaded as a linear layer (quantized when the
        // options say), and its rows looked up from the same values.
        let head = Linear::load(&w.pp("embed_tokens"), d, cfg.vocab_size, false)?;
        let embed = match head.weight() {
            LinearWeight::Affine(q) => Embedding::Affine(q.clone()),
            LinearWeight::Dense { w } | LinearWeight::Half { w } => Embedding::Dense(w.clone()),
            _ => Embedding::Dense(w.pp("embed_tokens").get("weight", &[cfg.vocab_size, d])?),
        };
        Ok(Self {
            embed,
            positions: w
                .pp("embed_positions")
                .get("weight", &[cfg.max_target_positions, d])?
                .to_dtype(DType::F32)?,
            layers: (0..cfg.decoder_layers)
                .map(|i| DecoderLayer::load(&w.pp("layers").pp(i), cfg))
                .collect::<Result<_>>()?,
            norm: LayerNorm::load(&w.pp("layer_norm"), d, LN_EPS)?,
            head,
            cfg: cfg.clone(),
            half_cross: w.opts.quantize.is_some(),
        })
    }

    /// A decoding state over `audio` `(source positions, d)`: each layer's cross-attention keys and
    /// values, computed once.
    pub fn start(&self, audio: &Tensor) -> Result<DecoderState> {
        let (n, d) = audio.dims2()?;
        let heads = self.cfg.decoder_attention_heads;
        let hd = d / heads;
        let mut cross_k = Vec::with_capacity(self.layers.len());
        let mut cross_v = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            for (proj, dst) in [
                (&layer.cross_k, &mut cross_k),
                (&layer.cross_v, &mut cross_v),
            ] {
                let rows = values(&proj.forward(audio)?)?;
                let mut buf = vec![0f32; n * d];
                scatter_heads(&rows, n, heads, hd, &mut buf, n, 0);
                dst.push(CrossValues::new(buf, self.half_cross));
            }
        }
        let cap = self.cfg.max_target_positions * d;
        Ok(DecoderState {
            cross_k,
            cross_v,
            source_len: n,
            self_k: vec![vec![0f32; cap]; self.layers.len()],
            self_v: vec![vec![0f32; cap]; self.layers.len()],
            len: 0,
        })
    }

    /// Feed `tokens` after the ones `state` holds; the logits `(vocab)` of the last one, or of every
    /// one (`(tokens.len(), vocab)`) when `all` is set.
    pub fn forward(&self, state: &mut DecoderState, tokens: &[u32], all: bool) -> Result<Vec<f32>> {
        let t = tokens.len();
        let cap = self.cfg.max_target_positions;
        if t == 0 {
            return Err(Error::ModelInput("whisper decoder: no tokens".into()));
        }
        if state.len + t > cap {
            return Err(Error::ModelInput(format!(
                "whisper decoder: {} tokens, over its {cap} positions",
                state.len + t
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(Error::ModelInput(format!(
                "whisper decoder: token {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let d = self.cfg.d_model;
        let heads = self.cfg.decoder_attention_heads;
        let hd = d / heads;
        let scale = (hd as f32).powf(-0.5);
        let start = state.len;
        let emb = self.embed.lookup(tokens, DType::F32, &Device::Cpu)?;
        let emb = if self.cfg.scale_embedding {
            emb.affine((d as f64).sqrt(), 0.0)?
        } else {
            emb
        };
        let mut x = (emb + self.positions.narrow(0, start, t)?)?;
        let mut attn = vec![0f32; t * d];
        for (l, layer) in self.layers.iter().enumerate() {
            // Causal self-attention over the cache.
            let y = layer.ln_self.forward(&x)?;
            let parts = layer.self_qkv.forward_each(&y)?;
            let (q, k, v) = (values(&parts[0])?, values(&parts[1])?, values(&parts[2])?);
            scatter_heads(&k, t, heads, hd, &mut state.self_k[l], cap, start);
            scatter_heads(&v, t, heads, hd, &mut state.self_v[l], cap, start);
            let kv = KvView {
                k: CacheView {
                    data: &state.self_k[l],
                    head_stride: cap * hd,
                },
                v: CacheView {
                    data: &state.self_v[l],
                    head_stride: cap * hd,
                },
                kv_heads: heads,
                len: start + t,
            };
            if t == 1 {
                decode_attention(&q, kv, hd, scale, &mut attn);
            } else {
                let mut qh = vec![0f32; t * d];
                scatter_heads(&q, t, heads, hd, &mut qh, t, 0);
                prefill_attention(&qh, t, kv, hd, scale, &mut attn);
            }
            let o = Tensor::from_slice(&attn, (t, d), &Device::Cpu)?;
            x = (x + layer.self_out.forward(&o)?)?;
            // Cross-attention over the audio.
            let q = values(&layer.cross_q.forward(&layer.ln_cross.forward(&x)?)?)?;
            cross_attend(
                &q,
                (&state.cross_k[l], &state.cross_v[l]),
                (heads, hd, state.source_len),
                scale,
                &mut attn,
            );
            let o = Tensor::from_slice(&attn, (t, d), &Device::Cpu)?;
            x = (x + layer.cross_out.forward(&o)?)?;
            let y = gelu_erf(&layer.fc1.forward(&layer.ln_ffn.forward(&x)?)?)?;
            x = (x + layer.fc2.forward(&y)?)?;
        }
        state.len += t;
        let x = if all { x } else { x.narrow(0, t - 1, 1)? };
        values(&self.head.forward(&self.norm.forward(&x)?)?)
    }

    pub fn config(&self) -> &WhisperConfig {
        &self.cfg
    }
}

/// The whole model.
pub struct Whisper {
    pub encoder: Encoder,
    pub decoder: Decoder,
}

impl Whisper {
    /// Load from `model.encoder.*` / `model.decoder.*` (transformers' layout).
    pub fn load(w: &Weights, cfg: &WhisperConfig) -> Result<Self> {
        if !w.opts.device.is_cpu() {
            return Err(Error::Unsupported(
                "whisper runs on the CPU (its decoder caches are CPU buffers)".into(),
            ));
        }
        let m = w.pp("model");
        // A quantized encoder (the fast mode) holds its inputs as one bf16 on AMX tiles, as the
        // vision encoders do, and runs its attention there too; full precision stays f32.
        let fast = LoadOptions {
            bf16_tiles: w.opts.quantize.is_some() && w.opts.device.is_cpu(),
            ..w.opts.clone()
        };
        Ok(Self {
            encoder: Encoder::load(&m.with_opts(&fast).pp("encoder"), cfg)?,
            decoder: Decoder::load(&m.pp("decoder"), cfg)?,
        })
    }

    pub fn config(&self) -> &WhisperConfig {
        &self.decoder.cfg
    }
}
