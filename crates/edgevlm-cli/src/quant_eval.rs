//! `edgevlm quant-eval`: accuracy of quantized weights against full precision on the same model,
//! teacher-forced over a text: top-1 agreement, mean KL divergence of the next-token distribution, and
//! perplexity of each.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use edgevlm::engine::PreparedPrompt;
use edgevlm::quant::QuantSpec;
use edgevlm::sampling::log_softmax;
use edgevlm::{Engine, EngineOptions};

#[derive(Args)]
pub struct QuantEvalArgs {
    /// Model folder, repo id or GGUF file.
    #[arg(long, default_value = edgevlm::DEFAULT_MODEL)]
    model: String,
    /// Plain-text file to score (scripts/fetch-eval-text.sh fetches a public-domain one).
    #[arg(long)]
    text: PathBuf,
    /// Tokens of the text to score.
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    /// Window length: the text is scored in independent windows of this many tokens.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Positions at the start of each window left unscored (they still condition the rest):
    /// `llama-perplexity` scores only the second half of each window, i.e. `--skip 256` at `--ctx 512`.
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Quantizations to compare, as BITSgGROUP (e.g. 8g32, 4g64); `file` is a GGUF file's own blocks.
    /// A suffix `-a8` (e.g. `file-a8`) scores that form with 8-bit activations
    /// (`--int8-activations`).
    #[arg(long, value_delimiter = ',', default_value = "8g32,8g64,4g32,4g64")]
    configs: Vec<String>,
    /// Feed each window one token at a time (the decode path: one-token products, as generation
    /// runs them) instead of in one prompt pass, for both the reference and the quantizations.
    #[arg(long)]
    decode: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// A config's weights (`None`: the file's own) and whether its activations round to 8 bits.
fn parse_config(s: &str) -> Result<(Option<QuantSpec>, bool)> {
    let (s, int8) = match s.strip_suffix("-a8") {
        Some(s) => (s, true),
        None => (s, false),
    };
    Ok((parse_weights(s)?, int8))
}

fn parse_weights(s: &str) -> Result<Option<QuantSpec>> {
    if s == "file" {
        return Ok(None);
    }
    let (b, g) = s
        .split_once('g')
        .with_context(|| format!("`{s}` is not BITSgGROUP (e.g. 4g32)"))?;
    Ok(Some(QuantSpec::new(b.parse()?, g.parse()?)?))
}

#[derive(Default, serde::Serialize)]
struct Score {
    name: String,
    tokens: usize,
    top1_agreement: f64,
    mean_kld: f64,
    perplexity: f64,
    load_ms: f64,
    eval_ms: f64,
}

/// Logits `(t, vocab)` of every position of `ids` (teacher-forced), in one prompt pass or a token
/// at a time (`decode`).
fn all_logits(engine: &Engine, ids: &[u32], decode: bool) -> Result<Vec<Vec<f32>>> {
    if decode {
        return Ok(engine.decode_logits(ids)?.to_vec2::<f32>()?);
    }
    let prompt = PreparedPrompt {
        ids: ids.to_vec(),
        ..Default::default()
    };
    Ok(engine.logits(&prompt, true)?.to_vec2::<f32>()?)
}

pub fn run(a: QuantEvalArgs) -> Result<()> {
    if a.ctx < 2 || a.skip + 1 >= a.ctx {
        bail!("--ctx must be at least 2 and more than --skip + 1");
    }
    let specs = a
        .configs
        .iter()
        .map(|c| parse_config(c).map(|s| (c.clone(), s)))
        .collect::<Result<Vec<_>>>()?;
    let text = std::fs::read_to_string(&a.text)
        .with_context(|| format!("reading {}", a.text.display()))?;
    let t0 = Instant::now();
    // A GGUF file's reference is its own blocks dequantized to f32 (as transformers loads it).
    let is_gguf = a.model.to_ascii_lowercase().ends_with(".gguf");
    let reference = Engine::load(
        &a.model,
        EngineOptions {
            dequantize: is_gguf,
            ..Default::default()
        },
    )?;
    let ref_load = t0.elapsed().as_secs_f64() * 1e3;
    let ids = reference.tokenizer().encode(&text)?;
    if ids.len() < a.tokens {
        bail!(
            "{} holds {} tokens, fewer than --tokens {}",
            a.text.display(),
            ids.len(),
            a.tokens
        );
    }
    let ids = &ids[..a.tokens];
    let windows: Vec<&[u32]> = ids
        .chunks(a.ctx)
        .filter(|w| w.len() >= a.skip + 2)
        .collect();

    // Reference log-probabilities, kept per window.
    let t0 = Instant::now();
    let mut ref_lp: Vec<Vec<Vec<f32>>> = Vec::with_capacity(windows.len());
    let mut ref_score = Score {
        name: "f32".into(),
        load_ms: ref_load,
        ..Default::default()
    };
    let mut nll = 0f64;
    let mut scratch = Vec::new();
    for w in &windows {
        let logits = all_logits(&reference, w, a.decode)?;
        let mut lps = Vec::with_capacity(w.len() - 1);
        for (pos, row) in logits.iter().enumerate().take(w.len() - 1).skip(a.skip) {
            log_softmax(row, &mut scratch);
            nll -= f64::from(scratch[w[pos + 1] as usize]);
            lps.push(scratch.clone());
        }
        ref_score.tokens += lps.len();
        ref_lp.push(lps);
    }
    ref_score.eval_ms = t0.elapsed().as_secs_f64() * 1e3;
    ref_score.perplexity = (nll / ref_score.tokens as f64).exp();
    ref_score.top1_agreement = 1.0;
    drop(reference);

    let mut scores = vec![ref_score];
    for (name, (spec, int8_activations)) in specs {
        let t0 = Instant::now();
        let engine = Engine::load(
            &a.model,
            EngineOptions {
                quantize: spec,
                int8_activations,
                ..Default::default()
            },
        )?;
        let load_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t0 = Instant::now();
        let (mut agree, mut kld, mut nll, mut n) = (0usize, 0f64, 0f64, 0usize);
        for (w, refs) in windows.iter().zip(&ref_lp) {
            let logits = all_logits(&engine, w, a.decode)?;
            let scored = logits.iter().enumerate().skip(a.skip).zip(refs);
            for ((pos, row), p) in scored {
                log_softmax(row, &mut scratch);
                let q = &scratch;
                if edgevlm::sampling::argmax(q) == edgevlm::sampling::argmax(p) {
                    agree += 1;
                }
                kld += p
                    .iter()
                    .zip(q)
                    .map(|(&lp, &lq)| f64::from(lp).exp() * f64::from(lp - lq))
                    .sum::<f64>();
                nll -= f64::from(q[w[pos + 1] as usize]);
                n += 1;
            }
        }
        scores.push(Score {
            name: match (spec, int8_activations) {
                (Some(_), _) => format!("q{name}"),
                (None, false) => "file blocks".into(),
                (None, true) => "file blocks, 8-bit activations".into(),
            },
            tokens: n,
            top1_agreement: agree as f64 / n as f64,
            mean_kld: kld / n as f64,
            perplexity: (nll / n as f64).exp(),
            load_ms,
            eval_ms: t0.elapsed().as_secs_f64() * 1e3,
        });
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&scores)?);
    } else {
        println!(
            "model {} | {} tokens scored in windows of {} (first {} unscored{}) | reference f32",
            a.model,
            scores[0].tokens,
            a.ctx,
            a.skip,
            if a.decode { ", fed one at a time" } else { "" }
        );
        println!("| weights | top-1 agreement | mean KLD | perplexity | load ms | eval ms |");
        println!("| --- | --- | --- | --- | --- | --- |");
        for s in &scores {
            println!(
                "| {} | {:.2}% | {:.5} | {:.3} | {:.0} | {:.0} |",
                s.name,
                s.top1_agreement * 100.0,
                s.mean_kld,
                s.perplexity,
                s.load_ms,
                s.eval_ms
            );
        }
    }
    Ok(())
}
