//! The Idefics3 image processor (transformers' PIL-based `Idefics3ImageProcessor`) and the prompt
//! expansion of each `<image>` into tile tokens.

use serde_json::Value;

use crate::config::triple;
use crate::error::{Error, Result};
use crate::image::resample::{resize, Filter, Image8};
use crate::prompt::PromptText;

/// What a chat template writes where an image goes.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// transformers' `MAX_IMAGE_SIZE`: no side is resized beyond this.
const MAX_IMAGE_SIZE: usize = 4096;

/// Settings from `preprocessor_config.json` (+ `image_seq_len` from `processor_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessorConfig {
    pub do_resize: bool,
    /// `size.longest_edge`: the whole image is first resized so its longest side is this.
    pub longest_edge: usize,
    /// `max_image_size.longest_edge`: tile side.
    pub tile_size: usize,
    pub do_image_splitting: bool,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub resample: Filter,
    pub image_seq_len: usize,
}

impl Default for ImageProcessorConfig {
    /// SmolVLM-256M's settings.
    fn default() -> Self {
        Self {
            do_resize: true,
            longest_edge: 2048,
            tile_size: 512,
            do_image_splitting: true,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
            resample: Filter::Lanczos,
            image_seq_len: 64,
        }
    }
}

impl ImageProcessorConfig {
    /// Parse `preprocessor_config.json` (and `image_seq_len` if the caller read it from
    /// `processor_config.json`; HF's default is 169).
    pub fn from_values(pre: &Value, image_seq_len: Option<usize>) -> Result<Self> {
        let d = Self::default();
        let b = |k: &str, dflt: bool| pre.get(k).and_then(Value::as_bool).unwrap_or(dflt);
        let edge = |k: &str, dflt: usize| {
            pre.get(k)
                .and_then(|s| s.get("longest_edge"))
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(dflt)
        };
        let resample = match pre.get("resample").and_then(Value::as_u64) {
            None => Filter::Lanczos,
            Some(r) => Filter::from_pil(r)
                .ok_or_else(|| Error::Config(format!("unknown resample filter {r}")))?,
        };
        let cfg = Self {
            do_resize: b("do_resize", true),
            longest_edge: edge("size", 4 * 364),
            tile_size: edge("max_image_size", 364),
            do_image_splitting: b("do_image_splitting", true),
            do_rescale: b("do_rescale", true),
            rescale_factor: pre
                .get("rescale_factor")
                .and_then(Value::as_f64)
                .unwrap_or(d.rescale_factor),
            do_normalize: b("do_normalize", true),
            image_mean: triple(pre.get("image_mean"), d.image_mean, "image_mean")?,
            image_std: triple(pre.get("image_std"), d.image_std, "image_std")?,
            resample,
            image_seq_len: image_seq_len.unwrap_or(169),
        };
        if cfg.tile_size == 0 || cfg.longest_edge == 0 {
            return Err(Error::Config("image sizes must be positive".into()));
        }
        if cfg.image_std.contains(&0.0) {
            return Err(Error::Config("image_std must not be zero".into()));
        }
        Ok(cfg)
    }
}

/// One image after processing: its tiles and how they were laid out.
#[derive(Clone, Debug)]
pub struct ProcessedImage {
    /// `(tiles, 3, height, width)`, row-major tiles first, the global image last.
    pub pixel_values: Vec<f32>,
    pub num_tiles: usize,
    pub height: usize,
    pub width: usize,
    /// Tile rows and columns (0, 0 when the image was not split).
    pub rows: usize,
    pub cols: usize,
}

/// `_resize_output_size_rescale_to_max_len` then `_resize_output_size_scale_below_upper_bound`.
fn longest_edge_size(height: usize, width: usize, max_len: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let (mut h, mut w) = (height, width);
    if w >= h {
        w = max_len;
        h = (w as f64 / aspect) as usize;
        if h % 2 != 0 {
            h += 1;
        }
    } else {
        h = max_len;
        w = (h as f64 * aspect) as usize;
        if w % 2 != 0 {
            w += 1;
        }
    }
    let (mut h, mut w) = (h.max(1), w.max(1));
    let aspect = w as f64 / h as f64;
    if w >= h && w > MAX_IMAGE_SIZE {
        w = MAX_IMAGE_SIZE;
        h = (w as f64 / aspect) as usize;
    } else if h > w && h > MAX_IMAGE_SIZE {
        h = MAX_IMAGE_SIZE;
        w = (h as f64 * aspect) as usize;
    }
    (h.max(1), w.max(1))
}

/// `resize_for_vision_encoder`: both sides rounded up to multiples of the tile size.
fn tile_multiple_size(height: usize, width: usize, tile: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let up = |x: usize| x.div_ceil(tile) * tile;
    if width >= height {
        let w = up(width);
        let h = up((w as f64 / aspect) as usize);
        (h, w)
    } else {
        let h = up(height);
        let w = up((h as f64 * aspect) as usize);
        (h, w)
    }
}

fn crop(img: &Image8, x0: usize, y0: usize, w: usize, h: usize) -> Image8 {
    let c = img.channels;
    let mut data = Vec::with_capacity(w * h * c);
    for y in y0..y0 + h {
        let row = (y * img.width + x0) * c;
        data.extend_from_slice(&img.data[row..row + w * c]);
    }
    Image8::new(w, h, c, data)
}

/// Process one RGB image into tiles.
pub fn process_image(
    img: &Image8,
    cfg: &ImageProcessorConfig,
    split: bool,
) -> Result<ProcessedImage> {
    if img.channels != 3 {
        return Err(Error::ModelInput(format!(
            "image processor expects RGB, got {} channels",
            img.channels
        )));
    }
    let filter = cfg.resample;
    let resized;
    let img = if cfg.do_resize {
        let (h, w) = longest_edge_size(img.height, img.width, cfg.longest_edge);
        resized = resize(img, w, h, filter);
        &resized
    } else {
        img
    };
    let t = cfg.tile_size;
    let (tiles, rows, cols) = if split {
        let (h, w) = tile_multiple_size(img.height, img.width, t);
        let img = resize(img, w, h, filter);
        if h > t || w > t {
            let rows = (h - t) / t + 1;
            let cols = (w - t) / t + 1;
            let mut tiles = Vec::with_capacity(rows * cols + 1);
            for r in 0..rows {
                for c in 0..cols {
                    tiles.push(crop(&img, c * t, r * t, t, t));
                }
            }
            tiles.push(resize(&img, t, t, filter));
            (tiles, rows, cols)
        } else {
            (vec![img], 0, 0)
        }
    } else {
        (vec![resize(img, t, t, filter)], 0, 0)
    };
    // All tiles are t×t here (a split image is a multiple of t; an unsplit one is squashed to t).
    let (height, width) = (tiles[0].height, tiles[0].width);
    let mut pixel_values = Vec::with_capacity(tiles.len() * 3 * height * width);
    for tile in &tiles {
        if (tile.height, tile.width) != (height, width) {
            return Err(Error::Internal("tiles of one image differ in size".into()));
        }
        for ch in 0..3 {
            pixel_values.extend(tile.data.iter().skip(ch).step_by(3).map(|&v| {
                // transformers: f64 rescale then f32, f32 normalise.
                let x = if cfg.do_rescale {
                    (f64::from(v) * cfg.rescale_factor) as f32
                } else {
                    f32::from(v)
                };
                if cfg.do_normalize {
                    (x - cfg.image_mean[ch]) / cfg.image_std[ch]
                } else {
                    x
                }
            }));
        }
    }
    Ok(ProcessedImage {
        pixel_values,
        num_tiles: tiles.len(),
        height,
        width,
        rows,
        cols,
    })
}

/// The text that stands for one image in the prompt (`Idefics3Processor.replace_image_token`).
pub fn image_prompt_string(rows: usize, cols: usize, image_seq_len: usize) -> String {
    const FAKE: &str = "<fake_token_around_image>";
    const GLOBAL: &str = "<global-img>";
    let image_tokens = "<image>".repeat(image_seq_len);
    if rows == 0 && cols == 0 {
        return format!("{FAKE}{GLOBAL}{image_tokens}{FAKE}");
    }
    let mut s = String::new();
    for r in 0..rows {
        for c in 0..cols {
            s.push_str(&format!(
                "{FAKE}<row_{}_col_{}>{image_tokens}",
                r + 1,
                c + 1
            ));
        }
        s.push('\n');
    }
    s.push_str(&format!("\n{FAKE}{GLOBAL}{image_tokens}{FAKE}"));
    s
}

/// Replace the `<image>` placeholders of a rendered prompt's template text, in order, with each
/// image's expansion; `<image>` in message text stays text.
pub fn expand_image_tokens(
    prompt: &PromptText,
    images: &[ProcessedImage],
    image_seq_len: usize,
) -> Result<PromptText> {
    let expansions: Vec<String> = images
        .iter()
        .map(|img| image_prompt_string(img.rows, img.cols, image_seq_len))
        .collect();
    prompt.expand(IMAGE_PLACEHOLDER, &expansions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_transformers() {
        // 512x384 photo -> longest edge 2048 -> 2048x1536 -> tiles 4 cols x 3 rows.
        assert_eq!(longest_edge_size(384, 512, 2048), (1536, 2048));
        assert_eq!(tile_multiple_size(1536, 2048, 512), (1536, 2048));
        // odd heights are bumped to even
        assert_eq!(longest_edge_size(333, 500, 2048), (1364, 2048));
        assert_eq!(longest_edge_size(500, 333, 2048), (2048, 1364));
    }

    #[test]
    fn tile_layout_and_token_count() {
        let img = Image8::new(512, 384, 3, vec![100; 512 * 384 * 3]);
        let p = process_image(&img, &ImageProcessorConfig::default(), true).unwrap();
        assert_eq!((p.rows, p.cols, p.num_tiles), (3, 4, 13));
        assert_eq!(p.pixel_values.len(), 13 * 3 * 512 * 512);
        let s = image_prompt_string(p.rows, p.cols, 64);
        assert_eq!(s.matches("<image>").count(), 13 * 64);
        assert!(s.contains("<row_3_col_4>"));
        assert!(s.ends_with("<fake_token_around_image>"));
        assert!(s.contains("\n\n<fake_token_around_image><global-img>"));
        let q = process_image(&img, &ImageProcessorConfig::default(), false).unwrap();
        assert_eq!((q.rows, q.cols, q.num_tiles), (0, 0, 1));
    }

    #[test]
    fn normalisation_is_exact() {
        let img = Image8::new(1, 1, 3, vec![0, 128, 255]);
        let cfg = ImageProcessorConfig {
            do_resize: false,
            ..Default::default()
        };
        let p = process_image(&img, &cfg, false).unwrap();
        // squashed to 512x512: every pixel equals the one input pixel
        let n = 512 * 512;
        assert_eq!(p.pixel_values[0], -1.0);
        assert_eq!(p.pixel_values[n], ((128.0f64 / 255.0) as f32 - 0.5) / 0.5);
        assert_eq!(p.pixel_values[2 * n], 1.0);
    }

    #[test]
    fn placeholder_count_must_match() {
        let img = ProcessedImage {
            pixel_values: vec![],
            num_tiles: 1,
            height: 1,
            width: 1,
            rows: 0,
            cols: 0,
        };
        assert!(expand_image_tokens(&PromptText::template("a <image> b"), &[], 64).is_err());
        let s = expand_image_tokens(&PromptText::template("a<image>b"), &[img], 2).unwrap();
        assert_eq!(
            s.text,
            "a<fake_token_around_image><global-img><image><image><fake_token_around_image>b"
        );
    }
}
