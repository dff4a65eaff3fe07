//! `WhisperForConditionalGeneration` configuration (config.json; transformers' `WhisperConfig`
//! defaults where a field is absent).

use serde_json::Value;

use crate::config::{bool_or, check_architecture, nonzero, str_or, usize_or};
use crate::error::{Error, Result};

/// The architectures this family reads.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["WhisperForConditionalGeneration"];

#[derive(Clone, Debug, PartialEq)]
pub struct WhisperConfig {
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub decoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_ffn_dim: usize,
    pub num_mel_bins: usize,
    pub vocab_size: usize,
    /// Encoder positions (the 2x-strided mel frames of one 30 s window: 1,500).
    pub max_source_positions: usize,
    /// Decoder positions (448).
    pub max_target_positions: usize,
    pub scale_embedding: bool,
}

impl WhisperConfig {
    pub fn from_value(v: &Value) -> Result<Self> {
        check_architecture(v, SUPPORTED_ARCHITECTURES, "whisper")?;
        let act = str_or(v, "activation_function", "gelu")?;
        if act != "gelu" {
            return Err(Error::Unsupported(format!(
                "whisper activation_function `{act}` (only gelu)"
            )));
        }
        let d_model = nonzero("d_model", usize_or(v, "d_model", 384)?)?;
        let positive = |name: &str, default: usize| -> Result<usize> {
            nonzero(name, usize_or(v, name, default)?)
        };
        let cfg = Self {
            d_model,
            encoder_layers: usize_or(v, "encoder_layers", 4)?,
            decoder_layers: usize_or(v, "decoder_layers", 4)?,
            encoder_attention_heads: positive("encoder_attention_heads", 6)?,
            decoder_attention_heads: positive("decoder_attention_heads", 6)?,
            encoder_ffn_dim: positive("encoder_ffn_dim", 1536)?,
            decoder_ffn_dim: positive("decoder_ffn_dim", 1536)?,
            num_mel_bins: positive("num_mel_bins", 80)?,
            vocab_size: positive("vocab_size", 51865)?,
            max_source_positions: positive("max_source_positions", 1500)?,
            max_target_positions: positive("max_target_positions", 448)?,
            scale_embedding: bool_or(v, "scale_embedding", false)?,
        };
        for (name, heads) in [
            ("encoder_attention_heads", cfg.encoder_attention_heads),
            ("decoder_attention_heads", cfg.decoder_attention_heads),
        ] {
            if d_model % heads != 0 {
                return Err(Error::Config(format!(
                    "d_model ({d_model}) is not a multiple of {name} ({heads})"
                )));
            }
        }
        Ok(cfg)
    }

    /// Mel frames of one window: two per encoder position (conv2 has stride 2).
    pub fn window_frames(&self) -> usize {
        2 * self.max_source_positions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_whisper_base_and_refuses_others() {
        let cfg = WhisperConfig::from_value(&json!({
            "architectures": ["WhisperForConditionalGeneration"], "d_model": 512,
            "encoder_layers": 6, "decoder_layers": 6, "encoder_attention_heads": 8,
            "decoder_attention_heads": 8, "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048
        }))
        .unwrap();
        assert_eq!(
            (cfg.d_model, cfg.vocab_size, cfg.window_frames()),
            (512, 51865, 3000)
        );
        let err = WhisperConfig::from_value(&json!({"architectures": ["LlamaForCausalLM"]}));
        assert!(err.unwrap_err().to_string().contains("LlamaForCausalLM"));
        let err = WhisperConfig::from_value(
            &json!({"model_type": "whisper", "d_model": 100, "encoder_attention_heads": 8}),
        );
        assert!(err.unwrap_err().to_string().contains("not a multiple"));
    }
}
