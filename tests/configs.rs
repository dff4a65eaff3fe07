//! Configurations of the SmolVLM family and Idefics3-8B load and give the right shapes.

mod common;

use common::*;
use edgevlm::model::idefics3::Idefics3Config;
use serde_json::json;

#[test]
#[cfg_attr(
    shared_missing,
    ignore = "needs ../shared/models/smolvlm-256m-instruct (the real SmolVLM tokenizer files; see README)"
)]
fn real_smolvlm_256m_config() {
    let shared = shared_smolvlm();
    let text = std::fs::read_to_string(shared.join("config.json")).unwrap();
    let c = Idefics3Config::from_json_str(&text).unwrap();
    let t = &c.text;
    assert_eq!(
        (
            t.num_hidden_layers,
            t.hidden_size,
            t.num_attention_heads,
            t.num_key_value_heads,
            t.head_dim
        ),
        (30, 576, 9, 3, 64)
    );
    assert_eq!(
        (t.intermediate_size, t.vocab_size, t.rope_theta),
        (1536, 49280, 100000.0)
    );
    assert!(!c.tie_word_embeddings);
    let v = &c.vision;
    assert_eq!(
        (
            v.hidden_size,
            v.num_hidden_layers,
            v.image_size,
            v.patch_size
        ),
        (768, 12, 512, 16)
    );
    assert_eq!(c.scale_factor, 4);
    assert_eq!(c.image_tokens_per_tile(), 64);
    assert_eq!(c.image_token_id, 49190);
    assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
}

fn family_config(
    text: serde_json::Value,
    vision: serde_json::Value,
    scale: usize,
    image_token: u32,
) -> String {
    json!({
        "architectures": ["Idefics3ForConditionalGeneration"],
        "model_type": "idefics3",
        "scale_factor": scale,
        "image_token_id": image_token,
        "text_config": text,
        "vision_config": vision,
    })
    .to_string()
}

#[test]
fn smolvlm_500m_2b_and_idefics3_8b_configs_load() {
    // Hyper-parameters as published in each model's config.json.
    let siglip_b = json!({"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "image_size": 512, "patch_size": 16});
    let siglip_so400m = |image_size: usize| {
        json!({"hidden_size": 1152, "intermediate_size": 4304,
        "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": image_size, "patch_size": 14})
    };
    let m500 = family_config(
        json!({"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
               "num_key_value_heads": 5, "rope_theta": 100000, "vocab_size": 49280, "max_position_embeddings": 8192}),
        siglip_b,
        4,
        49190,
    );
    let m2b = family_config(
        json!({"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
               "num_key_value_heads": 32, "rope_theta": 273768.0, "vocab_size": 49155, "max_position_embeddings": 16384}),
        siglip_so400m(384),
        3,
        49153,
    );
    let m8b = family_config(
        json!({"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "rope_theta": 500000.0, "vocab_size": 128259,
               "max_position_embeddings": 10240, "rms_norm_eps": 1e-5}),
        siglip_so400m(364),
        2,
        128257,
    );
    let c = Idefics3Config::from_json_str(&m500).unwrap();
    assert_eq!((c.text.head_dim, c.image_tokens_per_tile()), (64, 64));
    let c = Idefics3Config::from_json_str(&m2b).unwrap();
    // 384 / 14 = 27 patches per side (the conv drops the last 6 pixels), 27 / 3 = 9 -> 81 tokens.
    assert_eq!(
        (c.vision.patches_per_side(), c.image_tokens_per_tile()),
        (27, 81)
    );
    let c = Idefics3Config::from_json_str(&m8b).unwrap();
    assert_eq!(
        (
            c.text.head_dim,
            c.vision.patches_per_side(),
            c.image_tokens_per_tile()
        ),
        (128, 26, 169)
    );
}
