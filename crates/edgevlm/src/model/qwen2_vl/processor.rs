//! The Qwen2-VL image processor (transformers' PIL-based `Qwen2VLImageProcessorPil`, which Qwen2.5-VL
//! shares): `smart_resize` to multiples of 28 within a pixel budget, Pillow-exact bicubic resampling,
//! rescale and normalise, then patches of 14×14 in 2×2 merge blocks, each patch doubled in time (an
//! image is two identical frames of a temporal patch of 2).

use serde_json::Value;

use crate::config::{count, triple};
use crate::error::{Error, Result};
use crate::image::resample::{resize, Filter, Image8};

/// Settings from `preprocessor_config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct QwenImageConfig {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f64,
}

impl Default for QwenImageConfig {
    /// transformers' defaults (`Qwen2VLImageProcessorPil`).
    fn default() -> Self {
        Self {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
            rescale_factor: 1.0 / 255.0,
        }
    }
}

impl QwenImageConfig {
    /// Parse `preprocessor_config.json` (`min_pixels` / `max_pixels`, or transformers 5's
    /// `size: {shortest_edge, longest_edge}` holding the same two numbers).
    pub fn from_value(v: &Value) -> Result<Self> {
        let d = Self::default();
        let size = v.get("size").cloned().unwrap_or(Value::Null);
        let cfg = Self {
            min_pixels: count(v, "min_pixels")?
                .or(count(&size, "shortest_edge")?)
                .unwrap_or(d.min_pixels),
            max_pixels: count(v, "max_pixels")?
                .or(count(&size, "longest_edge")?)
                .unwrap_or(d.max_pixels),
            patch_size: count(v, "patch_size")?.unwrap_or(d.patch_size),
            temporal_patch_size: count(v, "temporal_patch_size")?.unwrap_or(d.temporal_patch_size),
            merge_size: count(v, "merge_size")?.unwrap_or(d.merge_size),
            image_mean: triple(v.get("image_mean"), d.image_mean, "image_mean")?,
            image_std: triple(v.get("image_std"), d.image_std, "image_std")?,
            rescale_factor: v
                .get("rescale_factor")
                .and_then(Value::as_f64)
                .unwrap_or(d.rescale_factor),
        };
        cfg.with_pixels(None, None)
    }

    /// These settings with the pixel budget overridden where given, checked.
    pub fn with_pixels(&self, min: Option<usize>, max: Option<usize>) -> Result<Self> {
        let cfg = Self {
            min_pixels: min.unwrap_or(self.min_pixels),
            max_pixels: max.unwrap_or(self.max_pixels),
            ..self.clone()
        };
        let factor = cfg.factor();
        if cfg.patch_size == 0 || cfg.merge_size == 0 || cfg.temporal_patch_size == 0 {
            return Err(Error::Config("image patch sizes must be positive".into()));
        }
        if cfg.max_pixels < factor * factor || cfg.min_pixels > cfg.max_pixels {
            return Err(Error::Request(format!(
                "image pixel budget {}..={} is not usable (max_pixels at least {}, min_pixels at most max_pixels)",
                cfg.min_pixels,
                cfg.max_pixels,
                factor * factor
            )));
        }
        if cfg.image_std.contains(&0.0) {
            return Err(Error::Config("image_std must not be zero".into()));
        }
        Ok(cfg)
    }

    /// Side multiple of a resized image: a merge block of patches.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Values per patch: channels × temporal patch × patch × patch.
    pub fn patch_values(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// Python's `round`: halves go to the even neighbour.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// transformers' `smart_resize`: `(height, width)` that are multiples of `factor`, hold between
/// `min_pixels` and `max_pixels` pixels, and keep the aspect ratio as closely as that allows.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if height == 0 || width == 0 {
        return Err(Error::ModelInput("an image without pixels".into()));
    }
    if h.max(w) / h.min(w) > 200.0 {
        return Err(Error::ModelInput(format!(
            "image aspect ratio {:.0} is beyond 200 ({width}x{height})",
            h.max(w) / h.min(w)
        )));
    }
    let mut h_bar = round_half_even(h / f) * f;
    let mut w_bar = round_half_even(w / f) * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// One image as the vision encoder reads it.
#[derive(Clone, Debug)]
pub struct QwenImage {
    /// `(patches, 3 · temporal · patch · patch)`, patches in merge-block order.
    pub pixel_values: Vec<f32>,
    /// (temporal, height, width) in patches.
    pub grid: [usize; 3],
}

/// Process one RGB image.
pub fn process_image(img: &Image8, cfg: &QwenImageConfig) -> Result<QwenImage> {
    if img.channels != 3 {
        return Err(Error::ModelInput(format!(
            "image processor expects RGB, got {} channels",
            img.channels
        )));
    }
    let (h, w) = smart_resize(
        img.height,
        img.width,
        cfg.factor(),
        cfg.min_pixels,
        cfg.max_pixels,
    )?;
    let resized = resize(img, w, h, Filter::Bicubic);
    // Rescale in f64 then f32, normalise in f32: the PIL backend's arithmetic.
    let plane = |ch: usize| -> Vec<f32> {
        resized
            .data
            .iter()
            .skip(ch)
            .step_by(3)
            .map(|&v| {
                ((f64::from(v) * cfg.rescale_factor) as f32 - cfg.image_mean[ch])
                    / cfg.image_std[ch]
            })
            .collect()
    };
    let planes = [plane(0), plane(1), plane(2)];
    let (p, m, tp) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let (gh, gw) = (h / p, w / p);
    let mut pixel_values = Vec::with_capacity(gh * gw * cfg.patch_values());
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                    for plane in &planes {
                        for _ in 0..tp {
                            for y in y0..y0 + p {
                                pixel_values.extend_from_slice(&plane[y * w + x0..y * w + x0 + p]);
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(QwenImage {
        pixel_values,
        grid: [1, gh, gw],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_rounds_halves_to_even_as_python_does() {
        // 70 / 28 = 2.5 -> 2 and 126 / 28 = 4.5 -> 4 (Rust's round would give 3 and 5).
        assert_eq!(smart_resize(70, 126, 28, 3136, 62720).unwrap(), (56, 112));
        // Below the minimum: scaled up, rounded up.
        assert_eq!(smart_resize(30, 40, 28, 3136, 62720).unwrap(), (56, 84));
        // Above the maximum: scaled down, rounded down.
        assert_eq!(
            smart_resize(1500, 2300, 28, 3136, 62720).unwrap(),
            (196, 308)
        );
        assert!(smart_resize(10, 2500, 28, 3136, 62720).is_err());
    }
}
