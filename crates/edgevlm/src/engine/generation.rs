//! One answer in progress: the prompt pass ([`Engine::start`]), then tokens pulled one at a time
//! ([`Generation::poll`]), alone or in a batch with others ([`Engine::step_batch`]).

use super::*;

/// Prompt positions per forward pass during prefill.
pub(super) const PREFILL_CHUNK: usize = 256;

impl Engine {
    /// Run the model on a prepared prompt to the end of the answer. `on_text` receives each new piece
    /// of answer text (stop strings held back until they can be ruled out) and, when logprobs were
    /// asked for, the entries of the tokens that completed it. [`Engine::start`] is the same
    /// generation pulled a piece at a time.
    pub fn generate(
        &self,
        prepared: &PreparedPrompt,
        settings: &GenerationSettings,
        mut on_text: impl FnMut(&str, Option<&[TokenLogprob]>),
    ) -> Result<GenerationOutput> {
        let mut generation = self.start(prepared, settings)?;
        while let Some(piece) = generation.next_piece()? {
            let lp = settings.top_logprobs.map(|_| piece.logprobs.as_slice());
            on_text(&piece.text, lp);
        }
        Ok(generation.into_output())
    }

    /// Start answering a prepared prompt: checks its length against the context and the limits,
    /// encodes its images and runs the prompt through the model. The answer is then pulled with
    /// [`Generation::next_piece`]; dropping the generation stops it. ([`Engine::begin`] is the same
    /// prompt pass in steps.)
    pub fn start(
        &self,
        prepared: &PreparedPrompt,
        settings: &GenerationSettings,
    ) -> Result<Generation<'_>> {
        let mut starting = self.begin(prepared.clone(), settings)?;
        while !starting.advance()? {}
        starting.finish()
    }

    /// The tokens a prepared prompt may generate under the request's `max_tokens`, the engine's
    /// limits and the context; an error when there is no room or the request asks too much.
    pub fn completion_budget(
        &self,
        prepared: &PreparedPrompt,
        settings: &GenerationSettings,
    ) -> Result<usize> {
        if prepared.ids.is_empty() {
            return Err(Error::Request("the prompt has no tokens".into()));
        }
        self.opts.limits.completion_budget(
            settings.max_tokens,
            prepared.ids.len(),
            self.context_length(),
        )
    }

    /// Begin a prompt pass to be run in steps with [`Starting::advance`] (one image tile or one chunk
    /// of prompt positions each), so that a server can interleave it with other sequences' decoding.
    /// Positions the reuse cache holds for this prompt's start are copied, not computed.
    pub fn begin(
        &self,
        prepared: PreparedPrompt,
        settings: &GenerationSettings,
    ) -> Result<Starting<'_>> {
        let n_prompt = prepared.ids.len();
        let max_tokens = self.completion_budget(&prepared, settings)?;
        let sampler = Sampler::new(settings.sampling.clone())?;
        // Where each image's tokens start, and the images the reuse cache can tell apart.
        let image_token = self.model.vision().map(|m| m.image_token_id());
        let positions: Vec<usize> = match image_token {
            Some(t) => (0..n_prompt).filter(|&i| prepared.ids[i] == t).collect(),
            None => Vec::new(),
        };
        let mut first_positions = Vec::with_capacity(prepared.images.len());
        let mut c = 0;
        for img in &prepared.images {
            first_positions.push(positions.get(c).copied().unwrap_or(n_prompt));
            c += img.layout.tokens;
        }
        let mut keyed = Vec::new();
        let mut reusable = n_prompt;
        for (i, &pos) in first_positions.iter().enumerate() {
            match prepared.image_keys.get(i).copied().flatten() {
                Some(k) => keyed.push((pos, k)),
                // An image the cache cannot identify ends what may be shared.
                None => reusable = reusable.min(pos),
            }
        }
        let empty = self.new_cache(n_prompt + max_tokens);
        let (cache, reused) = match self.reuse.prefix(&prepared.ids[..reusable], &keyed) {
            Some(hit) => (hit.cache(empty)?, hit.len),
            None => (empty, 0),
        };
        let timings = Timings {
            image_preprocess_ms: prepared.preprocess_ms,
            image_tiles: prepared.images.iter().map(|i| i.layout.units).sum(),
            prompt_tokens: n_prompt,
            reused_prompt_tokens: reused,
            ..Default::default()
        };
        let n_images = prepared.images.len();
        Ok(Starting {
            engine: self,
            settings: settings.clone(),
            max_tokens,
            sampler,
            features: vec![None; n_images],
            tiles: Vec::new(),
            units_done: 0,
            positions,
            keyed,
            reusable,
            cache,
            reused,
            pos: reused,
            embeds: None,
            logits: None,
            timings,
            prepared,
        })
    }

    /// Run one decode step for every generation that needs one ([`Poll::NeedsStep`]), all in one
    /// pass: each weight is read once for the whole batch, and each generation's logits are
    /// bit-identical to running it alone, so its answer does not depend on the batch. All must be
    /// generations of this engine.
    pub fn step_batch(&self, generations: &mut [&mut Generation<'_>]) -> Result<()> {
        let mut tokens = Vec::with_capacity(generations.len());
        let mut caches = Vec::with_capacity(generations.len());
        let mut rows = Vec::with_capacity(generations.len());
        let mut positions = Vec::with_capacity(generations.len());
        for (i, g) in generations.iter_mut().enumerate() {
            if !std::ptr::eq(g.engine, self) {
                return Err(Error::ModelInput(
                    "a generation of another engine in a decode batch".into(),
                ));
            }
            if let Some(t) = g.unfed {
                tokens.push(t);
                positions.push(g.next_position());
                caches.push(&mut g.cache);
                rows.push(i);
            }
        }
        if tokens.is_empty() {
            return Ok(());
        }
        let logits = self
            .model
            .text()
            .decode_batch(&tokens, &positions, &mut caches)?;
        drop(caches);
        for (r, &i) in rows.iter().enumerate() {
            let g = &mut generations[i];
            g.logits = logits.get(r)?.to_vec1::<f32>()?;
            g.unfed = None;
        }
        Ok(())
    }

    fn token_logprob(&self, token: u32, logprobs: &[f32], top: usize) -> TokenLogprob {
        let entry = |id: u32| TopLogprob {
            token: self.tokenizer.token_text(id),
            bytes: self.tokenizer.token_bytes(id),
            logprob: logprobs[id as usize],
        };
        let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
        let k = top.min(idx.len());
        if k > 0 {
            idx.select_nth_unstable_by(k - 1, |&a, &b| {
                logprobs[b as usize].total_cmp(&logprobs[a as usize])
            });
            idx.truncate(k);
            idx.sort_by(|&a, &b| logprobs[b as usize].total_cmp(&logprobs[a as usize]));
        } else {
            idx.clear();
        }
        let me = entry(token);
        TokenLogprob {
            token: me.token,
            logprob: me.logprob,
            bytes: me.bytes,
            top_logprobs: idx.into_iter().map(entry).collect(),
        }
    }
}

/// A prompt on its way through the model ([`Engine::begin`]): image tiles encoded (the ones the
/// reuse cache does not hold), then the prompt positions after any reused prefix, one chunk at a
/// time; then [`Starting::finish`] hands over the [`Generation`].
pub struct Starting<'e> {
    engine: &'e Engine,
    prepared: PreparedPrompt,
    settings: GenerationSettings,
    max_tokens: usize,
    sampler: Sampler,
    /// Each image's features, once known.
    features: Vec<Option<Tensor>>,
    /// The encoded units (tiles) of the image being encoded, and how many units they hold.
    tiles: Vec<Tensor>,
    units_done: usize,
    /// Positions of the prompt's image tokens.
    positions: Vec<usize>,
    /// (first image-token position, key) of the images the reuse cache can identify.
    keyed: Vec<(usize, ImageKey)>,
    /// Prompt positions the reuse cache may keep (up to the first image it cannot identify).
    reusable: usize,
    cache: KvCache,
    /// Positions copied from the reuse cache.
    reused: usize,
    /// Positions in the cache so far.
    pos: usize,
    /// Embeddings of the positions from `reused` on.
    embeds: Option<Tensor>,
    logits: Option<Tensor>,
    timings: Timings,
}

impl<'e> Starting<'e> {
    /// Do one step of the prompt pass (one image's tiles, `vision_batch` at a time, or one chunk of
    /// prompt positions); true once the pass is complete.
    pub fn advance(&mut self) -> Result<bool> {
        if self.logits.is_some() {
            return Ok(true);
        }
        let engine = self.engine;
        // Images with tokens at or after the first position to compute, not yet encoded.
        let mut first_token = 0;
        for i in 0..self.prepared.images.len() {
            let n = self.prepared.images[i].layout.tokens;
            let last = self
                .positions
                .get(first_token + n - 1)
                .copied()
                .unwrap_or(0);
            first_token += n;
            if self.features[i].is_some() || last < self.reused {
                continue;
            }
            let t0 = Instant::now();
            self.encode_tiles(i)?;
            self.timings.image_encode_ms += t0.elapsed().as_secs_f64() * 1e3;
            return Ok(false);
        }
        let t0 = Instant::now();
        let n_prompt = self.prepared.ids.len();
        if self.embeds.is_none() {
            self.embeds = Some(self.embeddings()?);
        }
        let embeds = self
            .embeds
            .as_ref()
            .ok_or_else(|| Error::Internal("no embeddings".into()))?;
        // Chunks start at multiples of PREFILL_CHUNK (a reused prefix ends on one), as a pass from
        // the start would: the attention scores of a chunk are `chunk × context` instead of
        // `prompt × prompt`, which bounds the memory of long (image) prompts.
        let len = PREFILL_CHUNK.min(n_prompt - self.pos);
        let l = engine.model.text().forward_at(
            &embeds.narrow(1, self.pos - self.reused, len)?,
            self.prepared.rotary(self.pos, len),
            &mut self.cache,
            false,
        )?;
        self.pos += len;
        self.timings.prompt_ms += t0.elapsed().as_secs_f64() * 1e3;
        if self.pos >= n_prompt {
            self.logits = Some(l);
            self.embeds = None;
            return Ok(true);
        }
        Ok(false)
    }

    /// Encode the next `vision_batch` tiles of image `i`; its features once all are done.
    fn encode_tiles(&mut self, i: usize) -> Result<()> {
        let engine = self.engine;
        if let Some(Some(c)) = self.prepared.cached_images.get(i) {
            self.features[i] = Some(c.features.clone());
            return Ok(());
        }
        let vision = engine.vision()?;
        let img = &self.prepared.images[i];
        let done = self.units_done;
        let n = engine.opts.vision_batch.max(1).min(img.layout.units - done);
        self.tiles.push(vision.encode(img, done..done + n)?);
        self.units_done += n;
        if self.units_done == img.layout.units {
            self.units_done = 0;
            let features = Tensor::cat(&std::mem::take(&mut self.tiles), 0)?;
            if let Some(Some(key)) = self.prepared.image_keys.get(i) {
                engine.reuse.insert_image(
                    *key,
                    CachedImage {
                        layout: img.layout,
                        features: features.clone(),
                    },
                );
            }
            self.features[i] = Some(features);
        }
        Ok(())
    }

    /// Input embeddings `(1, n − reused, hidden)` of the positions to compute, image features in
    /// place of their image tokens.
    fn embeddings(&self) -> Result<Tensor> {
        let ids = &self.prepared.ids[self.reused..];
        // Image-token rows before the first position to compute are not needed.
        let skip = self
            .positions
            .iter()
            .take_while(|&&p| p < self.reused)
            .count();
        let mut rows = Vec::new();
        let mut seen = 0;
        for (img, f) in self.prepared.images.iter().zip(&self.features) {
            let n = img.layout.tokens;
            let from = skip.saturating_sub(seen).min(n);
            seen += n;
            if from == n {
                // Every token of it lies before `reused` (and it need not have been encoded).
                continue;
            }
            let f = f
                .as_ref()
                .ok_or_else(|| Error::Internal("an image needed was not encoded".into()))?;
            rows.push(f.narrow(0, from, n - from)?);
        }
        let feats = if rows.is_empty() {
            None
        } else {
            Some(Tensor::cat(&rows, 0)?)
        };
        self.engine.model.embed_prompt(ids, feats.as_ref())
    }

    /// The prompt's first sampled-from logits and the answer to pull: call once [`Self::advance`]
    /// returned true. The prompt's whole chunks go to the reuse cache.
    pub fn finish(self) -> Result<Generation<'e>> {
        let Some(logits) = self.logits else {
            return Err(Error::Internal(
                "a generation finished before its prompt pass".into(),
            ));
        };
        let engine = self.engine;
        let ids = &self.prepared.ids;
        engine
            .reuse
            .insert_prefix(&ids[..self.reusable], &self.keyed, &self.cache)?;
        let logits = logits.squeeze(0)?.to_vec1::<f32>()?;
        let position_delta = self.prepared.position_delta();
        Ok(Generation {
            engine,
            position_delta,
            text: TextAssembler::new(&self.settings.stop),
            settings: self.settings,
            cache: self.cache,
            sampler: self.sampler,
            context: self.prepared.ids,
            tokens: Vec::new(),
            logits,
            unfed: None,
            lsm: Vec::new(),
            pending_logprobs: Vec::new(),
            logprobs: Vec::new(),
            max_tokens: self.max_tokens,
            finish: None,
            flushed: false,
            timings: self.timings,
            decode_start: Instant::now(),
        })
    }

    /// Prompt positions copied from the reuse cache.
    pub fn reused(&self) -> usize {
        self.reused
    }
}

/// What [`Engine::generate`] produced.
pub struct GenerationOutput {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub logprobs: Vec<TokenLogprob>,
    pub timings: Timings,
}

/// One answer in progress ([`Engine::start`]): pull it with [`Generation::next_piece`]. Nothing runs
/// between calls, so a caller that stops pulling (a closed pipe, a client gone) stops the model;
/// dropping the generation frees its KV cache.
pub struct Generation<'e> {
    engine: &'e Engine,
    settings: GenerationSettings,
    /// Offset of each new token's rotary position from its cache slot (Qwen2-VL: an image spans
    /// fewer positions than tokens).
    position_delta: i64,
    cache: KvCache,
    sampler: Sampler,
    /// Prompt and answer ids (the repetition penalty's context).
    context: Vec<u32>,
    tokens: Vec<u32>,
    text: TextAssembler,
    /// Logits for the next token, when `unfed` is None.
    logits: Vec<f32>,
    /// The last token sampled, not yet run through the model.
    unfed: Option<u32>,
    /// Log-softmax scratch.
    lsm: Vec<f32>,
    /// Logprob entries of tokens whose text is not shown yet.
    pending_logprobs: Vec<TokenLogprob>,
    logprobs: Vec<TokenLogprob>,
    max_tokens: usize,
    finish: Option<FinishReason>,
    /// Whether the text held back at the end has been handed out.
    flushed: bool,
    timings: Timings,
    decode_start: Instant,
}

/// A piece of answer text and the logprob entries of the tokens that completed it (empty unless
/// logprobs were asked for).
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
}

/// What [`Generation::poll`] found.
#[derive(Debug, PartialEq)]
pub enum Poll {
    /// More answer text.
    Piece(Piece),
    /// The model must run on the last token first ([`Generation::step`] alone, or
    /// [`Engine::step_batch`] with others).
    NeedsStep,
    /// The answer is complete.
    Done,
}

impl Generation<'_> {
    /// The next piece of answer text, or `None` once the answer is complete. Runs the model for as
    /// many tokens as it takes to show more text (stop strings and partial characters held back).
    pub fn next_piece(&mut self) -> Result<Option<Piece>> {
        loop {
            match self.poll()? {
                Poll::Piece(p) => return Ok(Some(p)),
                Poll::Done => return Ok(None),
                Poll::NeedsStep => self.step()?,
            }
        }
    }

    /// Advance without running the model: sample from the logits at hand until text shows, the
    /// answer ends, or the model must run on the sampled token.
    pub fn poll(&mut self) -> Result<Poll> {
        loop {
            if self.finish.is_some() {
                return Ok(match self.flush() {
                    Some(p) => Poll::Piece(p),
                    None => Poll::Done,
                });
            }
            if self.unfed.is_some() {
                return Ok(Poll::NeedsStep);
            }
            if let Some(piece) = self.sample()? {
                return Ok(Poll::Piece(piece));
            }
        }
    }

    /// Run the model on the last sampled token (this generation alone).
    pub fn step(&mut self) -> Result<()> {
        let Some(token) = self.unfed else {
            return Ok(());
        };
        let decoder = self.engine.model.text();
        let emb = decoder.embed(&[token])?.unsqueeze(0)?;
        let position = self.next_position();
        let logits = decoder.forward_at(&emb, Positions::From(position), &mut self.cache, false)?;
        self.logits = logits.squeeze(0)?.to_vec1::<f32>()?;
        self.unfed = None;
        Ok(())
    }

    /// The rotary position of the next token fed.
    fn next_position(&self) -> usize {
        (self.cache.len() as i64 + self.position_delta).max(0) as usize
    }

    /// Sample a token from the current logits and advance the answer text.
    fn sample(&mut self) -> Result<Option<Piece>> {
        self.sampler
            .apply_repetition_penalty(&mut self.logits, &self.context);
        self.sampler.apply_openai_adjustments(&mut self.logits);
        let next = self.sampler.sample(&self.logits);
        self.sampler.record(next);
        self.tokens.push(next);
        self.context.push(next);
        if self.settings.stop_at_eos && self.engine.eos_ids.contains(&next) {
            self.finish = Some(FinishReason::Stop);
            return Ok(None);
        }
        if let Some(n) = self.settings.top_logprobs {
            log_softmax(&self.logits, &mut self.lsm);
            let entry = self.engine.token_logprob(next, &self.lsm, n);
            self.pending_logprobs.push(entry);
        }
        let (emit, stopped) = self.text.push(&self.engine.tokenizer, next)?;
        if stopped {
            self.finish = Some(FinishReason::Stop);
        } else if self.tokens.len() >= self.max_tokens {
            self.finish = Some(FinishReason::Length);
        } else {
            self.unfed = Some(next);
        }
        if emit.is_empty() {
            if stopped {
                self.logprobs.append(&mut self.pending_logprobs);
            }
            return Ok(None);
        }
        Ok(Some(self.piece(emit)))
    }

    /// `text` with the pending logprob entries (also kept for the whole answer).
    fn piece(&mut self, text: String) -> Piece {
        let logprobs = std::mem::take(&mut self.pending_logprobs);
        self.logprobs.extend_from_slice(&logprobs);
        Piece { text, logprobs }
    }

    /// The text held back at the end (no stop string followed), once.
    fn flush(&mut self) -> Option<Piece> {
        if self.flushed {
            return None;
        }
        self.flushed = true;
        self.timings.completion_tokens = self.tokens.len();
        self.timings.generation_ms = self.decode_start.elapsed().as_secs_f64() * 1e3;
        let rest = self.text.finish();
        if rest.is_empty() {
            self.logprobs.append(&mut self.pending_logprobs);
            return None;
        }
        Some(self.piece(rest))
    }

    /// Why the answer ended; `None` while it goes on.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// The request's timings (complete once the answer is).
    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    /// Tokens generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The whole answer: call after [`Self::next_piece`] returned `None` (earlier, the answer so
    /// far, finished for length).
    pub fn into_output(mut self) -> GenerationOutput {
        if !self.flushed {
            self.timings.completion_tokens = self.tokens.len();
            self.timings.generation_ms = self.decode_start.elapsed().as_secs_f64() * 1e3;
        }
        GenerationOutput {
            text: std::mem::replace(&mut self.text, TextAssembler::new(&[])).into_text(),
            tokens: std::mem::take(&mut self.tokens),
            finish_reason: self.finish.unwrap_or(FinishReason::Length),
            logprobs: std::mem::take(&mut self.logprobs),
            timings: std::mem::take(&mut self.timings),
        }
    }
}

impl Drop for Generation<'_> {
    /// The cache and the activations it freed go back to the system: with `tune_allocator` the
    /// allocator keeps freed memory until asked.
    fn drop(&mut self) {
        self.cache = KvCache::new(0, 0);
        return_freed_memory();
    }
}
