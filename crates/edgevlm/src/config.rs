//! Model configuration read from `config.json` (and friends) in the Hugging Face layout: the shared
//! blocks' settings (text decoder, SigLIP encoder) and the JSON helpers the families' configs use.
//!
//! Two layouts exist in the wild: transformers 4.x writes `rope_theta` / `torch_dtype`, transformers 5.x
//! writes `rope_parameters: {rope_theta, rope_type}` / `dtype`. Both are read; missing keys take the
//! defaults of the transformers configuration classes.

use serde_json::Value;

use crate::error::{Error, Result};

/// The Llama text decoder's hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    /// Biases on all four attention projections (Llama's `attention_bias`).
    pub attention_bias: bool,
    /// Biases on the query, key and value projections only (Qwen2).
    pub qkv_bias: bool,
    pub mlp_bias: bool,
    /// Multimodal RoPE (Qwen2-VL): how many of the head's frequency pairs turn with the temporal,
    /// height and width positions; `None`: one position per token.
    pub mrope_section: Option<[usize; 3]>,
}

/// The SigLIP vision encoder's hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
}

impl VisionConfig {
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

pub(crate) fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

/// config.json's `architectures` (empty when absent).
pub(crate) fn architectures(v: &Value) -> Vec<&str> {
    get(v, "architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Refuse a config.json that names none of `supported` (by `architectures`, or by `model_type` =
/// `model_type` when it lists none), saying what it names and what is supported.
pub(crate) fn check_architecture(v: &Value, supported: &[&str], model_type: &str) -> Result<()> {
    let archs = architectures(v);
    let named_type = get(v, "model_type").and_then(Value::as_str).unwrap_or("");
    let known = archs.iter().any(|a| supported.contains(a))
        || (archs.is_empty() && named_type == model_type);
    if known {
        return Ok(());
    }
    let what = if archs.is_empty() {
        format!("model_type `{named_type}`")
    } else {
        format!("architecture {}", archs.join(", "))
    };
    Err(Error::Unsupported(format!(
        "{what} is not supported (supported: {})",
        supported.join(", ")
    )))
}

/// Three numbers (or one for all three) under `key`, `default` where absent.
pub(crate) fn triple(v: Option<&Value>, default: [f32; 3], key: &str) -> Result<[f32; 3]> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => {
            let x = n.as_f64().unwrap_or(0.0) as f32;
            Ok([x; 3])
        }
        Some(Value::Array(a)) if a.len() == 3 => {
            let mut out = [0f32; 3];
            for (o, x) in out.iter_mut().zip(a) {
                *o = x
                    .as_f64()
                    .ok_or_else(|| Error::Config(format!("`{key}` must hold numbers")))?
                    as f32;
            }
            Ok(out)
        }
        Some(other) => Err(Error::Config(format!(
            "`{key}` must be 3 numbers, got {other}"
        ))),
    }
}

/// `key` as a count, `None` where absent or null.
pub(crate) fn count(v: &Value, key: &str) -> Result<Option<usize>> {
    match get(v, key) {
        None => Ok(None),
        Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
            Error::Config(format!("`{key}` must be a non-negative integer, got {x}"))
        }),
    }
}

pub(crate) fn usize_or(v: &Value, key: &str, default: usize) -> Result<usize> {
    match get(v, key) {
        None => Ok(default),
        Some(x) => x.as_u64().map(|n| n as usize).ok_or_else(|| {
            Error::Config(format!("`{key}` must be a non-negative integer, got {x}"))
        }),
    }
}

pub(crate) fn f64_or(v: &Value, key: &str, default: f64) -> Result<f64> {
    match get(v, key) {
        None => Ok(default),
        Some(x) => x
            .as_f64()
            .ok_or_else(|| Error::Config(format!("`{key}` must be a number, got {x}"))),
    }
}

pub(crate) fn str_or(v: &Value, key: &str, default: &str) -> Result<String> {
    match get(v, key) {
        None => Ok(default.to_string()),
        Some(x) => x
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| Error::Config(format!("`{key}` must be a string, got {x}"))),
    }
}

pub(crate) fn bool_or(v: &Value, key: &str, default: bool) -> Result<bool> {
    match get(v, key) {
        None => Ok(default),
        Some(x) => x
            .as_bool()
            .ok_or_else(|| Error::Config(format!("`{key}` must be true or false, got {x}"))),
    }
}

pub(crate) fn nonzero(name: &str, n: usize) -> Result<usize> {
    if n == 0 {
        Err(Error::Config(format!("`{name}` must be greater than zero")))
    } else {
        Ok(n)
    }
}

/// Most positions a model may declare: the RoPE tables are built for all of them at load (1M
/// positions of 128-wide heads take 512 MB), so a larger claim is refused instead of allocated.
pub const MAX_POSITIONS: usize = 1 << 20;

impl TextConfig {
    /// Check the sizes a model declares before anything is allocated for them: every dimension
    /// positive, heads even, and the position count at most [`MAX_POSITIONS`].
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in dims {
            if v == 0 {
                return Err(Error::Config(format!("text {name} is 0")));
            }
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "text head_dim {} is odd (RoPE rotates pairs)",
                self.head_dim
            )));
        }
        if self.max_position_embeddings > MAX_POSITIONS {
            return Err(Error::Unsupported(format!(
                "a context of {} positions (at most {MAX_POSITIONS})",
                self.max_position_embeddings
            )));
        }
        if !(self.rms_norm_eps.is_finite() && self.rope_theta.is_finite() && self.rope_theta > 0.0)
        {
            return Err(Error::Config(format!(
                "rms_norm_eps {} / rope_theta {} are not usable numbers",
                self.rms_norm_eps, self.rope_theta
            )));
        }
        self.validate_mrope()
    }

    /// Parse a Llama `text_config` (defaults of `transformers.LlamaConfig`).
    pub fn from_value(v: &Value) -> Result<Self> {
        Self::parse(v, false)
    }

    /// Parse a Qwen2-VL / Qwen2.5-VL text configuration (its `text_config`, or the top level of a
    /// transformers 4.x config.json): Q/K/V biases, and multimodal RoPE whose `mrope_section`
    /// comes from `rope_parameters` (5.x) or `rope_scaling` (4.x, `type: "mrope"`).
    pub fn from_qwen2_vl_value(v: &Value) -> Result<Self> {
        Self::parse(v, true)
    }

    fn parse(v: &Value, qwen2_vl: bool) -> Result<Self> {
        let hidden_size = nonzero("text_config.hidden_size", usize_or(v, "hidden_size", 4096)?)?;
        let num_attention_heads = nonzero(
            "text_config.num_attention_heads",
            usize_or(v, "num_attention_heads", 32)?,
        )?;
        let num_key_value_heads = nonzero(
            "text_config.num_key_value_heads",
            usize_or(v, "num_key_value_heads", num_attention_heads)?,
        )?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::Config(format!(
                "text_config: num_attention_heads ({num_attention_heads}) is not a multiple of num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let head_dim = usize_or(v, "head_dim", hidden_size / num_attention_heads)?;
        // transformers 5.x: rope_parameters {rope_type, rope_theta}; 4.x: rope_theta + rope_scaling.
        let (rope_theta, rope_type) = match get(v, "rope_parameters") {
            Some(p) => (
                f64_or(p, "rope_theta", 10000.0)?,
                str_or(p, "rope_type", "default")?,
            ),
            None => {
                let t = f64_or(v, "rope_theta", 10000.0)?;
                let ty = match get(v, "rope_scaling") {
                    Some(s) => match get(s, "rope_type").or_else(|| get(s, "type")) {
                        Some(Value::String(s)) => s.clone(),
                        _ => "default".to_string(),
                    },
                    None => "default".to_string(),
                };
                (t, ty)
            }
        };
        let mrope_section = if qwen2_vl {
            Some(mrope_section(v)?)
        } else {
            None
        };
        let rope_type = match rope_type.as_str() {
            "mrope" if qwen2_vl => "default".to_string(),
            _ => rope_type,
        };
        if rope_type != "default" {
            return Err(Error::Unsupported(format!(
                "rope scaling type `{rope_type}` is not supported yet (only unscaled RoPE)"
            )));
        }
        let hidden_act = str_or(v, "hidden_act", "silu")?;
        if hidden_act != "silu" {
            return Err(Error::Unsupported(format!(
                "text hidden_act `{hidden_act}` (only silu)"
            )));
        }
        Ok(Self {
            vocab_size: nonzero("text_config.vocab_size", usize_or(v, "vocab_size", 32000)?)?,
            hidden_size,
            intermediate_size: nonzero(
                "text_config.intermediate_size",
                usize_or(v, "intermediate_size", 11008)?,
            )?,
            num_hidden_layers: usize_or(v, "num_hidden_layers", 32)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim: nonzero("text_config.head_dim", head_dim)?,
            rms_norm_eps: f64_or(v, "rms_norm_eps", 1e-6)?,
            rope_theta,
            max_position_embeddings: usize_or(v, "max_position_embeddings", 2048)?,
            hidden_act,
            attention_bias: !qwen2_vl && bool_or(v, "attention_bias", false)?,
            qkv_bias: qwen2_vl,
            mlp_bias: !qwen2_vl && bool_or(v, "mlp_bias", false)?,
            mrope_section,
        })
    }

    /// Check the multimodal RoPE sections against the head: they must cover its frequency pairs.
    pub fn validate_mrope(&self) -> Result<()> {
        if let Some(s) = self.mrope_section {
            if s.iter().sum::<usize>() != self.head_dim / 2 {
                return Err(Error::Config(format!(
                    "mrope_section {s:?} does not add up to half the head ({})",
                    self.head_dim / 2
                )));
            }
        }
        Ok(())
    }
}

/// `mrope_section` from `rope_parameters` or `rope_scaling`.
fn mrope_section(v: &Value) -> Result<[usize; 3]> {
    let holder = get(v, "rope_parameters")
        .filter(|p| get(p, "mrope_section").is_some())
        .or_else(|| get(v, "rope_scaling"))
        .ok_or_else(|| Error::Config("no mrope_section (rope_parameters / rope_scaling)".into()))?;
    let list = get(holder, "mrope_section")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::Config("mrope_section must be a list of 3 integers".into()))?;
    let parts: Vec<usize> = list
        .iter()
        .filter_map(|x| x.as_u64().map(|n| n as usize))
        .collect();
    match parts.as_slice() {
        [t, h, w] if list.len() == 3 => Ok([*t, *h, *w]),
        _ => Err(Error::Config(format!(
            "mrope_section must be a list of 3 integers, got {}",
            Value::Array(list.clone())
        ))),
    }
}

impl VisionConfig {
    /// Parse a `vision_config` (defaults of `transformers.Idefics3VisionConfig`).
    pub fn from_value(v: &Value) -> Result<Self> {
        let hidden_size = nonzero(
            "vision_config.hidden_size",
            usize_or(v, "hidden_size", 1152)?,
        )?;
        let num_attention_heads = nonzero(
            "vision_config.num_attention_heads",
            usize_or(v, "num_attention_heads", 16)?,
        )?;
        if hidden_size % num_attention_heads != 0 {
            return Err(Error::Config(format!(
                "vision_config: hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_attention_heads})"
            )));
        }
        let image_size = nonzero("vision_config.image_size", usize_or(v, "image_size", 224)?)?;
        let patch_size = nonzero("vision_config.patch_size", usize_or(v, "patch_size", 32)?)?;
        if patch_size > image_size {
            return Err(Error::Config(format!(
                "vision_config: patch_size ({patch_size}) is larger than image_size ({image_size})"
            )));
        }
        let hidden_act = str_or(v, "hidden_act", "gelu_pytorch_tanh")?;
        if !matches!(hidden_act.as_str(), "gelu_pytorch_tanh" | "gelu") {
            return Err(Error::Unsupported(format!(
                "vision hidden_act `{hidden_act}` (only gelu_pytorch_tanh and gelu)"
            )));
        }
        Ok(Self {
            hidden_size,
            intermediate_size: usize_or(v, "intermediate_size", 3072)?,
            num_hidden_layers: usize_or(v, "num_hidden_layers", 12)?,
            num_attention_heads,
            num_channels: usize_or(v, "num_channels", 3)?,
            image_size,
            patch_size,
            layer_norm_eps: f64_or(v, "layer_norm_eps", 1e-6)?,
            hidden_act,
        })
    }
}

/// Token ids at which generation stops: `generation_config.json`'s `eos_token_id` (an id or a list).
pub fn eos_token_ids(generation_config: &Value) -> Vec<u32> {
    match get(generation_config, "eos_token_id") {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn eos_ids_from_int_or_list() {
        assert_eq!(eos_token_ids(&json!({"eos_token_id": 49279})), vec![49279]);
        assert_eq!(
            eos_token_ids(&json!({"eos_token_id": [2, 49279]})),
            vec![2, 49279]
        );
        assert!(eos_token_ids(&json!({})).is_empty());
    }
}
