//! The `edgevlm` binary end to end, on the tiny model with the real SmolVLM tokenizer files.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tiny model's weights beside the real tokenizer files, linked into a scratch folder.
fn model_dir(name: &str) -> Option<PathBuf> {
    let shared = root().join("../shared/models/smolvlm-256m-instruct");
    if !shared.join("tokenizer.json").is_file() {
        eprintln!("SKIPPED: {} is absent", shared.display());
        return None;
    }
    let dir = root()
        .join("target/test-scratch")
        .join(format!("cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let tiny = root().join("models/tiny-idefics3");
    let files = [
        (tiny.join("config.json"), "config.json"),
        (
            tiny.join("generation_config.json"),
            "generation_config.json",
        ),
        (tiny.join("model.safetensors"), "model.safetensors"),
    ];
    for (src, dst) in files {
        std::fs::copy(src, dir.join(dst)).unwrap();
    }
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "preprocessor_config.json",
        "processor_config.json",
    ] {
        std::fs::copy(shared.join(f), dir.join(f)).unwrap();
    }
    Some(dir)
}

fn image(name: &str) -> String {
    root()
        .join("tests/fixtures/images")
        .join(name)
        .display()
        .to_string()
}

fn edgevlm(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgevlm"));
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "stderr is not one line: {err}"
    );
    assert!(err.starts_with("edgevlm: error: "), "{err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    assert!(out.stdout.is_empty(), "nothing half-written on stdout");
}

#[test]
fn json_answer_matches_the_streamed_answer() {
    let Some(dir) = model_dir("json") else { return };
    let d = dir.to_str().unwrap();
    let img = image("wide.png");
    let base = [
        "run",
        "--model",
        d,
        "--image",
        &img,
        "--prompt",
        "Describe this image.",
        "--max-tokens",
        "8",
    ];
    let out = edgevlm(&[&base[..], &["--json"]].concat(), None, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["prompt_tokens"], 344);
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();

    let out = edgevlm(
        &[&base[..], &["--verbose", "--threads", "1"]].concat(),
        None,
        &[],
    );
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{content}\n")
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("prompt: 344 tokens") && err.contains("tok/s"),
        "{err}"
    );
}

#[test]
fn prompt_from_stdin_and_request_file() {
    let Some(dir) = model_dir("stdin") else {
        return;
    };
    let d = dir.to_str().unwrap();
    let out = edgevlm(
        &["run", "--model", d, "--max-tokens", "3", "--json"],
        Some("What is 2+2?\n"),
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 15);

    let req = serde_json::json!({
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image_url", "image_url": {"url": image("small.png")}},
                {"type": "text", "text": " with "},
                {"type": "image_url", "image_url": {"url": format!("file://{}", image("tall.png"))}},
            ]},
            {"role": "assistant", "content": "They differ."},
            {"role": "user", "content": "How?"}
        ],
        "max_tokens": 4, "seed": 3, "temperature": 0.8, "top_k": 20, "logprobs": true, "top_logprobs": 2
    });
    let out = edgevlm(
        &["run", "--model", d, "--request", "-"],
        Some(&req.to_string()),
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert_eq!(
        v["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // Same seed, same answer.
    let again = edgevlm(
        &["run", "--model", d, "--request", "-"],
        Some(&req.to_string()),
        &[],
    );
    let w: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(v["choices"][0]["message"], w["choices"][0]["message"]);

    // "stream": true prints chat.completion.chunk lines.
    let mut streaming = req.clone();
    streaming["stream"] = serde_json::json!(true);
    let out = edgevlm(
        &["run", "--model", d, "--request", "-"],
        Some(&streaming.to_string()),
        &[],
    );
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let chunks: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(chunks.len() >= 3);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
}

#[test]
fn errors_are_one_line_with_nonzero_exit() {
    let Some(dir) = model_dir("errors") else {
        return;
    };
    let d = dir.to_str().unwrap();
    let out = edgevlm(
        &[
            "run",
            "--model",
            d,
            "--image",
            "/no/such.png",
            "--prompt",
            "x",
        ],
        None,
        &[],
    );
    assert_one_line_error(&out, "/no/such.png");

    let out = edgevlm(
        &["run", "--model", "/no/model/dir", "--prompt", "x"],
        None,
        &[],
    );
    assert_one_line_error(&out, "no such folder");

    let out = edgevlm(
        &[
            "run",
            "--model",
            d,
            "--prompt",
            "x",
            "--max-tokens",
            "99999",
        ],
        None,
        &[],
    );
    assert_one_line_error(&out, "context holds 4096");

    let out = edgevlm(
        &["run", "--model", d, "--request", "-"],
        Some("{\"messages\": ["),
        &[],
    );
    assert_one_line_error(&out, "request JSON");

    let out = edgevlm(
        &["run", "--model", d, "--device", "cuda", "--prompt", "x"],
        None,
        &[],
    );
    if !cfg!(feature = "cuda") {
        assert_one_line_error(&out, "cuda");
    }
}

#[test]
fn offline_without_a_cached_copy_says_how_to_pass_a_folder() {
    let home = root().join("target/test-scratch/empty-hf-home");
    std::fs::create_dir_all(&home).unwrap();
    let out = edgevlm(
        &["run", "--prompt", "x"],
        None,
        &[("HF_HUB_OFFLINE", "1"), ("HF_HOME", home.to_str().unwrap())],
    );
    assert_one_line_error(&out, "HF_HUB_OFFLINE");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HuggingFaceTB/SmolVLM-256M-Instruct") && err.contains("--model"),
        "{err}"
    );
}

/// The real SmolLM2-135M-Instruct GGUF, fetched by `scripts/fetch-smollm2.sh` (or `$EDGEVLM_SMOLLM2_GGUF`).
fn smollm2_gguf() -> String {
    if let Ok(p) = std::env::var("EDGEVLM_SMOLLM2_GGUF") {
        return p;
    }
    let out = Command::new("bash")
        .arg(root().join("scripts/fetch-smollm2.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/fetch-smollm2.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn gguf_text_model_answers_from_the_command_line() {
    let gguf = smollm2_gguf();
    let out = edgevlm(
        &[
            "run",
            "--model",
            &gguf,
            "--prompt",
            "What is the capital of France?",
            "--max-tokens",
            "16",
            "--json",
        ],
        None,
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "The capital of France is Paris."
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 37);
    assert_eq!(v["model"], "SmolLM2-135M-Instruct.Q4_1");

    let img = image("wide.png");
    let out = edgevlm(
        &[
            "run",
            "--model",
            &gguf,
            "--image",
            &img,
            "--prompt",
            "What is this?",
        ],
        None,
        &[],
    );
    assert_one_line_error(&out, "text-only");
}
