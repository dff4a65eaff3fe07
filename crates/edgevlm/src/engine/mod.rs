//! The engine: loads a model folder (weights, tokenizer, template, processor settings) and answers
//! OpenAI-shaped chat requests, whole or streamed.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::config::eos_token_ids;
use crate::error::{Error, Result};
use crate::image;
use crate::limits::Limits;
use crate::model::family::{
    self, EncoderInput, FamilyFiles, ImageLayout, ImageOptions, PromptPositions,
    VisionLanguageModel,
};
use crate::model::nn::{CheckpointQuant, LoadOptions, Weights};
use crate::model::text::TextModel;
use crate::model::{KvCache, Positions};
use crate::openai::*;
use crate::prompt::{random_u64, PromptText};
use crate::quant::QuantSpec;
use crate::sampling::{log_softmax, Sampler, SamplingParams};
use crate::template::{ChatTemplate, TemplateMessage};
use crate::tokenizer::Tokenizer;
use crate::weights::WeightStore;

mod cache;
mod chat;
mod detokenize;
mod generation;

pub use cache::{image_key, CachedImage, ImageKey, ReuseCache};

pub use chat::ChatStream;
pub use detokenize::TextAssembler;
pub use generation::{Generation, GenerationOutput, Piece, Poll, Starting};

/// Compute precision of the weights and activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    BF16,
    F16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::BF16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::BF16),
            "f16" => Ok(Precision::F16),
            _ => Err(Error::Request(format!(
                "unknown dtype `{s}` (f32, bf16, f16)"
            ))),
        }
    }
}

/// Which device runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceKind {
    #[default]
    Cpu,
    Cuda,
    Metal,
}

impl std::str::FromStr for DeviceKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" => Ok(DeviceKind::Cuda),
            "metal" => Ok(DeviceKind::Metal),
            _ => Err(Error::Request(format!(
                "unknown device `{s}` (cpu, cuda, metal)"
            ))),
        }
    }
}

impl DeviceKind {
    pub fn open(self) -> Result<Device> {
        let feature_hint = |name: &str, e: candle_core::Error| {
            Error::Device(format!(
                "cannot open {name} device ({}); is this build compiled with `--features {name}`?",
                crate::error::candle_message(&e)
            ))
        };
        match self {
            DeviceKind::Cpu => Ok(Device::Cpu),
            DeviceKind::Cuda => Device::new_cuda(0).map_err(|e| feature_hint("cuda", e)),
            DeviceKind::Metal => Device::new_metal(0).map_err(|e| feature_hint("metal", e)),
        }
    }
}

#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub precision: Precision,
    pub device: DeviceKind,
    /// Split large images into tiles plus a global view (SmolVLM; `None`: the processor's default).
    pub image_splitting: Option<bool>,
    /// Pixel budget of a resized image (Qwen2-VL; `None`: the processor's `min_pixels` /
    /// `max_pixels`). A smaller `max_pixels` is the fast mode: fewer image tokens.
    pub min_pixels: Option<usize>,
    pub max_pixels: Option<usize>,
    /// Tiles encoded per vision forward pass (bounds activation memory). Default 1: on the 2-thread
    /// AMX machine measured, as fast as 2 (408 / 413 ms per tile, 3 alternating runs) with 59 MB
    /// less peak RSS; the encoder attention splits heads' queries across threads when a pass has
    /// too few heads for them.
    pub vision_batch: usize,
    /// Quantize full-precision linear weights while loading.
    pub quantize: Option<QuantSpec>,
    /// With `quantize`: keep the vision tower in full precision (the connector and text decoder
    /// still quantize).
    pub skip_vision: bool,
    /// Expand a GGUF file's quantized blocks to dense weights while loading: the full-precision
    /// reference of those weights (for accuracy measurements).
    pub dequantize: bool,
    /// Run the vision encoder's bf16 products and its attention on AMX tiles where the CPU has them
    /// (Intel Sapphire Rapids and later): inputs rounded to bf16, sums in f32, about 2x faster than
    /// f32. On the full-size SmolVLM-256M, top-5 logprobs stay within 6.6e-4 of transformers' f32
    /// (5e-6 in f32).
    /// On x86 CPUs without AMX the same layers run as 16-bit integer products instead
    /// ([`crate::kernels::fixed16`]: weights per row and inputs per block of 32 to 14 bits, exact
    /// integer sums; `vpdpwssd` on AVX-VNNI): top-5 logprobs within 3.5e-4 of transformers' f32 on
    /// the full-size SmolVLM-256M.
    /// Off: exact f32 products everywhere.
    pub vision_bf16_tiles: bool,
    /// Round the activations of quantized products to 8 bits per block of 32 first, as llama.cpp
    /// does. On the CPU, the text decoder's quantized products (the row-tile kernels,
    /// [`crate::kernels::amx::TileInputs::Int8`]; on AMX CPUs prompts keep their tiles, inputs as
    /// one bf16): half their integer products, so a batch of 8 decode steps runs about 1.2x faster
    /// and a 512-token prompt 1.3x on AVX2 (SmolLM2-135M Q4_0, Zen 3), at llama.cpp's accuracy
    /// (SmolLM2's Q4_1 file: mean KL divergence 0.0052 from f32, llama.cpp's 0.0052, the default's
    /// 0.00000; benches/README.md); the vision tower keeps its inputs.
    /// On CUDA, candle's Q8_1 kernels. Either way it can
    /// flip near ties such as SmolLM2's first answer token to "What is the capital of France?"
    /// (`tests/gguf.rs`). Off: quantized weights meet 16-bit (CPU) or f32 (GPU) activations.
    pub int8_activations: bool,
    /// Keep the KV cache in f16 where the model computes in f32 on the CPU: half its memory, and
    /// decoding reads half the bytes per cached position, most of a token's time after an image
    /// prompt (full-size SmolVLM-256M q4, 2 threads, 1,024-token prompt: 109.5 -> 144.5 tokens/s).
    /// Off by default, as the text decoder's other products keep to f32 accuracy: against
    /// transformers' f32, top-5 logprobs move by up to 1.9e-4 (5e-6 with an f32 cache) on that
    /// model, and SmolLM2-135M's first-step logits by up to 7.5e-3 (1.0e-3 with f32). Keys or values
    /// beyond f16's range (±65504) would become infinite.
    pub f16_kv_cache: bool,
    /// What one request may ask for (image sizes and sources, token counts).
    pub limits: Limits,
    /// Bytes for reusing work between requests (encoded image features, prompt-prefix KV caches);
    /// 0 keeps nothing (a one-shot program), a server keeps a few hundred MB.
    pub reuse_cache_bytes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            precision: Precision::F32,
            device: DeviceKind::Cpu,
            image_splitting: None,
            min_pixels: None,
            max_pixels: None,
            vision_batch: 1,
            quantize: None,
            skip_vision: false,
            dequantize: false,
            vision_bf16_tiles: true,
            int8_activations: false,
            f16_kv_cache: false,
            limits: Limits::default(),
            reuse_cache_bytes: 0,
        }
    }
}

impl EngineOptions {
    /// The device these options name, opened. On CUDA this also sets how candle's quantized products
    /// treat their activations ([`Self::int8_activations`]); that setting is process-wide in
    /// candle, so the last engine loaded decides it.
    pub fn open_device(&self) -> Result<Device> {
        let device = self.device.open()?;
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            // "DMMV": dequantize-mul-mat-vec for one row (f32 activations), and for more rows the
            // weight dequantized to f32 for a dense product, instead of the Q8_1 kernels.
            candle_core::quantized::cuda::set_force_dmmv(!self.int8_activations);
        }
        Ok(device)
    }
}

/// Wall-clock timings of one request, in milliseconds.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Timings {
    pub image_preprocess_ms: f64,
    /// Prompt positions taken from the reuse cache instead of computed.
    pub reused_prompt_tokens: usize,
    pub image_encode_ms: f64,
    pub image_tiles: usize,
    pub prompt_tokens: usize,
    pub prompt_ms: f64,
    pub completion_tokens: usize,
    pub generation_ms: f64,
}

impl Timings {
    pub fn prompt_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / (self.prompt_ms / 1e3).max(1e-9)
    }
    /// Decode speed over the tokens after the first (the first comes out of the prompt pass).
    pub fn generation_tokens_per_s(&self) -> f64 {
        self.completion_tokens.saturating_sub(1) as f64 / (self.generation_ms / 1e3).max(1e-9)
    }
}

/// A request turned into model inputs.
#[derive(Clone, Default)]
pub struct PreparedPrompt {
    /// The prompt text with images expanded (message text marked where it spells special tokens).
    pub text: PromptText,
    pub ids: Vec<u32>,
    /// Each image as its family's encoder reads it (no pixels where its features come from the
    /// reuse cache).
    pub images: Vec<EncoderInput>,
    /// Rotary positions of the prompt where they are not `0..ids.len()` (Qwen2-VL's image tokens).
    pub positions: Option<Arc<PromptPositions>>,
    /// Each image's key in the reuse cache (`None` for images given already decoded).
    pub image_keys: Vec<Option<ImageKey>>,
    /// Each image's features, where the reuse cache held them.
    pub cached_images: Vec<Option<Arc<CachedImage>>>,
    pub preprocess_ms: f64,
}

impl PreparedPrompt {
    /// Rotary positions of the `len` prompt tokens from `start`.
    pub fn rotary(&self, start: usize, len: usize) -> Positions<'_> {
        match &self.positions {
            Some(p) => {
                let end = (start + len).min(p.positions.len());
                Positions::Multi(&p.positions[start.min(end)..end])
            }
            None => Positions::From(start),
        }
    }

    /// Offset of generated tokens' rotary positions from their cache slot.
    pub fn position_delta(&self) -> i64 {
        self.positions.as_ref().map_or(0, |p| p.delta)
    }
}

/// An image on its way into a prompt.
enum ImageInput<'a> {
    Decoded(&'a image::Image8, Option<ImageKey>),
    Cached(ImageKey, Arc<CachedImage>),
}

/// Generation settings resolved from a request.
#[derive(Clone, Debug)]
pub struct GenerationSettings {
    pub sampling: SamplingParams,
    /// Completion tokens asked for; `None`: [`Limits::default_max_tokens`], fewer where the context
    /// has less room.
    pub max_tokens: Option<u64>,
    pub stop: Vec<String>,
    pub top_logprobs: Option<usize>,
    /// Stop at the model's end-of-sequence tokens (a benchmark turns this off).
    pub stop_at_eos: bool,
}

/// The loaded network: a vision-language model of some family, or a text-only chat model (GGUF).
pub enum Model {
    Vision(Box<dyn VisionLanguageModel>),
    Text(Box<TextModel>),
}

impl Model {
    /// The text decoder.
    pub fn text(&self) -> &TextModel {
        match self {
            Model::Vision(m) => m.text(),
            Model::Text(m) => m,
        }
    }

    /// The vision-language model, where this is one.
    pub fn vision(&self) -> Option<&dyn VisionLanguageModel> {
        match self {
            Model::Vision(m) => Some(m.as_ref()),
            Model::Text(_) => None,
        }
    }

    /// Input embeddings `(1, n, hidden)` of a prompt, with image features in place of image tokens.
    pub fn embed_prompt(&self, ids: &[u32], image_features: Option<&Tensor>) -> Result<Tensor> {
        match self {
            Model::Vision(m) => m.embed_prompt(ids, image_features),
            Model::Text(m) => Ok(m.embed(ids)?.unsqueeze(0)?),
        }
    }
}

pub struct Engine {
    model: Model,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    eos_ids: Vec<u32>,
    name: String,
    opts: EngineOptions,
    /// Generation defaults from generation_config.json.
    gen_defaults: Value,
    reuse: ReuseCache,
    /// Transcribes requests' `input_audio` parts ([`Engine::with_speech`]).
    speech: Option<std::sync::Arc<crate::speech::Transcriber>>,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("not valid JSON: {e}")))
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// A special token from tokenizer_config.json: a string or an AddedToken object.
fn token_field(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        _ => String::new(),
    }
}

/// The chat template: chat_template.jinja, chat_template.json, or tokenizer_config.json's field (a string
/// or a list of named templates, of which "default" is used).
fn find_chat_template(dir: &Path, tok_cfg: &Value) -> Result<String> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return std::fs::read_to_string(&jinja).map_err(|e| Error::file(&jinja, e));
    }
    let json = dir.join("chat_template.json");
    if let Some(v) = read_json_opt(&json)? {
        return v
            .get("chat_template")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| Error::file(&json, "no `chat_template` string"));
    }
    match tok_cfg.get("chat_template") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| Error::Template("tokenizer_config.json has no default template".into())),
        _ => Err(Error::file(
            dir,
            "no chat template (chat_template.json, chat_template.jinja or tokenizer_config.json)",
        )),
    }
}

impl Engine {
    /// Load `model`: a local folder or a Hugging Face repo id.
    pub fn load(model: &str, opts: EngineOptions) -> Result<Self> {
        let path = Path::new(model);
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return Self::load_gguf(path, opts);
        }
        let dir = crate::source::resolve(model)?;
        Self::load_dir(&dir, model, opts)
    }

    /// Load a llama-architecture GGUF file as a text chat model, with the tokenizer and chat template
    /// its metadata holds.
    pub fn load_gguf(path: &Path, opts: EngineOptions) -> Result<Self> {
        opts.limits.validate()?;
        let reuse_bytes = opts.reuse_cache_bytes;
        let mut file = crate::gguf::GgufFile::open(path)?;
        let cfg = crate::gguf::llama_config(&file)?;
        // The tokenizer first: building it takes a few MB for a moment (the vocabulary and merges as
        // JSON), which the weights then reuse instead of adding to the peak.
        let (tokenizer, bos, eos) = crate::gguf::tokenizer_from_gguf(&file)?;
        let source = file
            .get_str("tokenizer.chat_template")?
            .ok_or_else(|| Error::file(path, "no tokenizer.chat_template in the GGUF metadata"))?;
        let template = ChatTemplate::new(source, &bos, &eos)?.with_string_content();
        let mut eos_ids = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(id) = file.get_usize(key)? {
                eos_ids.push(id as u32);
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        file.drop_tokenizer_metadata();
        return_freed_memory();
        let device = opts.open_device()?;
        let mut load_opts = LoadOptions::new(opts.precision.dtype(), device);
        load_opts.quantize = opts.quantize;
        load_opts.dequantize = opts.dequantize;
        load_opts.int8_activations = opts.int8_activations;
        let model = crate::gguf::load_llama(&file, &cfg, &load_opts)?;
        drop(file);
        return_freed_memory();
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Ok(Self {
            model: Model::Text(Box::new(model)),
            tokenizer,
            template,
            eos_ids,
            name,
            opts,
            gen_defaults: Value::Null,
            reuse: ReuseCache::new(reuse_bytes),
            speech: None,
        })
    }

    /// Load a model folder in the HF layout; `name` is echoed in responses.
    pub fn load_dir(dir: &Path, name: &str, opts: EngineOptions) -> Result<Self> {
        let reuse_bytes = opts.reuse_cache_bytes;
        if opts.dequantize {
            return Err(Error::Unsupported(
                "dequantizing while loading applies to GGUF files".into(),
            ));
        }
        let config_path = dir.join("config.json");
        let cfg_text =
            std::fs::read_to_string(&config_path).map_err(|e| Error::file(&config_path, e))?;
        let cfg_json: Value = serde_json::from_str(&cfg_text)
            .map_err(|e| Error::file(&config_path, format!("not valid JSON: {e}")))?;
        opts.limits.validate()?;

        // Everything small first (tokenizer, template, processor and generation settings), so that a
        // missing or broken file is reported before the weights load.
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let tok_cfg = read_json_opt(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let template = ChatTemplate::new(
            &find_chat_template(dir, &tok_cfg)?,
            &token_field(&tok_cfg, "bos_token"),
            &token_field(&tok_cfg, "eos_token"),
        )?;

        let proc_cfg = read_json_opt(&dir.join("processor_config.json"))?;
        // transformers 5 writes the image processor's settings inside processor_config.json.
        let pre = match read_json_opt(&dir.join("preprocessor_config.json"))? {
            Some(v) => v,
            None => proc_cfg
                .as_ref()
                .and_then(|v| v.get("image_processor"))
                .cloned()
                .unwrap_or(Value::Null),
        };
        // The family, chosen by config.json's architecture, checks its files before any weight.
        let setup = family::setup(&FamilyFiles {
            config: &cfg_json,
            preprocessor: &pre,
            processor: proc_cfg.as_ref(),
            tokenizer: &tokenizer,
        })
        .map_err(|e| match e {
            Error::Config(m) | Error::Unsupported(m) => Error::file(
                dir,
                format!("{m} (config.json / preprocessor_config.json / processor_config.json)"),
            ),
            other => other,
        })?;

        let gen_defaults =
            read_json_opt(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let mut eos_ids = eos_token_ids(&gen_defaults);
        for v in [cfg_json.get("text_config"), Some(&cfg_json)]
            .into_iter()
            .flatten()
        {
            eos_ids.extend(eos_token_ids(v));
        }
        if let Some(id) = tokenizer.token_to_id("<end_of_utterance>") {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();

        let device = opts.open_device()?;
        let store = WeightStore::open_dir(dir)?;
        let mut load_opts = LoadOptions::new(opts.precision.dtype(), device);
        load_opts.bf16_tiles = opts.vision_bf16_tiles;
        load_opts.int8_activations = opts.int8_activations;
        load_opts.checkpoint_quant =
            CheckpointQuant::from_config(&cfg_json).map_err(|e| Error::file(&config_path, e))?;
        if let Some(spec) = opts.quantize {
            // On CUDA / Metal each quantized layer is placed in the form candle runs there
            // (`Linear::place`).
            load_opts.quantize = Some(spec);
            load_opts.skip_vision = opts.skip_vision;
        }
        let model = setup.load(&Weights::new(&store, &load_opts))?;
        drop(store);
        return_freed_memory();
        Ok(Self {
            model: Model::Vision(model),
            tokenizer,
            template,
            eos_ids,
            name: name.to_string(),
            opts,
            gen_defaults,
            reuse: ReuseCache::new(reuse_bytes),
            speech: None,
        })
    }

    /// The name echoed in responses (repo id, folder or GGUF file stem).
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn model(&self) -> &Model {
        &self.model
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }
    /// Whether the model takes images.
    pub fn takes_images(&self) -> bool {
        self.model.vision().is_some()
    }
    /// The image choices of the engine's options, for its family's processor.
    pub fn image_options(&self) -> ImageOptions {
        ImageOptions {
            splitting: self.opts.image_splitting,
            min_pixels: self.opts.min_pixels,
            max_pixels: self.opts.max_pixels,
        }
    }
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }
    pub fn context_length(&self) -> usize {
        self.model.text().config().max_position_embeddings
    }

    fn vision(&self) -> Result<&dyn VisionLanguageModel> {
        self.model.vision().ok_or_else(|| {
            Error::Request(format!(
                "model `{}` is text-only and takes no images",
                self.name
            ))
        })
    }

    /// Messages in the template's shape, plus the image references in prompt order
    /// ([`ChatRequest::template_messages`]).
    ///
    /// `input_audio` parts must have been transcribed first ([`Self::transcribe_audio_parts`]).
    pub fn template_messages(req: &ChatRequest) -> Result<(Vec<TemplateMessage>, Vec<String>)> {
        req.template_messages()
    }

    /// Render the chat template for a request (with the generation prompt), marking message text
    /// that spells a special token or the image placeholder so that it is tokenized as text.
    pub fn render_prompt(&self, req: &ChatRequest) -> Result<PromptText> {
        let (messages, _) = Self::template_messages(req)?;
        self.render_messages(&messages)
    }

    fn render_messages(&self, messages: &[TemplateMessage]) -> Result<PromptText> {
        let placeholder = self.model.vision().map(|v| v.placeholder());
        self.template.render_prompt(messages, true, |text| {
            placeholder.is_some_and(|p| text.contains(p)) || self.tokenizer.spells_special(text)
        })
    }

    /// Process images given as decoded RGB and expand a rendered prompt into token ids.
    pub fn prepare_with_images(
        &self,
        prompt: &PromptText,
        images: &[image::Image8],
    ) -> Result<PreparedPrompt> {
        let inputs = images
            .iter()
            .map(|i| ImageInput::Decoded(i, None))
            .collect();
        self.prepare_inputs(prompt, inputs, &self.image_options())
    }

    fn prepare_inputs(
        &self,
        prompt: &PromptText,
        inputs: Vec<ImageInput>,
        options: &ImageOptions,
    ) -> Result<PreparedPrompt> {
        let t0 = Instant::now();
        let Some(vision) = self.model.vision() else {
            if !inputs.is_empty() {
                self.vision()?;
            }
            let ids = self.tokenizer.encode_prompt(prompt)?;
            return Ok(PreparedPrompt {
                text: prompt.clone(),
                ids,
                ..Default::default()
            });
        };
        let mut p = PreparedPrompt::default();
        for input in inputs {
            let (processed, key, cached) = match input {
                ImageInput::Decoded(img, key) => (vision.process_image(img, options)?, key, None),
                ImageInput::Cached(key, c) => (
                    EncoderInput {
                        pixel_values: Vec::new(),
                        layout: c.layout,
                    },
                    Some(key),
                    Some(c),
                ),
            };
            p.images.push(processed);
            p.image_keys.push(key);
            p.cached_images.push(cached);
        }
        p.preprocess_ms = t0.elapsed().as_secs_f64() * 1e3;
        let layouts: Vec<ImageLayout> = p.images.iter().map(|i| i.layout).collect();
        p.text = vision.expand_prompt(prompt, &layouts)?;
        p.ids = self.tokenizer.encode_prompt(&p.text)?;
        p.positions = vision.prompt_positions(&p.ids, &layouts)?.map(Arc::new);
        Ok(p)
    }

    /// Render, load images and tokenize a request. Images are checked against the engine's
    /// [`Limits`] (count, source, size from the header) before any is decoded; an image whose
    /// features the reuse cache holds is not decoded at all.
    pub fn prepare(&self, req: &ChatRequest) -> Result<PreparedPrompt> {
        let spoken;
        let req = if req.audio_parts().is_empty() {
            req
        } else {
            spoken = self.transcribe_audio_parts(req)?;
            &spoken
        };
        let (messages, refs) = Self::template_messages(req)?;
        if !refs.is_empty() {
            self.vision()?;
        }
        self.opts.limits.check_image_count(refs.len())?;
        let prompt = self.render_messages(&messages)?;
        let mut options = self.image_options();
        options.min_pixels = req.min_pixels.or(options.min_pixels);
        options.max_pixels = req.max_pixels.or(options.max_pixels);
        let t0 = Instant::now();
        let mut decoded = Vec::with_capacity(refs.len());
        for r in &refs {
            let (bytes, source) = image::read_image_ref(r, &self.opts.limits)?;
            // Features depend on the image and on how it is resized.
            let key = cache::image_key(&bytes, &format!("{options:?}"));
            decoded.push(match self.reuse.image(key) {
                Some(c) => Err((key, c)),
                None => Ok((
                    image::decode_bytes(&bytes, &source, &self.opts.limits)?,
                    key,
                )),
            });
        }
        let decode_ms = t0.elapsed().as_secs_f64() * 1e3;
        let inputs = decoded
            .iter()
            .map(|d| match d {
                Ok((img, key)) => ImageInput::Decoded(img, Some(*key)),
                Err((key, c)) => ImageInput::Cached(*key, c.clone()),
            })
            .collect();
        let mut p = self.prepare_inputs(&prompt, inputs, &options)?;
        p.preprocess_ms += decode_ms;
        Ok(p)
    }

    /// The reuse cache (image features, prompt prefixes) of this engine.
    pub fn reuse_cache(&self) -> &ReuseCache {
        &self.reuse
    }

    /// Image features for all images of a prompt, `(image tokens, hidden)`, or None without images.
    pub fn encode_images(&self, images: &[EncoderInput]) -> Result<Option<Tensor>> {
        if images.is_empty() {
            return Ok(None);
        }
        let vision = self.vision()?;
        let feats = images
            .iter()
            .map(|img| vision.encode(img, 0..img.layout.units))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&feats, 0)?))
    }

    /// A KV cache for `capacity` positions, in the type the options ask for.
    fn new_cache(&self, capacity: usize) -> KvCache {
        // Only the CPU decode kernel reads f16 in place; elsewhere every step would widen the cache.
        let text = self.model.text();
        let f16 = self.opts.f16_kv_cache && text.dtype() == DType::F32 && text.device().is_cpu();
        let dtype = f16.then_some(DType::F16);
        text.new_cache(capacity).with_dtype(dtype)
    }

    /// Logits `(positions, vocab)` of a prepared prompt in one teacher-forced pass: every position when
    /// `all_positions`, else the last one only.
    pub fn logits(&self, prepared: &PreparedPrompt, all_positions: bool) -> Result<Tensor> {
        let feats = self.encode_images(&prepared.images)?;
        let embeds = self.model.embed_prompt(&prepared.ids, feats.as_ref())?;
        let text = self.model.text();
        let mut cache = self.new_cache(prepared.ids.len());
        text.forward_at(
            &embeds,
            prepared.rotary(0, prepared.ids.len()),
            &mut cache,
            all_positions,
        )
    }

    /// Logits `(positions, vocab)` of text tokens fed one at a time, as generation feeds what it
    /// samples: every product runs the one-token decode kernels instead of the prompt pass's.
    pub fn decode_logits(&self, ids: &[u32]) -> Result<Tensor> {
        let text = self.model.text();
        let mut cache = self.new_cache(ids.len());
        let rows = ids
            .iter()
            .map(|&id| {
                let embeds = self.model.embed_prompt(&[id], None)?;
                text.forward(&embeds, &mut cache, false)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// The request's `logit_bias` as (token, bias), each token checked against the vocabulary.
    fn logit_bias(&self, req: &ChatRequest) -> Result<Vec<(u32, f32)>> {
        let vocab = self.model.text().config().vocab_size;
        let Some(bias) = &req.logit_bias else {
            return Ok(Vec::new());
        };
        bias.iter()
            .map(|(k, &b)| match k.parse::<u32>() {
                Ok(t) if (t as usize) < vocab => Ok((t, b)),
                _ => Err(Error::Request(format!(
                    "logit_bias key `{k}` is not a token id of this model (0..{vocab})"
                ))),
            })
            .collect()
    }

    /// Resolve a request's generation settings against the model's defaults ([`ChatRequest::validate`]
    /// first). Without a `seed`, sampling draws a random one, as OpenAI's API does.
    pub fn settings(&self, req: &ChatRequest) -> Result<GenerationSettings> {
        req.validate()?;
        let default_sample = self
            .gen_defaults
            .get("do_sample")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let gd = |k: &str| self.gen_defaults.get(k).and_then(Value::as_f64);
        let temperature = match req.temperature {
            Some(t) => t,
            None if default_sample => gd("temperature").unwrap_or(1.0) as f32,
            None => 0.0,
        };
        let top_logprobs = (req.logprobs == Some(true)).then(|| req.top_logprobs.unwrap_or(0));
        let sampling = SamplingParams {
            temperature,
            top_k: req.top_k.unwrap_or(0),
            top_p: req.top_p.unwrap_or(1.0),
            min_p: req.min_p.unwrap_or(0.0),
            repetition_penalty: req
                .repetition_penalty
                .or(gd("repetition_penalty").map(|x| x as f32))
                .unwrap_or(1.0),
            presence_penalty: req.presence_penalty.unwrap_or(0.0),
            frequency_penalty: req.frequency_penalty.unwrap_or(0.0),
            logit_bias: self.logit_bias(req)?,
            seed: req.seed.unwrap_or_else(random_u64),
        };
        sampling.validate()?;
        Ok(GenerationSettings {
            sampling,
            max_tokens: req.max_completion_tokens.or(req.max_tokens),
            stop: req
                .stop
                .clone()
                .map(StopField::into_vec)
                .unwrap_or_default(),
            top_logprobs,
            stop_at_eos: req.ignore_eos != Some(true),
        })
    }
}

/// Loading converts and quantizes weights one tensor at a time; the allocator keeps those freed
/// buffers in its heaps, where they count as resident memory for the life of the process. Hand them
/// back to the system once the model is built (glibc on Linux; elsewhere nothing to do).
impl Engine {
    /// This engine with a speech model that transcribes requests' `input_audio` parts: the text of
    /// each stands in its message as the user's words.
    pub fn with_speech(mut self, speech: std::sync::Arc<crate::speech::Transcriber>) -> Self {
        self.speech = Some(speech);
        self
    }

    /// The speech model, if the engine has one.
    pub fn speech(&self) -> Option<&crate::speech::Transcriber> {
        self.speech.as_deref()
    }

    /// `req` with each `input_audio` part replaced by its transcript (language detected).
    pub fn transcribe_audio_parts(&self, req: &ChatRequest) -> Result<ChatRequest> {
        let parts = req.audio_parts();
        if parts.is_empty() {
            return Ok(req.clone());
        }
        let speech = self.speech.as_deref().ok_or_else(|| {
            Error::Request(
                "an input_audio part needs a speech model (this engine has none: load one with --speech-model)"
                    .into(),
            )
        })?;
        let limits = crate::audio::AudioLimits::default();
        let texts = parts
            .iter()
            .map(|p| {
                let audio = p.decode(&limits)?;
                Ok(speech
                    .transcribe(&audio, &crate::speech::TranscribeOptions::default())?
                    .text)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(req.with_transcripts(&texts))
    }
}

pub(crate) fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Tune glibc's allocator to this engine (Linux; elsewhere nothing to do). Process-wide settings, so
/// they are for the program (the CLI calls this first thing), not the library:
/// - one heap for all threads: by default glibc gives each thread-pool worker its own, and each keeps
///   the buffers a prefill freed: peak RSS of SmolLM2-135M Q4_1 with a 512-token prompt 211-228 ->
///   179 MB, for about 3% of prompt speed;
/// - buffers up to 32 MB from that heap, whose top is not trimmed after each free (and grows 64 MB at
///   a time): by default glibc maps each large activation buffer afresh and unmaps it when freed, or
///   trims the heap under it, so every layer's activations fault their pages in again and the kernel
///   zeroes them. Vision of the full-size SmolVLM-256M 444-479 -> 359-381 ms per tile (13 tiles, 2
///   threads, 3 alternating runs), the same peak RSS. The engine hands freed memory back itself, after
///   loading and after each request.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning, and each value is in its parameter's range.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}
