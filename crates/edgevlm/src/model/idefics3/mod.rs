//! `Idefics3ForConditionalGeneration` (SmolVLM): SigLIP vision encoder → pixel-shuffle connector →
//! Llama decoder, with image features written over the `<image>` token embeddings. The family owns
//! its image processor (tiles plus a global view) and the prompt expansion of `<image>`.

pub mod config;
pub mod connector;
pub mod processor;

use std::any::Any;
use std::ops::Range;

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::image::resample::Image8;
use crate::model::family::{
    check_image_token, EncoderInput, FamilyFiles, FamilySetup, ImageLayout, ImageOptions,
    VisionLanguageModel,
};
use crate::model::nn::Weights;
use crate::model::text::TextModel;
use crate::model::vision::VisionTransformer;
use crate::prompt::PromptText;
pub use config::Idefics3Config;
pub use connector::Connector;
pub use processor::{
    expand_image_tokens, image_prompt_string, process_image, ImageProcessorConfig, ProcessedImage,
    IMAGE_PLACEHOLDER,
};

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
        let vision_opts = w.opts.for_vision();
        let vision_w = m.with_opts(&vision_opts);
        let text_opts = w.opts.for_text();
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
        crate::model::scatter_image_features(
            &self.text,
            ids,
            self.cfg.image_token_id,
            image_features,
        )
    }
}

/// SmolVLM as the engine drives it: the model and its image processor settings.
pub struct Idefics3Vlm {
    pub model: Idefics3,
    pub image: ImageProcessorConfig,
}

struct Idefics3Setup {
    cfg: Idefics3Config,
    image: ImageProcessorConfig,
}

/// Check SmolVLM's small files: the config, the processor settings (whose `image_seq_len` must be
/// the model's tokens per tile) and the tokenizer's `<image>` id.
pub(super) fn setup(files: &FamilyFiles) -> Result<Box<dyn FamilySetup>> {
    let cfg = Idefics3Config::from_value(files.config)?;
    let per_tile = cfg.image_tokens_per_tile();
    let seq_len = files
        .processor
        .and_then(|v| v.get("image_seq_len"))
        .and_then(Value::as_u64)
        .map_or(per_tile, |n| n as usize);
    if seq_len != per_tile {
        return Err(Error::Config(format!(
            "processor_config.json: image_seq_len {seq_len} does not match the model's {per_tile} tokens per tile"
        )));
    }
    let image = ImageProcessorConfig::from_values(files.preprocessor, Some(seq_len))?;
    check_image_token(files.tokenizer, IMAGE_PLACEHOLDER, cfg.image_token_id)?;
    Ok(Box::new(Idefics3Setup { cfg, image }))
}

impl FamilySetup for Idefics3Setup {
    fn load(self: Box<Self>, weights: &Weights) -> Result<Box<dyn VisionLanguageModel>> {
        Ok(Box::new(Idefics3Vlm {
            model: Idefics3::load(weights, &self.cfg)?,
            image: self.image,
        }))
    }
}

impl VisionLanguageModel for Idefics3Vlm {
    fn text(&self) -> &TextModel {
        &self.model.text
    }

    fn image_token_id(&self) -> u32 {
        self.model.cfg.image_token_id
    }

    fn placeholder(&self) -> &str {
        IMAGE_PLACEHOLDER
    }

    fn process_image(&self, img: &Image8, opts: &ImageOptions) -> Result<EncoderInput> {
        let split = opts.splitting.unwrap_or(self.image.do_image_splitting);
        let p = process_image(img, &self.image, split)?;
        Ok(EncoderInput {
            pixel_values: p.pixel_values,
            layout: ImageLayout {
                units: p.num_tiles,
                tokens: p.num_tiles * self.image.image_seq_len,
                shape: [p.rows, p.cols, p.height, p.width],
            },
        })
    }

    fn expand_prompt(&self, prompt: &PromptText, images: &[ImageLayout]) -> Result<PromptText> {
        let expansions: Vec<String> = images
            .iter()
            .map(|l| image_prompt_string(l.shape[0], l.shape[1], self.image.image_seq_len))
            .collect();
        prompt.expand(IMAGE_PLACEHOLDER, &expansions)
    }

    /// One tile at a time: what [`Idefics3::encode_images`] does with a batch of one, so a tile's
    /// features do not depend on how many are encoded together.
    fn encode(&self, image: &EncoderInput, units: Range<usize>) -> Result<Tensor> {
        let [_, _, h, w] = image.layout.shape;
        let tile = 3 * h * w;
        if units.end > image.layout.units || image.pixel_values.len() < units.end * tile {
            return Err(Error::ModelInput(format!(
                "tiles {units:?} of an image of {} tiles",
                image.layout.units
            )));
        }
        let feats = units
            .map(|t| {
                let px = Tensor::from_slice(
                    &image.pixel_values[t * tile..(t + 1) * tile],
                    (1, 3, h, w),
                    self.model.device(),
                )?;
                self.model.encode_images(&px, None, 1)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&feats, 0)?)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
