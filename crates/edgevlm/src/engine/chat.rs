//! Chat requests answered whole or as OpenAI `chat.completion.chunk`s, on top of [`Generation`].

use super::*;

impl Engine {
    /// Answer a request with one `chat.completion`.
    pub fn chat(&self, req: &ChatRequest) -> Result<ChatCompletion> {
        Ok(self.chat_streaming(req, |_| Ok(()))?.0)
    }

    /// Answer a request, calling `on_chunk` with each `chat.completion.chunk` as text is produced; returns
    /// the assembled completion and the request's timings. An error from `on_chunk` stops generation
    /// at once and is returned.
    pub fn chat_streaming(
        &self,
        req: &ChatRequest,
        mut on_chunk: impl FnMut(&ChatCompletionChunk) -> Result<()>,
    ) -> Result<(ChatCompletion, Timings)> {
        let mut stream = self.chat_stream(req)?;
        while let Some(chunk) = stream.next_chunk()? {
            on_chunk(&chunk)?;
        }
        Ok(stream.into_completion())
    }

    /// Start answering a request as a stream of `chat.completion.chunk`s pulled with
    /// [`ChatStream::next_chunk`]; the prompt (images included) has run when this returns.
    pub fn chat_stream(&self, req: &ChatRequest) -> Result<ChatStream<'_>> {
        let settings = self.settings(req)?;
        let prepared = self.prepare(req)?;
        let generation = self.start(&prepared, &settings)?;
        Ok(ChatStream {
            generation,
            builder: CompletionBuilder::new(&self.name, req),
            prompt_tokens: prepared.ids.len(),
            sent_role: false,
            closing: None,
        })
    }
}

/// A chat request being answered as OpenAI `chat.completion.chunk`s ([`Engine::chat_stream`]): the
/// role first, then the text as it is produced, then the finish reason (and the usage when the
/// request's `stream_options.include_usage` asks). Dropping it stops generation.
pub struct ChatStream<'e> {
    generation: Generation<'e>,
    builder: CompletionBuilder,
    prompt_tokens: usize,
    sent_role: bool,
    /// The closing chunks not yet handed out, once the answer is complete.
    closing: Option<std::vec::IntoIter<ChatCompletionChunk>>,
}

impl ChatStream<'_> {
    fn usage(&self) -> Usage {
        Usage::new(
            self.prompt_tokens,
            self.generation.tokens().len(),
            self.generation.timings().reused_prompt_tokens,
        )
    }

    /// The next chunk, or `None` after the last.
    pub fn next_chunk(&mut self) -> Result<Option<ChatCompletionChunk>> {
        if !self.sent_role {
            self.sent_role = true;
            return Ok(Some(self.builder.role_chunk()));
        }
        if let Some(closing) = &mut self.closing {
            return Ok(closing.next());
        }
        if let Some(piece) = self.generation.next_piece()? {
            return Ok(Some(self.builder.text_chunk(piece.text, piece.logprobs)));
        }
        let finish = self
            .generation
            .finish_reason()
            .unwrap_or(FinishReason::Length);
        let mut closing = self.builder.finish_chunks(finish, self.usage()).into_iter();
        let first = closing.next();
        self.closing = Some(closing);
        Ok(first)
    }

    /// The whole answer as one `chat.completion`, and the request's timings.
    pub fn into_completion(self) -> (ChatCompletion, Timings) {
        let usage = self.usage();
        let out = self.generation.into_output();
        let completion = self
            .builder
            .completion(out.text, out.finish_reason, out.logprobs, usage);
        (completion, out.timings)
    }
}
