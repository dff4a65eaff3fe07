//! Image resampling that reproduces Pillow's `Image.resize` bit for bit on 8-bit images.
//!
//! HF's `Idefics3ImageProcessor` resizes with Pillow (LANCZOS by default). Pillow separates the resize into
//! a horizontal and a vertical pass with fixed-point (22 fractional bits) coefficients and rounds to 8 bits
//! between the passes; any other Lanczos implementation differs by a few grey levels. This module follows
//! that algorithm: the same support, the same coefficient normalisation and rounding, the same pass order.

/// Resampling filters, numbered as Pillow numbers them (`preprocessor_config.json`'s `resample`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    Nearest,
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Filter {
    /// Pillow's enum value (`PIL.Image.Resampling`).
    pub fn from_pil(value: u64) -> Option<Self> {
        Some(match value {
            0 => Filter::Nearest,
            1 => Filter::Lanczos,
            2 => Filter::Bilinear,
            3 => Filter::Bicubic,
            4 => Filter::Box,
            5 => Filter::Hamming,
            _ => return None,
        })
    }

    fn support(self) -> f64 {
        match self {
            Filter::Nearest | Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Nearest | Filter::Box => {
                if (-0.5..0.5).contains(&x) {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let px = x * std::f64::consts::PI;
                    px.sin() / px * (0.54 + 0.46 * px.cos())
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let px = x * std::f64::consts::PI;
        px.sin() / px
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per-output-pixel source window and fixed-point weights along one axis.
struct Coefficients {
    /// `(first source index, number of taps)` for each output index.
    bounds: Vec<(usize, usize)>,
    /// `ksize` fixed-point weights per output index.
    weights: Vec<i32>,
    ksize: usize,
}

fn precompute(in_size: usize, out_size: usize, filter: Filter) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    let ss = 1.0 / filterscale;
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // Pillow truncates towards zero with a C cast after adding 0.5.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for x in 0..n {
            let v = if ww != 0.0 { k[x] / ww } else { k[x] };
            let scaled = v * f64::from(1u32 << PRECISION_BITS);
            row[x] = if v < 0.0 {
                (scaled - 0.5) as i32
            } else {
                (scaled + 0.5) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coefficients {
        bounds,
        weights,
        ksize,
    }
}

#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// An interleaved 8-bit image: `height` rows of `width * channels` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image8 {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl Image8 {
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Self {
        debug_assert_eq!(data.len(), width * height * channels);
        Self {
            width,
            height,
            channels,
            data,
        }
    }
}

/// Resize exactly as Pillow's `Image.resize((width, height), resample=filter)` does for 8-bit bands.
///
/// Pillow runs the horizontal pass first, except (since Pillow 12.x, PR #9549) when the height shrinks by
/// more than twice as many pixels as the width does: then the vertical pass runs first. The order changes
/// the 8-bit rounding between passes, so it is reproduced.
pub fn resize(src: &Image8, width: usize, height: usize, filter: Filter) -> Image8 {
    if filter == Filter::Nearest {
        return resize_nearest(src, width, height);
    }
    if width == src.width && height == src.height {
        return src.clone();
    }
    let need_h = width != src.width;
    let need_v = height != src.height;
    let shrink_y = src.height as i64 - height as i64;
    let shrink_x = src.width as i64 - width as i64;
    let vertical_first = need_h && need_v && shrink_y > 0 && shrink_y > 2 * shrink_x;
    let horiz = need_h.then(|| precompute(src.width, width, filter));
    let vert = need_v.then(|| precompute(src.height, height, filter));
    match (horiz, vert) {
        (Some(h), Some(v)) if vertical_first => {
            let tmp = vertical_pass(src, &v, 0);
            horizontal_pass(&tmp, &h, 0, height)
        }
        (Some(h), Some(v)) => {
            // Only the rows that the vertical pass reads.
            let first = v.bounds[0].0;
            let last = v.bounds[height - 1].0 + v.bounds[height - 1].1;
            let tmp = horizontal_pass(src, &h, first, last - first);
            vertical_pass(&tmp, &v, first)
        }
        (Some(h), None) => horizontal_pass(src, &h, 0, src.height),
        (None, Some(v)) => vertical_pass(src, &v, 0),
        (None, None) => src.clone(),
    }
}

/// Resample along x: output rows are source rows `first_row..first_row + rows`.
fn horizontal_pass(src: &Image8, k: &Coefficients, first_row: usize, rows: usize) -> Image8 {
    let c = src.channels;
    let width = k.bounds.len();
    let mut out = vec![0u8; rows * width * c];
    for y in 0..rows {
        let src_row =
            &src.data[(y + first_row) * src.width * c..(y + first_row + 1) * src.width * c];
        let dst_row = &mut out[y * width * c..(y + 1) * width * c];
        for (xx, &(xmin, n)) in k.bounds.iter().enumerate() {
            let w = &k.weights[xx * k.ksize..xx * k.ksize + n];
            for ch in 0..c {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (x, &wx) in w.iter().enumerate() {
                    acc += i64::from(src_row[(xmin + x) * c + ch]) * i64::from(wx);
                }
                dst_row[xx * c + ch] = clip8(acc);
            }
        }
    }
    Image8::new(width, rows, c, out)
}

/// Resample along y; `row_offset` is the source row that `src`'s first row stands for.
fn vertical_pass(src: &Image8, k: &Coefficients, row_offset: usize) -> Image8 {
    let c = src.channels;
    let height = k.bounds.len();
    let row_len = src.width * c;
    let mut out = vec![0u8; height * row_len];
    for (yy, &(ymin, n)) in k.bounds.iter().enumerate() {
        let ymin = ymin - row_offset;
        let w = &k.weights[yy * k.ksize..yy * k.ksize + n];
        let dst_row = &mut out[yy * row_len..(yy + 1) * row_len];
        for (i, d) in dst_row.iter_mut().enumerate() {
            let mut acc: i64 = 1 << (PRECISION_BITS - 1);
            for (y, &wy) in w.iter().enumerate() {
                acc += i64::from(src.data[(ymin + y) * row_len + i]) * i64::from(wy);
            }
            *d = clip8(acc);
        }
    }
    Image8::new(src.width, height, c, out)
}

/// Pillow's nearest-neighbour resize (`ImagingTransformAffine` with NEAREST): source pixel
/// `floor((x + 0.5) * in / out)`.
fn resize_nearest(src: &Image8, width: usize, height: usize) -> Image8 {
    let c = src.channels;
    let mut out = vec![0u8; width * height * c];
    let sx = src.width as f64 / width as f64;
    let sy = src.height as f64 / height as f64;
    for y in 0..height {
        let yi = (((y as f64 + 0.5) * sy) as usize).min(src.height - 1);
        for x in 0..width {
            let xi = (((x as f64 + 0.5) * sx) as usize).min(src.width - 1);
            let s = (yi * src.width + xi) * c;
            let d = (y * width + x) * c;
            out[d..d + c].copy_from_slice(&src.data[s..s + c]);
        }
    }
    Image8::new(width, height, c, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_size_is_a_copy() {
        let img = Image8::new(2, 2, 1, vec![1, 2, 3, 4]);
        assert_eq!(resize(&img, 2, 2, Filter::Lanczos), img);
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = Image8::new(7, 5, 3, vec![200; 7 * 5 * 3]);
        let out = resize(&img, 16, 11, Filter::Lanczos);
        assert!(out.data.iter().all(|&v| v == 200));
        let out = resize(&img, 3, 2, Filter::Lanczos);
        assert!(out.data.iter().all(|&v| v == 200));
    }

    #[test]
    fn lanczos_overshoot_is_clipped() {
        // A hard edge makes Lanczos ring; values stay in 0..=255 and the ringing shows as 0 / 255 clips.
        let mut data = vec![0u8; 8];
        data[4..].fill(255);
        let img = Image8::new(8, 1, 1, data);
        let out = resize(&img, 21, 1, Filter::Lanczos);
        assert_eq!(out.data[0], 0);
        assert_eq!(out.data[20], 255);
        assert!(
            out.data.windows(2).any(|w| w[0] > w[1]),
            "no ringing: {:?}",
            out.data
        );
    }
}
