//! Memory-mapped safetensors checkpoints (single file or sharded with `model.safetensors.index.json`).
//!
//! The header of every file is parsed once and checked against the file's length, so a truncated or
//! corrupt file fails at load with the tensor and file named, never with a panic or garbage numbers.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use serde_json::Value;

use crate::error::{Error, Result};

/// Where one tensor lives.
#[derive(Clone, Debug)]
struct Entry {
    file: usize,
    dtype: DType,
    /// The shape callers see (for an mlx-vlm conv weight, PyTorch's `(out, in, kh, kw)`).
    shape: Vec<usize>,
    /// An mlx-vlm conv weight stored `(out, kh, kw, in)`: read back in `shape`'s order.
    channels_last: bool,
    /// Byte range in the file.
    start: usize,
    end: usize,
}

/// All tensors of a checkpoint, by name.
pub struct WeightStore {
    files: Vec<(PathBuf, Mmap)>,
    entries: HashMap<String, Entry>,
}

fn safetensors_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I64" => DType::I64,
        _ => return None,
    })
}

impl WeightStore {
    /// Open every `*.safetensors` file a model folder holds: the shards named in
    /// `model.safetensors.index.json` when it exists, else `model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::file(&index, e))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| Error::file(&index, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::file(&index, "no `weight_map` object"))?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect();
            shards.sort();
            shards.dedup();
            for s in &shards {
                if s.contains("..") || Path::new(s).is_absolute() {
                    return Err(Error::file(
                        &index,
                        format!("shard name `{s}` leaves the model folder"),
                    ));
                }
            }
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(Error::file(
                    dir,
                    "no model.safetensors or model.safetensors.index.json in this folder",
                ));
            }
            vec![single]
        };
        Self::open_files(&files)
    }

    /// Open the given safetensors files; a tensor name may appear in only one of them. A checkpoint in
    /// mlx-vlm's Idefics3 layout (no `model.` names, a `language_model.` tree) is read under the
    /// Hugging Face names ([`hf_name_from_mlx_vlm`]), its channels-last patch conv in PyTorch's order.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| Error::file(path, e))?;
            // SAFETY: the map is read-only; a file modified while mapped is outside what we can defend
            // against (the same contract as every mmap-based loader, safetensors' own included).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::file(path, e))?;
            for (name, entry) in parse_header(path, &mmap, i)? {
                if entries.insert(name.clone(), entry).is_some() {
                    return Err(Error::file(
                        path,
                        format!("tensor `{name}` appears in two shards"),
                    ));
                }
            }
            files.push((path.clone(), mmap));
        }
        if !entries.keys().any(|k| k.starts_with("model."))
            && entries.keys().any(|k| k.starts_with("language_model."))
        {
            entries = entries
                .into_iter()
                .map(|(name, mut e)| {
                    let sh = &e.shape;
                    if name.ends_with("patch_embedding.weight")
                        && sh.len() == 4
                        && sh[1] == sh[2]
                        && sh[3] < sh[1]
                    {
                        e.shape = vec![sh[0], sh[3], sh[1], sh[2]];
                        e.channels_last = true;
                    } else if name.ends_with("patch_embed.proj.weight")
                        && sh.len() == 5
                        && sh[2] == sh[3]
                        && sh[4] < sh[2]
                    {
                        // Qwen2-VL's Conv3d, (out, t, kh, kw, in) in MLX.
                        e.shape = vec![sh[0], sh[4], sh[1], sh[2], sh[3]];
                        e.channels_last = true;
                    }
                    (hf_name_from_mlx_vlm(&name).unwrap_or(name), e)
                })
                .collect();
        }
        Ok(Self { files, entries })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    fn file_name(&self, e: &Entry) -> String {
        self.files[e.file].0.display().to_string()
    }

    /// The stored dtype, shape and bytes of `name` (for packed quantized tensors).
    pub fn raw(&self, name: &str) -> Result<(DType, &[usize], &[u8])> {
        let e = self.entries.get(name).ok_or_else(|| Error::Tensor {
            tensor: name.to_string(),
            file: self
                .files
                .iter()
                .map(|f| f.0.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            message: "missing".to_string(),
        })?;
        Ok((e.dtype, &e.shape, &self.files[e.file].1[e.start..e.end]))
    }

    /// Drop the mapped pages of `name` from this process's memory once its values have been copied
    /// out: a model loaded tensor by tensor then never holds the whole mapped file resident beside
    /// its converted weights.
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Some(e) = self.entries.get(name) {
            // SAFETY: the map is a read-only, private mapping of a file: dropped pages are read back
            // from the file, unchanged, if anything touches them again. A failure only costs memory.
            let _ = unsafe {
                self.files[e.file].1.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    e.start,
                    e.end - e.start,
                )
            };
        }
        #[cfg(not(unix))]
        let _ = name;
    }

    /// The file that holds `name`, for error messages.
    pub fn file_of(&self, name: &str) -> String {
        self.entries
            .get(name)
            .map(|e| self.file_name(e))
            .unwrap_or_default()
    }

    /// Load `name`, check it has `shape`, convert to `dtype` on `device`.
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let e = self.float_entry(name, shape)?;
        let bytes = &self.files[e.file].1[e.start..e.end];
        let t = if e.channels_last && shape.len() == 5 {
            let [o, i, t, kh, kw] = [shape[0], shape[1], shape[2], shape[3], shape[4]];
            Tensor::from_raw_buffer(bytes, e.dtype, &[o, t, kh, kw, i], &Device::Cpu)?
                .permute((0, 4, 1, 2, 3))?
                .contiguous()?
        } else if e.channels_last {
            let [o, i, kh, kw] = [shape[0], shape[1], shape[2], shape[3]];
            Tensor::from_raw_buffer(bytes, e.dtype, &[o, kh, kw, i], &Device::Cpu)?
                .permute((0, 3, 1, 2))?
                .contiguous()?
        } else {
            Tensor::from_raw_buffer(bytes, e.dtype, shape, &Device::Cpu)?
        };
        self.release(name);
        let t = if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        };
        Ok(t.to_device(device)?)
    }

    /// A `(rows, cols)` floating-point tensor read as f32 a block of rows at a time, straight from the
    /// mapped file (for quantizing while loading without an f32 copy of the whole tensor). Call
    /// [`Self::release`] once done.
    pub fn float_rows(&self, name: &str, shape: [usize; 2]) -> Result<FloatRows<'_>> {
        let e = self.float_entry(name, &shape)?;
        Ok(FloatRows {
            dtype: e.dtype,
            cols: shape[1],
            bytes: &self.files[e.file].1[e.start..e.end],
        })
    }

    /// The entry of `name`, checked to have `shape` and a floating-point dtype.
    fn float_entry(&self, name: &str, shape: &[usize]) -> Result<&Entry> {
        let e = self.entries.get(name).ok_or_else(|| {
            let files: Vec<String> = self
                .files
                .iter()
                .map(|f| f.0.display().to_string())
                .collect();
            Error::Tensor {
                tensor: name.to_string(),
                file: files.join(", "),
                message: "missing".to_string(),
            }
        })?;
        if e.shape != shape {
            return Err(Error::Tensor {
                tensor: name.to_string(),
                file: self.file_name(e),
                message: format!("shape {:?}, expected {:?}", e.shape, shape),
            });
        }
        if !matches!(e.dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
            return Err(Error::Tensor {
                tensor: name.to_string(),
                file: self.file_name(e),
                message: format!("dtype {:?} is not a floating-point weight", e.dtype),
            });
        }
        Ok(e)
    }
}

/// A stored floating-point matrix read as f32 rows ([`WeightStore::float_rows`]).
pub struct FloatRows<'a> {
    dtype: DType,
    cols: usize,
    bytes: &'a [u8],
}

impl FloatRows<'_> {
    /// Rows `r0..` into `out` (as many rows as it holds), in f32: exact from f32, f16 and bf16, rounded
    /// from f64. Panics past the last row (callers size blocks from the same shape).
    pub fn fill(&self, r0: usize, out: &mut [f32]) {
        let size = self.dtype.size_in_bytes();
        let src = &self.bytes[r0 * self.cols * size..][..out.len() * size];
        match self.dtype {
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            _ => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(8)) {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    *o = f64::from_le_bytes(b) as f32;
                }
            }
        }
    }
}

/// The Hugging Face name of a tensor or module in mlx-vlm's layouts, as mlx-community publishes
/// those checkpoints; `None` for a name outside them. Idefics3 / SmolVLM: `sanitize` drops the
/// `model.` prefix, renames `text_model` to `language_model` and moves `lm_head` under it. Qwen2-VL
/// / Qwen2.5-VL: `visual` becomes `vision_tower`, `model` `language_model.model`, and `lm_head`
/// `language_model.lm_head`.
pub fn hf_name_from_mlx_vlm(name: &str) -> Option<String> {
    if let Some(rest) = name.strip_prefix("language_model.lm_head") {
        return Some(format!("lm_head{rest}"));
    }
    if let Some(rest) = name.strip_prefix("language_model.model.") {
        return Some(format!("model.{rest}"));
    }
    if let Some(rest) = name.strip_prefix("vision_tower.") {
        return Some(format!("visual.{rest}"));
    }
    if let Some(rest) = name.strip_prefix("language_model.") {
        return Some(format!("model.text_model.{rest}"));
    }
    ["vision_model.", "connector."]
        .iter()
        .any(|p| name.starts_with(p))
        .then(|| format!("model.{name}"))
}

/// Parse and validate a safetensors header: 8-byte little-endian length, JSON, then the data region.
fn parse_header(path: &Path, bytes: &[u8], file: usize) -> Result<Vec<(String, Entry)>> {
    let bad = |m: String| Error::file(path, format!("not a valid safetensors file: {m}"));
    if bytes.len() < 8 {
        return Err(bad(format!(
            "{} bytes is too short for a header",
            bytes.len()
        )));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(len8);
    if n > (bytes.len() as u64).saturating_sub(8) || n > 100 << 20 {
        return Err(bad(format!(
            "header length {n} exceeds the file size {} (truncated or not safetensors)",
            bytes.len()
        )));
    }
    let n = n as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n])
        .map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let data_len = bytes.len() - 8 - n;
    let mut out = Vec::with_capacity(header.len());
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let tensor_err = |m: String| Error::Tensor {
            tensor: name.clone(),
            file: path.display().to_string(),
            message: m,
        };
        let dtype_s = info.get("dtype").and_then(Value::as_str).unwrap_or("?");
        let dtype = safetensors_dtype(dtype_s)
            .ok_or_else(|| tensor_err(format!("unsupported dtype `{dtype_s}`")))?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| tensor_err("no shape".into()))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| tensor_err("shape is not a list of integers".into()))?;
        let offs = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .ok_or_else(|| tensor_err("no data_offsets".into()))?;
        let (start, end) = match (offs[0].as_u64(), offs[1].as_u64()) {
            (Some(s), Some(e)) if s <= e => (s as usize, e as usize),
            _ => return Err(tensor_err("invalid data_offsets".into())),
        };
        if end > data_len {
            return Err(tensor_err(format!(
                "data ends at byte {end} but the file holds {data_len} (truncated file)"
            )));
        }
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let expected = numel.and_then(|n| n.checked_mul(dtype.size_in_bytes()));
        if expected != Some(end - start) {
            return Err(tensor_err(format!(
                "{} bytes do not hold a {dtype_s} tensor of shape {shape:?}",
                end - start
            )));
        }
        out.push((
            name,
            Entry {
                file,
                dtype,
                shape,
                channels_last: false,
                start: start + 8 + n,
                end: end + 8 + n,
            },
        ));
    }
    Ok(out)
}
