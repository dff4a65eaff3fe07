//! The seam between the engine and a model family: everything family-specific (how images become
//! encoder inputs and prompt tokens, how they are encoded, how features and positions enter the
//! decoder) behind one trait, chosen from `config.json`'s architecture. The engine names no family.

use std::any::Any;
use std::ops::Range;

use candle_core::Tensor;
use serde_json::Value;

use super::nn::Weights;
use super::text::TextModel;
use crate::error::{Error, Result};
use crate::image::resample::Image8;
use crate::prompt::PromptText;
use crate::tokenizer::Tokenizer;

/// Per-engine (or per-request) choices about images that a family may honour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImageOptions {
    /// Split large images into tiles (SmolVLM); `None`: the processor's default.
    pub splitting: Option<bool>,
    /// Pixel budget of a resized image (Qwen2-VL); `None`: the processor's.
    pub min_pixels: Option<usize>,
    pub max_pixels: Option<usize>,
}

/// How an image sits in the prompt and the encoder: the units the engine encodes one at a time (a
/// SmolVLM tile; a Qwen2-VL image is one unit), the prompt tokens it becomes, and four numbers
/// only its family reads (SmolVLM: tile rows, columns, height, width; Qwen2-VL: t, h, w patches).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLayout {
    pub units: usize,
    pub tokens: usize,
    pub shape: [usize; 4],
}

/// One image processed for its family's encoder.
#[derive(Clone, Debug)]
pub struct EncoderInput {
    /// The family's layout; empty where the features come from the reuse cache.
    pub pixel_values: Vec<f32>,
    pub layout: ImageLayout,
}

/// Rotary positions of a prompt where they are not `0..n`: each token's (t, h, w) position, and
/// the offset of generated tokens' positions from their cache slot.
pub struct PromptPositions {
    pub positions: Vec<[u32; 3]>,
    pub delta: i64,
}

/// A vision-language model as the engine drives it.
pub trait VisionLanguageModel: Send + Sync {
    /// The text decoder.
    fn text(&self) -> &TextModel;
    /// The token each image feature row replaces.
    fn image_token_id(&self) -> u32;
    /// What the chat template writes where an image goes; message text that spells it is kept text.
    fn placeholder(&self) -> &str;
    /// Process one decoded RGB image.
    fn process_image(&self, image: &Image8, opts: &ImageOptions) -> Result<EncoderInput>;
    /// The rendered prompt with each image's placeholder expanded to its tokens.
    fn expand_prompt(&self, prompt: &PromptText, images: &[ImageLayout]) -> Result<PromptText>;
    /// Features `(tokens of these units, text hidden)` of units `units` of `image`; concatenated
    /// over all units they are the image's features, whatever the split.
    fn encode(&self, image: &EncoderInput, units: Range<usize>) -> Result<Tensor>;
    /// Input embeddings `(1, ids.len(), hidden)` with image features in place of image tokens.
    fn embed_prompt(&self, ids: &[u32], features: Option<&Tensor>) -> Result<Tensor> {
        super::scatter_image_features(self.text(), ids, self.image_token_id(), features)
    }
    /// The prompt's rotary positions, where they are not simply `0..ids.len()`.
    fn prompt_positions(
        &self,
        _ids: &[u32],
        _images: &[ImageLayout],
    ) -> Result<Option<PromptPositions>> {
        Ok(None)
    }
    /// For tests and tools that need the concrete model.
    fn as_any(&self) -> &dyn Any;
}

/// What a family reads besides the weights (all parsed JSON or loaded already).
pub struct FamilyFiles<'a> {
    pub config: &'a Value,
    /// `preprocessor_config.json` (or transformers 5's `processor_config.json` image settings).
    pub preprocessor: &'a Value,
    /// `processor_config.json`, if present.
    pub processor: Option<&'a Value>,
    pub tokenizer: &'a Tokenizer,
}

/// A family's settings, checked against its small files, before any weight is read.
pub trait FamilySetup {
    fn load(self: Box<Self>, weights: &Weights) -> Result<Box<dyn VisionLanguageModel>>;
}

/// Check that the tokenizer has `placeholder` as the token config.json's `image_token_id` names.
pub fn check_image_token(tokenizer: &Tokenizer, placeholder: &str, id: u32) -> Result<()> {
    if tokenizer.token_to_id(placeholder) != Some(id) {
        return Err(Error::Tokenizer(format!(
            "{placeholder} is not token {id} in tokenizer.json, as config.json's image_token_id says"
        )));
    }
    Ok(())
}

/// Architectures this build runs from a model folder.
pub const VISION_ARCHITECTURES: &[&str] = &[
    "Idefics3ForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
];

/// The family `config.json` names (by `architectures`, else `model_type`), set up from its files.
pub fn setup(files: &FamilyFiles) -> Result<Box<dyn FamilySetup>> {
    let v = files.config;
    let archs = crate::config::architectures(v);
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    let by_type = match model_type {
        "idefics3" => Some("Idefics3ForConditionalGeneration"),
        "qwen2_5_vl" => Some("Qwen2_5_VLForConditionalGeneration"),
        "qwen2_vl" => Some("Qwen2VLForConditionalGeneration"),
        _ => None,
    };
    let arch = archs
        .iter()
        .copied()
        .find(|a| VISION_ARCHITECTURES.contains(a))
        .or(by_type.filter(|_| archs.is_empty()));
    match arch {
        Some("Idefics3ForConditionalGeneration") => super::idefics3::setup(files),
        Some("Qwen2_5_VLForConditionalGeneration") => {
            super::qwen2_vl::setup(files, super::qwen2_vl::QwenVariant::Qwen25)
        }
        Some("Qwen2VLForConditionalGeneration") => {
            super::qwen2_vl::setup(files, super::qwen2_vl::QwenVariant::Qwen2)
        }
        _ => {
            let what = if archs.is_empty() {
                format!("model_type `{model_type}`")
            } else {
                format!("architecture {}", archs.join(", "))
            };
            Err(Error::Unsupported(format!(
                "{what} is not supported (supported: {})",
                VISION_ARCHITECTURES.join(", ")
            )))
        }
    }
}
