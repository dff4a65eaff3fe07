//! Image input: decoding and Pillow-exact resampling (each family's processor lives with its model).

pub mod decode;
pub mod resample;

pub use decode::{decode_bytes, load_image_path, load_image_ref, probe_image_ref, read_image_ref};
pub use resample::{Filter, Image8};
