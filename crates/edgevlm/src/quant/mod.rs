//! Quantized weights: MLX-style affine groups (4/8-bit), read from checkpoints or made while loading.

pub mod affine;
pub mod writer;

pub use affine::{
    AffineParts, AffineWeight, CodeLayout, GroupValues, QuantSpec, ScaleType, StoredSpec,
    DEFAULT_GROUP_SIZE, TILE_ROWS,
};
pub use writer::{quantize_checkpoint, QuantizeReport};
