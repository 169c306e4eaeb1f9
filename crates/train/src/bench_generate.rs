//! `tuna-trainer bench-generate`: times tuna's generation ([`crate::generate::generate`], KV
//! cache, greedy) on the prompts of a file, so that `python/bench_generate_peer.py` can time
//! transformers' `generate` on the very same model folder, prompts and settings.
//! `scripts/bench-generate.sh` runs both side by side.
//!
//! Prompts file (JSON, written by `bench_generate_peer.py prepare`): `{"prompts": [[ids], ..]}`;
//! a run takes the first `batch` of them, padded on the left. No token stops a sequence (both
//! sides generate exactly `new_tokens`).
//!
//! Each round runs `generate` twice: with one new token (its wall time is the time to first
//! token: the prompt's pass and one pick) and with `new_tokens`; the decode speed is
//! `batch * (new_tokens - 1) / (t_n - t_1)` tokens per second. Output: one JSON line with the
//! medians over the rounds after one untimed warm-up round (`ttft_s`, `decode_tokens_per_s`),
//! and each round's times.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::{json, Value};
use tch::Device;
use tuna_core::spec::Precision;

use crate::generate::{generate, Sampling};
use crate::model::{FreezeOptions, LoadOptions, Model, TaskHead};
use crate::{Error, Result};

/// What `tuna-trainer bench-generate` runs.
#[derive(Debug, Clone)]
pub struct GenerateBench {
    pub model_dir: PathBuf,
    pub prompts: PathBuf,
    pub batch: usize,
    pub new_tokens: usize,
    pub rounds: usize,
    pub device: Device,
    pub precision: Precision,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Runs the benchmark; the JSON line `tuna-trainer bench-generate` prints.
pub fn run(o: &GenerateBench) -> Result<Value> {
    let text = std::fs::read_to_string(&o.prompts)
        .map_err(|e| Error::io(format!("reading {}", o.prompts.display()), e))?;
    let file: Value = serde_json::from_str(&text).map_err(|e| Error::Data(e.to_string()))?;
    let prompts: Vec<Vec<i64>> = serde_json::from_value(file["prompts"].clone())
        .map_err(|e| Error::Data(format!("`prompts`: {e}")))?;
    if prompts.len() < o.batch || o.new_tokens < 2 {
        return Err(Error::Data(format!(
            "{} prompts for a batch of {}, {} new tokens (at least 2)",
            prompts.len(),
            o.batch,
            o.new_tokens
        )));
    }
    let prompts = &prompts[..o.batch];
    let opts = LoadOptions {
        device: o.device,
        base_kind: crate::trainer::base_kind(o.device, o.precision),
        task: TaskHead::CausalLm,
        lora: None,
        freeze: FreezeOptions::default(),
        init_seed: 0,
        quantization: None,
    };
    let t = Instant::now();
    let model = crate::load_model(&o.model_dir, &opts)?;
    let load_s = t.elapsed().as_secs_f64();
    let timed = |n: usize, m: &dyn Model| -> Result<f64> {
        let s = Sampling {
            max_tokens: n,
            ..Default::default()
        };
        let t = Instant::now();
        let out = generate(m, prompts, 0, &s, &mut |_, _| true)?;
        if o.device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        let secs = t.elapsed().as_secs_f64();
        if out.iter().any(|g| g.tokens.len() != n) {
            return Err(Error::Data("a sequence stopped early".into()));
        }
        Ok(secs)
    };
    let (mut ttft, mut total) = (Vec::new(), Vec::new());
    for round in 0..=o.rounds {
        let (a, b) = (
            timed(1, model.as_ref())?,
            timed(o.new_tokens, model.as_ref())?,
        );
        if round > 0 {
            ttft.push(a);
            total.push(b);
        }
    }
    let rates: Vec<f64> = ttft
        .iter()
        .zip(&total)
        .map(|(a, b)| (o.batch * (o.new_tokens - 1)) as f64 / (b - a).max(1e-9))
        .collect();
    Ok(json!({
        "impl": "tuna",
        "batch": o.batch,
        "prompt_tokens": prompts.iter().map(Vec::len).collect::<Vec<_>>(),
        "new_tokens": o.new_tokens,
        "device": format!("{:?}", o.device).to_lowercase(),
        "load_s": load_s,
        "ttft_s": median(&ttft),
        "decode_tokens_per_s": median(&rates),
        "ttft_times_s": ttft,
        "total_times_s": total,
        "peak_rss_bytes": crate::memory::peak_bytes(o.device),
    }))
}
