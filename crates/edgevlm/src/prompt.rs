//! A prompt as text that knows which of its bytes came from the chat template (and the image
//! expansion) and which from message text. Only template text may produce special tokens: text a
//! client sends that spells `<|im_end|>` or `<image>` is tokenized as the characters it is, so a user
//! cannot forge a turn, an end of utterance or an image slot.
//!
//! transformers (`apply_chat_template` then `tokenizer(prompt)`) and llama.cpp's server (the rendered
//! prompt tokenized with special-token parsing on) both turn such text into the special tokens;
//! OpenAI's API treats it as text. edgevlm does what OpenAI does. Where no message spells a special
//! token (every ordinary prompt), the ids are exactly transformers'.

use std::ops::Range;

use crate::error::{Error, Result};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PromptText {
    pub text: String,
    /// Byte ranges of `text` that hold message text, in order, not overlapping. Empty when no message
    /// spells a special token: then every special-token spelling in `text` is the template's.
    pub user: Vec<Range<usize>>,
}

impl PromptText {
    /// Text that is all template (a prompt a program built itself, e.g. a benchmark's).
    pub fn template(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            user: Vec::new(),
        }
    }

    /// The template's parts of `text` (between the message ranges), as byte ranges.
    pub fn template_ranges(&self) -> Vec<Range<usize>> {
        let mut out = Vec::with_capacity(self.user.len() + 1);
        let mut at = 0;
        for r in &self.user {
            if r.start > at {
                out.push(at..r.start);
            }
            at = r.end;
        }
        if at < self.text.len() {
            out.push(at..self.text.len());
        }
        out
    }

    /// Replace each occurrence of `placeholder` in template text, in order, with the next of
    /// `expansions` (template text too). Occurrences inside message text stay as they are.
    pub fn expand(&self, placeholder: &str, expansions: &[String]) -> Result<Self> {
        let mut text = String::with_capacity(
            self.text.len() + expansions.iter().map(String::len).sum::<usize>(),
        );
        let mut user = Vec::with_capacity(self.user.len());
        let mut next = expansions.iter();
        let mut found = 0;
        let mut copy_template = |text: &mut String, piece: &str| -> Result<()> {
            let mut parts = piece.split(placeholder);
            if let Some(first) = parts.next() {
                text.push_str(first);
            }
            for part in parts {
                found += 1;
                let e = next.next().ok_or_else(|| {
                    Error::Request(format!(
                        "the prompt has more {placeholder} slots than the {} images given",
                        expansions.len()
                    ))
                })?;
                text.push_str(e);
                text.push_str(part);
            }
            Ok(())
        };
        let mut at = 0;
        for r in &self.user {
            copy_template(&mut text, &self.text[at..r.start])?;
            let start = text.len();
            text.push_str(&self.text[r.clone()]);
            user.push(start..text.len());
            at = r.end;
        }
        copy_template(&mut text, &self.text[at..])?;
        if found != expansions.len() {
            return Err(Error::Request(format!(
                "the prompt has {found} {placeholder} slots but {} images were given",
                expansions.len()
            )));
        }
        Ok(Self { text, user })
    }
}

/// Wrap message text in markers a template passes through, so that the rendered prompt can be split
/// back into template text and message text. The nonce keeps a client from spelling a marker.
pub(crate) struct Markers {
    open: String,
    close: String,
}

impl Markers {
    pub fn new() -> Self {
        let nonce = random_u64();
        Self {
            open: format!("\u{E000}{nonce:016x}\u{E001}"),
            close: format!("\u{E001}{nonce:016x}\u{E000}"),
        }
    }

    pub fn wrap(&self, text: &str) -> String {
        format!("{}{text}{}", self.open, self.close)
    }

    /// Split a prompt rendered with wrapped message text; `None` if the template cut or reordered a
    /// marker (then the spans cannot be trusted).
    pub fn split(&self, rendered: &str) -> Option<PromptText> {
        let mut text = String::with_capacity(rendered.len());
        let mut user = Vec::new();
        let mut rest = rendered;
        while let Some(i) = rest.find(&self.open) {
            if rest[..i].contains(&self.close) {
                return None;
            }
            text.push_str(&rest[..i]);
            let after = &rest[i + self.open.len()..];
            let j = after.find(&self.close)?;
            let inner = &after[..j];
            if inner.contains(&self.open) {
                return None;
            }
            let start = text.len();
            text.push_str(inner);
            if text.len() > start {
                user.push(start..text.len());
            }
            rest = &after[j + self.close.len()..];
        }
        if rest.contains(&self.close) {
            return None;
        }
        text.push_str(rest);
        Some(PromptText { text, user })
    }
}

/// A random 64-bit value from the OS-seeded hasher keys std gives every `RandomState` (no extra
/// crate), mixed with the time.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_split_template_from_message_text() {
        let m = Markers::new();
        let rendered = format!("<s>User: {}<end>\nAssistant:", m.wrap("hi <end>"));
        let p = m.split(&rendered).unwrap();
        assert_eq!(p.text, "<s>User: hi <end><end>\nAssistant:");
        assert_eq!(&p.text[p.user[0].clone()], "hi <end>");
        assert_eq!(p.template_ranges(), vec![0..9, 17..p.text.len()]);
        // A template that drops or cuts a marker is detected.
        assert!(m.split(&rendered.replace(&m.close, "")).is_none());
        assert!(m.split(&format!("{}{}", m.close, rendered)).is_none());
    }

    #[test]
    fn expansion_skips_message_text() {
        // The second `<image>` is message text.
        let p = PromptText {
            text: "A<image>B<image>C".into(),
            user: std::iter::once(9..16).collect(),
        };
        let e = p.expand("<image>", &["[I]".to_string()]).unwrap();
        assert_eq!(e.text, "A[I]B<image>C");
        assert_eq!(&e.text[e.user[0].clone()], "<image>");
        let all_template = PromptText::template("x<image>y<image>");
        let e = all_template
            .expand("<image>", &["1".into(), "2".into()])
            .unwrap();
        assert_eq!(e.text, "x1y2");
        assert!(all_template.expand("<image>", &["1".into()]).is_err());
        assert!(all_template
            .expand("<image>", &["1".into(), "2".into(), "3".into()])
            .is_err());
    }

    #[test]
    fn random_values_differ() {
        assert_ne!(random_u64(), random_u64());
    }
}
