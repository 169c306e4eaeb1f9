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

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Map, Value};
use tch::{Device, Kind, Tensor};
use tuna_core::data::Example;
use tuna_core::protocol::DataReport;
use tuna_core::spec::{JobSpec, Precision, Task, TrainingType};

use crate::checkpoint::{self, TrainState};
use crate::data::{self, Collated, Features, LabelMap};
use crate::metrics::{macro_f1, EvalMetrics, StepMetrics};
use crate::model::{Batch, FreezeOptions, LoadOptions, LoraOptions, Model, TaskHead};
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

/// The options `load_model` gets for a job.
pub fn load_options(spec: &JobSpec, device: Device, task: TaskHead) -> LoadOptions {
    let base_kind = match (device, spec.precision) {
        (Device::Cpu, _) | (_, Precision::Fp32) => Kind::Float,
        _ => Kind::BFloat16,
    };
    LoadOptions {
        device,
        base_kind,
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
    pub causal: bool,
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
    causal: bool,
    with_types: bool,
    seed: u64,
    step: u64,
) -> Result<Accumulated> {
    let cfg = StepConfig {
        micro,
        pad_id,
        causal,
        with_types,
        pack_len: None,
        group_overhead_tokens: None,
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
            Some(len) if cfg.causal => data::collate_packed(chunk, cfg.pad_id, device, len)?,
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
            let logits = model.forward(&batch, true)?;
            let (loss, correct) = data::loss_and_correct(&logits, &c.labels, cfg.causal)?;
            loss.f_div_scalar(denom)?.f_backward()?;
            let _ = loss_acc.f_add_(&loss.f_detach()?)?;
            let _ = correct_acc.f_add_(&correct.f_to_kind(Kind::Float)?)?;
            Ok(())
        });
        r.map_err(|e| classify(e, device, b, t))?;
    }
    Ok(Accumulated {
        loss_sum: loss_acc,
        correct: correct_acc,
        tokens,
        targets,
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
    let (loss_sum, grad_norm, correct) = guarded(|| {
        let norm = opt.grad_norm()?;
        let host = Tensor::f_stack(
            &[
                loss_acc.shallow_clone(),
                norm.shallow_clone(),
                correct_acc.shallow_clone(),
            ],
            0,
        )?
        .f_to_device(Device::Cpu)?;
        let v: Vec<f64> = Vec::<f64>::try_from(host.f_to_kind(Kind::Double)?)?;
        Ok((v[0], v[1], v[2]))
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
    })
}

struct Job<'a> {
    model: &'a dyn Model,
    causal: bool,
    with_types: bool,
    pad_id: i64,
    device: Device,
    micro: usize,
    step_cfg: StepConfig,
}

impl Job<'_> {
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

    fn evaluate(
        &self,
        feats: &[Features],
        num_labels: usize,
        control: &Control,
    ) -> Result<Option<EvalMetrics>> {
        let _g = tch::no_grad_guard();
        let mut loss = 0.0;
        let mut targets = 0usize;
        let mut correct = 0.0;
        let mut pairs: Vec<(i64, i64)> = Vec::new();
        let refs: Vec<&Features> = feats.iter().collect();
        for chunk in refs.chunks(self.micro.max(1)) {
            if control.is_aborted() {
                return Ok(None);
            }
            let c = data::collate(chunk, self.pad_id, self.device, self.with_types)?;
            let (b, t) = (c.batch_size, c.seq_len);
            let (l, k, preds) = guarded(|| {
                let logits = self.model.forward(&self.batch(&c), false)?;
                let (l, k) = data::loss_and_correct(&logits, &c.labels, self.causal)?;
                let preds = if self.causal {
                    Vec::new()
                } else {
                    Vec::<i64>::try_from(logits.f_argmax(-1, false)?.f_to_device(Device::Cpu)?)?
                };
                Ok((l.f_double_value(&[])?, k.f_double_value(&[])?, preds))
            })
            .map_err(|e| classify(e, self.device, b, t))?;
            loss += l;
            correct += k;
            targets += c.targets;
            if !self.causal {
                for (p, f) in preds.iter().zip(chunk) {
                    pairs.push((*p, f.class.unwrap_or(-1)));
                }
            }
        }
        let n = targets.max(1) as f64;
        let mut m = EvalMetrics {
            valid_loss: loss / n,
            valid_examples: feats.len(),
            ..Default::default()
        };
        if self.causal {
            m.valid_mean_token_accuracy = Some(correct / n);
        } else {
            m.valid_accuracy = Some(correct / n);
            m.valid_macro_f1 = Some(macro_f1(&pairs, num_labels));
        }
        Ok(Some(m))
    }
}

fn merge_metrics(into: &mut Map<String, Value>, v: impl Serialize) {
    if let Ok(Value::Object(m)) = serde_json::to_value(v) {
        into.extend(m);
    }
}

/// Runs one job. `train_examples`/`valid_examples` are `(line, example)` pairs as
/// `tuna_core::data::read_all` returns them. See the module documentation for the semantics.
#[allow(clippy::too_many_arguments)]
pub fn train(
    model_dir: &Path,
    spec: &JobSpec,
    train_examples: &[(u64, Example)],
    valid_examples: Option<&[(u64, Example)]>,
    output_dir: &Path,
    resume_from: Option<&Path>,
    device: Device,
    callback: &mut dyn FnMut(TrainerEvent),
    control: &Control,
) -> Result<TrainOutcome> {
    let started = Instant::now();
    let causal = spec.task == Task::CausalLm;
    if train_examples.is_empty() {
        return Err(Error::Data("the training data holds no examples".into()));
    }
    let resume = resume_from.map(checkpoint::load).transpose()?;

    // Labels come from the whole training file (before any validation split).
    let label_map = if causal {
        None
    } else {
        let m = LabelMap::from_examples(train_examples);
        if m.len() < 2 {
            return Err(Error::Data(format!(
                "sequence classification needs at least two distinct labels in the training data, found {}",
                m.len()
            )));
        }
        Some(m)
    };
    if let (Some(r), Some(m)) = (&resume, &label_map) {
        if r.state.id2label.as_ref() != Some(&m.id2label()) {
            return Err(Error::Config(
                "the checkpoint was trained with other labels than this training data".into(),
            ));
        }
    }

    callback(TrainerEvent::Phase {
        phase: Phase::LoadingModel,
        message: format!("loading {}", model_dir.display()),
    });
    let task = match &label_map {
        None => TaskHead::CausalLm,
        Some(m) => TaskHead::SequenceClassification {
            id2label: m.id2label(),
        },
    };
    let opts = load_options(spec, device, task);
    let model = guarded(|| crate::models::load_model(model_dir, &opts))?;
    let info = model.info().clone();
    let tok = Tok::load(model_dir, info.is_decoder)?;
    let notes = model.load_notes();

    callback(TrainerEvent::Phase {
        phase: Phase::Tokenizing,
        message: "tokenizing the data".into(),
    });
    let max_len = if info.max_positions > 0 {
        (spec.max_seq_length as usize).min(info.max_positions as usize)
    } else {
        spec.max_seq_length as usize
    };
    type Lines = Vec<(u64, Example)>;
    let (train_part, valid_part): (Lines, Lines) = match valid_examples {
        Some(v) => (train_examples.to_vec(), v.to_vec()),
        None => data::split_validation(train_examples, spec.validation_split, spec.seed),
    };
    let (train_feats, train_stats) = data::featurize(
        &tok,
        spec.task,
        &train_part,
        max_len,
        label_map.as_ref(),
        "training file",
    )?;
    if train_feats.is_empty() {
        return Err(Error::Data(format!(
            "no training example is left after truncation to {max_len} tokens ({} dropped)",
            train_stats.dropped
        )));
    }
    let valid_source = if valid_examples.is_some() {
        "validation file"
    } else {
        "training file (validation split)"
    };
    let (valid_feats, valid_stats) = if valid_part.is_empty() {
        (Vec::new(), None)
    } else {
        let (f, s) = data::featurize(
            &tok,
            spec.task,
            &valid_part,
            max_len,
            label_map.as_ref(),
            valid_source,
        )?;
        (f, Some(s))
    };

    let n = train_feats.len();
    let batch_size = (spec.batch_size.max(1) as usize).min(n);
    let accum = spec.gradient_accumulation_steps.max(1) as usize;
    let micro = batch_size.div_ceil(accum).max(1);
    let steps_per_epoch = n.div_ceil(batch_size) as u64;
    let mut total_steps = steps_per_epoch * u64::from(spec.n_epochs.max(1));
    if spec.max_steps > 0 {
        total_steps = total_steps.min(u64::from(spec.max_steps));
    }
    callback(TrainerEvent::Data(DataReport {
        train: train_stats.clone(),
        valid: valid_stats.clone(),
        labels: label_map.as_ref().map(LabelMap::id2label),
        total_steps,
        notes: notes.clone(),
    }));
    if train_stats.truncated > 0 || train_stats.dropped > 0 {
        callback(TrainerEvent::Warning {
            message: format!(
                "{} training example(s) were cut to {max_len} tokens; {} had nothing left to learn from and were dropped",
                train_stats.truncated, train_stats.dropped
            ),
        });
    }

    let pad_id = tok
        .pad
        .as_ref()
        .map(|p| i64::from(p.id))
        .or(info.pad_token_id)
        .or(info.eos_token_ids.first().copied())
        .unwrap_or(0);
    let job = Job {
        model: model.as_ref(),
        causal,
        with_types: model.uses_token_type_ids(),
        pad_id,
        device,
        micro,
        step_cfg: StepConfig {
            micro,
            pad_id,
            causal,
            with_types: model.uses_token_type_ids(),
            pack_len: (causal && spec.packing).then_some(max_len),
            group_overhead_tokens: (!causal && spec.packing).then_some(GROUP_OVERHEAD_TOKENS),
        },
    };
    let mut opt = AdamW::new(
        model.trainable_parameters(),
        AdamWConfig {
            weight_decay: spec.weight_decay,
            ..Default::default()
        },
    )?;
    let schedule = Schedule::new(
        spec.lr_scheduler,
        spec.learning_rate,
        total_steps,
        u64::from(spec.warmup_steps),
        spec.warmup_ratio,
    );

    let mut state = TrainState {
        format: 1,
        step: 0,
        total_steps,
        steps_per_epoch,
        seed: spec.seed,
        train_examples: n,
        batch_size,
        micro_batch_size: micro,
        id2label: label_map.as_ref().map(LabelMap::id2label),
        ..Default::default()
    };
    if let Some(r) = &resume {
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
        state = TrainState {
            total_steps,
            ..r.state.clone()
        };
    }

    let num_labels = label_map.as_ref().map(LabelMap::len).unwrap_or(0);
    let lora = spec.training_type == TrainingType::Lora;
    let run_start = Instant::now();
    let start_step = state.step;
    let elapsed_before = state.elapsed_seconds;
    let mut order_epoch = u64::MAX;
    let mut order: Vec<usize> = Vec::new();
    let mut window = (0.0f64, 0usize, 0.0f64, 0usize, 0usize, Instant::now()); // loss, targets, correct, tokens, examples, since
    let mut last_saved: Option<u64> = None;
    let mut stop_early = false;

    let save_ckpt = |state: &TrainState,
                     opt: &AdamW,
                     callback: &mut dyn FnMut(TrainerEvent)|
     -> Result<PathBuf> {
        let dir = checkpoint::checkpoint_dir(output_dir, state.step);
        callback(TrainerEvent::Phase {
            phase: Phase::Saving,
            message: format!("saving checkpoint step-{}", state.step),
        });
        guarded(|| {
            checkpoint::save(
                &dir,
                model.as_ref(),
                model_dir,
                lora,
                spec.merge_lora,
                Some((state, opt)),
            )
        })?;
        callback(TrainerEvent::Checkpoint {
            step: state.step,
            path: dir.clone(),
            metrics: state.last_metrics.clone(),
        });
        Ok(dir)
    };

    callback(TrainerEvent::Phase {
        phase: Phase::Training,
        message: format!(
            "{n} examples, {total_steps} steps of {batch_size} examples ({accum} micro-batch(es) of up to {micro}), from step {start_step}"
        ),
    });
    while state.step < total_steps && !stop_early {
        if control.is_cancelled() {
            return Ok(TrainOutcome::Cancelled { step: state.step });
        }
        if control.is_paused() {
            state.elapsed_seconds = elapsed_before + run_start.elapsed().as_secs_f64();
            let dir = if last_saved == Some(state.step) {
                checkpoint::checkpoint_dir(output_dir, state.step)
            } else {
                save_ckpt(&state, &opt, callback)?
            };
            return Ok(TrainOutcome::Paused {
                checkpoint: dir,
                step: state.step,
            });
        }
        let step = state.step;
        let epoch = step / steps_per_epoch;
        let in_epoch = (step % steps_per_epoch) as usize;
        if order_epoch != epoch {
            order = data::epoch_order(n, spec.seed, epoch);
            order_epoch = epoch;
        }
        let lo = in_epoch * batch_size;
        let hi = (lo + batch_size).min(n);
        let items: Vec<&Features> = order[lo..hi].iter().map(|i| &train_feats[*i]).collect();
        let lr = schedule.lr(step);
        let r = job.train_step(&mut opt, &items, spec.seed, step, lr, spec.max_grad_norm)?;
        state.step += 1;
        state.trained_tokens += r.tokens as u64;
        window.0 += r.loss_sum;
        window.1 += r.targets;
        window.2 += r.correct;
        window.3 += r.tokens;
        window.4 += r.examples;
        let end_of_epoch = in_epoch as u64 + 1 == steps_per_epoch;
        let last = state.step == total_steps;

        if state
            .step
            .is_multiple_of(u64::from(spec.log_interval.max(1)))
            || last
        {
            let secs = window.5.elapsed().as_secs_f64().max(1e-9);
            let run_secs = run_start.elapsed().as_secs_f64();
            let done = (state.step - start_step) as f64;
            let acc = window.2 / window.1.max(1) as f64;
            let m = StepMetrics {
                step: state.step,
                total_steps,
                epoch: state.step as f64 / steps_per_epoch as f64,
                train_loss: window.0 / window.1.max(1) as f64,
                train_mean_token_accuracy: causal.then_some(acc),
                train_accuracy: (!causal).then_some(acc),
                learning_rate: lr,
                grad_norm: r.grad_norm,
                tokens_per_second: window.3 as f64 / secs,
                examples_per_second: window.4 as f64 / secs,
                elapsed_seconds: elapsed_before + run_secs,
                eta_seconds: if done > 0.0 {
                    run_secs / done * (total_steps - state.step) as f64
                } else {
                    0.0
                },
                trained_tokens: state.trained_tokens,
                peak_memory_bytes: None,
            };
            merge_metrics(&mut state.last_metrics, &m);
            callback(TrainerEvent::Metrics(m));
            window = (0.0, 0, 0.0, 0, 0, Instant::now());
        }

        let eval_now = !valid_feats.is_empty()
            && (last
                || (spec.eval_interval > 0
                    && state.step.is_multiple_of(u64::from(spec.eval_interval)))
                || (spec.eval_interval == 0 && end_of_epoch));
        if eval_now {
            callback(TrainerEvent::Phase {
                phase: Phase::Evaluating,
                message: format!("evaluating at step {}", state.step),
            });
            let Some(m) = job.evaluate(&valid_feats, num_labels, control)? else {
                return Ok(TrainOutcome::Cancelled { step: state.step });
            };
            merge_metrics(&mut state.last_metrics, &m);
            let improved = state.best_valid_loss.is_none_or(|b| m.valid_loss < b);
            if improved {
                state.best_valid_loss = Some(m.valid_loss);
                state.evals_without_improvement = 0;
            } else {
                state.evals_without_improvement += 1;
            }
            callback(TrainerEvent::Eval {
                step: state.step,
                metrics: m,
            });
            if spec.early_stopping_patience > 0
                && state.evals_without_improvement >= spec.early_stopping_patience
            {
                callback(TrainerEvent::Warning {
                    message: format!(
                        "early stopping at step {}: no lower validation loss in {} evaluations",
                        state.step, state.evals_without_improvement
                    ),
                });
                stop_early = true;
            }
            window.5 = Instant::now();
        }
        let ckpt_now = last
            || stop_early
            || (spec.checkpoint_interval > 0
                && state
                    .step
                    .is_multiple_of(u64::from(spec.checkpoint_interval)))
            || (spec.checkpoint_interval == 0 && end_of_epoch);
        if ckpt_now {
            state.elapsed_seconds = elapsed_before + run_start.elapsed().as_secs_f64();
            save_ckpt(&state, &opt, callback)?;
            last_saved = Some(state.step);
            window.5 = Instant::now();
        }
    }

    callback(TrainerEvent::Phase {
        phase: Phase::Saving,
        message: "saving the final model".into(),
    });
    let final_dir = output_dir.join("final");
    guarded(|| {
        checkpoint::save(
            &final_dir,
            model.as_ref(),
            model_dir,
            lora,
            spec.merge_lora,
            None,
        )
    })?;
    let mut metrics = state.last_metrics.clone();
    metrics.insert(
        "elapsed_seconds".into(),
        json!(elapsed_before + run_start.elapsed().as_secs_f64()),
    );
    metrics.insert(
        "wall_seconds".into(),
        json!(started.elapsed().as_secs_f64()),
    );
    Ok(TrainOutcome::Done {
        final_dir,
        trained_tokens: state.trained_tokens,
        steps: state.step,
        metrics,
    })
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
