//! The SigLIP vision transformer of Idefics3 (`Idefics3VisionTransformer`), with NaViT-style position ids
//! for partially padded images.

use candle_core::Tensor;

use super::nn::{
    attention, fused_qkv_attention, gelu_tanh, LayerNorm, Linear, ProjectionGroup, Weights,
};
use crate::config::VisionConfig;
use crate::error::{Error, Result};
use crate::kernels::encoder_attention::EncoderAttentionShape;

/// Padding keys of each tile: `bias[b·n + j]` is 0 for a real patch, -inf for padding.
struct KeyMask {
    bias: Vec<f32>,
    /// The same values as a `(batch, 1, 1, n)` tensor for the general path.
    tensor: Tensor,
}

struct EncoderLayer {
    ln1: LayerNorm,
    /// `[q | k | v]`.
    qkv: ProjectionGroup,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    head_dim: usize,
    exact_gelu: bool,
    /// Attention products on AMX tiles where the CPU has them (as the bf16 projections).
    tiles: bool,
}

impl EncoderLayer {
    fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let a = w.pp("self_attn");
        let q = Linear::load(&a.pp("q_proj"), h, h, true)?;
        let k = Linear::load(&a.pp("k_proj"), h, h, true)?;
        let v = Linear::load(&a.pp("v_proj"), h, h, true)?;
        let qkv = ProjectionGroup::new(vec![(q, h), (k, h), (v, h)])?;
        Ok(Self {
            ln1: LayerNorm::load(&w.pp("layer_norm1"), h, cfg.layer_norm_eps)?,
            qkv,
            out: Linear::load(&a.pp("out_proj"), h, h, true)?,
            ln2: LayerNorm::load(&w.pp("layer_norm2"), h, cfg.layer_norm_eps)?,
            fc1: Linear::load(&w.pp("mlp").pp("fc1"), h, cfg.intermediate_size, true)?,
            fc2: Linear::load(&w.pp("mlp").pp("fc2"), cfg.intermediate_size, h, true)?,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            exact_gelu: cfg.hidden_act == "gelu",
            tiles: w.opts.bf16_tiles,
        })
    }

    /// Self-attention of `y` `(b, n, h)`, before the out-projection: `(b, n, h)`.
    fn attend(&self, y: &Tensor, mask: Option<&KeyMask>) -> Result<Tensor> {
        let (b, n, h) = y.dims3()?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let mut parts = match self.qkv.fused() {
            Some(f) => {
                let qkv = f.forward(y)?;
                let shape = EncoderAttentionShape {
                    batch: b,
                    seq: n,
                    heads: self.heads,
                    head_dim: self.head_dim,
                };
                let key_bias = mask.map(|m| m.bias.as_slice());
                if let Some(o) = fused_qkv_attention(&qkv, shape, self.tiles, key_bias)? {
                    return Ok(o);
                }
                vec![
                    qkv.narrow(2, 0, h)?,
                    qkv.narrow(2, h, h)?,
                    qkv.narrow(2, 2 * h, h)?,
                ]
            }
            None => self.qkv.forward_each(y)?,
        }
        .into_iter();
        let (Some(q), Some(k), Some(v)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Error::Internal("attention projections missing".into()));
        };
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, n, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let o = attention(
            &split(q)?,
            &split(k)?,
            &split(v)?,
            scale,
            mask.map(|m| &m.tensor),
        )?;
        Ok(o.transpose(1, 2)?.reshape((b, n, h))?)
    }

    fn forward(&self, x: &Tensor, mask: Option<&KeyMask>) -> Result<Tensor> {
        let o = self.attend(&self.ln1.forward(x)?, mask)?;
        let x = (x + self.out.forward(&o)?)?;
        let y = self.fc1.forward(&self.ln2.forward(&x)?)?;
        let y = if self.exact_gelu {
            y.gelu_erf()?
        } else {
            gelu_tanh(&y)?
        };
        Ok((x + self.fc2.forward(&y)?)?)
    }
}

/// Vision encoder: patch embedding, position embedding, encoder layers, post-layernorm.
pub struct VisionTransformer {
    patch_embed: Linear,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    cfg: VisionConfig,
}

impl VisionTransformer {
    /// Load from `model.vision_model.*`.
    pub fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let p = cfg.patch_size;
        let c = cfg.num_channels;
        let e = w.pp("embeddings");
        // The stride-p conv is a linear map of each flattened (c, p, p) patch.
        let conv = e.pp("patch_embedding");
        let weight = conv.get("weight", &[h, c, p, p])?.reshape((h, c * p * p))?;
        let bias = conv.get("bias", &[h])?;
        let patch_embed = Linear::dense(&weight, Some(bias))?;
        let n = cfg.patches_per_side() * cfg.patches_per_side();
        let table = e.pp("position_embedding");
        let position_embedding = if table.contains("scales") {
            // mlx-vlm may quantize this table like a linear layer: read it back dense.
            let q = super::nn::load_affine(&table, h, n)?;
            let mut values = vec![0f32; n * h];
            for (r, row) in values.chunks_exact_mut(h).enumerate() {
                q.dequantize_row(r, row);
            }
            Tensor::from_vec(values, (n, h), &w.opts.device)?.to_dtype(w.opts.dtype)?
        } else {
            table.get("weight", &[n, h])?
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::load(&w.pp("encoder").pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embed,
            position_embedding,
            layers,
            post_layernorm: LayerNorm::load(&w.pp("post_layernorm"), h, cfg.layer_norm_eps)?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// Encode `pixel_values` `(batch, channels, H, W)` (pixels past the last whole patch are ignored) into
    /// `(batch, patches, hidden)`. `patch_mask[b]` is the row-major `(H/p, W/p)` grid of patches that hold
    /// image pixels; `None` means every patch does.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        patch_mask: Option<&[Vec<bool>]>,
    ) -> Result<Tensor> {
        let (b, c, hgt, wid) = pixel_values.dims4()?;
        let p = self.cfg.patch_size;
        if c != self.cfg.num_channels || hgt < p || wid < p {
            return Err(Error::ModelInput(format!(
                "pixel values of shape {:?} do not fit {}-channel {p}x{p} patches",
                pixel_values.dims(),
                self.cfg.num_channels
            )));
        }
        // A 'valid' stride-p convolution ignores the pixels past the last whole patch.
        let (nh, nw) = (hgt / p, wid / p);
        let x = pixel_values
            .narrow(2, 0, nh * p)?
            .narrow(3, 0, nw * p)?
            .to_dtype(self.position_embedding.dtype())?
            .reshape((b, c, nh, p, nw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, nh * nw, c * p * p))?;
        let x = self.patch_embed.forward(&x)?;

        let device = &x.device().clone();
        let mut pos = Vec::with_capacity(b * nh * nw);
        let mut any_masked = false;
        let mut bias = Vec::with_capacity(b * nh * nw);
        for i in 0..b {
            let mask_i = patch_mask.and_then(|m| m.get(i));
            let ids = position_ids(nh, nw, self.cfg.patches_per_side(), mask_i)?;
            pos.extend(ids);
            for j in 0..nh * nw {
                let keep = mask_i.map(|m| m[j]).unwrap_or(true);
                any_masked |= !keep;
                bias.push(if keep { 0f32 } else { f32::NEG_INFINITY });
            }
        }
        let pos = Tensor::from_vec(pos, b * nh * nw, device)?;
        let pos_emb = self.position_embedding.index_select(&pos, 0)?.reshape((
            b,
            nh * nw,
            self.cfg.hidden_size,
        ))?;
        let mut x = (x + pos_emb)?;
        // Padding patches are masked out as keys (queries still run, as in HF).
        let mask = if any_masked {
            Some(KeyMask {
                tensor: Tensor::from_vec(bias.clone(), (b, 1, 1, nh * nw), device)?,
                bias,
            })
        } else {
            None
        };
        for layer in &self.layers {
            x = layer.forward(&x, mask.as_ref())?;
        }
        self.post_layernorm.forward(&x)
    }
}

/// HF's bucketised position ids: each real patch gets the id of the fractional position it covers on the
/// `side × side` grid the position table was trained for; padding patches get 0. Replicates torch's f32
/// arithmetic (`arange` boundaries computed in f64 then rounded, coordinates in f32).
fn position_ids(nh: usize, nw: usize, side: usize, mask: Option<&Vec<bool>>) -> Result<Vec<u32>> {
    let full = vec![true; nh * nw];
    let mask = match mask {
        Some(m) if m.len() == nh * nw => m,
        Some(m) => {
            return Err(Error::ModelInput(format!(
                "patch mask has {} entries for a {nh}x{nw} patch grid",
                m.len()
            )))
        }
        None => &full,
    };
    // torch.arange(1/side, 1.0, 1/side): length ceil((1 - 1/side) / (1/side)), values start + i*step.
    let step = 1.0 / side as f64;
    let len = ((1.0 - step) / step).ceil().max(0.0) as usize;
    let boundaries: Vec<f32> = (0..len).map(|i| (step + i as f64 * step) as f32).collect();
    let bucket = |x: f32| boundaries.iter().take_while(|&&bd| bd <= x).count() as u32;
    // Number of real patches along the first column / first row.
    let rows = (0..nh).filter(|&r| mask[r * nw]).count().max(1);
    let cols = (0..nw).filter(|&c| mask[c]).count().max(1);
    let (step_h, step_w) = (1.0f32 / rows as f32, 1.0f32 / cols as f32);
    let cap = 1.0f32 - 1e-6;
    let mut out = Vec::with_capacity(nh * nw);
    for r in 0..nh {
        let bh = bucket((r as f32 * step_h).min(cap));
        for c in 0..nw {
            let bw = bucket((c as f32 * step_w).min(cap));
            out.push(if mask[r * nw + c] {
                bh * side as u32 + bw
            } else {
                0
            });
        }
    }
    Ok(out)
}

/// Pixel mask `(H, W)` (1 = image, 0 = padding) to the patch mask the encoder takes: a patch is real when
/// any of its pixels is.
pub fn patch_mask_from_pixels(mask: &[u8], h: usize, w: usize, patch: usize) -> Vec<bool> {
    let (nh, nw) = (h / patch, w / patch);
    let mut out = vec![false; nh * nw];
    for y in 0..nh * patch {
        for x in 0..nw * patch {
            if mask[y * w + x] != 0 {
                out[(y / patch) * nw + x / patch] = true;
            }
        }
    }
    out
}
