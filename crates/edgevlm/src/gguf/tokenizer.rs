//! A `tokenizers` tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata (byte-level BPE).
//!
//! The pre-tokenizer follows `tokenizer.ggml.pre` as llama.cpp does, so text splits the way the
//! vocabulary's merges were learned (SmolLM2's `smollm` splits every digit, like its tokenizer.json).

use serde_json::{json, Value};

use super::GgufFile;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// GPT-2's split regex (the ByteLevel pre-tokenizer's own).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split_then_bytes(regex: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        byte_level(false),
    ]})
}

/// The pre-tokenizer for `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: Option<&str>) -> Result<Value> {
    Ok(match pre.unwrap_or("default") {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]}),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" => {
            split_then_bytes(LLAMA3_SPLIT)
        }
        "qwen2" | "deepseek-r1-qwen" => split_then_bytes(QWEN2_SPLIT),
        other => {
            return Err(Error::Unsupported(format!(
                "GGUF pre-tokenizer `{other}` (known: default, gpt2, smollm, llama3, qwen2)"
            )))
        }
    })
}

/// Build the tokenizer; also returns the bos and eos token texts (empty where the file names none).
pub fn tokenizer_from_gguf(f: &GgufFile) -> Result<(Tokenizer, String, String)> {
    let bad = |m: String| Error::file(f.path(), format!("tokenizer: {m}"));
    let model = f.get_str("tokenizer.ggml.model")?.unwrap_or("");
    if model != "gpt2" {
        return Err(Error::Unsupported(format!(
            "{}: GGUF tokenizer model `{model}` (only byte-level BPE, `gpt2`)",
            f.path().display()
        )));
    }
    let tokens = f
        .get_strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| bad("no tokenizer.ggml.tokens".into()))?;
    let merges = f
        .get_strings("tokenizer.ggml.merges")?
        .ok_or_else(|| bad("no tokenizer.ggml.merges".into()))?;
    let types = f.get_ints("tokenizer.ggml.token_type")?.unwrap_or_default();
    if !types.is_empty() && types.len() != tokens.len() {
        return Err(bad(format!(
            "{} token types for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert((*t).to_string(), json!(i));
    }
    // Control tokens (type 3) are special and matched whole; user-defined ones (type 4) are matched
    // whole but are not special.
    let added: Vec<Value> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == 3 || t == 4)
        .map(|(i, &t)| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": t == 3})
        })
        .collect();
    let token_of = |key: &str| -> Result<String> {
        Ok(match f.get_usize(key)? {
            Some(id) => tokens
                .get(id)
                .map(|s| s.to_string())
                .ok_or_else(|| bad(format!("{key} {id} is outside the vocabulary")))?,
            None => String::new(),
        })
    };
    let bos = token_of("tokenizer.ggml.bos_token_id")?;
    let eos = token_of("tokenizer.ggml.eos_token_id")?;
    let add_bos = f.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let post = if add_bos && !bos.is_empty() {
        let bos_id = f.require_usize("tokenizer.ggml.bos_token_id")?;
        json!({"type": "TemplateProcessing",
               "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
               "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                        {"Sequence": {"id": "B", "type_id": 1}}],
               "special_tokens": {bos.clone(): {"id": bos, "ids": [bos_id], "tokens": [bos]}}})
    } else {
        Value::Null
    };
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(f.get_str("tokenizer.ggml.pre")?)?,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    let tok = Tokenizer::from_json(&spec.to_string()).map_err(|e| bad(e.to_string()))?;
    Ok((tok, bos, eos))
}
