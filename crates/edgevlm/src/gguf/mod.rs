//! GGUF files (llama.cpp's format): metadata, tokenizer and tensors of a llama-architecture model.
//!
//! The header is parsed by candle's bounds-checked reader; tensor data stays memory-mapped, and every
//! tensor's byte range is checked against the file's length at open, so a truncated file fails with the
//! tensor named instead of reading past its end.

mod llama;
mod tokenizer;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use memmap2::Mmap;

use crate::error::{candle_message, Error, Result};

pub use llama::{llama_config, load_llama};
pub use tokenizer::tokenizer_from_gguf;

/// One tensor's place in the file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub dtype: GgmlDType,
    /// Row-major dimensions, outermost first (GGUF stores them innermost first).
    pub shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    metadata: HashMap<String, Value>,
    tensors: HashMap<String, TensorEntry>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::file(path, e))?;
        let content = Content::read(&mut file).map_err(|e| {
            Error::file(
                path,
                format!("not a readable GGUF file: {}", candle_message(&e)),
            )
        })?;
        // SAFETY: the file is opened read-only; a concurrent writer could change the bytes under us, as
        // with any memory-mapped model file (llama.cpp and candle map weights the same way).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::file(path, e))?;
        let len = mmap.len();
        let mut tensors = HashMap::with_capacity(content.tensor_infos.len());
        // In file order, so that a truncated file names the first tensor it cuts (the metadata's own
        // map iterates in no fixed order).
        let mut infos: Vec<_> = content.tensor_infos.iter().collect();
        infos.sort_by_key(|(name, info)| (info.offset, name.as_str()));
        for (name, info) in infos {
            let shape = info.shape.dims().to_vec();
            let bad = |message: String| Error::Tensor {
                tensor: name.clone(),
                file: path.display().to_string(),
                message,
            };
            let block = info.ggml_dtype.block_size();
            let inner = shape.last().copied().unwrap_or(1);
            if !inner.is_multiple_of(block) {
                return Err(bad(format!(
                    "{:?} rows of {inner} values are not whole blocks of {block}",
                    info.ggml_dtype
                )));
            }
            // Sizes from the file are checked, never trusted to fit: a crafted shape or offset must
            // not wrap around.
            let bytes = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .and_then(|elems| (elems / block).checked_mul(info.ggml_dtype.type_size()));
            let start = usize::try_from(content.tensor_data_offset)
                .ok()
                .zip(usize::try_from(info.offset).ok())
                .and_then(|(a, b)| a.checked_add(b));
            let (Some(bytes), Some(start)) = (bytes, start) else {
                return Err(bad(format!(
                    "shape {shape:?} at offset {} does not fit in memory",
                    info.offset
                )));
            };
            let end = start.saturating_add(bytes);
            if end > len {
                return Err(bad(format!(
                    "data runs to byte {end} but the file has {len} bytes (truncated?)"
                )));
            }
            tensors.insert(
                name.clone(),
                TensorEntry {
                    dtype: info.ggml_dtype,
                    shape,
                    start,
                    end,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            metadata: content.metadata,
            tensors,
        })
    }

    /// Forget the tokenizer's vocabulary, merges and token types (tens of thousands of strings, several
    /// MB), once the tokenizer is built.
    pub fn drop_tokenizer_metadata(&mut self) {
        for key in [
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores",
        ] {
            self.metadata.remove(key);
        }
        self.metadata.shrink_to_fit();
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.metadata
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A tensor's type, shape and bytes.
    pub fn tensor(&self, name: &str) -> Result<(&TensorEntry, &[u8])> {
        let e = self.tensors.get(name).ok_or_else(|| Error::Tensor {
            tensor: name.to_string(),
            file: self.path.display().to_string(),
            message: "missing".into(),
        })?;
        Ok((e, &self.mmap[e.start..e.end]))
    }

    /// Let the OS drop tensor `name`'s pages from this process once its bytes have been converted, so
    /// that loading never holds the whole file and the converted weights in memory at once.
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Some(e) = self.tensors.get(name) {
            // SAFETY: the map is a read-only, private mapping of a file: dropped pages are read back
            // from the file, unchanged, if anything touches them again. A failure only costs memory.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    e.start,
                    e.end - e.start,
                )
            };
        }
        #[cfg(not(unix))]
        let _ = name;
    }

    /// An error about tensor `name` in this file.
    pub fn tensor_error(&self, name: &str, message: impl Into<String>) -> Error {
        Error::Tensor {
            tensor: name.to_string(),
            file: self.path.display().to_string(),
            message: message.into(),
        }
    }

    fn meta_error(&self, key: &str, message: &str) -> Error {
        Error::file(&self.path, format!("metadata `{key}`: {message}"))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.meta_error(key, "is not a string")),
        }
    }

    /// An unsigned integer of any width.
    pub fn get_usize(&self, key: &str) -> Result<Option<usize>> {
        let v = match self.metadata.get(key) {
            None => return Ok(None),
            Some(v) => v,
        };
        let n: i128 = match v {
            Value::U8(x) => (*x).into(),
            Value::I8(x) => (*x).into(),
            Value::U16(x) => (*x).into(),
            Value::I16(x) => (*x).into(),
            Value::U32(x) => (*x).into(),
            Value::I32(x) => (*x).into(),
            Value::U64(x) => (*x).into(),
            Value::I64(x) => (*x).into(),
            _ => return Err(self.meta_error(key, "is not an integer")),
        };
        usize::try_from(n)
            .map(Some)
            .map_err(|_| self.meta_error(key, "is negative or too large"))
    }

    pub fn require_usize(&self, key: &str) -> Result<usize> {
        self.get_usize(key)?
            .ok_or_else(|| self.meta_error(key, "missing"))
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(f64::from(*x))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(_) => Err(self.meta_error(key, "is not a float")),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.meta_error(key, "is not a boolean")),
        }
    }

    /// An array of strings (`tokenizer.ggml.tokens`, `tokenizer.ggml.merges`).
    pub fn get_strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    _ => Err(self.meta_error(key, "holds a non-string")),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(self.meta_error(key, "is not an array")),
        }
    }

    /// An array of integers (`tokenizer.ggml.token_type`).
    pub fn get_ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::I32(x) => Ok(i64::from(*x)),
                    Value::U32(x) => Ok(i64::from(*x)),
                    Value::I8(x) => Ok(i64::from(*x)),
                    Value::U8(x) => Ok(i64::from(*x)),
                    Value::I64(x) => Ok(*x),
                    _ => Err(self.meta_error(key, "holds a non-integer")),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(self.meta_error(key, "is not an array")),
        }
    }
}
