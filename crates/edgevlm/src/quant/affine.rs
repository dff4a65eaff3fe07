//! MLX-style affine group quantization: per group of `group_size` input weights, `w ≈ scale · q + bias`
//! with `q` an unsigned `bits`-bit integer, packed little-end first into u32 words (8 four-bit or four
//! eight-bit values per word), `scales` and `biases` of shape `(out, in / group_size)`.
//!
//! This is the layout mlx-community publishes; dequantisation here is bit-exact with `mx.dequantize`.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// The floating type scales and biases are stored in (and that MLX dequantises to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleType {
    F32,
    F16,
    BF16,
}

impl ScaleType {
    /// Round an f32 to this type and back.
    #[inline]
    pub fn round(self, x: f32) -> f32 {
        match self {
            ScaleType::F32 => x,
            ScaleType::F16 => f16::from_f32(x).to_f32(),
            ScaleType::BF16 => bf16::from_f32(x).to_f32(),
        }
    }
}

/// A quantization as a checkpoint declares it: MLX's affine groups of 2, 3, 4, 5, 6 or 8 bits, the
/// codes one little-endian bit stream over each row's u32 words. Widths other than 4 and 8 are read
/// by widening the codes to 4 bits (2, 3) or 8 bits (5, 6): the same values, run by the 4- and 8-bit
/// kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredSpec {
    pub bits: u32,
    pub group_size: usize,
}

impl StoredSpec {
    pub fn new(bits: u32, group_size: usize) -> Result<Self> {
        if !matches!(bits, 2 | 3 | 4 | 5 | 6 | 8) {
            return Err(Error::Unsupported(format!(
                "{bits}-bit quantization (2, 3, 4, 5, 6 or 8)"
            )));
        }
        QuantSpec::new(4, group_size)?;
        Ok(Self { bits, group_size })
    }

    /// The spec the layer runs as.
    pub fn compute(&self) -> QuantSpec {
        QuantSpec {
            bits: if self.bits <= 4 { 4 } else { 8 },
            group_size: self.group_size,
        }
    }

    /// u32 words per row of `in_dim` codes.
    pub fn words(&self, in_dim: usize) -> usize {
        in_dim * self.bits as usize / 32
    }

    /// Rows of `in_dim` codes stored at this width, repacked at the compute width (unchanged for 4
    /// and 8 bits).
    pub fn widen(&self, packed: Vec<u32>, in_dim: usize) -> Vec<u32> {
        let to = self.compute();
        if to.bits == self.bits {
            return packed;
        }
        let (bits, per_word) = (self.bits as usize, to.per_word());
        let mask = (1u64 << bits) - 1;
        let mut out = vec![0u32; packed.len() / self.words(in_dim).max(1) * in_dim / per_word];
        for (src, dst) in packed
            .chunks_exact(self.words(in_dim))
            .zip(out.chunks_exact_mut(in_dim / per_word))
        {
            for i in 0..in_dim {
                // Code i: bits i·b .. (i+1)·b of the row's stream, at most two words.
                let (at, shift) = ((i * bits) / 32, (i * bits) % 32);
                let lo = u64::from(src[at]);
                let hi = src.get(at + 1).map_or(0, |&w| u64::from(w));
                let q = ((lo | hi << 32) >> shift) & mask;
                dst[i / per_word] |= (q as u32) << (to.bits as usize * (i % per_word));
            }
        }
        out
    }
}

/// Group size when none is named, for quantizing on load and for written checkpoints alike: groups of
/// 32 keep SmolLM2's requantized Q4_1 lossless where 64 loses a third of its top-1 agreement
/// (benches/README.md), for 1/8 more bytes than groups of 64 at 4 bits.
pub const DEFAULT_GROUP_SIZE: usize = 32;

/// Quantization settings of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantSpec {
    pub bits: u32,
    pub group_size: usize,
}

impl QuantSpec {
    pub fn new(bits: u32, group_size: usize) -> Result<Self> {
        if !matches!(bits, 4 | 8) {
            return Err(Error::Unsupported(format!(
                "{bits}-bit quantization (4 or 8)"
            )));
        }
        if !matches!(group_size, 32 | 64 | 128) {
            return Err(Error::Unsupported(format!(
                "group size {group_size} (32, 64 or 128)"
            )));
        }
        Ok(Self { bits, group_size })
    }

    pub fn per_word(&self) -> usize {
        32 / self.bits as usize
    }

    pub fn max_q(&self) -> u32 {
        (1 << self.bits) - 1
    }

    /// The type quantize-on-load keeps scales and biases in for a layer that runs on the CPU (`cpu`)
    /// or on CUDA / Metal. On the CPU: f16 for 4-bit groups (its rounding moves a value by at most
    /// 15 · 2⁻¹¹ of a step), f32 for 8-bit ones, where f16 would move the top code by up to
    /// 255 · 2⁻¹¹, an eighth of a step, on top of the rounding to the grid. Elsewhere always f16,
    /// which lets 8-bit groups run as ggml Q8_0 blocks instead of dense
    /// ([`AffineWeight::to_q8_0_blocks`]). Measured with `quant-eval` over 2,040 tokens, f16 scales
    /// take 8g32 from 95.00% top-1 / KLD 0.00031 to 93.82% / 0.00032 on the random SmolVLM-256M, and
    /// from lossless to 99.66% / 0.00002 on SmolLM2-135M.
    pub fn held_scale_type(&self, cpu: bool) -> ScaleType {
        if self.bits == 4 || !cpu {
            ScaleType::F16
        } else {
            ScaleType::F32
        }
    }
}

/// The stored tensors of a quantized layer, before their shapes are checked.
#[derive(Clone, Debug)]
pub struct AffineParts {
    pub packed: Vec<u32>,
    pub scales: Vec<f32>,
    pub biases: Vec<f32>,
    pub scale_type: ScaleType,
}

/// The per-group scales or biases of a quantized layer. Held in f16 when every scale and bias of the
/// layer is exactly an f16 (GGUF blocks always are, the f16/bf16 values of MLX checkpoints nearly always,
/// and quantizing on load rounds 4-bit groups to f16): 4 bytes per group instead of 8, which matters to decode, as it
/// reads every weight once per token. Otherwise f32.
#[derive(Clone, Debug, PartialEq)]
pub enum GroupValues {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl GroupValues {
    /// Scales and biases, both in f16 when every value of both is exactly an f16.
    pub fn pair(scales: Vec<f32>, biases: Vec<f32>) -> (Self, Self) {
        let exact = |v: &[f32]| v.iter().all(|&x| f16::from_f32(x).to_f32() == x);
        if exact(&scales) && exact(&biases) {
            let half = |v: Vec<f32>| Self::F16(v.into_iter().map(f16::from_f32).collect());
            (half(scales), half(biases))
        } else {
            (Self::F32(scales), Self::F32(biases))
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::F16(v) => v.len(),
            Self::F32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_f16(&self) -> bool {
        matches!(self, Self::F16(_))
    }

    /// Whether every value is exactly an f16 (held in f16 or not).
    pub fn holds_f16(&self) -> bool {
        match self {
            Self::F16(_) => true,
            Self::F32(v) => v.iter().all(|&x| f16::from_f32(x).to_f32() == x),
        }
    }

    /// Value `i` in f32 (exact).
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Self::F16(v) => v[i].to_f32(),
            Self::F32(v) => v[i],
        }
    }

    /// Values `start..start + out.len()` in f32 (exact).
    pub fn read(&self, start: usize, out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        let end = start + out.len();
        match self {
            Self::F16(v) => v[start..end].convert_to_f32_slice(out),
            Self::F32(v) => out.copy_from_slice(&v[start..end]),
        }
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            Self::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Self::F32(v) => v.clone(),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Self::F16(v) => 2 * v.len(),
            Self::F32(v) => 4 * v.len(),
        }
    }

    /// The address of the first value, for the kernels (which read f16 or f32 as [`Self::is_f16`] says).
    pub(crate) fn as_ptr(&self) -> *const u8 {
        match self {
            Self::F16(v) => v.as_ptr() as *const u8,
            Self::F32(v) => v.as_ptr() as *const u8,
        }
    }

    /// `len` zeros of this value type.
    fn zeros(&self, len: usize) -> Self {
        match self {
            Self::F16(_) => Self::F16(vec![f16::ZERO; len]),
            Self::F32(_) => Self::F32(vec![0.0; len]),
        }
    }

    /// Item `to` set to `src`'s item `from` (both of the same value type).
    fn copy_item(&mut self, to: usize, src: &GroupValues, from: usize) {
        match (self, src) {
            (Self::F16(d), Self::F16(s)) => d[to] = s[from],
            (Self::F32(d), Self::F32(s)) => d[to] = s[from],
            (Self::F16(d), s) => d[to] = f16::from_f32(s.get(from)),
            (Self::F32(d), s) => d[to] = s.get(from),
        }
    }

    /// Several concatenated: f16 when all are.
    fn concat(parts: &[&GroupValues]) -> GroupValues {
        if parts.iter().all(|p| p.is_f16()) {
            Self::F16(
                parts
                    .iter()
                    .flat_map(|p| match p {
                        Self::F16(v) => v.iter().copied(),
                        Self::F32(_) => unreachable!("all parts are f16"),
                    })
                    .collect(),
            )
        } else {
            Self::F32(parts.iter().flat_map(|p| p.to_f32_vec()).collect())
        }
    }
}

/// Rows per tile of the [`CodeLayout::Tiles`] layout.
pub const TILE_ROWS: usize = 16;

/// How a layer's packed words, scales and biases are ordered in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeLayout {
    /// Row-major, as checkpoints store them: row `r`'s word `d` at `r · words + d`, its group `g`'s
    /// scale and bias at `r · groups + g`.
    Rows,
    /// Tiles of [`TILE_ROWS`] rows, each column-major: word `d` of row `r` at
    /// `(r / 16) · 16 · words + 16 · d + r % 16`, group values likewise. Word `d` of sixteen rows is
    /// one 64-byte line, so a vector kernel gets one lane per row with a single load (the kernels of
    /// `kernels::qtiles`). Every layer is held so once loaded, a last tile of fewer rows padded
    /// with zeros.
    Tiles,
}

/// A quantized `(out, in)` weight.
#[derive(Clone, Debug)]
pub struct AffineWeight {
    pub spec: QuantSpec,
    pub out_dim: usize,
    pub in_dim: usize,
    /// `(out, in / per_word)` packed codes, ordered as `layout` says.
    pub packed: Vec<u32>,
    /// `(out, in / group_size)`, exact copies of the stored values (both f16 or both f32), ordered
    /// as `layout` says.
    pub scales: GroupValues,
    pub biases: GroupValues,
    /// The type the checkpoint stored scales/biases in.
    pub scale_type: ScaleType,
    pub layout: CodeLayout,
}

impl AffineWeight {
    /// Check the shapes of packed codes, scales and biases for an `(out, in)` layer; `what` names the
    /// layer in errors.
    pub fn from_parts(
        spec: QuantSpec,
        out_dim: usize,
        in_dim: usize,
        parts: AffineParts,
        what: &str,
    ) -> Result<Self> {
        let AffineParts {
            packed,
            scales,
            biases,
            scale_type,
        } = parts;
        let bad = |m: String| Error::Weights(format!("{what}: {m}"));
        if !in_dim.is_multiple_of(spec.group_size) {
            return Err(bad(format!(
                "input size {in_dim} is not a multiple of the group size {}",
                spec.group_size
            )));
        }
        let words = in_dim / spec.per_word();
        if packed.len() != out_dim * words {
            return Err(bad(format!(
                "packed weight has {} words, expected {out_dim} x {words} for {}-bit codes",
                packed.len(),
                spec.bits
            )));
        }
        let groups = out_dim * (in_dim / spec.group_size);
        if scales.len() != groups || biases.len() != groups {
            return Err(bad(format!(
                "scales/biases have {}/{} entries, expected {groups}",
                scales.len(),
                biases.len()
            )));
        }
        let (scales, biases) = GroupValues::pair(scales, biases);
        Ok(Self {
            spec,
            out_dim,
            in_dim,
            packed,
            scales,
            biases,
            scale_type,
            layout: CodeLayout::Rows,
        }
        .in_kernel_layout())
    }

    /// Quantize a row-major `(out, in)` f32 weight group by group (a least-squares fit per group that
    /// also tries the grid the values already lie on), with scales and biases rounded to `store` (the
    /// type they will be kept or written in) and the codes then chosen anew for the rounded values,
    /// so that they fit what is stored. `F16` falls back to f32 for a layer whose scales leave f16's
    /// normal range (they would lose precision).
    pub fn quantize(
        w: &[f32],
        out_dim: usize,
        in_dim: usize,
        spec: QuantSpec,
        store: ScaleType,
        what: &str,
    ) -> Result<Self> {
        if w.len() != out_dim * in_dim {
            return Err(Error::Weights(format!(
                "{what}: weight has {} values, expected {out_dim} x {in_dim}",
                w.len()
            )));
        }
        Self::quantize_rows(out_dim, in_dim, spec, store, what, |r0, rows| {
            rows.copy_from_slice(&w[r0 * in_dim..r0 * in_dim + rows.len()])
        })
    }

    /// [`Self::quantize`] with the weight read a block of rows at a time: `fill(r0, rows)` writes rows
    /// `r0..` (as many as `rows` holds) in f32. Loading quantizes straight from the checkpoint's
    /// stored values this way, never holding an f32 copy of the whole layer (an LM head of 49,152 ×
    /// 576 is 113 MB in f32). Each block is read twice where scales are rounded to a 16-bit type.
    pub fn quantize_rows(
        out_dim: usize,
        in_dim: usize,
        spec: QuantSpec,
        store: ScaleType,
        what: &str,
        mut fill: impl FnMut(usize, &mut [f32]),
    ) -> Result<Self> {
        if !in_dim.is_multiple_of(spec.group_size) {
            return Err(Error::Weights(format!(
                "{what}: input size {in_dim} is not a multiple of the group size {} (choose 32 or 64)",
                spec.group_size
            )));
        }
        /// Rows per block: 256 rows of 3,072 inputs are 3 MB of f32.
        const BLOCK_ROWS: usize = 256;
        let gs = spec.group_size;
        let words_per_row = in_dim / spec.per_word();
        let max_q = spec.max_q() as f32;
        let groups_per_row = in_dim / gs;
        let mut packed = vec![0u32; out_dim * words_per_row];
        let mut scales = vec![0f32; out_dim * groups_per_row];
        let mut biases = vec![0f32; out_dim * groups_per_row];
        let mut block = vec![0f32; BLOCK_ROWS.min(out_dim) * in_dim];
        // Each block of rows through `f`, with its slices of the codes, scales and biases.
        let mut blocks =
            |f: &GroupFn, packed: &mut [u32], scales: &mut [f32], biases: &mut [f32]| {
                for r0 in (0..out_dim).step_by(BLOCK_ROWS) {
                    let n = BLOCK_ROWS.min(out_dim - r0);
                    let rows = &mut block[..n * in_dim];
                    fill(r0, rows);
                    let groups = r0 * groups_per_row..(r0 + n) * groups_per_row;
                    each_group(
                        rows,
                        spec,
                        in_dim,
                        (
                            &mut packed[r0 * words_per_row..(r0 + n) * words_per_row],
                            &mut scales[groups.clone()],
                            &mut biases[groups],
                        ),
                        f,
                    );
                }
            };
        let four = spec.bits == 4;
        blocks(
            &|g, s, b, codes| (*s, *b) = fit_group(g, max_q, four, codes),
            &mut packed,
            &mut scales,
            &mut biases,
        );
        let fits_f16 = || {
            let normal = |x: f32| x == 0.0 || (6.103_515_6e-5..=65504.0).contains(&x.abs());
            scales.iter().all(|&s| normal(s)) && biases.iter().all(|&b| b.abs() <= 65504.0)
        };
        let store = match store {
            ScaleType::F16 if !fits_f16() => ScaleType::F32,
            other => other,
        };
        if store != ScaleType::F32 {
            // Round scales and biases to the stored type, then choose the codes for those values.
            blocks(
                &|g, s, b, codes| {
                    (*s, *b) = (store.round(*s), store.round(*b));
                    round_codes(g, *s, *b, max_q, codes);
                },
                &mut packed,
                &mut scales,
                &mut biases,
            );
        }
        let (scales, biases) = GroupValues::pair(scales, biases);
        Ok(Self {
            spec,
            out_dim,
            in_dim,
            packed,
            scales,
            biases,
            scale_type: store,
            layout: CodeLayout::Rows,
        }
        .in_kernel_layout())
    }

    /// Layers of the same input size and format stacked row-wise into one (`None` when they differ):
    /// the products of a fused projection.
    pub fn stack_rows(parts: &[&AffineWeight]) -> Option<AffineWeight> {
        let first = parts.first()?;
        if parts.iter().any(|p| {
            p.spec != first.spec || p.in_dim != first.in_dim || p.scale_type != first.scale_type
        }) {
            return None;
        }
        let rows: Vec<AffineWeight> = parts.iter().map(|p| (*p).clone().into_rows()).collect();
        Some(
            AffineWeight {
                spec: first.spec,
                out_dim: parts.iter().map(|p| p.out_dim).sum(),
                in_dim: first.in_dim,
                packed: rows.iter().flat_map(|p| p.packed.iter().copied()).collect(),
                scales: GroupValues::concat(&rows.iter().map(|p| &p.scales).collect::<Vec<_>>()),
                biases: GroupValues::concat(&rows.iter().map(|p| &p.biases).collect::<Vec<_>>()),
                scale_type: first.scale_type,
                layout: CodeLayout::Rows,
            }
            .in_kernel_layout(),
        )
    }

    /// Packed words per row.
    pub fn words_per_row(&self) -> usize {
        self.in_dim / self.spec.per_word()
    }

    /// Groups per row.
    pub fn groups(&self) -> usize {
        self.in_dim / self.spec.group_size
    }

    /// Where row `r`'s item `i` of `per_row` lies in `packed` (items: words) or in `scales` /
    /// `biases` (items: groups), under this layer's layout.
    #[inline]
    fn item_at(&self, r: usize, i: usize, per_row: usize) -> usize {
        match self.layout {
            CodeLayout::Rows => r * per_row + i,
            CodeLayout::Tiles => {
                (r / TILE_ROWS) * TILE_ROWS * per_row + i * TILE_ROWS + r % TILE_ROWS
            }
        }
    }

    /// Index of row `r`'s packed word `d` in `packed`.
    #[inline]
    pub fn word_at(&self, r: usize, d: usize) -> usize {
        self.item_at(r, d, self.words_per_row())
    }

    /// Index of row `r`'s group `g` in `scales` and `biases`.
    #[inline]
    pub fn value_at(&self, r: usize, g: usize) -> usize {
        self.item_at(r, g, self.groups())
    }

    /// Row `r`'s packed words into `out` (`words_per_row` of them).
    pub fn row_words(&self, r: usize, out: &mut [u32]) {
        match self.layout {
            CodeLayout::Rows => {
                let n = self.words_per_row();
                out[..n].copy_from_slice(&self.packed[r * n..(r + 1) * n]);
            }
            CodeLayout::Tiles => {
                for (d, o) in out[..self.words_per_row()].iter_mut().enumerate() {
                    *o = self.packed[self.word_at(r, d)];
                }
            }
        }
    }

    /// Row `r`'s group scales and biases in f32 (`groups` each).
    pub fn row_values(&self, r: usize, scales: &mut [f32], biases: &mut [f32]) {
        match self.layout {
            CodeLayout::Rows => {
                let n = self.groups();
                self.scales.read(r * n, &mut scales[..n]);
                self.biases.read(r * n, &mut biases[..n]);
            }
            CodeLayout::Tiles => {
                for g in 0..self.groups() {
                    let at = self.value_at(r, g);
                    (scales[g], biases[g]) = (self.scales.get(at), self.biases.get(at));
                }
            }
        }
    }

    /// The layout the CPU kernels run this layer in: [`CodeLayout::Tiles`] (a last tile of fewer
    /// than 16 rows padded with zero codes, scales and biases).
    pub fn in_kernel_layout(self) -> Self {
        self.relaid(CodeLayout::Tiles)
    }

    /// This layer in row-major order (as checkpoints hold it).
    pub fn into_rows(self) -> Self {
        self.relaid(CodeLayout::Rows)
    }

    /// Rows stored under `layout`: whole tiles for [`CodeLayout::Tiles`].
    fn stored_rows(&self, layout: CodeLayout) -> usize {
        match layout {
            CodeLayout::Rows => self.out_dim,
            CodeLayout::Tiles => self.out_dim.next_multiple_of(TILE_ROWS),
        }
    }

    /// This layer with its words and group values moved to `layout`'s places.
    fn relaid(self, layout: CodeLayout) -> Self {
        if self.layout == layout {
            return self;
        }
        let rows = self.stored_rows(layout);
        let mut out = Self {
            layout,
            packed: vec![0; rows * self.words_per_row()],
            scales: self.scales.zeros(rows * self.groups()),
            biases: self.biases.zeros(rows * self.groups()),
            ..self.clone()
        };
        for r in 0..self.out_dim {
            for d in 0..self.words_per_row() {
                let to = out.word_at(r, d);
                out.packed[to] = self.packed[self.word_at(r, d)];
            }
            for g in 0..self.groups() {
                let (from, to) = (self.value_at(r, g), out.value_at(r, g));
                out.scales.copy_item(to, &self.scales, from);
                out.biases.copy_item(to, &self.biases, from);
            }
        }
        out
    }

    /// Row `r` dequantized to f32 (`scale · q + bias`, multiply then add, in f32).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let per_word = self.spec.per_word();
        let gs = self.spec.group_size;
        let groups = self.in_dim / gs;
        let words_per_group = gs / per_word;
        let bits = self.spec.bits as usize;
        let mask = self.spec.max_q();
        for (g, dst) in out[..self.in_dim]
            .chunks_exact_mut(gs)
            .enumerate()
            .take(groups)
        {
            let at = self.value_at(r, g);
            let (s, b) = (self.scales.get(at), self.biases.get(at));
            for (i, d) in dst.chunks_exact_mut(per_word).enumerate() {
                let w = self.packed[self.word_at(r, g * words_per_group + i)];
                for (j, v) in d.iter_mut().enumerate() {
                    *v = s * ((w >> (bits * j)) & mask) as f32 + b;
                }
            }
        }
    }

    /// The layer as ggml Q4_1 blocks, the 4-bit type candle's CUDA and Metal backends run: per 32
    /// inputs an f16 scale `d` and minimum `m`, then 16 bytes of codes (input `j` in the low nibble of
    /// byte `j`, input `j + 16` in the high one), each value `d · q + m` computed in f32 as
    /// [`Self::dequantize_row`] does. `None` unless that is exact: 4-bit codes with scales and biases
    /// that are f16 values (groups of 64 or 128 repeat theirs over 2 or 4 blocks).
    pub fn to_q4_1_blocks(&self) -> Option<Vec<u8>> {
        if self.spec.bits != 4 {
            return None;
        }
        if !self.scales.holds_f16() || !self.biases.holds_f16() {
            return None;
        }
        let gs = self.spec.group_size;
        let blocks_per_row = self.in_dim / 32;
        let mut out = Vec::with_capacity(self.out_dim * blocks_per_row * 20);
        let mut words = vec![0u32; self.words_per_row()];
        for r in 0..self.out_dim {
            self.row_words(r, &mut words);
            for b in 0..blocks_per_row {
                let g = self.value_at(r, b * 32 / gs);
                out.extend_from_slice(&f16::from_f32(self.scales.get(g)).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(self.biases.get(g)).to_le_bytes());
                let code = |e: usize| ((words[b * 4 + e / 8] >> (4 * (e % 8))) & 0xF) as u8;
                out.extend((0..16).map(|j| code(j) | code(j + 16) << 4));
            }
        }
        Some(out)
    }

    /// The layer in ggml Q8_0 blocks, the 8-bit type candle's CUDA and Metal backends run, plus one
    /// offset per group (row-major `(out, groups)`): Q8_0 is symmetric (`d · q` with `q` in
    /// -128..=127), so each block holds the codes minus 128 with `d` the group's scale, and the group's
    /// offset `b + 128 · s` multiplies the sum of the group's inputs. `None` unless 8-bit codes with
    /// scales that are f16 values (the biases go into the offsets in f32).
    pub fn to_q8_0_blocks(&self) -> Option<(Vec<u8>, Vec<f32>)> {
        if self.spec.bits != 8 || !self.scales.holds_f16() {
            return None;
        }
        let (gs, groups) = (self.spec.group_size, self.in_dim / self.spec.group_size);
        let blocks_per_row = self.in_dim / 32;
        let mut words = vec![0u32; self.words_per_row()];
        let mut blocks = Vec::with_capacity(self.out_dim * blocks_per_row * 34);
        for r in 0..self.out_dim {
            self.row_words(r, &mut words);
            for b in 0..blocks_per_row {
                let g = self.value_at(r, b * 32 / gs);
                blocks.extend_from_slice(&f16::from_f32(self.scales.get(g)).to_le_bytes());
                blocks.extend(words[b * 8..(b + 1) * 8].iter().flat_map(|w| {
                    // Code c in 0..=255 as the i8 c - 128: its byte is c with the top bit flipped.
                    w.to_le_bytes().map(|c| c ^ 0x80)
                }));
            }
        }
        let offsets = (0..self.out_dim * groups)
            .map(|i| self.value_at(i / groups, i % groups))
            .map(|g| self.biases.get(g) + 128.0 * self.scales.get(g))
            .collect();
        Some((blocks, offsets))
    }

    /// The whole weight as MLX's `mx.dequantize` returns it: the product and the sum are each rounded to
    /// the scale type (`round(round(s · q) + b)`), which is bit-exact with MLX for f32, f16 and bf16.
    /// (The kernels compute `s · q + b` in f32, slightly more precisely.)
    pub fn dequantize_like_mlx(&self) -> Vec<f32> {
        let per_word = self.spec.per_word();
        let gs = self.spec.group_size;
        let (bits, mask, st) = (self.spec.bits as usize, self.spec.max_q(), self.scale_type);
        let mut out = vec![0f32; self.out_dim * self.in_dim];
        let mut words = vec![0u32; self.words_per_row()];
        for (r, row) in out.chunks_exact_mut(self.in_dim).enumerate() {
            self.row_words(r, &mut words);
            for (i, v) in row.iter_mut().enumerate() {
                let g = self.value_at(r, i / gs);
                let q = (words[i / per_word] >> (bits * (i % per_word))) & mask;
                *v = st.round(st.round(self.scales.get(g) * q as f32) + self.biases.get(g));
            }
        }
        out
    }
}

/// What [`each_group`] runs per group: the group's values, its scale and bias, its codes.
type GroupFn<'a> = dyn Fn(&[f32], &mut f32, &mut f32, &mut [u32]) + Sync + 'a;

/// For every group of the row-major `(out, in_dim)` weight `w`, rows in parallel: `f(values, scale,
/// bias, codes)` sets the group's scale, bias and codes, and the codes are packed into `packed`.
fn each_group(
    w: &[f32],
    spec: QuantSpec,
    in_dim: usize,
    (packed, scales, biases): (&mut [u32], &mut [f32], &mut [f32]),
    f: &GroupFn<'_>,
) {
    let gs = spec.group_size;
    let words_per_group = gs / spec.per_word();
    let groups_per_row = in_dim / gs;
    packed
        .par_chunks_mut(in_dim / spec.per_word())
        .zip(scales.par_chunks_mut(groups_per_row))
        .zip(biases.par_chunks_mut(groups_per_row))
        .zip(w.par_chunks(in_dim))
        .for_each(|(((words, sc), bi), row)| {
            let mut codes = vec![0u32; gs];
            for ((group, (s, b)), gw) in row
                .chunks_exact(gs)
                .zip(sc.iter_mut().zip(bi.iter_mut()))
                .zip(words.chunks_exact_mut(words_per_group))
            {
                f(group, s, b, &mut codes);
                pack_codes(&codes, spec, gw);
            }
        });
}

/// `codes` packed little-end first into `words` (8 four-bit or 4 eight-bit codes per word).
fn pack_codes(codes: &[u32], spec: QuantSpec, words: &mut [u32]) {
    let per_word = spec.per_word();
    for (word, chunk) in words.iter_mut().zip(codes.chunks(per_word)) {
        *word = chunk
            .iter()
            .enumerate()
            .fold(0, |acc, (j, &q)| acc | q << (spec.bits as usize * j));
    }
}

/// Codes for `w` under scale `s` and bias `b`; returns the squared error. Groups of whole vectors
/// run sixteen values at a time on AVX-512 (the same codes; the error summed in another order).
fn round_codes(w: &[f32], s: f32, b: f32, max_q: f32, codes: &mut [u32]) -> f32 {
    let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
    #[cfg(target_arch = "x86_64")]
    if w.len().is_multiple_of(16) && codes.len() == w.len() && crate::kernels::has_avx512f() {
        // SAFETY: the CPU has AVX-512F; `w` and `codes` are the same whole number of vectors.
        return unsafe { round_codes_avx512(w, s, b, inv, max_q, codes) };
    }
    let mut err = 0.0;
    for (c, &x) in codes.iter_mut().zip(w) {
        // Clamped to [0, max_q] first, so adding 0.5 and truncating rounds half up without a libm call.
        *c = (((x - b) * inv).clamp(0.0, max_q) + 0.5) as u32;
        let q = *c as f32;
        let d = x - (s * q + b);
        err += d * d;
    }
    err
}

/// The four sums of [`refit`] (`Σq`, `Σw`, `Σq²`, `Σqw`, in f64) eight values at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn refit_sums_avx512(w: &[f32], codes: &[u32]) -> [f64; 4] {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_pd(); 4];
    for i in (0..w.len()).step_by(8) {
        let q = _mm512_cvtepu32_pd(_mm256_loadu_si256(codes.as_ptr().add(i).cast()));
        let x = _mm512_cvtps_pd(_mm256_loadu_ps(w.as_ptr().add(i)));
        acc[0] = _mm512_add_pd(acc[0], q);
        acc[1] = _mm512_add_pd(acc[1], x);
        acc[2] = _mm512_fmadd_pd(q, q, acc[2]);
        acc[3] = _mm512_fmadd_pd(q, x, acc[3]);
    }
    acc.map(|a| _mm512_reduce_add_pd(a))
}

/// [`round_codes`] sixteen values at a time, with the scalar loop's operations in its order (a NaN
/// input gives code 0, as the scalar cast does).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_codes_avx512(
    w: &[f32],
    s: f32,
    b: f32,
    inv: f32,
    max_q: f32,
    codes: &mut [u32],
) -> f32 {
    use std::arch::x86_64::*;
    let (sv, bv, iv) = (_mm512_set1_ps(s), _mm512_set1_ps(b), _mm512_set1_ps(inv));
    let (zero, top, half) = (
        _mm512_setzero_ps(),
        _mm512_set1_ps(max_q),
        _mm512_set1_ps(0.5),
    );
    let mut err = _mm512_setzero_ps();
    for i in (0..w.len()).step_by(16) {
        let x = _mm512_loadu_ps(w.as_ptr().add(i));
        // max(t, 0) returns 0 for a NaN t, as `NaN as u32` is 0.
        let t = _mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(x, bv), iv), zero);
        let c = _mm512_cvttps_epu32(_mm512_add_ps(_mm512_min_ps(t, top), half));
        _mm512_storeu_si512(codes.as_mut_ptr().add(i).cast(), c);
        let q = _mm512_cvtepu32_ps(c);
        let d = _mm512_sub_ps(x, _mm512_add_ps(_mm512_mul_ps(sv, q), bv));
        err = _mm512_fmadd_ps(d, d, err);
    }
    _mm512_reduce_add_ps(err)
}

/// The least-squares scale and bias for fixed codes (`w ≈ s·q + b`); None when all codes are equal.
fn refit(w: &[f32], codes: &[u32]) -> Option<(f32, f32)> {
    let n = w.len() as f64;
    let sums = || {
        let (mut sq, mut sw, mut sqq, mut sqw) = (0f64, 0f64, 0f64, 0f64);
        for (&q, &x) in codes.iter().zip(w) {
            let (q, x) = (f64::from(q), f64::from(x));
            sq += q;
            sw += x;
            sqq += q * q;
            sqw += q * x;
        }
        [sq, sw, sqq, sqw]
    };
    #[cfg(target_arch = "x86_64")]
    let [sq, sw, sqq, sqw] =
        if w.len().is_multiple_of(8) && codes.len() == w.len() && crate::kernels::has_avx512f() {
            // SAFETY: the CPU has AVX-512F; `w` and `codes` are the same whole number of 8-lane
            // vectors.
            unsafe { refit_sums_avx512(w, codes) }
        } else {
            sums()
        };
    #[cfg(not(target_arch = "x86_64"))]
    let [sq, sw, sqq, sqw] = sums();
    let det = n * sqq - sq * sq;
    if det <= 0.0 {
        return None;
    }
    let s = (n * sqw - sq * sw) / det;
    Some((s as f32, ((sw - s * sq) / n) as f32))
}

/// The step of the coarsest evenly spaced grid from `lo` that holds every value of `w` with at most
/// `max_q` steps, if there is one: an already-quantized weight (GGUF Q8_0 or Q4_1 blocks, a
/// finer-grouped MLX layer) requantized losslessly. Candidates are the gap from the minimum to the
/// next value up, divided by 1, 2, ... (the two lowest values need not be neighbours on the grid).
fn grid_step(w: &[f32], lo: f32, hi: f32, max_q: f32) -> Option<f32> {
    // Values within a millionth of the range of the minimum count as equal to it (f32 rounding of a
    // dequantized `d·q + m`).
    let range = hi - lo;
    let gap = w
        .iter()
        .map(|&x| x - lo)
        .filter(|&d| d > range * 1e-6)
        .fold(f32::INFINITY, f32::min);
    let most = (max_q * gap / range) as usize;
    (1..=most).map(|k| gap / k as f32).find(|&s| {
        w.iter().all(|&x| {
            let t = (x - lo) / s;
            (t - t.round()).abs() < 1e-3
        })
    })
}

/// For a group wider than 32 values, one start `(bias, scale)` per 32-value block that lies on a grid
/// ([`grid_step`]): the finest divisor of that block's step that still spans the whole group, with
/// the bias shifted onto the block's grid, so that block comes out exact (a group of 64 over two GGUF
/// blocks keeps one of them whole, and the other's error is about that of min-max rounding).
fn sub_block_grids(
    w: &[f32],
    lo: f32,
    hi: f32,
    max_q: f32,
) -> impl Iterator<Item = (f32, f32)> + '_ {
    let blocks = if w.len() > 32 {
        w.chunks(32)
    } else {
        [].chunks(32)
    };
    blocks.filter_map(move |block| {
        let (blo, bhi) = block
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        let step = grid_step(block, blo, bhi, max_q)?;
        let k = (max_q * step / (hi - lo)).floor();
        if k < 1.0 {
            return None;
        }
        let s = step / k;
        let below = ((blo - lo) / s - 1e-4).ceil().max(0.0);
        Some((blo - below * s, s))
    })
}

/// Scale and bias for one group, codes written to `codes`. Starts from the min–max range and from the
/// grid the values may already lie on ([`grid_step`]: that one comes out exact); for 4-bit it also
/// tries slightly clipped ranges. For each start it alternates rounding with a least-squares refit of
/// scale and bias, keeping whichever gives the smallest squared error (a few % of the min–max error at
/// 8 bits, ~20-30% less at 4 bits on Gaussian-like weights).
fn fit_group(w: &[f32], max_q: f32, search: bool, codes: &mut [u32]) -> (f32, f32) {
    let (lo, hi) = w
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    if hi <= lo {
        codes.fill(0);
        return (1.0, lo);
    }
    let range = hi - lo;
    let shrinks: &[(f32, f32)] = if search {
        &[
            (0.0, 0.0),
            (0.04, 0.0),
            (0.0, 0.04),
            (0.04, 0.04),
            (0.08, 0.08),
            (0.12, 0.12),
        ]
    } else {
        &[(0.0, 0.0)]
    };
    let starts = shrinks
        .iter()
        .map(|&(a, b)| (lo + a * range, (hi - b * range - (lo + a * range)) / max_q))
        .chain(grid_step(w, lo, hi, max_q).map(|s| (lo, s)))
        .chain(sub_block_grids(w, lo, hi, max_q));
    let mut best = (f32::INFINITY, 1.0, lo);
    // Trial codes on the stack for the group sizes QuantSpec::new accepts.
    let (mut stack, mut heap) = ([0u32; 128], Vec::new());
    let trial = if w.len() <= stack.len() {
        &mut stack[..w.len()]
    } else {
        heap.resize(w.len(), 0);
        &mut heap[..]
    };
    for (mut l, mut s) in starts {
        for _ in 0..2 {
            let err = round_codes(w, s, l, max_q, trial);
            if err < best.0 {
                best = (err, s, l);
                codes.copy_from_slice(trial);
            }
            if err == 0.0 {
                return (best.1, best.2);
            }
            match refit(w, trial) {
                Some((s2, l2)) if s2 > 0.0 => (s, l) = (s2, l2),
                _ => break,
            }
        }
    }
    (best.1, best.2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fitted_groups_beat_min_max_rounding() {
        // Gaussian-like values (sum of uniforms).
        let w: Vec<f32> = (0..4096)
            .map(|i| {
                (0..4)
                    .map(|j| ((i * 7919 + j * 104729) % 1000) as f32 / 1000.0)
                    .sum::<f32>()
                    - 2.0
            })
            .collect();
        let mut codes = vec![0u32; 32];
        let (mut fit_err, mut mm_err) = (0f32, 0f32);
        for g in w.chunks_exact(32) {
            let (s, b) = fit_group(g, 15.0, true, &mut codes);
            fit_err += g
                .iter()
                .zip(&codes)
                .map(|(x, &q)| (x - (s * q as f32 + b)).powi(2))
                .sum::<f32>();
            let (lo, hi) = g
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
                    (a.min(x), b.max(x))
                });
            mm_err += round_codes(g, (hi - lo) / 15.0, lo, 15.0, &mut codes);
        }
        assert!(fit_err < 0.95 * mm_err, "fit {fit_err} vs min-max {mm_err}");
    }

    /// Squared error of `w` against `s·q + b` (multiply then add in f32, as dequantization does).
    fn group_error(w: &[f32], codes: &[u32], s: f32, b: f32) -> f32 {
        w.iter()
            .zip(codes)
            .map(|(x, &q)| (x - (s * q as f32 + b)).powi(2))
            .sum()
    }

    /// Pseudo-random codes in `0..n` (a fixed LCG, so the tests are repeatable).
    fn codes_below(n: u32, len: usize, seed: u32) -> Vec<i32> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((x >> 8) % n) as i32
            })
            .collect()
    }

    #[test]
    fn already_quantized_groups_are_requantized_exactly() {
        let mut codes = vec![0u32; 32];
        // GGUF Q8_0 blocks (d·q, q in -127..=127), the two lowest values mostly not neighbours: exact
        // at 8 bits, where min-max rounding is off by up to half a step.
        for seed in 0..50 {
            let d = half::f16::from_f32(0.0021 + seed as f32 * 1e-4).to_f32();
            let w: Vec<f32> = codes_below(255, 32, seed)
                .iter()
                .map(|&q| d * (q - 127) as f32)
                .collect();
            let (s, b) = fit_group(&w, 255.0, false, &mut codes);
            assert_eq!(group_error(&w, &codes, s, b), 0.0, "Q8_0 block {seed}");
        }
        // GGUF Q4_1 blocks (d·q + m in f32) without codes 0 or 15: exact to f32 rounding at 4 bits.
        for seed in 0..50 {
            let (d, m) = (0.013 + seed as f32 * 1e-3, -0.07 - seed as f32 * 1e-3);
            let w: Vec<f32> = codes_below(13, 32, seed)
                .iter()
                .map(|&q| d * (q + 1) as f32 + m)
                .collect();
            let (s, b) = fit_group(&w, 15.0, true, &mut codes);
            let err = group_error(&w, &codes, s, b);
            assert!(err < 32.0 * (1e-6 * d).powi(2), "Q4_1 block {seed}: {err}");
        }
    }

    #[test]
    fn a_group_over_two_grids_beats_min_max_rounding() {
        // 64 values: two Q4_1-like blocks with unrelated steps. At 8 bits a group of 64 can keep one
        // block on its grid (or a refit near it), so the error is about 60% of min-max rounding's (the refit alone gets about 92%).
        let mut codes = vec![0u32; 64];
        let (mut fit_err, mut mm_err) = (0f32, 0f32);
        for seed in 0..50 {
            let grid = |d: f32, m: f32, seed| {
                codes_below(16, 32, seed)
                    .into_iter()
                    .map(move |q| d * q as f32 + m)
            };
            let w: Vec<f32> = grid(0.011 + seed as f32 * 3e-4, -0.09, seed)
                .chain(grid(0.017, -0.1 + seed as f32 * 1e-3, seed + 100))
                .collect();
            let (s, b) = fit_group(&w, 255.0, false, &mut codes);
            fit_err += group_error(&w, &codes, s, b);
            let (lo, hi) = w
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
                    (a.min(x), b.max(x))
                });
            mm_err += round_codes(&w, (hi - lo) / 255.0, lo, 255.0, &mut codes);
        }
        assert!(fit_err < 0.7 * mm_err, "fit {fit_err} vs min-max {mm_err}");
    }

    /// Blocks of rows are independent: 600 rows at once (blocks of 256, 256, 88) give the same codes,
    /// scales and biases as two halves stacked (256, 44 each), with f16 scales (the second pass).
    #[test]
    fn row_blocks_do_not_change_the_result() {
        let (out, inp) = (600, 64);
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 900.0)
            .collect();
        let spec = QuantSpec::new(4, 32).expect("spec");
        let whole = AffineWeight::quantize(&w, out, inp, spec, ScaleType::F16, "w").expect("q");
        let half = |r: std::ops::Range<usize>| {
            AffineWeight::quantize(
                &w[r.start * inp..r.end * inp],
                r.len(),
                inp,
                spec,
                ScaleType::F16,
                "w",
            )
            .expect("q")
        };
        let (a, b) = (half(0..300), half(300..600));
        let stacked = AffineWeight::stack_rows(&[&a, &b]).expect("same format");
        assert_eq!(whole.scale_type, ScaleType::F16);
        assert_eq!(whole.packed, stacked.packed);
        let mut row = vec![0f32; inp];
        let mut again = vec![0f32; inp];
        for r in 0..out {
            whole.dequantize_row(r, &mut row);
            stacked.dequantize_row(r, &mut again);
            assert_eq!(row, again, "row {r}");
        }
    }

    #[test]
    fn quantize_roundtrip_error_is_bounded() {
        let (out, inp) = (4, 64);
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.1)
            .collect();
        for bits in [4, 8] {
            let spec = QuantSpec::new(bits, 32).unwrap();
            let q = AffineWeight::quantize(&w, out, inp, spec, ScaleType::F32, "t").unwrap();
            let d = q.dequantize_like_mlx();
            // RMS error within half a min-max step (uniform rounding alone gives ~0.29 step).
            for (g, chunk) in w.chunks_exact(32).enumerate() {
                let (lo, hi) = chunk
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
                        (a.min(x), b.max(x))
                    });
                let step = (hi - lo) / spec.max_q() as f32;
                let mse = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| (d[g * 32 + i] - x).powi(2))
                    .sum::<f32>()
                    / 32.0;
                assert!(
                    mse.sqrt() <= 0.5 * step,
                    "bits {bits} group {g}: rms {} step {step}",
                    mse.sqrt()
                );
            }
        }
    }

    /// Q4_1 blocks hold 4-bit groups of 32 and 64 exactly (candle dequantizes them to the same f32
    /// values, bit for bit); 8-bit codes and scales that are not f16 values have no such form.
    #[test]
    fn q4_1_blocks_hold_4_bit_groups_exactly() {
        use candle_core::quantized::{GgmlDType, QStorage, QTensor};
        let (n, k) = (6, 128);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 211) as f32 / 105.0 - 1.0) * 0.3)
            .collect();
        for gs in [32, 64] {
            let spec = QuantSpec::new(4, gs).expect("valid spec");
            let q = AffineWeight::quantize(&w, n, k, spec, ScaleType::F16, "t").expect("quantizes");
            let blocks = q.to_q4_1_blocks().expect("f16 scales convert");
            assert_eq!(blocks.len(), n * k / 32 * 20);
            let dev = candle_core::Device::Cpu;
            let storage =
                QStorage::from_data(std::borrow::Cow::Owned(blocks), &dev, GgmlDType::Q4_1)
                    .expect("storage");
            let got: Vec<f32> = QTensor::new(storage, (n, k))
                .expect("tensor")
                .dequantize(&dev)
                .expect("dequantize")
                .flatten_all()
                .expect("flat")
                .to_vec1()
                .expect("values");
            let mut row = vec![0f32; k];
            for r in 0..n {
                q.dequantize_row(r, &mut row);
                assert_eq!(&got[r * k..(r + 1) * k], &row[..], "g{gs} row {r}");
            }
        }
        let q8 = AffineWeight::quantize(
            &w,
            n,
            k,
            QuantSpec::new(8, 32).expect("spec"),
            ScaleType::F16,
            "t",
        )
        .expect("quantizes");
        assert!(q8.to_q4_1_blocks().is_none());
        let q32 = AffineWeight::quantize(
            &w,
            n,
            k,
            QuantSpec::new(4, 32).expect("spec"),
            ScaleType::F32,
            "t",
        )
        .expect("quantizes");
        assert!(q32
            .scales
            .to_f32_vec()
            .iter()
            .any(|&x| f16::from_f32(x).to_f32() != x));
        assert!(q32.to_q4_1_blocks().is_none());
    }

    #[test]
    fn bad_specs_and_shapes_are_errors() {
        assert!(QuantSpec::new(3, 32).is_err());
        assert!(QuantSpec::new(4, 48).is_err());
        let spec = QuantSpec::new(4, 128).unwrap();
        let e = AffineWeight::quantize(
            &vec![0.0; 576],
            1,
            576,
            spec,
            ScaleType::F16,
            "layer.q_proj",
        )
        .unwrap_err();
        assert!(e.to_string().contains("layer.q_proj") && e.to_string().contains("576"));
        let spec = QuantSpec::new(4, 32).unwrap();
        let parts = AffineParts {
            packed: vec![0; 15],
            scales: vec![0.0; 4],
            biases: vec![0.0; 4],
            scale_type: ScaleType::F32,
        };
        assert!(AffineWeight::from_parts(spec, 2, 64, parts, "x").is_err());
    }
}
