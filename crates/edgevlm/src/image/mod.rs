//! Image input: decoding, Pillow-exact resampling, and the Idefics3 image processor.

pub mod decode;
pub mod processor;
pub mod resample;

pub use decode::{decode_bytes, load_image_path, load_image_ref, probe_image_ref, read_image_ref};
pub use processor::{
    expand_image_tokens, process_image, ImageProcessorConfig, ProcessedImage, IMAGE_PLACEHOLDER,
};
pub use resample::{Filter, Image8};
