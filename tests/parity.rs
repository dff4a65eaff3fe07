//! Parity with HF transformers: goldens written by scripts/make_fixtures.py (transformers 5.24,
//! PIL-based Idefics3ImageProcessor, real SmolVLM tokenizer) for the tiny random-weight model.

mod common;

use std::collections::HashMap;

use candle_core::Tensor;
use common::*;
use edgevlm::image::load_image_path;
use edgevlm::model::idefics3::{expand_image_tokens, process_image};
use edgevlm::openai::{ChatMessage, ChatRequest, ContentPart, ImageUrl, MessageContent};
use edgevlm::template::{TemplateMessage, TemplatePart};
use edgevlm::{Engine, GenerationSettings};
use serde_json::Value;
use sha2::{Digest, Sha256};

const LOGIT_TOL: f32 = 1e-4;
const MARGIN: f32 = 1e-3;

fn sha256_f32(v: &[f32]) -> String {
    let mut h = Sha256::new();
    for x in v {
        h.update(x.to_le_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// HF template messages (JSON) to ours.
fn hf_messages(v: &Value) -> Vec<TemplateMessage> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| TemplateMessage {
            role: m["role"].as_str().unwrap().to_string(),
            content: m["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| match p["type"].as_str().unwrap() {
                    "image" => TemplatePart::Image,
                    _ => TemplatePart::Text {
                        text: p["text"].as_str().unwrap().to_string(),
                    },
                })
                .collect(),
        })
        .collect()
}

/// HF template messages to an OpenAI request, images given as paths in order.
fn openai_request(v: &Value, images: &[String]) -> ChatRequest {
    let mut it = images.iter();
    let messages = v
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage {
            role: m["role"].as_str().unwrap().to_string(),
            content: Some(MessageContent::Parts(
                m["content"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| match p["type"].as_str().unwrap() {
                        "image" => ContentPart::ImageUrl {
                            image_url: ImageUrl::Plain(it.next().cloned().unwrap_or_default()),
                        },
                        _ => ContentPart::Text {
                            text: p["text"].as_str().unwrap().to_string(),
                        },
                    })
                    .collect(),
            )),
            name: None,
        })
        .collect();
    ChatRequest {
        messages,
        ..Default::default()
    }
}

#[test]
#[cfg_attr(
    shared_missing,
    ignore = "needs ../shared/models/smolvlm-256m-instruct (the real SmolVLM tokenizer files; see README)"
)]
fn image_processor_and_input_ids_match_transformers() {
    let engine = smolvlm_tiny_engine("processor");
    let golden = read_json(&fixtures().join("golden/processor.json"));
    let cases = golden.as_array().unwrap();
    assert!(cases.len() >= 12);
    for case in cases {
        let name = case["image"].as_str().unwrap();
        let split = case["split"].as_bool().unwrap();
        let img =
            load_image_path(&fixtures().join("images").join(name), &Default::default()).unwrap();
        let p = process_image(&img, &smolvlm_of(&engine).image, split).unwrap();
        let shape: Vec<usize> = serde_json::from_value(case["pixel_values_shape"].clone()).unwrap();
        assert_eq!(
            vec![p.num_tiles, 3, p.height, p.width],
            shape,
            "{name} split={split}"
        );
        let sample: Vec<f32> = serde_json::from_value(case["pixel_values_sample"].clone()).unwrap();
        let ours: Vec<f32> = p.pixel_values.iter().step_by(9973).copied().collect();
        let diffs = ours.iter().zip(&sample).filter(|(a, b)| a != b).count();
        assert_eq!(
            diffs,
            0,
            "{name} split={split}: {diffs} of {} sampled pixel values differ",
            sample.len()
        );
        assert_eq!(
            sha256_f32(&p.pixel_values),
            case["pixel_values_sha256"].as_str().unwrap(),
            "{name} split={split}: pixel values are not bit-identical"
        );
        // Every tile is full size: the attention mask is all ones.
        assert_eq!(
            case["pixel_attention_mask_sum"].as_u64().unwrap() as usize,
            p.num_tiles * p.height * p.width
        );
        let prompt = case["prompt"].as_str().unwrap();
        let text = expand_image_tokens(
            &edgevlm::prompt::PromptText::template(prompt),
            &[p],
            smolvlm_of(&engine).image.image_seq_len,
        )
        .unwrap();
        let ids = engine.tokenizer().encode_prompt(&text).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        assert_eq!(ids, want, "{name} split={split}: input ids differ");
    }
}

#[test]
#[cfg_attr(
    shared_missing,
    ignore = "needs ../shared/models/smolvlm-256m-instruct (the real SmolVLM tokenizer files; see README)"
)]
fn known_token_facts_hold() {
    let engine = smolvlm_tiny_engine("facts");
    let golden = read_json(&fixtures().join("golden/processor.json"));
    let small = golden
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["image"] == "small.png" && c["split"] == true)
        .unwrap();
    let ids: Vec<u32> = serde_json::from_value(small["input_ids"].clone()).unwrap();
    assert_eq!(ids.len(), 874);
    assert_eq!(ids.iter().filter(|&&i| i == 49190).count(), 13 * 64);
    assert_eq!(
        ids.iter().filter(|&&i| i == 1116).count(),
        1,
        "one \\n\\n token"
    );
    let t = engine.tokenizer();
    assert_eq!(t.token_to_id("<global-img>"), Some(49152));
    assert_eq!(t.token_to_id("<row_3_col_4>"), Some(49153 + 6 * 2 + 3));
    assert_eq!(t.token_to_id("<fake_token_around_image>"), Some(49189));
    assert!(engine.eos_ids().contains(&49279));
    // Logprob bytes are the token's raw bytes: "Ġthe" is b" the"; "Ã" is the lone byte 0xC3.
    assert_eq!(t.token_bytes(t.token_to_id("Ġthe").unwrap()), b" the");
    assert_eq!(t.token_bytes(t.token_to_id("Ã").unwrap()), vec![0xC3]);
    assert_eq!(t.token_bytes(49279), b"<end_of_utterance>");
}

#[test]
#[cfg_attr(
    shared_missing,
    ignore = "needs ../shared/models/smolvlm-256m-instruct (the real SmolVLM tokenizer files; see README)"
)]
fn chat_template_matches_transformers() {
    let engine = smolvlm_tiny_engine("template");
    let golden = read_json(&fixtures().join("golden/template.json"));
    for case in golden.as_array().unwrap() {
        let msgs = hf_messages(&case["messages"]);
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let ours = engine.template().render(&msgs, agp).unwrap();
        assert_eq!(ours, case["rendered"].as_str().unwrap(), "{}", case["name"]);
        if agp {
            // The same conversation as an OpenAI request renders the same.
            let n_images = msgs
                .iter()
                .flat_map(|m| &m.content)
                .filter(|p| matches!(p, TemplatePart::Image))
                .count();
            let req = openai_request(&case["messages"], &vec!["x.png".to_string(); n_images]);
            assert_eq!(
                engine.render_prompt(&req).unwrap().text,
                ours,
                "{}",
                case["name"]
            );
        }
    }
    // A plain string content is the one-text-part list HF expects.
    let req = ChatRequest::from_json(r#"{"messages":[{"role":"user","content":"What is 2+2?"}]}"#)
        .unwrap();
    let text_only = golden
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "text_only" && c["add_generation_prompt"] == true)
        .unwrap();
    assert_eq!(
        engine.render_prompt(&req).unwrap().text,
        text_only["rendered"].as_str().unwrap()
    );
}

struct Case {
    name: String,
    prompt_ids: Vec<u32>,
    continuation: Vec<u32>,
    request: ChatRequest,
}

fn logit_cases() -> Vec<Case> {
    let golden = read_json(&fixtures().join("golden/text.json"));
    golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let images: Vec<String> = c["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| {
                    fixtures()
                        .join("images")
                        .join(n.as_str().unwrap())
                        .display()
                        .to_string()
                })
                .collect();
            Case {
                name: c["case"].as_str().unwrap().to_string(),
                prompt_ids: serde_json::from_value(c["prompt_ids"].clone()).unwrap(),
                continuation: serde_json::from_value(c["continuation"].clone()).unwrap(),
                request: openai_request(&c["messages"], &images),
            }
        })
        .collect()
}

/// The largest difference between the logits at the last prompt position (`n - 1`) and the golden
/// ones of case `name`.
fn last_prompt_logit_diff(
    logits: &Tensor,
    n: usize,
    g: &HashMap<String, Tensor>,
    name: &str,
) -> f32 {
    let last: Vec<f32> = logits.get(n - 1).unwrap().to_vec1().unwrap();
    let want: Vec<f32> = g[&format!("{name}.last_prompt_logits")].to_vec1().unwrap();
    max_abs_diff(&last, &want)
}

#[test]
#[cfg_attr(
    shared_missing,
    ignore = "needs ../shared/models/smolvlm-256m-instruct (the real SmolVLM tokenizer files; see README)"
)]
fn teacher_forced_logits_match_transformers() {
    let engine = smolvlm_tiny_engine("logits");
    let g = golden_tensors();
    for case in logit_cases() {
        let mut forced = engine.prepare(&case.request).unwrap();
        assert_eq!(forced.ids, case.prompt_ids, "{}: prompt ids", case.name);
        let n = forced.ids.len();
        forced.ids.extend(&case.continuation);
        let logits = engine.logits(&forced, true).unwrap();

        let d = last_prompt_logit_diff(&logits, n, &g, &case.name);
        println!(
            "{}: last prompt position, max |Δlogit| over the vocabulary = {d:.3e}",
            case.name
        );
        assert!(
            d < LOGIT_TOL,
            "{}: last-prompt logits differ by {d}",
            case.name
        );

        let top_v: Vec<Vec<f32>> = g[&format!("{}.topk_values", case.name)].to_vec2().unwrap();
        let top_i: Vec<Vec<i64>> = g[&format!("{}.topk_ids", case.name)].to_vec2().unwrap();
        let mut worst = 0f32;
        let mut checked_argmax = 0;
        for (step, (vals, idx)) in top_v.iter().zip(&top_i).enumerate() {
            let row: Vec<f32> = logits.get(n - 1 + step).unwrap().to_vec1().unwrap();
            for (v, &i) in vals.iter().zip(idx) {
                worst = worst.max((row[i as usize] - v).abs());
            }
            if vals[0] - vals[1] > MARGIN {
                checked_argmax += 1;
                assert_eq!(
                    edgevlm::sampling::argmax(&row),
                    idx[0] as u32,
                    "{} step {step}: argmax differs",
                    case.name
                );
            }
        }
        println!(
            "{}: {} teacher-forced steps, max |Δlogit| on the top-16 = {worst:.3e}, argmax checked at {checked_argmax}",
            case.name,
            top_v.len()
        );
        assert!(
            worst < LOGIT_TOL,
            "{}: top-k logits differ by {worst}",
            case.name
        );
        assert!(checked_argmax > 0);
    }
}

#[test]
#[cfg_attr(
    shared_missing,
    ignore = "needs ../shared/models/smolvlm-256m-instruct (the real SmolVLM tokenizer files; see README)"
)]
fn greedy_generation_with_kv_cache_follows_transformers() {
    let engine = smolvlm_tiny_engine("greedy");
    for case in logit_cases() {
        let prepared = engine.prepare(&case.request).unwrap();
        let mut settings: GenerationSettings = engine.settings(&case.request).unwrap();
        settings.max_tokens = Some(case.continuation.len() as u64);
        settings.stop_at_eos = false;
        let out = engine.generate(&prepared, &settings, |_, _| {}).unwrap();
        assert_eq!(
            out.tokens, case.continuation,
            "{}: greedy tokens",
            case.name
        );
        assert_eq!(out.timings.completion_tokens, case.continuation.len());
    }
}

#[test]
#[cfg_attr(
    shared_missing,
    ignore = "needs ../shared/models/smolvlm-256m-instruct (the real SmolVLM tokenizer files; see README)"
)]
fn masked_tile_vision_features_match_transformers() {
    let engine = smolvlm_tiny_engine("masked");
    let d = masked_tile_feature_diff(&engine);
    println!("masked tile: max |Δfeature| = {d:.3e}");
    assert!(d < LOGIT_TOL, "masked tile features differ by {d}");
}

/// The default engine runs the (bf16) vision products on AMX tiles where the CPU has them: the
/// measured error bound of that path against transformers' f32 (features 7.9e-3, last-prompt logits
/// 2.9e-4 on this tiny model when measured).
#[test]
#[cfg_attr(
    shared_missing,
    ignore = "needs ../shared/models/smolvlm-256m-instruct (the real SmolVLM tokenizer files; see README)"
)]
fn bf16_tile_vision_stays_close_to_transformers() {
    if !edgevlm::kernels::amx::available() {
        eprintln!("skipped: this CPU has no AMX-BF16 (the vision products are f32 already)");
        return;
    }
    let dir = smolvlm_tiny_dir("tiles");
    let engine =
        Engine::load_dir(&dir, "tiny-idefics3", edgevlm::EngineOptions::default()).unwrap();
    let d = masked_tile_feature_diff(&engine);
    println!("bf16 tiles, masked tile: max |Δfeature| = {d:.3e}");
    assert!(d > 0.0 && d < 2e-2, "masked tile features differ by {d}");
    let g = golden_tensors();
    for case in logit_cases() {
        let forced = engine.prepare(&case.request).unwrap();
        let n = forced.ids.len();
        let logits = engine.logits(&forced, true).unwrap();
        let d = last_prompt_logit_diff(&logits, n, &g, &case.name);
        println!("bf16 tiles, {}: max |Δlogit| = {d:.3e}", case.name);
        assert!(d < 2e-3, "{}: last-prompt logits differ by {d}", case.name);
    }
}

#[test]
#[cfg_attr(
    shared_missing,
    ignore = "needs ../shared/models/smolvlm-256m-instruct (the real SmolVLM tokenizer files; see README)"
)]
fn engine_answers_with_a_chat_completion() {
    let engine = smolvlm_tiny_engine("completion");
    let img = fixtures().join("images/wide.png").display().to_string();
    let mut req = ChatRequest::simple(None, "Describe this image.", &[img]);
    req.max_tokens = Some(5);
    req.logprobs = Some(true);
    req.top_logprobs = Some(3);
    let mut chunks = Vec::new();
    let (c, timings) = engine
        .chat_streaming(&req, |ch| {
            chunks.push(ch.clone());
            Ok(())
        })
        .unwrap();
    assert_eq!(c.object, "chat.completion");
    assert!(c.id.starts_with("chatcmpl-"));
    assert_eq!(c.usage.prompt_tokens, 344);
    assert_eq!(c.usage.completion_tokens, 5);
    assert_eq!(c.usage.total_tokens, 349);
    assert_eq!(
        c.choices[0].finish_reason,
        edgevlm::openai::FinishReason::Length
    );
    let lp = c.choices[0].logprobs.as_ref().unwrap();
    assert_eq!(lp.content.len(), 5);
    for t in &lp.content {
        assert_eq!(t.top_logprobs.len(), 3);
        assert!(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob);
        // greedy: the chosen token is the most likely one
        assert_eq!(t.token, t.top_logprobs[0].token);
        assert!(t.logprob <= 0.0);
    }
    // The stream: a role chunk, content chunks that add up to the message, a final chunk.
    assert_eq!(
        chunks[0].choices[0].delta.role.as_deref(),
        Some("assistant")
    );
    let streamed: String = chunks
        .iter()
        .filter_map(|ch| ch.choices[0].delta.content.clone())
        .collect();
    assert_eq!(streamed, c.choices[0].message.content);
    assert_eq!(
        chunks.last().unwrap().choices[0].finish_reason,
        Some(c.choices[0].finish_reason)
    );
    assert!(chunks
        .iter()
        .all(|ch| ch.id == c.id && ch.object == "chat.completion.chunk"));
    assert_eq!(timings.image_tiles, 5);
    let _ = Engine::template_messages(&req).unwrap();
}

#[test]
fn the_shipped_tiny_models_tokenizer_and_template_match_transformers() {
    // scripts/make_tiny_tokenizer.py: transformers' own reload of models/tiny-idefics3.
    let golden = read_json(&fixtures().join("golden/tiny_tokenizer.json"));
    let engine = tiny_engine("tiny-tokenizer");
    let req = openai_request(&golden["messages"], &["x.png".to_string()]);
    let prompt = engine.render_prompt(&req).unwrap();
    assert_eq!(prompt.text, golden["prompt"].as_str().unwrap());
    let want: Vec<u32> = serde_json::from_value(golden["input_ids"].clone()).unwrap();
    assert_eq!(engine.tokenizer().encode_prompt(&prompt).unwrap(), want);
    for (id, text) in golden["decoded_sample"].as_object().unwrap() {
        let id: u32 = id.parse().unwrap();
        assert_eq!(
            engine.tokenizer().decode(&[id], false).unwrap(),
            text.as_str().unwrap()
        );
    }
}
