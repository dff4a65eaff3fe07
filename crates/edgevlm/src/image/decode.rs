//! Decoding image files and data URIs into 8-bit RGB as transformers sees them through Pillow:
//! transparency composited onto white (`convert_to_rgb`, Pillow's `alpha_composite`), 16-bit grey
//! clipped to 255 and other 16-bit images cut to their high byte, truncated files refused. Every
//! image is checked against the caller's [`Limits`] from its header, before anything is decoded.

use std::io::{Cursor, Read};
use std::path::Path;

use base64::Engine as _;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use super::resample::Image8;
use crate::error::{Error, Result};
use crate::limits::Limits;

/// Where an image comes from, for error messages.
fn err(source: &str, message: impl std::fmt::Display) -> Error {
    Error::Image {
        source_name: source.to_string(),
        message: crate::error::one_line(message),
    }
}

/// Load an image given as a `data:image/...;base64,` URI, a local path or a `file://` URL, as far
/// as `limits` allow its source and size. Remote `http(s)` URLs are refused: the engine is offline.
pub fn load_image_ref(reference: &str, limits: &Limits) -> Result<Image8> {
    let (bytes, source) = read_image_ref(reference, limits)?;
    decode_bytes(&bytes, &source, limits)
}

/// The encoded bytes an image reference names, and how to name it in errors.
pub fn read_image_ref(reference: &str, limits: &Limits) -> Result<(Vec<u8>, String)> {
    if let Some(rest) = reference.strip_prefix("data:") {
        let source = "data URI".to_string();
        let (meta, payload) = rest
            .split_once(',')
            .ok_or_else(|| err(&source, "no `,` separating the media type from the data"))?;
        if !meta.ends_with(";base64") {
            return Err(err(&source, "only base64 data URIs are supported"));
        }
        let payload = payload.trim();
        // Base64 holds 3 bytes per 4 characters: refuse an oversized payload before decoding it.
        limits.check_image_bytes(&source, payload.len() as u64 / 4 * 3)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(payload)
            .map_err(|e| err(&source, format!("invalid base64: {e}")))?;
        return Ok((bytes, source));
    }
    if reference.starts_with("http://") || reference.starts_with("https://") {
        return Err(err(
            reference,
            "remote image URLs are not fetched (edgevlm runs offline); download the image and pass its path",
        ));
    }
    let path = reference.strip_prefix("file://").unwrap_or(reference);
    let path = limits.local_image_path(reference, Path::new(path))?;
    let bytes = read_image_file(&path, limits)?;
    Ok((bytes, path.display().to_string()))
}

/// Load an image file (its size checked against `limits` before it is read).
pub fn load_image_path(path: &Path, limits: &Limits) -> Result<Image8> {
    let bytes = read_image_file(path, limits)?;
    decode_bytes(&bytes, &path.display().to_string(), limits)
}

fn read_image_file(path: &Path, limits: &Limits) -> Result<Vec<u8>> {
    let source = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| err(&source, e))?;
    let len = file.metadata().map_err(|e| err(&source, e))?.len();
    limits.check_image_bytes(&source, len)?;
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limits.max_image_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(&source, e))?;
    limits.check_image_bytes(&source, bytes.len() as u64)?;
    Ok(bytes)
}

/// Check an image reference as [`load_image_ref`] would, without decoding pixels: its source, size,
/// format, completeness and header dimensions against `limits`. Returns the width and height.
pub fn probe_image_ref(reference: &str, limits: &Limits) -> Result<(u32, u32)> {
    let (bytes, source) = read_image_ref(reference, limits)?;
    let decoder = open_decoder(&bytes, &source, limits)?;
    Ok(decoder.dimensions())
}

/// Decode encoded image bytes (JPEG, PNG, WebP, GIF's first frame, BMP), honouring EXIF orientation.
/// The header's size is checked against `limits` first, and the decoder's allocations are bounded.
pub fn decode_bytes(bytes: &[u8], source: &str, limits: &Limits) -> Result<Image8> {
    let mut decoder = open_decoder(bytes, source, limits)?;
    let orientation = decoder.orientation().ok();
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| err(source, e))?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    Ok(to_rgb8(img))
}

/// A decoder for `bytes` whose header passed `limits`, its allocations bounded by them.
fn open_decoder<'a>(
    bytes: &'a [u8],
    source: &str,
    limits: &Limits,
) -> Result<Box<dyn ImageDecoder + 'a>> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| err(source, e))?;
    let Some(format) = reader.format() else {
        return Err(err(
            source,
            "not a recognised image format (JPEG, PNG, WebP, GIF or BMP)",
        ));
    };
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(err(
            source,
            "JPEG data is truncated (no end-of-image marker after the scan)",
        ));
    }
    let mut decoder = reader.into_decoder().map_err(|e| err(source, e))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(err(source, "image has zero width or height"));
    }
    limits.check_image_size(source, w, h)?;
    let frame = decoder.total_bytes();
    if frame > limits.max_decoded_bytes {
        return Err(err(
            source,
            format!(
                "decoding it takes {frame} bytes, over the limit of {} (--max-decoded-bytes)",
                limits.max_decoded_bytes
            ),
        ));
    }
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(limits.max_decoded_bytes);
    decoder
        .set_limits(decoder_limits)
        .map_err(|e| err(source, e))?;
    Ok(Box::new(decoder))
}

/// Whether JPEG data ends its last scan with an end-of-image marker, as Pillow requires ("image file
/// is truncated" otherwise; the decoder here would fill the missing rows with grey). Segments before
/// the first scan are skipped by their lengths, so an EXIF thumbnail's own marker does not count.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return false;
        }
        let marker = bytes[i + 1];
        match marker {
            // Fill bytes before a marker.
            0xFF => i += 1,
            // Markers without a length.
            0x01 | 0xD0..=0xD7 => i += 2,
            0xD9 => return false,
            0xDA => {
                // Entropy-coded data stuffs every 0xFF as FF 00, so FF D9 after the scan header is the
                // real end-of-image marker.
                return bytes[i + 2..].windows(2).any(|w| w == [0xFF, 0xD9]);
            }
            _ => {
                let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
                i += 2 + len;
            }
        }
    }
    false
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

/// Interleaved 8-bit samples with `channels` per pixel (1: grey, 2: grey + alpha, 3: RGB,
/// 4: RGBA) to RGB over white.
fn rgb_over_white(samples: impl Iterator<Item = u8>, channels: usize, pixels: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(pixels * 3);
    let mut px = [0u8; 4];
    let mut n = 0;
    for v in samples {
        px[n] = v;
        n += 1;
        if n == channels {
            n = 0;
            match channels {
                1 => out.extend_from_slice(&[px[0]; 3]),
                2 => out.extend_from_slice(&[composite_on_white(px[0], px[1]); 3]),
                3 => out.extend_from_slice(&px[..3]),
                _ => out.extend_from_slice(&[
                    composite_on_white(px[0], px[3]),
                    composite_on_white(px[1], px[3]),
                    composite_on_white(px[2], px[3]),
                ]),
            }
        }
    }
    out
}

/// Any decoded image to interleaved 8-bit RGB, as Pillow's `convert("RGBA")` then composite on white:
/// 16-bit grey (Pillow's `I;16`) is clipped to 255, other 16-bit images keep their high byte.
pub fn to_rgb8(img: DynamicImage) -> Image8 {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let pixels = w * h;
    let data = match img {
        DynamicImage::ImageRgb8(i) => i.into_raw(),
        DynamicImage::ImageLuma8(i) => rgb_over_white(i.into_raw().into_iter(), 1, pixels),
        DynamicImage::ImageLumaA8(i) => rgb_over_white(i.into_raw().into_iter(), 2, pixels),
        DynamicImage::ImageRgba8(i) => rgb_over_white(i.into_raw().into_iter(), 4, pixels),
        DynamicImage::ImageLuma16(i) => rgb_over_white(
            i.into_raw().into_iter().map(|v| v.min(255) as u8),
            1,
            pixels,
        ),
        DynamicImage::ImageLumaA16(i) => {
            rgb_over_white(i.into_raw().into_iter().map(|v| (v >> 8) as u8), 2, pixels)
        }
        DynamicImage::ImageRgb16(i) => {
            rgb_over_white(i.into_raw().into_iter().map(|v| (v >> 8) as u8), 3, pixels)
        }
        DynamicImage::ImageRgba16(i) => {
            rgb_over_white(i.into_raw().into_iter().map(|v| (v >> 8) as u8), 4, pixels)
        }
        other if other.color().has_alpha() => {
            rgb_over_white(other.into_rgba8().into_raw().into_iter(), 4, pixels)
        }
        // Float images are clamped and scaled by the image crate.
        other => other.into_rgb8().into_raw(),
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
        let e = decode_bytes(b"not an image at all", "x.png", &Limits::default())
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
        assert!(decode_bytes(&buf, "ok.png", &Limits::default()).is_ok());
        assert!(decode_bytes(&buf[..buf.len() / 2], "cut.png", &Limits::default()).is_err());
    }

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut buf = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut buf), image::ImageFormat::Jpeg)
            .unwrap();
        buf
    }

    #[test]
    fn truncated_jpeg_is_an_error_as_in_pillow() {
        let buf = jpeg(64, 64);
        assert!(decode_bytes(&buf, "ok.jpg", &Limits::default()).is_ok());
        // Trailing bytes after the end marker are fine (Pillow too).
        let mut padded = buf.clone();
        padded.extend_from_slice(&[0, 0, 0]);
        assert!(decode_bytes(&padded, "padded.jpg", &Limits::default()).is_ok());
        for cut in [buf.len() - 2, buf.len() / 2] {
            let e = decode_bytes(&buf[..cut], "cut.jpg", &Limits::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("truncated"), "{cut}: {e}");
        }
    }

    #[test]
    fn bombs_are_refused_from_the_header() {
        // A 16000x16000 PNG: the header alone says it is too large.
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&16000u32.to_be_bytes());
        ihdr.extend_from_slice(&16000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(&ihdr);
        png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
        // An empty IDAT: decoders read up to the first one before they report the size.
        png.extend_from_slice(&[0, 0, 0, 0]);
        png.extend_from_slice(b"IDAT");
        png.extend_from_slice(&crc32(b"IDAT").to_be_bytes());
        let e = decode_bytes(&png, "bomb.png", &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--max-image-pixels"), "{e}");
        // Within the pixel limit but over the decoded-bytes one.
        let tight = Limits {
            max_decoded_bytes: 1000,
            ..Limits::default()
        };
        let e = decode_bytes(&jpeg(64, 64), "j.jpg", &tight)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--max-decoded-bytes"), "{e}");
        let small = Limits {
            max_image_bytes: 100,
            ..Limits::default()
        };
        let uri = format!(
            "data:image/jpeg;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(jpeg(64, 64))
        );
        let e = load_image_ref(&uri, &small).unwrap_err().to_string();
        assert!(e.contains("--max-image-bytes"), "{e}");
    }

    /// PNG's CRC-32 (the chunk checksum).
    fn crc32(data: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
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
        let got = load_image_ref(&uri, &Limits::default()).unwrap();
        assert_eq!((got.width, got.height), (3, 2));
        assert_eq!(&got.data[..3], &[9, 8, 7]);
        assert!(load_image_ref("https://example.com/a.png", &Limits::default()).is_err());
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
            let img = decode_bytes(&encode(rgb.clone(), fmt), "x", &Limits::default())
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
            decode_bytes(&encode(grey, ImageFormat::Png), "g", &Limits::default())
                .unwrap()
                .data,
            vec![77; 12]
        );
        let rgba = DynamicImage::ImageRgba8(RgbaImage::from_pixel(1, 1, Rgba([0, 0, 0, 127])));
        assert_eq!(
            decode_bytes(&encode(rgba, ImageFormat::Png), "a", &Limits::default())
                .unwrap()
                .data,
            vec![128; 3]
        );
        // Pillow 13 (scripts' pin): 16-bit RGB keeps the high byte, 16-bit grey is clipped to 255.
        let deep = DynamicImage::ImageRgb16(image::ImageBuffer::from_fn(4, 1, |x, _| {
            let v = [100u16, 256, 1000, 65535][x as usize];
            Rgb([v, v, v])
        }));
        assert_eq!(
            decode_bytes(&encode(deep, ImageFormat::Png), "d", &Limits::default())
                .unwrap()
                .data,
            [0, 1, 3, 255]
                .iter()
                .flat_map(|&v| [v; 3])
                .collect::<Vec<u8>>()
        );
        let grey16 = DynamicImage::ImageLuma16(image::ImageBuffer::from_fn(4, 1, |x, _| {
            image::Luma([[100u16, 256, 1000, 65535][x as usize]])
        }));
        assert_eq!(
            decode_bytes(&encode(grey16, ImageFormat::Png), "g16", &Limits::default())
                .unwrap()
                .data,
            [100, 255, 255, 255]
                .iter()
                .flat_map(|&v| [v; 3])
                .collect::<Vec<u8>>()
        );
    }
}
