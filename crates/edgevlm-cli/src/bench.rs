//! `edgevlm bench`: load a model once, then time image preprocessing, vision encoding, prompt
//! processing, generation and time to first token over several repetitions, with peak memory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use edgevlm::engine::{Poll, PreparedPrompt};
use edgevlm::image::Image8;
use edgevlm::openai::ChatRequest;
use edgevlm::prompt::PromptText;
use edgevlm::sampling::SamplingParams;
use edgevlm::{DeviceKind, Engine, EngineOptions, GenerationSettings, Limits, Precision, Timings};
use serde::Serialize;

use crate::{parse_quant, set_threads};

#[derive(Args)]
pub struct BenchArgs {
    /// Model folder, repo id or GGUF file.
    #[arg(long, default_value = edgevlm::DEFAULT_MODEL)]
    model: String,
    /// Quantize full-precision weights while loading.
    #[arg(long, value_parser = ["q8", "q4"])]
    quant: Option<String>,
    #[arg(long, default_value_t = edgevlm::quant::DEFAULT_GROUP_SIZE)]
    group_size: usize,
    /// With --quant: keep the vision encoder in full precision.
    #[arg(long, requires = "quant")]
    skip_vision: bool,
    /// Compute the vision encoder's products and attention in f32, exactly: otherwise they run on
    /// bf16 AMX tiles where the CPU has them, else (AVX2) as 16-bit integer products.
    #[arg(long)]
    f32_vision: bool,
    /// Round the activations of quantized products to 8 bits per block of 32, as llama.cpp does:
    /// faster decode batches on the CPU (and candle's Q8_1 kernels on CUDA), less exact (the KL
    /// divergence is in benches/README.md); by default they keep 16 bits (CPU) or f32 (GPU).
    #[arg(long, alias = "gpu-int8-activations")]
    int8_activations: bool,
    /// Keep the KV cache in f16 where the model computes in f32 on the CPU: half its memory and
    /// faster decoding after long (image) prompts, logits within about 1e-2 of the f32 cache's.
    #[arg(long)]
    f16_kv_cache: bool,
    /// Image file to put in the prompt.
    #[arg(long, conflicts_with = "image_size")]
    image: Option<PathBuf>,
    /// A synthetic image of this size (WxH) instead of a file.
    #[arg(long, value_parser = parse_size)]
    image_size: Option<(usize, usize)>,
    /// Prompt length in tokens: exactly this many text tokens without an image; with one, the question
    /// is padded with text until the whole prompt (image tokens included) reaches this length.
    #[arg(long)]
    prompt_tokens: Option<usize>,
    /// Tokens to generate (end-of-sequence is ignored).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
    /// Also time decoding N copies of the prompt together in one batch per step (as `serve` does
    /// with N clients): aggregate decode tokens/s over all N.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    dtype: String,
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda", "metal"])]
    device: String,
    /// Skip the untimed warm-up pass.
    #[arg(long)]
    no_warmup: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> std::result::Result<(usize, usize), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("`{s}` is not WxH"))?;
    let w: usize = w.parse().map_err(|_| format!("bad width in `{s}`"))?;
    let h: usize = h.parse().map_err(|_| format!("bad height in `{s}`"))?;
    if w == 0 || h == 0 || w * h > 64_000_000 {
        return Err(format!("image size `{s}` must be 1x1 to 64 megapixels"));
    }
    Ok((w, h))
}

/// A deterministic photo-like test image: smooth colour gradients with fine texture.
fn synthetic_image(w: usize, h: usize) -> Image8 {
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let t = ((x * 7 + y * 13) % 17) as f32 * 2.0;
            data.push((255.0 * x as f32 / w as f32 * 0.9 + t) as u8);
            data.push((255.0 * y as f32 / h as f32 * 0.9 + t) as u8);
            data.push((128.0 + 100.0 * ((x + y) as f32 * 0.05).sin()) as u8);
        }
    }
    Image8::new(w, h, 3, data)
}

const FILLER: &str =
    "The old lighthouse keeper climbed the spiral stairs each evening, trimmed the wick, \
polished the great lens and watched the ships pass safely along the rocky northern coast. ";

/// One repetition's measurements, in milliseconds or tokens per second.
#[derive(Clone, Debug, Default, Serialize)]
struct Run {
    image_preprocess_ms: f64,
    vision_ms: f64,
    vision_ms_per_tile: f64,
    prompt_ms: f64,
    prompt_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    ttft_ms: f64,
}

#[derive(Serialize)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(xs: impl Iterator<Item = f64>) -> Stat {
    let mut v: Vec<f64> = xs.collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Stat {
        median,
        min: v[0],
        max: v[n - 1],
    }
}

/// Peak resident set size of this process in MB (Linux `VmHWM`).
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

struct Workload {
    prompt: PromptText,
    image: Option<Image8>,
    image_path: Option<PathBuf>,
    /// Text-only prompts are token ids given as they are (no chat template), as llama-bench does.
    ids: Option<Vec<u32>>,
}

impl Workload {
    fn prepare(&self, engine: &Engine) -> Result<PreparedPrompt> {
        if let Some(ids) = &self.ids {
            return Ok(PreparedPrompt {
                ids: ids.clone(),
                ..Default::default()
            });
        }
        let t0 = Instant::now();
        let img = match (&self.image_path, &self.image) {
            (Some(p), _) => edgevlm::image::load_image_path(p, &Limits::default())?,
            (None, Some(img)) => img.clone(),
            (None, None) => bail!("internal: a templated prompt without an image"),
        };
        let decode_ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut p = engine.prepare_with_images(&self.prompt, std::slice::from_ref(&img))?;
        p.preprocess_ms += decode_ms;
        Ok(p)
    }
}

fn workload(engine: &Engine, a: &BenchArgs) -> Result<Workload> {
    let image = a.image_size.map(|(w, h)| synthetic_image(w, h));
    if a.image.is_none() && image.is_none() {
        let n = a.prompt_tokens.unwrap_or(512);
        if n == 0 {
            bail!("--prompt-tokens must be at least 1");
        }
        let mut ids = Vec::with_capacity(n);
        let piece = engine.tokenizer().encode(FILLER)?;
        while ids.len() < n {
            ids.extend(piece.iter().take(n - ids.len()));
        }
        return Ok(Workload {
            prompt: PromptText::default(),
            image: None,
            image_path: None,
            ids: Some(ids),
        });
    }
    if !engine.takes_images() {
        bail!("model `{}` is text-only and takes no images", a.model);
    }
    let render = |question: &str| {
        let req = ChatRequest::simple(None, question, &["bench-image".to_string()]);
        engine.render_prompt(&req)
    };
    let mut question = String::from("Describe this image in detail.");
    let mut w = Workload {
        prompt: render(&question)?,
        image,
        image_path: a.image.clone(),
        ids: None,
    };
    if let Some(n) = a.prompt_tokens {
        let mut len = w.prepare(engine)?.ids.len();
        while len < n {
            question.insert_str(0, FILLER);
            w.prompt = render(&question)?;
            len = w.prepare(engine)?.ids.len();
        }
    }
    Ok(w)
}

/// Aggregate decode speed of `n` copies of the workload decoded together, one batched step per
/// token ([`Engine::step_batch`]), after each has run its prompt.
fn batched_decode_tokens_per_s(
    engine: &Engine,
    work: &Workload,
    settings: &GenerationSettings,
    n: usize,
) -> Result<f64> {
    let prepared = work.prepare(engine)?;
    let mut gens = (0..n)
        .map(|_| engine.start(&prepared, settings))
        .collect::<edgevlm::Result<Vec<_>>>()?;
    let t0 = Instant::now();
    let mut tokens = 0usize;
    loop {
        let mut waiting = Vec::with_capacity(n);
        for g in gens.iter_mut() {
            loop {
                match g.poll()? {
                    Poll::Piece(_) => {}
                    Poll::NeedsStep => {
                        waiting.push(g);
                        break;
                    }
                    Poll::Done => break,
                }
            }
        }
        if waiting.is_empty() {
            break;
        }
        tokens += waiting.len();
        engine.step_batch(&mut waiting)?;
    }
    Ok(tokens as f64 / t0.elapsed().as_secs_f64())
}

fn measure(t: &Timings) -> Run {
    let tiles = t.image_tiles.max(1) as f64;
    Run {
        image_preprocess_ms: t.image_preprocess_ms,
        vision_ms: t.image_encode_ms,
        vision_ms_per_tile: t.image_encode_ms / tiles,
        prompt_ms: t.prompt_ms,
        prompt_tokens_per_s: t.prompt_tokens_per_s(),
        decode_tokens_per_s: t.generation_tokens_per_s(),
        ttft_ms: t.image_preprocess_ms + t.image_encode_ms + t.prompt_ms,
    }
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    if a.gen_tokens < 2 {
        bail!("--gen-tokens must be at least 2 (decode speed is timed after the first token)");
    }
    let threads = set_threads(a.threads)?;
    let opts = EngineOptions {
        precision: a.dtype.parse::<Precision>()?,
        device: a.device.parse::<DeviceKind>()?,
        quantize: parse_quant(a.quant.as_deref(), a.group_size)?,
        skip_vision: a.skip_vision,
        vision_bf16_tiles: !a.f32_vision,
        int8_activations: a.int8_activations,
        f16_kv_cache: a.f16_kv_cache,
        ..Default::default()
    };
    let t0 = Instant::now();
    let engine = Engine::load(&a.model, opts).with_context(|| format!("loading {}", a.model))?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let rss_after_load = peak_rss_mb();
    let work = workload(&engine, &a)?;
    let settings = GenerationSettings {
        sampling: SamplingParams::default(),
        max_tokens: Some(a.gen_tokens as u64),
        stop: Vec::new(),
        top_logprobs: None,
        stop_at_eos: false,
    };
    if !a.no_warmup {
        let p = work.prepare(&engine)?;
        let warm = GenerationSettings {
            max_tokens: Some(4),
            ..settings.clone()
        };
        engine.generate(&p, &warm, |_, _| {})?;
    }
    let mut runs = Vec::with_capacity(a.repetitions);
    let (mut prompt_tokens, mut tiles) = (0, 0);
    for _ in 0..a.repetitions {
        let p = work.prepare(&engine)?;
        let out = engine.generate(&p, &settings, |_, _| {})?;
        prompt_tokens = out.timings.prompt_tokens;
        tiles = out.timings.image_tiles;
        runs.push(measure(&out.timings));
    }
    let batched = if a.batch > 1 {
        let rates = (0..a.repetitions)
            .map(|_| batched_decode_tokens_per_s(&engine, &work, &settings, a.batch))
            .collect::<Result<Vec<_>>>()?;
        Some(stat(rates.into_iter()))
    } else {
        None
    };
    let peak = peak_rss_mb();
    let get = |f: fn(&Run) -> f64| stat(runs.iter().map(f));
    let image = tiles > 0;
    let report = serde_json::json!({
        "model": engine.name(),
        "quant": a.quant.as_ref().map(|q| format!("{q}g{}", a.group_size)),
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": a.gen_tokens,
        "image_tiles": tiles,
        "repetitions": a.repetitions,
        "load_ms": load_ms,
        "prompt_tokens_per_s": get(|r| r.prompt_tokens_per_s).median,
        "decode_tokens_per_s": get(|r| r.decode_tokens_per_s).median,
        "vision_ms_per_tile": image.then(|| get(|r| r.vision_ms_per_tile).median),
        "ttft_ms": get(|r| r.ttft_ms).median,
        "batch": a.batch,
        "batched_decode_tokens_per_s": batched.as_ref().map(|s| s.median),
        "peak_rss_mb": peak,
        "rss_after_load_mb": rss_after_load,
        "stats": {
            "image_preprocess_ms": image.then(|| get(|r| r.image_preprocess_ms)),
            "vision_ms": image.then(|| get(|r| r.vision_ms)),
            "vision_ms_per_tile": image.then(|| get(|r| r.vision_ms_per_tile)),
            "prompt_ms": get(|r| r.prompt_ms),
            "prompt_tokens_per_s": get(|r| r.prompt_tokens_per_s),
            "decode_tokens_per_s": get(|r| r.decode_tokens_per_s),
            "ttft_ms": get(|r| r.ttft_ms),
        },
        "runs": runs,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} | {} | {threads} threads | {prompt_tokens} prompt tokens{} | {} generated | {} repetitions | load {load_ms:.0} ms",
        engine.name(),
        a.quant.as_deref().map_or("weights as stored".to_string(), |q| format!("{q} group {}", a.group_size)),
        if image { format!(" ({tiles} image tiles)") } else { String::new() },
        a.gen_tokens,
        a.repetitions,
    );
    println!("| metric | median | min | max |");
    println!("| --- | --- | --- | --- |");
    let row = |name: &str, s: Stat| {
        println!("| {name} | {:.1} | {:.1} | {:.1} |", s.median, s.min, s.max);
    };
    if image {
        row("image preprocess ms", get(|r| r.image_preprocess_ms));
        row("vision encode ms", get(|r| r.vision_ms));
        row("vision ms per tile", get(|r| r.vision_ms_per_tile));
    }
    row("prompt ms", get(|r| r.prompt_ms));
    row("prompt tokens/s", get(|r| r.prompt_tokens_per_s));
    row("decode tokens/s", get(|r| r.decode_tokens_per_s));
    row("time to first token ms", get(|r| r.ttft_ms));
    if let Some(b) = batched {
        row(
            &format!("decode tokens/s, {} sequences batched (all)", a.batch),
            b,
        );
    }
    if let Some(p) = peak {
        println!(
            "peak RSS {p:.0} MB (after load {:.0} MB)",
            rss_after_load.unwrap_or(0.0)
        );
    }
    Ok(())
}
