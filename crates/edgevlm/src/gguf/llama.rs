//! A llama-architecture decoder from GGUF tensors.
//!
//! GGUF block types map onto edgevlm's weights without loss where they can:
//! - `Q4_0` (`d·(q−8)`), `Q4_1` (`d·q+m`) and `Q8_0` (`d·q`) blocks of 32 are affine groups of 32, so
//!   they run on edgevlm's affine kernels, and they dequantize bit-exactly to what gguf-py (and so
//!   transformers) computes in f32;
//! - F32, F16 and BF16 are dense;
//! - other block types (k-quants, Q5) run on candle's `QMatMul`.
//!
//! llama.cpp's converter permutes the rows of `attn_q` and `attn_k` so that RoPE rotates adjacent pairs;
//! edgevlm's RoPE rotates halves as HF does, so those rows are put back in HF order while loading.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Tensor};
use half::{bf16, f16};

use super::GgufFile;
use crate::config::TextConfig;
use crate::error::{Error, Result};
use crate::model::nn::{Embedding, Linear, LoadOptions, RmsNorm};
use crate::model::text::{DecoderLayer, DecoderParts, TextModel};
use crate::quant::{AffineParts, AffineWeight, QuantSpec, ScaleType};

/// The decoder's hyper-parameters from `llama.*` metadata.
pub fn llama_config(f: &GgufFile) -> Result<TextConfig> {
    let arch = f.get_str("general.architecture")?.unwrap_or("");
    if arch != "llama" {
        return Err(Error::Unsupported(format!(
            "{}: GGUF architecture `{arch}` (only `llama`)",
            f.path().display()
        )));
    }
    if let Some(kind) = f.get_str("llama.rope.scaling.type")? {
        if kind != "none" && kind != "linear"
            || f.get_f64("llama.rope.scaling.factor")?
                .is_some_and(|x| x != 1.0)
        {
            return Err(Error::Unsupported(format!(
                "{}: RoPE scaling `{kind}`",
                f.path().display()
            )));
        }
    }
    let hidden = f.require_usize("llama.embedding_length")?;
    let heads = f.require_usize("llama.attention.head_count")?;
    let kv_heads = f
        .get_usize("llama.attention.head_count_kv")?
        .unwrap_or(heads);
    if heads == 0
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
        || !hidden.is_multiple_of(heads)
    {
        return Err(Error::file(
            f.path(),
            format!("{heads} attention heads, {kv_heads} KV heads and width {hidden} do not fit together"),
        ));
    }
    let head_dim = f
        .get_usize("llama.attention.key_length")?
        .unwrap_or(hidden / heads);
    let vocab = match f.get_usize("llama.vocab_size")? {
        Some(v) => v,
        None => f
            .get_strings("tokenizer.ggml.tokens")?
            .map(|t| t.len())
            .ok_or_else(|| Error::file(f.path(), "no llama.vocab_size and no tokenizer"))?,
    };
    let cfg = TextConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: f.require_usize("llama.feed_forward_length")?,
        num_hidden_layers: f.require_usize("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: f
            .get_f64("llama.attention.layer_norm_rms_epsilon")?
            .unwrap_or(1e-5),
        rope_theta: f.get_f64("llama.rope.freq_base")?.unwrap_or(10_000.0),
        max_position_embeddings: f.get_usize("llama.context_length")?.unwrap_or(2048),
        hidden_act: "silu".into(),
        attention_bias: f.contains("blk.0.attn_q.bias"),
        qkv_bias: false,
        mlp_bias: f.contains("blk.0.ffn_up.bias"),
        mrope_section: None,
    };
    cfg.validate()
        .map_err(|e| Error::file(f.path(), e.to_string()))?;
    Ok(cfg)
}

/// Bytes per row of `cols` values of `dtype`.
fn row_bytes(dtype: GgmlDType, cols: usize) -> usize {
    cols / dtype.block_size() * dtype.type_size()
}

/// Undo llama.cpp's Q/K row permutation: HF row `(h, half, i)` is GGUF row `(h, i, half)`.
fn unpermute_rows(bytes: &[u8], rows: usize, row_len: usize, heads: usize) -> Vec<u8> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let hf = h * hd + j * half + i;
                let gg = h * hd + i * 2 + j;
                out[hf * row_len..(hf + 1) * row_len]
                    .copy_from_slice(&bytes[gg * row_len..(gg + 1) * row_len]);
            }
        }
    }
    out
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Blocks of 32 as affine groups of 32 (exact: every product and sum is the one gguf-py computes).
fn blocks_to_affine(
    dtype: GgmlDType,
    bytes: &[u8],
    rows: usize,
    cols: usize,
    what: &str,
) -> Result<AffineWeight> {
    let blocks = rows * cols / 32;
    let (bits, block_len) = match dtype {
        GgmlDType::Q4_0 => (4, 18),
        GgmlDType::Q4_1 => (4, 20),
        GgmlDType::Q8_0 => (8, 34),
        other => unreachable!("{other:?} has no affine form"),
    };
    let mut scales = Vec::with_capacity(blocks);
    let mut biases = Vec::with_capacity(blocks);
    let mut packed = Vec::with_capacity(blocks * bits as usize);
    for b in bytes.chunks_exact(block_len) {
        let d = f16_at(b, 0);
        match dtype {
            GgmlDType::Q4_0 | GgmlDType::Q4_1 => {
                let (m, qs) = if dtype == GgmlDType::Q4_1 {
                    (f16_at(b, 2), &b[4..20])
                } else {
                    (-8.0 * d, &b[2..18])
                };
                scales.push(d);
                biases.push(m);
                // Element e < 16 is the low nibble of byte e, element e ≥ 16 the high nibble of e − 16.
                let nib = |e: usize| -> u32 {
                    if e < 16 {
                        u32::from(qs[e] & 0xF)
                    } else {
                        u32::from(qs[e - 16] >> 4)
                    }
                };
                for w in 0..4 {
                    packed.push((0..8).fold(0u32, |acc, j| acc | nib(8 * w + j) << (4 * j)));
                }
            }
            _ => {
                // Signed codes shifted to unsigned: d·q = d·(q+128) − 128·d, exactly.
                scales.push(d);
                biases.push(-128.0 * d);
                for w in b[2..34].chunks_exact(4) {
                    packed.push((0..4).fold(0u32, |acc, j| {
                        acc | u32::from((w[j] as i8 as i16 + 128) as u8) << (8 * j)
                    }));
                }
            }
        }
    }
    let spec = QuantSpec::new(bits, 32)?;
    AffineWeight::from_parts(
        spec,
        rows,
        cols,
        AffineParts {
            packed,
            scales,
            biases,
            scale_type: ScaleType::F32,
        },
        what,
    )
}

/// A float tensor's values as f32.
fn floats(dtype: GgmlDType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        GgmlDType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlDType::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}

fn is_float(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

fn is_affine(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0)
}

/// A `(rows, cols)` tensor's values in f32: floats as stored, blocks dequantized exactly.
fn dense_values(
    dtype: GgmlDType,
    bytes: &[u8],
    rows: usize,
    cols: usize,
    name: &str,
) -> Result<Vec<f32>> {
    Ok(if is_float(dtype) {
        floats(dtype, bytes)
    } else if is_affine(dtype) {
        let q = blocks_to_affine(dtype, bytes, rows, cols, name)?;
        let mut v = vec![0f32; rows * cols];
        for (r, row) in v.chunks_exact_mut(cols).enumerate() {
            q.dequantize_row(r, row);
        }
        v
    } else {
        let storage = QStorage::from_data(Cow::Borrowed(bytes), &candle_core::Device::Cpu, dtype)?;
        QTensor::new(storage, (rows, cols))?
            .dequantize(&candle_core::Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?
    })
}

/// The loaded form of a 2-D weight.
enum Matrix {
    Dense(Tensor),
    Affine(AffineWeight),
    Ggml(QTensor),
}

struct Loader<'a> {
    f: &'a GgufFile,
    opts: &'a LoadOptions,
}

impl Loader<'_> {
    /// Tensor `name` as `(rows, cols)`, with llama.cpp's RoPE permutation undone over `unpermute` heads.
    fn matrix(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        unpermute: Option<usize>,
        spec: Option<QuantSpec>,
    ) -> Result<Matrix> {
        let m = self.matrix_inner(name, rows, cols, unpermute, spec);
        self.f.release(name);
        m
    }

    fn matrix_inner(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        unpermute: Option<usize>,
        spec: Option<QuantSpec>,
    ) -> Result<Matrix> {
        let (e, bytes) = self.f.tensor(name)?;
        if e.shape != [rows, cols] {
            return Err(self.f.tensor_error(
                name,
                format!("shape {:?}, expected [{rows}, {cols}]", e.shape),
            ));
        }
        let dtype = e.dtype;
        let bytes: Cow<[u8]> = match unpermute {
            Some(heads) => Cow::Owned(unpermute_rows(bytes, rows, row_bytes(dtype, cols), heads)),
            None => Cow::Borrowed(bytes),
        };
        if let Some(spec) = spec {
            // Quantize on load: from the stored floats, or requantize the file's blocks from their
            // exact f32 values (as llama-quantize --allow-requantize does).
            let values = dense_values(dtype, &bytes, rows, cols, name)?;
            return Ok(Matrix::Affine(AffineWeight::quantize(
                &values,
                rows,
                cols,
                spec,
                spec.held_scale_type(self.opts.device.is_cpu()),
                name,
            )?));
        }
        Ok(if is_float(dtype) || self.opts.dequantize {
            let values = dense_values(dtype, &bytes, rows, cols, name)?;
            let t = Tensor::from_vec(values, (rows, cols), &self.opts.device)?;
            Matrix::Dense(t.to_dtype(self.opts.dtype)?)
        } else if is_affine(dtype) && self.opts.device.is_cpu() {
            Matrix::Affine(blocks_to_affine(dtype, &bytes, rows, cols, name)?)
        } else {
            let storage = QStorage::from_data(bytes, &self.opts.device, dtype)?;
            Matrix::Ggml(QTensor::new(storage, (rows, cols))?)
        })
    }

    fn linear(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        unpermute: Option<usize>,
    ) -> Result<Linear> {
        let bias_name = name.replace(".weight", ".bias");
        let bias = if self.f.contains(&bias_name) {
            let mut b = self.vector(&bias_name, rows)?;
            if let Some(heads) = unpermute {
                let v = b.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                let fixed = floats(GgmlDType::F32, &unpermute_rows(&bytes, rows, 4, heads));
                b = Tensor::from_vec(fixed, rows, &self.opts.device)?.to_dtype(self.opts.dtype)?;
            }
            Some(b)
        } else {
            None
        };
        Ok(
            match self.matrix(name, rows, cols, unpermute, self.opts.quantize)? {
                Matrix::Dense(t) => Linear::dense(&t, bias)?,
                Matrix::Affine(q) => Linear::affine(q, bias)
                    .with_tile_inputs(self.opts.tile_inputs())
                    .place(&self.opts.device, self.opts.dtype)?,
                Matrix::Ggml(q) => Linear::ggml(QMatMul::from_arc(Arc::new(q))?, bias),
            },
        )
    }

    fn vector(&self, name: &str, len: usize) -> Result<Tensor> {
        let (e, bytes) = self.f.tensor(name)?;
        if e.shape != [len] || !is_float(e.dtype) {
            return Err(self.f.tensor_error(
                name,
                format!(
                    "{:?} {:?}, expected a float vector of {len}",
                    e.dtype, e.shape
                ),
            ));
        }
        let t = Tensor::from_vec(floats(e.dtype, bytes), len, &self.opts.device)?;
        self.f.release(name);
        Ok(t.to_dtype(self.opts.dtype)?)
    }

    fn norm(&self, name: &str, cfg: &TextConfig) -> Result<RmsNorm> {
        Ok(RmsNorm::new(
            self.vector(name, cfg.hidden_size)?,
            cfg.rms_norm_eps,
        ))
    }
}

/// Load the decoder; the LM head is `output.weight`, or the embedding table when the file ties them.
pub fn load_llama(f: &GgufFile, cfg: &TextConfig, opts: &LoadOptions) -> Result<TextModel> {
    let l = Loader { f, opts };
    let (h, d) = (cfg.hidden_size, cfg.head_dim);
    // Quantizing on load keeps the embedding table (and so a tied LM head) at 8 bits, as llama.cpp's
    // Q4 files keep their output table at 8 bits or more: the head is the most sensitive layer.
    let embed_spec = opts.quantize.map(|_| QuantSpec {
        bits: 8,
        group_size: 32,
    });
    let embed = match l.matrix("token_embd.weight", cfg.vocab_size, h, None, embed_spec)? {
        Matrix::Dense(t) => Embedding::Dense(t),
        Matrix::Affine(q) => Embedding::Affine(Arc::new(q)),
        Matrix::Ggml(q) => Embedding::Dense(q.dequantize(&opts.device)?.to_dtype(opts.dtype)?),
    };
    // No room reserved from `block_count`: it is the file's word, and a forged count must meet the
    // error for its first missing block, not an allocation of its size.
    let mut layers = Vec::new();
    for i in 0..cfg.num_hidden_layers {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        layers.push(DecoderLayer::new(DecoderParts {
            input_norm: l.norm(&n("attn_norm"), cfg)?,
            q: l.linear(
                &n("attn_q"),
                cfg.num_attention_heads * d,
                h,
                Some(cfg.num_attention_heads),
            )?,
            k: l.linear(
                &n("attn_k"),
                cfg.num_key_value_heads * d,
                h,
                Some(cfg.num_key_value_heads),
            )?,
            v: l.linear(&n("attn_v"), cfg.num_key_value_heads * d, h, None)?,
            o: l.linear(&n("attn_output"), h, cfg.num_attention_heads * d, None)?,
            post_norm: l.norm(&n("ffn_norm"), cfg)?,
            gate: l.linear(&n("ffn_gate"), cfg.intermediate_size, h, None)?,
            up: l.linear(&n("ffn_up"), cfg.intermediate_size, h, None)?,
            down: l.linear(&n("ffn_down"), h, cfg.intermediate_size, None)?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: d,
        })?);
    }
    let lm_head = if f.contains("output.weight") {
        l.linear("output.weight", cfg.vocab_size, h, None)?
    } else {
        embed
            .tied_head()?
            .with_tile_inputs(opts.tile_inputs())
            .place(&opts.device, opts.dtype)?
    };
    let norm = l.norm("output_norm.weight", cfg)?;
    TextModel::from_parts(embed, layers, norm, lm_head, cfg, opts.dtype, &opts.device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(heads, 2, hd/2, ...).swapaxes(1, 2): GGUF row (h, i, j) = HF row (h, j, i).
        let (heads, hd) = (3, 8);
        let rows = heads * hd;
        let hf: Vec<u8> = (0..rows as u8).collect();
        let mut gguf = vec![0u8; rows];
        for h in 0..heads {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    gguf[h * hd + i * 2 + j] = hf[h * hd + j * hd / 2 + i];
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, rows, 1, heads), hf);
    }

    #[test]
    fn q4_1_and_q8_0_blocks_dequantize_like_gguf_py() {
        // One Q4_1 block: d = 0.5, m = -1.0, nibbles 0..15 low, 15..0 high.
        let mut b = Vec::new();
        b.extend(f16::from_f32(0.5).to_le_bytes());
        b.extend(f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let q = blocks_to_affine(GgmlDType::Q4_1, &b, 1, 32, "t").unwrap();
        let mut row = vec![0f32; 32];
        q.dequantize_row(0, &mut row);
        for (e, &got) in row.iter().enumerate() {
            let code = if e < 16 { e as f32 } else { (31 - e) as f32 };
            assert_eq!(got, 0.5 * code - 1.0, "element {e}");
        }
        // One Q8_0 block: d = 0.25, codes -128..127 stepping.
        let mut b = Vec::new();
        b.extend(f16::from_f32(0.25).to_le_bytes());
        let codes: Vec<i8> = (0..32).map(|i| (i * 8 - 128) as i8).collect();
        b.extend(codes.iter().map(|&c| c as u8));
        let q = blocks_to_affine(GgmlDType::Q8_0, &b, 1, 32, "t").unwrap();
        q.dequantize_row(0, &mut row);
        for (e, (&got, &c)) in row.iter().zip(&codes).enumerate() {
            assert_eq!(got, 0.25 * f32::from(c), "element {e}");
        }
        // Q4_0: d·(q − 8).
        let mut b = Vec::new();
        b.extend(f16::from_f32(2.0).to_le_bytes());
        b.extend((0..16u8).map(|j| j | (j << 4)));
        let q = blocks_to_affine(GgmlDType::Q4_0, &b, 1, 32, "t").unwrap();
        q.dequantize_row(0, &mut row);
        for (e, &got) in row.iter().enumerate() {
            assert_eq!(got, 2.0 * ((e % 16) as f32 - 8.0), "element {e}");
        }
    }
}
