//! The engine's error type: every variant renders as one line that says what went wrong and where.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },

    #[error("config: {0}")]
    Config(String),

    #[error("unsupported: {0}")]
    Unsupported(String),

    #[error("weights: tensor `{tensor}` in {file}: {message}")]
    Tensor {
        tensor: String,
        file: String,
        message: String,
    },

    #[error("weights: {0}")]
    Weights(String),

    #[error("model source: {0}")]
    Source(String),

    #[error("image {source_name}: {message}")]
    Image {
        source_name: String,
        message: String,
    },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    Template(String),

    #[error("invalid request: {0}")]
    Request(String),

    #[error("prompt is {prompt_tokens} tokens but the context holds {context} (max_tokens {max_tokens} included)")]
    ContextOverflow {
        prompt_tokens: usize,
        max_tokens: usize,
        context: usize,
    },

    #[error("device: {0}")]
    Device(String),

    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.into(),
            message: message.to_string(),
        }
    }
}
