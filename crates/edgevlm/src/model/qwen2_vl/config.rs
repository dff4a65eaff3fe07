//! `Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration` configuration, in both
//! config.json layouts: transformers 4.x (text settings at the top level, `rope_scaling`) and 5.x
//! (`text_config`, `rope_parameters`).

use serde_json::Value;

use crate::config::{count, TextConfig};
use crate::error::{Error, Result};

/// Which of the two vision towers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QwenVariant {
    /// Qwen2-VL: LayerNorm, GELU MLP (`fc1`, `fc2`), full attention in every block.
    Qwen2,
    /// Qwen2.5-VL: RMSNorm, SwiGLU MLP with biases, window attention but at `fullatt_block_indexes`.
    Qwen25,
}

/// The vision tower's hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct QwenVisionConfig {
    pub variant: QwenVariant,
    pub depth: usize,
    /// Width of the ViT (`embed_dim` in Qwen2-VL, `hidden_size` in Qwen2.5-VL).
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    /// Width of the merged image tokens: the text model's hidden size.
    pub out_hidden_size: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    pub in_channels: usize,
    pub hidden_act: String,
    /// Qwen2.5-VL: window side in pixels, and the blocks that attend over the whole image.
    pub window_size: usize,
    pub fullatt_block_indexes: Vec<usize>,
    pub rope_theta: f64,
}

impl QwenVisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct QwenVlConfig {
    pub text: TextConfig,
    pub vision: QwenVisionConfig,
    pub image_token_id: u32,
    pub vision_start_token_id: u32,
    pub tie_word_embeddings: bool,
}

fn need(v: &Value, key: &str, default: usize) -> Result<usize> {
    let n = count(v, key)?.unwrap_or(default);
    if n == 0 {
        return Err(Error::Config(format!(
            "vision_config.{key} must be positive"
        )));
    }
    Ok(n)
}

impl QwenVlConfig {
    /// Parse config.json of a `variant` model.
    pub fn from_value(v: &Value, variant: QwenVariant) -> Result<Self> {
        let text_v = v.get("text_config").filter(|t| t.is_object()).unwrap_or(v);
        let text = TextConfig::from_qwen2_vl_value(text_v)?;
        text.validate()?;
        let vis = v
            .get("vision_config")
            .filter(|t| t.is_object())
            .ok_or_else(|| Error::Config("no vision_config".into()))?;
        // What differs: Qwen2-VL names the ViT width `embed_dim` and sizes its MLP by `mlp_ratio`
        // (its `hidden_size` is the merger's output); Qwen2.5-VL has window attention.
        let (hidden_size, intermediate_size, out_hidden_size, act) = match variant {
            QwenVariant::Qwen2 => {
                let embed = need(vis, "embed_dim", 1280)?;
                let ratio = vis.get("mlp_ratio").and_then(Value::as_f64).unwrap_or(4.0);
                let out = need(vis, "hidden_size", text.hidden_size)?;
                (embed, (embed as f64 * ratio) as usize, out, "quick_gelu")
            }
            QwenVariant::Qwen25 => (
                need(vis, "hidden_size", 1280)?,
                need(vis, "intermediate_size", 3420)?,
                need(vis, "out_hidden_size", text.hidden_size)?,
                "silu",
            ),
        };
        let windowed = variant == QwenVariant::Qwen25;
        let vision = QwenVisionConfig {
            variant,
            depth: need(vis, "depth", 32)?,
            hidden_size,
            intermediate_size,
            num_heads: need(vis, "num_heads", 16)?,
            out_hidden_size,
            patch_size: need(vis, "patch_size", 14)?,
            spatial_merge_size: need(vis, "spatial_merge_size", 2)?,
            temporal_patch_size: need(vis, "temporal_patch_size", 2)?,
            in_channels: count(vis, "in_channels")?
                .or(count(vis, "in_chans")?)
                .unwrap_or(3),
            hidden_act: vis
                .get("hidden_act")
                .and_then(Value::as_str)
                .unwrap_or(act)
                .to_string(),
            window_size: if windowed {
                need(vis, "window_size", 112)?
            } else {
                0
            },
            fullatt_block_indexes: if windowed {
                vis.get("fullatt_block_indexes")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_u64().map(|n| n as usize))
                            .collect()
                    })
                    .unwrap_or_else(|| vec![7, 15, 23, 31])
            } else {
                Vec::new()
            },
            rope_theta: vision_theta(vis),
        };
        let vc = &vision;
        if !vc.hidden_size.is_multiple_of(vc.num_heads) || !vc.head_dim().is_multiple_of(4) {
            return Err(Error::Config(format!(
                "vision width {} over {} heads: the head must be a multiple of 4 (2-D RoPE)",
                vc.hidden_size, vc.num_heads
            )));
        }
        if vc.in_channels != 3 {
            return Err(Error::Unsupported(format!(
                "{} image channels (RGB only)",
                vc.in_channels
            )));
        }
        if vc.out_hidden_size != text.hidden_size {
            return Err(Error::Config(format!(
                "the vision merger gives {} wide tokens, the text model takes {}",
                vc.out_hidden_size, text.hidden_size
            )));
        }
        let act_ok = match vc.variant {
            QwenVariant::Qwen2 => matches!(vc.hidden_act.as_str(), "quick_gelu" | "gelu"),
            QwenVariant::Qwen25 => vc.hidden_act == "silu",
        };
        if !act_ok {
            return Err(Error::Unsupported(format!(
                "vision hidden_act `{}`",
                vc.hidden_act
            )));
        }
        let token = |key: &str, default: u32| -> Result<u32> {
            Ok(count(v, key)?
                .or(count(text_v, key)?)
                .map_or(default, |n| n as u32))
        };
        let tie = v
            .get("tie_word_embeddings")
            .or_else(|| text_v.get("tie_word_embeddings"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Self {
            text,
            vision,
            image_token_id: token("image_token_id", 151655)?,
            vision_start_token_id: token("vision_start_token_id", 151652)?,
            tie_word_embeddings: tie,
        })
    }
}

fn vision_theta(vis: &Value) -> f64 {
    vis.get("rope_parameters")
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .unwrap_or(10000.0)
}
