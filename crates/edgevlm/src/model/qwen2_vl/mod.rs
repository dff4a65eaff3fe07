//! Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`):
//! a ViT with 2-D RoPE (and, in 2.5, window attention) whose 2×2 patch merger writes image tokens
//! into a Qwen2 decoder with multimodal RoPE: image tokens take (temporal, row, column) positions,
//! text tokens one position on all three axes.

pub mod config;
pub mod processor;
pub mod vision;

use std::any::Any;
use std::ops::Range;

use candle_core::{Device, Tensor};

use super::family::{
    check_image_token, EncoderInput, FamilyFiles, FamilySetup, ImageLayout, ImageOptions,
    PromptPositions, VisionLanguageModel,
};
use super::nn::Weights;
use super::text::TextModel;
use crate::error::{Error, Result};
use crate::image::resample::Image8;
use crate::prompt::PromptText;

/// What the chat template writes where an image goes (inside `<|vision_start|>…<|vision_end|>`).
pub const IMAGE_PAD: &str = "<|image_pad|>";
pub use config::{QwenVariant, QwenVisionConfig, QwenVlConfig};
pub use processor::{process_image, smart_resize, QwenImage, QwenImageConfig};
pub use vision::QwenVision;

pub struct QwenVl {
    pub vision: QwenVision,
    pub text: TextModel,
    pub cfg: QwenVlConfig,
    device: Device,
}

impl QwenVl {
    /// Load from the hub layout (`visual.*`, `model.*`, `lm_head`) or transformers 5's
    /// (`model.visual.*`, `model.language_model.*`, `lm_head`).
    pub fn load(w: &Weights, cfg: &QwenVlConfig) -> Result<Self> {
        let (visual, text) = if w.contains("model.language_model.embed_tokens.weight") {
            (
                w.pp("model").pp("visual"),
                w.pp("model").pp("language_model"),
            )
        } else {
            (w.pp("visual"), w.pp("model"))
        };
        let (vision_opts, text_opts) = (w.opts.for_vision(), w.opts.for_text());
        Ok(Self {
            vision: QwenVision::load(&visual.with_opts(&vision_opts), &cfg.vision)?,
            text: TextModel::load(
                &text.with_opts(&text_opts),
                &w.with_opts(&text_opts).pp("lm_head"),
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

    /// Image tokens of an image of `grid` (t, h, w) patches.
    pub fn image_tokens(&self, grid: [usize; 3]) -> usize {
        let m = self.cfg.vision.spatial_merge_size;
        grid[0] * grid[1] * grid[2] / (m * m)
    }

    /// Merged image tokens `(tokens, hidden)` of one image's patches (`grid`: t, h, w).
    pub fn encode_image(&self, pixel_values: &[f32], grid: [usize; 3]) -> Result<Tensor> {
        let n = grid.iter().product::<usize>();
        if n == 0 || !pixel_values.len().is_multiple_of(n) {
            return Err(Error::ModelInput(format!(
                "{} pixel values for a {grid:?} patch grid",
                pixel_values.len(),
            )));
        }
        let px = Tensor::from_slice(pixel_values, (n, pixel_values.len() / n), &self.device)?;
        self.vision.forward(&px, &[grid])
    }

    /// transformers' `get_rope_index` for one prompt: each image's tokens take (t, row, column)
    /// positions offset by the position where the image starts, and the text after it continues
    /// from that offset plus the image's longer side in merged tokens. `grids` are the prompt's
    /// images in order. Returns the positions and the offset of the first generated token from
    /// the prompt length (positions of generated tokens are `cache length + delta`).
    pub fn rope_positions(
        &self,
        ids: &[u32],
        grids: &[[usize; 3]],
    ) -> Result<(Vec<[u32; 3]>, i64)> {
        let m = self.cfg.vision.spatial_merge_size;
        let image = self.cfg.image_token_id;
        let mut out = Vec::with_capacity(ids.len());
        let mut grids = grids.iter();
        let mut current = 0usize;
        let mut i = 0;
        while i < ids.len() {
            if ids[i] != image {
                out.push([current as u32; 3]);
                current += 1;
                i += 1;
                continue;
            }
            let &[t, h, w] = grids.next().ok_or_else(|| {
                Error::ModelInput("the prompt has more images than were given".into())
            })?;
            let (lh, lw) = (h / m, w / m);
            let n = t * lh * lw;
            if ids.len() < i + n || ids[i..i + n].iter().any(|&x| x != image) {
                return Err(Error::ModelInput(format!(
                    "an image of {n} tokens does not match the prompt's image tokens at {i}"
                )));
            }
            for ti in 0..t {
                for y in 0..lh {
                    for x in 0..lw {
                        out.push([
                            (current + ti) as u32,
                            (current + y) as u32,
                            (current + x) as u32,
                        ]);
                    }
                }
            }
            current += lh.max(lw);
            i += n;
        }
        if grids.next().is_some() {
            return Err(Error::ModelInput(
                "more images were given than the prompt has".into(),
            ));
        }
        let delta = current as i64 - ids.len() as i64;
        Ok((out, delta))
    }
}

/// Qwen2-VL / Qwen2.5-VL as the engine drives it: the model and its image processor settings.
pub struct QwenVlm {
    pub model: QwenVl,
    pub image: QwenImageConfig,
}

struct QwenSetup {
    cfg: QwenVlConfig,
    image: QwenImageConfig,
}

/// Check the small files: config, processor settings, and the tokenizer's `<|image_pad|>` id.
pub(super) fn setup(files: &FamilyFiles, variant: QwenVariant) -> Result<Box<dyn FamilySetup>> {
    let cfg = QwenVlConfig::from_value(files.config, variant)?;
    let image = QwenImageConfig::from_value(files.preprocessor)?;
    if image.merge_size != cfg.vision.spatial_merge_size
        || image.patch_size != cfg.vision.patch_size
        || image.temporal_patch_size != cfg.vision.temporal_patch_size
    {
        return Err(Error::Config(format!(
            "preprocessor_config.json's patches ({} px, merge {}, temporal {}) do not match the vision tower's ({} px, merge {}, temporal {})",
            image.patch_size,
            image.merge_size,
            image.temporal_patch_size,
            cfg.vision.patch_size,
            cfg.vision.spatial_merge_size,
            cfg.vision.temporal_patch_size
        )));
    }
    check_image_token(files.tokenizer, IMAGE_PAD, cfg.image_token_id)?;
    Ok(Box::new(QwenSetup { cfg, image }))
}

impl FamilySetup for QwenSetup {
    fn load(self: Box<Self>, weights: &Weights) -> Result<Box<dyn VisionLanguageModel>> {
        Ok(Box::new(QwenVlm {
            model: QwenVl::load(weights, &self.cfg)?,
            image: self.image,
        }))
    }
}

impl VisionLanguageModel for QwenVlm {
    fn text(&self) -> &TextModel {
        &self.model.text
    }

    fn image_token_id(&self) -> u32 {
        self.model.cfg.image_token_id
    }

    fn placeholder(&self) -> &str {
        IMAGE_PAD
    }

    fn process_image(&self, img: &Image8, opts: &ImageOptions) -> Result<EncoderInput> {
        let cfg = self.image.with_pixels(opts.min_pixels, opts.max_pixels)?;
        let p = process_image(img, &cfg)?;
        let [t, h, w] = p.grid;
        Ok(EncoderInput {
            pixel_values: p.pixel_values,
            layout: ImageLayout {
                units: 1,
                tokens: self.model.image_tokens(p.grid),
                shape: [t, h, w, 0],
            },
        })
    }

    fn expand_prompt(&self, prompt: &PromptText, images: &[ImageLayout]) -> Result<PromptText> {
        let expansions: Vec<String> = images.iter().map(|l| IMAGE_PAD.repeat(l.tokens)).collect();
        prompt.expand(IMAGE_PAD, &expansions)
    }

    fn encode(&self, image: &EncoderInput, units: Range<usize>) -> Result<Tensor> {
        if units != (0..1) {
            return Err(Error::ModelInput(format!(
                "units {units:?} of an image encoded whole"
            )));
        }
        let [t, h, w, _] = image.layout.shape;
        self.model.encode_image(&image.pixel_values, [t, h, w])
    }

    fn prompt_positions(
        &self,
        ids: &[u32],
        images: &[ImageLayout],
    ) -> Result<Option<PromptPositions>> {
        let grids: Vec<[usize; 3]> = images
            .iter()
            .map(|l| [l.shape[0], l.shape[1], l.shape[2]])
            .collect();
        let (positions, delta) = self.model.rope_positions(ids, &grids)?;
        Ok(Some(PromptPositions { positions, delta }))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
