//! The training loop: one fine-tuning job from a model folder and parsed examples to checkpoints
//! and a final model.
//!
//! Batching: `batch_size` examples make one optimiser step (OpenAI's meaning). They are split
//! into `gradient_accumulation_steps` micro-batches of `ceil(batch_size / accumulation)`
//! examples (the last may be smaller), each right-padded to its own longest example. The loss is
//! summed over the targets of every micro-batch and divided by the targets of the whole step
//! (tokens for causal LM, examples for classification), so one step of 8 examples equals eight
//! accumulated micro-batches of 1. An epoch has `ceil(n / batch_size)` steps; the order of each
//! epoch is a permutation seeded by `(seed, epoch)`.
//!
//! Reproducibility: `tch::manual_seed` is set from `(seed, step, micro-batch)` before every
//! micro-batch, so dropout masks depend only on the position in the run and a resumed run
//! repeats an uninterrupted one exactly on CPU.
//!
//! Host syncs: one per optimiser step (loss, grad norm and correct predictions read together),
//! used to stop on a non-finite loss before the update is applied. Clipping itself does not sync.
//!
//! Evaluation every `eval_interval` steps (0: each epoch end) and at the end; checkpoints every
//! `checkpoint_interval` steps (0: each epoch end) and at the end; early stopping after
//! `early_stopping_patience` evaluations without a lower validation loss. The final model is the
//! last weights (not the best evaluation's).
//!
//! Control: [`Control`] is polled between optimiser steps (and between evaluation batches):
//! pause saves a checkpoint and returns [`TrainOutcome::Paused`]; cancel and abort return
//! [`TrainOutcome::Cancelled`] without saving.
//!
//! Precision: on CPU everything is fp32. On CUDA with `precision` auto or bf16, the frozen base
//! weights are bf16 (`LoadOptions::base_kind`) while trainable parameters and AdamW moments stay
//! fp32 (the model casts activations); the loss is computed in fp32.

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Map, Value};
use tch::{Device, Kind, Tensor};
use tuna_core::data::Example;
use tuna_core::protocol::{DataReport, DataStats};
use tuna_core::spec::{JobSpec, Precision, Task, TrainingType};

use crate::checkpoint::{self, Resume, TrainState};
use crate::data::{self, Collated, Features, LabelMap, Target};
use crate::metrics::{self, macro_f1, EvalMetrics, StepMetrics};
use crate::model::{
    Batch, FreezeOptions, LoadOptions, LoraOptions, Model, ModelInfo, Nf4Options, ProblemType,
    TaskHead,
};
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::Schedule;
use crate::tokenizer::Tok;
use crate::{Error, Result};

/// Stop requests from another thread (the stdin reader of `tuna-trainer`).
#[derive(Debug, Default)]
pub struct Control {
    pause: AtomicBool,
    cancel: AtomicBool,
    abort: AtomicBool,
}

impl Control {
    pub fn new() -> Control {
        Control::default()
    }
    /// Save a checkpoint at the next step boundary and stop.
    pub fn pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
    }
    /// Stop at the next step boundary without saving.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }
    /// Stop as soon as possible (the parent is gone): also polled inside evaluation.
    pub fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
    }
    pub fn is_paused(&self) -> bool {
        self.pause.load(Ordering::SeqCst)
    }
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst) || self.abort.load(Ordering::SeqCst)
    }
    pub fn is_aborted(&self) -> bool {
        self.abort.load(Ordering::SeqCst)
    }
}

/// Progress reports: [`train`]'s callback receives the non-terminal events of the trainer
/// protocol (`tuna_core::protocol`); the terminal one follows from the [`TrainOutcome`].
pub use tuna_core::protocol::{Phase, TrainerEvent};

#[derive(Debug, Clone, PartialEq)]
pub enum TrainOutcome {
    Done {
        final_dir: PathBuf,
        trained_tokens: u64,
        steps: u64,
        metrics: Map<String, Value>,
    },
    Paused {
        checkpoint: PathBuf,
        step: u64,
    },
    Cancelled {
        step: u64,
    },
}

/// The device the job asks for: `cuda` errors when none is available.
pub fn resolve_device(d: tuna_core::spec::Device) -> Result<Device> {
    match d {
        tuna_core::spec::Device::Cpu => Ok(Device::Cpu),
        tuna_core::spec::Device::Auto => Ok(Device::cuda_if_available()),
        tuna_core::spec::Device::Cuda => {
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Err(Error::Config(
                    "the job asks for CUDA but no CUDA device is available".into(),
                ))
            }
        }
    }
}

/// The kind of the frozen base weights: fp32 on CPU or when asked for, else bf16.
pub fn base_kind(device: Device, precision: Precision) -> Kind {
    match (device, precision) {
        (Device::Cpu, _) | (_, Precision::Fp32) => Kind::Float,
        _ => Kind::BFloat16,
    }
}

/// The options `load_model` gets for a job.
pub fn load_options(spec: &JobSpec, device: Device, task: TaskHead) -> LoadOptions {
    LoadOptions {
        device,
        base_kind: base_kind(device, spec.precision),
        task,
        lora: match (spec.training_type, &spec.lora) {
            (TrainingType::Lora, Some(l)) => Some(LoraOptions {
                r: i64::from(l.r),
                alpha: l.alpha,
                dropout: l.dropout,
                target_modules: l.target_modules.clone(),
            }),
            _ => None,
        },
        freeze: FreezeOptions {
            embeddings: spec.freeze.embeddings,
            first_n_layers: spec.freeze.layers as usize,
            patterns: spec.freeze.patterns.clone(),
        },
        init_seed: spec.seed as i64,
        quantization: spec.nf4().map(|q| Nf4Options {
            double_quant: q.double_quantization,
        }),
    }
}

/// Turns libtorch out-of-memory errors into [`Error::OutOfMemory`].
fn classify(e: Error, device: Device, batch: usize, seq: usize) -> Error {
    // CUDA: "CUDA out of memory. Tried to allocate ..."; CPU: "DefaultCPUAllocator: not enough
    // memory: you tried to allocate ...".
    let is_oom = |s: String| s.contains("out of memory") || s.contains("not enough memory");
    let oom = match &e {
        Error::Torch(t) => is_oom(t.to_string()),
        Error::Other(a) => is_oom(a.to_string()),
        _ => false,
    };
    if oom {
        Error::OutOfMemory {
            device: format!("{device:?}"),
            batch_size: batch as i64,
            seq_len: seq as i64,
        }
    } else {
        e
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "unknown panic".to_string()
    }
}

/// Runs `f`, turning a panic of tch's unwrapping APIs into an error.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(Error::Other(anyhow::anyhow!(
            "libtorch failed: {}",
            panic_text(p)
        ))),
    }
}

/// Seed of micro-batch `k` of optimiser step `step`.
fn micro_seed(seed: u64, step: u64, k: usize) -> i64 {
    (seed
        .wrapping_mul(1_000_003)
        .wrapping_add(step.wrapping_mul(4096))
        .wrapping_add(k as u64)
        & 0x7fff_ffff_ffff) as i64
}

/// Sums of one optimiser step's forward/backward passes (0-dim tensors on the device).
pub struct Accumulated {
    pub loss_sum: Tensor,
    pub correct: Tensor,
    /// Non-padding tokens.
    pub tokens: usize,
    /// Targets of the whole step: what the loss was divided by.
    pub targets: usize,
    /// DPO: the summed reward margins of the step's pairs (0 otherwise).
    pub margin_sum: Tensor,
}

/// With `packing` on a classification job: what one more micro-batch is taken to cost, in
/// padded tokens, when grouping a step's examples by length.
pub const GROUP_OVERHEAD_TOKENS: usize = 64;

/// How one optimiser step turns examples into batches.
#[derive(Debug, Clone)]
pub struct StepConfig {
    /// Examples per micro-batch.
    pub micro: usize,
    pub pad_id: i64,
    /// Decides the loss ([`data::loss_and_correct`]) and whether packing applies.
    pub task: Task,
    /// Pass `token_type_ids` (BERT).
    pub with_types: bool,
    /// Causal LM: pack each micro-batch's examples into rows of at most this many tokens
    /// ([`data::collate_packed`]) instead of padding every example to the longest one.
    pub pack_len: Option<usize>,
    /// When not packing: split each micro-batch into groups of similar length
    /// ([`data::group_by_length`], this many tokens of overhead per group), each padded to its
    /// own longest. The loss is still divided by the step's targets, so the gradients are the
    /// same sums as without grouping.
    pub group_overhead_tokens: Option<usize>,
    /// Activation checkpointing ([`Model::forward_backward_checkpointed`]).
    pub checkpointing: bool,
    /// DPO's β: the items are preference pairs ([`data::Target::Pair`]) and the loss is DPO's
    /// ([`data::dpo_terms`]); the forward runs without dropout, as TRL's `disable_dropout`
    /// default does, so that the policy and the reference see the same network.
    pub dpo_beta: Option<f64>,
}

/// Runs forward and backward over `items` in micro-batches of `micro`, each loss divided by the
/// targets of all `items` (tokens for causal LM, examples for classification), so the
/// accumulated gradients are those of the mean loss over the whole step whatever `micro` is.
/// Gradients add to whatever the parameters hold. Seeds libtorch per micro-batch from
/// `(seed, step, k)`.
#[allow(clippy::too_many_arguments)]
pub fn accumulate_gradients(
    model: &dyn Model,
    items: &[&Features],
    micro: usize,
    pad_id: i64,
    task: Task,
    with_types: bool,
    seed: u64,
    step: u64,
) -> Result<Accumulated> {
    let cfg = StepConfig {
        micro,
        pad_id,
        task,
        with_types,
        pack_len: None,
        group_overhead_tokens: None,
        checkpointing: false,
        dpo_beta: None,
    };
    accumulate(model, items, &cfg, seed, step)
}

/// [`accumulate_gradients`] with every setting of [`StepConfig`] (packing included).
pub fn accumulate(
    model: &dyn Model,
    items: &[&Features],
    cfg: &StepConfig,
    seed: u64,
    step: u64,
) -> Result<Accumulated> {
    let device = model.device();
    let targets: usize = items.iter().map(|f| f.targets()).sum();
    let denom = targets.max(1) as f64;
    let mut loss_acc = Tensor::f_zeros([], (Kind::Float, device))?;
    let mut correct_acc = Tensor::f_zeros([], (Kind::Float, device))?;
    let mut margin_acc = Tensor::f_zeros([], (Kind::Float, device))?;
    let mut tokens = 0;
    let mut chunks: Vec<Vec<&Features>> = Vec::new();
    for chunk in items.chunks(cfg.micro.max(1)) {
        match (cfg.pack_len, cfg.group_overhead_tokens) {
            (None, Some(overhead)) => {
                let lengths: Vec<usize> = chunk.iter().map(|f| f.input_ids.len()).collect();
                for g in data::group_by_length(&lengths, overhead) {
                    chunks.push(g.iter().map(|i| chunk[*i]).collect());
                }
            }
            _ => chunks.push(chunk.to_vec()),
        }
    }
    for (k, chunk) in chunks.iter().enumerate() {
        let chunk = chunk.as_slice();
        let c = match cfg.pack_len {
            Some(len) if cfg.task == Task::CausalLm => {
                data::collate_packed(chunk, cfg.pad_id, device, len)?
            }
            _ => data::collate(chunk, cfg.pad_id, device, cfg.with_types)?,
        };
        tokens += c.tokens;
        let (b, t) = (c.batch_size, c.seq_len);
        let r: Result<()> = guarded(|| {
            tch::manual_seed(micro_seed(seed, step, k));
            let batch = Batch {
                input_ids: &c.input_ids,
                attention_mask: &c.attention_mask,
                token_type_ids: c.token_type_ids.as_ref(),
                packed: c.packed.as_ref(),
            };
            let mut backward = |logits: &Tensor| -> Result<()> {
                let (loss, correct) = match (cfg.dpo_beta, &c.reference) {
                    (Some(beta), Some(reference)) => {
                        let logps = data::completion_logps(logits, &c.labels)?;
                        let t = data::dpo_terms(&logps, reference, beta)?;
                        let _ = margin_acc.f_add_(&t.margin_sum)?;
                        (t.loss_sum, t.correct)
                    }
                    _ => data::loss_and_correct(logits, &c.labels, cfg.task)?,
                };
                loss.f_div_scalar(denom)?.f_backward()?;
                let _ = loss_acc.f_add_(&loss.f_detach()?)?;
                let _ = correct_acc.f_add_(&correct.f_to_kind(Kind::Float)?)?;
                Ok(())
            };
            let train = cfg.dpo_beta.is_none();
            if cfg.checkpointing {
                model.forward_backward_checkpointed(&batch, train, &mut backward)
            } else {
                backward(&model.forward(&batch, train)?)
            }
        });
        r.map_err(|e| classify(e, device, b, t))?;
    }
    Ok(Accumulated {
        loss_sum: loss_acc,
        correct: correct_acc,
        tokens,
        targets,
        margin_sum: margin_acc,
    })
}

/// What one optimiser step did (read from the device in one host sync).
#[derive(Debug, Clone, Copy)]
pub struct StepResult {
    pub loss_sum: f64,
    pub targets: usize,
    pub correct: f64,
    pub grad_norm: f64,
    /// Non-padding tokens.
    pub tokens: usize,
    pub examples: usize,
    /// DPO: the summed reward margins (0 otherwise).
    pub margin_sum: f64,
}

/// One optimiser step as the trainer runs it: forward and backward over `items`
/// ([`accumulate`]), one host read of the loss, gradient norm and correct predictions (a
/// non-finite loss or norm stops before the update), clipping to `max_norm`, AdamW at `lr`.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: &dyn Model,
    opt: &mut AdamW,
    items: &[&Features],
    cfg: &StepConfig,
    seed: u64,
    step: u64,
    lr: f64,
    max_norm: f64,
) -> Result<StepResult> {
    let device = model.device();
    let targets: usize = items.iter().map(|f| f.targets()).sum();
    let denom = targets.max(1) as f64;
    opt.zero_grad();
    let acc = accumulate(model, items, cfg, seed, step)?;
    let (loss_acc, correct_acc, tokens) = (acc.loss_sum, acc.correct, acc.tokens);
    let (loss_sum, grad_norm, correct, margin_sum) = guarded(|| {
        let norm = opt.grad_norm()?;
        let host = Tensor::f_stack(
            &[
                loss_acc.shallow_clone(),
                norm.shallow_clone(),
                correct_acc.shallow_clone(),
                acc.margin_sum.shallow_clone(),
            ],
            0,
        )?
        .f_to_device(Device::Cpu)?;
        let v: Vec<f64> = Vec::<f64>::try_from(host.f_to_kind(Kind::Double)?)?;
        Ok((v[0], v[1], v[2], v[3]))
    })?;
    if !loss_sum.is_finite() {
        return Err(Error::NonFiniteLoss {
            step: step as i64 + 1,
            value: loss_sum / denom,
        });
    }
    if !grad_norm.is_finite() {
        return Err(Error::NonFiniteLoss {
            step: step as i64 + 1,
            value: grad_norm,
        });
    }
    guarded(|| {
        let norm = Tensor::f_from_slice(&[grad_norm as f32])?
            .f_to_device(device)?
            .f_reshape([])?;
        opt.clip_grad_norm(&norm, max_norm)?;
        opt.step(lr)?;
        opt.zero_grad();
        Ok(())
    })
    .map_err(|e| classify(e, device, cfg.micro, 0))?;
    Ok(StepResult {
        loss_sum,
        targets,
        correct,
        grad_norm,
        tokens,
        examples: items.len(),
        margin_sum,
    })
}

struct Job<'a> {
    model: &'a dyn Model,
    task: Task,
    /// Question answering on data where some questions have no answer (SQuAD v2): the empty
    /// answer is a prediction too.
    with_negative: bool,
    with_types: bool,
    pad_id: i64,
    device: Device,
    micro: usize,
    step_cfg: StepConfig,
}

impl<'a> Job<'a> {
    /// The job's batching: padding with the tokenizer's pad token (else the model's pad or
    /// first end token), packing or length grouping when the job asks for `packing`.
    fn new(
        model: &'a dyn Model,
        tok: &Tok,
        inputs: &TrainInputs,
        micro: usize,
        max_len: usize,
    ) -> Job<'a> {
        let (spec, info) = (inputs.spec, model.info());
        let causal = spec.task == Task::CausalLm;
        let pad_id = tok.pad_id(info);
        let unanswerable = |ex: &[(u64, Example)]| {
            ex.iter()
                .any(|(_, e)| matches!(e, Example::Answered { answers, .. } if answers.is_empty()))
        };
        Job {
            model,
            task: spec.task,
            with_negative: unanswerable(inputs.train_examples)
                || inputs.valid_examples.is_some_and(unanswerable),
            with_types: model.uses_token_type_ids(),
            pad_id,
            device: inputs.device,
            micro,
            step_cfg: StepConfig {
                micro,
                pad_id,
                task: spec.task,
                with_types: model.uses_token_type_ids(),
                pack_len: (causal && spec.packing).then_some(max_len),
                group_overhead_tokens: (!causal && spec.packing).then_some(GROUP_OVERHEAD_TOKENS),
                // QLoRA needs it (the create request turns it on with nf4).
                checkpointing: spec.gradient_checkpointing == Some(true) || spec.nf4().is_some(),
                dpo_beta: spec.dpo.map(|d| d.beta),
            },
        }
    }

    fn batch<'b>(&self, c: &'b Collated) -> Batch<'b> {
        Batch {
            input_ids: &c.input_ids,
            attention_mask: &c.attention_mask,
            token_type_ids: c.token_type_ids.as_ref(),
            packed: c.packed.as_ref(),
        }
    }

    /// Forward, backward and update for one optimiser step.
    fn train_step(
        &self,
        opt: &mut AdamW,
        items: &[&Features],
        seed: u64,
        step: u64,
        lr: f64,
        max_norm: f64,
    ) -> Result<StepResult> {
        train_step(
            self.model,
            opt,
            items,
            &self.step_cfg,
            seed,
            step,
            lr,
            max_norm,
        )
    }

    /// DPO: each pair's summed completion log-probabilities under the model as it is now (the
    /// reference: the starting weights, LoRA's adapters still zero), written into its
    /// [`data::Pair::reference`]. Run once before the first step, so no second model is held
    /// (TRL's `precompute_ref_log_probs`); a resumed job computes them again from the base
    /// before the checkpoint's weights are loaded.
    fn reference_logps(&self, feats: &mut [Features], control: &Control) -> Result<bool> {
        let _g = tch::no_grad_guard();
        for chunk in feats.chunks_mut(self.micro.max(1)) {
            if control.is_aborted() {
                return Ok(false);
            }
            let refs: Vec<&Features> = chunk.iter().collect();
            let c = data::collate_pairs(&refs, self.pad_id, self.device)?;
            let (b, t) = (c.batch_size, c.seq_len);
            let logps = guarded(|| {
                let logits = self.model.forward(&self.batch(&c), false)?;
                let host = data::completion_logps(&logits, &c.labels)?.f_to_device(Device::Cpu)?;
                Ok(Vec::<f32>::try_from(host)?)
            })
            .map_err(|e| classify(e, self.device, b, t))?;
            let n = chunk.len();
            for (i, f) in chunk.iter_mut().enumerate() {
                if let Target::Pair(p) = &mut f.target {
                    p.reference = [logps[i], logps[n + i]];
                }
            }
        }
        Ok(true)
    }

    /// DPO's evaluation: the mean loss over the validation pairs and TRL's reward statistics
    /// (the means over the pairs of `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`
    /// and `rewards/margins`, as TRL reports them for an evaluation in one batch).
    fn evaluate_dpo(
        &self,
        feats: &[Features],
        beta: f64,
        control: &Control,
    ) -> Result<Option<EvalMetrics>> {
        let _g = tch::no_grad_guard();
        let mut sums = [0.0f64; 5];
        let refs: Vec<&Features> = feats.iter().collect();
        for chunk in refs.chunks(self.micro.max(1)) {
            if control.is_aborted() {
                return Ok(None);
            }
            let c = data::collate_pairs(chunk, self.pad_id, self.device)?;
            let (b, t) = (c.batch_size, c.seq_len);
            let v = guarded(|| {
                let logits = self.model.forward(&self.batch(&c), false)?;
                let logps = data::completion_logps(&logits, &c.labels)?;
                let reference = c
                    .reference
                    .as_ref()
                    .ok_or_else(|| Error::Data("a pair batch without reference".into()))?;
                let d = data::dpo_terms(&logps, reference, beta)?;
                let host = Tensor::f_stack(
                    &[
                        d.loss_sum,
                        d.chosen_rewards.f_sum(Kind::Float)?,
                        d.rejected_rewards.f_sum(Kind::Float)?,
                        d.correct,
                        d.margin_sum,
                    ],
                    0,
                )?
                .f_to_kind(Kind::Double)?
                .f_to_device(Device::Cpu)?;
                Ok(Vec::<f64>::try_from(host)?)
            })
            .map_err(|e| classify(e, self.device, b, t))?;
            for (s, x) in sums.iter_mut().zip(v) {
                *s += x;
            }
        }
        let n = feats.len().max(1) as f64;
        Ok(Some(EvalMetrics {
            valid_loss: sums[0] / n,
            valid_rewards_chosen: Some(sums[1] / n),
            valid_rewards_rejected: Some(sums[2] / n),
            valid_rewards_accuracies: Some(sums[3] / n),
            valid_rewards_margins: Some(sums[4] / n),
            valid_examples: feats.len(),
            ..Default::default()
        }))
    }

    fn evaluate(
        &self,
        feats: &[Features],
        id2label: &[String],
        control: &Control,
    ) -> Result<Option<EvalMetrics>> {
        if let Some(beta) = self.step_cfg.dpo_beta {
            return self.evaluate_dpo(feats, beta, control);
        }
        let num_labels = id2label.len();
        let _g = tch::no_grad_guard();
        let mut loss = 0.0;
        let mut targets = 0usize;
        let mut correct = 0.0;
        // Sequence-level tasks: each example's logits and its target, for the task's metrics.
        let mut outputs: Vec<(Vec<f32>, &Target)> = Vec::new();
        let refs: Vec<&Features> = feats.iter().collect();
        for chunk in refs.chunks(self.micro.max(1)) {
            if control.is_aborted() {
                return Ok(None);
            }
            let c = data::collate(chunk, self.pad_id, self.device, self.with_types)?;
            let (b, t) = (c.batch_size, c.seq_len);
            let (l, k, rows) = guarded(|| {
                let logits = self.model.forward(&self.batch(&c), false)?;
                let (l, k) = data::loss_and_correct(&logits, &c.labels, self.task)?;
                let rows = if self.task == Task::CausalLm {
                    Vec::new()
                } else if self.task == Task::QuestionAnswering {
                    // Each window's start logits, then its end logits.
                    let host = logits
                        .f_to_kind(Kind::Float)?
                        .f_transpose(1, 2)?
                        .f_reshape([b as i64, -1])?
                        .f_to_device(Device::Cpu)?;
                    Vec::<Vec<f32>>::try_from(host)?
                } else if self.task == Task::TokenClassification {
                    // Each row's predicted tag per position (the labels say which count).
                    let pred = logits.f_argmax(-1, false)?.f_to_device(Device::Cpu)?;
                    let pred = Vec::<Vec<i64>>::try_from(pred)?;
                    pred.into_iter()
                        .map(|r| r.into_iter().map(|v| v as f32).collect())
                        .collect()
                } else {
                    let host = logits.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?;
                    Vec::<Vec<f32>>::try_from(host)?
                };
                Ok((l.f_double_value(&[])?, k.f_double_value(&[])?, rows))
            })
            .map_err(|e| classify(e, self.device, b, t))?;
            loss += l;
            correct += k;
            targets += c.targets;
            outputs.extend(rows.into_iter().zip(chunk.iter().map(|f| &f.target)));
        }
        let n = targets.max(1) as f64;
        let mut m = EvalMetrics {
            valid_loss: loss / n,
            valid_examples: feats.len(),
            ..Default::default()
        };
        match self.task {
            Task::CausalLm => m.valid_mean_token_accuracy = Some(correct / n),
            Task::QuestionAnswering => {
                let (em, f1) = self.qa_scores(&outputs);
                m.valid_exact_match = Some(em);
                m.valid_f1 = Some(f1);
            }
            Task::TokenClassification => {
                let name = |i: i64| id2label.get(i as usize).map_or("O", String::as_str);
                let (mut truth, mut pred) = (Vec::new(), Vec::new());
                for ((row, _), f) in outputs.iter().zip(feats) {
                    let (mut t, mut p) = (Vec::new(), Vec::new());
                    for (j, label) in f.labels.iter().enumerate() {
                        if *label != -100 {
                            t.push(name(*label));
                            p.push(name(row[j] as i64));
                        }
                    }
                    truth.push(t);
                    pred.push(p);
                }
                let e = metrics::entity_scores(&truth, &pred);
                m.valid_accuracy = Some(correct / n);
                m.valid_precision = Some(e.precision);
                m.valid_recall = Some(e.recall);
                m.valid_f1 = Some(e.f1);
            }
            Task::SequenceClassification => {
                let pairs: Vec<(i64, i64)> = outputs
                    .iter()
                    .map(|(row, t)| {
                        let truth = match t {
                            Target::Class(c) => *c,
                            _ => -1,
                        };
                        (metrics::argmax(row) as i64, truth)
                    })
                    .collect();
                m.valid_accuracy = Some(correct / n);
                m.valid_macro_f1 = Some(macro_f1(&pairs, num_labels));
            }
            Task::SequenceRegression => {
                let (pred, truth): (Vec<f64>, Vec<f64>) = outputs
                    .iter()
                    .filter_map(|(row, t)| match t {
                        Target::Values(v) => Some((f64::from(row[0]), f64::from(v[0]))),
                        _ => None,
                    })
                    .unzip();
                let r = metrics::regression(&pred, &truth);
                m.valid_rmse = Some(r.rmse);
                m.valid_pearson = r.pearson;
                m.valid_spearman = r.spearman;
            }
            Task::MultiLabelClassification => {
                let (pred, truth): (Vec<Vec<bool>>, Vec<Vec<bool>>) = outputs
                    .iter()
                    .filter_map(|(row, t)| match t {
                        Target::Values(v) => Some((
                            // sigmoid(x) > 0.5 exactly when x > 0
                            row.iter().map(|x| *x > 0.0).collect(),
                            v.iter().map(|y| *y > 0.5).collect(),
                        )),
                        _ => None,
                    })
                    .unzip();
                let f = metrics::multi_label_f1(&pred, &truth, num_labels);
                m.valid_micro_f1 = Some(f.micro);
                m.valid_macro_f1 = Some(f.macro_);
                m.valid_subset_accuracy = Some(f.subset_accuracy);
            }
        }
        Ok(Some(m))
    }
}

impl Job<'_> {
    /// SQuAD's exact match and F1 over the records of `outputs` (each window's start and end
    /// logits, padded to its batch, and its target), each record answered from all its windows.
    fn qa_scores(&self, outputs: &[(Vec<f32>, &Target)]) -> (f64, f64) {
        let answers = qa_predictions(outputs, self.with_negative);
        let n = answers.len().max(1) as f64;
        let (em, f1) = answers.iter().fold((0.0, 0.0), |(e, f), (pred, span)| {
            let (a, b) = metrics::squad_scores(pred, &span.answers);
            (e + a, f + b)
        });
        (em / n, f1 / n)
    }
}

/// Question answering: each record's predicted answer ([`metrics::qa_answer`] over its windows)
/// and its first window's target, in the order the records come. `outputs` pairs each window's
/// logits (the start logits then the end logits, each padded to the batch's length) with its
/// target.
pub fn qa_predictions<'t>(
    outputs: &[(Vec<f32>, &'t Target)],
    with_negative: bool,
) -> Vec<(String, &'t data::Span)> {
    let mut out: Vec<(String, &data::Span)> = Vec::new();
    let mut i = 0;
    while i < outputs.len() {
        let Target::Span(first) = outputs[i].1 else {
            i += 1;
            continue;
        };
        let mut windows = Vec::new();
        while let Some((row, Target::Span(s))) = outputs.get(i) {
            if s.example != first.example {
                break;
            }
            let (t, n) = (row.len() / 2, s.offsets.len());
            windows.push(metrics::QaLogits {
                start: &row[..n],
                end: &row[t..t + n],
                offsets: &s.offsets,
            });
            i += 1;
        }
        out.push((
            metrics::qa_answer(&windows, &first.context, with_negative),
            first.as_ref(),
        ));
    }
    out
}

fn merge_metrics(into: &mut Map<String, Value>, v: impl Serialize) {
    if let Ok(Value::Object(m)) = serde_json::to_value(v) {
        into.extend(m);
    }
}

/// What [`train`] runs: one job's inputs.
#[derive(Debug, Clone, Copy)]
pub struct TrainInputs<'a> {
    /// The base model folder (Hugging Face layout).
    pub model_dir: &'a Path,
    pub spec: &'a JobSpec,
    /// `(line, example)` pairs as `tuna_core::data::read_all` returns them.
    pub train_examples: &'a [(u64, Example)],
    /// The validation file's examples; None: `spec.validation_split` of the training data.
    pub valid_examples: Option<&'a [(u64, Example)]>,
    /// Where `checkpoints/step-<n>/` and `final/` are written.
    pub output_dir: &'a Path,
    /// A checkpoint folder to resume from.
    pub resume_from: Option<&'a Path>,
    pub device: Device,
}

/// Runs one job: checks the labels, loads the model, tokenises the data, runs the optimiser
/// steps (with their evaluations and checkpoints) and saves the final model. `callback` receives the progress events in order;
/// `control` is polled between steps. See the module documentation for the semantics.
pub fn train(
    inputs: &TrainInputs,
    callback: &mut dyn FnMut(TrainerEvent),
    control: &Control,
) -> Result<TrainOutcome> {
    let started = Instant::now();
    let spec = inputs.spec;
    if inputs.train_examples.is_empty() {
        return Err(Error::Data("the training data holds no examples".into()));
    }
    check_method_data(inputs)?;
    let resume = inputs.resume_from.map(checkpoint::load).transpose()?;
    let label_map = label_map(inputs.train_examples, spec.task, resume.as_ref())?;

    callback(TrainerEvent::Phase {
        phase: Phase::LoadingModel,
        message: format!("loading {}", inputs.model_dir.display()),
    });
    let (model, tok) = load_model_and_tokenizer(inputs, label_map.as_ref())?;
    let notes = model.load_notes();

    callback(TrainerEvent::Phase {
        phase: Phase::Tokenizing,
        message: "tokenizing the data".into(),
    });
    let mut data = tokenize(inputs, &tok, model.info(), label_map.as_ref())?;
    let plan = Plan::new(spec, data.train.len());
    report_data(&data, &plan, label_map.as_ref(), notes, callback);

    let job = Job::new(model.as_ref(), &tok, inputs, plan.micro, data.max_len);
    if spec.dpo.is_some() {
        callback(TrainerEvent::Phase {
            phase: Phase::Tokenizing,
            message: format!(
                "scoring {} pair(s) with the reference model (the starting weights)",
                data.train.len() + data.valid.len()
            ),
        });
        for feats in [&mut data.train, &mut data.valid] {
            if !job.reference_logps(feats, control)? {
                return Ok(TrainOutcome::Cancelled { step: 0 });
            }
        }
    }
    let samples = match data.samples.is_empty() {
        true => None,
        false => Some(Samples::new(
            &tok,
            model.info(),
            &data.samples,
            data.max_len,
        )?),
    };
    let mut run = Run::new(
        *inputs,
        job,
        data,
        plan,
        label_map.as_ref(),
        resume.as_ref(),
        samples,
    )?;
    match run.steps(callback, control)? {
        ControlFlow::Break(outcome) => Ok(outcome),
        ControlFlow::Continue(()) => run.finish(started, callback),
    }
}

/// A DPO job trains on preference pairs only, and only a DPO job trains on them.
fn check_method_data(inputs: &TrainInputs) -> Result<()> {
    let dpo = inputs.spec.dpo.is_some();
    let files = [
        ("training file", Some(inputs.train_examples)),
        ("validation file", inputs.valid_examples),
    ];
    for (name, examples) in files {
        let Some(examples) = examples else { continue };
        if let Some((line, ex)) = examples
            .iter()
            .find(|(_, e)| matches!(e, Example::Preference { .. }) != dpo)
        {
            return Err(Error::Data(if dpo {
                format!(
                    "{name} line {line}: method 'dpo' trains on preference pairs (`input`, `preferred_output`, `non_preferred_output`), not `{}` records",
                    ex.shape().as_str()
                )
            } else {
                format!(
                    "{name} line {line}: a preference pair trains a job of method 'dpo' (`\"method\": {{\"type\": \"dpo\"}}`)"
                )
            }));
        }
    }
    Ok(())
}

/// AdamW over the model's trainable parameters, its moments in fp32 or (`bf16_moments`) bf16.
pub(crate) fn optimiser(model: &dyn Model, weight_decay: f64, bf16_moments: bool) -> Result<AdamW> {
    AdamW::new(
        model.trainable_parameters(),
        AdamWConfig {
            weight_decay,
            bf16_moments,
            ..Default::default()
        },
    )
}

/// Classification (single- or multi-label): the labels of the whole training file (before any
/// validation split), which must be the checkpoint's when resuming; token classification: the
/// tags. None for causal LM and regression.
fn label_map(
    train_examples: &[(u64, Example)],
    task: Task,
    resume: Option<&Resume>,
) -> Result<Option<LabelMap>> {
    if !task.has_label_set() {
        return Ok(None);
    }
    let m = LabelMap::from_examples(train_examples);
    if m.len() < 2 {
        return Err(Error::Data(format!(
            "{} needs at least two distinct labels in the training data, found {}",
            task.as_str(),
            m.len()
        )));
    }
    if let Some(r) = resume {
        if r.state.id2label.as_ref() != Some(&m.id2label()) {
            return Err(Error::Config(
                "the checkpoint was trained with other labels than this training data".into(),
            ));
        }
    }
    Ok(Some(m))
}

/// The head a job trains: the LM head, or a sequence-level head over `labels` (one output
/// for regression, named `LABEL_0` as transformers names it).
pub fn task_head(task: Task, labels: Option<&LabelMap>) -> TaskHead {
    let id2label = || labels.map(LabelMap::id2label).unwrap_or_default();
    match task {
        Task::CausalLm => TaskHead::CausalLm,
        Task::SequenceClassification => TaskHead::SequenceClassification {
            id2label: id2label(),
            problem_type: ProblemType::SingleLabel,
        },
        Task::MultiLabelClassification => TaskHead::SequenceClassification {
            id2label: id2label(),
            problem_type: ProblemType::MultiLabel,
        },
        Task::SequenceRegression => TaskHead::SequenceClassification {
            id2label: vec!["LABEL_0".into()],
            problem_type: ProblemType::Regression,
        },
        Task::TokenClassification => TaskHead::TokenClassification {
            id2label: id2label(),
        },
        Task::QuestionAnswering => TaskHead::QuestionAnswering,
    }
}

/// The job's model (with its task's head) and its tokenizer.
fn load_model_and_tokenizer(
    inputs: &TrainInputs,
    labels: Option<&LabelMap>,
) -> Result<(Box<dyn Model>, Tok)> {
    let task = task_head(inputs.spec.task, labels);
    let opts = load_options(inputs.spec, inputs.device, task);
    let model = guarded(|| crate::models::load_model(inputs.model_dir, &opts))?;
    let tok = Tok::load(inputs.model_dir, model.info().is_decoder)?;
    Ok((model, tok))
}

/// A job's tokenised examples.
struct JobData {
    train: Vec<Features>,
    train_stats: DataStats,
    valid: Vec<Features>,
    valid_stats: Option<DataStats>,
    /// Examples are cut to this many tokens.
    max_len: usize,
    /// Causal LM: the validation prompts whose completions the evaluations show.
    samples: Vec<SamplePrompt>,
}

/// A validation prompt for the samples of an evaluation (`eval_samples`).
struct SamplePrompt {
    prompt: crate::generate::Prompt,
    /// The prompt as the event shows it (the last user turn of a conversation).
    shown: String,
    reference: String,
}

/// The first `n` validation records as prompts and the answers the data gives: a prompt and
/// its completion; a conversation up to its last assistant turn and that turn; a text's first
/// half of words and the rest; a preference pair's prompt and its preferred answer.
fn sample_prompts(examples: &[(u64, Example)], n: usize) -> Vec<SamplePrompt> {
    use crate::generate::Prompt;
    use tuna_core::data::{Message, Turns};
    let chat = |m: &[Message], reference: String| {
        let shown = m
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map_or_else(String::new, |m| m.content.clone());
        let turns = m
            .iter()
            .map(|m| (m.role.clone(), m.content.clone()))
            .collect();
        SamplePrompt {
            prompt: Prompt::Chat(turns),
            shown,
            reference,
        }
    };
    let text = |p: &str, reference: String| SamplePrompt {
        prompt: Prompt::Text(p.to_string()),
        shown: p.to_string(),
        reference,
    };
    examples
        .iter()
        .filter_map(|(_, ex)| match ex {
            Example::PromptCompletion { prompt, completion } if !prompt.is_empty() => {
                Some(text(prompt, completion.clone()))
            }
            Example::Chat { messages } => {
                let last = messages.iter().rposition(|m| m.role == "assistant")?;
                (last > 0).then(|| chat(&messages[..last], messages[last].content.clone()))
            }
            Example::Text { text: t } => {
                let words: Vec<&str> = t.split_whitespace().collect();
                (words.len() >= 2).then(|| {
                    let half = words.len() / 2;
                    text(&words[..half].join(" "), words[half..].join(" "))
                })
            }
            Example::Preference { prompt, chosen, .. } => match (prompt, chosen) {
                (Turns::Chat(p), Turns::Chat(c)) => Some(chat(
                    p,
                    c.iter()
                        .map(|m| m.content.as_str())
                        .collect::<Vec<_>>()
                        .join("\n"),
                )),
                (Turns::Text(p), Turns::Text(c)) if !p.is_empty() => Some(text(p, c.clone())),
                _ => None,
            },
            _ => None,
        })
        .take(n)
        .collect()
}

/// What an evaluation's samples need: the prompts' tokens, the tokenizer to read the
/// completions, and when to stop.
struct Samples {
    prompts: Vec<(Vec<i64>, String, String)>,
    decoder: tokenizers::Tokenizer,
    pad_id: i64,
    sampling: crate::generate::Sampling,
}

/// New tokens a sample gets at most (fewer when the job's `max_seq_length` leaves less).
const SAMPLE_TOKENS: usize = 32;

impl Samples {
    fn new(
        tok: &Tok,
        info: &ModelInfo,
        prompts: &[SamplePrompt],
        max_len: usize,
    ) -> Result<Samples> {
        let stop = tok.stop_ids(info);
        // A prompt and its completion fit the job's (and the model's) length: prompts that
        // leave fewer than 4 new tokens are left out, and the longest kept sets the budget.
        let mut out = Vec::new();
        for p in prompts {
            let ids = crate::generate::prompt_ids(tok, &p.prompt)?;
            if !ids.is_empty() && ids.len() + 4 <= max_len {
                out.push((ids, p.shown.clone(), p.reference.clone()));
            }
        }
        let longest = out.iter().map(|p| p.0.len()).max().unwrap_or(0);
        Ok(Samples {
            prompts: out,
            decoder: tok.inner().clone(),
            pad_id: tok.pad_id(info),
            sampling: crate::generate::Sampling {
                max_tokens: SAMPLE_TOKENS.min(max_len.saturating_sub(longest)),
                stop_token_ids: stop,
                ..Default::default()
            },
        })
    }

    /// Greedy completions of the prompts with the model as it is now.
    fn generate(&self, model: &dyn Model) -> Result<Vec<tuna_core::protocol::Sample>> {
        let ids: Vec<Vec<i64>> = self.prompts.iter().map(|p| p.0.clone()).collect();
        let out =
            crate::generate::generate(model, &ids, self.pad_id, &self.sampling, &mut |_, _| true)?;
        Ok(out
            .into_iter()
            .zip(&self.prompts)
            .map(|(g, (_, shown, reference))| {
                let toks: Vec<u32> = g.tokens.iter().map(|t| *t as u32).collect();
                tuna_core::protocol::Sample {
                    prompt: shown.clone(),
                    completion: self.decoder.decode(&toks, true).unwrap_or_default(),
                    reference: reference.clone(),
                }
            })
            .collect())
    }
}

/// Splits the validation part off the training data (unless there is a validation file) and
/// tokenises both parts, cut to the job's (and the model's) maximum length.
fn tokenize(
    inputs: &TrainInputs,
    tok: &Tok,
    info: &ModelInfo,
    labels: Option<&LabelMap>,
) -> Result<JobData> {
    let spec = inputs.spec;
    let max_len = if info.max_positions > 0 {
        (spec.max_seq_length as usize).min(info.max_positions as usize)
    } else {
        spec.max_seq_length as usize
    };
    type Lines = Vec<(u64, Example)>;
    let (train_part, valid_part): (Lines, Lines) = match inputs.valid_examples {
        Some(v) => (inputs.train_examples.to_vec(), v.to_vec()),
        None => data::split_validation(inputs.train_examples, spec.validation_split, spec.seed),
    };
    let stride = spec
        .doc_stride
        .map_or((max_len / 3).min(128), |s| s as usize);
    let (train, train_stats) = data::featurize_with(
        tok,
        spec.task,
        &train_part,
        max_len,
        stride,
        labels,
        "training file",
    )?;
    if train.is_empty() {
        return Err(Error::Data(format!(
            "no training example is left after truncation to {max_len} tokens ({} dropped)",
            train_stats.dropped
        )));
    }
    let valid_source = if inputs.valid_examples.is_some() {
        "validation file"
    } else {
        "training file (validation split)"
    };
    let (valid, valid_stats) = if valid_part.is_empty() {
        (Vec::new(), None)
    } else {
        let (f, s) = data::featurize_with(
            tok,
            spec.task,
            &valid_part,
            max_len,
            stride,
            labels,
            valid_source,
        )?;
        (f, Some(s))
    };
    let samples = match spec.task {
        Task::CausalLm => sample_prompts(&valid_part, spec.eval_samples.unwrap_or(0) as usize),
        _ => Vec::new(),
    };
    Ok(JobData {
        train,
        train_stats,
        valid,
        valid_stats,
        max_len,
        samples,
    })
}

/// How a job's examples make steps and epochs.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Training examples (after tokenisation).
    n: usize,
    /// Examples per optimiser step.
    batch_size: usize,
    /// Micro-batches per step.
    accum: usize,
    /// Examples per micro-batch.
    micro: usize,
    steps_per_epoch: u64,
    total_steps: u64,
}

impl Plan {
    fn new(spec: &JobSpec, n: usize) -> Plan {
        let batch_size = (spec.batch_size.max(1) as usize).min(n);
        let accum = spec.gradient_accumulation_steps.max(1) as usize;
        let micro = batch_size.div_ceil(accum).max(1);
        let steps_per_epoch = n.div_ceil(batch_size) as u64;
        let mut total_steps = steps_per_epoch * u64::from(spec.n_epochs.max(1));
        if spec.max_steps > 0 {
            total_steps = total_steps.min(u64::from(spec.max_steps));
        }
        Plan {
            n,
            batch_size,
            accum,
            micro,
            steps_per_epoch,
            total_steps,
        }
    }
}

/// The `data` event, and a warning when training examples were cut or dropped.
fn report_data(
    data: &JobData,
    plan: &Plan,
    labels: Option<&LabelMap>,
    notes: Vec<String>,
    callback: &mut dyn FnMut(TrainerEvent),
) {
    callback(TrainerEvent::Data(DataReport {
        train: data.train_stats.clone(),
        valid: data.valid_stats.clone(),
        labels: labels.map(LabelMap::id2label),
        total_steps: plan.total_steps,
        notes,
    }));
    let (stats, max_len) = (&data.train_stats, data.max_len);
    if stats.truncated > 0 || stats.dropped > 0 {
        callback(TrainerEvent::Warning {
            message: format!(
                "{} training example(s) were cut to {max_len} tokens; {} had nothing left to learn from and were dropped",
                stats.truncated, stats.dropped
            ),
        });
    }
}

/// The run state at the first step: a fresh one, or the checkpoint's when resuming (its
/// trainable weights and optimiser moments are loaded into `model` and `opt`).
fn initial_state(
    plan: &Plan,
    spec: &JobSpec,
    labels: Option<&LabelMap>,
    resume: Option<&Resume>,
    model: &dyn Model,
    opt: &mut AdamW,
) -> Result<TrainState> {
    let (n, batch_size, steps_per_epoch) = (plan.n, plan.batch_size, plan.steps_per_epoch);
    let fresh = TrainState {
        format: 1,
        step: 0,
        total_steps: plan.total_steps,
        steps_per_epoch,
        seed: spec.seed,
        train_examples: n,
        batch_size,
        micro_batch_size: plan.micro,
        id2label: labels.map(LabelMap::id2label),
        ..Default::default()
    };
    let Some(r) = resume else {
        return Ok(fresh);
    };
    if (
        r.state.train_examples,
        r.state.batch_size,
        r.state.steps_per_epoch,
    ) != (n, batch_size, steps_per_epoch)
    {
        return Err(Error::Config(format!(
            "the checkpoint was made with {} training examples in batches of {}; this run has {n} in batches of {batch_size}: resume with the same data and settings",
            r.state.train_examples, r.state.batch_size
        )));
    }
    model.load_trainable(&r.trainable)?;
    opt.load(&r.optimizer)?;
    Ok(TrainState {
        total_steps: plan.total_steps,
        ..r.state.clone()
    })
}

/// Sums since the last `metrics` event.
struct Window {
    loss: f64,
    targets: usize,
    correct: f64,
    margin: f64,
    tokens: usize,
    examples: usize,
    since: Instant,
}

impl Window {
    fn new() -> Window {
        Window {
            loss: 0.0,
            targets: 0,
            correct: 0.0,
            margin: 0.0,
            tokens: 0,
            examples: 0,
            since: Instant::now(),
        }
    }

    fn add(&mut self, r: &StepResult) {
        self.loss += r.loss_sum;
        self.targets += r.targets;
        self.correct += r.correct;
        self.margin += r.margin_sum;
        self.tokens += r.tokens;
        self.examples += r.examples;
    }
}

/// What one step of [`Run::step`] did.
struct Stepped {
    result: StepResult,
    lr: f64,
    end_of_epoch: bool,
}

/// The optimiser steps of one job and what lives across them.
struct Run<'a> {
    inputs: TrainInputs<'a>,
    job: Job<'a>,
    data: JobData,
    plan: Plan,
    opt: AdamW,
    schedule: Schedule,
    state: TrainState,
    /// Classification: the label names by id.
    id2label: Vec<String>,
    /// This process started at `start_step` with `elapsed_before` seconds of earlier runs.
    run_start: Instant,
    start_step: u64,
    elapsed_before: f64,
    /// The data order of epoch `order_epoch`.
    order_epoch: u64,
    order: Vec<usize>,
    window: Window,
    /// The step of the latest checkpoint this process saved.
    last_saved: Option<u64>,
    stop_early: bool,
    /// Causal LM: what each evaluation generates for its samples event.
    samples: Option<Samples>,
}

impl<'a> Run<'a> {
    /// Sets up the optimiser, the schedule and the run state (restored from `resume`).
    fn new(
        inputs: TrainInputs<'a>,
        job: Job<'a>,
        data: JobData,
        plan: Plan,
        labels: Option<&LabelMap>,
        resume: Option<&Resume>,
        samples: Option<Samples>,
    ) -> Result<Run<'a>> {
        let spec = inputs.spec;
        let bf16_moments = spec.optimizer_moments == tuna_core::spec::Moments::Bf16;
        let mut opt = optimiser(job.model, spec.weight_decay, bf16_moments)?;
        let schedule = Schedule::new(
            spec.lr_scheduler,
            spec.learning_rate,
            plan.total_steps,
            u64::from(spec.warmup_steps),
            spec.warmup_ratio,
        );
        let state = initial_state(&plan, spec, labels, resume, job.model, &mut opt)?;
        let (start_step, elapsed_before) = (state.step, state.elapsed_seconds);
        Ok(Run {
            inputs,
            job,
            data,
            plan,
            opt,
            schedule,
            state,
            id2label: labels.map(LabelMap::id2label).unwrap_or_default(),
            run_start: Instant::now(),
            start_step,
            elapsed_before,
            order_epoch: u64::MAX,
            order: Vec::new(),
            window: Window::new(),
            last_saved: None,
            stop_early: false,
            samples,
        })
    }

    /// Runs the steps from `state.step` to the end, early stopping or a stop request (`Break`,
    /// with the outcome: paused or cancelled).
    fn steps(
        &mut self,
        callback: &mut dyn FnMut(TrainerEvent),
        control: &Control,
    ) -> Result<ControlFlow<TrainOutcome>> {
        let p = self.plan;
        callback(TrainerEvent::Phase {
            phase: Phase::Training,
            message: format!(
                "{} examples, {} steps of {} examples ({} micro-batch(es) of up to {}), from step {}",
                p.n, p.total_steps, p.batch_size, p.accum, p.micro, self.start_step
            ),
        });
        while self.state.step < p.total_steps && !self.stop_early {
            if let ControlFlow::Break(outcome) = self.poll(callback, control)? {
                return Ok(ControlFlow::Break(outcome));
            }
            let s = self.step()?;
            let last = self.state.step == p.total_steps;
            let log_interval = u64::from(self.inputs.spec.log_interval.max(1));
            if self.state.step.is_multiple_of(log_interval) || last {
                self.log_metrics(&s, callback);
            }
            if self.eval_due(last, s.end_of_epoch) {
                if let ControlFlow::Break(outcome) = self.evaluate(callback, control)? {
                    return Ok(ControlFlow::Break(outcome));
                }
            }
            if self.checkpoint_due(last, s.end_of_epoch) {
                self.state.elapsed_seconds = self.elapsed();
                self.save_checkpoint(callback)?;
                self.last_saved = Some(self.state.step);
                self.window.since = Instant::now();
            }
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Seconds of training so far, earlier runs of a resumed job included.
    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.run_start.elapsed().as_secs_f64()
    }

    /// Cancel: stop. Pause: save a checkpoint (unless this step's is saved) and stop.
    fn poll(
        &mut self,
        callback: &mut dyn FnMut(TrainerEvent),
        control: &Control,
    ) -> Result<ControlFlow<TrainOutcome>> {
        let step = self.state.step;
        if control.is_cancelled() {
            return Ok(ControlFlow::Break(TrainOutcome::Cancelled { step }));
        }
        if !control.is_paused() {
            return Ok(ControlFlow::Continue(()));
        }
        self.state.elapsed_seconds = self.elapsed();
        let checkpoint = if self.last_saved == Some(step) {
            checkpoint::checkpoint_dir(self.inputs.output_dir, step)
        } else {
            self.save_checkpoint(callback)?
        };
        Ok(ControlFlow::Break(TrainOutcome::Paused {
            checkpoint,
            step,
        }))
    }

    /// Optimiser step `state.step` on its batch of the epoch's order (each epoch's order is a
    /// permutation seeded by `(seed, epoch)`), counted in the state and the window.
    fn step(&mut self) -> Result<Stepped> {
        let (spec, p) = (self.inputs.spec, self.plan);
        let step = self.state.step;
        let epoch = step / p.steps_per_epoch;
        let in_epoch = (step % p.steps_per_epoch) as usize;
        if self.order_epoch != epoch {
            self.order = data::epoch_order(p.n, spec.seed, epoch);
            self.order_epoch = epoch;
        }
        let lo = in_epoch * p.batch_size;
        let hi = (lo + p.batch_size).min(p.n);
        let items: Vec<&Features> = self.order[lo..hi]
            .iter()
            .map(|i| &self.data.train[*i])
            .collect();
        let lr = self.schedule.lr(step);
        let result = self.job.train_step(
            &mut self.opt,
            &items,
            spec.seed,
            step,
            lr,
            spec.max_grad_norm,
        )?;
        self.state.step += 1;
        self.state.trained_tokens += result.tokens as u64;
        self.window.add(&result);
        Ok(Stepped {
            result,
            lr,
            end_of_epoch: in_epoch as u64 + 1 == p.steps_per_epoch,
        })
    }

    /// The `metrics` event over the window, which starts again.
    fn log_metrics(&mut self, s: &Stepped, callback: &mut dyn FnMut(TrainerEvent)) {
        let (w, total_steps, task) = (&self.window, self.plan.total_steps, self.job.task);
        let secs = w.since.elapsed().as_secs_f64().max(1e-9);
        let run_secs = self.run_start.elapsed().as_secs_f64();
        let done = (self.state.step - self.start_step) as f64;
        let acc = w.correct / w.targets.max(1) as f64;
        let dpo = self.job.step_cfg.dpo_beta.is_some();
        let m = StepMetrics {
            step: self.state.step,
            total_steps,
            epoch: self.state.step as f64 / self.plan.steps_per_epoch as f64,
            train_loss: w.loss / w.targets.max(1) as f64,
            train_mean_token_accuracy: (task == Task::CausalLm && !dpo).then_some(acc),
            train_accuracy: matches!(
                task,
                Task::SequenceClassification | Task::TokenClassification
            )
            .then_some(acc),
            train_rewards_accuracies: dpo.then_some(acc),
            train_rewards_margins: dpo.then(|| w.margin / w.targets.max(1) as f64),
            learning_rate: s.lr,
            grad_norm: s.result.grad_norm,
            tokens_per_second: w.tokens as f64 / secs,
            examples_per_second: w.examples as f64 / secs,
            elapsed_seconds: self.elapsed_before + run_secs,
            eta_seconds: if done > 0.0 {
                run_secs / done * (total_steps - self.state.step) as f64
            } else {
                0.0
            },
            trained_tokens: self.state.trained_tokens,
            peak_memory_bytes: crate::memory::peak_bytes(self.job.device),
        };
        merge_metrics(&mut self.state.last_metrics, &m);
        callback(TrainerEvent::Metrics(m));
        self.window = Window::new();
    }

    /// Evaluate every `eval_interval` steps (0: at each epoch end) and after the last step.
    fn eval_due(&self, last: bool, end_of_epoch: bool) -> bool {
        let interval = self.inputs.spec.eval_interval;
        !self.data.valid.is_empty()
            && (last
                || (interval > 0 && self.state.step.is_multiple_of(u64::from(interval)))
                || (interval == 0 && end_of_epoch))
    }

    /// Evaluates, tracks the best validation loss and decides on early stopping. An abort during
    /// the evaluation cancels the run (`Break`).
    fn evaluate(
        &mut self,
        callback: &mut dyn FnMut(TrainerEvent),
        control: &Control,
    ) -> Result<ControlFlow<TrainOutcome>> {
        let step = self.state.step;
        callback(TrainerEvent::Phase {
            phase: Phase::Evaluating,
            message: format!("evaluating at step {step}"),
        });
        let Some(m) = self
            .job
            .evaluate(&self.data.valid, &self.id2label, control)?
        else {
            return Ok(ControlFlow::Break(TrainOutcome::Cancelled { step }));
        };
        let state = &mut self.state;
        merge_metrics(&mut state.last_metrics, &m);
        let improved = state.best_valid_loss.is_none_or(|b| m.valid_loss < b);
        if improved {
            state.best_valid_loss = Some(m.valid_loss);
            state.evals_without_improvement = 0;
        } else {
            state.evals_without_improvement += 1;
        }
        let evals_without_improvement = state.evals_without_improvement;
        callback(TrainerEvent::Eval { step, metrics: m });
        if let Some(samples) = &self.samples {
            let generated = guarded(|| samples.generate(self.job.model))?;
            if !generated.is_empty() {
                callback(TrainerEvent::Samples {
                    step,
                    samples: generated,
                });
            }
        }
        let patience = self.inputs.spec.early_stopping_patience;
        if patience > 0 && evals_without_improvement >= patience {
            callback(TrainerEvent::Warning {
                message: format!(
                    "early stopping at step {step}: no lower validation loss in {evals_without_improvement} evaluations"
                ),
            });
            self.stop_early = true;
        }
        self.window.since = Instant::now();
        Ok(ControlFlow::Continue(()))
    }

    /// Save every `checkpoint_interval` steps (0: at each epoch end), after the last step and
    /// when stopping early.
    fn checkpoint_due(&self, last: bool, end_of_epoch: bool) -> bool {
        let interval = self.inputs.spec.checkpoint_interval;
        last || self.stop_early
            || (interval > 0 && self.state.step.is_multiple_of(u64::from(interval)))
            || (interval == 0 && end_of_epoch)
    }

    /// Saves `checkpoints/step-<n>/` with the training state, between its two events.
    fn save_checkpoint(&self, callback: &mut dyn FnMut(TrainerEvent)) -> Result<PathBuf> {
        let step = self.state.step;
        let dir = checkpoint::checkpoint_dir(self.inputs.output_dir, step);
        callback(TrainerEvent::Phase {
            phase: Phase::Saving,
            message: format!("saving checkpoint step-{step}"),
        });
        self.save(&dir, Some((&self.state, &self.opt)))?;
        callback(TrainerEvent::Checkpoint {
            step,
            path: dir.clone(),
            metrics: self.state.last_metrics.clone(),
        });
        Ok(dir)
    }

    /// [`checkpoint::save`] of the job's model (`state`: with the training state).
    fn save(&self, dir: &Path, state: Option<(&TrainState, &AdamW)>) -> Result<()> {
        let (inputs, lora) = (
            self.inputs,
            self.inputs.spec.training_type == TrainingType::Lora,
        );
        guarded(|| {
            checkpoint::save(
                dir,
                self.job.model,
                inputs.model_dir,
                lora,
                inputs.spec.merge_lora,
                state,
            )
        })
    }

    /// Saves `final/` (the last weights) and reports the run.
    fn finish(
        self,
        started: Instant,
        callback: &mut dyn FnMut(TrainerEvent),
    ) -> Result<TrainOutcome> {
        callback(TrainerEvent::Phase {
            phase: Phase::Saving,
            message: "saving the final model".into(),
        });
        let final_dir = self.inputs.output_dir.join("final");
        self.save(&final_dir, None)?;
        let mut metrics = self.state.last_metrics.clone();
        metrics.insert("elapsed_seconds".into(), json!(self.elapsed()));
        metrics.insert(
            "wall_seconds".into(),
            json!(started.elapsed().as_secs_f64()),
        );
        Ok(TrainOutcome::Done {
            final_dir,
            trained_tokens: self.state.trained_tokens,
            steps: self.state.step,
            metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_is_recognised() {
        let e = classify(
            Error::Torch(tch::TchError::Torch(
                "CUDA out of memory. Tried to allocate 2.00 GiB".into(),
            )),
            Device::Cuda(0),
            16,
            1024,
        );
        assert!(
            matches!(
                e,
                Error::OutOfMemory {
                    batch_size: 16,
                    seq_len: 1024,
                    ..
                }
            ),
            "{e}"
        );
        let p = guarded::<()>(|| {
            panic!("DefaultCPUAllocator: not enough memory: you tried to allocate")
        });
        assert!(matches!(
            classify(p.unwrap_err(), Device::Cpu, 8, 512),
            Error::OutOfMemory { .. }
        ));
        let e = classify(
            Error::Other(anyhow::anyhow!("libtorch failed: CUDA out of memory")),
            Device::Cuda(0),
            1,
            2,
        );
        assert!(matches!(e, Error::OutOfMemory { .. }));
        assert_eq!(micro_seed(1, 2, 3), micro_seed(1, 2, 3));
        assert_ne!(micro_seed(1, 2, 3), micro_seed(1, 3, 3));
    }
}
