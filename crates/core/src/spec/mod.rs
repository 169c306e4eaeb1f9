//! The fine-tuning job request and the resolved [`JobSpec`].
//!
//! A create request is OpenAI's (`model`, `training_file`, `validation_file`, `method`,
//! `hyperparameters`, `suffix`, `seed`, `metadata`, `integrations`) plus tuna's extensions. An
//! extension is accepted both as a top-level key (what the `openai` SDK's `extra_body` sends)
//! and as an extra key inside `method.supervised.hyperparameters` (or the deprecated top-level
//! `hyperparameters`). Every value is validated; `"auto"` is resolved to a number here, so a job
//! object always shows what will run.
//!
//! [`JobSpec`] is what the queue stores (`jobs.spec`) and what the trainer executes.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

mod request;

pub use request::parse_create_request;

/// What the model is trained to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    CausalLm,
    /// One label per text (or text pair), softmax + cross-entropy.
    SequenceClassification,
    /// A number per text, one output, mean squared error.
    SequenceRegression,
    /// Any number of labels per text, a sigmoid per label + binary cross-entropy.
    MultiLabelClassification,
    /// A tag per word (named entities, parts of speech): a label per token, cross-entropy on
    /// each word's first sub-token.
    TokenClassification,
    /// Extractive question answering: the answer's span in a context, start and end logits.
    QuestionAnswering,
}

impl Task {
    pub const ALL: [Task; 6] = [
        Task::CausalLm,
        Task::SequenceClassification,
        Task::SequenceRegression,
        Task::MultiLabelClassification,
        Task::TokenClassification,
        Task::QuestionAnswering,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Task::CausalLm => "causal_lm",
            Task::SequenceClassification => "sequence_classification",
            Task::SequenceRegression => "sequence_regression",
            Task::MultiLabelClassification => "multi_label_classification",
            Task::TokenClassification => "token_classification",
            Task::QuestionAnswering => "question_answering",
        }
    }

    /// A head over the whole sequence (`*ForSequenceClassification`, whatever its
    /// `problem_type`).
    pub fn is_sequence_level(self) -> bool {
        !matches!(
            self,
            Task::CausalLm | Task::TokenClassification | Task::QuestionAnswering
        )
    }

    /// Whether the task learns a label set from the training data (single-label, multi-label
    /// and token classification).
    pub fn has_label_set(self) -> bool {
        matches!(
            self,
            Task::SequenceClassification
                | Task::MultiLabelClassification
                | Task::TokenClassification
        )
    }

    /// transformers' `problem_type` in config.json for the sequence-level tasks.
    pub fn problem_type(self) -> Option<&'static str> {
        match self {
            Task::CausalLm | Task::TokenClassification | Task::QuestionAnswering => None,
            Task::SequenceClassification => Some("single_label_classification"),
            Task::SequenceRegression => Some("regression"),
            Task::MultiLabelClassification => Some("multi_label_classification"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    Linear,
    Cosine,
}

/// Which weights change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainingType {
    /// Every weight (minus frozen ones, see [`Freeze`]).
    Full,
    /// Low-rank adapters; the base stays frozen.
    Lora,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// bf16 on CUDA, fp32 on CPU.
    Auto,
    Fp32,
    Bf16,
}

/// The `optimizer_moments` knob: the dtype AdamW keeps its two moments in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Moments {
    /// 8 bytes per trainable parameter.
    #[default]
    Fp32,
    /// 4 bytes per trainable parameter, stored with stochastic rounding.
    Bf16,
}

impl Moments {
    fn is_fp32(&self) -> bool {
        *self == Moments::Fp32
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    Auto,
    Cpu,
    Cuda,
}

/// Parses the snake_case name a spec uses (`"cpu"`, `"bf16"`, ...), for command-line flags.
fn parse_name<T: serde::de::DeserializeOwned>(s: &str, names: &str) -> Result<T, String> {
    T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(s))
        .map_err(|_| format!("expected {names}, not '{s}'"))
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_name(s, "auto, cpu or cuda")
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_name(s, "auto, fp32 or bf16")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lora {
    pub r: u32,
    pub alpha: f64,
    pub dropout: f64,
    /// PEFT-style module names (`q_proj`, …) or `all-linear`.
    pub target_modules: Vec<String>,
    /// QLoRA: the frozen base's layer linears stored in 4-bit NF4 and dequantised in each
    /// forward (the knob `quantization: "nf4"`); `None`: the base as loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nf4: Option<Nf4>,
}

/// The `quantization` knob: how a LoRA job stores its frozen base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantization {
    None,
    /// 4-bit NormalFloat with per-block absmax (block 64), the QLoRA paper's format.
    Nf4,
}

/// How NF4 stores the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nf4 {
    /// Quantise the block absmaxes again (8 bits, blocks of 256): about 0.516 bytes per
    /// parameter instead of 0.5625.
    pub double_quantization: bool,
}

/// Preference tuning (`method.type: "dpo"`): DPO's sigmoid loss over pairs of a preferred and
/// a rejected completion, against the frozen starting model as the reference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Dpo {
    /// How far the tuned model may move from the reference (DPO's β; OpenAI's and TRL's
    /// default 0.1).
    pub beta: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Freeze {
    pub embeddings: bool,
    /// Freeze the first N transformer layers.
    pub layers: u32,
    /// Freeze parameters whose name matches one of these globs (`*` wildcard).
    pub patterns: Vec<String>,
}

/// The resolved job: every knob has its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub model: String,
    pub task: Task,
    pub training_file: Option<String>,
    pub validation_file: Option<String>,
    /// Instead of `training_file`: http(s)://, s3:// or (when the server allows it) file://.
    pub dataset_url: Option<String>,
    pub validation_dataset_url: Option<String>,
    pub seed: u64,
    // OpenAI's three hyperparameters.
    pub n_epochs: u32,
    pub batch_size: u32,
    pub learning_rate_multiplier: f64,
    // tuna's extensions.
    /// Peak learning rate: the base learning rate for the method times the multiplier, unless
    /// given explicitly.
    pub learning_rate: f64,
    pub lr_scheduler: LrSchedule,
    /// Fraction of the total optimiser steps spent warming up (ignored when `warmup_steps` > 0).
    pub warmup_ratio: f64,
    pub warmup_steps: u32,
    pub weight_decay: f64,
    pub gradient_accumulation_steps: u32,
    pub max_seq_length: u32,
    pub max_grad_norm: f64,
    /// Question answering: how many tokens consecutive windows of a long context share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc_stride: Option<u32>,
    /// Evaluate every N optimiser steps (0: at the end of each epoch).
    pub eval_interval: u32,
    /// Causal LM: at each evaluation, greedy completions of this many validation prompts go
    /// into the job's events beside their reference answers (None for the other tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_samples: Option<u32>,
    /// Save a checkpoint every N optimiser steps (0: at the end of each epoch).
    pub checkpoint_interval: u32,
    /// Stop after this many evaluations without improvement (0: never).
    pub early_stopping_patience: u32,
    /// Share of the training data held out for validation when no validation data is given.
    pub validation_split: f64,
    /// Stop after this many optimiser steps (0: run all epochs).
    pub max_steps: u32,
    pub training_type: TrainingType,
    pub lora: Option<Lora>,
    pub freeze: Freeze,
    /// Also export merged full weights for LoRA jobs.
    pub merge_lora: bool,
    /// Less padding, same loss: causal LM packs several examples per row (attention and
    /// positions kept per example); sequence classification splits each micro-batch into
    /// groups of similar length, each padded to its own longest.
    #[serde(default)]
    pub packing: bool,
    pub precision: Precision,
    pub device: Device,
    /// Log a metrics event every N optimiser steps.
    pub log_interval: u32,
    /// `batch_size` was given as a number: the worker runs micro-batches of
    /// `ceil(batch_size / gradient_accumulation_steps)` examples as the job says. Absent or
    /// `"auto"`, the worker may split them further (more gradient accumulation, the same
    /// effective batch) where the job would not fit its device otherwise
    /// ([`crate::memory::fit`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fixed_batch_size: bool,
    /// Recompute each layer's forward in the backward instead of keeping its activations.
    /// `None` (`"auto"`): the worker turns it on when the job would not fit its device
    /// otherwise ([`crate::memory::fit`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_checkpointing: Option<bool>,
    /// AdamW's moments in fp32 or bf16 (absent in specs stored before the knob: fp32).
    #[serde(default, skip_serializing_if = "Moments::is_fp32")]
    pub optimizer_moments: Moments,
    /// `method.type: "dpo"`: train on preference pairs (the task is causal LM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<Dpo>,
}

/// A request that cannot be accepted: `param` names the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub message: String,
    pub param: Option<String>,
}

impl SpecError {
    pub(crate) fn new(param: &str, message: impl Into<String>) -> Self {
        SpecError {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Server settings that shape what a request may ask for.
#[derive(Debug, Clone, Default)]
pub struct SpecPolicy {
    /// Accept `file://` dataset URLs (only for trusted single-user setups).
    pub allow_file_urls: bool,
}

/// The parts of a create request that are not part of the training spec.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateRequest {
    pub spec: JobSpec,
    pub suffix: Option<String>,
    pub metadata: Option<Map<String, Value>>,
    pub integrations: Option<Value>,
    pub priority: i32,
    /// Whether `max_seq_length` was given as a number (not absent or `"auto"`): the server may
    /// lower an automatic one to the model's context length.
    pub max_seq_length_given: bool,
}

/// OpenAI's `hyperparameters` object as returned, resolved.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct OpenAiHyperparameters {
    pub batch_size: u32,
    pub learning_rate_multiplier: f64,
    pub n_epochs: u32,
}

/// `method.supervised.hyperparameters` (or `method.dpo.hyperparameters`) as returned: OpenAI's
/// three (and DPO's `beta`) plus every tuna knob, resolved (so a user sees exactly what runs).
/// The LoRA keys are present for LoRA jobs only.
#[derive(Debug, Clone, Serialize)]
pub struct MethodHyperparameters<'a> {
    #[serde(flatten)]
    pub openai: OpenAiHyperparameters,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    pub task: Task,
    pub learning_rate: f64,
    pub lr_scheduler: LrSchedule,
    pub warmup_ratio: f64,
    pub warmup_steps: u32,
    pub weight_decay: f64,
    pub gradient_accumulation_steps: u32,
    pub max_seq_length: u32,
    pub max_grad_norm: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc_stride: Option<u32>,
    pub eval_interval: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_samples: Option<u32>,
    pub checkpoint_interval: u32,
    pub early_stopping_patience: u32,
    pub validation_split: f64,
    pub max_steps: u32,
    pub training_type: TrainingType,
    pub freeze_embeddings: bool,
    pub freeze_layers: u32,
    pub freeze_patterns: &'a [String],
    pub merge_lora: bool,
    pub packing: bool,
    /// `true`, `false` or `"auto"`.
    pub gradient_checkpointing: serde_json::Value,
    pub precision: Precision,
    pub device: Device,
    pub log_interval: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_r: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_dropout: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_target_modules: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization: Option<Quantization>,
    /// With `quantization` nf4 only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub double_quantization: Option<bool>,
    /// Said when bf16.
    #[serde(skip_serializing_if = "Moments::is_fp32")]
    pub optimizer_moments: Moments,
}

/// The `method` object as returned: `{"type": "supervised", "supervised": {"hyperparameters":
/// ...}}`, or `{"type": "dpo", "dpo": {"hyperparameters": ...}}` as OpenAI shows a DPO job.
#[derive(Debug, Clone, Serialize)]
pub struct Method<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supervised: Option<Supervised<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dpo: Option<Supervised<'a>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Supervised<'a> {
    pub hyperparameters: MethodHyperparameters<'a>,
}

impl JobSpec {
    /// Whether the frozen base is stored in NF4 (QLoRA).
    pub fn nf4(&self) -> Option<Nf4> {
        self.lora.as_ref().and_then(|l| l.nf4)
    }

    /// OpenAI's `hyperparameters` object, resolved.
    pub fn openai_hyperparameters(&self) -> OpenAiHyperparameters {
        OpenAiHyperparameters {
            batch_size: self.batch_size,
            learning_rate_multiplier: self.learning_rate_multiplier,
            n_epochs: self.n_epochs,
        }
    }

    /// `method.supervised.hyperparameters` as returned.
    pub fn method_hyperparameters(&self) -> MethodHyperparameters<'_> {
        let lora = self.lora.as_ref();
        MethodHyperparameters {
            openai: self.openai_hyperparameters(),
            beta: self.dpo.map(|d| d.beta),
            task: self.task,
            learning_rate: self.learning_rate,
            lr_scheduler: self.lr_scheduler,
            warmup_ratio: self.warmup_ratio,
            warmup_steps: self.warmup_steps,
            weight_decay: self.weight_decay,
            gradient_accumulation_steps: self.gradient_accumulation_steps,
            max_seq_length: self.max_seq_length,
            max_grad_norm: self.max_grad_norm,
            doc_stride: self.doc_stride,
            eval_interval: self.eval_interval,
            eval_samples: self.eval_samples,
            checkpoint_interval: self.checkpoint_interval,
            early_stopping_patience: self.early_stopping_patience,
            validation_split: self.validation_split,
            max_steps: self.max_steps,
            training_type: self.training_type,
            freeze_embeddings: self.freeze.embeddings,
            freeze_layers: self.freeze.layers,
            freeze_patterns: &self.freeze.patterns,
            merge_lora: self.merge_lora,
            packing: self.packing,
            gradient_checkpointing: match self.gradient_checkpointing {
                Some(on) => serde_json::Value::Bool(on),
                None => "auto".into(),
            },
            precision: self.precision,
            device: self.device,
            log_interval: self.log_interval,
            lora_r: lora.map(|l| l.r),
            lora_alpha: lora.map(|l| l.alpha),
            lora_dropout: lora.map(|l| l.dropout),
            lora_target_modules: lora.map(|l| l.target_modules.as_slice()),
            quantization: lora.map(|l| match l.nf4 {
                Some(_) => Quantization::Nf4,
                None => Quantization::None,
            }),
            double_quantization: lora.and_then(|l| l.nf4).map(|q| q.double_quantization),
            optimizer_moments: self.optimizer_moments,
        }
    }

    /// The `method` object as returned.
    pub fn method(&self) -> Method<'_> {
        let body = Supervised {
            hyperparameters: self.method_hyperparameters(),
        };
        match self.dpo {
            Some(_) => Method {
                kind: "dpo",
                supervised: None,
                dpo: Some(body),
            },
            None => Method {
                kind: "supervised",
                supervised: Some(body),
                dpo: None,
            },
        }
    }
}

/// Checks a dataset URL's scheme against the policy.
pub fn check_dataset_url(url: &str, policy: &SpecPolicy) -> Result<(), String> {
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("https://") || lower.starts_with("http://") {
        if url.len() <= "https://".len() + 1 {
            return Err(format!("'{url}' has no host"));
        }
        Ok(())
    } else if lower.starts_with("s3://") {
        if url[5..].split('/').next().unwrap_or_default().is_empty() || !url[5..].contains('/') {
            return Err(format!("'{url}' must look like s3://bucket/key"));
        }
        Ok(())
    } else if lower.starts_with("file://") {
        if policy.allow_file_urls {
            Ok(())
        } else {
            Err("file:// dataset URLs are disabled on this server (an operator can allow them with --allow-file-urls)".into())
        }
    } else {
        Err(format!("unsupported dataset URL '{url}': use https://, http://, s3:// or an uploaded training_file"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<CreateRequest, SpecError> {
        parse_create_request(&v, &SpecPolicy::default(), 42)
    }

    #[test]
    fn device_and_precision_parse_their_spec_names() {
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda));
        assert_eq!("bf16".parse::<Precision>(), Ok(Precision::Bf16));
        assert_eq!(
            "gpu".parse::<Device>(),
            Err("expected auto, cpu or cuda, not 'gpu'".to_string())
        );
    }

    #[test]
    fn minimal_request_resolves_auto() {
        let r = parse(json!({"model": "gpt2", "training_file": "file-abc"})).unwrap();
        let s = &r.spec;
        assert_eq!(
            (s.n_epochs, s.batch_size, s.learning_rate_multiplier),
            (3, 8, 1.0)
        );
        assert_eq!(s.seed, 42);
        assert_eq!(s.task, Task::CausalLm);
        assert_eq!(s.training_type, TrainingType::Full);
        assert!((s.learning_rate - 2e-5).abs() < 1e-12);
        let hp = serde_json::to_value(s.method_hyperparameters()).unwrap();
        assert_eq!(hp["n_epochs"], 3);
        assert_eq!(hp["task"], "causal_lm");
    }

    #[test]
    fn extensions_top_level_and_in_hyperparameters() {
        let r = parse(json!({
            "model": "llama", "dataset_url": "https://example.com/d.jsonl",
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 2.0,
                "lora_r": 8, "lora_target_modules": ["q_proj", "v_proj"], "warmup_ratio": 0.1
            }}},
            "task": "causal_lm", "seed": 7
        }))
        .unwrap();
        let s = &r.spec;
        assert_eq!(s.training_type, TrainingType::Lora);
        let l = s.lora.as_ref().unwrap();
        assert_eq!((l.r, l.alpha), (8, 16.0));
        assert_eq!(l.target_modules, vec!["q_proj", "v_proj"]);
        assert!((s.learning_rate - 4e-4).abs() < 1e-12);
        assert_eq!(s.n_epochs, 2);
        assert_eq!(s.seed, 7);
        assert_eq!(
            serde_json::to_value(s.method()).unwrap()["supervised"]["hyperparameters"]["lora_r"],
            8
        );
    }

    #[test]
    fn errors_name_the_param() {
        let cases = [
            (json!({"model": "m"}), Some("training_file")),
            (
                json!({"model": "m", "training_file": "f", "bogus": 1}),
                Some("bogus"),
            ),
            (
                json!({"model": "m", "training_file": "f", "hyperparameters": {"n_epochs": 0}}),
                Some("hyperparameters.n_epochs"),
            ),
            (
                json!({"model": "m", "training_file": "f", "method": {"type": "supervised", "supervised": {"hyperparameters": {"lora_r": "big"}}}}),
                Some("method.supervised.hyperparameters.lora_r"),
            ),
            (
                json!({"model": "m", "training_file": "f", "learning_rate": -1}),
                Some("learning_rate"),
            ),
            (
                json!({"model": "m", "training_file": "f", "task": "translation"}),
                Some("task"),
            ),
            (
                json!({"model": "m", "dataset_url": "file:///etc/passwd"}),
                Some("dataset_url"),
            ),
            (
                json!({"model": "m", "dataset_url": "ftp://x/y"}),
                Some("dataset_url"),
            ),
            (json!({"model": 3, "training_file": "f"}), Some("model")),
            (
                json!({"model": "m", "training_file": "f", "method": {"type": "reinforcement"}}),
                Some("method.type"),
            ),
            (
                json!({"model": "m", "training_file": "f", "training_type": "full", "lora_r": 4}),
                Some("training_type"),
            ),
            (
                json!({"model": "m", "training_file": "f", "seed": 1.5}),
                Some("seed"),
            ),
            (
                json!({"model": "m", "training_file": "f", "metadata": {"a": 1}}),
                Some("metadata.a"),
            ),
            (json!([1, 2]), None),
        ];
        for (body, param) in cases {
            let err = parse(body.clone()).unwrap_err();
            assert_eq!(err.param.as_deref(), param, "{body} -> {err:?}");
        }
    }

    #[test]
    fn a_dpo_job_shows_its_method_as_openai_does() {
        let r = parse(json!({"model": "m", "training_file": "f",
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2}}}}))
        .unwrap();
        assert_eq!(r.spec.dpo, Some(Dpo { beta: 0.25 }));
        let m = serde_json::to_value(r.spec.method()).unwrap();
        assert_eq!(m["type"], "dpo");
        assert!(m.get("supervised").is_none(), "{m}");
        assert_eq!(m["dpo"]["hyperparameters"]["beta"], 0.25);
        assert_eq!(m["dpo"]["hyperparameters"]["n_epochs"], 2);
        let sft = parse(json!({"model": "m", "training_file": "f"})).unwrap();
        let m = serde_json::to_value(sft.spec.method()).unwrap();
        assert!(m.get("dpo").is_none() && m["supervised"]["hyperparameters"].get("beta").is_none());
    }

    #[test]
    fn file_urls_only_when_allowed() {
        let body = json!({"model": "m", "dataset_url": "file:///data/x.jsonl"});
        assert!(parse(body.clone()).is_err());
        let ok = parse_create_request(
            &body,
            &SpecPolicy {
                allow_file_urls: true,
            },
            1,
        )
        .unwrap();
        assert_eq!(ok.spec.dataset_url.as_deref(), Some("file:///data/x.jsonl"));
    }

    #[test]
    fn spec_round_trips_through_json() {
        let r = parse(json!({"model": "m", "training_file": "f", "freeze_layers": 2, "freeze_patterns": "wte,wpe"})).unwrap();
        let v = serde_json::to_value(&r.spec).unwrap();
        let back: JobSpec = serde_json::from_value(v).unwrap();
        assert_eq!(back, r.spec);
        assert_eq!(back.freeze.patterns, vec!["wte", "wpe"]);
    }
}
