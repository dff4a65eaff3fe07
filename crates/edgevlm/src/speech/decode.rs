//! Decoding one 30 s window, as OpenAI's `whisper/decoding.py` does: the prompt
//! `[<|startofprev|> previous text…] <|startoftranscript|> <|lang|> <|task|> [<|notimestamps|>]`,
//! then tokens picked greedily (temperature 0) or sampled, each step's logits filtered first:
//! - blank suppression at the first step (a space or end of text cannot open the answer);
//! - the suppressed tokens of `generation_config.json` (symbols, other special tokens);
//! - with timestamps, the timestamp rules: timestamps come in pairs and never go back, the answer
//!   opens with one (at most `max_initial_timestamp_index` steps in), and when the timestamps
//!   together are likelier than any text token, a timestamp is taken.
//!
//! Per window it reports what the fallback of `transcribe()` needs: the average log-probability, the
//! text's compression ratio and the probability of "no speech" at the start.

use std::io::Write;

use crate::error::Result;
use crate::model::whisper::{Decoder, DecoderState};
use crate::sampling::{argmax, Rng};

/// Token ids a decoding needs (from the tokenizer and `generation_config.json`).
#[derive(Clone, Debug)]
pub struct SpecialTokens {
    pub sot: u32,
    pub eot: u32,
    pub sot_prev: u32,
    pub no_timestamps: u32,
    /// The first timestamp token (`<|0.00|>`, `no_timestamps + 1`).
    pub timestamp_begin: u32,
    /// `<|nocaptions|>` / `<|nospeech|>`, whose probability at the first step says "silence".
    pub no_speech: Option<u32>,
    pub transcribe: u32,
    pub translate: u32,
    pub suppress: Vec<u32>,
    pub begin_suppress: Vec<u32>,
    pub max_initial_timestamp_index: Option<u32>,
}

/// What one decoding of a window gave.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowResult {
    /// The tokens after the prompt, end of text excluded (timestamps included).
    pub tokens: Vec<u32>,
    pub text: String,
    pub sum_logprob: f64,
    pub avg_logprob: f64,
    pub no_speech_prob: f64,
    pub compression_ratio: f64,
    pub temperature: f32,
}

/// `len(text) / len(zlib.compress(text))` in bytes: repetitive (looping) text compresses well.
pub fn compression_ratio(text: &str) -> f64 {
    if text.is_empty() {
        return 0.0;
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail.
    let compressed = z
        .write_all(text.as_bytes())
        .and_then(|_| z.finish())
        .map(|c| c.len())
        .unwrap_or(text.len());
    text.len() as f64 / compressed.max(1) as f64
}

/// The settings of one window's decoding.
pub struct WindowDecoding<'a> {
    pub decoder: &'a Decoder,
    pub specials: &'a SpecialTokens,
    pub prompt: &'a [u32],
    pub timestamps: bool,
    pub temperature: f32,
    /// Most tokens to sample (OpenAI: half the decoder's positions).
    pub sample_len: usize,
}

impl WindowDecoding<'_> {
    /// Decode the window whose audio `state` holds (its token cache is reset first), turning token
    /// ids into text with `detokenize`.
    pub fn run(
        &self,
        state: &mut DecoderState,
        rng: &mut Rng,
        detokenize: &dyn Fn(&[u32]) -> Result<String>,
    ) -> Result<WindowResult> {
        let sp = self.specials;
        state.clear_tokens();
        let positions = self.decoder.config().max_target_positions;
        let sample_len = self
            .sample_len
            .min(positions.saturating_sub(self.prompt.len()));
        // The probability of "no speech" is read where the prompt's `<|startoftranscript|>` is: the
        // prompt runs up to that token, then the rest of it.
        let sot_at = self.prompt.iter().position(|&t| t == sp.sot);
        let (mut logits, no_speech_prob) = match (sp.no_speech, sot_at) {
            (Some(ns), Some(i)) => {
                let at = self.decoder.forward(state, &self.prompt[..=i], false)?;
                let p = softmax_at(&at, ns as usize);
                if i + 1 < self.prompt.len() {
                    (
                        self.decoder.forward(state, &self.prompt[i + 1..], false)?,
                        p,
                    )
                } else {
                    (at, p)
                }
            }
            _ => (self.decoder.forward(state, self.prompt, false)?, 0.0),
        };
        let mut tokens: Vec<u32> = Vec::new();
        let mut sum_logprob = 0f64;
        let mut logprobs = Vec::new();
        for step in 0..sample_len {
            self.filter(&mut logits, &tokens, step == 0);
            log_softmax_into(&logits, &mut logprobs);
            let next = if self.temperature > 0.0 {
                sample(&logits, self.temperature, rng)
            } else {
                argmax(&logits)
            };
            sum_logprob += f64::from(logprobs[next as usize]);
            if next == sp.eot {
                break;
            }
            tokens.push(next);
            if step + 1 == sample_len || state.len() + 1 > positions {
                break;
            }
            logits = self.decoder.forward(state, &[next], false)?;
        }
        let text_tokens: Vec<u32> = tokens.iter().copied().filter(|&t| t < sp.eot).collect();
        let text = detokenize(&text_tokens)?;
        Ok(WindowResult {
            avg_logprob: sum_logprob / (tokens.len() + 1) as f64,
            compression_ratio: compression_ratio(&text),
            tokens,
            text,
            sum_logprob,
            no_speech_prob,
            temperature: self.temperature,
        })
    }

    /// Apply the logit filters for the next token after `tokens` (the sampled ones).
    fn filter(&self, logits: &mut [f32], tokens: &[u32], first: bool) {
        let sp = self.specials;
        let mut ban = |i: u32| {
            if let Some(l) = logits.get_mut(i as usize) {
                *l = f32::NEG_INFINITY;
            }
        };
        if first {
            for &t in &sp.begin_suppress {
                ban(t);
            }
        }
        for &t in &sp.suppress {
            ban(t);
        }
        if !self.timestamps {
            return;
        }
        ban(sp.no_timestamps);
        let tb = sp.timestamp_begin as usize;
        let n = logits.len();
        if tb >= n {
            return;
        }
        let is_ts = |t: u32| t >= sp.timestamp_begin;
        let last_was = tokens.last().is_some_and(|&t| is_ts(t));
        let penultimate_was = tokens.len() < 2 || is_ts(tokens[tokens.len() - 2]);
        if last_was {
            if penultimate_was {
                logits[tb..].fill(f32::NEG_INFINITY);
            } else {
                logits[..sp.eot as usize].fill(f32::NEG_INFINITY);
            }
        }
        if let Some(&last_ts) = tokens.iter().rev().find(|&&t| is_ts(t)) {
            // Timestamps never decrease, and a segment has a nonzero length.
            let bound = if last_was && !penultimate_was {
                last_ts as usize
            } else {
                last_ts as usize + 1
            };
            logits[tb..bound.min(n)].fill(f32::NEG_INFINITY);
        }
        if first {
            logits[..tb].fill(f32::NEG_INFINITY);
            if let Some(max) = sp.max_initial_timestamp_index {
                let last_allowed = tb + max as usize;
                if last_allowed + 1 < n {
                    logits[last_allowed + 1..].fill(f32::NEG_INFINITY);
                }
            }
        }
        // When the timestamps together outweigh every text token, take a timestamp.
        let mut lp = Vec::new();
        log_softmax_into(logits, &mut lp);
        let ts_max = lp[tb..].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let ts_lse = if ts_max == f32::NEG_INFINITY {
            f64::NEG_INFINITY
        } else {
            f64::from(ts_max)
                + lp[tb..]
                    .iter()
                    .map(|&v| f64::from(v - ts_max).exp())
                    .sum::<f64>()
                    .ln()
        };
        let text_max = lp[..tb].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if ts_lse > f64::from(text_max) {
            logits[..tb].fill(f32::NEG_INFINITY);
        }
    }
}

/// `softmax(logits)[i]`.
fn softmax_at(logits: &[f32], i: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    logits
        .get(i)
        .map_or(0.0, |&l| f64::from(l - max).exp() / sum)
}

/// Log-softmax in f64 sums (filtered logits hold -inf).
fn log_softmax_into(logits: &[f32], out: &mut Vec<f32>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = f64::from(max)
        + logits
            .iter()
            .map(|&l| f64::from(l - max).exp())
            .sum::<f64>()
            .ln();
    out.clear();
    out.extend(logits.iter().map(|&l| (f64::from(l) - lse) as f32));
}

/// A token drawn from `softmax(logits / temperature)`.
fn sample(logits: &[f32], temperature: f32, rng: &mut Rng) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| (f64::from(l - max) / f64::from(temperature)).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut r = rng.next_f64() * total;
    for (i, w) in weights.iter().enumerate() {
        r -= w;
        if r < 0.0 {
            return i as u32;
        }
    }
    argmax(logits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetitive_text_compresses_well() {
        let looped = "the cat sat on the mat ".repeat(20);
        assert!(
            compression_ratio(&looped) > 2.4,
            "{}",
            compression_ratio(&looped)
        );
        assert!(compression_ratio("What color is the car next to the house?") < 2.0);
        assert_eq!(compression_ratio(""), 0.0);
    }
}
