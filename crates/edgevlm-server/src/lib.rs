//! edgevlm's OpenAI-compatible HTTP server: `POST /v1/chat/completions` (whole or streamed as
//! server-sent events), `GET /v1/models`, `GET /health` and a chat page at `/`.
//!
//! Thin by design: requests are parsed and prepared here (template, images, tokens, on a blocking
//! thread each, so several clients' images decode in parallel), then handed to the [`scheduler`],
//! which owns the model and batches every running answer's decode steps. The OpenAI mapping
//! (request validation, chunk and completion shapes) is the library's ([`edgevlm::openai`]), the
//! same the CLI uses.

mod audio;
pub mod error;
mod http;
mod page;
pub mod scheduler;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use edgevlm::Engine;

pub use error::ApiError;

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address to listen on (port 0: any free port; the bound address is printed).
    pub addr: SocketAddr,
    /// Clients must send `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
    /// The model's name in `/v1/models` and in responses; requests may name it or nothing.
    pub model_name: String,
    /// Answers generated at once (decode steps batched together).
    pub parallel: usize,
    /// Requests waiting beyond `parallel`; more are refused with 429.
    pub max_queue: usize,
    /// Largest request body in bytes (413 beyond).
    pub max_request_bytes: usize,
    /// How long a client may take to send its request body.
    pub body_timeout: Duration,
}

/// The engine once loaded (the server answers `/health` with 503 until then).
pub(crate) struct Shared {
    pub config: ServerConfig,
    pub engine: OnceLock<Arc<Engine>>,
    pub scheduler: OnceLock<scheduler::Scheduler>,
    pub load_error: OnceLock<String>,
    pub draining: std::sync::atomic::AtomicBool,
    /// Requests being prepared at once (image decoding is memory- and CPU-heavy).
    pub preparing: tokio::sync::Semaphore,
    pub started: u64,
}

/// Listen on `config.addr`, print the address, load the model with `load` meanwhile, and serve until
/// Ctrl-C or SIGTERM; then stop taking requests, finish the ones in flight and return.
pub fn serve<F>(config: ServerConfig, load: F) -> Result<(), String>
where
    F: FnOnce() -> edgevlm::Result<Engine> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    rt.block_on(http::run(config, load))
}
