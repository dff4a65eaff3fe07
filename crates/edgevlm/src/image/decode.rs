//! Decoding image files and data URIs into 8-bit RGB, with transparency composited onto white as
//! transformers' `convert_to_rgb` (Pillow's `alpha_composite`) does.

use std::io::Cursor;
use std::path::Path;

use base64::Engine as _;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

use super::resample::Image8;
use crate::error::{Error, Result};

/// Largest accepted image side, in pixels (transformers clamps its own resize at 4096; larger inputs are
/// accepted up to this bound and downscaled).
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// Largest decoder allocation.
pub const MAX_DECODE_BYTES: u64 = 1 << 30;

/// Where an image comes from, for error messages.
fn err(source: &str, message: impl std::fmt::Display) -> Error {
    Error::Image {
        source_name: source.to_string(),
        message: message.to_string(),
    }
}

/// Load an image given as a local path, a `file://` URL or a `data:image/...;base64,` URI.
pub fn load_image_ref(reference: &str) -> Result<Image8> {
    if let Some(rest) = reference.strip_prefix("data:") {
        let (meta, payload) = rest
            .split_once(',')
            .ok_or_else(|| err("data URI", "no `,` separating the media type from the data"))?;
        if !meta.ends_with(";base64") {
            return Err(err("data URI", "only base64 data URIs are supported"));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(payload.trim())
            .map_err(|e| err("data URI", format!("invalid base64: {e}")))?;
        return decode_bytes(&bytes, "data URI");
    }
    if reference.starts_with("http://") || reference.starts_with("https://") {
        return Err(err(
            reference,
            "remote image URLs are not fetched (edgevlm runs offline); download the image and pass its path",
        ));
    }
    let path = reference.strip_prefix("file://").unwrap_or(reference);
    load_image_path(Path::new(path))
}

/// Load an image file.
pub fn load_image_path(path: &Path) -> Result<Image8> {
    let bytes = std::fs::read(path).map_err(|e| err(&path.display().to_string(), e))?;
    decode_bytes(&bytes, &path.display().to_string())
}

/// Decode encoded image bytes (JPEG, PNG, WebP, GIF's first frame, BMP), honouring EXIF orientation.
pub fn decode_bytes(bytes: &[u8], source: &str) -> Result<Image8> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| err(source, e))?;
    if reader.format().is_none() {
        return Err(err(
            source,
            "not a recognised image format (JPEG, PNG, WebP, GIF or BMP)",
        ));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    let mut decoder = reader.into_decoder().map_err(|e| err(source, e))?;
    decoder.set_limits(limits).map_err(|e| err(source, e))?;
    let orientation = decoder.orientation().ok();
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(err(source, "image has zero width or height"));
    }
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| err(source, e))?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    Ok(to_rgb8(img))
}

/// Pillow's `alpha_composite` of `(r, g, b, a)` over opaque white, per channel.
#[inline]
pub fn composite_on_white(c: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    // Pillow: 7 fractional bits, rounded divisions by 255 (dst alpha = 255, so outa255 = 255 * 255).
    const PB: u32 = 7;
    let (c, a) = (u32::from(c), u32::from(a));
    let coef1 = a * 255 * 255 * (1 << PB) / (255 * 255);
    let coef2 = 255 * (1 << PB) - coef1;
    let tmp = c * coef1 + 255 * coef2 + (0x80 << PB);
    (((tmp >> 8) + tmp) >> 8 >> PB) as u8
}

/// Any decoded image to interleaved 8-bit RGB.
pub fn to_rgb8(img: DynamicImage) -> Image8 {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let has_alpha = img.color().has_alpha();
    let data = if has_alpha {
        let rgba = img.into_rgba8();
        let mut out = Vec::with_capacity(w * h * 3);
        for p in rgba.pixels() {
            let [r, g, b, a] = p.0;
            out.extend_from_slice(&[
                composite_on_white(r, a),
                composite_on_white(g, a),
                composite_on_white(b, a),
            ]);
        }
        out
    } else {
        // Grey is replicated, 16-bit keeps its high byte, float is clamped and scaled.
        img.into_rgb8().into_raw()
    };
    Image8::new(w, h, 3, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_matches_pillow_endpoints() {
        assert_eq!(composite_on_white(0, 255), 0);
        assert_eq!(composite_on_white(200, 255), 200);
        assert_eq!(composite_on_white(0, 0), 255);
        // Half-transparent black over white is mid grey (Pillow gives 128 for alpha 127).
        assert_eq!(composite_on_white(0, 127), 128);
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let e = decode_bytes(b"not an image at all", "x.png")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("image x.png:"), "{e}");
    }

    #[test]
    fn truncated_png_is_an_error() {
        let img = image::RgbImage::from_pixel(16, 16, image::Rgb([1, 2, 3]));
        let mut buf = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut buf), image::ImageFormat::Png)
            .unwrap();
        assert!(decode_bytes(&buf, "ok.png").is_ok());
        assert!(decode_bytes(&buf[..buf.len() / 2], "cut.png").is_err());
    }

    #[test]
    fn data_uri_roundtrip_and_remote_refusal() {
        let img = image::RgbImage::from_pixel(3, 2, image::Rgb([9, 8, 7]));
        let mut buf = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut buf), image::ImageFormat::Png)
            .unwrap();
        let uri = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(&buf)
        );
        let got = load_image_ref(&uri).unwrap();
        assert_eq!((got.width, got.height), (3, 2));
        assert_eq!(&got.data[..3], &[9, 8, 7]);
        assert!(load_image_ref("https://example.com/a.png").is_err());
    }
}

#[cfg(test)]
mod format_tests {
    use super::*;
    use image::{ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};

    fn encode(img: DynamicImage, fmt: ImageFormat) -> Vec<u8> {
        let mut buf = Vec::new();
        img.write_to(&mut Cursor::new(&mut buf), fmt).unwrap();
        buf
    }

    #[test]
    fn every_supported_format_decodes_to_rgb() {
        let rgb = DynamicImage::ImageRgb8(RgbImage::from_fn(24, 16, |x, y| {
            Rgb([x as u8 * 10, y as u8 * 10, 128])
        }));
        for fmt in [
            ImageFormat::Png,
            ImageFormat::Jpeg,
            ImageFormat::Bmp,
            ImageFormat::WebP,
            ImageFormat::Gif,
        ] {
            let img = decode_bytes(&encode(rgb.clone(), fmt), "x")
                .unwrap_or_else(|e| panic!("{fmt:?}: {e}"));
            assert_eq!(
                (img.width, img.height, img.channels),
                (24, 16, 3),
                "{fmt:?}"
            );
            let d = i32::from(img.data[3 * (5 * 24 + 7)]) - 70;
            assert!(
                d.abs() <= 12,
                "{fmt:?}: red at (7, 5) is {}",
                img.data[3 * (5 * 24 + 7)]
            );
        }
    }

    #[test]
    fn grey_alpha_and_16_bit_convert() {
        let grey = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(2, 2, image::Luma([77])));
        assert_eq!(
            decode_bytes(&encode(grey, ImageFormat::Png), "g")
                .unwrap()
                .data,
            vec![77; 12]
        );
        let rgba = DynamicImage::ImageRgba8(RgbaImage::from_pixel(1, 1, Rgba([0, 0, 0, 127])));
        assert_eq!(
            decode_bytes(&encode(rgba, ImageFormat::Png), "a")
                .unwrap()
                .data,
            vec![128; 3]
        );
        let deep = DynamicImage::ImageRgb16(image::ImageBuffer::from_pixel(
            1,
            1,
            Rgb([65535u16, 32896, 0]),
        ));
        assert_eq!(
            decode_bytes(&encode(deep, ImageFormat::Png), "d")
                .unwrap()
                .data,
            vec![255, 128, 0]
        );
    }
}
