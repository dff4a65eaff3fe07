//! `cargo bench --bench pipeline`: wall-clock medians of the image processor and of the tiny model's
//! vision, prefill and decode passes. Speed targets live here and in the CLI, never in unit tests.
//! Set `EDGEVLM_BENCH_MODEL=DIR` to time a full-size model folder instead of the tiny one.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::Instant;

use edgevlm::image::load_image_path;
use edgevlm::model::idefics3::process_image;
use edgevlm::prompt::PromptText;
use edgevlm::{Engine, EngineOptions};

fn median_ms(mut f: impl FnMut(), reps: usize) -> f64 {
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn model_dir() -> PathBuf {
    match std::env::var("EDGEVLM_BENCH_MODEL") {
        Ok(d) => PathBuf::from(d),
        Err(_) => common::tiny_model_dir("bench"),
    }
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let img = load_image_path(
        &root.join("tests/fixtures/images/large.png"),
        &Default::default(),
    )
    .expect("fixture image");
    let dir = model_dir();
    let engine = Engine::load_dir(&dir, "bench", EngineOptions::default()).expect("load model");
    let smolvlm: &edgevlm::model::idefics3::Idefics3Vlm = engine
        .model()
        .vision()
        .and_then(|v| v.as_any().downcast_ref())
        .expect("a SmolVLM model");
    let cfg = smolvlm.image.clone();
    let ms = median_ms(|| drop(process_image(&img, &cfg, true).unwrap()), 5);
    println!("image processor, 2300x1500 PNG -> 13 tiles: {ms:.1} ms");

    let p = process_image(&img, &cfg, true).unwrap();
    let one = edgevlm::model::family::EncoderInput {
        pixel_values: p.pixel_values[..3 * p.height * p.width].to_vec(),
        layout: edgevlm::model::family::ImageLayout {
            units: 1,
            tokens: cfg.image_seq_len,
            shape: [0, 0, p.height, p.width],
        },
    };
    let ms = median_ms(
        || drop(engine.encode_images(std::slice::from_ref(&one)).unwrap()),
        3,
    );
    println!("vision encoder + connector, one 512x512 tile: {ms:.1} ms");

    let prompt = engine
        .prepare_with_images(&PromptText::template("word ".repeat(500)), &[])
        .expect("tokenize");
    let ids = &prompt.ids[..512.min(prompt.ids.len())];
    let model = engine.model();
    let ms = median_ms(
        || {
            let mut cache = model.text().new_cache(ids.len());
            let e = model.embed_prompt(ids, None).unwrap();
            drop(model.text().forward(&e, &mut cache, false).unwrap());
        },
        3,
    );
    println!(
        "prefill {} tokens: {ms:.1} ms ({:.0} tokens/s)",
        ids.len(),
        ids.len() as f64 / ms * 1e3
    );

    let steps = 64;
    let mut cache = model.text().new_cache(ids.len() + steps);
    let e = model.embed_prompt(ids, None).unwrap();
    model.text().forward(&e, &mut cache, false).unwrap();
    let t = Instant::now();
    for i in 0..steps {
        let e = model.embed_prompt(&[ids[i % ids.len()]], None).unwrap();
        model.text().forward(&e, &mut cache, false).unwrap();
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "decode {steps} tokens after a {}-token prompt: {:.0} tokens/s",
        ids.len(),
        steps as f64 / ms * 1e3
    );
}
