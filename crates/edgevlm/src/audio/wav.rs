//! WAV files through `hound`: 8-, 16-, 24- and 32-bit integer and 32-bit float samples, one or two
//! channels (two are averaged), checked as they are read: a header that claims more samples than the
//! file holds, a zero sample rate, more than two channels and non-finite samples are each one clear
//! error.

use std::io::Cursor;
use std::path::Path;

use hound::{SampleFormat, WavReader};

use super::{AudioLimits, Waveform};
use crate::error::{Error, Result};

/// Decode WAV `bytes` (named `source_name` in errors) into mono samples at the file's own rate.
pub fn decode_wav(bytes: &[u8], source_name: &str, limits: &AudioLimits) -> Result<Waveform> {
    let refuse = |message: String| Error::Audio {
        source_name: source_name.to_string(),
        message,
    };
    if bytes.is_empty() {
        return Err(refuse("the file is empty".into()));
    }
    if bytes.len() as u64 > limits.max_bytes {
        return Err(refuse(format!(
            "{} bytes, over the limit of {}",
            bytes.len(),
            limits.max_bytes
        )));
    }
    let reader = WavReader::new(Cursor::new(bytes)).map_err(|e| {
        refuse(match e {
            hound::Error::FormatError(m) => format!("not a WAV file this reader takes ({m})"),
            hound::Error::Unsupported => "a WAV encoding other than PCM or 32-bit float".into(),
            hound::Error::IoError(_) => "not a WAV file (its header is cut short)".into(),
            other => format!("not a readable WAV file ({other})"),
        })
    })?;
    let spec = reader.spec();
    if spec.sample_rate == 0 {
        return Err(refuse("the header gives a sample rate of 0 Hz".into()));
    }
    if !(1..=2).contains(&spec.channels) {
        return Err(refuse(format!(
            "{} channels; mono or stereo WAV only",
            spec.channels
        )));
    }
    let channels = usize::from(spec.channels);
    // The header's own claim, checked against the bytes there are before anything is allocated.
    let claimed = reader.len() as u64;
    let width = u64::from(spec.bits_per_sample.div_ceil(8)).max(1);
    if claimed.saturating_mul(width) > bytes.len() as u64 {
        return Err(refuse(format!(
            "truncated: the header claims {claimed} samples ({} bytes) but the file holds {} bytes",
            claimed.saturating_mul(width),
            bytes.len()
        )));
    }
    let frames = claimed / channels as u64;
    let seconds = frames as f64 / f64::from(spec.sample_rate);
    if seconds > limits.max_seconds {
        return Err(refuse(format!(
            "{seconds:.1} s long, over the limit of {} s",
            limits.max_seconds
        )));
    }
    if frames == 0 {
        return Err(refuse("no samples (zero length)".into()));
    }
    let interleaved =
        read_samples(reader, spec.sample_format, spec.bits_per_sample).map_err(&refuse)?;
    if let Some(i) = interleaved.iter().position(|v| !v.is_finite()) {
        return Err(refuse(format!("sample {i} is not a finite number")));
    }
    let samples = match channels {
        1 => interleaved,
        _ => interleaved
            .chunks_exact(2)
            .map(|lr| 0.5 * (lr[0] + lr[1]))
            .collect(),
    };
    Ok(Waveform {
        samples,
        sample_rate: spec.sample_rate,
    })
}

/// Every sample as f32 in [-1, 1] (integers divided by 2^(bits-1), as transformers' and
/// faster-whisper's readers scale 16-bit audio).
fn read_samples(
    mut reader: WavReader<Cursor<&[u8]>>,
    format: SampleFormat,
    bits: u16,
) -> std::result::Result<Vec<f32>, String> {
    let expected = reader.len() as usize;
    let cut = |i: usize, e: hound::Error| match e {
        hound::Error::IoError(_) => format!("truncated: sample {i} of {expected} is cut short"),
        other => format!("sample {i}: {other}"),
    };
    let mut out = Vec::with_capacity(expected);
    match format {
        SampleFormat::Float => {
            if bits != 32 {
                return Err(format!("{bits}-bit float samples; 32-bit only"));
            }
            for (i, s) in reader.samples::<f32>().enumerate() {
                out.push(s.map_err(|e| cut(i, e))?);
            }
        }
        SampleFormat::Int => {
            if !(1..=32).contains(&bits) {
                return Err(format!("{bits}-bit integer samples"));
            }
            let scale = 1.0 / (1u64 << (bits - 1)) as f64;
            for (i, s) in reader.samples::<i32>().enumerate() {
                out.push((f64::from(s.map_err(|e| cut(i, e))?) * scale) as f32);
            }
        }
    }
    if out.len() != expected {
        return Err(format!(
            "truncated: the header claims {expected} samples, the file holds {}",
            out.len()
        ));
    }
    Ok(out)
}

/// Read and decode a WAV file.
pub fn read_wav_path(path: &Path, limits: &AudioLimits) -> Result<Waveform> {
    let name = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| Error::file(path, e))?;
    if meta.len() > limits.max_bytes {
        return Err(Error::Audio {
            source_name: name,
            message: format!(
                "{} bytes, over the limit of {}",
                meta.len(),
                limits.max_bytes
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    decode_wav(&bytes, &name, limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav(
        spec: hound::WavSpec,
        write: impl FnOnce(&mut hound::WavWriter<Cursor<&mut Vec<u8>>>),
    ) -> Vec<u8> {
        let mut bytes = Vec::new();
        {
            let mut w = hound::WavWriter::new(Cursor::new(&mut bytes), spec).unwrap();
            write(&mut w);
            w.finalize().unwrap();
        }
        bytes
    }

    fn spec(channels: u16, bits: u16, format: SampleFormat) -> hound::WavSpec {
        hound::WavSpec {
            channels,
            sample_rate: 22_050,
            bits_per_sample: bits,
            sample_format: format,
        }
    }

    #[test]
    fn integer_depths_scale_to_unit_range() {
        for bits in [8u16, 16, 24, 32] {
            let (half, min) = ((1i64 << (bits - 2)) as i32, (-(1i64 << (bits - 1))) as i32);
            let bytes = wav(spec(1, bits, SampleFormat::Int), |w| {
                for s in [0, half, min] {
                    w.write_sample(s).unwrap();
                }
            });
            let got = decode_wav(&bytes, "t.wav", &AudioLimits::default()).unwrap();
            assert_eq!(got.samples, vec![0.0, 0.5, -1.0], "{bits} bits");
            assert_eq!(got.sample_rate, 22_050);
        }
    }

    #[test]
    fn stereo_is_averaged_and_floats_pass() {
        let bytes = wav(spec(2, 32, SampleFormat::Float), |w| {
            for s in [0.5f32, -0.25, 1.0, 0.0] {
                w.write_sample(s).unwrap();
            }
        });
        let got = decode_wav(&bytes, "t.wav", &AudioLimits::default()).unwrap();
        assert_eq!(got.samples, vec![0.125, 0.5]);
    }

    #[test]
    fn bad_audio_is_one_clear_error() {
        let limits = AudioLimits::default();
        let err = |bytes: &[u8]| decode_wav(bytes, "q.wav", &limits).unwrap_err().to_string();
        assert_eq!(err(b""), "audio q.wav: the file is empty");
        assert!(err(b"ID3\x03 an mp3 file, not a wav").starts_with("audio q.wav: not a WAV file"));
        let good = wav(spec(1, 16, SampleFormat::Int), |w| {
            for i in 0..1000 {
                w.write_sample(i as i16).unwrap();
            }
        });
        // Cut short: the header still claims 1,000 samples.
        assert!(
            err(&good[..good.len() - 100]).contains("truncated"),
            "{}",
            err(&good[..good.len() - 100])
        );
        // A header claiming 1 GB of samples.
        let mut huge = good.clone();
        let at = huge.windows(4).position(|w| w == b"data").unwrap() + 4;
        huge[at..at + 4].copy_from_slice(&(1u32 << 30).to_le_bytes());
        assert!(
            err(&huge).contains("truncated: the header claims"),
            "{}",
            err(&huge)
        );
        // 0 Hz.
        let mut zero = good.clone();
        zero[24..32].fill(0); // sample rate and byte rate
        assert_eq!(
            err(&zero),
            "audio q.wav: the header gives a sample rate of 0 Hz"
        );
        let eight = wav(spec(8, 16, SampleFormat::Int), |w| {
            for _ in 0..16 {
                w.write_sample(0i16).unwrap();
            }
        });
        assert_eq!(
            err(&eight),
            "audio q.wav: 8 channels; mono or stereo WAV only"
        );
        let empty = wav(spec(1, 16, SampleFormat::Int), |_| {});
        assert_eq!(err(&empty), "audio q.wav: no samples (zero length)");
        let nan = wav(spec(1, 32, SampleFormat::Float), |w| {
            for s in [0.0f32, f32::NAN] {
                w.write_sample(s).unwrap();
            }
        });
        assert_eq!(err(&nan), "audio q.wav: sample 1 is not a finite number");
        let long = AudioLimits {
            max_seconds: 0.01,
            ..limits
        };
        assert!(decode_wav(&good, "q.wav", &long)
            .unwrap_err()
            .to_string()
            .contains("over the limit"));
    }
}
