//! `edgevlm`: ask a local vision-language model about images from the command line.

mod bench;
mod options;
mod quant_eval;
mod transcribe;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use edgevlm::openai::StopField;
use edgevlm::quant::QuantSpec;
use edgevlm::{ChatRequest, Engine, ImageSources, DEFAULT_MODEL};
use options::{LimitArgs, LoadArgs};

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
    /// Serve the model over HTTP as an OpenAI-compatible chat completions endpoint (and a chat page).
    Serve(Box<ServeArgs>),
    /// Speech to text with a Whisper model (WAV in; text, JSON, SRT or VTT out).
    Transcribe(Box<transcribe::TranscribeArgs>),
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    load: LoadArgs,
    #[command(flatten)]
    limits: LimitArgs,
    /// Address to listen on (loopback by default: pass 0.0.0.0 to serve other machines).
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` (default: $EDGEVLM_API_KEY, else no key).
    #[arg(long, env = "EDGEVLM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model's name in /v1/models and responses (default: the folder or file name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Answers generated at once, their decode steps batched.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Requests that may wait for a slot; beyond them requests get 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 32 << 20)]
    max_request_bytes: usize,
    /// Memory for reusing work across requests (image features, prompt-prefix caches), in MB.
    #[arg(long, default_value_t = 256)]
    cache_mb: usize,
    /// Let requests name local image files inside this folder (else only data: URIs).
    #[arg(long, value_name = "DIR")]
    allow_local_images: Option<PathBuf>,
    /// Seconds a client may take to send a request body.
    #[arg(long, default_value_t = 30)]
    body_timeout_secs: u64,
    /// A Whisper model (folder or repo id): serves POST /v1/audio/transcriptions and transcribes
    /// chat requests' input_audio parts.
    #[arg(long, value_name = "MODEL")]
    speech_model: Option<String>,
}

fn serve(a: ServeArgs) -> Result<()> {
    if a.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    let sources = match &a.allow_local_images {
        Some(dir) => {
            if !dir.is_dir() {
                bail!("--allow-local-images {}: no such folder", dir.display());
            }
            ImageSources::Under(dir.clone())
        }
        None => ImageSources::DataOnly,
    };
    let mut opts = a.load.engine_options(a.limits.limits(sources))?;
    opts.reuse_cache_bytes = a.cache_mb << 20;
    let model = a.load.model.clone();
    let name = a
        .served_model_name
        .clone()
        .unwrap_or_else(|| served_name(&model));
    let config = edgevlm_server::ServerConfig {
        addr: std::net::SocketAddr::new(a.host, a.port),
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        model_name: name,
        parallel: a.parallel,
        max_queue: a.max_queue,
        max_request_bytes: a.max_request_bytes,
        body_timeout: std::time::Duration::from_secs(a.body_timeout_secs.max(1)),
    };
    let speech = a.speech_model.clone();
    edgevlm_server::serve(config, move || {
        let engine = Engine::load(&model, opts)?;
        Ok(match speech {
            Some(m) => engine.with_speech(std::sync::Arc::new(edgevlm::speech::Transcriber::load(
                &m,
                &Default::default(),
            )?)),
            None => engine,
        })
    })
    .map_err(anyhow::Error::msg)
}

/// A model's name for clients: a repo id as it is, a folder's or file's last component.
fn served_name(model: &str) -> String {
    let p = std::path::Path::new(model);
    if p.exists() {
        let stem = if p.is_file() {
            p.file_stem()
        } else {
            p.file_name()
        };
        if let Some(s) = stem {
            return s.to_string_lossy().into_owned();
        }
    }
    model.to_string()
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
    #[arg(long, default_value_t = edgevlm::quant::DEFAULT_GROUP_SIZE)]
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
    #[command(flatten)]
    load: LoadArgs,
    #[command(flatten)]
    limits: LimitArgs,
    /// Image file (JPEG, PNG, WebP, GIF, BMP); repeat for several. They precede the prompt.
    #[arg(long = "image", value_name = "PATH")]
    images: Vec<PathBuf>,
    /// The question; read from stdin when absent.
    #[arg(long)]
    prompt: Option<String>,
    /// A spoken question (WAV): transcribed with --speech-model, its text is the question (after
    /// --prompt's text when both are given).
    #[arg(long, value_name = "WAV")]
    audio: Option<PathBuf>,
    /// The Whisper model that transcribes --audio: a folder in the Hugging Face layout or a repo id.
    #[arg(long, default_value = transcribe::DEFAULT_SPEECH_MODEL)]
    speech_model: String,
    /// Language of --audio (default: detected).
    #[arg(long)]
    audio_language: Option<String>,
    /// A system message.
    #[arg(long)]
    system: Option<String>,
    /// A whole OpenAI chat request as JSON (`-` for stdin); prints the chat.completion JSON. The
    /// sampling flags below override its fields.
    #[arg(long, value_name = "FILE|-", conflicts_with_all = ["images", "prompt", "system"])]
    request: Option<String>,
    /// Completion tokens (default: the request's, else 1024 or what the context has room for).
    #[arg(long)]
    max_tokens: Option<u64>,
    /// 0 is greedy (the default for SmolVLM); at most 2.
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f32>,
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    min_p: Option<f32>,
    #[arg(long = "repeat-penalty", allow_negative_numbers = true)]
    repeat_penalty: Option<f32>,
    /// Sampling seed (default: a random one, as OpenAI's API).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this text appears (up to 4).
    #[arg(long = "stop", value_name = "STR")]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens up to --max-tokens (for comparisons and
    /// benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Return the log-probabilities of the N most likely tokens at each step (implies --json).
    #[arg(long, value_name = "N")]
    logprobs: Option<usize>,
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

fn build_request(a: &RunArgs, spoken: Option<&str>) -> Result<ChatRequest> {
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
            let prompt = match (&a.prompt, spoken) {
                (Some(p), Some(s)) => format!("{p}\n{s}"),
                (None, Some(s)) => s.to_string(),
                (Some(p), None) => p.clone(),
                (None, None) => {
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
            ChatRequest::simple(a.system.as_deref(), &prompt, &images)
        }
    };
    // Command-line flags override the request's fields.
    if let Some(m) = a.max_tokens {
        req.max_tokens = Some(m);
        req.max_completion_tokens = None;
    }
    req.temperature = a.temperature.or(req.temperature);
    req.top_p = a.top_p.or(req.top_p);
    req.top_k = a.top_k.or(req.top_k);
    req.min_p = a.min_p.or(req.min_p);
    req.repetition_penalty = a.repeat_penalty.or(req.repetition_penalty);
    req.seed = a.seed.or(req.seed);
    if a.ignore_eos {
        req.ignore_eos = Some(true);
    }
    if !a.stop.is_empty() {
        req.stop = Some(StopField::Many(a.stop.clone()));
    }
    if let Some(n) = a.logprobs {
        req.logprobs = Some(true);
        req.top_logprobs = Some(n);
    }
    Ok(req)
}

/// A write to stdout that failed because the reader went away (`| head`): not an error, the
/// answer is simply no longer wanted.
fn reader_gone(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::BrokenPipe
}

fn run(a: RunArgs) -> Result<()> {
    let limits = a.limits.limits(ImageSources::Anywhere);
    let opts = a.load.engine_options(limits.clone())?;
    // A spoken question is transcribed first (its model loaded and dropped before the VLM loads).
    let spoken = match &a.audio {
        Some(path) => {
            if a.request.is_some() {
                bail!("--audio and --request: put the audio in the request as an input_audio part");
            }
            let t0 = Instant::now();
            let text = transcribe::question(path, &a.speech_model, a.audio_language.as_deref())?;
            if a.verbose {
                eprintln!(
                    "speech: {:?} ({:.0} ms)",
                    text,
                    t0.elapsed().as_secs_f64() * 1e3
                );
            }
            Some(text)
        }
        None => None,
    };
    let req = build_request(&a, spoken.as_deref())?;
    // What can be checked without the model is checked before loading it.
    req.validate()?;
    for field in req.ignored_fields() {
        eprintln!("edgevlm: note: the request's `{field}` is accepted and ignored");
    }
    let (_, image_refs) = req.template_messages()?;
    limits.check_image_count(image_refs.len())?;
    for r in &image_refs {
        edgevlm::image::probe_image_ref(r, &limits)?;
    }
    let t0 = Instant::now();
    let mut engine = Engine::load(&a.load.model, opts)?;
    if !req.audio_parts().is_empty() {
        // A request with input_audio parts: its speech is transcribed by --speech-model.
        let speech = edgevlm::speech::Transcriber::load(&a.speech_model, &Default::default())?;
        engine = engine.with_speech(std::sync::Arc::new(speech));
    }
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;

    let json_out = a.json || a.request.is_some() || a.logprobs.is_some();
    let stream_json = a.request.is_some() && req.stream == Some(true);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut stream = engine.chat_stream(&req)?;
    while let Some(chunk) = stream.next_chunk()? {
        let written = if stream_json {
            let line = serde_json::to_string(&chunk)?;
            writeln!(out, "{line}").and_then(|_| out.flush())
        } else if json_out {
            Ok(())
        } else {
            match chunk
                .choices
                .first()
                .and_then(|c| c.delta.content.as_deref())
            {
                Some(text) if !text.is_empty() => write!(out, "{text}").and_then(|_| out.flush()),
                _ => Ok(()),
            }
        };
        match written {
            Ok(()) => {}
            // Dropping the stream stops generation.
            Err(e) if reader_gone(&e) => return Ok(()),
            Err(e) => return Err(e).context("writing stdout"),
        }
    }
    let (completion, timings) = stream.into_completion();
    let tail = if json_out && !stream_json {
        serde_json::to_string_pretty(&completion)? + "\n"
    } else if !json_out {
        "\n".to_string()
    } else {
        String::new()
    };
    match out.write_all(tail.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if !reader_gone(&e) => return Err(e).context("writing stdout"),
        _ => {}
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
        Command::Serve(a) => serve(*a),
        Command::Transcribe(a) => transcribe::run(*a),
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
