//! Incremental detokenisation for streaming.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// Turns generated tokens into answer text: incremental detokenisation that never splits a UTF-8
/// character, cut at the first stop string, with a possible stop-string prefix held back.
pub struct TextAssembler {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    text: String,
    emitted: usize,
    stops: Vec<String>,
    stopped: bool,
}

impl TextAssembler {
    pub fn new(stops: &[String]) -> Self {
        Self {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            text: String::new(),
            emitted: 0,
            stops: stops.to_vec(),
            stopped: false,
        }
    }

    /// Add a token; returns the text that can be shown now and whether a stop string ended the answer.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<(String, bool)> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            self.text.push_str(&full[prefix.len()..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        // Stop strings: search from where a new match could start.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.emitted.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(at) = hit {
            self.text.truncate(at);
            self.stopped = true;
            let out = self.text[self.emitted.min(at)..].to_string();
            self.emitted = self.text.len();
            return Ok((out, true));
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut safe = self.text.len();
        for s in &self.stops {
            for l in (1..s.len().min(self.text.len() + 1)).rev() {
                if s.is_char_boundary(l) && self.text.ends_with(&s[..l]) {
                    safe = safe.min(self.text.len() - l);
                    break;
                }
            }
        }
        let safe = safe.max(self.emitted);
        let out = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        Ok((out, false))
    }

    /// Text held back at the end of generation (no stop string followed).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    pub fn into_text(self) -> String {
        self.text
    }
}
