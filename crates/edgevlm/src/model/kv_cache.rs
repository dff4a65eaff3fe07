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

    /// A compact copy of the first `len` positions.
    pub fn prefix(&self, len: usize) -> Result<KvCache> {
        if len > self.len {
            return Err(Error::Internal(format!(
                "a prefix of {len} positions from a cache of {}",
                self.len
            )));
        }
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(match l {
                Some((k, v)) => Some((k.narrow(2, 0, len)?.copy()?, v.narrow(2, 0, len)?.copy()?)),
                None => None,
            });
        }
        Ok(KvCache {
            layers,
            capacity: len,
            len,
            dtype: self.dtype,
        })
    }

    /// This (empty) cache holding a copy of the first `len` positions of `other`.
    pub fn with_prefix_of(mut self, other: &KvCache, len: usize) -> Result<KvCache> {
        if self.len != 0 || len > other.len || len > self.capacity || self.dtype != other.dtype {
            return Err(Error::Internal(format!(
                "cannot start a cache of {} positions from {len} of another",
                self.capacity
            )));
        }
        for (mine, theirs) in self.layers.iter_mut().zip(&other.layers) {
            let Some((k, v)) = theirs else { continue };
            let (b, h, _, d) = k.dims4()?;
            let kc = Tensor::zeros((b, h, self.capacity, d), k.dtype(), k.device())?;
            let vc = kc.copy()?;
            kc.slice_set(&k.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            vc.slice_set(&v.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            *mine = Some((kc, vc));
        }
        self.len = len;
        Ok(self)
    }

    /// Bytes the cache's tensors hold.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}
