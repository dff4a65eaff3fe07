//! Per-layer key/value cache, preallocated to the request's length so that appending a token writes
//! in place instead of concatenating.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    capacity: usize,
    len: usize,
    /// The type positions are stored in; `None`: as the model computes them.
    dtype: Option<DType>,
}

impl KvCache {
    pub fn new(num_layers: usize, capacity: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            capacity,
            len: 0,
            dtype: None,
        }
    }

    /// This cache storing keys and values in `dtype` (e.g. f16 for an f32 model: half the memory
    /// and half the bytes each decoded token reads), or as computed with `None`.
    pub fn with_dtype(self, dtype: Option<DType>) -> Self {
        Self { dtype, ..self }
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Write `k`, `v` `(b, kv_heads, t, d)` of `layer` after the cached positions and return the keys and
    /// values of all positions so far, in the cache's type. The caller moves the length forward with
    /// [`KvCache::advance`] once every layer has appended.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.dtype {
            Some(dt) => (k.to_dtype(dt)?, v.to_dtype(dt)?),
            None => (k.clone(), v.clone()),
        };
        let (b, h, t, d) = k.dims4()?;
        let end = self.len + t;
        if end > self.capacity {
            return Err(Error::ModelInput(format!(
                "KV cache holds {} positions, {end} needed",
                self.capacity
            )));
        }
        let slot = &mut self.layers[layer];
        if slot.is_none() {
            let zeros = Tensor::zeros((b, h, self.capacity, d), k.dtype(), k.device())?;
            *slot = Some((zeros.clone(), zeros.copy()?));
        }
        let (kc, vc) = slot
            .as_ref()
            .ok_or_else(|| Error::Internal("KV cache slot missing".into()))?;
        kc.slice_set(&k, 2, self.len)?;
        vc.slice_set(&v, 2, self.len)?;
        // Views of the valid prefix: the matmuls read them strided, nothing is copied per token.
        Ok((kc.narrow(2, 0, end)?, vc.narrow(2, 0, end)?))
    }

    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
