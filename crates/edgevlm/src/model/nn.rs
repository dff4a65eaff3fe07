//! Layers shared by the vision encoder and the text decoder.
//!
//! [`Linear`] holds its weight as a `QMatMul`, so a quantized weight can stand in for a dense one
//! without touching the model code: only the loader decides which kind it builds.

use candle_core::{DType, Device, Tensor, D};

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::kernels::amx::TileInputs;
use crate::quant::{AffineParts, AffineWeight, QuantSpec, ScaleType, StoredSpec};
use crate::weights::WeightStore;

/// How a model's weights are materialised.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    /// Quantize dense linear weights while loading (one tensor at a time).
    pub quantize: Option<QuantSpec>,
    /// The checkpoint's own quantization (config.json `quantization`), for pre-quantized weights.
    pub checkpoint_quant: Option<CheckpointQuant>,
    /// Expand block-quantized GGUF weights to dense `dtype` (a full-precision reference of them).
    pub dequantize: bool,
    /// Leave the vision tower in full precision when `quantize` is set.
    pub skip_vision: bool,
    /// Keep dense linear weights stored in bf16/f16 in that type and compute in f32 (CPU, f32 models):
    /// half the memory of expanding them, the same products.
    pub half_weights: bool,
    /// With `half_weights`: run the products of bf16 weights on AMX tiles where the CPU has them
    /// (inputs rounded to bf16, f32 sums; see [`crate::kernels::amx`]) instead of in f32.
    pub bf16_tiles: bool,
    /// Round the inputs of quantized products to one 8-bit code per block of 32 values, as
    /// llama.cpp does ([`TileInputs::Int8`]): faster batches and prompts, llama.cpp's accuracy.
    pub int8_activations: bool,
}

impl LoadOptions {
    pub fn new(dtype: DType, device: Device) -> Self {
        Self {
            dtype,
            device,
            quantize: None,
            checkpoint_quant: None,
            dequantize: false,
            skip_vision: false,
            half_weights: false,
            bf16_tiles: false,
            int8_activations: false,
        }
    }

    /// How the quantized layers these options load hold the inputs of their products: bf16 on the
    /// tiles of a vision tower loaded for them, one 8-bit code where `int8_activations` asks, else
    /// 16 significant bits.
    pub fn tile_inputs(&self) -> TileInputs {
        if self.bf16_tiles {
            TileInputs::Bf16
        } else if self.int8_activations {
            TileInputs::Int8
        } else {
            TileInputs::Split
        }
    }

    /// A vision tower's options: dense weights kept in the checkpoint's bf16/f16 and computed in
    /// f32 on the CPU (half the memory of f32 copies; its products are large enough that expanding
    /// a panel at a time costs nothing), on AMX tiles where `bf16_tiles` allows; `skip_vision`
    /// keeps them dense while the rest quantizes.
    pub fn for_vision(&self) -> Self {
        let cpu = self.device.is_cpu();
        Self {
            quantize: if self.skip_vision {
                None
            } else {
                self.quantize
            },
            half_weights: cpu,
            bf16_tiles: cpu && self.bf16_tiles,
            // Only decode steps gain from coarser inputs.
            int8_activations: false,
            ..self.clone()
        }
    }

    /// A text decoder's (and connector's) options: quantized products keep their inputs to 16
    /// significant bits (bf16 tiles are the vision tower's).
    pub fn for_text(&self) -> Self {
        Self {
            bf16_tiles: false,
            ..self.clone()
        }
    }
}

/// MLX's `quantization` section: default bits/group size plus per-module overrides (`false` = dense).
#[derive(Clone, Debug, Default)]
pub struct CheckpointQuant {
    pub default: Option<StoredSpec>,
    pub overrides: HashMap<String, Option<StoredSpec>>,
}

impl CheckpointQuant {
    /// Parse `config.json`'s `quantization` (or `quantization_config`) object.
    pub fn from_config(cfg: &serde_json::Value) -> Result<Option<Self>> {
        let Some(q) = cfg
            .get("quantization")
            .or_else(|| cfg.get("quantization_config"))
        else {
            return Ok(None);
        };
        let spec = |v: &serde_json::Value| -> Result<Option<StoredSpec>> {
            match v {
                serde_json::Value::Bool(false) => Ok(None),
                serde_json::Value::Object(o) => {
                    let bits = o.get("bits").and_then(|b| b.as_u64()).unwrap_or(4) as u32;
                    let gs = o.get("group_size").and_then(|g| g.as_u64()).unwrap_or(64) as usize;
                    if let Some(mode) = o.get("mode").and_then(|m| m.as_str()) {
                        if mode != "affine" {
                            return Err(Error::Unsupported(format!(
                                "quantization mode `{mode}` (only affine)"
                            )));
                        }
                    }
                    StoredSpec::new(bits, gs).map(Some)
                }
                other => Err(Error::Config(format!(
                    "quantization entry {other} is not an object"
                ))),
            }
        };
        let mut out = CheckpointQuant {
            default: spec(q)?,
            ..Default::default()
        };
        if let Some(o) = q.as_object() {
            for (k, v) in o {
                if v.is_object() || v.is_boolean() {
                    // Module paths as loading names them (mlx-vlm's own names mapped back).
                    let path = crate::weights::hf_name_from_mlx_vlm(k).unwrap_or_else(|| k.clone());
                    out.overrides.insert(path, spec(v)?);
                }
            }
        }
        Ok(Some(out))
    }

    /// The spec of the module at `path` (`model.text_model.layers.0.mlp.up_proj`).
    pub fn lookup(&self, path: &str) -> Option<StoredSpec> {
        match self.overrides.get(path) {
            Some(s) => *s,
            None => self.default,
        }
    }
}

/// A weight source with a name prefix, in the style of candle's `VarBuilder` but with errors that
/// name the tensor and file.
#[derive(Clone)]
pub struct Weights<'a> {
    store: &'a WeightStore,
    prefix: String,
    pub opts: &'a LoadOptions,
}

impl<'a> Weights<'a> {
    pub fn new(store: &'a WeightStore, opts: &'a LoadOptions) -> Self {
        Self {
            store,
            prefix: String::new(),
            opts,
        }
    }

    /// A view one level down: `pp("layers").pp(3)` reads `layers.3.*`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Self {
            store: self.store,
            prefix,
            opts: self.opts,
        }
    }

    /// The same view loading with other options.
    pub fn with_opts<'b>(&self, opts: &'b LoadOptions) -> Weights<'b>
    where
        'a: 'b,
    {
        Weights {
            store: self.store,
            prefix: self.prefix.clone(),
            opts,
        }
    }

    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.store.contains(&self.path(name))
    }

    /// A tensor in the model dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.store
            .get(&self.path(name), shape, self.opts.dtype, &self.opts.device)
    }

    pub fn store(&self) -> &WeightStore {
        self.store
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// The weight of a linear layer.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// Dense `(out, in)`, contiguous, as checkpoints store it: one token runs the row-wise mat-vec
    /// kernel, several tokens the GEMM on the transposed view.
    Dense { w: Tensor },
    /// Dense `(out, in)` kept in the checkpoint's bf16 or f16 and computed in f32: each product
    /// expands it one panel at a time (exactly: every 16-bit value is an f32).
    Half { w: Tensor },
    /// A bf16 weight packed at load for products on AMX tiles (inputs rounded to bf16, f32 sums),
    /// on CPUs that have them; a product of a few rows reads it back exactly in f32.
    Tiles(Arc<crate::kernels::amx::TileWeight>),
    /// A bf16 or f16 weight packed at load as 16-bit integers per row for the AVX2 products of many
    /// inputs ([`crate::kernels::fixed16`]): the vision encoder's form on x86 CPUs without AMX.
    Fixed16(Arc<crate::kernels::fixed16::Fixed16Weight>),
    /// MLX-style affine groups, run by edgevlm's CPU kernels.
    Affine(Arc<AffineWeight>),
    /// A GGUF block type with no exact affine form (k-quants, Q5), run by candle's quantized kernels.
    Ggml(candle_core::quantized::QMatMul),
    /// 8-bit affine groups in the form candle's CUDA and Metal kernels run
    /// ([`AffineWeight::to_q8_0_blocks`]): `q` holds the codes minus 128 as Q8_0 blocks, and each
    /// group adds its offset (`offsets`, `(out, in / group_size)` f32) times the sum of its inputs.
    Q8Offsets {
        q: candle_core::quantized::QMatMul,
        offsets: Tensor,
        group_size: usize,
    },
}

/// `y = x Wᵀ + b`, with `W` dense or quantized.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    /// How an affine weight's products of many inputs hold them on AMX tiles: split (16
    /// significant bits) unless the layer was loaded for bf16 tiles (the vision encoder).
    tile_inputs: TileInputs,
}

impl Linear {
    /// Load `prefix.weight` (and `prefix.bias`): pre-quantized when the checkpoint holds `scales`,
    /// quantized now when the options ask for it, dense otherwise.
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let bias = if bias {
            Some(w.get("bias", &[out_dim])?)
        } else {
            None
        };
        // Quantized layers loaded for bf16 tiles (the vision encoder) round their inputs as its
        // bf16 products do.
        let tile_inputs = w.opts.tile_inputs();
        if w.contains("scales") {
            let q = load_affine(w, in_dim, out_dim)?;
            return Self::quantized(q, bias, tile_inputs, w.opts);
        }
        if w.opts.half_weights && w.opts.quantize.is_none() && w.opts.dtype == DType::F32 {
            let name = w.path("weight");
            if let (dt @ (DType::BF16 | DType::F16), _, _) = w.store().raw(&name)? {
                let weight = w.store().get(&name, &[out_dim, in_dim], dt, &Device::Cpu)?;
                if dt == DType::BF16 && w.opts.bf16_tiles && crate::kernels::amx::available() {
                    let packed = with_cpu_slice::<half::bf16, _>(&weight, |v| {
                        crate::kernels::amx::TileWeight::pack(v, out_dim, in_dim)
                    })?;
                    if let Some(t) = packed.flatten() {
                        return Ok(Self {
                            weight: LinearWeight::Tiles(Arc::new(t)),
                            bias,
                            tile_inputs: TileInputs::Split,
                        });
                    }
                } else if fixed16_encoder(w.opts) {
                    if let Some(f) = pack_fixed16(&weight)? {
                        return Ok(Self::packed(LinearWeight::Fixed16(Arc::new(f)), bias));
                    }
                }
                return Ok(Self {
                    weight: LinearWeight::Half { w: weight },
                    bias,
                    tile_inputs: TileInputs::Split,
                });
            }
        }
        if let Some(spec) = w.opts.quantize {
            // Straight from the stored values, a block of rows at a time.
            let name = w.path("weight");
            let rows = w.store().float_rows(&name, [out_dim, in_dim])?;
            let q = AffineWeight::quantize_rows(
                out_dim,
                in_dim,
                spec,
                spec.held_scale_type(w.opts.device.is_cpu()),
                &name,
                |r0, out| rows.fill(r0, out),
            )?;
            w.store().release(&name);
            return Self::quantized(q, bias, tile_inputs, w.opts);
        }
        Self::dense(&w.get("weight", &[out_dim, in_dim])?, bias)
    }

    /// A quantized layer as `opts` place it. An encoder's layer (loaded for bf16 tiles) on an x86 CPU
    /// with AVX2 but no AMX runs as 16-bit integer products of its dequantized rows
    /// ([`crate::kernels::fixed16`]: 14 bits of each row's largest value, finer than the 8- or 4-bit
    /// codes), where the affine kernels' products of many rows would expand f32 panels.
    fn quantized(
        q: AffineWeight,
        bias: Option<Tensor>,
        tile_inputs: TileInputs,
        opts: &LoadOptions,
    ) -> Result<Self> {
        if fixed16_encoder(opts) {
            let packed =
                crate::kernels::fixed16::Fixed16Weight::pack(q.out_dim, q.in_dim, |r, row| {
                    q.dequantize_row(r, row)
                });
            if let Some(f) = packed {
                return Ok(Self::packed(LinearWeight::Fixed16(Arc::new(f)), bias));
            }
        }
        Self::affine(q, bias)
            .with_tile_inputs(tile_inputs)
            .place(&opts.device, opts.dtype)
    }

    /// A layer on a weight packed at load for its kernel (AMX tiles, 16-bit products).
    fn packed(weight: LinearWeight, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            tile_inputs: TileInputs::Split,
        }
    }

    /// This layer with `bias` added to its outputs (in place of any it had).
    pub fn with_bias(self, bias: Tensor) -> Self {
        Self {
            bias: Some(bias),
            ..self
        }
    }

    /// This layer with its products on AMX tiles holding their inputs as `inputs` says.
    pub fn with_tile_inputs(self, inputs: TileInputs) -> Self {
        Self {
            tile_inputs: inputs,
            ..self
        }
    }

    pub fn affine(q: AffineWeight, bias: Option<Tensor>) -> Self {
        Self::affine_shared(Arc::new(q), bias)
    }

    /// An affine weight shared with another user (a tied embedding table).
    pub fn affine_shared(q: Arc<AffineWeight>, bias: Option<Tensor>) -> Self {
        Self {
            weight: LinearWeight::Affine(q),
            bias,
            tile_inputs: TileInputs::Split,
        }
    }

    pub fn ggml(q: candle_core::quantized::QMatMul, bias: Option<Tensor>) -> Self {
        Self {
            weight: LinearWeight::Ggml(q),
            bias,
            tile_inputs: TileInputs::Split,
        }
    }

    /// This layer in the form `device` runs: as it is on the CPU; elsewhere (CUDA, Metal) an
    /// affine-quantized weight becomes ggml blocks for candle's quantized kernels where that is exact
    /// (4-bit codes with f16 scales and biases: Q4_1; 8-bit codes with f16 scales: Q8_0 plus group
    /// offsets), and otherwise its dequantized values, dense in `dtype`. edgevlm's own affine
    /// kernels are CPU code.
    pub fn place(self, device: &Device, dtype: DType) -> Result<Self> {
        if device.is_cpu() {
            return Ok(self);
        }
        self.for_accelerator(device, dtype)
    }

    /// The non-CPU form of [`Self::place`], on any device (the tests run it on the CPU).
    fn for_accelerator(self, device: &Device, dtype: DType) -> Result<Self> {
        use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
        let LinearWeight::Affine(q) = &self.weight else {
            return Ok(self);
        };
        let ggml = |blocks: Vec<u8>, dtype: GgmlDType| -> Result<QMatMul> {
            let storage = QStorage::from_data(std::borrow::Cow::Owned(blocks), device, dtype)?;
            let t = QTensor::new(storage, (q.out_dim, q.in_dim))?;
            Ok(QMatMul::from_arc(Arc::new(t))?)
        };
        let weight = match (q.to_q4_1_blocks(), q.to_q8_0_blocks()) {
            (Some(blocks), _) => LinearWeight::Ggml(ggml(blocks, GgmlDType::Q4_1)?),
            (None, Some((blocks, offsets))) => {
                let groups = q.in_dim / q.spec.group_size;
                LinearWeight::Q8Offsets {
                    q: ggml(blocks, GgmlDType::Q8_0)?,
                    offsets: Tensor::from_vec(offsets, (q.out_dim, groups), device)?,
                    group_size: q.spec.group_size,
                }
            }
            (None, None) => {
                let mut values = vec![0f32; q.out_dim * q.in_dim];
                for (r, row) in values.chunks_exact_mut(q.in_dim).enumerate() {
                    q.dequantize_row(r, row);
                }
                let w = Tensor::from_vec(values, (q.out_dim, q.in_dim), device)?.to_dtype(dtype)?;
                LinearWeight::Dense { w }
            }
        };
        Ok(Self {
            weight,
            bias: self.bias,
            tile_inputs: self.tile_inputs,
        })
    }

    /// The output width.
    pub fn out_features(&self) -> usize {
        use candle_core::quantized::QMatMul;
        match &self.weight {
            LinearWeight::Dense { w } | LinearWeight::Half { w } => w.dims()[0],
            LinearWeight::Tiles(t) => t.out_dim(),
            LinearWeight::Fixed16(f) => f.out_dim(),
            LinearWeight::Affine(q) => q.out_dim,
            LinearWeight::Ggml(QMatMul::QTensor(q))
            | LinearWeight::Q8Offsets {
                q: QMatMul::QTensor(q),
                ..
            } => q.shape().dims()[0],
            LinearWeight::Ggml(QMatMul::Tensor(t) | QMatMul::TensorF16(t))
            | LinearWeight::Q8Offsets {
                q: QMatMul::Tensor(t) | QMatMul::TensorF16(t),
                ..
            } => t.dims()[0],
        }
    }

    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    /// From a dense `(out, in)` weight as checkpoints store it.
    pub fn dense(weight: &Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            weight: LinearWeight::Dense {
                w: weight.contiguous()?,
            },
            bias,
            tile_inputs: TileInputs::Split,
        })
    }

    /// Layers that read the same input stacked into one whose output is their outputs side by side
    /// (`[y₁ | y₂ | …]`): one product instead of several (QKV, gate/up). `None` where the weights
    /// cannot be stacked (GGML blocks, different formats, biases on some parts only).
    pub fn fuse(parts: &[&Linear]) -> Result<Option<Linear>> {
        if parts.is_empty() {
            return Ok(None);
        }
        let bias = if parts.iter().all(|p| p.bias.is_some()) {
            let b: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
            Some(Tensor::cat(&b, 0)?)
        } else if parts.iter().all(|p| p.bias.is_none()) {
            None
        } else {
            return Ok(None);
        };
        // Dense weights stack with dense ones, 16-bit with 16-bit of the same type: one `cat`.
        let plain: Option<Vec<(&Tensor, bool)>> = parts
            .iter()
            .map(|p| match &p.weight {
                LinearWeight::Dense { w } => Some((w, false)),
                LinearWeight::Half { w } => Some((w, true)),
                _ => None,
            })
            .collect();
        if let Some(ws) = plain {
            let (first, half) = ws[0];
            if ws.iter().any(|&(w, h)| {
                h != half || w.dtype() != first.dtype() || w.dim(1).ok() != first.dim(1).ok()
            }) {
                return Ok(None);
            }
            let ts: Vec<&Tensor> = ws.iter().map(|&(w, _)| w).collect();
            let w = Tensor::cat(&ts, 0)?;
            return Ok(Some(if half {
                Self {
                    weight: LinearWeight::Half { w },
                    bias,
                    tile_inputs: TileInputs::Split,
                }
            } else {
                Self::dense(&w, bias)?
            }));
        }
        if let Some(ts) = all_of(parts, |w| match w {
            LinearWeight::Tiles(t) => Some(t.as_ref()),
            _ => None,
        }) {
            let t = crate::kernels::amx::TileWeight::stack(&ts);
            return Ok(t.map(|t| Self::packed(LinearWeight::Tiles(Arc::new(t)), bias)));
        }
        if let Some(fs) = all_of(parts, |w| match w {
            LinearWeight::Fixed16(f) => Some(f.as_ref()),
            _ => None,
        }) {
            let f = crate::kernels::fixed16::Fixed16Weight::stack(&fs);
            return Ok(f.map(|f| Self::packed(LinearWeight::Fixed16(Arc::new(f)), bias)));
        }
        let affine: Option<Vec<&AffineWeight>> = parts
            .iter()
            .map(|p| match &p.weight {
                LinearWeight::Affine(q) => Some(q.as_ref()),
                _ => None,
            })
            .collect();
        let inputs = parts[0].tile_inputs;
        if parts.iter().any(|p| p.tile_inputs != inputs) {
            return Ok(None);
        }
        Ok(affine
            .and_then(|qs| AffineWeight::stack_rows(&qs))
            .map(|q| Self::affine(q, bias).with_tile_inputs(inputs)))
    }

    /// `x`: `(..., in)` → `(..., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Dense { w } => {
                let dims = x.dims();
                let k = dims[dims.len() - 1];
                let rows = x.elem_count() / k.max(1);
                let x2 = x.reshape((rows, k))?;
                let y = match rows {
                    1 => crate::kernels::matvec::try_matvec(&x2, w)?,
                    _ => None,
                };
                let y = match y {
                    Some(y) => y,
                    None => x2.matmul(&w.t()?)?,
                };
                let mut out_dims = dims.to_vec();
                if let Some(last) = out_dims.last_mut() {
                    *last = w.dim(0)?;
                }
                y.reshape(out_dims)?
            }
            LinearWeight::Half { w } => half_forward(w, x)?,
            LinearWeight::Tiles(t) => tiles_forward(t, x)?,
            LinearWeight::Fixed16(f) => fixed16_forward(f, x)?,
            LinearWeight::Affine(q) => affine_forward(q, x, self.tile_inputs)?,
            LinearWeight::Ggml(q) => {
                use candle_core::Module;
                q.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?
            }
            LinearWeight::Q8Offsets {
                q,
                offsets,
                group_size,
            } => {
                use candle_core::Module;
                let x32 = x.to_dtype(DType::F32)?;
                let y = q.forward(&x32)?;
                let k = x32.dim(D::Minus1)?;
                let rows = x32.elem_count() / k.max(1);
                let sums = x32
                    .reshape((rows, k / group_size, *group_size))?
                    .sum(D::Minus1)?;
                let shift = sums.matmul(&offsets.t()?)?.reshape(y.shape())?;
                (y + shift)?.to_dtype(x.dtype())?
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

impl Linear {
    /// `x` `(rows, in)` holding one row of each sequence of a decode batch: every row's output is
    /// bit-identical to [`Self::forward`] of that row alone, so a sequence answers the same alone or
    /// batched. Affine-quantized weights are read once per four rows; other forms run row by row.
    pub fn forward_batch(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.dim(0)?;
        if rows == 1 {
            return self.forward(x);
        }
        let y = match &self.weight {
            LinearWeight::Affine(q) if x.device().is_cpu() => affine_forward_by(q, x, |xs, y| {
                crate::kernels::qmatvec::affine_matmul_batch(q, xs, y, self.tile_inputs)
            })?,
            _ => {
                let outs = (0..rows)
                    .map(|i| self.forward(&x.narrow(0, i, 1)?))
                    .collect::<Result<Vec<_>>>()?;
                return Ok(Tensor::cat(&outs, 0)?);
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Projections that read the same input (Q/K/V, gate/up): one stacked product `[y₁ | y₂ | …]` where
/// the weights can be stacked, separate products otherwise (GGML block types).
#[derive(Debug, Clone)]
pub enum ProjectionGroup {
    Fused { linear: Linear, widths: Vec<usize> },
    Separate(Vec<Linear>),
}

impl ProjectionGroup {
    /// `parts` with their output widths.
    pub fn new(parts: Vec<(Linear, usize)>) -> Result<Self> {
        let refs: Vec<&Linear> = parts.iter().map(|(l, _)| l).collect();
        Ok(match Linear::fuse(&refs)? {
            Some(linear) => Self::Fused {
                linear,
                widths: parts.iter().map(|(_, w)| *w).collect(),
            },
            None => Self::Separate(parts.into_iter().map(|(l, _)| l).collect()),
        })
    }

    /// The stacked layer, when there is one.
    pub fn fused(&self) -> Option<&Linear> {
        match self {
            Self::Fused { linear, .. } => Some(linear),
            Self::Separate(_) => None,
        }
    }

    /// Each projection's output `(..., width)` (views into the stacked output when fused).
    pub fn forward_each(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.each_by(x, Linear::forward)
    }

    /// [`Self::forward_each`] for the rows of a decode batch ([`Linear::forward_batch`]).
    pub fn forward_each_batch(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.each_by(x, Linear::forward_batch)
    }

    fn each_by(
        &self,
        x: &Tensor,
        forward: impl Fn(&Linear, &Tensor) -> Result<Tensor>,
    ) -> Result<Vec<Tensor>> {
        match self {
            Self::Fused { linear, widths } => {
                let y = forward(linear, x)?;
                let last = y.rank() - 1;
                let mut start = 0;
                let mut out = Vec::with_capacity(widths.len());
                for &w in widths {
                    out.push(y.narrow(last, start, w)?);
                    start += w;
                }
                Ok(out)
            }
            Self::Separate(ls) => ls.iter().map(|l| forward(l, x)).collect(),
        }
    }
}

/// A token embedding table, dense or quantized (quantized rows are expanded only when looked up, and
/// a tied LM head shares the same codes).
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    Affine(Arc<AffineWeight>),
}

impl Embedding {
    /// Rows `ids` as `(n, hidden)` in `dtype`.
    pub fn lookup(
        &self,
        ids: &[u32],
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        match self {
            Embedding::Dense(t) => {
                let idx = Tensor::new(ids, t.device())?;
                Ok(t.index_select(&idx, 0)?.to_dtype(dtype)?)
            }
            Embedding::Affine(q) => {
                let k = q.in_dim;
                let mut rows = vec![0f32; ids.len() * k];
                for (dst, &id) in rows.chunks_exact_mut(k).zip(ids) {
                    q.dequantize_row(id as usize, dst);
                }
                Ok(Tensor::from_vec(rows, (ids.len(), k), device)?.to_dtype(dtype)?)
            }
        }
    }

    /// The LM head tied to this table.
    pub fn tied_head(&self) -> Result<Linear> {
        match self {
            Embedding::Dense(t) => Linear::dense(t, None),
            Embedding::Affine(q) => Ok(Linear::affine_shared(q.clone(), None)),
        }
    }
}

/// LayerNorm with weight and bias (SigLIP).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self {
            weight,
            bias,
            eps: eps as f32,
        }
    }

    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get("weight", &[dim])?,
            bias: w.get("bias", &[dim])?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            &x.contiguous()?,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

/// Root-mean-square norm (Llama).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            eps: eps as f32,
        }
    }

    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get("weight", &[dim])?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }
}

/// Scaled dot-product attention over `(batch, heads, seq, head_dim)` tensors; `mask` is added to the
/// scores (0 or -inf) and broadcast. Softmax runs in f32 as in HF's eager and SDPA paths.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = scores.to_dtype(DType::F32)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    Ok(probs.matmul(v)?)
}

/// `softmax(scores + mask)` over the last axis, where `scores` is f32 `(..., t, s)` read as rows whose
/// query index is `row % t`, and `mask` `(t, s)` (0 or -inf) is added row by row: the vectorised pool
/// kernel on contiguous CPU tensors (one pass, no broadcast copy), candle's ops otherwise.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let (t, s) = mask.dims2()?;
    let fits = s > 0 && t > 0 && scores.dim(D::Minus1).ok() == Some(s);
    // The mask is read in place (every layer of a pass shares it): no copy per call.
    let out = if fits {
        with_cpu_f32(mask, |bias| {
            with_cpu_f32(scores, |xs| {
                let mut out = xs.to_vec();
                out.par_chunks_mut(s).enumerate().for_each(|(r, row)| {
                    let i = r % t;
                    let b = &bias[i * s..(i + 1) * s];
                    crate::kernels::elementwise::softmax_rows(row, s, Some(b));
                });
                out
            })
        })?
        .transpose()?
        .flatten()
    } else {
        None
    };
    match out {
        Some(out) => Ok(Tensor::from_vec(out, scores.dims(), scores.device())?),
        None => {
            let lead = scores.elem_count() / (t * s).max(1);
            let m = mask.reshape((1, t, s))?;
            let x = scores.reshape((lead, t, s))?.broadcast_add(&m)?;
            Ok(candle_nn::ops::softmax_last_dim(&x)?.reshape(scores.dims())?)
        }
    }
}

/// Run `f` on the values of a contiguous f32 CPU tensor (`None` for any other tensor, whose callers
/// take the general path).
pub fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<Option<R>> {
    with_cpu_slice(t, f)
}

/// `f` on the values of a contiguous CPU tensor of element type `T`; `None` for other tensors.
fn with_cpu_slice<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> Result<Option<R>> {
    if t.dtype() != T::DTYPE || !t.is_contiguous() {
        return Ok(None);
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let start = layout.start_offset();
    let values = &cpu.as_slice::<T>()?[start..start + t.elem_count()];
    Ok(Some(f(values)))
}

/// `kernel(x) → out` for an f32 CPU tensor (an element-wise pool kernel), `fallback(x)` otherwise.
fn elementwise(
    x: &Tensor,
    kernel: fn(&[f32], &mut [f32]),
    fallback: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    let out = with_cpu_f32(x, |xs| {
        let mut out = vec![0f32; xs.len()];
        kernel(xs, &mut out);
        out
    })?;
    match out {
        Some(v) => Ok(Tensor::from_vec(v, x.shape(), x.device())?),
        None => Ok(fallback(x)?),
    }
}

/// GELU (tanh form, as SmolVLM's SigLIP uses): the vectorised pool kernel for f32 CPU tensors,
/// candle's op otherwise.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    elementwise(x, crate::kernels::elementwise::gelu_tanh, Tensor::gelu)
}

/// Exact GELU (`0.5 x (1 + erf(x/√2))`): the vectorised kernel for f32 CPU tensors, candle's op
/// otherwise.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    elementwise(x, crate::kernels::elementwise::gelu_erf, Tensor::gelu_erf)
}

/// Full self-attention of fused `[q | k | v]` rows `(batch · seq, 3 · heads · head_dim)` (f32, CPU)
/// through the encoder attention kernel (on AMX tiles when `tiles`; `key_bias` masks padding keys):
/// `(batch, seq, heads · head_dim)`, or `None` for a tensor the kernel cannot read.
pub fn fused_qkv_attention(
    qkv: &Tensor,
    shape: crate::kernels::encoder_attention::EncoderAttentionShape,
    tiles: bool,
    key_bias: Option<&[f32]>,
) -> Result<Option<Tensor>> {
    use crate::kernels::encoder_attention::{encoder_attention, EncoderAttention, StridedRows};
    let h = shape.heads * shape.head_dim;
    let (b, n) = (shape.batch, shape.seq);
    let out = with_cpu_f32(qkv, |data| {
        let rows = |offset| StridedRows {
            data,
            offset,
            stride: 3 * h,
        };
        let attention = EncoderAttention {
            q: rows(0),
            k: rows(h),
            v: rows(2 * h),
            shape,
            scale: (shape.head_dim as f32).powf(-0.5),
            key_bias,
        };
        let mut out = vec![0f32; b * n * h];
        encoder_attention(&attention, tiles, &mut out);
        out
    })?;
    Ok(match out {
        Some(o) => Some(Tensor::from_vec(o, (b, n, h), qkv.device())?),
        None => None,
    })
}

/// `silu(gate) · up` from a stacked `[gate | up]` output `(..., 2·width)`: the vectorised kernel for f32
/// CPU tensors, candle's ops otherwise.
pub fn silu_mul_stacked(gate_up: &Tensor, width: usize) -> Result<Tensor> {
    let out = with_cpu_f32(gate_up, |xs| {
        let mut out = vec![0f32; xs.len() / 2];
        crate::kernels::elementwise::silu_mul_rows(xs, width, &mut out);
        out
    })?;
    let mut dims = gate_up.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = width;
    }
    match out {
        Some(v) => Ok(Tensor::from_vec(v, dims, gate_up.device())?),
        None => {
            let last = gate_up.rank() - 1;
            let g = candle_nn::ops::silu(&gate_up.narrow(last, 0, width)?)?;
            Ok((g * gate_up.narrow(last, width, width)?)?)
        }
    }
}

/// Read an MLX-quantized layer: `weight` packed u32, `scales`/`biases` in a float type.
pub(crate) fn load_affine(w: &Weights, in_dim: usize, out_dim: usize) -> Result<AffineWeight> {
    let module = w.prefix().to_string();
    let stored = w
        .opts
        .checkpoint_quant
        .as_ref()
        .and_then(|c| c.lookup(&module))
        .ok_or_else(|| Error::Tensor {
            tensor: w.path("scales"),
            file: w.store().file_of(&w.path("scales")),
            message: "quantized tensor but config.json has no `quantization` entry for it".into(),
        })?;
    let store = w.store();
    let bad = |name: &str, m: String| Error::Tensor {
        tensor: w.path(name),
        file: store.file_of(&w.path(name)),
        message: m,
    };
    if !in_dim.is_multiple_of(stored.group_size) {
        return Err(bad(
            "weight",
            format!(
                "input size {in_dim} is not a multiple of the group size {}",
                stored.group_size
            ),
        ));
    }
    let (dt, shape, bytes) = store.raw(&w.path("weight"))?;
    let words = stored.words(in_dim);
    if dt != DType::U32 || shape != [out_dim, words] {
        return Err(bad(
            "weight",
            format!("{dt:?} {shape:?}, expected U32 [{out_dim}, {words}] for {}-bit codes of a {out_dim}x{in_dim} layer", stored.bits),
        ));
    }
    let packed: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    // 2/3-bit codes widened to 4 bits, 5/6-bit to 8: the same values.
    let packed = stored.widen(packed, in_dim);
    let spec = stored.compute();
    let groups = in_dim / spec.group_size.max(1);
    let read_float = |name: &str| -> Result<(Vec<f32>, ScaleType)> {
        let (dt, shape, bytes) = store.raw(&w.path(name))?;
        if shape != [out_dim, groups] {
            return Err(bad(
                name,
                format!(
                    "shape {shape:?}, expected [{out_dim}, {groups}] (group size {})",
                    spec.group_size
                ),
            ));
        }
        let (v, st) = match dt {
            DType::F32 => (
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                ScaleType::F32,
            ),
            DType::F16 => (
                bytes
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                ScaleType::F16,
            ),
            DType::BF16 => (
                bytes
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                ScaleType::BF16,
            ),
            other => {
                return Err(bad(
                    name,
                    format!("dtype {other:?} (scales and biases are f32, f16 or bf16)"),
                ))
            }
        };
        Ok((v, st))
    };
    let (scales, st) = read_float("scales")?;
    let (biases, _) = read_float("biases")?;
    for name in ["weight", "scales", "biases"] {
        store.release(&w.path(name));
    }
    let parts = AffineParts {
        packed,
        scales,
        biases,
        scale_type: st,
    };
    AffineWeight::from_parts(spec, out_dim, in_dim, parts, &module)
}

/// Rows from which a bf16 product runs on AMX where the CPU has it (fewer would mostly be padding).
const AMX_MIN_ROWS: usize = 16;

/// Input rows up to which an f16 weight's product runs as mat-vecs ([`crate::kernels::matvec::matvec_f16`]).
const HALF_MATVEC_MAX_ROWS: usize = 4;

/// `x (..., in)` times a bf16/f16 weight: f32 on the CPU, panel by panel (a few rows of an f16 weight
/// as mat-vecs); elsewhere the weight is
/// converted to `x`'s type for the product.
fn half_forward(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    let rows = x.elem_count() / k.max(1);
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    let x2 = x.reshape((rows, k))?.contiguous()?;
    let (ws, wl) = w.storage_and_layout();
    let y = match &*ws {
        candle_core::Storage::Cpu(cpu) if x.dtype() == DType::F32 && w.is_contiguous() => {
            let start = wl.start_offset();
            let mut y = vec![0f32; rows * n];
            // `convert_to_f32_slice` expands a row with F16C / vector shifts where the CPU has them.
            use half::slice::HalfFloatSliceExt;
            let done = with_cpu_f32(&x2, |xs| match w.dtype() {
                DType::BF16 => {
                    let wd = &cpu.as_slice::<half::bf16>()?[start..start + n * k];
                    crate::kernels::qmatvec::panel_matmul_rows(n, k, xs, &mut y, |r, row| {
                        wd[r * k..(r + 1) * k].convert_to_f32_slice(row)
                    });
                    Ok::<bool, Error>(true)
                }
                DType::F16 => {
                    let wd = &cpu.as_slice::<half::f16>()?[start..start + n * k];
                    if rows <= HALF_MATVEC_MAX_ROWS {
                        // A few rows (decode steps): one pass over the 16-bit weight per row,
                        // widened in registers, instead of expanding every panel to f32.
                        for (x, y) in xs.chunks_exact(k).zip(y.chunks_exact_mut(n)) {
                            crate::kernels::matvec::matvec_f16(wd, x, y);
                        }
                    } else {
                        crate::kernels::qmatvec::panel_matmul_rows(n, k, xs, &mut y, |r, row| {
                            wd[r * k..(r + 1) * k].convert_to_f32_slice(row)
                        });
                    }
                    Ok(true)
                }
                _ => Ok(false),
            })?
            .transpose()?
            .unwrap_or(false);
            done.then_some(y)
        }
        _ => None,
    };
    drop(ws);
    match y {
        Some(y) => Ok(Tensor::from_vec(y, dims, x.device())?),
        None => Ok(x2.matmul(&w.to_dtype(x.dtype())?.t()?)?.reshape(dims)?),
    }
}

/// `x (..., in)` times a packed bf16 weight: on AMX tiles from `AMX_MIN_ROWS` rows (inputs rounded
/// to bf16, f32 sums), fewer rows in f32 with the weight read back a row at a time (exact).
fn tiles_forward(t: &crate::kernels::amx::TileWeight, x: &Tensor) -> Result<Tensor> {
    let (n, k) = (t.out_dim(), t.in_dim());
    let rows = x.elem_count() / k.max(1);
    let x2 = x.reshape((rows, k))?.to_dtype(DType::F32)?.contiguous()?;
    let mut y = vec![0f32; rows * n];
    with_cpu_f32(&x2, |xs| {
        if rows < AMX_MIN_ROWS || !t.matmul(xs, &mut y) {
            crate::kernels::qmatvec::panel_matmul_rows(n, k, xs, &mut y, |r, row| {
                t.row_f32(r, row)
            });
        }
    })?
    .ok_or_else(|| Error::Device("AMX-packed weights run on the CPU".into()))?;
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Ok(Tensor::from_vec(y, dims, x.device())?.to_dtype(x.dtype())?)
}

/// Whether an encoder's layers (loaded for bf16 tiles) run as 16-bit integer products here: on the
/// CPU, x86 with AVX2, no AMX.
fn fixed16_encoder(opts: &LoadOptions) -> bool {
    opts.bf16_tiles
        && opts.device.is_cpu()
        && !crate::kernels::amx::available()
        && crate::kernels::fixed16::available()
}

/// `pick` of every part's weight, or `None` where one part has another form.
fn all_of<'a, T: ?Sized>(
    parts: &'a [&Linear],
    pick: impl Fn(&'a LinearWeight) -> Option<&'a T>,
) -> Option<Vec<&'a T>> {
    parts.iter().map(|p| pick(&p.weight)).collect()
}

/// A 16-bit checkpoint weight `(out, in)` packed for [`crate::kernels::fixed16`]; `None` for other
/// dtypes or an empty shape.
fn pack_fixed16(weight: &Tensor) -> Result<Option<crate::kernels::fixed16::Fixed16Weight>> {
    use crate::kernels::fixed16::Fixed16Weight;
    use half::slice::HalfFloatSliceExt;
    let (n, k) = weight.dims2()?;
    let packed = match weight.dtype() {
        DType::BF16 => with_cpu_slice::<half::bf16, _>(weight, |v| {
            Fixed16Weight::pack(n, k, |r, row| {
                v[r * k..(r + 1) * k].convert_to_f32_slice(row)
            })
        })?,
        DType::F16 => with_cpu_slice::<half::f16, _>(weight, |v| {
            Fixed16Weight::pack(n, k, |r, row| {
                v[r * k..(r + 1) * k].convert_to_f32_slice(row)
            })
        })?,
        _ => None,
    };
    Ok(packed.flatten())
}

/// `x (..., in)` times a weight packed for the 16-bit integer products (see
/// [`crate::kernels::fixed16`]).
fn fixed16_forward(f: &crate::kernels::fixed16::Fixed16Weight, x: &Tensor) -> Result<Tensor> {
    let (n, k) = (f.out_dim(), f.in_dim());
    let rows = x.elem_count() / k.max(1);
    let x2 = x.reshape((rows, k))?.to_dtype(DType::F32)?.contiguous()?;
    let mut y = vec![0f32; rows * n];
    let done = with_cpu_f32(&x2, |xs| f.matmul(xs, &mut y))?;
    if done != Some(true) {
        return Err(Error::Device(
            "16-bit packed weights run on a CPU with AVX2".into(),
        ));
    }
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Ok(Tensor::from_vec(y, dims, x.device())?.to_dtype(x.dtype())?)
}

/// `x (..., in)` times an affine-quantized weight, on the CPU in f32 (see [`crate::kernels::qmatvec`]).
fn affine_forward(q: &AffineWeight, x: &Tensor, tile_inputs: TileInputs) -> Result<Tensor> {
    affine_forward_by(q, x, |xs, y| {
        crate::kernels::qmatvec::affine_matmul_with(q, xs, y, tile_inputs)
    })
}

/// `x (..., in)` times an affine-quantized weight, the f32 rows multiplied by `product(xs, ys)`.
fn affine_forward_by(
    q: &AffineWeight,
    x: &Tensor,
    product: impl FnOnce(&[f32], &mut [f32]),
) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return Err(Error::Device(
            "an affine-quantized layer reached a non-CPU device without Linear::place".into(),
        ));
    }
    let k = q.in_dim;
    let rows = x.elem_count() / k.max(1);
    let x2 = x.reshape((rows, k))?.to_dtype(DType::F32)?.contiguous()?;
    let mut y = vec![0f32; rows * q.out_dim];
    {
        let (storage, layout) = x2.storage_and_layout();
        let xs = match &*storage {
            candle_core::Storage::Cpu(cpu) => cpu.as_slice::<f32>()?,
            _ => return Err(Error::Device("quantized weights run on the CPU".into())),
        };
        let xs = &xs[layout.start_offset()..layout.start_offset() + rows * k];
        product(xs, &mut y);
    }
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = q.out_dim;
    }
    Ok(Tensor::from_vec(y, dims, x.device())?.to_dtype(x.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104729) % 211) as f32 / 105.0 - 1.0)
            .collect()
    }

    /// The accelerator form of affine layers, run here on the CPU. 4-bit groups become candle Q4_1
    /// blocks and 8-bit groups with f16 scales Q8_0 blocks plus group offsets: both hold the weight
    /// exactly, but candle's CPU kernels round the inputs to 8 bits (hence the loose bound on the
    /// products; they also want an even number of blocks per row). 8-bit groups with f32 scales
    /// stay dense and exact.
    #[test]
    fn accelerator_form_of_affine_layers() {
        use candle_core::quantized::QMatMul;
        let dev = Device::Cpu;
        let (n, k, t) = (40, 128, 3);
        let w = values(n * k, 1);
        let xs = Tensor::from_vec(values(t * k, 2), (t, k), &dev).expect("inputs");
        let flat = |y: Tensor| -> Vec<f32> { y.flatten_all().expect("f").to_vec1().expect("v") };
        let worst =
            |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        for (bits, gs, cpu_scales) in [
            (4, 32, true),
            (4, 64, true),
            (8, 32, false),
            (8, 128, false),
            (8, 32, true),
        ] {
            let spec = QuantSpec::new(bits, gs).expect("spec");
            let q = AffineWeight::quantize(&w, n, k, spec, spec.held_scale_type(cpu_scales), "t")
                .expect("q");
            let mut exact = vec![0f32; n * k];
            for (r, row) in exact.chunks_exact_mut(k).enumerate() {
                q.dequantize_row(r, row);
            }
            let cpu = Linear::affine(q, None);
            let want = flat(cpu.forward(&xs).expect("cpu"));
            let acc = cpu.for_accelerator(&dev, DType::F32).expect("converts");
            let got = flat(acc.forward(&xs).expect("acc"));
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let what = format!("{bits}-bit g{gs}");
            // The weight each form holds, back in f32.
            let held: Vec<f32> = match acc.weight() {
                LinearWeight::Ggml(QMatMul::QTensor(qt)) if bits == 4 => {
                    flat(qt.dequantize(&dev).expect("deq"))
                }
                LinearWeight::Q8Offsets {
                    q: QMatMul::QTensor(qt),
                    offsets,
                    group_size,
                } if !cpu_scales => {
                    let offsets = offsets.to_vec2::<f32>().expect("offsets");
                    let mut v = flat(qt.dequantize(&dev).expect("deq"));
                    for (i, x) in v.iter_mut().enumerate() {
                        *x += offsets[i / k][i % k / group_size];
                    }
                    v
                }
                LinearWeight::Dense { w } if cpu_scales && bits == 8 => flat(w.clone()),
                other => panic!("{what} became {other:?}"),
            };
            let wmax = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(worst(&held, &exact) <= 1e-6 * wmax, "{what}: weight");
            let bound = if matches!(acc.weight(), LinearWeight::Dense { .. }) {
                1e-5
            } else {
                0.02
            };
            assert!(
                worst(&want, &got) <= bound * scale,
                "{what}: {} of {scale}",
                worst(&want, &got)
            );
        }
    }

    /// A stacked layer gives each part's output side by side, bit for bit, dense and quantized.
    #[test]
    fn fused_projections_equal_separate_ones() {
        let dev = Device::Cpu;
        let (k, widths) = (64, [48usize, 16, 16]);
        let x = Tensor::from_vec(values(3 * k, 9), (1, 3, k), &dev).unwrap();
        for quantized in [false, true] {
            let parts: Vec<(Linear, usize)> = widths
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    let w = values(n * k, i);
                    let bias = Some(Tensor::from_vec(values(n, 50 + i), n, &dev).unwrap());
                    let l = if quantized {
                        let spec = QuantSpec::new(4, 32).unwrap();
                        Linear::affine(
                            AffineWeight::quantize(&w, n, k, spec, ScaleType::F32, "t").unwrap(),
                            bias,
                        )
                    } else {
                        Linear::dense(&Tensor::from_vec(w, (n, k), &dev).unwrap(), bias).unwrap()
                    };
                    (l, n)
                })
                .collect();
            let separate: Vec<Vec<f32>> = parts
                .iter()
                .map(|(l, _)| {
                    l.forward(&x)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect();
            let group = ProjectionGroup::new(parts).unwrap();
            assert!(group.fused().is_some(), "quantized={quantized}: not fused");
            for (got, want) in group.forward_each(&x).unwrap().iter().zip(&separate) {
                let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(&got, want, "quantized={quantized}");
            }
        }
    }

    /// Parts that cannot be stacked (different input sizes, or biases on some parts only) stay apart.
    #[test]
    fn unstackable_parts_stay_separate() {
        let dev = Device::Cpu;
        let a = Linear::dense(&Tensor::zeros((4, 8), DType::F32, &dev).unwrap(), None).unwrap();
        let b = Linear::dense(&Tensor::zeros((4, 16), DType::F32, &dev).unwrap(), None).unwrap();
        let c = Linear::dense(
            &Tensor::zeros((4, 8), DType::F32, &dev).unwrap(),
            Some(Tensor::zeros(4, DType::F32, &dev).unwrap()),
        )
        .unwrap();
        assert!(Linear::fuse(&[&a, &b]).unwrap().is_none());
        assert!(Linear::fuse(&[&a, &c]).unwrap().is_none());
        assert!(Linear::fuse(&[&a, &a]).unwrap().is_some());
    }
}
