//! Routes, authentication, body limits and the two response forms (one JSON object, or server-sent
//! events ending in `data: [DONE]`).

use std::convert::Infallible;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use edgevlm::openai::{ChatRequest, CompletionBuilder, TokenLogprob, Usage};
use edgevlm::Engine;
use serde_json::json;
use tokio::sync::mpsc;
use tower::ServiceExt as _;

use crate::error::ApiError;
use crate::scheduler::{Event, Job, Scheduler};
use crate::{ServerConfig, Shared};

pub async fn run<F>(config: ServerConfig, load: F) -> Result<(), String>
where
    F: FnOnce() -> edgevlm::Result<Engine> + Send + 'static,
{
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.addr))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    let shared = Arc::new(Shared {
        config: config.clone(),
        engine: OnceLock::new(),
        scheduler: OnceLock::new(),
        load_error: OnceLock::new(),
        draining: Default::default(),
        preparing: tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        ),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    // The address first (scripts wait for this line), then the model loads while `/health` says so.
    println!("edgevlm: listening on http://{addr}");
    let _ = std::io::stdout().flush();
    let loading = shared.clone();
    std::thread::spawn(move || {
        let t0 = Instant::now();
        match load() {
            Ok(engine) => {
                let engine = Arc::new(engine);
                let scheduler = Scheduler::start(
                    engine.clone(),
                    loading.config.parallel,
                    loading.config.max_queue,
                );
                let _ = loading.scheduler.set(scheduler);
                let _ = loading.engine.set(engine);
                tracing::info!(
                    "model `{}` loaded in {:.1} s; ready",
                    loading.config.model_name,
                    t0.elapsed().as_secs_f64()
                );
            }
            Err(e) => {
                tracing::error!("loading the model failed: {e}");
                let _ = loading.load_error.set(e.to_string());
            }
        }
    });

    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route(
            "/v1/audio/transcriptions",
            post(crate::audio::transcriptions),
        )
        .route_layer(middleware::from_fn_with_state(shared.clone(), authenticate));
    let app = Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/", get(crate::page::chat_page))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(config.max_request_bytes))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            config.body_timeout,
        ))
        .with_state(shared.clone());
    // hyper's HTTP/1 server with a timer, so that a client sending its headers slowly is cut off
    // (axum::serve sets none), and graceful shutdown: stop accepting, let every open connection
    // finish the request it is answering.
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut signal = std::pin::pin!(shutdown_signal());
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut signal => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(
            app.clone()
                .map_request(|r: Request<hyper::body::Incoming>| r.map(Body::new)),
        );
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(config.body_timeout);
        let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    shared.draining.store(true, Ordering::SeqCst);
    tracing::info!("shutting down: finishing the requests in flight");
    graceful.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

async fn authenticate(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if let Some(key) = &shared.config.api_key {
        let sent = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if sent != Some(key.as_str()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

async fn not_found() -> ApiError {
    ApiError::not_found(
        "no such route (POST /v1/chat/completions, POST /v1/audio/transcriptions, GET /v1/models, GET /health, GET /)",
    )
}

/// The engine and scheduler, or why there are none yet.
pub(crate) fn ready(shared: &Shared) -> Result<(Arc<Engine>, Scheduler), ApiError> {
    if shared.draining.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable(
            "the server is shutting down",
            "shutting_down",
        ));
    }
    match (shared.engine.get(), shared.scheduler.get()) {
        (Some(e), Some(s)) => Ok((e.clone(), s.clone())),
        _ => Err(match shared.load_error.get() {
            Some(e) => ApiError::internal(format!("the model failed to load: {e}")),
            None => ApiError::unavailable("the model is still loading; retry shortly", "loading"),
        }),
    }
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    match ready(&shared) {
        Ok((_, scheduler)) => Json(json!({
            "status": "ok",
            "model": shared.config.model_name,
            "requests": scheduler.load(),
        }))
        .into_response(),
        Err(e) => {
            let status = if shared.load_error.get().is_some() {
                "error"
            } else if shared.draining.load(Ordering::SeqCst) {
                "draining"
            } else {
                "loading"
            };
            (
                e.status,
                Json(json!({"status": status, "error": e.body()["error"]})),
            )
                .into_response()
        }
    }
}

async fn models(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": shared.config.model_name,
            "object": "model",
            "created": shared.started,
            "owned_by": "edgevlm",
        }],
    }))
}

async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let t0 = Instant::now();
    respond("POST /v1/chat/completions", t0, answer(&shared, body).await)
}

/// A handler's result as a response, a refusal logged with its status and time.
pub(crate) fn respond(route: &str, t0: Instant, result: Result<Response, ApiError>) -> Response {
    match result {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(
                "{route} {} in {:.0} ms: {}",
                e.status.as_u16(),
                t0.elapsed().as_secs_f64() * 1e3,
                e.message
            );
            e.into_response()
        }
    }
}

async fn answer(
    shared: &Arc<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (engine, scheduler) = ready(shared)?;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(shared.config.max_request_bytes)
        } else {
            ApiError::bad_request(format!("reading the request body: {}", e.body_text()))
        }
    })?;
    let req: ChatRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("request JSON: {e}")))?;
    if let Some(m) = &req.model {
        if m != &shared.config.model_name {
            return Err(ApiError::not_found(format!(
                "the model `{m}` does not exist: this server serves `{}`",
                shared.config.model_name
            ))
            .with_code("model_not_found")
            .with_param("model"));
        }
    }
    let ignored = req.ignored_fields();
    if !ignored.is_empty() {
        tracing::debug!("ignoring request fields {ignored:?}");
    }
    // A place in the queue first: preparing (decoding images) is work a full server must not take on.
    let ticket = scheduler.reserve()?;
    // Template, images and tokens on a blocking thread, as many at once as there are cores.
    let permit = shared
        .preparing
        .acquire()
        .await
        .map_err(|_| ApiError::unavailable("the server is shutting down", "shutting_down"))?;
    let (req, prepared, settings) = {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || {
            let settings = engine.settings(&req)?;
            let prepared = engine.prepare(&req)?;
            engine.completion_budget(&prepared, &settings)?;
            Ok::<_, edgevlm::Error>((req, prepared, settings))
        })
        .await
        .map_err(|e| ApiError::internal(format!("request preparation stopped: {e}")))??
    };
    drop(permit);
    let prompt_tokens = prepared.ids.len();
    let builder = CompletionBuilder::new(&shared.config.model_name, &req);
    let (tx, mut rx) = mpsc::unbounded_channel();
    scheduler.submit(
        ticket,
        Job {
            prepared,
            settings,
            events: tx,
        },
    )?;
    // The first event decides the status: an answer, or an error before any text.
    let first = rx
        .recv()
        .await
        .ok_or_else(|| ApiError::internal("the scheduler stopped"))?;
    if let Event::Failed(e) = first {
        return Err(e);
    }
    if req.stream == Some(true) {
        Ok(sse(builder, prompt_tokens, first, rx))
    } else {
        whole(builder, prompt_tokens, first, rx).await
    }
}

async fn whole(
    builder: CompletionBuilder,
    prompt_tokens: usize,
    first: Event,
    mut rx: mpsc::UnboundedReceiver<Event>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut logprobs: Vec<TokenLogprob> = Vec::new();
    let mut event = Some(first);
    loop {
        match event.take() {
            Some(Event::Piece(p)) => {
                text.push_str(&p.text);
                logprobs.extend(p.logprobs);
            }
            Some(Event::Done {
                finish,
                completion_tokens,
                timings,
            }) => {
                tracing::info!(
                    "POST /v1/chat/completions 200: {prompt_tokens} prompt tokens ({} reused), {completion_tokens} generated, first token after {:.0} ms",
                    timings.reused_prompt_tokens,
                    timings.image_preprocess_ms + timings.image_encode_ms + timings.prompt_ms
                );
                let usage = Usage::new(
                    prompt_tokens,
                    completion_tokens,
                    timings.reused_prompt_tokens,
                );
                let c = builder.completion(text, finish, logprobs, usage);
                return Ok(Json(c).into_response());
            }
            Some(Event::Failed(e)) => return Err(e),
            None => {}
        }
        event = Some(
            rx.recv()
                .await
                .ok_or_else(|| ApiError::internal("the scheduler stopped"))?,
        );
    }
}

/// One server-sent event.
fn data(json: &impl serde::Serialize) -> Bytes {
    let body = serde_json::to_string(json).unwrap_or_else(|e| {
        json!({"error": {"message": format!("encoding a chunk: {e}"), "type": "server_error"}})
            .to_string()
    });
    Bytes::from(format!("data: {body}\n\n"))
}

/// The answer as server-sent events: the role chunk, text chunks, the closing chunks, `[DONE]`.
/// When the client hangs up, the stream and with it the request's channel are dropped, and the
/// scheduler frees the slot at its next step.
fn sse(
    builder: CompletionBuilder,
    prompt_tokens: usize,
    first: Event,
    rx: mpsc::UnboundedReceiver<Event>,
) -> Response {
    enum St {
        Role(Event),
        Next(Option<Event>),
        Done,
    }
    let stream = futures_util::stream::unfold(
        (St::Role(first), rx, builder),
        move |(state, mut rx, builder)| async move {
            let (out, next) = match state {
                St::Done => return None,
                St::Role(first) => (data(&builder.role_chunk()), St::Next(Some(first))),
                St::Next(pending) => {
                    let event = match pending {
                        Some(e) => Some(e),
                        None => rx.recv().await,
                    };
                    match event {
                        Some(Event::Piece(p)) => (
                            data(&builder.text_chunk(p.text, p.logprobs)),
                            St::Next(None),
                        ),
                        Some(Event::Done {
                            finish,
                            completion_tokens,
                            timings,
                        }) => {
                            let mut out = Vec::new();
                            let usage = Usage::new(
                                prompt_tokens,
                                completion_tokens,
                                timings.reused_prompt_tokens,
                            );
                            for c in builder.finish_chunks(finish, usage) {
                                out.extend_from_slice(&data(&c));
                            }
                            out.extend_from_slice(b"data: [DONE]\n\n");
                            (Bytes::from(out), St::Done)
                        }
                        Some(Event::Failed(e)) => {
                            let mut out = data(&e.body()).to_vec();
                            out.extend_from_slice(b"data: [DONE]\n\n");
                            (Bytes::from(out), St::Done)
                        }
                        None => return None,
                    }
                }
            };
            Some((Ok::<_, Infallible>(out), (next, rx, builder)))
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| ApiError::internal("building the stream").into_response())
}
