//! Parsing a create request in three steps:
//!
//! 1. [`gather`]: check the keys and merge the three places a knob may come from (top level,
//!    the deprecated `hyperparameters`, `method.supervised.hyperparameters`), remembering for
//!    each knob the path it was given at (`param` of its errors).
//! 2. Deserialise the merged knobs into [`Knobs`], where each knob is declared once with its
//!    JSON type ([`Knob`]: absent, `"auto"`, a value of the type, or something else).
//! 3. [`resolve`]: defaults and ranges, into the [`JobSpec`].
//!
//! The error messages are those docs/job-spec.md lists (crates/core/tests/create_requests.rs
//! checks them against a recorded table).

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_aux::serde_introspection::serde_introspect;
use serde_json::{Map, Value};

use super::{
    check_dataset_url, CreateRequest, Device, Dpo, Freeze, JobSpec, Lora, LrSchedule, Moments, Nf4,
    Precision, Quantization, SpecError, SpecPolicy, Task, TrainingType,
};

/// OpenAI's top-level fields (the knobs of [`Knobs`] may stand at the top level too).
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

/// OpenAI's hyperparameters (its three, and DPO's `beta`): only inside a hyperparameters
/// object.
const OPENAI_HP: [&str; 4] = ["batch_size", "learning_rate_multiplier", "n_epochs", "beta"];

/// Every knob a request may give, each once. Field names are the request's keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Knobs {
    // OpenAI's hyperparameters.
    n_epochs: Knob<Int>,
    batch_size: Knob<Int>,
    learning_rate_multiplier: Knob<f64>,
    /// `method.dpo.hyperparameters.beta`.
    beta: Knob<f64>,
    // tuna's extensions.
    dataset_url: Knob<Text>,
    validation_dataset_url: Knob<Text>,
    task: Knob<Choice<Task>>,
    learning_rate: Knob<f64>,
    lr_scheduler: Knob<Choice<LrSchedule>>,
    warmup_ratio: Knob<f64>,
    warmup_steps: Knob<Int>,
    weight_decay: Knob<f64>,
    gradient_accumulation_steps: Knob<Int>,
    max_seq_length: Knob<Int>,
    max_grad_norm: Knob<f64>,
    doc_stride: Knob<Int>,
    eval_interval: Knob<Int>,
    eval_samples: Knob<Int>,
    checkpoint_interval: Knob<Int>,
    early_stopping_patience: Knob<Int>,
    validation_split: Knob<f64>,
    max_steps: Knob<Int>,
    training_type: Knob<Choice<TrainingType>>,
    lora_r: Knob<Int>,
    lora_alpha: Knob<f64>,
    lora_dropout: Knob<f64>,
    lora_target_modules: Knob<Value>,
    quantization: Knob<Choice<Quantization>>,
    double_quantization: Knob<bool>,
    freeze_embeddings: Knob<bool>,
    freeze_layers: Knob<Int>,
    freeze_patterns: Knob<Value>,
    merge_lora: Knob<bool>,
    packing: Knob<bool>,
    gradient_checkpointing: Knob<bool>,
    optimizer_moments: Knob<Choice<Moments>>,
    precision: Knob<Choice<Precision>>,
    device: Knob<Choice<Device>>,
    log_interval: Knob<Int>,
    // Job placement rather than training.
    priority: Knob<Int>,
}

/// tuna's extension keys: every knob but OpenAI's three (top level or in a hyperparameters
/// object).
fn extensions() -> impl Iterator<Item = &'static str> {
    serde_introspect::<Knobs>()
        .iter()
        .copied()
        .filter(|k| !OPENAI_HP.contains(k))
}

fn is_knob(key: &str) -> bool {
    serde_introspect::<Knobs>().contains(&key)
}

/// A knob as the request gave it, and where (`param`: `lora_r`,
/// `method.supervised.hyperparameters.lora_r`, ...; the key itself when absent).
#[derive(Debug)]
struct Knob<T> {
    param: String,
    given: Given<T>,
}

#[derive(Debug)]
enum Given<T> {
    /// Absent or null.
    Absent,
    /// The string `"auto"` where the type has no value of that name.
    Auto,
    Is(T),
    /// Of another JSON type.
    Wrong,
}

/// How a knob's JSON value reads as `Self`.
trait FromJson: Sized {
    fn from_json(v: Value) -> Given<Self>;
}

/// A number that should be an integer (`None`: it has a fraction, or is out of i64's range).
#[derive(Debug)]
struct Int(Option<i64>);

impl FromJson for Int {
    fn from_json(v: Value) -> Given<Self> {
        match v {
            Value::Number(n) => Given::Is(Int(n.as_i64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                    .map(|f| f as i64)
            }))),
            other => auto_or_wrong(other),
        }
    }
}

impl FromJson for f64 {
    fn from_json(v: Value) -> Given<Self> {
        match v {
            Value::Number(n) => Given::Is(n.as_f64().unwrap_or(f64::NAN)),
            other => auto_or_wrong(other),
        }
    }
}

impl FromJson for bool {
    fn from_json(v: Value) -> Given<Self> {
        match v {
            Value::Bool(b) => Given::Is(b),
            v => auto_or_wrong(v),
        }
    }
}

/// A non-empty string.
#[derive(Debug)]
struct Text(String);

impl FromJson for Text {
    fn from_json(v: Value) -> Given<Self> {
        match v {
            Value::String(s) if !s.is_empty() => Given::Is(Text(s)),
            _ => Given::Wrong,
        }
    }
}

/// One of a unit enum's snake_case names (its serde names).
#[derive(Debug)]
struct Choice<T>(T);

impl<T: DeserializeOwned> FromJson for Choice<T> {
    fn from_json(v: Value) -> Given<Self> {
        match serde_json::from_value::<T>(v.clone()) {
            Ok(t) => Given::Is(Choice(t)),
            Err(_) => auto_or_wrong(v),
        }
    }
}

/// Lists are checked in [`string_list`], whose messages depend on the knob.
impl FromJson for Value {
    fn from_json(v: Value) -> Given<Self> {
        Given::Is(v)
    }
}

fn auto_or_wrong<T>(v: Value) -> Given<T> {
    match v {
        Value::String(s) if s == "auto" => Given::Auto,
        _ => Given::Wrong,
    }
}

/// [`gather`] hands each knob over as `[param, value]`.
impl<'de, T: FromJson> Deserialize<'de> for Knob<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (param, value) = <(String, Value)>::deserialize(d)?;
        let given = match value {
            Value::Null => Given::Absent,
            v => T::from_json(v),
        };
        Ok(Knob { param, given })
    }
}

impl<T> Knob<T> {
    /// The knob's own name (the last part of its `param`).
    fn key(&self) -> &str {
        self.param.rsplit('.').next().unwrap_or(&self.param)
    }

    fn error(&self, message: String) -> SpecError {
        SpecError::new(&self.param, message)
    }

    fn is_given(&self) -> bool {
        !matches!(self.given, Given::Absent)
    }
}

impl Knob<Int> {
    /// Absent, null or `"auto"`: `None`; otherwise an integer in `[min, max]`.
    fn int_in(&self, min: i64, max: i64) -> Result<Option<i64>, SpecError> {
        match &self.given {
            Given::Absent | Given::Auto => Ok(None),
            Given::Is(Int(Some(n))) if (min..=max).contains(n) => Ok(Some(*n)),
            Given::Is(Int(Some(n))) => Err(self.error(format!(
                "`{}` must be between {min} and {max}, got {n}",
                self.param
            ))),
            Given::Is(Int(None)) => Err(self.error(format!("`{}` must be an integer", self.param))),
            Given::Wrong => Err(self.error(format!(
                "`{}` must be \"auto\" or an integer between {min} and {max}",
                self.key()
            ))),
        }
    }

    /// [`Knob::int_in`] for a `u32` knob, with its default.
    fn count(&self, min: u32, max: u32, default: u32) -> Result<u32, SpecError> {
        Ok(self
            .int_in(min.into(), max.into())?
            .map_or(default, |n| n as u32))
    }
}

impl Knob<f64> {
    /// Absent, null or `"auto"`: `None`; otherwise a finite number in `(min, max]` (`[min, max]`
    /// with `min_inclusive`).
    fn number_in(&self, min: f64, max: f64, min_inclusive: bool) -> Result<Option<f64>, SpecError> {
        match self.given {
            Given::Absent | Given::Auto => Ok(None),
            Given::Is(f) => {
                let above = if min_inclusive { f >= min } else { f > min };
                if f.is_finite() && above && f <= max {
                    Ok(Some(f))
                } else {
                    let lo = if min_inclusive { "[" } else { "(" };
                    Err(self.error(format!(
                        "`{}` must be in {lo}{min}, {max}], got {f}",
                        self.key()
                    )))
                }
            }
            Given::Wrong => {
                Err(self.error(format!("`{}` must be \"auto\" or a number", self.key())))
            }
        }
    }
}

impl Knob<bool> {
    /// Absent or `"auto"`: `None`.
    fn auto_flag(&self) -> Result<Option<bool>, SpecError> {
        match self.given {
            Given::Absent | Given::Auto => Ok(None),
            Given::Is(b) => Ok(Some(b)),
            Given::Wrong => {
                Err(self.error(format!("`{}` must be true, false or \"auto\"", self.key())))
            }
        }
    }

    fn flag(&self) -> Result<bool, SpecError> {
        match self.given {
            Given::Absent => Ok(false),
            Given::Is(b) => Ok(b),
            Given::Auto | Given::Wrong => {
                Err(self.error(format!("`{}` must be true or false", self.key())))
            }
        }
    }
}

impl Knob<Text> {
    fn text(&self) -> Result<Option<String>, SpecError> {
        match &self.given {
            Given::Absent => Ok(None),
            Given::Is(Text(s)) => Ok(Some(s.clone())),
            Given::Auto | Given::Wrong => {
                Err(self.error(format!("`{}` must be a non-empty string", self.key())))
            }
        }
    }
}

impl<T: Copy + DeserializeOwned> Knob<Choice<T>> {
    /// One of `T`'s names; `"auto"` only where `auto_is_default`.
    fn choice(&self, default: T, auto_is_default: bool) -> Result<T, SpecError> {
        match &self.given {
            Given::Absent => Ok(default),
            Given::Auto if auto_is_default => Ok(default),
            Given::Is(Choice(t)) => Ok(*t),
            Given::Auto | Given::Wrong => {
                let names: Vec<String> = serde_introspect::<T>()
                    .iter()
                    .map(|n| format!("'{n}'"))
                    .collect();
                let (last, rest) = names.split_last().expect("an enum has variants");
                Err(self.error(format!(
                    "`{}` must be {} or {last}",
                    self.key(),
                    rest.join(", ")
                )))
            }
        }
    }
}

impl Knob<Value> {
    /// A list of names: a JSON list of non-empty strings, or one comma-separated string.
    fn names(&self) -> Result<Option<Vec<String>>, SpecError> {
        match &self.given {
            Given::Absent => Ok(None),
            Given::Is(v) => string_list(v, &self.param).map(Some),
            Given::Auto | Given::Wrong => unreachable!("any JSON value is a Value"),
        }
    }

    fn is_text(&self, options: &[&str]) -> bool {
        matches!(&self.given, Given::Is(Value::String(s)) if options.contains(&s.as_str()))
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

/// Parses and validates a create request body. `default_seed` is used when the request has
/// none.
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
    let (knobs, dpo) = gather(obj)?;
    let knobs = Knobs::deserialize(Value::Object(knobs)).map_err(|e| SpecError {
        message: format!("internal error reading the knobs: {e}"),
        param: None,
    })?;
    let model = required_string(obj, "model")?;
    if model.trim().is_empty() {
        return Err(SpecError::new("model", "`model` must not be empty"));
    }
    let files = Files::read(obj, &knobs, policy)?;
    let suffix = optional_string(obj, "suffix")?;
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
        Some(v) => seed(v)?,
    };
    let metadata = metadata(obj.get("metadata"))?;
    let integrations = integrations(obj.get("integrations"))?;
    let (spec, priority) = resolve(&knobs, model, files, seed, dpo)?;
    Ok(CreateRequest {
        spec,
        suffix,
        metadata,
        integrations,
        priority,
        max_seq_length_given: knobs.max_seq_length.is_given()
            && !matches!(knobs.max_seq_length.given, Given::Auto),
    })
}

/// Step 1: checks every key and merges the knobs into `key -> [param, value]` (every knob
/// present, null when not given). Top-level extensions come first, then the hyperparameters
/// objects; `method` wins over the deprecated top-level `hyperparameters`, and the same knob
/// given twice with different values is an error otherwise. Also says whether `method.type` is
/// `dpo`.
fn gather(obj: &Map<String, Value>) -> Result<(Map<String, Value>, bool), SpecError> {
    for key in obj.keys() {
        if !TOP_LEVEL.contains(&key.as_str()) && !extensions().any(|k| k == key) {
            return Err(SpecError::new(
                key,
                format!("unrecognised request argument supplied: {key}"),
            ));
        }
    }
    let mut knobs: Map<String, Value> = Map::new();
    let mut origin: HashMap<String, String> = HashMap::new();
    for key in extensions() {
        if let Some(v) = obj.get(key) {
            knobs.insert(key.to_string(), v.clone());
            origin.insert(key.to_string(), key.to_string());
        }
    }
    let (objects, dpo) = hyperparameter_objects(obj)?;
    for (prefix, hp) in objects {
        for (k, v) in hp {
            let param = format!("{prefix}.{k}");
            if !is_knob(k) {
                return Err(SpecError::new(
                    &param,
                    format!("unrecognised hyperparameter: {k}"),
                ));
            }
            if let Some(prev) = knobs.get(k) {
                let overrides_deprecated = prefix.starts_with("method")
                    && origin
                        .get(k)
                        .is_some_and(|o| o.starts_with("hyperparameters."));
                if prev != v && !overrides_deprecated {
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
    let merged = serde_introspect::<Knobs>()
        .iter()
        .map(|k| {
            let param = origin.remove(*k).unwrap_or_else(|| k.to_string());
            let value = knobs.remove(*k).unwrap_or(Value::Null);
            (
                k.to_string(),
                Value::Array(vec![Value::String(param), value]),
            )
        })
        .collect();
    Ok((merged, dpo))
}

/// A hyperparameters object and its path.
type Hyperparameters<'a> = (&'static str, &'a Map<String, Value>);

/// The hyperparameters objects of a request with their paths: the deprecated top-level
/// `hyperparameters`, then `method.supervised.hyperparameters` (or `method.dpo.hyperparameters`);
/// and whether the method is DPO.
fn hyperparameter_objects(
    obj: &Map<String, Value>,
) -> Result<(Vec<Hyperparameters<'_>>, bool), SpecError> {
    let mut found = Vec::new();
    if let Some(hp) = object_at(
        obj,
        "hyperparameters",
        "hyperparameters",
        "`hyperparameters`",
    )? {
        found.push(("hyperparameters", hp));
    }
    let Some(m) = object_at(obj, "method", "method", "`method`")? else {
        return Ok((found, false));
    };
    let kind: &'static str = match m.get("type") {
        Some(Value::String(t)) if t == "supervised" => "supervised",
        Some(Value::String(t)) if t == "dpo" => "dpo",
        Some(Value::String(t)) => {
            return Err(SpecError::new(
                "method.type",
                format!("method type '{t}' is not supported; tuna supports 'supervised' and 'dpo'"),
            ))
        }
        _ => {
            return Err(SpecError::new(
                "method.type",
                "`method.type` is required and must be 'supervised' or 'dpo'",
            ))
        }
    };
    if let Some(k) = m.keys().find(|k| *k != "type" && *k != kind) {
        return Err(SpecError::new(
            &format!("method.{k}"),
            format!("unrecognised method argument: {k} (method type '{kind}' takes `{kind}`)"),
        ));
    }
    let (body_param, hp_param) = match kind {
        "dpo" => ("method.dpo", "method.dpo.hyperparameters"),
        _ => ("method.supervised", "method.supervised.hyperparameters"),
    };
    let dpo = kind == "dpo";
    let Some(body) = object_at(m, kind, body_param, &format!("`{body_param}`"))? else {
        return Ok((found, dpo));
    };
    if let Some(k) = body.keys().find(|k| *k != "hyperparameters") {
        return Err(SpecError::new(
            &format!("{body_param}.{k}"),
            format!("unrecognised argument: {body_param}.{k}"),
        ));
    }
    let hp = object_at(body, "hyperparameters", hp_param, "`hyperparameters`")?;
    found.extend(hp.map(|hp| (hp_param, hp)));
    Ok((found, dpo))
}

/// `obj[key]` as an object (`None` when absent or null); `param` and `name` for the error.
fn object_at<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    param: &str,
    name: &str,
) -> Result<Option<&'a Map<String, Value>>, SpecError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(SpecError::new(param, format!("{name} must be an object"))),
    }
}

/// Where the data comes from: uploaded files or URLs.
struct Files {
    training_file: Option<String>,
    validation_file: Option<String>,
    dataset_url: Option<String>,
    validation_dataset_url: Option<String>,
}

impl Files {
    fn read(
        obj: &Map<String, Value>,
        knobs: &Knobs,
        policy: &SpecPolicy,
    ) -> Result<Files, SpecError> {
        let f = Files {
            training_file: optional_string(obj, "training_file")?,
            validation_file: optional_string(obj, "validation_file")?,
            dataset_url: knobs.dataset_url.text()?,
            validation_dataset_url: knobs.validation_dataset_url.text()?,
        };
        match (&f.training_file, &f.dataset_url) {
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
        if f.validation_file.is_some() && f.validation_dataset_url.is_some() {
            return Err(SpecError::new(
                "validation_dataset_url",
                "give either `validation_file` or `validation_dataset_url`, not both",
            ));
        }
        for (knob, url) in [
            (&knobs.dataset_url, &f.dataset_url),
            (&knobs.validation_dataset_url, &f.validation_dataset_url),
        ] {
            if let Some(url) = url {
                check_dataset_url(url, policy).map_err(|m| knob.error(m))?;
            }
        }
        Ok(f)
    }
}

/// Step 3: defaults and ranges, checked in a fixed order (the first error is reported); also
/// the job's priority.
fn resolve(
    k: &Knobs,
    model: String,
    files: Files,
    seed: u64,
    dpo: bool,
) -> Result<(JobSpec, i32), SpecError> {
    let task = k.task.choice(Task::CausalLm, false)?;
    let dpo = if dpo {
        if task != Task::CausalLm {
            return Err(k.task.error(format!(
                "method 'dpo' tunes a causal language model on preference pairs: `task` must be 'causal_lm' (or left out), not '{}'",
                task.as_str()
            )));
        }
        if k.packing.flag()? {
            return Err(k.packing.error(
                "packing is not available with method 'dpo' (each pair's two sequences are scored whole)".into(),
            ));
        }
        // TRL's and OpenAI's default.
        let beta = k.beta.number_in(0.0, 1000.0, false)?.unwrap_or(0.1);
        Some(Dpo { beta })
    } else {
        if k.beta.is_given() {
            return Err(k.beta.error(
                "`beta` applies to method 'dpo' (`method.dpo.hyperparameters.beta`)".into(),
            ));
        }
        None
    };
    let nf4_asked = k.quantization.choice(Quantization::None, false)? == Quantization::Nf4;
    let lora_given = [
        k.lora_r.is_given(),
        k.lora_alpha.is_given(),
        k.lora_dropout.is_given(),
        k.lora_target_modules.is_given(),
        // QLoRA is LoRA over a quantised base.
        nf4_asked,
    ]
    .contains(&true);
    let inferred = if lora_given {
        TrainingType::Lora
    } else {
        TrainingType::Full
    };
    let training_type = k.training_type.choice(inferred, false)?;
    if training_type == TrainingType::Full && lora_given {
        if nf4_asked {
            return Err(k.quantization.error(
                "quantization 'nf4' (QLoRA) trains LoRA adapters over a frozen quantised base, but `training_type` is 'full': set it to 'lora' or leave it out".into(),
            ));
        }
        return Err(k
            .training_type
            .error("LoRA settings were given but `training_type` is 'full'".into()));
    }
    let n_epochs = k.n_epochs.count(1, 50, 3)?;
    let batch_size = k.batch_size.count(1, 256, 8)?;
    let learning_rate_multiplier = k
        .learning_rate_multiplier
        .number_in(0.0, 100.0, false)?
        .unwrap_or(1.0);
    let base_lr = match (training_type, task) {
        // DPO moves a tuned model a little: TRL's default for full fine-tuning, and ten times
        // that for adapters that start from zero.
        (TrainingType::Full, _) if dpo.is_some() => 1e-6,
        (TrainingType::Lora, _) if dpo.is_some() => 1e-5,
        (TrainingType::Lora, _) => 2e-4,
        (TrainingType::Full, Task::CausalLm) => 2e-5,
        (TrainingType::Full, _) => 5e-5,
    };
    let learning_rate = k
        .learning_rate
        .number_in(0.0, 1.0, false)?
        .unwrap_or(base_lr * learning_rate_multiplier);
    let lr_scheduler = k.lr_scheduler.choice(LrSchedule::Linear, true)?;
    let warmup_ratio = k.warmup_ratio.number_in(0.0, 1.0, true)?.unwrap_or(0.0);
    let warmup_steps = k.warmup_steps.count(0, 1_000_000, 0)?;
    let weight_decay = k.weight_decay.number_in(0.0, 1.0, true)?.unwrap_or(0.0);
    let gradient_accumulation_steps = k.gradient_accumulation_steps.count(1, 1024, 1)?;
    let default_max_len = match task {
        Task::CausalLm => 1024,
        // transformers' question-answering example: 384 tokens, windows 128 apart.
        Task::QuestionAnswering => 384,
        _ => 128,
    };
    let max_seq_length = k.max_seq_length.count(8, 131_072, default_max_len)?;
    let max_grad_norm = k.max_grad_norm.number_in(0.0, 1e6, true)?.unwrap_or(1.0);
    // Question answering: the tokens consecutive windows of a long context share (transformers'
    // example: 128 of 384; a third of a shorter max_seq_length).
    let doc_stride = match task {
        Task::QuestionAnswering => {
            let stride = k.doc_stride.count(0, 65_536, 128.min(max_seq_length / 3))?;
            if stride >= max_seq_length / 2 {
                return Err(k.doc_stride.error(format!(
                    "doc_stride {stride} must be less than half of max_seq_length ({max_seq_length}), so that each window moves on"
                )));
            }
            Some(stride)
        }
        _ if k.doc_stride.is_given() => {
            return Err(k
                .doc_stride
                .error("doc_stride applies to task 'question_answering' only".into()))
        }
        _ => None,
    };
    let eval_interval = k.eval_interval.count(0, 10_000_000, 0)?;
    // Causal LM (SFT or DPO): greedy completions of a few validation prompts at each evaluation.
    let eval_samples = match task {
        Task::CausalLm => Some(k.eval_samples.count(0, 20, 3)?),
        _ if k.eval_samples.is_given() => {
            return Err(k.eval_samples.error(format!(
                "eval_samples applies to causal language models (task 'causal_lm'), not task '{}'",
                task.as_str()
            )))
        }
        _ => None,
    };
    let checkpoint_interval = k.checkpoint_interval.count(0, 10_000_000, 0)?;
    let early_stopping_patience = k.early_stopping_patience.count(0, 1000, 0)?;
    let validation_split = k.validation_split.number_in(0.0, 0.5, true)?.unwrap_or(0.1);
    let max_steps = k.max_steps.count(0, 100_000_000, 0)?;
    let log_interval = k.log_interval.count(1, 100_000, 10)?;
    let priority = k.priority.int_in(-1000, 1000)?.unwrap_or(0) as i32;
    let lora = match training_type {
        TrainingType::Full => None,
        TrainingType::Lora => Some(lora(k, nf4_asked)?),
    };
    let freeze = Freeze {
        embeddings: k.freeze_embeddings.flag()?,
        layers: k.freeze_layers.count(0, 10_000, 0)?,
        patterns: k.freeze_patterns.names()?.unwrap_or_default(),
    };
    if training_type == TrainingType::Lora
        && (freeze.embeddings || freeze.layers > 0 || !freeze.patterns.is_empty())
    {
        return Err(k.freeze_layers.error(
            "freezing applies to full fine-tuning; under LoRA every base weight is already frozen"
                .into(),
        ));
    }
    let nf4 = lora.as_ref().and_then(|l| l.nf4);
    if nf4.is_none() && k.double_quantization.is_given() {
        return Err(k
            .double_quantization
            .error("`double_quantization` applies to `quantization` 'nf4'".into()));
    }
    let mut gradient_checkpointing = k.gradient_checkpointing.auto_flag()?;
    if nf4.is_some() {
        // tch has no custom autograd function, so a layer's dequantised weights are autograd
        // values: only recomputing the layer in the backward keeps them from being saved for
        // every layer at once.
        if gradient_checkpointing == Some(false) {
            return Err(k.gradient_checkpointing.error(
                "quantization 'nf4' needs gradient_checkpointing: without it the backward keeps every layer's dequantised weights, more memory than LoRA over the unquantised base; set it to true or \"auto\"".into(),
            ));
        }
        gradient_checkpointing = Some(true);
    }
    let spec = JobSpec {
        model,
        task,
        training_file: files.training_file,
        validation_file: files.validation_file,
        dataset_url: files.dataset_url,
        validation_dataset_url: files.validation_dataset_url,
        seed,
        n_epochs,
        batch_size,
        learning_rate_multiplier,
        learning_rate,
        lr_scheduler,
        warmup_ratio,
        warmup_steps,
        weight_decay,
        gradient_accumulation_steps,
        max_seq_length,
        max_grad_norm,
        doc_stride,
        eval_interval,
        eval_samples,
        checkpoint_interval,
        early_stopping_patience,
        validation_split,
        max_steps,
        training_type,
        lora,
        freeze,
        merge_lora: k.merge_lora.flag()?,
        packing: k.packing.flag()?,
        precision: k.precision.choice(Precision::Auto, false)?,
        device: k.device.choice(Device::Auto, false)?,
        log_interval,
        fixed_batch_size: k.batch_size.is_given() && !matches!(k.batch_size.given, Given::Auto),
        gradient_checkpointing,
        optimizer_moments: k.optimizer_moments.choice(Moments::Fp32, false)?,
        dpo,
    };
    Ok((spec, priority))
}

fn lora(k: &Knobs, nf4_asked: bool) -> Result<Lora, SpecError> {
    let r = k.lora_r.count(1, 1024, 16)?;
    let alpha = k
        .lora_alpha
        .number_in(0.0, 1e6, false)?
        .unwrap_or(2.0 * f64::from(r));
    let dropout = k.lora_dropout.number_in(0.0, 0.99, true)?.unwrap_or(0.05);
    let target_modules = if k.lora_target_modules.is_text(&["auto", "all-linear"]) {
        None
    } else {
        k.lora_target_modules.names()?
    };
    let nf4 = if nf4_asked {
        Some(Nf4 {
            double_quantization: k.double_quantization.auto_flag()?.unwrap_or(true),
        })
    } else {
        None
    };
    Ok(Lora {
        r,
        alpha,
        dropout,
        target_modules: target_modules.unwrap_or_else(|| vec!["all-linear".to_string()]),
        nf4,
    })
}

fn required_string(obj: &Map<String, Value>, key: &str) -> Result<String, SpecError> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(SpecError::new(key, format!("`{key}` must be a string"))),
        None => Err(SpecError::new(key, format!("`{key}` is required"))),
    }
}

fn optional_string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, SpecError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(_) => Err(SpecError::new(
            key,
            format!("`{key}` must be a non-empty string"),
        )),
    }
}

fn seed(v: &Value) -> Result<u64, SpecError> {
    let knob = Knob {
        param: "seed".to_string(),
        given: Int::from_json(v.clone()),
    };
    match knob.given {
        // The seed has no "auto": any non-number is not an integer.
        Given::Auto | Given::Wrong => Err(knob.error("`seed` must be an integer".into())),
        _ => Ok(knob.int_in(0, 2_147_483_647)?.unwrap_or(0) as u64),
    }
}

fn metadata(v: Option<&Value>) -> Result<Option<Map<String, Value>>, SpecError> {
    match v {
        None | Some(Value::Null) => Ok(None),
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
            Ok(Some(m.clone()))
        }
        Some(_) => Err(SpecError::new(
            "metadata",
            "`metadata` must be an object of strings",
        )),
    }
}

fn integrations(v: Option<&Value>) -> Result<Option<Value>, SpecError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Array(items)) => {
            if items.len() > 5 {
                return Err(SpecError::new("integrations", "at most 5 integrations"));
            }
            Ok(Some(v.clone()))
        }
        Some(_) => Err(SpecError::new(
            "integrations",
            "`integrations` must be a list",
        )),
    }
}
