//! `edgevlm transcribe`: speech to text with a Whisper model, and the spoken question of `run --audio`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use edgevlm::audio::{read_wav_path, AudioLimits};
use edgevlm::speech::format::{render, ResponseFormat};
use edgevlm::speech::{SpeechLoadOptions, Task, TranscribeOptions, Transcriber};

use crate::{parse_quant, set_threads};

/// The speech model used when none is named (a Hugging Face repo id; `scripts/fetch-whisper.sh`
/// writes the same weights into a local folder).
pub const DEFAULT_SPEECH_MODEL: &str = "openai/whisper-base";

#[derive(Args)]
pub struct TranscribeArgs {
    /// The audio: a WAV file (8/16/24/32-bit integer or 32-bit float, mono or stereo, any rate).
    file: PathBuf,
    /// Whisper model: a folder in the Hugging Face layout or a Hugging Face repo id.
    #[arg(long, default_value = DEFAULT_SPEECH_MODEL)]
    model: String,
    /// Language code of the speech (en, de, fr, ...); detected from the first 30 s when absent.
    #[arg(long)]
    language: Option<String>,
    /// transcribe, or translate into English.
    #[arg(long, default_value = "transcribe", value_parser = ["transcribe", "translate"])]
    task: String,
    /// Output: text, json, verbose_json (segments with times), srt or vtt.
    #[arg(long, default_value = "text")]
    response_format: String,
    /// Same as --response-format verbose_json.
    #[arg(long, conflicts_with = "response_format")]
    json: bool,
    /// Decode without timestamp tokens (audio over 30 s still uses them to find window ends).
    #[arg(long)]
    no_timestamps: bool,
    /// One temperature, no fallback (default: 0, then 0.2 ... 1.0 where a window's text loops or
    /// is unlikely, as OpenAI's transcribe does).
    #[arg(long)]
    temperature: Option<f32>,
    /// Text that precedes the audio (names, spellings, style).
    #[arg(long)]
    prompt: Option<String>,
    /// Seed for the sampled fallback temperatures.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Quantize the linear layers while loading: q8 or q4.
    #[arg(long, value_parser = ["q8", "q4"])]
    quant: Option<String>,
    #[arg(long, default_value_t = edgevlm::quant::DEFAULT_GROUP_SIZE)]
    group_size: usize,
    /// Keep full f32 copies of 16-bit weights (twice the memory, the same results).
    #[arg(long)]
    f32_weights: bool,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Timing on stderr.
    #[arg(long, short)]
    verbose: bool,
}

pub fn run(a: TranscribeArgs) -> Result<()> {
    set_threads(a.threads)?;
    let format = if a.json {
        ResponseFormat::VerboseJson
    } else {
        ResponseFormat::parse(&a.response_format)?
    };
    if a.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        bail!("--temperature must be between 0 and 2");
    }
    // The audio is read and checked before the model loads.
    let audio = read_wav_path(&a.file, &AudioLimits::default())?;
    let t0 = Instant::now();
    let load = SpeechLoadOptions {
        quantize: parse_quant(a.quant.as_deref(), a.group_size)?,
        f32_weights: a.f32_weights,
    };
    let transcriber = Transcriber::load(&a.model, &load)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut options = TranscribeOptions {
        language: a.language.clone(),
        task: if a.task == "translate" {
            Task::Translate
        } else {
            Task::Transcribe
        },
        timestamps: !a.no_timestamps,
        initial_prompt: a.prompt.clone(),
        seed: a.seed,
        ..Default::default()
    };
    if let Some(t) = a.temperature {
        options.temperatures = vec![t];
    }
    let t1 = Instant::now();
    let transcript = transcriber.transcribe(&audio, &options)?;
    let secs = t1.elapsed().as_secs_f64();
    let out = render(&transcript, format);
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(out.as_bytes())
        .and_then(|_| {
            if out.ends_with('\n') {
                Ok(())
            } else {
                stdout.write_all(b"\n")
            }
        })
        .and_then(|_| stdout.flush());
    if let Err(e) = written {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e.into());
        }
    }
    if a.verbose {
        eprintln!(
            "load {load_ms:.0} ms | audio {:.2} s | transcribe {:.0} ms (real-time factor {:.3}) | language {} | {} segments | peak RSS {:.1} MB",
            transcript.duration,
            secs * 1e3,
            secs / transcript.duration.max(1e-9),
            transcript.language,
            transcript.segments.len(),
            crate::bench::peak_rss_mb().unwrap_or(f64::NAN)
        );
    }
    Ok(())
}

/// The text of a spoken question (for `run --audio`).
pub fn question(path: &Path, model: &str, language: Option<&str>) -> Result<String> {
    let audio = read_wav_path(path, &AudioLimits::default())?;
    let transcriber = Transcriber::load(model, &SpeechLoadOptions::default())?;
    let options = TranscribeOptions {
        language: language.map(str::to_string),
        ..Default::default()
    };
    let text = transcriber.transcribe(&audio, &options)?.text;
    if text.trim().is_empty() {
        bail!("{}: no speech was recognised", path.display());
    }
    Ok(text)
}
