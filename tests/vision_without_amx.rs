//! The vision encoder's 16-bit integer products (`kernels::fixed16`), the default path of CPUs with
//! AVX2 but no AMX, against transformers' f32 on the tiny model. Its own test binary: it turns AMX
//! off for the whole process before anything asks whether the CPU has it.

mod common;

use common::*;
use edgevlm::Engine;

#[test]
#[cfg_attr(
    shared_missing,
    ignore = "needs ../shared/models/smolvlm-256m-instruct (the real SmolVLM tokenizer files; see README)"
)]
fn sixteen_bit_vision_products_stay_close_to_transformers() {
    // The only test of this binary, so no other thread has read the variable yet.
    std::env::set_var("EDGEVLM_NO_AMX", "1");
    assert!(!edgevlm::kernels::amx::available());
    if !edgevlm::kernels::fixed16::available() {
        eprintln!("skipped: this CPU has no AVX2 (the vision products are f32 already)");
        return;
    }
    let dir = smolvlm_tiny_dir("fixed16");
    let exact = Engine::load_dir(&dir, "tiny-idefics3", exact_options()).unwrap();
    let fixed = Engine::load_dir(&dir, "tiny-idefics3", edgevlm::EngineOptions::default()).unwrap();
    let (de, df) = (
        masked_tile_feature_diff(&exact),
        masked_tile_feature_diff(&fixed),
    );
    println!("masked tile: max |Δfeature| f32 {de:.3e}, 16-bit products {df:.3e}");
    // The 16-bit products change the features (so they ran), by far less than the bf16 tiles'
    // bound of 2e-2 (7.9e-3 measured).
    assert!(de < 1e-4, "f32 features differ by {de}");
    assert!(
        df > de && df < 2e-3,
        "16-bit product features differ by {df}"
    );
}
