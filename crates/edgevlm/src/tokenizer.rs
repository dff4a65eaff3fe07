//! Tokenizer (HF `tokenizer.json`) and incremental detokenisation for streaming.

use std::path::Path;

use crate::error::{Error, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    /// From the text of a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        let inner: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e: tokenizers::Error| Error::Tokenizer(e.to_string()))?;
        Ok(Self { inner })
    }

    /// Encode as HF's `tokenizer(text)` does (`add_special_tokens=True`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))
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
