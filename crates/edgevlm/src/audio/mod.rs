//! Audio input: WAV decoding (any integer or float sample format, mono or stereo), resampling to the
//! 16 kHz a speech model reads, and the log-mel front end.

pub mod mel;
mod resample;
pub mod wav;

pub use resample::resample;
pub use wav::{decode_wav, read_wav_path};

/// The sample rate speech models take (Whisper's).
pub const SAMPLE_RATE: u32 = 16_000;

/// What audio one request may bring, checked before its samples are decoded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AudioLimits {
    /// Longest audio, in seconds, as its header says.
    pub max_seconds: f64,
    /// Largest encoded audio: a file's size or a data URI's decoded payload.
    pub max_bytes: u64,
}

impl Default for AudioLimits {
    fn default() -> Self {
        Self {
            max_seconds: 3600.0,
            max_bytes: 512 << 20,
        }
    }
}

/// Mono samples in [-1, 1] at `sample_rate` Hz.
#[derive(Clone, Debug, PartialEq)]
pub struct Waveform {
    pub samples: Vec<f32>,
    pub sample_rate: u32,
}

impl Waveform {
    /// Length in seconds.
    pub fn seconds(&self) -> f64 {
        self.samples.len() as f64 / f64::from(self.sample_rate.max(1))
    }

    /// This audio at [`SAMPLE_RATE`].
    pub fn to_16k(&self) -> crate::Result<Waveform> {
        if self.sample_rate == SAMPLE_RATE {
            return Ok(self.clone());
        }
        Ok(Waveform {
            samples: resample(&self.samples, self.sample_rate, SAMPLE_RATE)?,
            sample_rate: SAMPLE_RATE,
        })
    }
}
