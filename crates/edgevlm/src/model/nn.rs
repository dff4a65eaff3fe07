//! Layers shared by the vision encoder and the text decoder.
//!
//! [`Linear`] holds its weight as a `QMatMul`, so a quantized weight can stand in for a dense one
//! without touching the model code: only the loader decides which kind it builds.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};

use crate::error::Result;
use crate::weights::WeightStore;

/// How a model's weights are materialised: dtype and device.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
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

    /// A tensor kept in f32 whatever the model dtype (position tables, norms that HF runs in f32).
    pub fn get_f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.store
            .get(&self.path(name), shape, DType::F32, &self.opts.device)
    }
}

/// The weight of a linear layer.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// Dense `(out, in)`, contiguous, as checkpoints store it: one token runs the row-wise mat-vec
    /// kernel, several tokens the GEMM on the transposed view.
    Dense { w: Tensor },
    /// Quantized (candle's `QMatMul`: k-quants, Q4/Q8 blocks).
    Quantized(QMatMul),
}

/// `y = x Wᵀ + b`, with `W` dense or quantized.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = w.get("weight", &[out_dim, in_dim])?;
        let bias = if bias {
            Some(w.get("bias", &[out_dim])?)
        } else {
            None
        };
        Self::dense(&weight, bias)
    }

    /// From a dense `(out, in)` weight as checkpoints store it.
    pub fn dense(weight: &Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            weight: LinearWeight::Dense {
                w: weight.contiguous()?,
            },
            bias,
        })
    }

    pub fn quantized(weight: QMatMul, bias: Option<Tensor>) -> Self {
        Self {
            weight: LinearWeight::Quantized(weight),
            bias,
        }
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
            LinearWeight::Quantized(q) => q.forward(x)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
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
