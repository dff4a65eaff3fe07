//! MLX-style affine group quantization: per group of `group_size` input weights, `w ≈ scale · q + bias`
//! with `q` an unsigned `bits`-bit integer, packed little-end first into u32 words (8 four-bit or four
//! eight-bit values per word), `scales` and `biases` of shape `(out, in / group_size)`.
//!
//! This is the layout mlx-community publishes; dequantisation here is bit-exact with `mx.dequantize`.

use half::{bf16, f16};

use crate::error::{Error, Result};

/// The floating type scales and biases are stored in (and that MLX dequantises to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleType {
    F32,
    F16,
    BF16,
}

impl ScaleType {
    /// Round an f32 to this type and back.
    #[inline]
    pub fn round(self, x: f32) -> f32 {
        match self {
            ScaleType::F32 => x,
            ScaleType::F16 => f16::from_f32(x).to_f32(),
            ScaleType::BF16 => bf16::from_f32(x).to_f32(),
        }
    }
}

/// Quantization settings of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantSpec {
    pub bits: u32,
    pub group_size: usize,
}

impl QuantSpec {
    pub fn new(bits: u32, group_size: usize) -> Result<Self> {
        if !matches!(bits, 4 | 8) {
            return Err(Error::Unsupported(format!(
                "{bits}-bit quantization (4 or 8)"
            )));
        }
        if !matches!(group_size, 32 | 64 | 128) {
            return Err(Error::Unsupported(format!(
                "group size {group_size} (32, 64 or 128)"
            )));
        }
        Ok(Self { bits, group_size })
    }

    pub fn per_word(&self) -> usize {
        32 / self.bits as usize
    }

    pub fn max_q(&self) -> u32 {
        (1 << self.bits) - 1
    }
}

/// A quantized `(out, in)` weight.
#[derive(Clone, Debug)]
pub struct AffineWeight {
    pub spec: QuantSpec,
    pub out_dim: usize,
    pub in_dim: usize,
    /// `(out, in / per_word)` packed codes.
    pub packed: Vec<u32>,
    /// `(out, in / group_size)`, exact f32 copies of the stored values.
    pub scales: Vec<f32>,
    pub biases: Vec<f32>,
    /// The type the checkpoint stored scales/biases in.
    pub scale_type: ScaleType,
}

impl AffineWeight {
    /// Check the shapes of packed codes, scales and biases for an `(out, in)` layer; `what` names the
    /// layer in errors.
    pub fn from_parts(
        spec: QuantSpec,
        out_dim: usize,
        in_dim: usize,
        packed: Vec<u32>,
        scales: Vec<f32>,
        biases: Vec<f32>,
        scale_type: ScaleType,
        what: &str,
    ) -> Result<Self> {
        let bad = |m: String| Error::Weights(format!("{what}: {m}"));
        if in_dim % spec.group_size != 0 {
            return Err(bad(format!(
                "input size {in_dim} is not a multiple of the group size {}",
                spec.group_size
            )));
        }
        let words = in_dim / spec.per_word();
        if packed.len() != out_dim * words {
            return Err(bad(format!(
                "packed weight has {} words, expected {out_dim} x {words} for {}-bit codes",
                packed.len(),
                spec.bits
            )));
        }
        let groups = out_dim * (in_dim / spec.group_size);
        if scales.len() != groups || biases.len() != groups {
            return Err(bad(format!(
                "scales/biases have {}/{} entries, expected {groups}",
                scales.len(),
                biases.len()
            )));
        }
        Ok(Self {
            spec,
            out_dim,
            in_dim,
            packed,
            scales,
            biases,
            scale_type,
        })
    }

    /// Quantize a row-major `(out, in)` f32 weight: per group, the min–max range split into
    /// `2^bits - 1` steps, codes rounded to nearest. Scales and biases are kept in f32.
    pub fn quantize(
        w: &[f32],
        out_dim: usize,
        in_dim: usize,
        spec: QuantSpec,
        what: &str,
    ) -> Result<Self> {
        if in_dim % spec.group_size != 0 {
            return Err(Error::Weights(format!(
                "{what}: input size {in_dim} is not a multiple of the group size {} (choose 32 or 64)",
                spec.group_size
            )));
        }
        if w.len() != out_dim * in_dim {
            return Err(Error::Weights(format!(
                "{what}: weight has {} values, expected {out_dim} x {in_dim}",
                w.len()
            )));
        }
        let gs = spec.group_size;
        let per_word = spec.per_word();
        let max_q = spec.max_q() as f32;
        let mut packed = vec![0u32; out_dim * in_dim / per_word];
        let mut scales = Vec::with_capacity(out_dim * in_dim / gs);
        let mut biases = Vec::with_capacity(out_dim * in_dim / gs);
        for (g, group) in w.chunks_exact(gs).enumerate() {
            let (lo, hi) = group
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
                    (a.min(x), b.max(x))
                });
            let scale = if hi > lo { (hi - lo) / max_q } else { 1.0 };
            scales.push(scale);
            biases.push(lo);
            let words = &mut packed[g * gs / per_word..(g + 1) * gs / per_word];
            for (i, &x) in group.iter().enumerate() {
                let q = ((x - lo) / scale).round().clamp(0.0, max_q) as u32;
                words[i / per_word] |= q << (spec.bits as usize * (i % per_word));
            }
        }
        Ok(Self {
            spec,
            out_dim,
            in_dim,
            packed,
            scales,
            biases,
            scale_type: ScaleType::F32,
        })
    }

    /// Row `r` dequantized to f32 (`scale · q + bias`, multiply then add, in f32).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let per_word = self.spec.per_word();
        let gs = self.spec.group_size;
        let groups = self.in_dim / gs;
        let words_per_row = self.in_dim / per_word;
        let row = &self.packed[r * words_per_row..(r + 1) * words_per_row];
        let bits = self.spec.bits as usize;
        let mask = self.spec.max_q();
        for (g, (dst, words)) in out[..self.in_dim]
            .chunks_exact_mut(gs)
            .zip(row.chunks_exact(gs / per_word))
            .enumerate()
        {
            let (s, b) = (self.scales[r * groups + g], self.biases[r * groups + g]);
            for (d, &w) in dst.chunks_exact_mut(per_word).zip(words) {
                for (j, v) in d.iter_mut().enumerate() {
                    *v = s * ((w >> (bits * j)) & mask) as f32 + b;
                }
            }
        }
    }

    /// The whole weight as MLX's `mx.dequantize` returns it: the product and the sum are each rounded to
    /// the scale type (`round(round(s · q) + b)`), which is bit-exact with MLX for f32, f16 and bf16.
    /// (The kernels compute `s · q + b` in f32, slightly more precisely.)
    pub fn dequantize_like_mlx(&self) -> Vec<f32> {
        let per_word = self.spec.per_word();
        let gs = self.spec.group_size;
        let groups = self.in_dim / gs;
        let words_per_row = self.in_dim / per_word;
        let (bits, mask, st) = (self.spec.bits as usize, self.spec.max_q(), self.scale_type);
        let mut out = vec![0f32; self.out_dim * self.in_dim];
        for (r, row) in out.chunks_exact_mut(self.in_dim).enumerate() {
            let words = &self.packed[r * words_per_row..(r + 1) * words_per_row];
            for (i, v) in row.iter_mut().enumerate() {
                let g = r * groups + i / gs;
                let q = (words[i / per_word] >> (bits * (i % per_word))) & mask;
                *v = st.round(st.round(self.scales[g] * q as f32) + self.biases[g]);
            }
        }
        out
    }

    /// Bytes the quantized weight occupies in memory.
    pub fn nbytes(&self) -> usize {
        self.packed.len() * 4 + (self.scales.len() + self.biases.len()) * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_roundtrip_error_is_bounded() {
        let (out, inp) = (4, 64);
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.1)
            .collect();
        for bits in [4, 8] {
            let spec = QuantSpec::new(bits, 32).unwrap();
            let q = AffineWeight::quantize(&w, out, inp, spec, "t").unwrap();
            let d = q.dequantize_like_mlx();
            for (g, chunk) in w.chunks_exact(32).enumerate() {
                let half_step = q.scales[g] / 2.0 + 1e-7;
                for (i, &x) in chunk.iter().enumerate() {
                    assert!((d[g * 32 + i] - x).abs() <= half_step, "bits {bits}");
                }
            }
        }
    }

    #[test]
    fn bad_specs_and_shapes_are_errors() {
        assert!(QuantSpec::new(3, 32).is_err());
        assert!(QuantSpec::new(4, 48).is_err());
        let spec = QuantSpec::new(4, 128).unwrap();
        let e = AffineWeight::quantize(&vec![0.0; 576], 1, 576, spec, "layer.q_proj").unwrap_err();
        assert!(e.to_string().contains("layer.q_proj") && e.to_string().contains("576"));
        let spec = QuantSpec::new(4, 32).unwrap();
        assert!(AffineWeight::from_parts(
            spec,
            2,
            64,
            vec![0; 15],
            vec![0.0; 4],
            vec![0.0; 4],
            ScaleType::F32,
            "x"
        )
        .is_err());
    }
}
