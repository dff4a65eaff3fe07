//! edgevlm: run small vision-language models (SmolVLM / Idefics3) locally and answer with OpenAI-style
//! chat completions.
//!
//! ```no_run
//! use edgevlm::{ChatRequest, Engine, EngineOptions};
//! let engine = Engine::load("HuggingFaceTB/SmolVLM-256M-Instruct", EngineOptions::default())?;
//! let req = ChatRequest::simple(None, "Describe this image.", &["photo.jpg".to_string()]);
//! let answer = engine.chat(&req)?;
//! println!("{}", answer.choices[0].message.content);
//! # Ok::<(), edgevlm::Error>(())
//! ```

pub mod audio;
pub mod config;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod image;
pub mod kernels;
pub mod limits;
pub mod model;
pub mod openai;
pub mod prompt;
pub mod quant;
pub mod sampling;
pub mod source;
pub mod speech;
pub mod template;
pub mod tokenizer;
pub mod weights;

pub use engine::{DeviceKind, Engine, EngineOptions, GenerationSettings, Precision, Timings};
pub use error::{Error, Result};
pub use limits::{ImageSources, Limits};
pub use openai::{ChatCompletion, ChatCompletionChunk, ChatRequest};
pub use source::DEFAULT_MODEL;
