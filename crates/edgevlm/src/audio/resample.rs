//! Sample-rate conversion with `rubato`'s FFT resampler (a fixed ratio, band-limited: the
//! anti-aliasing a drop from 48 or 22.05 kHz to 16 kHz needs).

use rubato::{FftFixedIn, Resampler};

use crate::error::{Error, Result};

/// FFT sub-chunks per input chunk.
const SUB_CHUNKS: usize = 2;

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Input frames per call: whole multiples of the rate ratio's input side, about 512 per FFT, with
/// even FFT lengths on both sides, so that the resampler's delay (half the output length) is a
/// whole number of frames on both sides and the output lines up with the input exactly (an odd
/// length puts it half a frame off: a 440 Hz tone from 24 kHz was 6% off).
fn chunk_frames(from: usize, to: usize) -> usize {
    let g = gcd(from, to);
    let (a, b) = (from / g, to / g);
    let mut k = 512usize.div_ceil(a).max(1);
    if (k * a) % 2 == 1 || (k * b) % 2 == 1 {
        k += 1;
    }
    SUB_CHUNKS * k * a
}

/// `samples` at `from` Hz, resampled to `to` Hz: `round(len · to / from)` samples, aligned with the
/// input (the resampler's delay is dropped).
pub fn resample(samples: &[f32], from: u32, to: u32) -> Result<Vec<f32>> {
    if from == to || samples.is_empty() {
        return Ok(samples.to_vec());
    }
    let fail = |e: &dyn std::fmt::Display| Error::Audio {
        source_name: "resampler".into(),
        message: format!("{from} Hz to {to} Hz: {e}"),
    };
    let chunk = chunk_frames(from as usize, to as usize);
    let mut resampler = FftFixedIn::<f32>::new(from as usize, to as usize, chunk, SUB_CHUNKS, 1)
        .map_err(|e| fail(&e))?;
    let want = (samples.len() as f64 * f64::from(to) / f64::from(from)).round() as usize;
    let delay = resampler.output_delay();
    let mut out = Vec::with_capacity(want + delay + 2 * resampler.output_frames_max());
    let mut buffer = vec![vec![0f32; resampler.output_frames_max()]];
    let mut chunks = samples.chunks_exact(chunk);
    for chunk in chunks.by_ref() {
        let (_, n) = resampler
            .process_into_buffer(&[chunk], &mut buffer, None)
            .map_err(|e| fail(&e))?;
        out.extend_from_slice(&buffer[0][..n]);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let (_, n) = resampler
            .process_partial_into_buffer(Some(&[rest]), &mut buffer, None)
            .map_err(|e| fail(&e))?;
        out.extend_from_slice(&buffer[0][..n]);
    }
    // Flush the delay line until the aligned output is complete.
    while out.len() < want + delay {
        let (_, n) = resampler
            .process_partial_into_buffer(None::<&[&[f32]]>, &mut buffer, None)
            .map_err(|e| fail(&e))?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buffer[0][..n]);
    }
    let end = (want + delay).min(out.len());
    Ok(out[delay.min(end)..end].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tone keeps its frequency, level and phase through 22.05, 8 and 48 kHz to 16 kHz.
    #[test]
    fn a_tone_survives_resampling() {
        for from in [
            8_000u32, 11_025, 22_050, 24_000, 44_100, 48_000, 96_000, 22_051,
        ] {
            let n = 3 * from as usize; // three seconds
            let f = 440.0;
            let tone: Vec<f32> = (0..n)
                .map(|i| {
                    (0.5 * (2.0 * std::f64::consts::PI * f * i as f64 / f64::from(from)).sin())
                        as f32
                })
                .collect();
            let out = resample(&tone, from, 16_000).unwrap();
            assert_eq!(out.len(), 48_000, "{from} Hz");
            // Away from the edges the output is the same tone sampled at 16 kHz.
            let worst = (2000..46_000)
                .map(|i| {
                    let want = 0.5 * (2.0 * std::f64::consts::PI * f * i as f64 / 16_000.0).sin();
                    (f64::from(out[i]) - want).abs()
                })
                .fold(0f64, f64::max);
            assert!(worst < 2e-3, "{from} Hz: worst {worst}");
        }
    }
}
