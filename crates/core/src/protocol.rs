//! The process boundary between a worker and its `tuna-trainer` child, as types both sides
//! compile against.
//!
//! - stdout: one [`TrainerEvent`] per line, serialised as a JSON object tagged by `event`
//!   (`{"event":"metrics","step":3,...}`); logs go to stderr. Exactly one terminal event
//!   ([`TrainerEvent::is_terminal`]) ends a run that was not aborted.
//! - stdin: one [`ControlLine`] per line (`pause`, `cancel`). EOF means the worker is gone: the
//!   trainer stops at once without a checkpoint and prints nothing more.
//! - exit status: [`EXIT_OK`] after `done` / `paused` / `cancelled`, [`EXIT_JOB_ERROR`] after
//!   `error`, [`EXIT_ABORTED`] after stdin EOF; anything else (a signal, a panic) is a crash.
//!
//! Adding a field is compatible in both directions only where it is optional (`Option` with
//! `#[serde(default)]`); the worker and the trainer ship from one build, so the two sides never
//! disagree in practice, and a line that does not parse is logged and ignored.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Exit status after a terminal `done`, `paused` or `cancelled` event.
pub const EXIT_OK: i32 = 0;
/// Exit status after an `error` event.
pub const EXIT_JOB_ERROR: i32 = 2;
/// Exit status after stdin reached EOF (nothing is printed).
pub const EXIT_ABORTED: i32 = 3;

/// What the trainer is busy with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    LoadingModel,
    Tokenizing,
    Training,
    Evaluating,
    Saving,
}

impl Phase {
    /// The wire name (`loading_model`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::LoadingModel => "loading_model",
            Phase::Tokenizing => "tokenizing",
            Phase::Training => "training",
            Phase::Evaluating => "evaluating",
            Phase::Saving => "saving",
        }
    }

    /// How a job event names the phase.
    pub fn label(self) -> &'static str {
        match self {
            Phase::LoadingModel => "Loading the base model",
            Phase::Tokenizing => "Tokenizing the data",
            Phase::Training => "Training",
            Phase::Evaluating => "Evaluating",
            Phase::Saving => "Saving the model",
        }
    }
}

/// What tokenization did to a file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataStats {
    pub examples: usize,
    pub truncated: usize,
    /// Causal examples with no target left after truncation.
    pub dropped: usize,
    pub tokens: usize,
    pub target_tokens: usize,
}

/// The `data` event: what tokenization produced (after the validation split).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataReport {
    pub train: DataStats,
    pub valid: Option<DataStats>,
    /// Sequence classification: the label names, in id order.
    pub labels: Option<Vec<String>>,
    pub total_steps: u64,
    pub notes: Vec<String>,
}

/// Result of one evaluation pass.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub valid_loss: f64,
    /// Causal LM: share of target tokens predicted exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_mean_token_accuracy: Option<f64>,
    /// Classification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_accuracy: Option<f64>,
    /// Classification and multi-label: the mean of the per-label F1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_macro_f1: Option<f64>,
    /// Multi-label: F1 over all (example, label) decisions, each label predicted at sigmoid > 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_micro_f1: Option<f64>,
    /// Multi-label: share of examples whose label set is predicted exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_subset_accuracy: Option<f64>,
    /// Regression: root mean squared error (`valid_loss` is the mean squared error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_rmse: Option<f64>,
    /// Regression: Pearson and Spearman correlation of predictions and targets (None where
    /// undefined, e.g. constant predictions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_pearson: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_spearman: Option<f64>,
    /// Token classification: entity-level precision, recall and F1 over the validation rows'
    /// words (seqeval's defaults: entities read from IOB/IOBES tags, micro-averaged), as
    /// transformers' NER examples report them; `valid_accuracy` is the share of words tagged
    /// right.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_precision: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_recall: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_f1: Option<f64>,
    /// Question answering: SQuAD's exact match over the validation questions (`valid_f1` is
    /// SQuAD's token F1), each answer normalised as its evaluation script does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_exact_match: Option<f64>,
    /// DPO, named as TRL names them: the mean over the validation pairs of the preferred
    /// completion's reward β(log π(chosen) - log π_ref(chosen)), of the rejected one's, of
    /// whether the preferred one's is higher, and of the difference of the two.
    #[serde(
        default,
        rename = "valid_rewards/chosen",
        skip_serializing_if = "Option::is_none"
    )]
    pub valid_rewards_chosen: Option<f64>,
    #[serde(
        default,
        rename = "valid_rewards/rejected",
        skip_serializing_if = "Option::is_none"
    )]
    pub valid_rewards_rejected: Option<f64>,
    #[serde(
        default,
        rename = "valid_rewards/accuracies",
        skip_serializing_if = "Option::is_none"
    )]
    pub valid_rewards_accuracies: Option<f64>,
    #[serde(
        default,
        rename = "valid_rewards/margins",
        skip_serializing_if = "Option::is_none"
    )]
    pub valid_rewards_margins: Option<f64>,
    pub valid_examples: usize,
}

impl EvalMetrics {
    /// The task's accuracy: token accuracy for causal LM, label accuracy for classification.
    pub fn accuracy(&self) -> Option<f64> {
        self.valid_mean_token_accuracy.or(self.valid_accuracy)
    }
}

/// One logged optimiser step (the `metrics` event).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub total_steps: u64,
    /// Fractional epoch (1.5 = half way through the second epoch).
    pub epoch: f64,
    /// Mean loss per target of the logged step.
    pub train_loss: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_mean_token_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_accuracy: Option<f64>,
    /// DPO: the share of the logged steps' pairs whose preferred completion has the higher
    /// reward, and their mean reward margin (TRL's `rewards/accuracies` and `rewards/margins`).
    #[serde(
        default,
        rename = "train_rewards/accuracies",
        skip_serializing_if = "Option::is_none"
    )]
    pub train_rewards_accuracies: Option<f64>,
    #[serde(
        default,
        rename = "train_rewards/margins",
        skip_serializing_if = "Option::is_none"
    )]
    pub train_rewards_margins: Option<f64>,
    pub learning_rate: f64,
    /// Before clipping.
    pub grad_norm: f64,
    /// Non-padding tokens per second since the previous log.
    pub tokens_per_second: f64,
    pub examples_per_second: f64,
    pub elapsed_seconds: f64,
    pub eta_seconds: f64,
    /// Tokens (non-padding) seen so far.
    pub trained_tokens: u64,
    /// Peak memory so far: on CPU the process's peak resident memory (`VmHWM`); on CUDA None
    /// (the caching allocator's statistics are not reachable through tch 0.24).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
}

impl StepMetrics {
    /// The task's accuracy: token accuracy for causal LM, label accuracy for classification.
    pub fn accuracy(&self) -> Option<f64> {
        self.train_mean_token_accuracy.or(self.train_accuracy)
    }
}

/// Why a run failed, as the job's `error.code` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainerErrorCode {
    OutOfMemory,
    NanLoss,
    InvalidData,
    InvalidModel,
    Internal,
}

impl TrainerErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            TrainerErrorCode::OutOfMemory => "out_of_memory",
            TrainerErrorCode::NanLoss => "nan_loss",
            TrainerErrorCode::InvalidData => "invalid_data",
            TrainerErrorCode::InvalidModel => "invalid_model",
            TrainerErrorCode::Internal => "internal",
        }
    }
}

/// One line of the trainer's stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainerEvent {
    Phase {
        phase: Phase,
        message: String,
    },
    Data(DataReport),
    /// Every `log_interval` optimiser steps and at the last step.
    Metrics(StepMetrics),
    Eval {
        step: u64,
        #[serde(flatten)]
        metrics: EvalMetrics,
    },
    /// Causal LM: at an evaluation, greedy completions of a few validation prompts
    /// (`eval_samples`), each beside the answer the data gives.
    Samples {
        step: u64,
        samples: Vec<Sample>,
    },
    /// A checkpoint folder is complete on the local disk.
    Checkpoint {
        step: u64,
        path: PathBuf,
        /// The latest step and evaluation metrics.
        metrics: Map<String, Value>,
    },
    Warning {
        message: String,
    },
    // Terminal events: exactly one ends a run.
    Done {
        trained_tokens: u64,
        steps: u64,
        final_dir: PathBuf,
        metrics: Map<String, Value>,
    },
    /// A checkpoint was saved at `step` on request; the run can resume from it.
    Paused {
        checkpoint: PathBuf,
        step: u64,
    },
    Cancelled {
        step: u64,
    },
    Error {
        code: TrainerErrorCode,
        message: String,
        /// The job field the user should change (`batch_size` for out-of-memory, ...).
        param: Option<String>,
    },
}

/// One validation prompt, what the model wrote after it and what the data says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub prompt: String,
    pub completion: String,
    pub reference: String,
}

impl TrainerEvent {
    /// Parses one stdout line.
    pub fn parse(line: &str) -> Result<TrainerEvent, serde_json::Error> {
        serde_json::from_str(line)
    }

    /// The line to print (no newline).
    pub fn to_line(&self) -> String {
        // Serialising these types cannot fail: every map key is a string.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Whether this event ends the run.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            TrainerEvent::Done { .. }
                | TrainerEvent::Paused { .. }
                | TrainerEvent::Cancelled { .. }
                | TrainerEvent::Error { .. }
        )
    }
}

/// One line of the trainer's stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlLine {
    /// Save a checkpoint at the next step boundary, print `paused` and exit.
    Pause,
    /// Stop at the next step boundary without saving and print `cancelled`.
    Cancel,
}

impl ControlLine {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlLine::Pause => "pause",
            ControlLine::Cancel => "cancel",
        }
    }
}

impl std::str::FromStr for ControlLine {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "pause" => Ok(ControlLine::Pause),
            "cancel" => Ok(ControlLine::Cancel),
            other => Err(format!("unknown control line {other:?}")),
        }
    }
}

/// `tuna-trainer serve`, the inference process: one request per stdin line, events on stdout
/// (one JSON object per line). Requests run one at a time, in order; a failed request answers
/// an `error` event and the process goes on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum InferRequest {
    /// Text completions of one or more prompts (OpenAI's `/v1/completions` and
    /// `/v1/chat/completions` map onto it).
    Complete(CompleteRequest),
    /// Finish and exit.
    Shutdown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompleteRequest {
    /// Echoed in every event of the request.
    pub id: String,
    /// A model folder: a base, a full fine-tune's export, or a LoRA adapter's base.
    pub model_dir: PathBuf,
    /// A PEFT LoRA adapter folder applied over `model_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_dir: Option<PathBuf>,
    pub prompts: Vec<InferPrompt>,
    pub max_tokens: u32,
    /// 0: greedy.
    #[serde(default)]
    pub temperature: f64,
    #[serde(default = "one")]
    pub top_p: f64,
    /// 0: no limit.
    #[serde(default)]
    pub top_k: u32,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub stop: Vec<String>,
    /// Send `delta` events as the texts grow.
    #[serde(default)]
    pub stream: bool,
}

fn one() -> f64 {
    1.0
}

/// A prompt: plain text, or chat messages laid out with the model's chat template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InferPrompt {
    Text(String),
    Chat(Vec<ChatTurn>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatTurn {
    pub role: String,
    pub content: String,
}

/// What the inference process prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum InferEvent {
    /// Started, reading requests.
    Ready {
        device: String,
    },
    /// A model was loaded (`bytes`: its weights in memory) or, to stay within the memory
    /// budget, evicted.
    Loaded {
        model_dir: PathBuf,
        bytes: u64,
    },
    Evicted {
        model_dir: PathBuf,
    },
    /// More text of prompt `index` (streaming requests).
    Delta {
        id: String,
        index: usize,
        text: String,
    },
    /// The request's texts, in prompt order.
    Done {
        id: String,
        choices: Vec<InferChoice>,
    },
    Error {
        id: Option<String>,
        /// `model_not_found`, `invalid_request`, `insufficient_memory`, `inference_error`.
        code: String,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferChoice {
    pub text: String,
    /// `stop` or `length`, as OpenAI's.
    pub finish_reason: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_are_tagged_objects_on_the_wire() {
        let ev = TrainerEvent::Eval {
            step: 4,
            metrics: EvalMetrics {
                valid_loss: 0.5,
                valid_accuracy: Some(0.75),
                valid_examples: 8,
                ..Default::default()
            },
        };
        let v: Value = serde_json::from_str(&ev.to_line()).unwrap();
        assert_eq!(
            v,
            json!({"event": "eval", "step": 4, "valid_loss": 0.5, "valid_accuracy": 0.75, "valid_examples": 8})
        );
        assert_eq!(TrainerEvent::parse(&ev.to_line()).unwrap(), ev);
        let m = TrainerEvent::parse(r#"{"event":"metrics","step":3,"total_steps":9,"epoch":0.5,"train_loss":1.5,"learning_rate":0.1,"grad_norm":1,"tokens_per_second":2,"examples_per_second":1,"elapsed_seconds":1,"eta_seconds":2,"trained_tokens":10}"#).unwrap();
        let TrainerEvent::Metrics(m) = m else {
            panic!("{m:?}")
        };
        assert_eq!((m.step, m.train_loss), (3, 1.5));
    }

    #[test]
    fn terminal_events_and_errors() {
        assert_eq!(
            TrainerEvent::parse(
                r#"{"event":"error","code":"nan_loss","message":"m","param":"learning_rate"}"#
            )
            .unwrap(),
            TrainerEvent::Error {
                code: TrainerErrorCode::NanLoss,
                message: "m".into(),
                param: Some("learning_rate".into())
            }
        );
        assert!(TrainerEvent::parse(r#"{"event":"cancelled","step":2}"#)
            .unwrap()
            .is_terminal());
        assert!(!TrainerEvent::parse(r#"{"event":"warning","message":"w"}"#)
            .unwrap()
            .is_terminal());
        // Not JSON, an unknown event, a known event with a field missing: not events.
        for line in [
            "not json",
            r#"{"event":"bogus"}"#,
            r#"{"event":"checkpoint","step":1}"#,
        ] {
            assert!(TrainerEvent::parse(line).is_err(), "{line}");
        }
    }

    #[test]
    fn control_lines_round_trip() {
        for c in [ControlLine::Pause, ControlLine::Cancel] {
            assert_eq!(c.as_str().parse::<ControlLine>(), Ok(c));
        }
        assert!("stop".parse::<ControlLine>().is_err());
    }
}
