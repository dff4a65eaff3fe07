//! `Idefics3ForConditionalGeneration` (SmolVLM) configuration.

use serde_json::Value;

use crate::config::{
    bool_or, check_architecture, get, nonzero, usize_or, TextConfig, VisionConfig,
};
use crate::error::{Error, Result};

/// The whole model's configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Idefics3Config {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub scale_factor: usize,
    pub image_token_id: u32,
    pub tie_word_embeddings: bool,
    /// The dtype the checkpoint was saved in (`torch_dtype` or `dtype`), if stated.
    pub dtype: Option<String>,
}

/// The architectures this family reads (the engine picks families by `model::family::setup`).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["Idefics3ForConditionalGeneration"];

impl Idefics3Config {
    /// Parse the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("config.json is not valid JSON: {e}")))?;
        Self::from_value(&v)
    }

    pub fn from_value(v: &Value) -> Result<Self> {
        check_architecture(v, SUPPORTED_ARCHITECTURES, "idefics3")?;
        let text_v = get(v, "text_config")
            .ok_or_else(|| Error::Config("config.json has no `text_config`".into()))?;
        let vision_v = get(v, "vision_config")
            .ok_or_else(|| Error::Config("config.json has no `vision_config`".into()))?;
        let text = TextConfig::from_value(text_v)?;
        text.validate()?;
        let vision = VisionConfig::from_value(vision_v)?;
        let scale_factor = nonzero("scale_factor", usize_or(v, "scale_factor", 2)?)?;
        if vision.patches_per_side() % scale_factor != 0 {
            return Err(Error::Config(format!(
                "scale_factor {scale_factor} does not divide the {} patches per side",
                vision.patches_per_side()
            )));
        }
        let tie_word_embeddings = match get(v, "tie_word_embeddings") {
            Some(_) => bool_or(v, "tie_word_embeddings", false)?,
            None => bool_or(text_v, "tie_word_embeddings", false)?,
        };
        let dtype = get(v, "dtype")
            .or_else(|| get(v, "torch_dtype"))
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(Self {
            text,
            vision,
            scale_factor,
            image_token_id: usize_or(v, "image_token_id", 128257)? as u32,
            tie_word_embeddings,
            dtype,
        })
    }

    /// Number of `<image>` tokens one tile becomes after the pixel-shuffle connector.
    pub fn image_tokens_per_tile(&self) -> usize {
        let p = self.vision.patches_per_side();
        p * p / (self.scale_factor * self.scale_factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn minimal(text: Value) -> Value {
        json!({
            "architectures": ["Idefics3ForConditionalGeneration"],
            "scale_factor": 4, "image_token_id": 49190,
            "text_config": text,
            "vision_config": {"hidden_size": 768, "num_attention_heads": 12, "image_size": 512, "patch_size": 16}
        })
    }

    #[test]
    fn reads_both_rope_layouts() {
        let v4 = minimal(
            json!({"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000}),
        );
        let v5 = minimal(
            json!({"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
            "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}),
        );
        let a = Idefics3Config::from_value(&v4).unwrap();
        let b = Idefics3Config::from_value(&v5).unwrap();
        assert_eq!(a.text.rope_theta, 100000.0);
        assert_eq!(a, b);
        assert_eq!(a.text.head_dim, 64);
        assert_eq!(a.image_tokens_per_tile(), 64);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let v = json!({"architectures": ["LlavaForConditionalGeneration"]});
        let e = Idefics3Config::from_value(&v).unwrap_err().to_string();
        assert!(e.contains("LlavaForConditionalGeneration"), "{e}");
    }

    #[test]
    fn bad_head_grouping_is_an_error() {
        let v = minimal(
            json!({"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 2}),
        );
        assert!(Idefics3Config::from_value(&v).is_err());
    }

    #[test]
    fn scaled_rope_is_refused_clearly() {
        let v = minimal(json!({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}));
        let e = Idefics3Config::from_value(&v).unwrap_err().to_string();
        assert!(e.contains("yarn"), "{e}");
    }
}
