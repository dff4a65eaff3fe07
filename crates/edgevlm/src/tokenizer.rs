//! Tokenizer (HF `tokenizer.json`) and incremental detokenisation for streaming.

use std::path::Path;
use std::sync::OnceLock;

use crate::error::{one_line, Error, Result};
use crate::prompt::PromptText;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The same tokenizer with special-token spellings read as text, for message text that spells
    /// them; made on first need.
    as_text: OnceLock<tokenizers::Tokenizer>,
    /// Added tokens marked special: (id, text).
    specials: Vec<(u32, String)>,
    /// What the post-processor puts before and after a sequence (e.g. a BOS token).
    affixes: (Vec<u32>, Vec<u32>),
}

fn tok_err(e: tokenizers::Error) -> Error {
    Error::Tokenizer(one_line(e))
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(one_line(format!("{}: {e}", path.display()))))?;
        Self::new(inner)
    }

    /// From the text of a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        let inner: tokenizers::Tokenizer = json.parse().map_err(tok_err)?;
        Self::new(inner)
    }

    fn new(inner: tokenizers::Tokenizer) -> Result<Self> {
        let mut specials: Vec<(u32, String)> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        specials.sort_unstable();
        // The post-processor's additions: a sequence with and without them.
        let with = inner.encode_fast("a", true).map_err(tok_err)?;
        let without = inner.encode_fast("a", false).map_err(tok_err)?;
        let (with, without) = (with.get_ids(), without.get_ids());
        let affixes = match (0..=with.len().saturating_sub(without.len()))
            .find(|&i| with[i..].starts_with(without))
        {
            Some(i) => (with[..i].to_vec(), with[i + without.len()..].to_vec()),
            None => (Vec::new(), Vec::new()),
        };
        Ok(Self {
            inner,
            as_text: OnceLock::new(),
            specials,
            affixes,
        })
    }

    /// Encode as HF's `tokenizer(text)` does (`add_special_tokens=True`): special-token spellings
    /// anywhere in `text` become those tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, true).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Whether `text` spells any special token (then it must be tokenized apart from the template).
    pub fn spells_special(&self, text: &str) -> bool {
        self.specials.iter().any(|(_, s)| text.contains(s.as_str()))
    }

    /// Encode a prompt as [`Self::encode`] would, except that message text is tokenized as text:
    /// special tokens come only from the template's parts. With no message ranges this is exactly
    /// [`Self::encode`].
    pub fn encode_prompt(&self, prompt: &PromptText) -> Result<Vec<u32>> {
        if prompt.user.is_empty() {
            return self.encode(&prompt.text);
        }
        // Where the template's own text holds special tokens: the tokenizer's matcher, run on each
        // template range alone, so a match never reaches into message text.
        let mut cuts: Vec<(usize, usize, u32)> = Vec::new();
        for r in prompt.template_ranges() {
            let enc = self
                .inner
                .encode(&prompt.text[r.clone()], false)
                .map_err(tok_err)?;
            for (&id, &(s, e)) in enc.get_ids().iter().zip(enc.get_offsets()) {
                if self.specials.binary_search_by_key(&id, |(i, _)| *i).is_ok() {
                    cuts.push((r.start + s, r.start + e, id));
                }
            }
        }
        let as_text = self.as_text.get_or_init(|| {
            let mut t = self.inner.clone();
            t.set_encode_special_tokens(true);
            t
        });
        let mut ids = self.affixes.0.clone();
        let mut at = 0;
        let run = |ids: &mut Vec<u32>, text: &str| -> Result<()> {
            if !text.is_empty() {
                let enc = as_text.encode_fast(text, false).map_err(tok_err)?;
                ids.extend_from_slice(enc.get_ids());
            }
            Ok(())
        };
        for (s, e, id) in cuts {
            run(&mut ids, &prompt.text[at..s])?;
            ids.push(id);
            at = e;
        }
        run(&mut ids, &prompt.text[at..])?;
        ids.extend_from_slice(&self.affixes.1);
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(one_line(e)))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The surface text of one token (for logprobs): the decoded token, special tokens included.
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// The raw bytes of one token (OpenAI's `bytes`): a byte-level BPE token may hold part of a UTF-8
    /// character, which its decoded text cannot show. Tokens outside the byte-level alphabet (added or
    /// special tokens) give the bytes of their text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(tok) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        let table = byte_level_inverse();
        let mut out = Vec::with_capacity(tok.len());
        for c in tok.chars() {
            match table.get(&c) {
                Some(&b) => out.push(b),
                None => return self.token_text(id).into_bytes(),
            }
        }
        out
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte.
fn byte_level_inverse() -> &'static std::collections::HashMap<char, u8> {
    static TABLE: std::sync::OnceLock<std::collections::HashMap<char, u8>> =
        std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut map = std::collections::HashMap::with_capacity(256);
        let mut extra = 0u32;
        for b in 0u32..256 {
            let printable = (0x21..=0x7E).contains(&b)
                || (0xA1..=0xAC).contains(&b)
                || (0xAE..=0xFF).contains(&b);
            let c = if printable {
                b
            } else {
                extra += 1;
                255 + extra
            };
            if let Some(c) = char::from_u32(c) {
                map.insert(c, b as u8);
            }
        }
        map
    })
}
