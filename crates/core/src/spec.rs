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

/// What the model is trained to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    CausalLm,
    SequenceClassification,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::CausalLm => "causal_lm",
            Task::SequenceClassification => "sequence_classification",
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
    /// Evaluate every N optimiser steps (0: at the end of each epoch).
    pub eval_interval: u32,
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
}

/// A request that cannot be accepted: `param` names the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub message: String,
    pub param: Option<String>,
}

impl SpecError {
    fn new(param: &str, message: impl Into<String>) -> Self {
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
}

const TOP_LEVEL: [&str; 9] = [
    "model",
    "training_file",
    "validation_file",
    "method",
    "hyperparameters",
    "suffix",
    "seed",
    "metadata",
    "integrations",
];

/// tuna's extension keys (top level or inside the hyperparameters object).
pub const EXTENSIONS: [&str; 28] = [
    "dataset_url",
    "validation_dataset_url",
    "task",
    "learning_rate",
    "lr_scheduler",
    "warmup_ratio",
    "warmup_steps",
    "weight_decay",
    "gradient_accumulation_steps",
    "max_seq_length",
    "max_grad_norm",
    "eval_interval",
    "checkpoint_interval",
    "early_stopping_patience",
    "validation_split",
    "max_steps",
    "training_type",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "freeze_embeddings",
    "freeze_layers",
    "freeze_patterns",
    "merge_lora",
    "packing",
    "precision",
    "device",
];

/// Extensions that are not training knobs (job-level placement).
const JOB_EXTENSIONS: [&str; 2] = ["priority", "log_interval"];

const OPENAI_HP: [&str; 3] = ["batch_size", "learning_rate_multiplier", "n_epochs"];

/// Parses and validates a create request body. `seed` is used when the request has none.
pub fn parse_create_request(
    body: &Value,
    policy: &SpecPolicy,
    default_seed: u64,
) -> Result<CreateRequest, SpecError> {
    let Value::Object(obj) = body else {
        return Err(SpecError {
            message: "the request body must be a JSON object".into(),
            param: None,
        });
    };
    for key in obj.keys() {
        if !TOP_LEVEL.contains(&key.as_str())
            && !EXTENSIONS.contains(&key.as_str())
            && !JOB_EXTENSIONS.contains(&key.as_str())
        {
            return Err(SpecError::new(
                key,
                format!("unrecognised request argument supplied: {key}"),
            ));
        }
    }

    // Gather knobs: top-level extensions, then hyperparameters objects (method wins over the
    // deprecated top-level `hyperparameters`). The same knob given twice with different values
    // is an error.
    let mut knobs: Map<String, Value> = Map::new();
    let mut origin: std::collections::HashMap<String, String> = Default::default();
    for key in EXTENSIONS.iter().chain(JOB_EXTENSIONS.iter()) {
        if let Some(v) = obj.get(*key) {
            knobs.insert(key.to_string(), v.clone());
            origin.insert(key.to_string(), key.to_string());
        }
    }
    let mut hp_sources: Vec<(String, &Map<String, Value>)> = Vec::new();
    if let Some(hp) = obj.get("hyperparameters") {
        if !hp.is_null() {
            let Value::Object(hp) = hp else {
                return Err(SpecError::new(
                    "hyperparameters",
                    "`hyperparameters` must be an object",
                ));
            };
            hp_sources.push(("hyperparameters".into(), hp));
        }
    }
    if let Some(method) = obj.get("method") {
        if !method.is_null() {
            let Value::Object(m) = method else {
                return Err(SpecError::new("method", "`method` must be an object"));
            };
            match m.get("type") {
                Some(Value::String(t)) if t == "supervised" => {}
                Some(Value::String(t)) => {
                    return Err(SpecError::new(
                        "method.type",
                        format!("method type '{t}' is not supported; tuna supports 'supervised'"),
                    ))
                }
                _ => {
                    return Err(SpecError::new(
                        "method.type",
                        "`method.type` is required and must be 'supervised'",
                    ))
                }
            }
            for k in m.keys() {
                if k != "type" && k != "supervised" {
                    return Err(SpecError::new(
                        &format!("method.{k}"),
                        format!("unrecognised method argument: {k}"),
                    ));
                }
            }
            if let Some(sup) = m.get("supervised") {
                if !sup.is_null() {
                    let Value::Object(sup) = sup else {
                        return Err(SpecError::new(
                            "method.supervised",
                            "`method.supervised` must be an object",
                        ));
                    };
                    for k in sup.keys() {
                        if k != "hyperparameters" {
                            return Err(SpecError::new(
                                &format!("method.supervised.{k}"),
                                format!("unrecognised argument: method.supervised.{k}"),
                            ));
                        }
                    }
                    if let Some(hp) = sup.get("hyperparameters") {
                        if !hp.is_null() {
                            let Value::Object(hp) = hp else {
                                return Err(SpecError::new(
                                    "method.supervised.hyperparameters",
                                    "`hyperparameters` must be an object",
                                ));
                            };
                            hp_sources.push(("method.supervised.hyperparameters".into(), hp));
                        }
                    }
                }
            }
        }
    }
    for (prefix, hp) in hp_sources {
        for (k, v) in hp {
            let param = format!("{prefix}.{k}");
            if !OPENAI_HP.contains(&k.as_str())
                && !EXTENSIONS.contains(&k.as_str())
                && !JOB_EXTENSIONS.contains(&k.as_str())
            {
                return Err(SpecError::new(
                    &param,
                    format!("unrecognised hyperparameter: {k}"),
                ));
            }
            if let Some(prev) = knobs.get(k) {
                if prev != v
                    && !(prefix.starts_with("method")
                        && origin
                            .get(k)
                            .is_some_and(|o| o.starts_with("hyperparameters.")))
                {
                    return Err(SpecError::new(
                        &param,
                        format!("`{k}` is given twice with different values"),
                    ));
                }
            }
            knobs.insert(k.clone(), v.clone());
            origin.insert(k.clone(), param);
        }
    }
    let p = |k: &str| origin.get(k).cloned().unwrap_or_else(|| k.to_string());

    let model = req_string(obj, "model")?;
    if model.trim().is_empty() {
        return Err(SpecError::new("model", "`model` must not be empty"));
    }
    let training_file = opt_string(obj, "training_file")?;
    let validation_file = opt_string(obj, "validation_file")?;
    let dataset_url = opt_string_knob(&knobs, "dataset_url", &p("dataset_url"))?;
    let validation_dataset_url = opt_string_knob(
        &knobs,
        "validation_dataset_url",
        &p("validation_dataset_url"),
    )?;
    match (&training_file, &dataset_url) {
        (None, None) => {
            return Err(SpecError::new(
                "training_file",
                "give `training_file` (an uploaded file id) or `dataset_url`",
            ))
        }
        (Some(_), Some(_)) => {
            return Err(SpecError::new(
                "dataset_url",
                "give either `training_file` or `dataset_url`, not both",
            ))
        }
        _ => {}
    }
    if validation_file.is_some() && validation_dataset_url.is_some() {
        return Err(SpecError::new(
            "validation_dataset_url",
            "give either `validation_file` or `validation_dataset_url`, not both",
        ));
    }
    for (name, url) in [
        ("dataset_url", &dataset_url),
        ("validation_dataset_url", &validation_dataset_url),
    ] {
        if let Some(url) = url {
            check_dataset_url(url, policy).map_err(|m| SpecError::new(&p(name), m))?;
        }
    }

    let suffix = opt_string(obj, "suffix")?;
    if let Some(s) = &suffix {
        if s.is_empty() || s.chars().count() > 64 {
            return Err(SpecError::new(
                "suffix",
                "`suffix` must be 1 to 64 characters",
            ));
        }
    }
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => default_seed,
        Some(v) => int_in(v, "seed", 0, 2_147_483_647)? as u64,
    };
    let metadata = match obj.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            if m.len() > 16 {
                return Err(SpecError::new(
                    "metadata",
                    "`metadata` holds at most 16 pairs",
                ));
            }
            for (k, v) in m {
                let Value::String(s) = v else {
                    return Err(SpecError::new(
                        &format!("metadata.{k}"),
                        "metadata values must be strings",
                    ));
                };
                if k.chars().count() > 64 || s.chars().count() > 512 {
                    return Err(SpecError::new(
                        &format!("metadata.{k}"),
                        "metadata keys are at most 64 characters and values at most 512",
                    ));
                }
            }
            Some(m.clone())
        }
        Some(_) => {
            return Err(SpecError::new(
                "metadata",
                "`metadata` must be an object of strings",
            ))
        }
    };
    let integrations = match obj.get("integrations") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Array(items)) => {
            if items.len() > 5 {
                return Err(SpecError::new("integrations", "at most 5 integrations"));
            }
            Some(v.clone())
        }
        Some(_) => {
            return Err(SpecError::new(
                "integrations",
                "`integrations` must be a list",
            ))
        }
    };

    let task = match knobs.get("task") {
        None | Some(Value::Null) => Task::CausalLm,
        Some(Value::String(s)) if s == "causal_lm" => Task::CausalLm,
        Some(Value::String(s)) if s == "sequence_classification" => Task::SequenceClassification,
        Some(_) => {
            return Err(SpecError::new(
                &p("task"),
                "`task` must be 'causal_lm' or 'sequence_classification'",
            ))
        }
    };
    let lora_given = [
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
    ]
    .iter()
    .any(|k| knobs.get(*k).is_some_and(|v| !v.is_null()));
    let training_type = match knobs.get("training_type") {
        None | Some(Value::Null) => {
            if lora_given {
                TrainingType::Lora
            } else {
                TrainingType::Full
            }
        }
        Some(Value::String(s)) if s == "full" => TrainingType::Full,
        Some(Value::String(s)) if s == "lora" => TrainingType::Lora,
        Some(_) => {
            return Err(SpecError::new(
                &p("training_type"),
                "`training_type` must be 'full' or 'lora'",
            ))
        }
    };
    if training_type == TrainingType::Full && lora_given {
        return Err(SpecError::new(
            &p("training_type"),
            "LoRA settings were given but `training_type` is 'full'",
        ));
    }

    let n_epochs = auto_int(&knobs, "n_epochs", &p("n_epochs"), 1, 50)?.unwrap_or(3) as u32;
    let batch_size = auto_int(&knobs, "batch_size", &p("batch_size"), 1, 256)?.unwrap_or(8) as u32;
    let lrm = auto_float(
        &knobs,
        "learning_rate_multiplier",
        &p("learning_rate_multiplier"),
        0.0,
        100.0,
        false,
    )?
    .unwrap_or(1.0);
    let base_lr = match (training_type, task) {
        (TrainingType::Lora, _) => 2e-4,
        (TrainingType::Full, Task::SequenceClassification) => 5e-5,
        (TrainingType::Full, Task::CausalLm) => 2e-5,
    };
    let learning_rate = auto_float(
        &knobs,
        "learning_rate",
        &p("learning_rate"),
        0.0,
        1.0,
        false,
    )?
    .unwrap_or(base_lr * lrm);
    let lr_scheduler = match knobs.get("lr_scheduler") {
        None | Some(Value::Null) => LrSchedule::Linear,
        Some(Value::String(s)) if s == "auto" || s == "linear" => LrSchedule::Linear,
        Some(Value::String(s)) if s == "constant" => LrSchedule::Constant,
        Some(Value::String(s)) if s == "cosine" => LrSchedule::Cosine,
        Some(_) => {
            return Err(SpecError::new(
                &p("lr_scheduler"),
                "`lr_scheduler` must be 'constant', 'linear' or 'cosine'",
            ))
        }
    };
    let warmup_ratio =
        auto_float(&knobs, "warmup_ratio", &p("warmup_ratio"), 0.0, 1.0, true)?.unwrap_or(0.0);
    let warmup_steps =
        auto_int(&knobs, "warmup_steps", &p("warmup_steps"), 0, 1_000_000)?.unwrap_or(0) as u32;
    let weight_decay =
        auto_float(&knobs, "weight_decay", &p("weight_decay"), 0.0, 1.0, true)?.unwrap_or(0.0);
    let gradient_accumulation_steps = auto_int(
        &knobs,
        "gradient_accumulation_steps",
        &p("gradient_accumulation_steps"),
        1,
        1024,
    )?
    .unwrap_or(1) as u32;
    let max_seq_length = auto_int(&knobs, "max_seq_length", &p("max_seq_length"), 8, 131_072)?
        .unwrap_or(match task {
            Task::CausalLm => 1024,
            Task::SequenceClassification => 128,
        }) as u32;
    let max_grad_norm =
        auto_float(&knobs, "max_grad_norm", &p("max_grad_norm"), 0.0, 1e6, true)?.unwrap_or(1.0);
    let eval_interval =
        auto_int(&knobs, "eval_interval", &p("eval_interval"), 0, 10_000_000)?.unwrap_or(0) as u32;
    let checkpoint_interval = auto_int(
        &knobs,
        "checkpoint_interval",
        &p("checkpoint_interval"),
        0,
        10_000_000,
    )?
    .unwrap_or(0) as u32;
    let early_stopping_patience = auto_int(
        &knobs,
        "early_stopping_patience",
        &p("early_stopping_patience"),
        0,
        1000,
    )?
    .unwrap_or(0) as u32;
    let validation_split = auto_float(
        &knobs,
        "validation_split",
        &p("validation_split"),
        0.0,
        0.5,
        true,
    )?
    .unwrap_or(0.1);
    let max_steps =
        auto_int(&knobs, "max_steps", &p("max_steps"), 0, 100_000_000)?.unwrap_or(0) as u32;
    let log_interval =
        auto_int(&knobs, "log_interval", &p("log_interval"), 1, 100_000)?.unwrap_or(10) as u32;
    let priority = auto_int(&knobs, "priority", &p("priority"), -1000, 1000)?.unwrap_or(0) as i32;

    let lora = match training_type {
        TrainingType::Full => None,
        TrainingType::Lora => {
            let r = auto_int(&knobs, "lora_r", &p("lora_r"), 1, 1024)?.unwrap_or(16) as u32;
            let alpha = auto_float(&knobs, "lora_alpha", &p("lora_alpha"), 0.0, 1e6, false)?
                .unwrap_or(2.0 * r as f64);
            let dropout = auto_float(&knobs, "lora_dropout", &p("lora_dropout"), 0.0, 0.99, true)?
                .unwrap_or(0.05);
            let target_modules = match knobs.get("lora_target_modules") {
                None | Some(Value::Null) => vec!["all-linear".to_string()],
                Some(Value::String(s)) if s == "auto" || s == "all-linear" => {
                    vec!["all-linear".to_string()]
                }
                Some(v) => string_list(v, &p("lora_target_modules"))?,
            };
            Some(Lora {
                r,
                alpha,
                dropout,
                target_modules,
            })
        }
    };
    let freeze = Freeze {
        embeddings: bool_knob(&knobs, "freeze_embeddings", &p("freeze_embeddings"))?
            .unwrap_or(false),
        layers: auto_int(&knobs, "freeze_layers", &p("freeze_layers"), 0, 10_000)?.unwrap_or(0)
            as u32,
        patterns: match knobs.get("freeze_patterns") {
            None | Some(Value::Null) => vec![],
            Some(v) => string_list(v, &p("freeze_patterns"))?,
        },
    };
    if training_type == TrainingType::Lora
        && (freeze.embeddings || freeze.layers > 0 || !freeze.patterns.is_empty())
    {
        return Err(SpecError::new(
            &p("freeze_layers"),
            "freezing applies to full fine-tuning; under LoRA every base weight is already frozen",
        ));
    }
    let merge_lora = bool_knob(&knobs, "merge_lora", &p("merge_lora"))?.unwrap_or(false);
    let packing = bool_knob(&knobs, "packing", &p("packing"))?.unwrap_or(false);
    let precision = match knobs.get("precision") {
        None | Some(Value::Null) => Precision::Auto,
        Some(Value::String(s)) if s == "auto" => Precision::Auto,
        Some(Value::String(s)) if s == "fp32" => Precision::Fp32,
        Some(Value::String(s)) if s == "bf16" => Precision::Bf16,
        Some(_) => {
            return Err(SpecError::new(
                &p("precision"),
                "`precision` must be 'auto', 'fp32' or 'bf16'",
            ))
        }
    };
    let device = match knobs.get("device") {
        None | Some(Value::Null) => Device::Auto,
        Some(Value::String(s)) if s == "auto" => Device::Auto,
        Some(Value::String(s)) if s == "cpu" => Device::Cpu,
        Some(Value::String(s)) if s == "cuda" => Device::Cuda,
        Some(_) => {
            return Err(SpecError::new(
                &p("device"),
                "`device` must be 'auto', 'cpu' or 'cuda'",
            ))
        }
    };

    let spec = JobSpec {
        model,
        task,
        training_file,
        validation_file,
        dataset_url,
        validation_dataset_url,
        seed,
        n_epochs,
        batch_size,
        learning_rate_multiplier: lrm,
        learning_rate,
        lr_scheduler,
        warmup_ratio,
        warmup_steps,
        weight_decay,
        gradient_accumulation_steps,
        max_seq_length,
        max_grad_norm,
        eval_interval,
        checkpoint_interval,
        early_stopping_patience,
        validation_split,
        max_steps,
        training_type,
        lora,
        freeze,
        merge_lora,
        packing,
        precision,
        device,
        log_interval,
    };
    Ok(CreateRequest {
        spec,
        suffix,
        metadata,
        integrations,
        priority,
    })
}

/// OpenAI's `hyperparameters` object as returned, resolved.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct OpenAiHyperparameters {
    pub batch_size: u32,
    pub learning_rate_multiplier: f64,
    pub n_epochs: u32,
}

/// `method.supervised.hyperparameters` as returned: OpenAI's three plus every tuna knob,
/// resolved (so a user sees exactly what runs). The LoRA keys are present for LoRA jobs only.
#[derive(Debug, Clone, Serialize)]
pub struct MethodHyperparameters<'a> {
    #[serde(flatten)]
    pub openai: OpenAiHyperparameters,
    pub task: Task,
    pub learning_rate: f64,
    pub lr_scheduler: LrSchedule,
    pub warmup_ratio: f64,
    pub warmup_steps: u32,
    pub weight_decay: f64,
    pub gradient_accumulation_steps: u32,
    pub max_seq_length: u32,
    pub max_grad_norm: f64,
    pub eval_interval: u32,
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
}

/// The `method` object as returned: `{"type": "supervised", "supervised": {"hyperparameters": ...}}`.
#[derive(Debug, Clone, Serialize)]
pub struct Method<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub supervised: Supervised<'a>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Supervised<'a> {
    pub hyperparameters: MethodHyperparameters<'a>,
}

impl JobSpec {
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
            task: self.task,
            learning_rate: self.learning_rate,
            lr_scheduler: self.lr_scheduler,
            warmup_ratio: self.warmup_ratio,
            warmup_steps: self.warmup_steps,
            weight_decay: self.weight_decay,
            gradient_accumulation_steps: self.gradient_accumulation_steps,
            max_seq_length: self.max_seq_length,
            max_grad_norm: self.max_grad_norm,
            eval_interval: self.eval_interval,
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
            precision: self.precision,
            device: self.device,
            log_interval: self.log_interval,
            lora_r: lora.map(|l| l.r),
            lora_alpha: lora.map(|l| l.alpha),
            lora_dropout: lora.map(|l| l.dropout),
            lora_target_modules: lora.map(|l| l.target_modules.as_slice()),
        }
    }

    /// The `method` object as returned.
    pub fn method(&self) -> Method<'_> {
        Method {
            kind: "supervised",
            supervised: Supervised {
                hyperparameters: self.method_hyperparameters(),
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

fn req_string(obj: &Map<String, Value>, key: &str) -> Result<String, SpecError> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(SpecError::new(key, format!("`{key}` must be a string"))),
        None => Err(SpecError::new(key, format!("`{key}` is required"))),
    }
}

fn opt_string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, SpecError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(_) => Err(SpecError::new(
            key,
            format!("`{key}` must be a non-empty string"),
        )),
    }
}

fn opt_string_knob(
    knobs: &Map<String, Value>,
    key: &str,
    param: &str,
) -> Result<Option<String>, SpecError> {
    match knobs.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(_) => Err(SpecError::new(
            param,
            format!("`{key}` must be a non-empty string"),
        )),
    }
}

fn int_in(v: &Value, param: &str, min: i64, max: i64) -> Result<i64, SpecError> {
    let n = match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                .map(|f| f as i64)
        }),
        _ => None,
    };
    match n {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        Some(n) => Err(SpecError::new(
            param,
            format!("`{param}` must be between {min} and {max}, got {n}"),
        )),
        None => Err(SpecError::new(
            param,
            format!("`{param}` must be an integer"),
        )),
    }
}

/// `"auto"`, null or absent → None; otherwise an integer in range.
fn auto_int(
    knobs: &Map<String, Value>,
    key: &str,
    param: &str,
    min: i64,
    max: i64,
) -> Result<Option<i64>, SpecError> {
    match knobs.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(v @ Value::Number(_)) => int_in(v, param, min, max).map(Some),
        Some(_) => Err(SpecError::new(
            param,
            format!("`{key}` must be \"auto\" or an integer between {min} and {max}"),
        )),
    }
}

/// `"auto"`, null or absent → None; otherwise a finite number in (min, max] (or [min, max]
/// with `min_inclusive`).
fn auto_float(
    knobs: &Map<String, Value>,
    key: &str,
    param: &str,
    min: f64,
    max: f64,
    min_inclusive: bool,
) -> Result<Option<f64>, SpecError> {
    match knobs.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(Value::Number(n)) => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            let above = if min_inclusive { f >= min } else { f > min };
            if f.is_finite() && above && f <= max {
                Ok(Some(f))
            } else {
                let lo = if min_inclusive { "[" } else { "(" };
                Err(SpecError::new(
                    param,
                    format!("`{key}` must be in {lo}{min}, {max}], got {f}"),
                ))
            }
        }
        Some(_) => Err(SpecError::new(
            param,
            format!("`{key}` must be \"auto\" or a number"),
        )),
    }
}

fn bool_knob(
    knobs: &Map<String, Value>,
    key: &str,
    param: &str,
) -> Result<Option<bool>, SpecError> {
    match knobs.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(SpecError::new(
            param,
            format!("`{key}` must be true or false"),
        )),
    }
}

fn string_list(v: &Value, param: &str) -> Result<Vec<String>, SpecError> {
    let items: Vec<String> = match v {
        Value::String(s) => s
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect(),
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::String(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
                _ => Err(SpecError::new(param, "must be a list of non-empty strings")),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(SpecError::new(param, "must be a list of strings")),
    };
    if items.is_empty() {
        return Err(SpecError::new(param, "must name at least one module"));
    }
    Ok(items)
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
                json!({"model": "m", "training_file": "f", "method": {"type": "dpo"}}),
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
