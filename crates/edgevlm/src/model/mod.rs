//! Model definitions: plain structs with `load` and `forward`, free of file and network I/O.

pub mod family;
pub mod idefics3;
pub mod kv_cache;
pub mod nn;
pub mod qwen2_vl;
pub mod text;
pub mod vision;
pub mod whisper;

pub use idefics3::Idefics3;
pub use kv_cache::KvCache;
pub use text::Positions;

use candle_core::Tensor;

use crate::error::{Error, Result};

/// Input embeddings `(1, ids.len(), hidden)` of a prompt with the rows of its `image_token` tokens
/// replaced, in order, by `image_features` (one row per image token): one gather over
/// `[text rows; image rows]`.
pub fn scatter_image_features(
    text: &text::TextModel,
    ids: &[u32],
    image_token: u32,
    image_features: Option<&Tensor>,
) -> Result<Tensor> {
    let embeds = text.embed(ids)?;
    let n_image_tokens = ids.iter().filter(|&&i| i == image_token).count();
    let feats = match image_features {
        None if n_image_tokens == 0 => return Ok(embeds.unsqueeze(0)?),
        None => {
            return Err(Error::ModelInput(format!(
                "prompt has {n_image_tokens} image tokens but no image was given"
            )))
        }
        Some(f) => f,
    };
    let rows = feats.dim(0)?;
    if rows != n_image_tokens {
        return Err(Error::ModelInput(format!(
            "image features and image tokens do not match: {n_image_tokens} image tokens, {rows} feature rows"
        )));
    }
    let n = ids.len() as u32;
    let mut next_image = n;
    let index: Vec<u32> = ids
        .iter()
        .enumerate()
        .map(|(pos, &id)| {
            if id == image_token {
                next_image += 1;
                next_image - 1
            } else {
                pos as u32
            }
        })
        .collect();
    let all = Tensor::cat(&[&embeds, &feats.to_dtype(embeds.dtype())?], 0)?;
    let index = Tensor::new(index.as_slice(), embeds.device())?;
    Ok(all.index_select(&index, 0)?.unsqueeze(0)?)
}
