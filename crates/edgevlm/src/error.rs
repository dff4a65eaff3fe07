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

    #[error("audio {source_name}: {message}")]
    Audio {
        source_name: String,
        message: String,
    },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    Template(String),

    #[error("invalid request: {0}")]
    Request(String),

    /// A request over one of the operator's [`crate::limits::Limits`].
    #[error("limit: {0}")]
    Limit(String),

    /// Tensors or ids handed to a model that do not fit it (a library caller's mistake).
    #[error("model input: {0}")]
    ModelInput(String),

    /// A broken invariant: a bug in edgevlm, never the caller's input.
    #[error("internal error (please report): {0}")]
    Internal(String),

    #[error("prompt is {prompt_tokens} tokens but the context holds {context} (max_tokens {max_tokens} included)")]
    ContextOverflow {
        prompt_tokens: usize,
        max_tokens: usize,
        context: usize,
    },

    #[error("device: {0}")]
    Device(String),

    /// A tensor operation failed; the message is candle's, on one line, without the backtrace candle
    /// attaches under `RUST_BACKTRACE` (which would cost a symbolisation and a screenful).
    #[error("tensor op: {0}")]
    Candle(String),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(candle_message(&e))
    }
}

/// candle's error as one line: backtraces dropped, context and path kept.
pub fn candle_message(e: &candle_core::Error) -> String {
    use candle_core::Error as C;
    match e {
        C::WithBacktrace { inner, .. } => candle_message(inner),
        C::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        C::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        C::WrappedContext { wrapped, context } => format!("{context}: {wrapped}"),
        other => one_line(other),
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.into(),
            message: one_line(message),
        }
    }
}

/// A message from another library (a decoder, a parser) on one line: line breaks become `; `.
pub fn one_line(message: impl std::fmt::Display) -> String {
    let s = message.to_string();
    if !s.contains(['\n', '\r']) {
        return s;
    }
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_errors_lose_their_backtrace() {
        let inner = candle_core::Error::Msg("shapes differ".into());
        let e = candle_core::Error::WithBacktrace {
            inner: Box::new(inner.context("in layer 3")),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        assert_eq!(
            Error::from(e).to_string(),
            "tensor op: in layer 3: shapes differ"
        );
    }
}
