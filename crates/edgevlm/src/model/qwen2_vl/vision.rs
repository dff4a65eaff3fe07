//! The Qwen2-VL / Qwen2.5-VL vision tower: patch embedding (a Conv3d whose stride is its kernel: one
//! product per patch), 2-D rotary attention, Qwen2.5's window attention, and the 2×2 patch merger.

use candle_core::{DType, Device, Tensor};

use super::config::{QwenVariant, QwenVisionConfig};
use crate::error::{Error, Result};
use crate::model::nn::{attention, with_cpu_f32, LayerNorm, Linear, RmsNorm, Weights};

enum Norm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Norm {
    fn load(w: &Weights, dim: usize, variant: QwenVariant) -> Result<Self> {
        Ok(match variant {
            QwenVariant::Qwen2 => Norm::Layer(LayerNorm::load(w, dim, 1e-6)?),
            QwenVariant::Qwen25 => Norm::Rms(RmsNorm::load(w, dim, 1e-6)?),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Layer(n) => n.forward(x),
            Norm::Rms(n) => n.forward(x),
        }
    }
}

enum Mlp {
    /// Qwen2-VL: `fc2(act(fc1(x)))`.
    Gelu {
        fc1: Linear,
        fc2: Linear,
        quick: bool,
    },
    /// Qwen2.5-VL: `down(silu(gate(x)) · up(x))`.
    SwiGlu {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::Gelu { fc1, fc2, quick } => {
                let h = fc1.forward(x)?;
                let h = if *quick {
                    (candle_nn::ops::sigmoid(&(&h * 1.702)?)? * &h)?
                } else {
                    h.gelu_erf()?
                };
                fc2.forward(&h)
            }
            Mlp::SwiGlu { gate, up, down } => {
                let h = (candle_nn::ops::silu(&gate.forward(x)?)? * up.forward(x)?)?;
                down.forward(&h)
            }
        }
    }
}

struct Block {
    norm1: Norm,
    norm2: Norm,
    qkv: Linear,
    proj: Linear,
    mlp: Mlp,
    heads: usize,
    /// AMX tiles for the attention (as for the layer's bf16 products).
    tiles: bool,
}

impl Block {
    fn load(w: &Weights, cfg: &QwenVisionConfig) -> Result<Self> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        let m = w.pp("mlp");
        let mlp = match cfg.variant {
            QwenVariant::Qwen2 => Mlp::Gelu {
                fc1: Linear::load(&m.pp("fc1"), d, i, true)?,
                fc2: Linear::load(&m.pp("fc2"), i, d, true)?,
                quick: cfg.hidden_act == "quick_gelu",
            },
            QwenVariant::Qwen25 => Mlp::SwiGlu {
                gate: Linear::load(&m.pp("gate_proj"), d, i, true)?,
                up: Linear::load(&m.pp("up_proj"), d, i, true)?,
                down: Linear::load(&m.pp("down_proj"), i, d, true)?,
            },
        };
        Ok(Self {
            norm1: Norm::load(&w.pp("norm1"), d, cfg.variant)?,
            norm2: Norm::load(&w.pp("norm2"), d, cfg.variant)?,
            qkv: Linear::load(&w.pp("attn").pp("qkv"), d, 3 * d, true)?,
            proj: Linear::load(&w.pp("attn").pp("proj"), d, d, true)?,
            mlp,
            heads: cfg.num_heads,
            tiles: w.opts.bf16_tiles,
        })
    }

    /// `x` `(n, d)`; attention within each span of `bounds` (cumulative token counts).
    fn forward(&self, x: &Tensor, rope: &(Tensor, Tensor), bounds: &[usize]) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        let hd = d / self.heads;
        let y = self.norm1.forward(x)?;
        // Rows of `[q | k | v]`, each `heads × hd`; q and k rotated in that row layout.
        let qkv = self.qkv.forward(&y)?.reshape((1, n, 3 * self.heads, hd))?;
        let (cos, sin) = rope;
        let rotate = |i: usize| -> Result<Tensor> {
            let part = qkv.narrow(2, i * self.heads, self.heads)?.contiguous()?;
            Ok(candle_nn::rotary_emb::rope_thd(&part, cos, sin)?.reshape((n, d))?)
        };
        let (q, k) = (rotate(0)?, rotate(1)?);
        let v = qkv.narrow(2, 2 * self.heads, self.heads)?.reshape((n, d))?;
        let scale = (hd as f64).powf(-0.5);
        let o = match self.attend_cpu(&q, &k, &v, bounds, scale as f32)? {
            Some(o) => o,
            None => {
                // Any device or type: per span, heads split out.
                let split = |t: &Tensor, a: usize, len: usize| -> Result<Tensor> {
                    Ok(t.narrow(0, a, len)?
                        .reshape((len, self.heads, hd))?
                        .transpose(0, 1)?
                        .contiguous()?
                        .unsqueeze(0)?)
                };
                let mut outs = Vec::with_capacity(bounds.len());
                for span in bounds.windows(2) {
                    let (a, len) = (span[0], span[1] - span[0]);
                    if len == 0 {
                        continue;
                    }
                    let o = attention(
                        &split(&q, a, len)?,
                        &split(&k, a, len)?,
                        &split(&v, a, len)?,
                        scale,
                        None,
                    )?;
                    outs.push(o.squeeze(0)?.transpose(0, 1)?.reshape((len, d))?);
                }
                Tensor::cat(&outs, 0)?
            }
        };
        let x = (x + self.proj.forward(&o)?)?;
        let y = self.mlp.forward(&self.norm2.forward(&x)?)?;
        Ok((x + y)?)
    }

    /// Attention of each span through the encoder attention kernel, read in place from the
    /// `(n, heads·hd)` rows, for f32 on the CPU (AMX tiles where the layer's inputs are rounded to
    /// bf16 anyway); `None` elsewhere.
    fn attend_cpu(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bounds: &[usize],
        scale: f32,
    ) -> Result<Option<Tensor>> {
        use crate::kernels::encoder_attention::{
            encoder_attention, EncoderAttention, EncoderAttentionShape, StridedRows,
        };
        let (n, d) = q.dims2()?;
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let out = with_cpu_f32(&q, |qs| {
            with_cpu_f32(&k, |ks| {
                with_cpu_f32(&v, |vs| {
                    let mut out = vec![0f32; n * d];
                    for span in bounds.windows(2) {
                        let (a, len) = (span[0], span[1] - span[0]);
                        if len == 0 || span[1] > n {
                            continue;
                        }
                        let rows = |data| StridedRows {
                            data,
                            offset: a * d,
                            stride: d,
                        };
                        let attention = EncoderAttention {
                            q: rows(qs),
                            k: rows(ks),
                            v: rows(vs),
                            shape: EncoderAttentionShape {
                                batch: 1,
                                seq: len,
                                heads: self.heads,
                                head_dim: d / self.heads,
                            },
                            scale,
                            key_bias: None,
                        };
                        encoder_attention(&attention, self.tiles, &mut out[a * d..span[1] * d]);
                    }
                    out
                })
            })
        })?;
        // Three nested reads: each level is `None` where its tensor is not f32 on the CPU.
        let out = match out {
            Some(inner) => match inner? {
                Some(innermost) => innermost?,
                None => None,
            },
            None => None,
        };
        match out {
            Some(o) => Ok(Some(Tensor::from_vec(o, (n, d), q.device())?)),
            None => Ok(None),
        }
    }
}

/// The tower: patches `(n, 3·2·14·14)` of one or more images to merged tokens `(n/4, text hidden)`.
pub struct QwenVision {
    patch_embed: Linear,
    blocks: Vec<Block>,
    ln_q: Norm,
    merger_fc1: Linear,
    merger_fc2: Linear,
    inv_freq: Vec<f32>,
    cfg: QwenVisionConfig,
    device: Device,
}

impl QwenVision {
    /// Load from `visual.*` (`patch_embed`, `blocks`, `merger`).
    pub fn load(w: &Weights, cfg: &QwenVisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let (p, tp) = (cfg.patch_size, cfg.temporal_patch_size);
        let patch_in = cfg.in_channels * tp * p * p;
        let conv = w
            .pp("patch_embed")
            .pp("proj")
            .get("weight", &[d, cfg.in_channels, tp, p, p])?;
        let patch_embed = Linear::dense(&conv.reshape((d, patch_in))?, None)?;
        let blocks = (0..cfg.depth)
            .map(|i| Block::load(&w.pp("blocks").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let merged = d * cfg.spatial_merge_size * cfg.spatial_merge_size;
        let m = w.pp("merger");
        // 2-D RoPE: a quarter of the head turns with the row, a quarter with the column (and the
        // other half repeats them).
        let quarter = cfg.head_dim() / 2;
        let base = cfg.rope_theta as f32;
        let inv_freq = (0..quarter / 2)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / quarter as f32))
            .collect();
        Ok(Self {
            patch_embed,
            blocks,
            ln_q: Norm::load(&m.pp("ln_q"), d, cfg.variant)?,
            merger_fc1: Linear::load(&m.pp("mlp").pp(0), merged, merged, true)?,
            merger_fc2: Linear::load(&m.pp("mlp").pp(2), merged, cfg.out_hidden_size, true)?,
            inv_freq,
            cfg: cfg.clone(),
            device: w.opts.device.clone(),
        })
    }

    pub fn config(&self) -> &QwenVisionConfig {
        &self.cfg
    }

    /// Merged image tokens `(Σ t·h·w / 4, out_hidden)` of images whose patches `pixel_values`
    /// `(Σ t·h·w, patch values)` holds, in the order of `grids` (t, h, w).
    pub fn forward(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        let m = self.cfg.spatial_merge_size;
        let unit = m * m;
        let n: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        if pixel_values.dim(0)? != n || grids.iter().any(|g| g[1] % m != 0 || g[2] % m != 0) {
            return Err(Error::ModelInput(format!(
                "{} patches for image grids {grids:?}",
                pixel_values.dim(0)?
            )));
        }
        let x = self
            .patch_embed
            .forward(&pixel_values.to_dtype(DType::F32)?)?;
        let (cos, sin) = self.rotary_tables(grids)?;
        // Window order (Qwen2.5): merge units regrouped window by window; full attention spans
        // whole frames, which that order keeps together.
        let (order, windows) = self.window_order(grids);
        let frames = frame_bounds(grids);
        let (x, cos, sin) = match &order {
            Some(order) => {
                let idx = Tensor::new(order.as_slice(), &self.device)?;
                let permute = |t: &Tensor| -> Result<Tensor> {
                    let w = t.dim(1)?;
                    Ok(t.reshape((n / unit, unit * w))?
                        .index_select(&idx, 0)?
                        .reshape((n, w))?)
                };
                (permute(&x)?, permute(&cos)?, permute(&sin)?)
            }
            None => (x, cos, sin),
        };
        let rope = (cos, sin);
        let mut x = x;
        for (i, block) in self.blocks.iter().enumerate() {
            let full = order.is_none() || self.cfg.fullatt_block_indexes.contains(&i);
            x = block.forward(&x, &rope, if full { &frames } else { &windows })?;
        }
        let d = self.cfg.hidden_size;
        let y = self.ln_q.forward(&x)?.reshape((n / unit, unit * d))?;
        let y = self.merger_fc1.forward(&y)?.gelu_erf()?;
        let y = self.merger_fc2.forward(&y)?;
        match order {
            Some(order) => {
                // Back to raster order of merge units: unit order[i] sits at row i.
                let mut back = vec![0u32; order.len()];
                for (row, &u) in order.iter().enumerate() {
                    back[u as usize] = row as u32;
                }
                let idx = Tensor::new(back.as_slice(), &self.device)?;
                Ok(y.index_select(&idx, 0)?)
            }
            None => Ok(y),
        }
    }

    /// `(n, head/2)` cos and sin of each patch's (row, column), patches in merge-block order.
    fn rotary_tables(&self, grids: &[[usize; 3]]) -> Result<(Tensor, Tensor)> {
        let m = self.cfg.spatial_merge_size;
        let half = 2 * self.inv_freq.len();
        let n: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for &[t, h, w] in grids {
            for _ in 0..t {
                for bh in 0..h / m {
                    for bw in 0..w / m {
                        for mh in 0..m {
                            for mw in 0..m {
                                for pos in [bh * m + mh, bw * m + mw] {
                                    for &f in &self.inv_freq {
                                        let a = pos as f32 * f;
                                        cos.push(a.cos());
                                        sin.push(a.sin());
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (n, half), &self.device)?,
            Tensor::from_vec(sin, (n, half), &self.device)?,
        ))
    }

    /// Qwen2.5-VL's window order (`get_vision_window_index`): the merge units of each frame taken
    /// window by window (windows of `window_size / patch / merge` units a side, row-major, partial
    /// at the right and bottom edges), and the cumulative patch counts of the windows. `None`
    /// for Qwen2-VL.
    fn window_order(&self, grids: &[[usize; 3]]) -> (Option<Vec<u32>>, Vec<usize>) {
        let c = &self.cfg;
        if c.variant != QwenVariant::Qwen25 {
            return (None, Vec::new());
        }
        let m = c.spatial_merge_size;
        let unit = m * m;
        let side = (c.window_size / m / c.patch_size).max(1);
        let mut order = Vec::new();
        let mut bounds = vec![0usize];
        let mut base = 0usize;
        for &[t, h, w] in grids {
            let (lh, lw) = (h / m, w / m);
            for f in 0..t {
                let frame = base + f * lh * lw;
                for wy in 0..lh.div_ceil(side) {
                    for wx in 0..lw.div_ceil(side) {
                        let mut len = 0;
                        for y in wy * side..((wy + 1) * side).min(lh) {
                            for x in wx * side..((wx + 1) * side).min(lw) {
                                order.push((frame + y * lw + x) as u32);
                                len += 1;
                            }
                        }
                        if len > 0 {
                            let last = bounds.last().copied().unwrap_or(0);
                            bounds.push(last + len * unit);
                        }
                    }
                }
            }
            base += t * lh * lw;
        }
        (Some(order), bounds)
    }
}

/// Cumulative patch counts of every frame of every image: full attention's spans.
fn frame_bounds(grids: &[[usize; 3]]) -> Vec<usize> {
    let mut bounds = vec![0usize];
    for &[t, h, w] in grids {
        for _ in 0..t {
            let last = bounds.last().copied().unwrap_or(0);
            bounds.push(last + h * w);
        }
    }
    bounds
}
