//! Generation behaviour on the tiny model: stop strings, EOS, sampling determinism, streaming.

mod common;

use common::*;
use edgevlm::openai::{ChatRequest, FinishReason, StopField};

fn request(max_tokens: u64) -> ChatRequest {
    let mut r = ChatRequest::simple(None, "What is 2+2?", &[]);
    r.max_tokens = Some(max_tokens);
    r
}

#[test]
fn stop_string_cuts_the_answer_and_the_stream() {
    let engine = tiny_engine("stop");
    let full = engine.chat(&request(20)).unwrap();
    let text = full.choices[0].message.content.clone();
    assert_eq!(full.choices[0].finish_reason, FinishReason::Length);
    // A stop string from the middle of the greedy answer.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 12, "answer too short: {text:?}");
    let stop: String = chars[8..11].iter().collect();
    let cut = text.find(&stop).unwrap();
    let mut req = request(20);
    req.stop = Some(StopField::One(stop.clone()));
    let mut streamed = String::new();
    let (c, _) = engine
        .chat_streaming(&req, |ch| {
            if let Some(t) = &ch.choices[0].delta.content {
                streamed.push_str(t);
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(c.choices[0].message.content, text[..cut]);
    assert_eq!(c.choices[0].finish_reason, FinishReason::Stop);
    assert_eq!(
        streamed,
        text[..cut],
        "the stream never shows the stop string"
    );
    assert!(c.usage.completion_tokens < 20);
}

#[test]
fn sampling_is_seeded() {
    let engine = tiny_engine("seeded");
    let sample = |seed| {
        let mut r = request(12);
        r.temperature = Some(1.0);
        r.top_p = Some(0.95);
        r.seed = Some(seed);
        engine.chat(&r).unwrap().choices[0].message.content.clone()
    };
    assert_eq!(sample(1), sample(1));
    assert_ne!(sample(1), sample(2));
    // Greedy and temperature 0 agree with the default (SmolVLM's generation config is greedy).
    let mut g = request(12);
    g.temperature = Some(0.0);
    assert_eq!(
        engine.chat(&g).unwrap().choices[0].message.content,
        engine.chat(&request(12)).unwrap().choices[0]
            .message
            .content
    );
}

#[test]
fn reduced_precision_runs_close_to_f32() {
    let dir = tiny_model_dir("bf16");
    let opts = edgevlm::EngineOptions {
        precision: edgevlm::Precision::BF16,
        ..Default::default()
    };
    let engine = edgevlm::Engine::load_dir(&dir, "tiny", opts).unwrap();
    let prepared = engine.prepare(&request(1)).unwrap();
    let bf16 = last_logits(&engine, &prepared);
    let f32 = last_logits(&tiny_engine("bf16-ref"), &prepared);
    let scale = max_abs(&f32);
    let d = max_abs_diff(&bf16, &f32);
    println!("bf16 vs f32 last-position logits: max |d| = {d:.4} (max |logit| {scale:.2})");
    assert!(
        d < 0.1 * scale,
        "bf16 logits too far from f32: {d} vs scale {scale}"
    );
}

#[test]
fn batched_decoding_answers_exactly_as_alone() {
    let engine = tiny_engine("batched");
    let reqs = eight_requests(12);
    let alone = generate_alone(&engine, &reqs);
    assert_eq!(generate_batched(&engine, &reqs), alone, "f32 tiny model");
    // 4-bit weights: the batch reads each weight once for all rows.
    let opts = edgevlm::EngineOptions {
        quantize: Some(edgevlm::quant::QuantSpec::new(4, 32).unwrap()),
        ..exact_options()
    };
    let q4 = edgevlm::Engine::load_dir(&tiny_model_dir("batched-q4"), "q4", opts).unwrap();
    let alone = generate_alone(&q4, &reqs);
    assert_eq!(generate_batched(&q4, &reqs), alone, "q4 tiny model");
    // And any subset, in any order, gives each request the same answer.
    let subset = vec![reqs[5].clone(), reqs[2].clone(), reqs[7].clone()];
    assert_eq!(
        generate_batched(&q4, &subset),
        vec![alone[5].clone(), alone[2].clone(), alone[7].clone()]
    );
}

/// A two-turn conversation about one image, as a chat client sends it: the second request repeats
/// the first turn, the answer and a new question.
fn conversation(first_answer: Option<&str>) -> edgevlm::ChatRequest {
    let img = fixtures().join("images/large.png").display().to_string();
    let mut req =
        edgevlm::ChatRequest::simple(Some("You describe images."), "Describe this image.", &[img]);
    if let Some(answer) = first_answer {
        req.messages.push(edgevlm::openai::ChatMessage {
            role: "assistant".into(),
            content: Some(edgevlm::openai::MessageContent::Text(answer.into())),
            name: None,
        });
        req.messages.push(edgevlm::openai::ChatMessage {
            role: "user".into(),
            content: Some(edgevlm::openai::MessageContent::Text(
                "What colour is the largest shape?".into(),
            )),
            name: None,
        });
    }
    req.max_tokens = Some(16);
    req
}

#[test]
fn the_reuse_cache_never_changes_an_answer() {
    let cached = edgevlm::Engine::load_dir(
        &tiny_model_dir("reuse-cached"),
        "tiny",
        edgevlm::EngineOptions {
            reuse_cache_bytes: 256 << 20,
            ..exact_options()
        },
    )
    .unwrap();
    let plain = tiny_engine("reuse-plain");
    let turn = |e: &edgevlm::Engine, r: &edgevlm::ChatRequest| {
        let p = e.prepare(r).unwrap();
        let out = e.generate(&p, &e.settings(r).unwrap(), |_, _| {}).unwrap();
        (out.text, out.tokens, out.timings)
    };
    let first = conversation(None);
    let (text, tokens, t1) = turn(&cached, &first);
    assert_eq!(tokens, turn(&plain, &first).1);
    assert_eq!(t1.reused_prompt_tokens, 0);
    // 13 tiles of 64 image tokens and the text: whole chunks of 256 positions are kept.
    assert!(cached.reuse_cache().used() > 0);
    let second = conversation(Some(&text));
    let (_, again, t2) = turn(&cached, &second);
    let (_, fresh, t0) = turn(&plain, &second);
    assert_eq!(
        again, fresh,
        "the second turn answers the same with the cache"
    );
    assert!(
        t2.reused_prompt_tokens >= 768,
        "{}",
        t2.reused_prompt_tokens
    );
    assert!(t2.image_encode_ms < 1.0, "the image is not encoded again");
    println!(
        "second turn: {} of {} prompt tokens reused; image {:.1} ms + prompt {:.1} ms (without the cache {:.1} + {:.1})",
        t2.reused_prompt_tokens,
        t2.prompt_tokens,
        t2.image_encode_ms,
        t2.prompt_ms,
        t0.image_encode_ms,
        t0.prompt_ms
    );
    // A different image in the same place shares only the text before it.
    let mut other = second.clone();
    if let Some(edgevlm::openai::MessageContent::Parts(parts)) = &mut other.messages[1].content {
        parts[0] = edgevlm::openai::ContentPart::ImageUrl {
            image_url: edgevlm::openai::ImageUrl::Plain(
                fixtures().join("images/wide.png").display().to_string(),
            ),
        };
    }
    let (_, o, t3) = turn(&cached, &other);
    assert_eq!(o, turn(&plain, &other).1);
    assert_eq!(
        t3.reused_prompt_tokens, 0,
        "the image comes within the first chunk"
    );
}

#[test]
fn a_reused_prefix_may_hold_whole_images() {
    // One tile per image, and a long first message: the first image lies wholly inside the reused
    // chunk, the second comes after it.
    let opts = |bytes| edgevlm::EngineOptions {
        reuse_cache_bytes: bytes,
        image_splitting: Some(false),
        ..exact_options()
    };
    let cached =
        edgevlm::Engine::load_dir(&tiny_model_dir("reuse-whole-cached"), "t", opts(64 << 20))
            .unwrap();
    let plain =
        edgevlm::Engine::load_dir(&tiny_model_dir("reuse-whole-plain"), "t", opts(0)).unwrap();
    let image = |name: &str| fixtures().join("images").join(name).display().to_string();
    let long = "Please look at this picture carefully and think about it. ".repeat(30);
    let mut first = edgevlm::ChatRequest::simple(None, &long, &[image("small.png")]);
    first.max_tokens = Some(8);
    let answer = |e: &edgevlm::Engine, r: &edgevlm::ChatRequest| {
        let p = e.prepare(r).unwrap();
        e.generate(&p, &e.settings(r).unwrap(), |_, _| {}).unwrap()
    };
    let a = answer(&cached, &first);
    let mut second = first.clone();
    second.messages.push(edgevlm::openai::ChatMessage {
        role: "assistant".into(),
        content: Some(edgevlm::openai::MessageContent::Text(a.text.clone())),
        name: None,
    });
    second.messages.push(edgevlm::openai::ChatMessage {
        role: "user".into(),
        content: Some(edgevlm::openai::MessageContent::Parts(vec![
            edgevlm::openai::ContentPart::ImageUrl {
                image_url: edgevlm::openai::ImageUrl::Plain(image("wide.png")),
            },
            edgevlm::openai::ContentPart::Text {
                text: "And this one?".into(),
            },
        ])),
        name: None,
    });
    let again = answer(&cached, &second);
    assert!(again.timings.reused_prompt_tokens >= 256);
    assert_eq!(again.tokens, answer(&plain, &second).tokens);
}
