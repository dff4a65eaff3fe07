//! Speech to text with Whisper: load a model folder (the Hugging Face layout), turn 16 kHz audio into
//! log-mel windows, detect the language, and transcribe as OpenAI's `transcribe()` does: 30 s windows
//! in sequence, each decoded with timestamps (segments end at timestamp pairs and the next window
//! starts where the last complete segment ended), the previous text as the next window's prompt, and
//! the temperature fallback (a window whose text loops, compression ratio > 2.4, or whose average
//! log-probability is below -1 is decoded again at the next temperature; silence is skipped).

pub mod decode;
pub mod format;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::Serialize;
use serde_json::Value;

use crate::audio::mel::{LogMel, MelSettings};
use crate::audio::{Waveform, SAMPLE_RATE};
use crate::config::get;
use crate::error::{Error, Result};
use crate::model::nn::{LoadOptions, Weights};
use crate::model::whisper::{Whisper, WhisperConfig};
use crate::quant::QuantSpec;
use crate::sampling::Rng;
use crate::tokenizer::Tokenizer;
use crate::weights::WeightStore;

pub use decode::{compression_ratio, SpecialTokens, WindowDecoding, WindowResult};

/// Seconds per timestamp step (`<|0.02|>`).
const TIME_PRECISION: f64 = 0.02;

/// Translate into English, or transcribe in the spoken language.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    #[default]
    Transcribe,
    Translate,
}

/// How to transcribe (OpenAI's `transcribe()` defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct TranscribeOptions {
    /// A language code (`en`, `de`, ...); `None`: detected from the first 30 s.
    pub language: Option<String>,
    pub task: Task,
    /// Decode with timestamp tokens (segments with times). Audio over 30 s always does.
    pub timestamps: bool,
    /// Temperatures tried in turn while a window's decoding fails the thresholds.
    pub temperatures: Vec<f32>,
    /// Candidates sampled at a temperature above 0; the likeliest is kept.
    pub best_of: usize,
    pub compression_ratio_threshold: Option<f64>,
    pub logprob_threshold: Option<f64>,
    pub no_speech_threshold: Option<f64>,
    /// Each window's prompt holds the text before it.
    pub condition_on_previous_text: bool,
    /// Text that comes before the audio (names, spelling, style).
    pub initial_prompt: Option<String>,
    pub seed: u64,
}

impl Default for TranscribeOptions {
    fn default() -> Self {
        Self {
            language: None,
            task: Task::Transcribe,
            timestamps: true,
            temperatures: vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
            best_of: 5,
            compression_ratio_threshold: Some(2.4),
            logprob_threshold: Some(-1.0),
            no_speech_threshold: Some(0.6),
            condition_on_previous_text: true,
            initial_prompt: None,
            seed: 0,
        }
    }
}

/// A stretch of speech with its text (OpenAI's `verbose_json` segment).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Segment {
    pub id: usize,
    /// The window's start, in mel frames (10 ms).
    pub seek: usize,
    pub start: f64,
    pub end: f64,
    pub text: String,
    pub tokens: Vec<u32>,
    pub temperature: f32,
    pub avg_logprob: f64,
    pub compression_ratio: f64,
    pub no_speech_prob: f64,
}

/// A transcription.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Transcript {
    pub task: Task,
    pub text: String,
    pub language: String,
    /// Seconds of audio.
    pub duration: f64,
    pub segments: Vec<Segment>,
}

/// How to load a speech model.
#[derive(Clone, Debug, Default)]
pub struct SpeechLoadOptions {
    /// Quantize the linear layers while loading (int8 / 4-bit affine codes, as the VLM path).
    pub quantize: Option<QuantSpec>,
    /// Expand 16-bit stored weights to f32 copies (twice the memory; the same products).
    pub f32_weights: bool,
}

/// A loaded Whisper model with its tokenizer and settings.
pub struct Transcriber {
    model: Whisper,
    tokenizer: Tokenizer,
    specials: SpecialTokens,
    /// `<|en|>` → id, in the model's order (the order language detection breaks ties in).
    languages: Vec<(String, u32)>,
    multilingual: bool,
    mel: LogMel,
    dir: PathBuf,
}

fn read_json(dir: &Path, name: &str, required: bool) -> Result<Value> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| Error::file(&path, e)),
        Err(_) if !required => Ok(Value::Null),
        Err(e) => Err(Error::file(&path, e)),
    }
}

fn ids(v: &Value, key: &str) -> Vec<u32> {
    get(v, key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .map(|n| n as u32)
                .collect()
        })
        .unwrap_or_default()
}

impl Transcriber {
    /// Load a Whisper model: a folder in the Hugging Face layout, or a Hugging Face repo id.
    pub fn load(model: &str, options: &SpeechLoadOptions) -> Result<Self> {
        let dir = crate::source::resolve(model)?;
        let config = read_json(&dir, "config.json", true)?;
        let cfg = WhisperConfig::from_value(&config)?;
        let generation = read_json(&dir, "generation_config.json", false)?;
        let preprocessor = read_json(&dir, "preprocessor_config.json", false)?;
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let token = |name: &str| -> Result<u32> {
            tokenizer.token_to_id(name).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: no {name} token",
                    dir.join("tokenizer.json").display()
                ))
            })
        };
        let no_timestamps = token("<|notimestamps|>")?;
        let specials = SpecialTokens {
            sot: token("<|startoftranscript|>")?,
            eot: token("<|endoftext|>")?,
            sot_prev: token("<|startofprev|>")?,
            no_timestamps,
            timestamp_begin: no_timestamps + 1,
            no_speech: tokenizer
                .token_to_id("<|nospeech|>")
                .or_else(|| tokenizer.token_to_id("<|nocaptions|>")),
            transcribe: token("<|transcribe|>")?,
            translate: token("<|translate|>")?,
            suppress: ids(&generation, "suppress_tokens"),
            begin_suppress: ids(&generation, "begin_suppress_tokens"),
            max_initial_timestamp_index: get(&generation, "max_initial_timestamp_index")
                .and_then(Value::as_u64)
                .map(|n| n as u32),
        };
        let mut languages: Vec<(String, u32)> = get(&generation, "lang_to_id")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| {
                        let code = k.trim_start_matches("<|").trim_end_matches("|>");
                        v.as_u64().map(|id| (code.to_string(), id as u32))
                    })
                    .collect()
            })
            .unwrap_or_default();
        languages.sort_by_key(|&(_, id)| id);
        let multilingual = get(&generation, "is_multilingual")
            .and_then(Value::as_bool)
            .unwrap_or(languages.len() > 1);
        let usize_of = |key: &str, default: usize| {
            get(&preprocessor, key)
                .and_then(Value::as_u64)
                .map_or(default, |n| n as usize)
        };
        let settings = MelSettings {
            n_fft: usize_of("n_fft", 400),
            hop_length: usize_of("hop_length", 160),
            n_mels: usize_of("feature_size", cfg.num_mel_bins),
            sampling_rate: usize_of("sampling_rate", SAMPLE_RATE as usize) as u32,
        };
        if settings.n_mels != cfg.num_mel_bins || settings.sampling_rate != SAMPLE_RATE {
            return Err(Error::Config(format!(
                "preprocessor_config.json: {} mel bins at {} Hz; the model takes {} at {SAMPLE_RATE} Hz",
                settings.n_mels, settings.sampling_rate, cfg.num_mel_bins
            )));
        }
        if settings.n_fft < 2 || settings.hop_length == 0 {
            return Err(Error::Config(
                "preprocessor_config.json: n_fft or hop_length out of range".into(),
            ));
        }
        let store = WeightStore::open_dir(&dir)?;
        let mut load = LoadOptions::new(DType::F32, Device::Cpu);
        load.quantize = options.quantize;
        load.half_weights = !options.f32_weights;
        let model = Whisper::load(&Weights::new(&store, &load), &cfg)?;
        crate::engine::return_freed_memory();
        Ok(Self {
            model,
            tokenizer,
            specials,
            languages,
            multilingual,
            mel: LogMel::new(settings),
            dir,
        })
    }

    /// The folder the model was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &WhisperConfig {
        self.model.config()
    }

    /// Language codes the model knows (`en`, `zh`, ...), in its order.
    pub fn languages(&self) -> impl Iterator<Item = &str> {
        self.languages.iter().map(|(c, _)| c.as_str())
    }

    /// Log-mel features of 16 kHz `samples` (`(n_mels, frames)`), as the model reads them.
    pub fn features(&self, samples: &[f32]) -> Vec<f32> {
        self.mel.features(samples)
    }

    /// One window `(n_mels, window_frames)` of `mel` (`frames` wide) from frame `seek`, zero-padded.
    fn window(&self, mel: &[f32], frames: usize, seek: usize) -> Vec<f32> {
        let n = self.model.config().window_frames();
        let bins = self.model.config().num_mel_bins;
        let mut out = vec![0f32; bins * n];
        let take = n.min(frames.saturating_sub(seek));
        for b in 0..bins {
            out[b * n..b * n + take].copy_from_slice(&mel[b * frames + seek..][..take]);
        }
        out
    }

    /// The language spoken in the window `mel`: its code and probability.
    pub fn detect_language(
        &self,
        state: &mut crate::model::whisper::DecoderState,
    ) -> Result<(String, f64)> {
        if !self.multilingual || self.languages.is_empty() {
            return Ok(("en".into(), 1.0));
        }
        state.clear_tokens();
        let logits = self
            .model
            .decoder
            .forward(state, &[self.specials.sot], false)?;
        let scores: Vec<f32> = self
            .languages
            .iter()
            .map(|&(_, id)| {
                logits
                    .get(id as usize)
                    .copied()
                    .unwrap_or(f32::NEG_INFINITY)
            })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f64 = scores.iter().map(|&s| f64::from(s - max).exp()).sum();
        let best = crate::sampling::argmax(&scores) as usize;
        Ok((
            self.languages[best].0.clone(),
            f64::from(scores[best] - max).exp() / total,
        ))
    }

    fn language_token(&self, code: &str) -> Result<u32> {
        self.languages
            .iter()
            .find(|(c, _)| c == code)
            .map(|&(_, id)| id)
            .ok_or_else(|| {
                let known: Vec<&str> = self.languages().collect();
                Error::Request(format!(
                    "language `{code}` is not one this model knows ({})",
                    known.join(", ")
                ))
            })
    }

    /// Token ids of `text` as a decoder prompt (no special tokens added).
    fn text_tokens(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(&format!(" {}", text.trim()))?
            .into_iter()
            .filter(|&t| t < self.specials.eot)
            .collect())
    }

    fn detokenize(&self, tokens: &[u32]) -> Result<String> {
        self.tokenizer.decode(tokens, true)
    }

    /// Transcribe `audio` (any sample rate; resampled to 16 kHz).
    pub fn transcribe(&self, audio: &Waveform, options: &TranscribeOptions) -> Result<Transcript> {
        let audio = audio.to_16k()?;
        self.transcribe_16k(&audio.samples, options)
    }

    /// Transcribe 16 kHz mono `samples`.
    pub fn transcribe_16k(
        &self,
        samples: &[f32],
        options: &TranscribeOptions,
    ) -> Result<Transcript> {
        if options.temperatures.is_empty()
            || options
                .temperatures
                .iter()
                .any(|t| !(0.0..=2.0).contains(t))
        {
            return Err(Error::Request(
                "temperatures must be between 0 and 2".into(),
            ));
        }
        let cfg = self.model.config();
        let n_frames = cfg.window_frames();
        let hop = self.mel.settings().hop_length;
        // The audio, then a window of silence (OpenAI pads by 30 s): the last window is whole.
        let mut padded = Vec::with_capacity(samples.len() + n_frames * hop);
        padded.extend_from_slice(samples);
        padded.resize(samples.len() + n_frames * hop, 0.0);
        let mel = self.mel.features(&padded);
        let frames = self.mel.frames(padded.len());
        let content_frames = frames.saturating_sub(n_frames);
        let duration = samples.len() as f64 / f64::from(SAMPLE_RATE);
        // Long audio is decoded with timestamps, which say where each window's last segment ends.
        let timestamps = options.timestamps || content_frames > n_frames;
        let input_stride = n_frames / cfg.max_source_positions; // mel frames per output position
        let frame_seconds = hop as f64 / f64::from(SAMPLE_RATE);

        let mut language = options.language.clone();
        let mut all_tokens: Vec<u32> = match &options.initial_prompt {
            Some(p) if !p.trim().is_empty() => self.text_tokens(p)?,
            _ => Vec::new(),
        };
        let initial_len = all_tokens.len();
        let mut prompt_reset_since = 0;
        let mut segments: Vec<Segment> = Vec::new();
        let mut rng = Rng::new(options.seed);
        let mut seek = 0;
        while seek < content_frames {
            let window_start = seek;
            let time_offset = seek as f64 * frame_seconds;
            let segment_size = n_frames.min(content_frames - seek);
            let window = self.window(&mel, frames, seek);
            let audio_features = self.model.encoder.forward(&window)?;
            let mut state = self.model.decoder.start(&audio_features)?;
            let lang = match &language {
                Some(l) => l.clone(),
                None => {
                    let (code, _) = self.detect_language(&mut state)?;
                    language = Some(code.clone());
                    code
                }
            };
            // The prompt: earlier text (up to half the decoder's positions), then the task tokens.
            let mut prompt = Vec::new();
            let previous = &all_tokens[prompt_reset_since..];
            if !previous.is_empty() {
                let keep = (cfg.max_target_positions / 2).saturating_sub(1);
                prompt.push(self.specials.sot_prev);
                prompt.extend_from_slice(&previous[previous.len().saturating_sub(keep)..]);
            }
            prompt.push(self.specials.sot);
            if self.multilingual {
                prompt.push(self.language_token(&lang)?);
                prompt.push(match options.task {
                    Task::Transcribe => self.specials.transcribe,
                    Task::Translate => self.specials.translate,
                });
            }
            if !timestamps {
                prompt.push(self.specials.no_timestamps);
            }
            let result =
                self.decode_with_fallback(&mut state, &prompt, timestamps, options, &mut rng)?;
            if let Some(threshold) = options.no_speech_threshold {
                let silent = result.no_speech_prob > threshold
                    && !options
                        .logprob_threshold
                        .is_some_and(|lp| result.avg_logprob > lp);
                if silent {
                    seek += segment_size;
                    continue;
                }
            }
            let tokens = &result.tokens;
            let is_ts = |t: u32| t >= self.specials.timestamp_begin;
            let ts_seconds = |t: u32| f64::from(t - self.specials.timestamp_begin) * TIME_PRECISION;
            let mut add = |start: f64, end: f64, toks: &[u32]| -> Result<()> {
                let text_tokens: Vec<u32> = toks
                    .iter()
                    .copied()
                    .filter(|&t| t < self.specials.eot)
                    .collect();
                let text = self.detokenize(&text_tokens)?;
                if text.trim().is_empty() {
                    return Ok(());
                }
                segments.push(Segment {
                    id: segments.len(),
                    seek,
                    start,
                    end,
                    text,
                    tokens: toks.to_vec(),
                    temperature: result.temperature,
                    avg_logprob: result.avg_logprob,
                    compression_ratio: result.compression_ratio,
                    no_speech_prob: result.no_speech_prob,
                });
                Ok(())
            };
            let n = tokens.len();
            let single_ending = n >= 2 && !is_ts(tokens[n - 2]) && is_ts(tokens[n - 1]);
            let consecutive: Vec<usize> = (1..n)
                .filter(|&i| is_ts(tokens[i - 1]) && is_ts(tokens[i]))
                .collect();
            if timestamps && !consecutive.is_empty() {
                let mut slices = consecutive;
                if single_ending {
                    slices.push(n);
                }
                let mut last = 0;
                for &cut in &slices {
                    let part = &tokens[last..cut];
                    add(
                        time_offset + ts_seconds(part[0]),
                        time_offset + ts_seconds(part[part.len() - 1]),
                        part,
                    )?;
                    last = cut;
                }
                if single_ending {
                    seek += segment_size;
                } else {
                    let last_ts = tokens[last - 1] - self.specials.timestamp_begin;
                    seek += last_ts as usize * input_stride;
                }
            } else {
                let mut length = segment_size as f64 * frame_seconds;
                if let Some(&t) = tokens.iter().rev().find(|&&t| is_ts(t)) {
                    if t != self.specials.timestamp_begin {
                        length = ts_seconds(t);
                    }
                }
                add(time_offset, time_offset + length, tokens)?;
                seek += segment_size;
            }
            // Timestamps stay in the next window's prompt (as OpenAI's and faster-whisper's do:
            // without them the model is primed for text without timestamps, and loops).
            // Every window moves on (a segment ending at its own start would decode it forever).
            if seek <= window_start {
                seek = window_start + segment_size;
            }
            all_tokens.extend(
                tokens
                    .iter()
                    .copied()
                    .filter(|&t| t < self.specials.eot || is_ts(t)),
            );
            if !options.condition_on_previous_text || result.temperature > 0.5 {
                prompt_reset_since = all_tokens.len();
            }
        }
        let text_tokens: Vec<u32> = all_tokens[initial_len..]
            .iter()
            .copied()
            .filter(|&t| t < self.specials.eot)
            .collect();
        let text = self.detokenize(&text_tokens)?;
        Ok(Transcript {
            task: options.task,
            text: text.trim().to_string(),
            language: language.unwrap_or_else(|| "en".into()),
            duration,
            segments,
        })
    }

    /// Decode a window at each temperature in turn until one passes the thresholds.
    fn decode_with_fallback(
        &self,
        state: &mut crate::model::whisper::DecoderState,
        prompt: &[u32],
        timestamps: bool,
        options: &TranscribeOptions,
        rng: &mut Rng,
    ) -> Result<WindowResult> {
        let detok = |t: &[u32]| self.detokenize(t);
        let sample_len = self.model.config().max_target_positions / 2;
        let mut last = None;
        for &temperature in &options.temperatures {
            let decoding = WindowDecoding {
                decoder: &self.model.decoder,
                specials: &self.specials,
                prompt,
                timestamps,
                temperature,
                sample_len,
            };
            let tries = if temperature > 0.0 {
                options.best_of.max(1)
            } else {
                1
            };
            let mut best: Option<WindowResult> = None;
            for _ in 0..tries {
                let r = decoding.run(state, rng, &detok)?;
                if best.as_ref().is_none_or(|b| r.sum_logprob > b.sum_logprob) {
                    best = Some(r);
                }
            }
            let Some(result) = best else { continue };
            let mut fallback = options
                .compression_ratio_threshold
                .is_some_and(|t| result.compression_ratio > t)
                || options
                    .logprob_threshold
                    .is_some_and(|t| result.avg_logprob < t);
            if options
                .no_speech_threshold
                .is_some_and(|t| result.no_speech_prob > t)
            {
                fallback = false;
            }
            if !fallback {
                return Ok(result);
            }
            last = Some(result);
        }
        last.ok_or_else(|| Error::Internal("no temperature was tried".into()))
    }

    /// Decode one window's features `(n_mels, window_frames)` with the fixed prompt `prompt`,
    /// greedily, without fallback (parity checks against a reference).
    pub fn decode_window_greedy(
        &self,
        window: &[f32],
        prompt: &[u32],
        max_tokens: usize,
    ) -> Result<(Vec<u32>, String)> {
        let audio = self.model.encoder.forward(window)?;
        let mut state = self.model.decoder.start(&audio)?;
        let timestamps = !prompt.contains(&self.specials.no_timestamps);
        let decoding = WindowDecoding {
            decoder: &self.model.decoder,
            specials: &self.specials,
            prompt,
            timestamps,
            temperature: 0.0,
            sample_len: max_tokens,
        };
        let r = decoding.run(&mut state, &mut Rng::new(0), &|t| self.detokenize(t))?;
        Ok((r.tokens, r.text))
    }

    /// The model (encoder and decoder), for callers that drive it themselves.
    pub fn model(&self) -> &Whisper {
        &self.model
    }

    pub fn specials(&self) -> &SpecialTokens {
        &self.specials
    }
}
