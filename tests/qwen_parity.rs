//! Parity of Qwen2.5-VL and Qwen2-VL with HF transformers: goldens written by
//! scripts/make_qwen_fixtures.py (transformers 5.24, PIL-based Qwen2VLImageProcessorPil, the real
//! Qwen2.5-VL tokenizer from scripts/fetch-qwen-tokenizer.sh) for the tiny random-weight models in
//! models/tiny-qwen2.5-vl and models/tiny-qwen2-vl.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use edgevlm::image::load_image_path;
use edgevlm::limits::Limits;
use edgevlm::model::nn::{LoadOptions, Weights};
use edgevlm::model::qwen2_vl::{process_image, QwenImageConfig, QwenVariant, QwenVl, QwenVlConfig};
use edgevlm::model::{KvCache, Positions};
use edgevlm::openai::{ChatMessage, ChatRequest, ContentPart, ImageUrl, MessageContent};
use edgevlm::weights::WeightStore;
use edgevlm::Engine;
use serde_json::Value;
use sha2::{Digest, Sha256};

const LOGIT_TOL: f32 = 1e-4;

fn sha256_f32(v: &[f32]) -> String {
    let mut h = Sha256::new();
    for x in v {
        h.update(x.to_le_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn qwen_fixtures() -> std::path::PathBuf {
    fixtures().join("qwen")
}

fn image_config(family: &str) -> QwenImageConfig {
    let pre =
        read_json(&repo_root().join(format!("models/tiny-{family}/preprocessor_config.json")));
    QwenImageConfig::from_value(&pre).unwrap()
}

fn load_model(family: &str) -> QwenVl {
    let dir = repo_root().join(format!("models/tiny-{family}"));
    let cfg_json = read_json(&dir.join("config.json"));
    let variant = match family {
        "qwen2.5-vl" => QwenVariant::Qwen25,
        _ => QwenVariant::Qwen2,
    };
    let cfg = QwenVlConfig::from_value(&cfg_json, variant).unwrap();
    let store = WeightStore::open_dir(&dir).unwrap();
    let opts = LoadOptions::new(DType::F32, Device::Cpu);
    QwenVl::load(&Weights::new(&store, &opts), &cfg).unwrap()
}

#[test]
fn qwen_image_processor_matches_transformers_bit_for_bit() {
    let golden = read_json(&qwen_fixtures().join("processor.json"));
    let base = image_config("qwen2.5-vl");
    let cases = golden.as_array().unwrap();
    assert_eq!(cases.len(), 14);
    for case in cases {
        let name = case["image"].as_str().unwrap();
        let max_pixels = case["max_pixels"].as_u64().unwrap() as usize;
        let cfg = base.with_pixels(None, Some(max_pixels)).unwrap();
        let img =
            load_image_path(&fixtures().join("images").join(name), &Limits::default()).unwrap();
        let p = process_image(&img, &cfg).unwrap();
        let grid: Vec<usize> = serde_json::from_value(case["grid_thw"].clone()).unwrap();
        assert_eq!(p.grid.to_vec(), grid, "{name} @ {max_pixels}: grid");
        assert_eq!(
            sha256_f32(&p.pixel_values),
            case["pixel_values_sha256"].as_str().unwrap(),
            "{name} @ {max_pixels}: pixel values differ"
        );
    }
}

struct Case {
    messages: Value,
    prompt: String,
    family: String,
    name: String,
    images: Vec<String>,
    ids: Vec<u32>,
    positions: Vec<[u32; 3]>,
    continuation: Vec<u32>,
}

fn cases() -> Vec<Case> {
    let golden = read_json(&qwen_fixtures().join("cases.json"));
    golden
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let pos: Vec<Vec<u32>> = serde_json::from_value(c["position_ids"].clone()).unwrap();
            Case {
                messages: c["messages"].clone(),
                prompt: c["prompt"].as_str().unwrap().to_string(),
                family: c["family"].as_str().unwrap().to_string(),
                name: c["case"].as_str().unwrap().to_string(),
                images: serde_json::from_value(c["images"].clone()).unwrap(),
                ids: serde_json::from_value(c["prompt_ids"].clone()).unwrap(),
                positions: (0..pos[0].len())
                    .map(|j| [pos[0][j], pos[1][j], pos[2][j]])
                    .collect(),
                continuation: serde_json::from_value(c["continuation"].clone()).unwrap(),
            }
        })
        .collect()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// `n` greedy tokens from the prompt's last `logits`, each fed one at a time at its cache slot plus
/// the prompt's multimodal `delta`.
fn greedy(
    model: &QwenVl,
    mut logits: Vec<f32>,
    cache: &mut KvCache,
    delta: i64,
    n: usize,
) -> Vec<u32> {
    let mut tokens = Vec::with_capacity(n);
    for _ in 0..n {
        let next = argmax(&logits);
        tokens.push(next);
        let pos = (cache.len() as i64 + delta) as usize;
        let e = model.text.embed(&[next]).unwrap().unsqueeze(0).unwrap();
        logits = model
            .text
            .forward_at(&e, Positions::From(pos), cache, false)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
    }
    tokens
}

/// Positions, last-prompt logits and 20 greedy tokens of each golden case, run through the model
/// directly (prompt ids from the golden; the engine's own tokenization is checked separately).
#[test]
fn qwen_models_match_transformers_logits_and_greedy_tokens() {
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(qwen_fixtures().join("logits.safetensors"), &Device::Cpu)
            .unwrap();
    let all = cases();
    assert_eq!(all.len(), 6);
    for family in ["qwen2.5-vl", "qwen2-vl"] {
        let model = load_model(family);
        let icfg = image_config(family);
        for case in all.iter().filter(|c| c.family == family) {
            let images: Vec<_> = case
                .images
                .iter()
                .map(|n| {
                    let img =
                        load_image_path(&fixtures().join("images").join(n), &Limits::default())
                            .unwrap();
                    process_image(&img, &icfg).unwrap()
                })
                .collect();
            let grids: Vec<[usize; 3]> = images.iter().map(|i| i.grid).collect();
            let (positions, delta) = model.rope_positions(&case.ids, &grids).unwrap();
            assert_eq!(
                positions, case.positions,
                "{family} {}: position ids",
                case.name
            );
            let feats = if images.is_empty() {
                None
            } else {
                let f: Vec<Tensor> = images
                    .iter()
                    .map(|i| model.encode_image(&i.pixel_values, i.grid).unwrap())
                    .collect();
                Some(Tensor::cat(&f, 0).unwrap())
            };
            let embeds = edgevlm::model::scatter_image_features(
                &model.text,
                &case.ids,
                model.cfg.image_token_id,
                feats.as_ref(),
            )
            .unwrap();
            let mut cache: KvCache = model.text.new_cache(case.ids.len() + 32);
            let logits = model
                .text
                .forward_at(&embeds, Positions::Multi(&positions), &mut cache, false)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = tensors[&format!("{family}.{}.last_prompt_logits", case.name)]
                .to_vec1::<f32>()
                .unwrap();
            let diff = max_abs_diff(&logits, &want);
            eprintln!(
                "{family} {}: last-prompt logits max |diff| {diff:.2e}",
                case.name
            );
            assert!(
                diff < LOGIT_TOL,
                "{family} {}: logits differ by {diff}",
                case.name
            );
            let tokens = greedy(&model, logits, &mut cache, delta, case.continuation.len());
            assert_eq!(
                tokens, case.continuation,
                "{family} {}: greedy tokens",
                case.name
            );
        }
    }
}

/// HF chat messages (JSON, string or part-list contents) to an OpenAI request, images given as
/// fixture paths in order; greedy, `max_tokens` tokens, end-of-sequence ignored.
fn request(messages: &Value, images: &[String], max_tokens: u64) -> ChatRequest {
    let mut it = images.iter();
    let messages = messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let content = match &m["content"] {
                Value::String(t) => MessageContent::Text(t.clone()),
                parts => MessageContent::Parts(
                    parts
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| match p["type"].as_str().unwrap() {
                            "image" => ContentPart::ImageUrl {
                                image_url: ImageUrl::Plain(
                                    fixtures()
                                        .join("images")
                                        .join(it.next().unwrap())
                                        .display()
                                        .to_string(),
                                ),
                            },
                            _ => ContentPart::Text {
                                text: p["text"].as_str().unwrap().to_string(),
                            },
                        })
                        .collect(),
                ),
            };
            ChatMessage {
                role: m["role"].as_str().unwrap().to_string(),
                content: Some(content),
                name: None,
            }
        })
        .collect();
    ChatRequest {
        messages,
        temperature: Some(0.0),
        max_tokens: Some(max_tokens),
        ignore_eos: Some(true),
        ..Default::default()
    }
}

fn engine(family: &str, test: &str) -> Engine {
    let dir = qwen_tiny_dir(family, &format!("{test}-{family}"));
    Engine::load_dir(&dir, family, exact_options()).expect("load tiny qwen")
}

/// Through the engine, as a user meets it: the real tokenizer and chat template render and
/// tokenize each request to transformers' prompt and ids, the family computes the same position
/// ids, the last-prompt logits match, and generation gives the 20 greedy tokens.
#[test]
fn qwen_engine_matches_transformers_prompt_ids_logits_and_answer() {
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(qwen_fixtures().join("logits.safetensors"), &Device::Cpu)
            .unwrap();
    for family in ["qwen2.5-vl", "qwen2-vl"] {
        let engine = engine(family, "qwen-engine");
        for case in cases().iter().filter(|c| c.family == family) {
            let req = request(&case.messages, &case.images, case.continuation.len() as u64);
            let prepared = engine.prepare(&req).unwrap();
            assert_eq!(
                prepared.text.text.matches("<|image_pad|>").count() > 0,
                !case.images.is_empty()
            );
            let rendered = engine.render_prompt(&req).unwrap();
            assert_eq!(
                rendered.text, case.prompt,
                "{family} {}: chat template",
                case.name
            );
            assert_eq!(prepared.ids, case.ids, "{family} {}: input ids", case.name);
            match &prepared.positions {
                Some(p) => assert_eq!(p.positions, case.positions, "{family} {}", case.name),
                None => panic!("{family}: no multimodal positions"),
            }
            let logits = last_logits(&engine, &prepared);
            let want = tensors[&format!("{family}.{}.last_prompt_logits", case.name)]
                .to_vec1::<f32>()
                .unwrap();
            let diff = max_abs_diff(&logits, &want);
            assert!(
                diff < LOGIT_TOL,
                "{family} {}: logits differ by {diff}",
                case.name
            );
            let settings = engine.settings(&req).unwrap();
            let out = engine.generate(&prepared, &settings, |_, _| {}).unwrap();
            assert_eq!(
                out.tokens, case.continuation,
                "{family} {}: answer tokens",
                case.name
            );
        }
    }
}

/// Decoding batched with other sequences (each at its own multimodal position offset) gives each
/// the tokens it gets alone.
#[test]
fn qwen_batched_decoding_equals_alone() {
    let engine = engine("qwen2.5-vl", "qwen-batched");
    let requests: Vec<ChatRequest> = cases()
        .iter()
        .filter(|c| c.family == "qwen2.5-vl")
        .map(|c| request(&c.messages, &c.images, 12))
        .collect();
    let alone = generate_alone(&engine, &requests);
    let batched = generate_batched(&engine, &requests);
    assert_eq!(alone, batched);
    assert!(alone.iter().all(|t| t.len() == 12));
}

/// A prompt longer than one prefill chunk (256 positions) runs in chunks, each with its slice of
/// the multimodal positions: the answer equals a single-pass greedy loop on the model.
#[test]
fn qwen_long_image_prompt_in_chunks_equals_one_pass() {
    let engine = engine("qwen2.5-vl", "qwen-chunks");
    let mut req = request(
        &serde_json::json!([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "Describe this image."}]}]),
        &["large.png".to_string()],
        8,
    );
    // 28x28 pixels per token: about 400 image tokens.
    req.max_pixels = Some(28 * 28 * 400);
    let prepared = engine.prepare(&req).unwrap();
    assert!(
        prepared.ids.len() > 300,
        "{} prompt tokens",
        prepared.ids.len()
    );
    let settings = engine.settings(&req).unwrap();
    let chunked = engine
        .generate(&prepared, &settings, |_, _| {})
        .unwrap()
        .tokens;

    let vlm: &edgevlm::model::qwen2_vl::QwenVlm = engine
        .model()
        .vision()
        .and_then(|v| v.as_any().downcast_ref())
        .unwrap();
    let model = &vlm.model;
    let feats = engine.encode_images(&prepared.images).unwrap();
    let embeds = edgevlm::model::scatter_image_features(
        &model.text,
        &prepared.ids,
        model.cfg.image_token_id,
        feats.as_ref(),
    )
    .unwrap();
    let p = prepared.positions.as_ref().unwrap();
    let mut cache = model.text.new_cache(prepared.ids.len() + 16);
    let logits = model
        .text
        .forward_at(&embeds, Positions::Multi(&p.positions), &mut cache, false)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(chunked, greedy(model, logits, &mut cache, p.delta, 8));
}

/// A checkpoint in mlx-vlm's Qwen layout (`vision_tower.*`, `language_model.model.*`, the Conv3d
/// channels-last) loads as the hub layout does: the same answer as the transformers golden.
#[test]
fn qwen_mlx_vlm_layout_loads_as_the_hub_layout() {
    let dir = qwen_tiny_dir("qwen2.5-vl", "qwen-mlx-layout");
    let hub = repo_root().join("models/tiny-qwen2.5-vl/model.safetensors");
    let renamed: HashMap<String, Tensor> = candle_core::safetensors::load(&hub, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| {
            let name = match (k.strip_prefix("visual."), k.strip_prefix("model.")) {
                (Some(r), _) => format!("vision_tower.{r}"),
                (_, Some(r)) => format!("language_model.model.{r}"),
                _ => format!("language_model.{k}"),
            };
            let v = if k.ends_with("patch_embed.proj.weight") {
                v.permute((0, 2, 3, 4, 1)).unwrap().contiguous().unwrap()
            } else {
                v
            };
            (name, v)
        })
        .collect();
    assert!(renamed.contains_key("vision_tower.patch_embed.proj.weight"));
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    candle_core::safetensors::save(&renamed, dir.join("model.safetensors")).unwrap();
    let engine = Engine::load_dir(&dir, "mlx-layout", exact_options()).unwrap();
    let case = cases()
        .into_iter()
        .find(|c| c.family == "qwen2.5-vl" && c.name == "one_image")
        .unwrap();
    let req = request(&case.messages, &case.images, case.continuation.len() as u64);
    let prepared = engine.prepare(&req).unwrap();
    let settings = engine.settings(&req).unwrap();
    let out = engine.generate(&prepared, &settings, |_, _| {}).unwrap();
    assert_eq!(out.tokens, case.continuation);
}
