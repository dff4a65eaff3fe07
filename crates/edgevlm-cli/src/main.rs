//! `edgevlm`: ask a local vision-language model about images from the command line.

mod bench;
mod quant_eval;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use edgevlm::openai::StopField;
use edgevlm::quant::QuantSpec;
use edgevlm::{ChatRequest, DeviceKind, Engine, EngineOptions, Precision, DEFAULT_MODEL};

#[derive(Parser)]
#[command(
    name = "edgevlm",
    version,
    about = "Run small vision-language models locally"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer a prompt about zero or more images (or a whole OpenAI chat request with --request).
    Run(Box<RunArgs>),
    /// Accuracy of quantized weights against f32 on the same model (top-1 agreement, KLD, perplexity).
    QuantEval(quant_eval::QuantEvalArgs),
    /// Write a 4- or 8-bit checkpoint in MLX's affine layout.
    Quantize(QuantizeArgs),
    /// Time image preprocessing, vision encoding, prompt processing, generation and time to first
    /// token (median/min/max over repetitions), with peak memory.
    Bench(Box<bench::BenchArgs>),
}

/// `--quant q8|q4` with `--group-size`.
pub(crate) fn parse_quant(quant: Option<&str>, group_size: usize) -> Result<Option<QuantSpec>> {
    Ok(match quant {
        Some("q8") => Some(QuantSpec::new(8, group_size)?),
        Some("q4") => Some(QuantSpec::new(4, group_size)?),
        Some(other) => bail!("--quant `{other}` (q8 or q4)"),
        None => None,
    })
}

/// Size the CPU thread pool (before any kernel runs); returns the thread count in effect.
pub(crate) fn set_threads(threads: Option<usize>) -> Result<usize> {
    match threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(t) => {
            // candle's CPU kernels and edgevlm's own size their pools from this, read on first use.
            std::env::set_var("RAYON_NUM_THREADS", t.to_string());
            Ok(t)
        }
        None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

#[derive(Args)]
struct QuantizeArgs {
    /// Full-precision model: a local folder or a Hugging Face repo id.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    #[arg(long, value_parser = ["4", "8"])]
    bits: String,
    #[arg(long, default_value_t = 64)]
    group_size: usize,
    /// Keep the vision encoder in full precision.
    #[arg(long)]
    skip_vision: bool,
    /// Output folder (must not exist).
    #[arg(long)]
    out: PathBuf,
}

fn quantize(a: QuantizeArgs) -> Result<()> {
    let spec = QuantSpec::new(a.bits.parse()?, a.group_size)?;
    let src = edgevlm::source::resolve(&a.model)?;
    let r = edgevlm::quant::quantize_checkpoint(&src, &a.out, spec, a.skip_vision)?;
    eprintln!(
        "wrote {}: {} layers quantized to {}-bit (group {}), {} tensors kept, {:.1} MB -> {:.1} MB",
        a.out.display(),
        r.quantized_layers,
        spec.bits,
        spec.group_size,
        r.dense_tensors,
        r.input_bytes as f64 / 1e6,
        r.output_bytes as f64 / 1e6
    );
    Ok(())
}

#[derive(Args)]
struct RunArgs {
    /// Model: a local folder in the Hugging Face layout, or a Hugging Face repo id.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Image file (JPEG, PNG, WebP, GIF, BMP); repeat for several. They precede the prompt.
    #[arg(long = "image", value_name = "PATH")]
    images: Vec<PathBuf>,
    /// The question; read from stdin when absent.
    #[arg(long)]
    prompt: Option<String>,
    /// A system message.
    #[arg(long)]
    system: Option<String>,
    /// A whole OpenAI chat request as JSON (`-` for stdin); prints the chat.completion JSON.
    #[arg(long, value_name = "FILE|-", conflicts_with_all = ["images", "prompt", "system"])]
    request: Option<String>,
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// 0 is greedy (the default for SmolVLM).
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    min_p: Option<f32>,
    #[arg(long = "repeat-penalty")]
    repeat_penalty: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this text appears (up to 4).
    #[arg(long = "stop", value_name = "STR")]
    stop: Vec<String>,
    /// Return the log-probabilities of the N most likely tokens at each step (implies --json).
    #[arg(long, value_name = "N")]
    logprobs: Option<usize>,
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    dtype: String,
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda", "metal"])]
    device: String,
    /// Quantize linear weights while loading: q8 (8-bit) or q4 (4-bit), in affine groups as MLX does.
    #[arg(long, value_parser = ["q8", "q4"])]
    quant: Option<String>,
    /// Group size for --quant (32, 64 or 128).
    #[arg(long, default_value_t = 32)]
    group_size: usize,
    /// With --quant: keep the vision encoder in full precision.
    #[arg(long, requires = "quant")]
    skip_vision: bool,
    /// Compute the vision encoder's products and attention in f32 even on CPUs with AMX, where they
    /// otherwise run on bf16 tiles (exact, about 2x slower there).
    #[arg(long)]
    f32_vision: bool,
    /// CUDA: let candle's quantized products round activations to 8 bits (Q8_1), as llama.cpp does
    /// (faster, less exact; by default they stay f32).
    #[arg(long)]
    gpu_int8_activations: bool,
    /// Keep the KV cache in f16 where the model computes in f32 on the CPU: half its memory and
    /// faster decoding after long (image) prompts, logits within about 1e-2 of the f32 cache's.
    #[arg(long)]
    f16_kv_cache: bool,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Do not split large images into tiles (one 512x512 view per image).
    #[arg(long)]
    no_image_splitting: bool,
    /// Print one chat.completion JSON object on stdout instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Timing summary on stderr.
    #[arg(long, short)]
    verbose: bool,
}

fn read_stdin() -> Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading stdin")?;
    Ok(s)
}

fn build_request(a: &RunArgs) -> Result<ChatRequest> {
    let mut req = match &a.request {
        Some(src) => {
            let text = if src == "-" {
                read_stdin()?
            } else {
                std::fs::read_to_string(src).with_context(|| format!("reading {src}"))?
            };
            ChatRequest::from_json(&text)?
        }
        None => {
            let prompt = match &a.prompt {
                Some(p) => p.clone(),
                None => {
                    let p = read_stdin()?;
                    let p = p.trim_end_matches(['\n', '\r']).to_string();
                    if p.is_empty() {
                        bail!("no prompt: pass --prompt TEXT or write it on stdin");
                    }
                    p
                }
            };
            for img in &a.images {
                if !img.is_file() {
                    bail!("image {}: no such file", img.display());
                }
            }
            let images: Vec<String> = a.images.iter().map(|p| p.display().to_string()).collect();
            let mut r = ChatRequest::simple(a.system.as_deref(), &prompt, &images);
            r.max_tokens = Some(a.max_tokens);
            r
        }
    };
    // Command-line sampling flags override the request's.
    if a.request.is_some() && req.max_tokens.is_none() && req.max_completion_tokens.is_none() {
        req.max_tokens = Some(a.max_tokens);
    }
    req.temperature = a.temperature.or(req.temperature);
    req.top_p = a.top_p.or(req.top_p);
    req.top_k = a.top_k.or(req.top_k);
    req.min_p = a.min_p.or(req.min_p);
    req.repetition_penalty = a.repeat_penalty.or(req.repetition_penalty);
    req.seed = a.seed.or(req.seed);
    if !a.stop.is_empty() {
        req.stop = Some(StopField::Many(a.stop.clone()));
    }
    if let Some(n) = a.logprobs {
        req.logprobs = Some(true);
        req.top_logprobs = Some(n);
    }
    Ok(req)
}

fn run(a: RunArgs) -> Result<()> {
    set_threads(a.threads)?;
    let req = build_request(&a)?;
    let opts = EngineOptions {
        precision: a.dtype.parse::<Precision>()?,
        device: a.device.parse::<DeviceKind>()?,
        image_splitting: a.no_image_splitting.then_some(false),
        quantize: parse_quant(a.quant.as_deref(), a.group_size)?,
        skip_vision: a.skip_vision,
        vision_bf16_tiles: !a.f32_vision,
        gpu_int8_activations: a.gpu_int8_activations,
        f16_kv_cache: a.f16_kv_cache,
        ..Default::default()
    };
    let t0 = Instant::now();
    let engine = Engine::load(&a.model, opts)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;

    let json_out = a.json || a.request.is_some() || a.logprobs.is_some();
    let stream_json = a.request.is_some() && req.stream == Some(true);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let (completion, timings) = if json_out && !stream_json {
        engine.chat_streaming(&req, |_| Ok(()))?
    } else if stream_json {
        engine.chat_streaming(&req, |chunk| {
            let line =
                serde_json::to_string(chunk).map_err(|e| edgevlm::Error::Request(e.to_string()))?;
            writeln!(out, "{line}")
                .and_then(|_| out.flush())
                .map_err(|e| edgevlm::Error::Request(format!("writing stdout: {e}")))
        })?
    } else {
        let r = engine.chat_streaming(&req, |chunk| {
            if let Some(text) = chunk
                .choices
                .first()
                .and_then(|c| c.delta.content.as_deref())
            {
                write!(out, "{text}")
                    .and_then(|_| out.flush())
                    .map_err(|e| edgevlm::Error::Request(format!("writing stdout: {e}")))?;
            }
            Ok(())
        })?;
        writeln!(out).ok();
        r
    };
    if json_out && !stream_json {
        let s = serde_json::to_string_pretty(&completion)?;
        writeln!(out, "{s}").context("writing stdout")?;
    }
    if a.verbose {
        eprintln!(
            "load {load_ms:.0} ms | image: {} tiles, preprocess {:.0} ms, encode {:.0} ms | prompt: {} tokens, {:.0} ms ({:.1} tok/s) | generation: {} tokens, {:.0} ms ({:.1} tok/s) | finish: {:?}",
            timings.image_tiles,
            timings.image_preprocess_ms,
            timings.image_encode_ms,
            timings.prompt_tokens,
            timings.prompt_ms,
            timings.prompt_tokens_per_s(),
            timings.completion_tokens,
            timings.generation_ms,
            timings.generation_tokens_per_s(),
            completion.choices[0].finish_reason,
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    edgevlm::engine::tune_allocator();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run(*a),
        Command::QuantEval(a) => quant_eval::run(a),
        Command::Quantize(a) => quantize(a),
        Command::Bench(a) => bench::run(*a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("edgevlm: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
