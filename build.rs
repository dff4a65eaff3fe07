//! Build script of the workspace's test package: tells the tests whether the real SmolVLM-256M
//! tokenizer, template and processor files are beside the repository
//! (`../shared/models/smolvlm-256m-instruct`, see README). Where they are not, the tests that compare
//! against transformers' goldens made with them are compiled as ignored, with that reason, so the
//! runner reports them instead of passing them silently; under `CI=true` they run and fail, saying
//! what is missing.

use std::path::Path;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(shared_missing)");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-changed=build.rs");
    let root = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let tokenizer = Path::new(&root).join("../shared/models/smolvlm-256m-instruct/tokenizer.json");
    // A missing file makes cargo run this script again on every build, which is what notices the
    // files arriving.
    println!("cargo::rerun-if-changed={}", tokenizer.display());
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    if !tokenizer.is_file() && !ci {
        println!("cargo::rustc-cfg=shared_missing");
    }
}
