//! Idefics3's connector: pixel shuffle of the SigLIP patch grid, then the modality projection.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::nn::{Linear, Weights};

/// The pixel-shuffle connector: `(b, side², d)` → `(b, side²/s², d·s²)`, then the modality projection.
pub struct Connector {
    proj: Linear,
    scale: usize,
}

impl Connector {
    /// Load from `model.connector.*`.
    pub fn load(
        w: &Weights,
        vision_hidden: usize,
        text_hidden: usize,
        scale: usize,
    ) -> Result<Self> {
        let inp = vision_hidden * scale * scale;
        Ok(Self {
            proj: Linear::load(
                &w.pp("modality_projection").pp("proj"),
                inp,
                text_hidden,
                false,
            )?,
            scale,
        })
    }

    pub fn pixel_shuffle(&self, x: &Tensor) -> Result<Tensor> {
        let (b, seq, d) = x.dims3()?;
        let side = (seq as f64).sqrt() as usize;
        let s = self.scale;
        if side * side != seq || !side.is_multiple_of(s) {
            return Err(Error::ModelInput(format!(
                "pixel shuffle needs a square patch grid divisible by {s}, got {seq} patches"
            )));
        }
        // The same view/permute sequence as HF's `Idefics3Connector.pixel_shuffle`.
        let x = x
            .reshape((b, side, side / s, d * s))?
            .permute((0, 2, 1, 3))?
            .contiguous()?
            .reshape((b, side / s, side / s, d * s * s))?
            .permute((0, 2, 1, 3))?
            .contiguous()?
            .reshape((b, seq / (s * s), d * s * s))?;
        Ok(x)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.forward(&self.pixel_shuffle(x)?)
    }
}
