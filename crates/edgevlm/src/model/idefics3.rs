//! `Idefics3ForConditionalGeneration` (SmolVLM): vision encoder → pixel-shuffle connector → Llama decoder,
//! with image features written over the `<image>` token embeddings.

use candle_core::{Device, Tensor};

use super::nn::{LoadOptions, Weights};
use super::text::TextModel;
use super::vision::{Connector, VisionTransformer};
use crate::config::Idefics3Config;
use crate::error::Result;

pub struct Idefics3 {
    pub vision: VisionTransformer,
    pub connector: Connector,
    pub text: TextModel,
    pub cfg: Idefics3Config,
    device: Device,
}

impl Idefics3 {
    /// Load from the HF checkpoint layout (`model.vision_model`, `model.connector`, `model.text_model`,
    /// `lm_head`).
    pub fn load(w: &Weights, cfg: &Idefics3Config) -> Result<Self> {
        let m = w.pp("model");
        // `skip_vision` keeps the vision tower dense while the rest quantizes on load.
        // The vision tower's dense weights stay in the checkpoint's bf16/f16 and compute in f32 on
        // the CPU (half the memory of f32 copies; products per tile are large enough that expanding
        // a panel at a time costs nothing). `skip_vision` keeps them dense while the rest quantizes.
        let vision_opts = LoadOptions {
            quantize: if w.opts.skip_vision {
                None
            } else {
                w.opts.quantize
            },
            half_weights: w.opts.device.is_cpu(),
            bf16_tiles: w.opts.device.is_cpu() && w.opts.bf16_tiles,
            ..w.opts.clone()
        };
        let vision_w = m.with_opts(&vision_opts);
        // The connector and the text model keep their quantized products' inputs to 16 significant
        // bits (bf16 tiles are the vision encoder's).
        let text_opts = LoadOptions {
            bf16_tiles: false,
            ..w.opts.clone()
        };
        let (m, w) = (m.with_opts(&text_opts), w.with_opts(&text_opts));
        Ok(Self {
            vision: VisionTransformer::load(&vision_w.pp("vision_model"), &cfg.vision)?,
            connector: Connector::load(
                &m.pp("connector"),
                cfg.vision.hidden_size,
                cfg.text.hidden_size,
                cfg.scale_factor,
            )?,
            text: TextModel::load(
                &m.pp("text_model"),
                &w.pp("lm_head"),
                &cfg.text,
                cfg.tie_word_embeddings,
            )?,
            cfg: cfg.clone(),
            device: w.opts.device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Encode tiles `(n, 3, H, W)` into image-token features `(n · tokens_per_tile, text_hidden)`,
    /// `chunk` tiles at a time to bound the attention scratch memory.
    pub fn encode_images(
        &self,
        pixel_values: &Tensor,
        patch_masks: Option<&[Vec<bool>]>,
        chunk: usize,
    ) -> Result<Tensor> {
        let n = pixel_values.dim(0)?;
        let chunk = chunk.max(1);
        let mut feats = Vec::with_capacity(n.div_ceil(chunk));
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let px = pixel_values.narrow(0, start, len)?;
            let masks = patch_masks.map(|m| &m[start..start + len]);
            let h = self.vision.forward(&px, masks)?;
            let f = self.connector.forward(&h)?;
            let (b, t, d) = f.dims3()?;
            feats.push(f.reshape((b * t, d))?);
            start += len;
        }
        Ok(Tensor::cat(&feats, 0)?)
    }

    /// Input embeddings `(1, ids.len(), hidden)` with the rows of `<image>` tokens replaced, in order, by
    /// `image_features` (one row per `<image>` token).
    pub fn merge_embeddings(&self, ids: &[u32], image_features: Option<&Tensor>) -> Result<Tensor> {
        super::scatter_image_features(&self.text, ids, self.cfg.image_token_id, image_features)
    }
}
