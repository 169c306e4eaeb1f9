//! `tuna-trainer bench`: times tuna's own training step (the trainer's [`trainer::train_step`]:
//! collate, forward, loss, backward, one host read of loss and norm, clipping, AdamW) on a
//! pre-tokenised batch file, so that `python/bench_train_peer.py` can time transformers on the
//! very same model folder, batches and settings. `scripts/bench-train.sh` runs both.
//!
//! Batch file (JSON, written by `bench_train_peer.py prepare`):
//! `{"task": "causal_lm" | "sequence_classification", "num_labels": 2, "max_len": 1024,
//!   "batches": [[{"input_ids": [..], "label": 0}, ..], ..]}`: one list of examples per
//! optimiser step (cycled when there are fewer than warm-up + timed steps). Causal examples
//! learn every token; classification examples carry `label`.
//!
//! Output: one JSON line (keys shared with the peer script):
//! - `step_time_median_s`, `step_time_mean_s`, `step_times_s`: wall time per optimiser step
//!   after `warmup` untimed steps (on CUDA each step ends with a device synchronisation);
//! - `tokens_per_s_real`: non-padding tokens per second; `tokens_per_s_padded`: tokens the
//!   model actually computed (rows x row length, padding included);
//! - `tflops`: model FLOPs of the real tokens per second, `mfu` = `tflops / peak_tflops` when a
//!   peak is given. Model FLOPs per step, summed over the examples (length `n`):
//!   full fine-tune `6 * N * n + 12 * L * d * n^2`; LoRA `4 * N * n + 6 * N_lora * n +
//!   12 * L * d * n^2` (no weight gradients for the frozen base), where `N` counts the weights
//!   of every matrix multiply (2-D weights that are not embedding tables, plus the LM head when
//!   tied to the embeddings), `N_lora` the adapter weights, `L` layers, `d` attention width.
//!   Padding is not counted (useful work only), for both sides alike;
//! - `peak_rss_bytes`: the process's peak resident memory (`VmHWM`), meaningful on CPU; on
//!   CUDA the driver script samples `nvidia-smi` for both processes instead;
//! - `planned`: the memory planner's estimate (`tuna_core::memory`) for a job of the same model,
//!   batch, length and method, to compare with the measured peak (`scripts/bench-memory.sh`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
use tuna_core::spec::{Precision, Task};

use crate::data::{self, Features, Target};
use crate::model::{FreezeOptions, LoadOptions, LoraOptions, Model, Nf4Options, TaskHead};
use crate::trainer::{self, StepConfig};
use crate::{Error, Result};

/// What `tuna-trainer bench` runs.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub model_dir: PathBuf,
    pub data: PathBuf,
    pub device: Device,
    pub precision: Precision,
    /// LoRA on every linear layer (PEFT's `all-linear`) with this rank; None: full fine-tune.
    pub lora_r: Option<i64>,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Causal LM: pack each step's examples into rows of `max_len` tokens; classification: group
    /// them by length into separately padded micro-batches (as a job with `packing` does).
    pub packing: bool,
    /// Activation checkpointing ([`crate::model::Model::forward_backward_checkpointed`]).
    pub gradient_checkpointing: bool,
    /// QLoRA (with `lora_r`): the base's layer linears in NF4, with or without double
    /// quantisation; checkpointing on, as a job has it.
    pub quantization: Option<Nf4Options>,
    /// AdamW's moments in bf16 with stochastic rounding (`optimizer_moments: "bf16"`).
    pub bf16_moments: bool,
    pub warmup: usize,
    pub steps: usize,
    pub learning_rate: f64,
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// Peak FLOP/s of the device in TFLOP/s, for the MFU.
    pub peak_tflops: Option<f64>,
    /// Free-form case name echoed in the output.
    pub case: String,
}

#[derive(Debug, Deserialize)]
struct FileExample {
    input_ids: Vec<i64>,
    #[serde(default)]
    label: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct BatchFile {
    task: String,
    #[serde(default)]
    num_labels: Option<usize>,
    max_len: usize,
    batches: Vec<Vec<FileExample>>,
}

fn read_batches(path: &Path) -> Result<BatchFile> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let f: BatchFile =
        serde_json::from_str(&text).map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
    if f.batches.is_empty() || f.batches.iter().any(Vec::is_empty) {
        return Err(Error::Data(format!(
            "{}: needs at least one non-empty batch",
            path.display()
        )));
    }
    if f.batches.iter().flatten().any(|e| e.input_ids.is_empty()) {
        return Err(Error::Data(format!(
            "{}: an example has no tokens",
            path.display()
        )));
    }
    match f.task.as_str() {
        "causal_lm" => Ok(f),
        "sequence_classification" if f.batches.iter().flatten().all(|e| e.label.is_some()) => Ok(f),
        "sequence_classification" => Err(Error::Data(format!(
            "{}: every classification example needs a label",
            path.display()
        ))),
        other => Err(Error::Data(format!(
            "{}: unknown task {other:?}",
            path.display()
        ))),
    }
}

pub use crate::memory::peak_rss_bytes;

/// Parameter counts for the FLOP formula: (all, trainable, matmul weights `N`, LoRA weights).
pub fn flop_params(model: &dyn Model, causal: bool) -> (i64, i64, i64, i64) {
    let info = model.info();
    let all = model.all_parameters();
    let total: i64 = all.values().map(|t| t.numel() as i64).sum();
    let trainable: i64 = model
        .trainable_parameters()
        .iter()
        .map(|(_, t)| t.numel() as i64)
        .sum();
    let mut n_mm = 0i64;
    let mut n_lora = 0i64;
    let mut has_head = false;
    for (name, t) in &all {
        if name.contains("lora_") {
            n_lora += t.numel() as i64;
        } else if t.dim() == 2 && !is_embedding(name) {
            n_mm += t.numel() as i64;
            has_head |= name == "lm_head.weight";
        }
    }
    if causal && !has_head {
        n_mm += info.vocab_size * info.hidden_size;
    }
    (total, trainable, n_mm, n_lora)
}

/// Embedding tables (looked up, not multiplied), by Hugging Face name.
pub fn is_embedding(name: &str) -> bool {
    name.contains("wte") || name.contains("wpe") || name.contains("embed")
}

/// Model FLOPs of one step over examples of these lengths (see the module documentation).
pub fn step_flops(
    lengths: &[usize],
    n_mm: i64,
    n_lora: i64,
    lora: bool,
    layers: i64,
    d_attn: i64,
) -> f64 {
    let (mm, lo) = (n_mm as f64, n_lora as f64);
    let per_token = if lora { 4.0 * mm + 6.0 * lo } else { 6.0 * mm };
    lengths
        .iter()
        .map(|n| {
            let n = *n as f64;
            per_token * n + 12.0 * layers as f64 * d_attn as f64 * n * n
        })
        .sum()
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// Runs the benchmark and returns the JSON line `tuna-trainer bench` prints.
pub fn run(o: &BenchOptions) -> Result<Value> {
    let bench = Bench::load(o)?;
    let timed = bench.time_steps()?;
    Ok(bench.report(&timed))
}

/// A loaded benchmark: the model, the batches and how one step runs them.
struct Bench<'a> {
    o: &'a BenchOptions,
    file: BatchFile,
    base_kind: Kind,
    model: Box<dyn Model>,
    /// Seconds `load_model` took.
    load_s: f64,
    batches: Vec<Vec<Features>>,
    cfg: StepConfig,
    /// [`flop_params`]: (all, trainable, matmul weights, LoRA weights).
    params: (i64, i64, i64, i64),
}

/// The timed steps' sums.
struct Timed {
    /// Wall time of each timed step.
    times: Vec<f64>,
    /// Non-padding tokens.
    real: usize,
    /// Tokens computed, padding included.
    padded: usize,
    flops: f64,
    loss_sum: f64,
    targets: usize,
    /// Loss per target of the very last step (warm-up included).
    last_loss: f64,
    /// What the run holds after its last step, by part.
    held: Value,
}

impl<'a> Bench<'a> {
    /// Reads the batch file and loads the model (LoRA on every linear layer when asked).
    fn load(o: &'a BenchOptions) -> Result<Bench<'a>> {
        let file = read_batches(&o.data)?;
        let causal = file.task == "causal_lm";
        let base_kind = trainer::base_kind(o.device, o.precision);
        let opts = LoadOptions {
            device: o.device,
            base_kind,
            task: task_head(&file, causal),
            lora: o.lora_r.map(|r| LoraOptions {
                r,
                alpha: o.lora_alpha,
                dropout: o.lora_dropout,
                target_modules: vec!["all-linear".into()],
            }),
            freeze: FreezeOptions::default(),
            init_seed: o.seed as i64,
            quantization: o.quantization,
        };
        if o.quantization.is_some() && o.lora_r.is_none() {
            return Err(Error::Config("--quantization nf4 needs --lora-r".into()));
        }
        let load_start = Instant::now();
        let model = crate::models::load_model(&o.model_dir, &opts)?;
        let load_s = load_start.elapsed().as_secs_f64();
        let batches = features(&file, causal, model.info().vocab_size)?;
        let checkpointing = o.gradient_checkpointing || o.quantization.is_some();
        let mut cfg = step_config(model.as_ref(), &file, &batches, causal, o.packing);
        cfg.checkpointing = checkpointing;
        let params = flop_params(model.as_ref(), causal);
        Ok(Bench {
            o,
            file,
            base_kind,
            model,
            load_s,
            batches,
            cfg,
            params,
        })
    }

    /// `warmup` untimed steps, then `steps` timed ones (each ending with a device sync on CUDA),
    /// cycling through the batches.
    fn time_steps(&self) -> Result<Timed> {
        let (o, info) = (self.o, self.model.info());
        let mut opt = trainer::optimiser(self.model.as_ref(), o.weight_decay, o.bf16_moments)?;
        let (_, _, n_mm, n_lora) = self.params;
        let mut t = Timed {
            times: Vec::with_capacity(o.steps),
            real: 0,
            padded: 0,
            flops: 0.0,
            loss_sum: 0.0,
            targets: 0,
            last_loss: f64::NAN,
            held: Value::Null,
        };
        for step in 0..(o.warmup + o.steps) {
            let items: Vec<&Features> = self.batches[step % self.batches.len()].iter().collect();
            let started = Instant::now();
            let r = trainer::train_step(
                self.model.as_ref(),
                &mut opt,
                &items,
                &self.cfg,
                o.seed,
                step as u64,
                o.learning_rate,
                o.max_grad_norm,
            )?;
            if let Device::Cuda(i) = o.device {
                tch::Cuda::synchronize(i as i64);
            }
            let secs = started.elapsed().as_secs_f64();
            t.last_loss = r.loss_sum / r.targets.max(1) as f64;
            if step < o.warmup {
                continue;
            }
            t.times.push(secs);
            let lengths: Vec<usize> = items.iter().map(|f| f.input_ids.len()).collect();
            t.real += r.tokens;
            t.padded += padded_tokens(&lengths, &self.cfg);
            t.flops += step_flops(
                &lengths,
                n_mm,
                n_lora,
                o.lora_r.is_some(),
                info.num_layers,
                info.hidden_size,
            );
            t.loss_sum += r.loss_sum;
            t.targets += r.targets;
        }
        t.held = self.held(&opt)?;
        Ok(t)
    }

    /// The bytes the model and optimiser hold, read from the tensors themselves: trainable
    /// weights, their gradients, the AdamW moments, the frozen weights (NF4 ones by their codes
    /// and scales; their zero-stride placeholders take nothing).
    fn held(&self, opt: &crate::optim::AdamW) -> Result<Value> {
        let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        let trainable = self.model.trainable_parameters();
        let names: std::collections::HashSet<&str> =
            trainable.iter().map(|(n, _)| n.as_str()).collect();
        let (mut weights, mut grads) = (0u64, 0u64);
        for (_, p) in &trainable {
            weights += bytes(p);
            let g = p.grad();
            if g.defined() {
                grads += bytes(&g);
            }
        }
        let frozen: u64 = self
            .model
            .all_parameters()
            .iter()
            .filter(|(n, t)| !names.contains(n.as_str()) && t.stride().iter().any(|&s| s != 0))
            .map(|(_, t)| bytes(t))
            .sum();
        let (nf4_params, nf4_bytes) = self.model.nf4_storage();
        let moments: u64 = opt
            .state_tensors()?
            .iter()
            .filter(|(n, _)| n != "step")
            .map(|(_, t)| bytes(t))
            .sum();
        let n: u64 = trainable.iter().map(|(_, p)| p.numel() as u64).sum();
        Ok(json!({
            "trainable_params": n,
            "trainable_weight_bytes": weights,
            "gradient_bytes": grads,
            "optimizer_bytes": moments,
            "frozen_bytes": frozen,
            "nf4_params": nf4_params,
            "nf4_bytes": nf4_bytes,
            "bytes_per_trainable_param": (weights + grads + moments) as f64 / n.max(1) as f64,
        }))
    }

    /// The memory planner's estimate for this run (`tuna_core::memory`), as a job of the same
    /// model, batch, length and method would get it; null when config.json does not read.
    fn planned(&self) -> Value {
        let (o, file) = (self.o, &self.file);
        let Ok(hf) = crate::models::read_config(&o.model_dir) else {
            return Value::Null;
        };
        let mut body = json!({
            "model": "bench", "training_file": "bench", "max_seq_length": file.max_len,
            "hyperparameters": {"batch_size": self.batches.iter().map(Vec::len).max().unwrap_or(1)},
            "task": file.task,
        });
        if let Some(r) = o.lora_r {
            body["lora_r"] = json!(r);
            body["lora_alpha"] = json!(o.lora_alpha);
            body["lora_dropout"] = json!(o.lora_dropout);
        }
        if o.gradient_checkpointing {
            body["gradient_checkpointing"] = json!(true);
        }
        if o.bf16_moments {
            body["optimizer_moments"] = json!("bf16");
        }
        if let Some(q) = o.quantization {
            body["quantization"] = json!("nf4");
            body["double_quantization"] = json!(q.double_quant);
        }
        let spec = match tuna_core::spec::parse_create_request(&body, &Default::default(), 0) {
            Ok(r) => r.spec,
            Err(e) => return json!({"error": e.message}),
        };
        let accelerator = if o.device == Device::Cpu {
            tuna_core::memory::Accelerator::Cpu
        } else {
            tuna_core::memory::Accelerator::Cuda
        };
        json!(tuna_core::memory::estimate(&hf, &spec, accelerator))
    }

    /// The JSON line (see the module documentation).
    fn report(&self, t: &Timed) -> Value {
        let (o, file, cfg, info) = (self.o, &self.file, &self.cfg, self.model.info());
        let (total, trainable, n_mm, n_lora) = self.params;
        let lora = o.lora_r.is_some();
        let times = &t.times;
        let total_s: f64 = times.iter().sum();
        let mean = total_s / times.len().max(1) as f64;
        let tflops = if total_s > 0.0 {
            t.flops / total_s / 1e12
        } else {
            f64::NAN
        };
        json!({
            "side": "tuna",
            "case": o.case,
            "device": format!("{:?}", o.device).to_lowercase(),
            "threads": tch::get_num_threads(),
            "precision": if self.base_kind == Kind::BFloat16 { "bf16" } else { "fp32" },
            "model_type": info.model_type,
            "task": file.task,
            "lora_r": o.lora_r,
            "gradient_checkpointing": self.cfg.checkpointing,
            "quantization": if o.quantization.is_some() { "nf4" } else { "none" },
            "double_quantization": o.quantization.map(|q| q.double_quant),
            "optimizer_moments": if o.bf16_moments { "bf16" } else { "fp32" },
            "held": t.held,
            "packing": if cfg.pack_len.is_some() { "packed rows" } else if cfg.group_overhead_tokens.is_some() { "length groups" } else { "none" },
            "batch_size": self.batches[0].len(),
            "max_len": file.max_len,
            "warmup_steps": o.warmup,
            "timed_steps": times.len(),
            "params": total,
            "trainable_params": trainable,
            "matmul_params": n_mm,
            "lora_params": n_lora,
            "load_s": self.load_s,
            "step_time_median_s": median(times),
            "step_time_mean_s": mean,
            "step_times_s": times,
            "real_tokens": t.real,
            "padded_tokens": t.padded,
            "tokens_per_s_real": t.real as f64 / total_s,
            "tokens_per_s_padded": t.padded as f64 / total_s,
            "tflops": tflops,
            "mfu": o.peak_tflops.map(|p| tflops / p),
            "peak_rss_bytes": peak_rss_bytes(),
            "planned": self.planned(),
            "timed_loss_per_target": t.loss_sum / t.targets.max(1) as f64,
            "last_loss": t.last_loss,
            "flops_formula": if lora {
                "4*N*n + 6*N_lora*n + 12*L*d*n^2 per example of n real tokens"
            } else {
                "6*N*n + 12*L*d*n^2 per example of n real tokens"
            },
        })
    }
}

/// The head the batch file's task needs: classification over `num_labels` (else one more than
/// the largest label).
fn task_head(file: &BatchFile, causal: bool) -> TaskHead {
    if causal {
        return TaskHead::CausalLm;
    }
    let n = file.num_labels.unwrap_or_else(|| {
        1 + file
            .batches
            .iter()
            .flatten()
            .filter_map(|e| e.label)
            .max()
            .unwrap_or(1) as usize
    });
    TaskHead::SequenceClassification {
        id2label: (0..n).map(|i| i.to_string()).collect(),
        problem_type: Default::default(),
    }
}

/// The batch file's examples as the trainer's features (causal: every token is a target),
/// checked against the model's vocabulary.
fn features(file: &BatchFile, causal: bool, vocab_size: i64) -> Result<Vec<Vec<Features>>> {
    let batches: Vec<Vec<Features>> = file
        .batches
        .iter()
        .enumerate()
        .map(|(b, batch)| {
            batch
                .iter()
                .enumerate()
                .map(|(i, e)| Features {
                    line: (b * 100_000 + i + 1) as u64,
                    input_ids: e.input_ids.clone(),
                    labels: if causal {
                        e.input_ids.clone()
                    } else {
                        Vec::new()
                    },
                    token_type_ids: Vec::new(),
                    target: if causal {
                        Target::Tokens
                    } else {
                        Target::Class(e.label.unwrap_or_default())
                    },
                })
                .collect()
        })
        .collect();
    if let Some(v) = batches
        .iter()
        .flatten()
        .flat_map(|f| f.input_ids.iter())
        .find(|i| **i < 0 || **i >= vocab_size)
    {
        return Err(Error::Data(format!(
            "token id {v} is outside the model's vocabulary of {vocab_size}"
        )));
    }
    Ok(batches)
}

/// One micro-batch per step (the largest batch), packed or length-grouped with `packing`.
fn step_config(
    model: &dyn Model,
    file: &BatchFile,
    batches: &[Vec<Features>],
    causal: bool,
    packing: bool,
) -> StepConfig {
    let info = model.info();
    let pad_id = info
        .pad_token_id
        .or(info.eos_token_ids.first().copied())
        .unwrap_or(0);
    StepConfig {
        micro: batches.iter().map(Vec::len).max().unwrap_or(1),
        pad_id,
        task: if causal {
            Task::CausalLm
        } else {
            Task::SequenceClassification
        },
        with_types: model.uses_token_type_ids(),
        pack_len: (causal && packing).then_some(file.max_len),
        group_overhead_tokens: (!causal && packing).then_some(trainer::GROUP_OVERHEAD_TOKENS),
        checkpointing: false,
        dpo_beta: None,
    }
}

/// Tokens the model computes for examples of these lengths, padding included: packed rows,
/// length groups or one batch padded to its longest example.
fn padded_tokens(lengths: &[usize], cfg: &StepConfig) -> usize {
    match cfg.pack_len {
        None if cfg.group_overhead_tokens.is_some() => {
            let overhead = cfg.group_overhead_tokens.unwrap_or(0);
            data::group_by_length(lengths, overhead)
                .iter()
                .map(|g| g.len() * g.iter().map(|i| lengths[*i]).max().unwrap_or(0))
                .sum()
        }
        Some(len) => {
            let rows = data::pack_rows(lengths, len);
            let longest = rows
                .iter()
                .map(|r| r.iter().map(|i| lengths[*i]).sum::<usize>())
                .max()
                .unwrap_or(0);
            rows.len() * longest
        }
        None => lengths.len() * lengths.iter().copied().max().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_formula_and_median() {
        // One layer, d = 2, N = 10: 6*10*3 + 12*1*2*9 = 180 + 216.
        assert_eq!(step_flops(&[3], 10, 0, false, 1, 2), 396.0);
        assert_eq!(
            step_flops(&[3], 10, 1, true, 1, 2),
            4.0 * 30.0 + 18.0 + 216.0
        );
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(is_embedding("transformer.wte.weight"));
        assert!(is_embedding("bert.embeddings.word_embeddings.weight"));
        assert!(!is_embedding("lm_head.weight"));
    }
}
