//! Flags shared by the commands that load a model and answer requests: how to load it, and what one
//! request may ask of it.

use anyhow::Result;
use clap::Args;
use edgevlm::limits::{ImageSources, Limits, DEFAULT_MAX_IMAGE_PIXELS};
use edgevlm::{DeviceKind, EngineOptions, Precision, DEFAULT_MODEL};

use crate::{parse_quant, set_threads};

#[derive(Args, Clone, Debug)]
pub struct LoadArgs {
    /// Model: a local folder in the Hugging Face layout, a .gguf file, or a Hugging Face repo id.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    pub dtype: String,
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda", "metal"])]
    pub device: String,
    /// Quantize linear weights while loading: q8 (8-bit) or q4 (4-bit), in affine groups as MLX does.
    #[arg(long, value_parser = ["q8", "q4"])]
    pub quant: Option<String>,
    /// Group size for --quant (32, 64 or 128).
    #[arg(long, default_value_t = edgevlm::quant::DEFAULT_GROUP_SIZE)]
    pub group_size: usize,
    /// With --quant: keep the vision encoder in full precision.
    #[arg(long, requires = "quant")]
    pub skip_vision: bool,
    /// Compute the vision encoder's products and attention in f32, exactly: otherwise they run on
    /// bf16 AMX tiles where the CPU has them, else (AVX2) as 16-bit integer products.
    #[arg(long)]
    pub f32_vision: bool,
    /// Round the activations of quantized products to 8 bits per block of 32, as llama.cpp does:
    /// faster decode batches on the CPU (and candle's Q8_1 kernels on CUDA), less exact (the KL
    /// divergence is in benches/README.md); by default they keep 16 bits (CPU) or f32 (GPU).
    #[arg(long, alias = "gpu-int8-activations")]
    pub int8_activations: bool,
    /// Keep the KV cache in f16 where the model computes in f32 on the CPU: half its memory and
    /// faster decoding after long (image) prompts, logits within about 1e-2 of the f32 cache's.
    #[arg(long)]
    pub f16_kv_cache: bool,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Do not split large images into tiles (one 512x512 view per image).
    #[arg(long)]
    pub no_image_splitting: bool,
    /// Qwen2-VL family: fewest pixels an image is resized to (default: preprocessor_config.json's).
    #[arg(long)]
    pub min_pixels: Option<usize>,
    /// Qwen2-VL family: most pixels an image is resized to, hence image tokens (28x28 pixels each);
    /// smaller is faster (default: preprocessor_config.json's).
    #[arg(long)]
    pub max_pixels: Option<usize>,
}

impl LoadArgs {
    /// Engine options for these flags with `limits`; sizes the thread pool first.
    pub fn engine_options(&self, limits: Limits) -> Result<EngineOptions> {
        set_threads(self.threads)?;
        Ok(EngineOptions {
            precision: self.dtype.parse::<Precision>()?,
            device: self.device.parse::<DeviceKind>()?,
            image_splitting: self.no_image_splitting.then_some(false),
            min_pixels: self.min_pixels,
            max_pixels: self.max_pixels,
            quantize: parse_quant(self.quant.as_deref(), self.group_size)?,
            skip_vision: self.skip_vision,
            vision_bf16_tiles: !self.f32_vision,
            int8_activations: self.int8_activations,
            f16_kv_cache: self.f16_kv_cache,
            limits,
            ..Default::default()
        })
    }
}

/// What one request may ask for; each is checked before the work it bounds.
#[derive(Args, Clone, Debug)]
pub struct LimitArgs {
    /// Largest image in pixels, read from its header before decoding (Pillow's default bound).
    #[arg(long, default_value_t = DEFAULT_MAX_IMAGE_PIXELS)]
    pub max_image_pixels: u64,
    /// Largest encoded image in bytes (a file, or a data URI's payload).
    #[arg(long, default_value_t = Limits::default().max_image_bytes)]
    pub max_image_bytes: u64,
    /// Largest allocation of an image decoder in bytes (the decoded frame at its stored depth).
    #[arg(long, default_value_t = Limits::default().max_decoded_bytes)]
    pub max_decoded_bytes: u64,
    /// Images in one request.
    #[arg(long, default_value_t = Limits::default().max_images)]
    pub max_images: usize,
    /// Prompt tokens of one request, images expanded (default: what the context holds).
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
    /// Completion tokens one request may ask for (default: what the context holds).
    #[arg(long)]
    pub max_completion_tokens: Option<usize>,
}

impl LimitArgs {
    pub fn limits(&self, image_sources: ImageSources) -> Limits {
        Limits {
            max_image_pixels: self.max_image_pixels,
            max_decoded_bytes: self.max_decoded_bytes,
            max_image_bytes: self.max_image_bytes,
            max_images: self.max_images,
            max_prompt_tokens: self.max_prompt_tokens,
            max_completion_tokens: self.max_completion_tokens,
            image_sources,
            ..Limits::default()
        }
    }
}
