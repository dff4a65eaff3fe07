//! `POST /v1/audio/transcriptions`: OpenAI's speech-to-text endpoint (multipart form: `file`,
//! `model`, `language`, `prompt`, `temperature`, `response_format`), answered by the engine's speech
//! model.

use std::sync::Arc;

use axum::extract::{Multipart, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use edgevlm::audio::{decode_wav, AudioLimits};
use edgevlm::speech::format::{render, ResponseFormat};
use edgevlm::speech::TranscribeOptions;

use crate::error::ApiError;
use crate::http::{ready, respond};
use crate::Shared;

/// Model names a transcription request may give: the speech model's folder name, or OpenAI's
/// `whisper-1` (clients hard-code it).
fn accepted_model(name: &str, speech_dir: &std::path::Path) -> bool {
    name == "whisper-1"
        || speech_dir
            .file_name()
            .is_some_and(|f| f.to_string_lossy() == name)
}

pub async fn transcriptions(
    State(shared): State<Arc<Shared>>,
    form: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    let t0 = std::time::Instant::now();
    respond(
        "POST /v1/audio/transcriptions",
        t0,
        transcribe(&shared, form).await,
    )
}

async fn transcribe(
    shared: &Arc<Shared>,
    form: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let (engine, _) = ready(shared)?;
    if engine.speech().is_none() {
        return Err(ApiError::not_found(
            "this server has no speech model (start it with --speech-model)",
        ));
    }
    let mut form =
        form.map_err(|e| ApiError::bad_request(format!("multipart form: {}", e.body_text())))?;
    let mut file: Option<(String, Vec<u8>)> = None;
    let mut model = None;
    let mut options = TranscribeOptions::default();
    let mut format = ResponseFormat::Json;
    let field_error = |e: axum::extract::multipart::MultipartError| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(shared.config.max_request_bytes)
        } else {
            ApiError::bad_request(format!("multipart form: {}", e.body_text()))
        }
    };
    while let Some(field) = form.next_field().await.map_err(field_error)? {
        let name = field.name().unwrap_or("").to_string();
        if name == "file" {
            let filename = field.file_name().unwrap_or("file").to_string();
            let bytes = field.bytes().await.map_err(field_error)?;
            file = Some((filename, bytes.to_vec()));
            continue;
        }
        let value = field.text().await.map_err(field_error)?;
        match name.as_str() {
            "model" => model = Some(value),
            "language" if !value.is_empty() => options.language = Some(value),
            "prompt" if !value.is_empty() => options.initial_prompt = Some(value),
            "temperature" => {
                let t: f32 = value
                    .trim()
                    .parse()
                    .ok()
                    .filter(|t: &f32| (0.0..=1.0).contains(t))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "temperature `{value}` is not a number from 0 to 1"
                        ))
                        .with_param("temperature")
                    })?;
                // OpenAI: 0 lets the model raise it (the fallback); another value is used as is.
                if t > 0.0 {
                    options.temperatures = vec![t];
                }
            }
            "response_format" => {
                format = ResponseFormat::parse(&value)
                    .map_err(|e| ApiError::from(e).with_param("response_format"))?
            }
            // Fields we cannot honour change the answer: refused, not ignored.
            "timestamp_granularities[]" | "timestamp_granularities" if value != "segment" => {
                return Err(ApiError::bad_request(
                    "timestamp_granularities: only `segment` is supported",
                )
                .with_param("timestamp_granularities"))
            }
            "stream" if value == "true" => {
                return Err(ApiError::bad_request(
                    "stream: streamed transcriptions are not supported",
                )
                .with_param("stream"))
            }
            _ => {}
        }
    }
    let (filename, bytes) =
        file.ok_or_else(|| ApiError::bad_request("the form has no `file`").with_param("file"))?;
    let model = model
        .ok_or_else(|| ApiError::bad_request("the form has no `model`").with_param("model"))?;
    let speech_dir = engine
        .speech()
        .map(|s| s.dir().to_path_buf())
        .unwrap_or_default();
    if !accepted_model(&model, &speech_dir) {
        return Err(ApiError::not_found(format!(
            "the model `{model}` does not exist: this server transcribes with `whisper-1` ({})",
            speech_dir.display()
        ))
        .with_code("model_not_found")
        .with_param("model"));
    }
    let permit = shared
        .preparing
        .acquire()
        .await
        .map_err(|_| ApiError::unavailable("the server is shutting down", "shutting_down"))?;
    let transcript = tokio::task::spawn_blocking(move || {
        let audio = decode_wav(&bytes, &filename, &AudioLimits::default())?;
        let speech = engine
            .speech()
            .ok_or_else(|| edgevlm::Error::Internal("the speech model went away".into()))?;
        speech.transcribe(&audio, &options)
    })
    .await
    .map_err(|e| ApiError::internal(format!("transcription stopped: {e}")))??;
    drop(permit);
    let body = render(&transcript, format);
    Ok(([(header::CONTENT_TYPE, format.content_type())], body).into_response())
}
