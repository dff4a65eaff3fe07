//! What one request may ask of the engine: bounds set by whoever runs it (the CLI's flags, a server's
//! operator), each checked before the work it bounds: image headers before decoding, token counts
//! before the prompt pass.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Pillow's `Image.MAX_IMAGE_PIXELS`: transformers (through Pillow) warns above it and refuses twice
/// that as a decompression bomb; edgevlm refuses above it.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// Completion tokens when a request does not say (`max_tokens` / `max_completion_tokens` absent),
/// fewer where the context has less room left.
pub const DEFAULT_MAX_TOKENS: usize = 1024;

/// Where images may come from. Remote `http(s)` URLs are never fetched: the engine runs offline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSources {
    /// `data:` URIs, local paths and `file://` URLs anywhere (a local program's own files: the CLI).
    Anywhere,
    /// `data:` URIs only (a server's default: its clients' paths name the server's disk).
    DataOnly,
    /// `data:` URIs, and local files inside this folder (symbolic links resolved before the check).
    Under(PathBuf),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Largest image, in pixels, read from its header before anything is decoded.
    pub max_image_pixels: u64,
    /// Largest allocation an image decoder may make (the decoded frame, in its stored bit depth).
    pub max_decoded_bytes: u64,
    /// Largest encoded image: a file's size or a data URI's decoded payload.
    pub max_image_bytes: u64,
    /// Images in one request.
    pub max_images: usize,
    /// Prompt tokens of one request (images expanded); `None`: as many as the context holds.
    pub max_prompt_tokens: Option<usize>,
    /// Completion tokens one request may ask for; `None`: as many as the context holds.
    pub max_completion_tokens: Option<usize>,
    /// Completion tokens when the request does not say.
    pub default_max_tokens: usize,
    pub image_sources: ImageSources,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS,
            max_decoded_bytes: 512 << 20,
            max_image_bytes: 64 << 20,
            max_images: 8,
            max_prompt_tokens: None,
            max_completion_tokens: None,
            default_max_tokens: DEFAULT_MAX_TOKENS,
            image_sources: ImageSources::Anywhere,
        }
    }
}

impl Limits {
    /// Check these limits are usable (each at least 1).
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("max_image_pixels", self.max_image_pixels as usize),
            ("max_decoded_bytes", self.max_decoded_bytes as usize),
            ("max_image_bytes", self.max_image_bytes as usize),
            ("default_max_tokens", self.default_max_tokens),
            ("max_prompt_tokens", self.max_prompt_tokens.unwrap_or(1)),
            (
                "max_completion_tokens",
                self.max_completion_tokens.unwrap_or(1),
            ),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::Config(format!("limit {name} must be at least 1")));
            }
        }
        Ok(())
    }

    /// The completion budget of a request: what it asked for (checked against
    /// [`Self::max_completion_tokens`] and the room `context - prompt_tokens`), else the default
    /// clamped to that room.
    pub fn completion_budget(
        &self,
        requested: Option<u64>,
        prompt_tokens: usize,
        context: usize,
    ) -> Result<usize> {
        if let Some(cap) = self.max_prompt_tokens {
            if prompt_tokens > cap {
                return Err(Error::Limit(format!(
                    "the prompt is {prompt_tokens} tokens, over the limit of {cap} (--max-prompt-tokens)"
                )));
            }
        }
        let room = context.saturating_sub(prompt_tokens);
        if room == 0 {
            return Err(Error::ContextOverflow {
                prompt_tokens,
                max_tokens: requested.map_or(1, |r| usize::try_from(r).unwrap_or(usize::MAX)),
                context,
            });
        }
        match requested {
            None => Ok(self
                .default_max_tokens
                .min(self.max_completion_tokens.unwrap_or(usize::MAX))
                .min(room)),
            Some(0) => Err(Error::Request("max_tokens must be at least 1".into())),
            Some(r) => {
                if let Some(cap) = self.max_completion_tokens {
                    if r > cap as u64 {
                        return Err(Error::Limit(format!(
                            "max_tokens {r} is over the limit of {cap} completion tokens (--max-completion-tokens)"
                        )));
                    }
                }
                match usize::try_from(r) {
                    Ok(r) if r <= room => Ok(r),
                    _ => Err(Error::ContextOverflow {
                        prompt_tokens,
                        max_tokens: usize::try_from(r).unwrap_or(usize::MAX),
                        context,
                    }),
                }
            }
        }
    }

    /// Refuse an image whose header says it is larger than [`Self::max_image_pixels`].
    pub fn check_image_size(&self, source: &str, width: u32, height: u32) -> Result<()> {
        let pixels = u64::from(width) * u64::from(height);
        if pixels > self.max_image_pixels {
            return Err(Error::Image {
                source_name: source.to_string(),
                message: format!(
                    "{width}x{height} is {pixels} pixels, over the limit of {} (--max-image-pixels)",
                    self.max_image_pixels
                ),
            });
        }
        Ok(())
    }

    /// Refuse an encoded image of `bytes` bytes over [`Self::max_image_bytes`].
    pub fn check_image_bytes(&self, source: &str, bytes: u64) -> Result<()> {
        if bytes > self.max_image_bytes {
            return Err(Error::Image {
                source_name: source.to_string(),
                message: format!(
                    "{bytes} bytes, over the limit of {} bytes for one image (--max-image-bytes)",
                    self.max_image_bytes
                ),
            });
        }
        Ok(())
    }

    /// Refuse a request with more than [`Self::max_images`] images.
    pub fn check_image_count(&self, images: usize) -> Result<()> {
        if images > self.max_images {
            return Err(Error::Limit(format!(
                "the request has {images} images, over the limit of {} (--max-images)",
                self.max_images
            )));
        }
        Ok(())
    }

    /// The local file an image reference names, if [`Self::image_sources`] allows reading it.
    pub fn local_image_path(&self, reference: &str, path: &Path) -> Result<PathBuf> {
        let refuse = |m: String| Error::Image {
            source_name: reference.to_string(),
            message: m,
        };
        match &self.image_sources {
            ImageSources::Anywhere => Ok(path.to_path_buf()),
            ImageSources::DataOnly => Err(refuse(
                "local image paths are not allowed here; send the image as a data: URI (the server's operator can allow a folder with --allow-local-images DIR)".into(),
            )),
            ImageSources::Under(root) => {
                let root = root
                    .canonicalize()
                    .map_err(|e| refuse(format!("the allowed image folder {}: {e}", root.display())))?;
                let full = if path.is_absolute() {
                    path.to_path_buf()
                } else {
                    root.join(path)
                };
                let full = full
                    .canonicalize()
                    .map_err(|e| refuse(format!("{e}")))?;
                if !full.starts_with(&root) {
                    return Err(refuse(format!(
                        "outside the allowed image folder {}",
                        root.display()
                    )));
                }
                Ok(full)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_budget_never_overflows() {
        let l = Limits::default();
        assert_eq!(l.completion_budget(None, 10, 4096).unwrap(), 1024);
        assert_eq!(l.completion_budget(None, 4000, 4096).unwrap(), 96);
        assert_eq!(l.completion_budget(Some(5), 10, 4096).unwrap(), 5);
        let e = l.completion_budget(Some(u64::MAX), 10, 4096).unwrap_err();
        assert!(matches!(e, Error::ContextOverflow { .. }), "{e}");
        assert!(e.to_string().contains("18446744073709551615"), "{e}");
        assert!(l.completion_budget(Some(0), 10, 4096).is_err());
        assert!(matches!(
            l.completion_budget(None, 4096, 4096),
            Err(Error::ContextOverflow { .. })
        ));
        let capped = Limits {
            max_completion_tokens: Some(100),
            max_prompt_tokens: Some(50),
            ..Limits::default()
        };
        assert_eq!(capped.completion_budget(None, 10, 4096).unwrap(), 100);
        let e = capped.completion_budget(Some(101), 10, 4096).unwrap_err();
        assert!(e.to_string().contains("--max-completion-tokens"), "{e}");
        let e = capped.completion_budget(None, 51, 4096).unwrap_err();
        assert!(e.to_string().contains("--max-prompt-tokens"), "{e}");
    }

    #[test]
    fn image_size_limit_names_the_flag() {
        let l = Limits::default();
        assert!(l.check_image_size("x", 9000, 9000).is_ok());
        let e = l.check_image_size("x.png", 16000, 16000).unwrap_err();
        assert_eq!(
            e.to_string(),
            "image x.png: 16000x16000 is 256000000 pixels, over the limit of 89478485 (--max-image-pixels)"
        );
    }

    #[test]
    fn local_paths_follow_the_policy() {
        let dir = std::env::temp_dir().join(format!("edgevlm-limits-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("inside")).unwrap();
        std::fs::write(dir.join("inside/a.png"), b"x").unwrap();
        std::fs::write(dir.join("outside.png"), b"x").unwrap();
        let data_only = Limits {
            image_sources: ImageSources::DataOnly,
            ..Limits::default()
        };
        assert!(data_only
            .local_image_path("a.png", Path::new("a.png"))
            .is_err());
        let under = Limits {
            image_sources: ImageSources::Under(dir.join("inside")),
            ..Limits::default()
        };
        assert!(under.local_image_path("a.png", Path::new("a.png")).is_ok());
        let e = under
            .local_image_path("../outside.png", Path::new("../outside.png"))
            .unwrap_err();
        assert!(e.to_string().contains("outside the allowed"), "{e}");
        let abs = dir.join("outside.png");
        assert!(under
            .local_image_path("abs", &abs)
            .unwrap_err()
            .to_string()
            .contains("outside the allowed"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
