//! Write a quantized checkpoint in MLX's affine layout: every linear weight becomes `weight` (packed U32
//! codes), `scales` and `biases` (in the checkpoint's float type); config.json gains a `quantization`
//! section; tokenizer, template and processor files are copied. The folder is written under a temporary
//! name and renamed at the end, so a failure leaves nothing half-written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::DType;
use safetensors::tensor::{Dtype as StDtype, TensorView};
use serde_json::Value;

use super::{AffineWeight, QuantSpec, ScaleType};
use crate::error::{Error, Result};
use crate::weights::WeightStore;

/// What [`quantize_checkpoint`] did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct QuantizeReport {
    pub quantized_layers: usize,
    pub dense_tensors: usize,
    pub input_bytes: u64,
    pub output_bytes: u64,
}

/// Files copied beside the weights when present.
const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
];

/// Whether a tensor is the weight of a linear layer that quantizes: 2-D, named `*.weight`, not an
/// embedding table, and (with `skip_vision`) not in the vision tower.
fn is_linear_weight(name: &str, shape: &[usize], skip_vision: bool) -> bool {
    shape.len() == 2
        && name.ends_with(".weight")
        && !name.contains("embed_tokens")
        && !name.contains("position_embedding")
        && !(skip_vision && name.contains("vision_model"))
}

fn st_dtype(d: DType) -> Result<StDtype> {
    Ok(match d {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::U32 => StDtype::U32,
        DType::U8 => StDtype::U8,
        DType::I64 => StDtype::I64,
        DType::F64 => StDtype::F64,
        other => return Err(Error::Unsupported(format!("writing {other:?} tensors"))),
    })
}

/// f32 values to little-endian bytes of `dtype` (f32, f16 or bf16).
fn float_bytes(v: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        DType::BF16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Quantize the model folder `src` into `out` (which must not exist).
pub fn quantize_checkpoint(
    src: &Path,
    out: &Path,
    spec: QuantSpec,
    skip_vision: bool,
) -> Result<QuantizeReport> {
    if out.exists() {
        return Err(Error::file(
            out,
            "already exists; choose a new output folder",
        ));
    }
    let config_path = src.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::file(&config_path, e))?;
    let mut config: Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&config_path, format!("not valid JSON: {e}")))?;
    if config.get("quantization").is_some() {
        return Err(Error::file(&config_path, "the model is already quantized"));
    }
    let store = WeightStore::open_dir(src)?;
    let mut names: Vec<String> = store.names().map(str::to_string).collect();
    names.sort();

    // (name, dtype, shape, bytes) of every output tensor.
    let mut tensors: BTreeMap<String, (StDtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    let mut report = QuantizeReport::default();
    for name in &names {
        let (dtype, shape, bytes) = store.raw(name)?;
        let shape = shape.to_vec();
        report.input_bytes += bytes.len() as u64;
        let float = matches!(dtype, DType::F32 | DType::F16 | DType::BF16);
        if float && is_linear_weight(name, &shape, skip_vision) && shape[1] % spec.group_size == 0 {
            let (out_dim, in_dim) = (shape[0], shape[1]);
            // Scales and biases are fitted in the type they are written in.
            let scale_type = match dtype {
                DType::F16 => ScaleType::F16,
                DType::BF16 => ScaleType::BF16,
                _ => ScaleType::F32,
            };
            // Read a block of rows at a time from the mapped file.
            let rows = store.float_rows(name, [out_dim, in_dim])?;
            let q =
                AffineWeight::quantize_rows(out_dim, in_dim, spec, scale_type, name, |r0, out| {
                    rows.fill(r0, out)
                })?
                .into_rows(); // the checkpoint's row-major order
            store.release(name);
            let prefix = name.trim_end_matches(".weight");
            let packed: Vec<u8> = q.packed.iter().flat_map(|w| w.to_le_bytes()).collect();
            tensors.insert(
                name.clone(),
                (
                    StDtype::U32,
                    vec![out_dim, in_dim / spec.per_word()],
                    packed,
                ),
            );
            let gshape = vec![out_dim, in_dim / spec.group_size];
            let sd = st_dtype(dtype)?;
            tensors.insert(
                format!("{prefix}.scales"),
                (
                    sd,
                    gshape.clone(),
                    float_bytes(&q.scales.to_f32_vec(), dtype),
                ),
            );
            tensors.insert(
                format!("{prefix}.biases"),
                (sd, gshape, float_bytes(&q.biases.to_f32_vec(), dtype)),
            );
            report.quantized_layers += 1;
        } else {
            tensors.insert(name.clone(), (st_dtype(dtype)?, shape, bytes.to_vec()));
            report.dense_tensors += 1;
        }
    }

    // A folder of this run's own beside `out`, renamed into place when complete: a run that fails
    // leaves nothing, and two runs to one `out` never share it (the second rename finds `out`).
    let tmp: PathBuf = out.with_file_name(format!(
        ".{}.{}-{:08x}.partial",
        out.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("quantized"),
        std::process::id(),
        crate::prompt::random_u64() as u32
    ));
    std::fs::create_dir(&tmp).map_err(|e| Error::file(&tmp, e))?;
    let result = (|| -> Result<()> {
        let views = tensors
            .iter()
            .map(|(n, (d, s, b))| {
                TensorView::new(*d, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::Weights(format!("{n}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "mlx".to_string());
        let st_path = tmp.join("model.safetensors");
        safetensors::serialize_to_file(views, Some(meta), &st_path)
            .map_err(|e| Error::file(&st_path, e))?;
        config["quantization"] =
            serde_json::json!({"group_size": spec.group_size, "bits": spec.bits, "mode": "affine"});
        config["quantization_config"] = config["quantization"].clone();
        let cfg_out = tmp.join("config.json");
        let pretty =
            serde_json::to_string_pretty(&config).map_err(|e| Error::Config(e.to_string()))?;
        std::fs::write(&cfg_out, pretty).map_err(|e| Error::file(&cfg_out, e))?;
        for f in SIDE_FILES {
            let p = src.join(f);
            if p.is_file() {
                std::fs::copy(&p, tmp.join(f)).map_err(|e| Error::file(&p, e))?;
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out.exists() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::file(
            out,
            "was created by another run while this one worked; choose a new output folder",
        ));
    }
    if let Err(e) = std::fs::rename(&tmp, out) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::file(out, e));
    }
    report.output_bytes = std::fs::metadata(out.join("model.safetensors"))
        .map(|m| m.len())
        .unwrap_or(0);
    Ok(report)
}
