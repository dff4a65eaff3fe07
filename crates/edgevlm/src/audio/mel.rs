//! Whisper's log-mel spectrogram, as transformers' `WhisperFeatureExtractor` computes it: a
//! 400-point periodic-Hann STFT every 160 samples over reflect-padded audio (torch.stft's
//! `center=True`), the power spectrum through Slaney-style mel filters (`mel_filter_bank(norm="slaney",
//! mel_scale="slaney")`, 0-8 kHz), `log10(max(·, 1e-10))`, the last frame dropped, everything clamped
//! to 8 below the largest value, then `(x + 4) / 4`.

use std::sync::Arc;

use rayon::prelude::*;
use realfft::{RealFftPlanner, RealToComplex};

/// Frames per task of the STFT.
const FRAMES_PER_TASK: usize = 64;

/// The front end's settings (`preprocessor_config.json`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MelSettings {
    pub n_fft: usize,
    pub hop_length: usize,
    pub n_mels: usize,
    pub sampling_rate: u32,
}

impl Default for MelSettings {
    fn default() -> Self {
        Self {
            n_fft: 400,
            hop_length: 160,
            n_mels: 80,
            sampling_rate: 16_000,
        }
    }
}

/// A log-mel front end with its window, filters and FFT plan made once.
pub struct LogMel {
    settings: MelSettings,
    window: Vec<f32>,
    /// `(n_mels, bins)`, row-major: each filter's weights over the FFT bins, and the range of bins
    /// where it is not zero.
    filters: Vec<f32>,
    spans: Vec<(usize, usize)>,
    fft: Arc<dyn RealToComplex<f32>>,
}

impl LogMel {
    pub fn new(settings: MelSettings) -> Self {
        let n = settings.n_fft;
        let window = (0..n)
            .map(|i| (0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos()) as f32)
            .collect();
        let bins = n / 2 + 1;
        let filters = slaney_filters(
            bins,
            settings.n_mels,
            f64::from(settings.sampling_rate),
            0.0,
            f64::from(settings.sampling_rate) / 2.0,
        );
        let spans = filters
            .chunks_exact(bins)
            .map(|row| {
                let first = row.iter().position(|&v| v != 0.0).unwrap_or(0);
                let last = row.iter().rposition(|&v| v != 0.0).map_or(0, |l| l + 1);
                (first, last.max(first))
            })
            .collect();
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(n);
        Self {
            settings,
            window,
            filters,
            spans,
            fft,
        }
    }

    pub fn settings(&self) -> &MelSettings {
        &self.settings
    }

    /// Frames [`Self::features`] gives for `samples` samples.
    pub fn frames(&self, samples: usize) -> usize {
        samples / self.settings.hop_length
    }

    /// The log-mel features of `samples` (16 kHz mono): `(n_mels, frames)` row-major, `frames =
    /// samples / hop_length`. Audio shorter than the reflect padding (200 samples) is zero-extended.
    pub fn features(&self, samples: &[f32]) -> Vec<f32> {
        let MelSettings {
            n_fft,
            hop_length,
            n_mels,
            ..
        } = self.settings;
        let pad = n_fft / 2;
        if self.frames(samples.len()) == 0 {
            return Vec::new();
        }
        // torch.stft(center=True) gives one frame more than the features keep.
        let frames = self.frames(samples.len()) + 1;
        // Reflect padding as torch.stft(center=True, pad_mode="reflect"): x[pad - i] mirrored.
        let mut padded = vec![0f32; samples.len() + 2 * pad];
        padded[pad..pad + samples.len()].copy_from_slice(samples);
        let at = |i: isize| -> f32 {
            let n = samples.len() as isize;
            let j = if i < 0 {
                -i
            } else if i >= n {
                2 * (n - 1) - i
            } else {
                i
            };
            if (0..n).contains(&j) {
                samples[j as usize]
            } else {
                0.0
            }
        };
        for i in 0..pad {
            padded[pad - 1 - i] = at(i as isize + 1);
            padded[pad + samples.len() + i] = at(samples.len() as isize - 2 - i as isize);
        }
        let bins = n_fft / 2 + 1;
        // log10 mel energies, (frames, n_mels) while computing.
        let mut logmel = vec![0f32; frames * n_mels];
        logmel
            .par_chunks_mut(FRAMES_PER_TASK * n_mels)
            .enumerate()
            .for_each(|(task, out)| {
                let mut frame = self.fft.make_input_vec();
                let mut spectrum = self.fft.make_output_vec();
                let mut scratch = self.fft.make_scratch_vec();
                let mut power = vec![0f32; bins];
                for (i, mels) in out.chunks_exact_mut(n_mels).enumerate() {
                    let t = task * FRAMES_PER_TASK + i;
                    let src = &padded[t * hop_length..t * hop_length + n_fft];
                    for ((f, &x), &w) in frame.iter_mut().zip(src).zip(&self.window) {
                        *f = x * w;
                    }
                    // The plan's lengths are the ones it made the buffers with.
                    if self
                        .fft
                        .process_with_scratch(&mut frame, &mut spectrum, &mut scratch)
                        .is_err()
                    {
                        mels.fill(f32::NAN);
                        continue;
                    }
                    for (p, c) in power.iter_mut().zip(&spectrum) {
                        *p = c.re * c.re + c.im * c.im;
                    }
                    for (m, v) in mels.iter_mut().enumerate() {
                        let (a, b) = self.spans[m];
                        let row = &self.filters[m * bins..][a..b];
                        let e: f32 = row.iter().zip(&power[a..b]).map(|(w, p)| w * p).sum();
                        *v = e.max(1e-10).log10();
                    }
                }
            });
        // The last frame is dropped (transformers' `log_spec[:, :-1]`), then clamp and scale.
        let kept = frames - 1;
        let max = logmel[..kept * n_mels]
            .iter()
            .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let floor = max - 8.0;
        let mut out = vec![0f32; n_mels * kept];
        for t in 0..kept {
            for m in 0..n_mels {
                out[m * kept + t] = (logmel[t * n_mels + m].max(floor) + 4.0) / 4.0;
            }
        }
        out
    }
}

/// Slaney's mel scale (linear below 1 kHz, logarithmic above), as librosa and transformers define it.
fn hz_to_mel(f: f64) -> f64 {
    let (min_log_hz, min_log_mel, step) = (1000.0, 15.0, 27.0 / 6.4f64.ln());
    if f >= min_log_hz {
        min_log_mel + (f / min_log_hz).ln() * step
    } else {
        3.0 * f / 200.0
    }
}

fn mel_to_hz(m: f64) -> f64 {
    let (min_log_hz, min_log_mel, step) = (1000.0, 15.0, 6.4f64.ln() / 27.0);
    if m >= min_log_mel {
        min_log_hz * (step * (m - min_log_mel)).exp()
    } else {
        200.0 * m / 3.0
    }
}

/// Triangular filters with Slaney area normalisation, `(n_mels, bins)` row-major (transformers'
/// `mel_filter_bank(num_frequency_bins=bins, ..., norm="slaney", mel_scale="slaney")`, transposed).
fn slaney_filters(bins: usize, n_mels: usize, rate: f64, f_min: f64, f_max: f64) -> Vec<f32> {
    let (m_min, m_max) = (hz_to_mel(f_min), hz_to_mel(f_max));
    let edges: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(m_min + (m_max - m_min) * i as f64 / (n_mels + 1) as f64))
        .collect();
    // np.linspace(0, rate // 2, bins)
    let nyquist = (rate / 2.0).floor();
    let fft_freqs: Vec<f64> = (0..bins)
        .map(|i| nyquist * i as f64 / (bins - 1).max(1) as f64)
        .collect();
    let mut out = vec![0f32; n_mels * bins];
    for m in 0..n_mels {
        let (lo, mid, hi) = (edges[m], edges[m + 1], edges[m + 2]);
        let norm = 2.0 / (hi - lo);
        for (b, &f) in fft_freqs.iter().enumerate() {
            let down = (f - lo) / (mid - lo);
            let up = (hi - f) / (hi - mid);
            out[m * bins + b] = (down.min(up).max(0.0) * norm) as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_the_slaney_definition() {
        let f = slaney_filters(201, 80, 16_000.0, 0.0, 8_000.0);
        // Each filter is a triangle of area-normalised height: peak at most 2 / (hi - lo).
        assert!(f.iter().all(|&v| v >= 0.0));
        assert_eq!(hz_to_mel(1000.0), 15.0);
        assert!((mel_to_hz(hz_to_mel(4321.0)) - 4321.0).abs() < 1e-9);
    }

    #[test]
    fn silence_is_the_floor() {
        let mel = LogMel::new(MelSettings::default());
        let out = mel.features(&vec![0f32; 16_000]);
        assert_eq!(out.len(), 80 * 100);
        // log10(1e-10) = -10, clamped to itself, (x + 4) / 4 = -1.5.
        assert!(out.iter().all(|&v| (v + 1.5).abs() < 1e-6));
    }
}
