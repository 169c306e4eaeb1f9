//! Will the job fit? An estimate of a training job's peak memory from the model's `config.json`
//! and the job's knobs, before anything is loaded.
//!
//! The peak of a step is reached at the start of the backward pass of its largest micro-batch:
//!
//! - **weights**: every parameter, trainable ones in fp32 (the optimiser updates fp32 weights),
//!   frozen ones in the base dtype (fp32 on CPU; bf16 on CUDA under `precision` auto or bf16);
//!   under QLoRA the layers' linear weights in NF4 ([`NF4_BYTES_PER_PARAM`],
//!   [`NF4_DQ_BYTES_PER_PARAM`]) and, at the peak, one layer's of them dequantised in the base
//!   dtype (kept for its backward while it runs again);
//! - **gradients** and **optimizer** state: fp32, 4 and 8 bytes (AdamW's two moments; 4 with
//!   `optimizer_moments` bf16) per trainable parameter;
//! - **activations**: per layer and token, [`ArchFacts::activation_bytes_per_width`] bytes per
//!   unit of `hidden_size + intermediate_size` (measured per family), plus what each LoRA adapter
//!   keeps of its input (its dropout copy and mask), plus the attention scores where they are
//!   materialised (on CPU, with attention dropout ([`ArchFacts::cpu_attention_keeps_scores`]):
//!   every head keeps about [`ATTENTION_SCORE_BYTES`] per query and key; CPU's fused kernel
//!   without dropout and CUDA's fused kernels keep none); halved in bf16;
//! - with **activation checkpointing**, instead: each layer's input (`hidden_size` values per
//!   token and layer), one layer's activations, and then the larger of two later peaks: the
//!   loss's backward (the logits below) or a layer's backward as it runs again, when its
//!   activations' gradients add to its activations ([`CHECKPOINTED_LAYER_COPIES`] of one layer
//!   in all; the peak of a model without an LM head, measured with MiniLM; BENCHMARKS.md,
//!   memory);
//! - **logits**: causal LM keeps `[tokens, vocab]` three times in fp32 (the logits, their log
//!   softmax and its gradient), 4.5 times with checkpointing (the peak is then in the loss's
//!   backward);
//! - **runtime**: libtorch itself (CPU: the process's code and buffers, [`CPU_RUNTIME_BYTES`];
//!   CUDA: the context, [`CUDA_RUNTIME_BYTES`]).
//!
//! The micro-batch is `ceil(batch_size / gradient_accumulation_steps)` examples of
//! `max_seq_length` tokens: the worst case, since every micro-batch is padded only to its longest
//! example. BENCHMARKS.md compares the estimate with measured peaks (`scripts/bench-memory.sh`).

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::hf_config::{ArchFacts, HfConfig};
use crate::spec::{JobSpec, Lora, Moments, Precision, Quantization, Task, TrainingType};

/// libtorch's resident memory before any model (CPU), measured with the benchmark's runs.
pub const CPU_RUNTIME_BYTES: u64 = 550 << 20;
/// A CUDA context and libtorch's kernels on the device.
pub const CUDA_RUNTIME_BYTES: u64 = 600 << 20;
/// Bytes per head, query and key of the attention scores on CPU (scores, probabilities and their
/// gradient), measured with GPT-2 at 256 and 512 tokens.
pub const ATTENTION_SCORE_BYTES: f64 = 13.25;
/// What a LoRA adapter keeps per input element when its dropout is on (its input, the dropped
/// copy and the mask), measured with the Llama case under LoRA r16 on every linear layer, with
/// and without dropout.
const LORA_INPUT_BYTES_DROPOUT: f64 = 10.8;
/// fp32 `[tokens, vocab]` copies a causal LM step keeps at its peak (logits, log softmax, the
/// gradient), and with activation checkpointing (measured with the Llama cases, 2 x 512).
const LOGIT_COPIES: f64 = 3.0;
const CHECKPOINTED_LOGIT_COPIES: f64 = 4.5;
/// One layer's activations and their gradients, live while the checkpointed backward runs the
/// layer again: two copies of what the layer keeps (measured with MiniLM, 32 x 128, where no LM
/// head's logits hide this peak: one copy planned 0.77 of the measured peak, two 0.96).
pub const CHECKPOINTED_LAYER_COPIES: f64 = 2.0;
/// Without dropout an adapter keeps only its input.
const LORA_INPUT_BYTES: f64 = 4.0;
/// NF4's bytes per stored parameter: a 4-bit code each, and an fp32 absmax per block of 64.
pub const NF4_BYTES_PER_PARAM: f64 = 0.5 + 4.0 / 64.0;
/// With double quantisation: an 8-bit absmax code per block of 64, and an fp32 scale per 256
/// blocks.
pub const NF4_DQ_BYTES_PER_PARAM: f64 = 0.5 + 1.0 / 64.0 + 4.0 / (64.0 * 256.0);

/// Where the job trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accelerator {
    Cpu,
    Cuda,
}

/// The estimate, in bytes, by what holds the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryEstimate {
    pub accelerator: Accelerator,
    pub micro_batch: u64,
    pub seq_len: u64,
    pub weights_bytes: u64,
    pub gradients_bytes: u64,
    pub optimizer_bytes: u64,
    pub activations_bytes: u64,
    pub logits_bytes: u64,
    pub runtime_bytes: u64,
    pub total_bytes: u64,
}

/// The peak memory of `spec` on `accelerator` with micro-batches of `micro_batch` examples.
pub fn estimate_with(
    hf: &HfConfig,
    spec: &JobSpec,
    accelerator: Accelerator,
    micro_batch: u64,
) -> MemoryEstimate {
    let f = hf.arch.facts();
    let d = f.dims();
    let (layers, hidden, heads) = (
        d.num_layers as f64,
        d.hidden_size as f64,
        d.num_heads as f64,
    );
    let seq = u64::from(spec.max_seq_length).min(d.context_length.max(1) as u64);
    // DPO runs each pair's preferred and rejected sequence side by side.
    let rows = if spec.dpo.is_some() {
        2 * micro_batch
    } else {
        micro_batch
    };
    let tokens = (rows * seq) as f64;
    let bf16 = accelerator == Accelerator::Cuda && spec.precision != Precision::Fp32;

    let params = hf.num_parameters().max(0) as u64;
    let trainable = trainable_parameters(hf, spec).min(params);
    let base_bytes = if bf16 { 2 } else { 4 };
    // LoRA adds its adapters to the base; a full job trains (most of) the base itself.
    let stored_base = match spec.training_type {
        TrainingType::Lora => params,
        TrainingType::Full => params - trainable,
    };
    let mut weights = stored_base * base_bytes + trainable * 4;
    if let Some(nf4) = spec.lora.as_ref().and_then(|l| l.nf4) {
        let per_layer: i64 = f.layer_linear_shapes().iter().map(|(i, o)| i * o).sum();
        let per_layer = per_layer.max(0) as u64;
        let quantised = (per_layer * d.num_layers.max(0) as u64).min(stored_base);
        let per_param = if nf4.double_quantization {
            NF4_DQ_BYTES_PER_PARAM
        } else {
            NF4_BYTES_PER_PARAM
        };
        weights = weights - quantised * base_bytes
            + (quantised as f64 * per_param) as u64
            + per_layer * base_bytes;
    }

    let width = hidden + f.intermediate_size() as f64;
    let mut per_layer_token = f.activation_bytes_per_width() * width;
    if let Some(lora) = &spec.lora {
        let per_input = if lora.dropout > 0.0 {
            LORA_INPUT_BYTES_DROPOUT
        } else {
            LORA_INPUT_BYTES
        };
        per_layer_token += per_input * lora_inputs(f, lora) as f64;
    }
    let mut one_layer = tokens * per_layer_token;
    if accelerator == Accelerator::Cpu && f.cpu_attention_keeps_scores() {
        one_layer += rows as f64 * heads * (seq * seq) as f64 * ATTENTION_SCORE_BYTES;
    }
    if bf16 {
        one_layer /= 2.0;
    }
    // With checkpointing the peak moves to the loss's backward, where the logits, their log
    // softmax and both gradients are live at once: 4.5 copies measured (BENCHMARKS.md, memory).
    let logit_copies = if checkpointing(spec) {
        CHECKPOINTED_LOGIT_COPIES
    } else {
        LOGIT_COPIES
    };
    let logits = match spec.task {
        Task::CausalLm => tokens * d.vocab_size as f64 * 4.0 * logit_copies,
        _ => 0.0,
    };
    let activations = if checkpointing(spec) {
        // Each layer's input (in the compute kind), one layer's activations, and the larger of
        // the two later peaks: the loss's backward (the logits, counted apart) or a layer's
        // backward as it runs again, its activations' gradients on top of its activations
        // (CHECKPOINTED_LAYER_COPIES of one layer in all).
        let inputs = layers * tokens * hidden * if bf16 { 2.0 } else { 4.0 };
        let layer_peak = (CHECKPOINTED_LAYER_COPIES - 1.0) * one_layer;
        inputs + one_layer + (layer_peak - logits).max(0.0)
    } else {
        layers * one_layer
    };
    let runtime = match accelerator {
        Accelerator::Cpu => CPU_RUNTIME_BYTES,
        Accelerator::Cuda => CUDA_RUNTIME_BYTES,
    };
    let (activations, logits) = (activations as u64, logits as u64);
    let moment_bytes = match spec.optimizer_moments {
        Moments::Fp32 => 8,
        Moments::Bf16 => 4,
    };
    let (gradients, optimizer) = (trainable * 4, trainable * moment_bytes);
    MemoryEstimate {
        accelerator,
        micro_batch,
        seq_len: seq,
        weights_bytes: weights,
        gradients_bytes: gradients,
        optimizer_bytes: optimizer,
        activations_bytes: activations,
        logits_bytes: logits,
        runtime_bytes: runtime,
        total_bytes: weights + gradients + optimizer + activations + logits + runtime,
    }
}

/// Whether the job trains with activation checkpointing.
pub fn checkpointing(spec: &JobSpec) -> bool {
    spec.gradient_checkpointing == Some(true)
}

/// [`estimate_with`] at the job's own micro-batch.
pub fn estimate(hf: &HfConfig, spec: &JobSpec, accelerator: Accelerator) -> MemoryEstimate {
    estimate_with(hf, spec, accelerator, micro_batch(spec))
}

/// A job's estimate on either accelerator, as the API stores it with the job (the API does
/// not know which worker will run it; each worker checks its own again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEstimates {
    pub cpu: MemoryEstimate,
    pub cuda: MemoryEstimate,
}

/// [`estimate`] on the CPU and on CUDA.
pub fn estimates(hf: &HfConfig, spec: &JobSpec) -> JobEstimates {
    JobEstimates {
        cpu: estimate(hf, spec, Accelerator::Cpu),
        cuda: estimate(hf, spec, Accelerator::Cuda),
    }
}

/// The GPU memory sizes [`fits_table`] answers for, in GiB (a "24 GB" card has 24 GiB).
pub const GPU_SIZES_GIB: [u64; 3] = [24, 48, 80];

/// One row of [`fits_table`]: a method at a micro-batch size on CUDA (bf16 autocast).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodFit {
    pub task: Task,
    pub training_type: TrainingType,
    /// LoRA's rank (on every linear layer), if LoRA.
    pub lora_r: Option<u32>,
    /// `nf4`: QLoRA (double quantisation, gradient checkpointing on).
    pub quantization: Quantization,
    pub micro_batch: u64,
    pub seq_len: u64,
    pub total_bytes: u64,
    /// For each of [`GPU_SIZES_GIB`]: whether the estimate fits in that much GPU memory.
    pub fits_gib: std::collections::BTreeMap<String, bool>,
}

/// Which methods fit which GPU memory sizes, for a model: full fine-tuning, LoRA (r 16 on
/// every linear layer) and QLoRA (the same LoRA over an NF4 base, with gradient
/// checkpointing) for the model's first task, at micro-batches of 1 (reach any batch
/// with gradient accumulation) and 8 (the default batch without accumulation), sequences of
/// the model's context length up to 2048 tokens (512 for encoders), the other knobs at their
/// defaults.
pub fn fits_table(hf: &HfConfig) -> Vec<MethodFit> {
    let task = hf
        .tasks()
        .first()
        .copied()
        .unwrap_or(Task::SequenceClassification);
    let cap = if hf.is_decoder() { 2048 } else { 512 };
    let seq = hf.dims().context_length.clamp(8, cap);
    let mut rows = Vec::new();
    let methods = [
        (None, Quantization::None),
        (Some(16u32), Quantization::None),
        (Some(16), Quantization::Nf4),
    ];
    for (lora_r, quantization) in methods {
        let mut body = json!({"model": "m", "training_file": "f", "task": task.as_str(),
                              "max_seq_length": seq, "quantization": quantization});
        if let Some(r) = lora_r {
            body["lora_r"] = json!(r);
            body["lora_target_modules"] = json!("all-linear");
        }
        let Ok(req) = crate::spec::parse_create_request(&body, &Default::default(), 0) else {
            continue;
        };
        for micro_batch in [1, 8] {
            let e = estimate_with(hf, &req.spec, Accelerator::Cuda, micro_batch);
            rows.push(MethodFit {
                task,
                training_type: req.spec.training_type,
                lora_r,
                quantization,
                micro_batch,
                seq_len: e.seq_len,
                total_bytes: e.total_bytes,
                fits_gib: GPU_SIZES_GIB
                    .iter()
                    .map(|g| (g.to_string(), e.total_bytes <= g << 30))
                    .collect(),
            });
        }
    }
    rows
}

/// How the job runs in `available` bytes on `accelerator`: as it is when it fits; else, under
/// `gradient_checkpointing: "auto"`, with checkpointing; else (with
/// that too), under `batch_size: "auto"` (not [`JobSpec::fixed_batch_size`]), with the largest
/// micro-batch that fits, reached with more gradient accumulation (the same effective batch, so
/// the same optimiser steps). `Err`: it does not fit either way; the estimate of the job as
/// given.
pub fn fit(
    hf: &HfConfig,
    spec: &JobSpec,
    accelerator: Accelerator,
    available: u64,
) -> Result<JobSpec, MemoryEstimate> {
    let e = estimate(hf, spec, accelerator);
    if e.total_bytes <= available {
        return Ok(spec.clone());
    }
    // `gradient_checkpointing: "auto"` turns it on first (the same micro-batches).
    let mut fitted = spec.clone();
    if spec.gradient_checkpointing.is_none() {
        fitted.gradient_checkpointing = Some(true);
        if estimate(hf, &fitted, accelerator).total_bytes <= available {
            return Ok(fitted);
        }
    }
    if !spec.fixed_batch_size {
        let fits = |k: u64| estimate_with(hf, &fitted, accelerator, k).total_bytes <= available;
        if let Some(k) = (1..micro_batch(spec)).rev().find(|&k| fits(k)) {
            // ceil(batch / steps) <= k: the micro-batch the trainer forms is at most k.
            fitted.gradient_accumulation_steps = u64::from(spec.batch_size).div_ceil(k) as u32;
            return Ok(fitted);
        }
    }
    Err(e)
}

/// Examples per forward pass: `ceil(batch_size / gradient_accumulation_steps)`.
pub fn micro_batch(spec: &JobSpec) -> u64 {
    u64::from(spec.batch_size).div_ceil(u64::from(spec.gradient_accumulation_steps.max(1)))
}

/// Parameters the job trains: LoRA's adapters, or the base less its frozen embeddings and
/// layers (freeze patterns are not counted: they may match anything).
pub fn trainable_parameters(hf: &HfConfig, spec: &JobSpec) -> u64 {
    let f = hf.arch.facts();
    let d = f.dims();
    match &spec.lora {
        Some(lora) => {
            let r = i64::from(lora.r);
            let per_layer: i64 = targeted(f, lora)
                .map(|(input, output)| r * (input + output))
                .sum();
            // Linears outside the layers (an encoder's pooler) are hidden -> hidden.
            let outside = f
                .other_linears()
                .iter()
                .filter(|name| targets(lora, name))
                .count() as i64
                * r
                * 2
                * d.hidden_size;
            (per_layer * d.num_layers + outside).max(0) as u64
        }
        None => {
            let all = hf.num_parameters();
            let per_layer = (all - d.vocab_size * d.hidden_size) / d.num_layers.max(1);
            let mut frozen = i64::from(spec.freeze.layers).min(d.num_layers) * per_layer.max(0);
            if spec.freeze.embeddings {
                frozen += d.vocab_size * d.hidden_size;
            }
            (all - frozen).max(0) as u64
        }
    }
}

/// Whether a LoRA spec puts an adapter on the linear `name`: `all-linear`, or a target equal to
/// the name or to its last part (PEFT's matching).
fn targets(lora: &Lora, name: &str) -> bool {
    let short = name.rsplit('.').next().unwrap_or(name);
    lora.target_modules
        .iter()
        .any(|m| m == "all-linear" || m == short || m == name)
}

/// The `(in, out)` widths of the layer linears a LoRA spec targets.
fn targeted<'a>(f: &'a dyn ArchFacts, lora: &'a Lora) -> impl Iterator<Item = (i64, i64)> + 'a {
    f.layer_linears()
        .iter()
        .zip(f.layer_linear_shapes())
        .filter(move |(name, _)| targets(lora, name))
        .map(|(_, shape)| shape)
}

/// Sum of the input widths of the targeted linears of one layer.
fn lora_inputs(f: &dyn ArchFacts, lora: &Lora) -> i64 {
    targeted(f, lora).map(|(input, _)| input).sum()
}

/// Why a job will not fit, as its `insufficient_memory` error says it (the API's create-time
/// check and the worker's): what it needs (by part) against what the device has, and the
/// changes that would make it fit, each with its own estimate.
pub fn does_not_fit(
    hf: &HfConfig,
    spec: &JobSpec,
    e: &MemoryEstimate,
    available: u64,
    device: &str,
) -> String {
    let mut msg = format!(
        "The job needs about {} of memory ({} weights, {} gradients, {} optimizer state, {} activations, {} logits, {} runtime; micro-batches of {} x {} tokens) but the {device} has {}",
        gib(e.total_bytes),
        gib(e.weights_bytes),
        gib(e.gradients_bytes),
        gib(e.optimizer_bytes),
        gib(e.activations_bytes),
        gib(e.logits_bytes),
        gib(e.runtime_bytes),
        e.micro_batch,
        e.seq_len,
        gib(available),
    );
    let fixes = fitting_changes(hf, spec, e.accelerator, available);
    if fixes.is_empty() {
        msg.push_str("; nothing tuna can change about the job would make it fit: use a smaller model or a device with more memory");
    } else {
        msg.push_str("; it would fit with ");
        msg.push_str(&fixes.join(", or "));
    }
    msg
}

/// Single changes to the job that fit in `available`: a smaller micro-batch with gradient
/// accumulation (the same optimiser steps), activation checkpointing, bf16 optimiser moments,
/// LoRA instead of full fine-tuning (QLoRA where LoRA does not fit either), QLoRA instead of
/// LoRA, a shorter `max_seq_length`.
pub fn fitting_changes(
    hf: &HfConfig,
    spec: &JobSpec,
    accelerator: Accelerator,
    available: u64,
) -> Vec<String> {
    let mut out = Vec::new();
    let fits = |s: &JobSpec, m: u64| estimate_with(hf, s, accelerator, m).total_bytes <= available;
    let m = micro_batch(spec);
    if let Some(smaller) = (1..m).rev().find(|&k| fits(spec, k)) {
        let steps = u64::from(spec.batch_size).div_ceil(smaller);
        out.push(format!(
            "gradient_accumulation_steps {steps} (micro-batches of {smaller}, {})",
            gib(estimate_with(hf, spec, accelerator, smaller).total_bytes)
        ));
    }
    if !checkpointing(spec) {
        let mut ck = spec.clone();
        ck.gradient_checkpointing = Some(true);
        if fits(&ck, m) {
            out.push(format!(
                "gradient_checkpointing true ({})",
                gib(estimate_with(hf, &ck, accelerator, m).total_bytes)
            ));
        }
    }
    if spec.optimizer_moments == Moments::Fp32 {
        let mut bf16 = spec.clone();
        bf16.optimizer_moments = Moments::Bf16;
        if fits(&bf16, m) {
            out.push(format!(
                "optimizer_moments bf16 ({})",
                gib(estimate_with(hf, &bf16, accelerator, m).total_bytes)
            ));
        }
    }
    if spec.training_type == TrainingType::Full {
        let mut lora = spec.clone();
        lora.training_type = TrainingType::Lora;
        lora.lora = Some(Lora {
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            target_modules: vec!["all-linear".into()],
            nf4: None,
        });
        lora.freeze = Default::default();
        if fits(&lora, m) {
            out.push(format!(
                "training_type lora (r 16 on every linear layer, {})",
                gib(estimate_with(hf, &lora, accelerator, m).total_bytes)
            ));
        } else if let Some(q) = qlora(&lora).filter(|q| fits(q, m)) {
            out.push(format!(
                "quantization nf4 (QLoRA: r 16 on every linear layer over a 4-bit base, with gradient checkpointing, {})",
                gib(estimate_with(hf, &q, accelerator, m).total_bytes)
            ));
        }
    } else if let Some(q) = qlora(spec).filter(|q| fits(q, m)) {
        out.push(format!(
            "quantization nf4 (QLoRA: the base in 4 bits, with gradient checkpointing, {})",
            gib(estimate_with(hf, &q, accelerator, m).total_bytes)
        ));
    }
    let mut shorter = spec.clone();
    while shorter.max_seq_length > 64 {
        shorter.max_seq_length /= 2;
        if fits(&shorter, m) {
            out.push(format!(
                "max_seq_length {} ({})",
                shorter.max_seq_length,
                gib(estimate_with(hf, &shorter, accelerator, m).total_bytes)
            ));
            break;
        }
    }
    out
}

/// A LoRA spec as QLoRA (NF4 with double quantisation, checkpointing on), where the spec is
/// not QLoRA already.
fn qlora(spec: &JobSpec) -> Option<JobSpec> {
    let mut q = spec.clone();
    let lora = q.lora.as_mut()?;
    if lora.nf4.is_some() {
        return None;
    }
    lora.nf4 = Some(crate::spec::Nf4 {
        double_quantization: true,
    });
    q.gradient_checkpointing = Some(true);
    Some(q)
}

/// `bytes` as GiB with one decimal ("3.4 GiB"), for messages.
pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse_create_request;
    use serde_json::json;

    fn gpt2_124m() -> HfConfig {
        HfConfig::parse(
            &json!({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
                    "n_positions": 1024, "vocab_size": 50257})
            .to_string(),
        )
        .unwrap()
    }

    /// Llama 2 7B's shape.
    fn llama2_7b() -> HfConfig {
        HfConfig::parse(
            &json!({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                    "max_position_embeddings": 4096, "vocab_size": 32000})
            .to_string(),
        )
        .unwrap()
    }

    fn spec(extra: serde_json::Value) -> JobSpec {
        let mut body = json!({"model": "gpt2", "training_file": "f"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        parse_create_request(&body, &Default::default(), 1)
            .unwrap()
            .spec
    }

    #[test]
    fn full_fine_tuning_holds_sixteen_bytes_per_parameter_and_the_activations() {
        let hf = gpt2_124m();
        let s = spec(json!({"max_seq_length": 256, "hyperparameters": {"batch_size": 4}}));
        let e = estimate(&hf, &s, Accelerator::Cpu);
        let p = hf.num_parameters() as u64;
        assert_eq!(p, 124_439_808);
        assert_eq!((e.micro_batch, e.seq_len), (4, 256));
        assert_eq!(
            e.weights_bytes + e.gradients_bytes + e.optimizer_bytes,
            16 * p
        );
        // The measured peak of this configuration (BENCHMARKS.md): 4,663 MiB.
        let mib = e.total_bytes >> 20;
        assert!((4200..5100).contains(&mib), "{e:?}");
        assert_eq!(
            e.total_bytes,
            e.weights_bytes
                + e.gradients_bytes
                + e.optimizer_bytes
                + e.activations_bytes
                + e.logits_bytes
                + e.runtime_bytes
        );
    }

    #[test]
    fn a_dpo_job_holds_the_activations_of_both_sequences_of_each_pair() {
        let hf = gpt2_124m();
        let sft = estimate(&hf, &spec(json!({"max_seq_length": 256})), Accelerator::Cpu);
        let dpo = estimate(
            &hf,
            &spec(json!({"max_seq_length": 256, "method": {"type": "dpo"}})),
            Accelerator::Cpu,
        );
        assert_eq!(dpo.micro_batch, sft.micro_batch);
        assert_eq!(dpo.logits_bytes, 2 * sft.logits_bytes);
        assert_eq!(dpo.activations_bytes, 2 * sft.activations_bytes);
        assert_eq!(dpo.weights_bytes, sft.weights_bytes);
    }

    #[test]
    fn accumulation_lora_and_bf16_each_shrink_the_estimate() {
        let hf = gpt2_124m();
        let base = estimate(&hf, &spec(json!({"max_seq_length": 512})), Accelerator::Cpu);
        let accumulated = estimate(
            &hf,
            &spec(json!({"max_seq_length": 512, "gradient_accumulation_steps": 4})),
            Accelerator::Cpu,
        );
        assert_eq!((base.micro_batch, accumulated.micro_batch), (8, 2));
        assert!(accumulated.activations_bytes * 3 < base.activations_bytes);
        // LoRA trains few parameters, but each adapter keeps a dropout copy of its input: it saves
        // memory where the weights dominate (short sequences), not on long ones.
        let short = json!({"max_seq_length": 64, "hyperparameters": {"batch_size": 1}});
        let full_short = estimate(&hf, &spec(short.clone()), Accelerator::Cpu);
        let mut lora_short = short;
        lora_short["lora_r"] = json!(16);
        let lora = estimate(&hf, &spec(lora_short), Accelerator::Cpu);
        assert!(
            lora.optimizer_bytes * 20 < full_short.optimizer_bytes,
            "{lora:?}"
        );
        assert!(lora.total_bytes < full_short.total_bytes);
        assert!(lora.activations_bytes > full_short.activations_bytes);
        let cuda = estimate(
            &hf,
            &spec(json!({"max_seq_length": 512})),
            Accelerator::Cuda,
        );
        assert!(cuda.activations_bytes < base.activations_bytes / 2);
        // Full fine-tuning keeps fp32 weights on CUDA too; only frozen weights are bf16.
        assert_eq!(cuda.weights_bytes, base.weights_bytes);
    }

    #[test]
    fn a_job_that_does_not_fit_says_what_would() {
        let hf = gpt2_124m();
        let s = spec(json!({"max_seq_length": 1024, "hyperparameters": {"batch_size": 8}}));
        let e = estimate(&hf, &s, Accelerator::Cpu);
        let available = 6 << 30;
        assert!(e.total_bytes > available);
        let msg = does_not_fit(&hf, &s, &e, available, "CPU");
        assert!(
            msg.starts_with(&format!(
                "The job needs about {} of memory (",
                gib(e.total_bytes)
            )),
            "{msg}"
        );
        assert!(
            msg.contains("but the CPU has 6.0 GiB; it would fit with "),
            "{msg}"
        );
        let fixes = fitting_changes(&hf, &s, Accelerator::Cpu, available);
        assert!(
            fixes[0].starts_with("gradient_accumulation_steps "),
            "{fixes:?}"
        );
        // Every suggestion really fits: applied, it estimates under the limit.
        let steps: u32 = fixes[0].split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut fixed = s.clone();
        fixed.gradient_accumulation_steps = steps;
        assert!(estimate(&hf, &fixed, Accelerator::Cpu).total_bytes <= available);
        // Nothing fits in 100 MiB: not even the weights.
        let none = does_not_fit(&hf, &s, &e, 100 << 20, "CPU");
        assert!(
            none.ends_with("use a smaller model or a device with more memory"),
            "{none}"
        );
    }

    #[test]
    fn frozen_layers_and_embeddings_are_not_trained() {
        let hf = gpt2_124m();
        let all = trainable_parameters(&hf, &spec(json!({})));
        let frozen = trainable_parameters(
            &hf,
            &spec(json!({"freeze_embeddings": true, "freeze_layers": 6})),
        );
        assert_eq!(all, hf.num_parameters() as u64);
        let embeddings = 50257 * 768;
        assert!(
            frozen < all - embeddings && frozen > all / 4,
            "{frozen} of {all}"
        );
        // LoRA r16 on GPT-2's c_attn (768 -> 2304) only, as PEFT counts it.
        let lora = trainable_parameters(
            &hf,
            &spec(json!({"lora_r": 16, "lora_target_modules": ["c_attn"]})),
        );
        assert_eq!(lora, 12 * 16 * (768 + 2304));
    }

    #[test]
    fn bf16_moments_halve_the_optimizer_state_and_are_suggested_when_they_fit() {
        let hf = gpt2_124m();
        let fp32 = spec(json!({"max_seq_length": 256}));
        let bf16 = spec(json!({"max_seq_length": 256, "optimizer_moments": "bf16"}));
        let (a, b) = (
            estimate(&hf, &fp32, Accelerator::Cpu),
            estimate(&hf, &bf16, Accelerator::Cpu),
        );
        assert_eq!(a.optimizer_bytes, hf.num_parameters() as u64 * 8);
        assert_eq!(b.optimizer_bytes * 2, a.optimizer_bytes);
        assert_eq!(a.total_bytes - b.total_bytes, b.optimizer_bytes);
        // Just short of the fp32 job: bf16 moments are one of the ways to fit.
        let room = b.total_bytes + (a.total_bytes - b.total_bytes) / 2;
        let fixes = fitting_changes(&hf, &fp32, Accelerator::Cpu, room);
        assert!(
            fixes
                .iter()
                .any(|f| f.starts_with("optimizer_moments bf16 (")),
            "{fixes:?}"
        );
        assert!(fitting_changes(&hf, &bf16, Accelerator::Cpu, room)
            .iter()
            .all(|f| !f.starts_with("optimizer_moments")));
    }

    #[test]
    fn the_fits_table_answers_each_method_for_each_gpu_size() {
        let small = fits_table(&gpt2_124m());
        // Full, LoRA and QLoRA, at micro-batches of 1 and 8.
        assert_eq!(small.len(), 6);
        assert!(
            small.iter().all(|f| f.fits_gib["80"] && f.seq_len == 1024),
            "{small:?}"
        );
        // Llama 2 7B's shape: full fine-tuning (16 bytes per parameter) fits no single GPU;
        // LoRA's frozen bf16 base does, given the memory for its activations.
        let llama = llama2_7b();
        let table = fits_table(&llama);
        let row = |t: TrainingType, mb: u64| {
            table
                .iter()
                .find(|f| f.training_type == t && f.micro_batch == mb)
                .unwrap()
        };
        let full = row(TrainingType::Full, 1);
        assert!(
            full.total_bytes > 100 << 30 && !full.fits_gib["80"],
            "{full:?}"
        );
        let lora = row(TrainingType::Lora, 1);
        assert_eq!(
            (lora.lora_r, lora.seq_len, lora.task),
            (Some(16), 2048, Task::CausalLm)
        );
        assert!(!lora.fits_gib["24"] && lora.fits_gib["80"], "{lora:?}");
        assert!(row(TrainingType::Lora, 8).total_bytes > lora.total_bytes);
        // The rows are the planner's own estimates.
        let e = estimates(
            &llama,
            &spec(
                json!({"model": "m", "lora_r": 16, "lora_target_modules": "all-linear",
                                               "max_seq_length": 2048, "gradient_accumulation_steps": 8}),
            ),
        );
        assert_eq!(e.cuda.total_bytes, lora.total_bytes);
        assert!(e.cpu.total_bytes > e.cuda.total_bytes);
    }

    #[test]
    fn qlora_stores_the_layer_linears_in_about_half_a_byte_and_is_suggested_where_lora_does_not_fit(
    ) {
        // On a 24 GiB GPU.
        let llama = llama2_7b();
        let body = json!({"model": "m", "lora_r": 16, "lora_target_modules": "all-linear",
                          "max_seq_length": 2048, "hyperparameters": {"batch_size": 1}});
        let lora = spec(body.clone());
        let mut q = body.clone();
        q["quantization"] = json!("nf4");
        let qlora = spec(q.clone());
        q["double_quantization"] = json!(false);
        let plain_nf4 = spec(q);
        assert_eq!(qlora.gradient_checkpointing, Some(true));
        let (l, ql, pq) = (
            estimate(&llama, &lora, Accelerator::Cuda),
            estimate(&llama, &qlora, Accelerator::Cuda),
            estimate(&llama, &plain_nf4, Accelerator::Cuda),
        );
        // The layers' linears: 32 x (4 x 4096^2 + 3 x 4096 x 11008) parameters, bf16 (2 bytes)
        // under LoRA; 0.516 (0.5625 without double quantisation) bytes under QLoRA, plus one
        // layer's dequantised in bf16 at the peak.
        let per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008;
        let quantised = 32 * per_layer;
        let saved = l.weights_bytes - ql.weights_bytes;
        let expect =
            2 * quantised - (quantised as f64 * NF4_DQ_BYTES_PER_PARAM) as u64 - 2 * per_layer;
        assert!(saved.abs_diff(expect) <= 1, "{saved} {expect}");
        assert!(pq.weights_bytes > ql.weights_bytes);
        assert!((0.515..0.517).contains(&NF4_DQ_BYTES_PER_PARAM));
        // The adapters and their optimiser state are LoRA's.
        assert_eq!(
            (ql.gradients_bytes, ql.optimizer_bytes),
            (l.gradients_bytes, l.optimizer_bytes)
        );
        let gpu = 24 << 30;
        assert!(l.total_bytes > gpu && ql.total_bytes < gpu, "{l:?} {ql:?}");
        let fixes = fitting_changes(&llama, &lora, Accelerator::Cuda, gpu);
        assert!(
            fixes
                .iter()
                .any(|f| f.starts_with("quantization nf4 (QLoRA")),
            "{fixes:?}"
        );
        // Full fine-tuning, where LoRA does not fit either: QLoRA is the suggestion.
        let full = spec(json!({"model": "m", "max_seq_length": 2048,
                               "hyperparameters": {"batch_size": 1}}));
        let fixes = fitting_changes(&llama, &full, Accelerator::Cuda, gpu);
        assert!(
            fixes
                .iter()
                .any(|f| f.starts_with("quantization nf4 (QLoRA: r 16")),
            "{fixes:?}"
        );
        let table = fits_table(&llama);
        let row = table
            .iter()
            .find(|f| f.quantization == Quantization::Nf4 && f.micro_batch == 1)
            .unwrap();
        assert!(row.fits_gib["24"], "{row:?}");
        // Every family has checkpointing, so QLoRA rows too: GPT-2's NF4 base is smaller.
        let gpt2 = fits_table(&gpt2_124m());
        let total = |q: Quantization| {
            gpt2.iter()
                .find(|f| f.quantization == q && f.lora_r.is_some() && f.micro_batch == 1)
                .unwrap()
                .total_bytes
        };
        assert!(total(Quantization::Nf4) < total(Quantization::None));
    }

    #[test]
    fn batch_size_auto_splits_micro_batches_to_fit_and_a_given_batch_size_does_not() {
        let hf = gpt2_124m();
        // Checkpointing off, so that only the micro-batch can change.
        let auto = spec(
            json!({"max_seq_length": 1024, "gradient_checkpointing": false,
                               "hyperparameters": {"batch_size": "auto"}}),
        );
        let given = spec(
            json!({"max_seq_length": 1024, "gradient_checkpointing": false,
                                "hyperparameters": {"batch_size": 8}}),
        );
        assert!(!auto.fixed_batch_size && given.fixed_batch_size);
        let available = 6 << 30;
        assert!(estimate(&hf, &auto, Accelerator::Cpu).total_bytes > available);
        let fitted = fit(&hf, &auto, Accelerator::Cpu, available).unwrap();
        let m = micro_batch(&fitted);
        assert!(
            m < 8 && fitted.gradient_accumulation_steps as u64 * m >= 8,
            "{m}"
        );
        assert_eq!(fitted.batch_size, 8);
        assert!(estimate(&hf, &fitted, Accelerator::Cpu).total_bytes <= available);
        // The largest that fits: one more example per micro-batch would not.
        assert!(estimate_with(&hf, &auto, Accelerator::Cpu, m + 1).total_bytes > available);
        // A job that fits stays as it is; a given batch size is not changed; nothing fits in
        // 100 MiB.
        assert_eq!(fit(&hf, &auto, Accelerator::Cpu, 1 << 40).unwrap(), auto);
        assert!(fit(&hf, &given, Accelerator::Cpu, available).is_err());
        assert!(fit(&hf, &auto, Accelerator::Cpu, 100 << 20).is_err());
    }

    #[test]
    fn checkpointing_keeps_one_input_per_layer_and_auto_turns_it_on_before_splitting_batches() {
        let llama = HfConfig::parse(
            &json!({"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                    "max_position_embeddings": 2048, "vocab_size": 49152})
            .to_string(),
        )
        .unwrap();
        let mut body = json!({"model": "m", "training_file": "f", "max_seq_length": 512,
                              "hyperparameters": {"batch_size": 2}});
        let plain = spec(body.clone());
        body["gradient_checkpointing"] = json!(true);
        let on = spec(body);
        let (a, b) = (
            estimate(&llama, &plain, Accelerator::Cpu),
            estimate(&llama, &on, Accelerator::Cpu),
        );
        // Inputs: 30 layers x 1024 tokens x 576 x 4 bytes, plus one layer's activations (the
        // logits' peak, 4.5 copies of 49152 values a token, is above a layer's backward).
        let inputs = 30 * 1024 * 576 * 4;
        assert_eq!(b.activations_bytes, inputs + a.activations_bytes / 30);
        assert_eq!(b.weights_bytes, a.weights_bytes);
        // Auto: between the two estimates, checkpointing goes on and the micro-batch stays.
        let mut auto = plain.clone();
        auto.fixed_batch_size = false;
        let room = (a.total_bytes + b.total_bytes) / 2;
        let fitted = fit(&llama, &auto, Accelerator::Cpu, room).unwrap();
        assert_eq!(fitted.gradient_checkpointing, Some(true));
        assert_eq!(micro_batch(&fitted), 2);
        let fixes = fitting_changes(&llama, &plain, Accelerator::Cpu, room);
        assert!(
            fixes
                .iter()
                .any(|f| f.starts_with("gradient_checkpointing true (")),
            "{fixes:?}"
        );
        // Asked for, it is planned: GPT-2 keeps one input per layer too.
        let g = gpt2_124m();
        let mut ask = spec(json!({"max_seq_length": 512}));
        ask.gradient_checkpointing = Some(true);
        assert!(checkpointing(&ask));
        let (off, on) = (
            estimate(&g, &spec(json!({"max_seq_length": 512})), Accelerator::Cpu),
            estimate(&g, &ask, Accelerator::Cpu),
        );
        assert!(
            on.activations_bytes < off.activations_bytes / 4,
            "{on:?} {off:?}"
        );
    }
}
