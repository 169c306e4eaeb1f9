//! `tuna jobs create|list|show|cancel|pause|resume|events|watch|checkpoints`.
//!
//! `create` builds the same JSON body the API takes, from a job file (`-f job.yaml` or
//! `job.json`, `-` for stdin) and/or flags; flags win over the file. Epochs and batch size go
//! to `method.supervised.hyperparameters` (`method.dpo.hyperparameters` for `--method dpo`, with
//! `--beta`; or to the file's top-level `hyperparameters` when it uses that older place), tuna's extensions (`task`, `learning_rate`, `lora_r`, …) to the top
//! level, and `--set a.b=value` writes any key (the value is parsed as JSON when it is JSON,
//! else taken as a string).

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Map, Value};
use tuna_core::status::JobStatus;

use super::http::{seg, Api};
use super::output::{self, print_json};
use super::{files, watch, ClientOpts, Failure, Result};

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Create a job from flags and/or a job file (the API's create body as YAML or JSON).
    Create(Box<CreateArgs>),
    /// List jobs, newest first.
    List {
        /// At most this many jobs (one page).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Jobs after this id.
        #[arg(long)]
        after: Option<String>,
        /// Follow every page.
        #[arg(long)]
        all: bool,
        /// Only jobs whose metadata has `key=value` (repeatable; all must match).
        #[arg(long, value_name = "KEY=VALUE")]
        metadata: Vec<String>,
    },
    /// Show one job.
    Show {
        /// Job id (`ftjob-…`).
        id: String,
    },
    /// Cancel a job (a running job stops at its next step).
    Cancel {
        /// Job id.
        id: String,
    },
    /// Pause a job (a running job saves a checkpoint first).
    Pause {
        /// Job id.
        id: String,
    },
    /// Resume a paused job (from its last checkpoint).
    Resume {
        /// Job id.
        id: String,
    },
    /// Print a job's events, oldest first.
    Events {
        /// Job id.
        id: String,
        /// The most recent this many events.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Every event.
        #[arg(long)]
        all: bool,
    },
    /// Follow a job live (progress bar, events) until it ends; exit 3 if it failed or was
    /// cancelled.
    Watch(watch::WatchArgs),
    /// List a job's checkpoints, latest first.
    Checkpoints {
        /// Job id.
        id: String,
        /// At most this many checkpoints.
        #[arg(long, default_value_t = 10)]
        limit: u32,
        /// Every checkpoint.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Job file: the create body as YAML or JSON (`-` reads stdin). Flags override its keys.
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// Base model id (see `tuna models list`).
    #[arg(long)]
    pub model: Option<String>,
    /// Training file id (`file-…`), or a local file path, which is uploaded first.
    #[arg(long)]
    pub training_file: Option<String>,
    /// Training data URL instead of a file (`s3://…`, `https://…`).
    #[arg(long)]
    pub dataset_url: Option<String>,
    /// Validation file id, or a local file path, which is uploaded first.
    #[arg(long)]
    pub validation_file: Option<String>,
    /// Validation data URL.
    #[arg(long)]
    pub validation_dataset_url: Option<String>,
    /// Task: causal_lm, sequence_classification, sequence_regression,
    /// multi_label_classification, token_classification or question_answering.
    #[arg(long)]
    pub task: Option<String>,
    /// Training method: supervised (the default) or dpo (preference pairs).
    #[arg(long, value_parser = ["supervised", "dpo"])]
    pub method: Option<String>,
    /// DPO's beta (`method.dpo.hyperparameters.beta`, default 0.1); with `--method dpo`.
    #[arg(long)]
    pub beta: Option<f64>,
    /// Number of epochs (`n_epochs`).
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Batch size.
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Learning rate (absolute; tuna's `learning_rate`).
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// LoRA rank (implies LoRA training).
    #[arg(long)]
    pub lora_r: Option<u32>,
    /// Suffix for the fine-tuned model's name.
    #[arg(long)]
    pub suffix: Option<String>,
    /// Random seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Metadata pair (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    pub metadata: Vec<String>,
    /// Any body key, dotted for nesting (repeatable), e.g. `--set warmup_ratio=0.1`,
    /// `--set lora_target_modules='["c_attn"]'`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Idempotency key: retrying with the same key returns the same job.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Follow the job after creating it, as `tuna jobs watch`.
    #[arg(long)]
    pub watch: bool,
    /// Print the request body and exit without sending it.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn run(opts: &ClientOpts, command: JobsCommand) -> Result<()> {
    let api = Api::new(opts)?;
    match command {
        JobsCommand::Create(args) => create(&api, opts, *args).await,
        JobsCommand::List {
            limit,
            after,
            all,
            metadata,
        } => {
            let mut q: Vec<(String, String)> = Vec::new();
            for pair in &metadata {
                let (k, v) = split_pair(pair, "--metadata")?;
                q.push((format!("metadata[{k}]"), v.to_string()));
            }
            let page = if all {
                if let Some(a) = after {
                    q.push(("after".into(), a));
                }
                let items = api.list_all("/v1/fine_tuning/jobs", &q, 100, None).await?;
                output::list_envelope(items)
            } else {
                q.push(("limit".into(), limit.to_string()));
                if let Some(a) = after {
                    q.push(("after".into(), a));
                }
                api.get_query("/v1/fine_tuning/jobs", &q).await?
            };
            if opts.json {
                print_json(&page);
            } else {
                let rows: Vec<Vec<String>> = page["data"]
                    .as_array()
                    .map(|d| d.iter().map(job_row).collect())
                    .unwrap_or_default();
                output::table(
                    &[
                        "ID",
                        "STATUS",
                        "MODEL",
                        "PROGRESS",
                        "CREATED",
                        "FINE-TUNED MODEL",
                    ],
                    &rows,
                );
                if page["has_more"].as_bool() == Some(true) {
                    eprintln!("(more jobs: --all, or --after {})", last_id(&page));
                }
            }
            Ok(())
        }
        JobsCommand::Show { id } => {
            let job = api.get(&job_path(&id)).await?;
            if opts.json {
                print_json(&job);
            } else {
                print_job(&job);
            }
            Ok(())
        }
        JobsCommand::Cancel { id } => control(&api, opts, &id, "cancel").await,
        JobsCommand::Pause { id } => control(&api, opts, &id, "pause").await,
        JobsCommand::Resume { id } => control(&api, opts, &id, "resume").await,
        JobsCommand::Events { id, limit, all } => {
            let path = format!("{}/events", job_path(&id));
            let max = if all { None } else { Some(limit as usize) };
            let items = api.list_all(&path, &[], limit.clamp(1, 100), max).await?;
            if opts.json {
                print_json(&output::list_envelope(items));
            } else {
                for ev in items.iter().rev() {
                    println!("{}", event_line(ev));
                }
            }
            Ok(())
        }
        JobsCommand::Watch(args) => watch::run(&api, opts, &args).await,
        JobsCommand::Checkpoints { id, limit, all } => {
            let path = format!("{}/checkpoints", job_path(&id));
            let max = if all { None } else { Some(limit as usize) };
            let items = api.list_all(&path, &[], limit.clamp(1, 100), max).await?;
            if opts.json {
                print_json(&output::list_envelope(items));
            } else {
                let rows: Vec<Vec<String>> = items
                    .iter()
                    .map(|c| {
                        vec![
                            output::text(&c["step_number"]),
                            output::text(&c["id"]),
                            output::time(&c["created_at"]),
                            output::text(&c["fine_tuned_model_checkpoint"]),
                            output::metrics_line(&c["metrics"]),
                        ]
                    })
                    .collect();
                output::table(&["STEP", "ID", "CREATED", "MODEL", "METRICS"], &rows);
            }
            Ok(())
        }
    }
}

/// `/v1/fine_tuning/jobs/{id}`.
pub fn job_path(id: &str) -> String {
    format!("/v1/fine_tuning/jobs/{}", seg(id))
}

fn last_id(page: &Value) -> String {
    page["data"]
        .as_array()
        .and_then(|d| d.last())
        .map(|j| output::text(&j["id"]))
        .unwrap_or_default()
}

async fn control(api: &Api, opts: &ClientOpts, id: &str, action: &str) -> Result<()> {
    let job = api
        .post(&format!("{}/{action}", job_path(id)), None)
        .await?;
    if opts.json {
        print_json(&job);
        return Ok(());
    }
    let status = output::job_status(&job);
    let pending = match action {
        "cancel" if job["cancel_requested"] == true && status != Some(JobStatus::Cancelled) => {
            " (cancel requested; the worker stops at its next step)"
        }
        "pause" if job["pause_requested"] == true && status != Some(JobStatus::Paused) => {
            " (pause requested; the worker saves a checkpoint first)"
        }
        _ => "",
    };
    println!(
        "{}: {}{pending}",
        output::text(&job["id"]),
        output::text(&job["status"])
    );
    Ok(())
}

/// A job's progress as `step/total (pct%)`, or `-`.
pub fn progress_text(job: &Value) -> String {
    let p = &job["progress"];
    match (p["step"].as_i64(), p["total_steps"].as_i64()) {
        (Some(s), Some(t)) if t > 0 => format!("{s}/{t} ({:.0}%)", s as f64 * 100.0 / t as f64),
        (Some(s), _) => format!("step {s}"),
        _ => "-".into(),
    }
}

fn job_row(j: &Value) -> Vec<String> {
    vec![
        output::text(&j["id"]),
        output::text(&j["status"]),
        output::text(&j["model"]),
        progress_text(j),
        output::time(&j["created_at"]),
        output::text(&j["fine_tuned_model"]),
    ]
}

fn print_job(j: &Value) {
    let data = if !j["training_file"].is_null() {
        output::text(&j["training_file"])
    } else {
        output::text(&j["dataset_url"])
    };
    let validation = if !j["validation_file"].is_null() {
        output::text(&j["validation_file"])
    } else {
        output::text(&j["validation_dataset_url"])
    };
    let mut pairs = vec![
        ("id", output::text(&j["id"])),
        ("status", output::text(&j["status"])),
        ("model", output::text(&j["model"])),
        ("task", output::text(&j["task"])),
        ("training data", data),
        ("validation data", validation),
        ("created", output::time(&j["created_at"])),
        ("started", output::time(&j["started_at"])),
        ("finished", output::time(&j["finished_at"])),
        ("progress", progress_text(j)),
        ("seed", output::text(&j["seed"])),
        ("fine-tuned model", output::text(&j["fine_tuned_model"])),
        ("trained tokens", output::text(&j["trained_tokens"])),
    ];
    let kind = j["method"]["type"].as_str().unwrap_or("supervised");
    let hp = j["method"][kind]["hyperparameters"]
        .as_object()
        .or_else(|| j["hyperparameters"].as_object());
    if let Some(hp) = hp {
        let line = hp
            .iter()
            .map(|(k, v)| format!("{k}={}", compact(v)))
            .collect::<Vec<_>>()
            .join(" ");
        pairs.push(("hyperparameters", line));
    }
    if let Some(m) = j["metadata"].as_object().filter(|m| !m.is_empty()) {
        let line = m
            .iter()
            .map(|(k, v)| format!("{k}={}", output::text(v)))
            .collect::<Vec<_>>()
            .join(" ");
        pairs.push(("metadata", line));
    }
    if j["cancel_requested"] == true {
        pairs.push(("cancel requested", "yes".into()));
    }
    if j["pause_requested"] == true {
        pairs.push(("pause requested", "yes".into()));
    }
    if !j["error"].is_null() {
        pairs.push(("error", error_text(&j["error"])));
    }
    output::fields(&pairs);
}

fn compact(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A job's `error` object as `message (code, param p)`.
pub fn error_text(e: &Value) -> String {
    let mut s = output::text(&e["message"]);
    let code = e["code"].as_str();
    let param = e["param"].as_str();
    match (code, param) {
        (Some(c), Some(p)) => s.push_str(&format!(" ({c}, param {p})")),
        (Some(c), None) => s.push_str(&format!(" ({c})")),
        (None, Some(p)) => s.push_str(&format!(" (param {p})")),
        (None, None) => {}
    }
    s
}

/// An event as one line: `time  level  message`.
pub fn event_line(ev: &Value) -> String {
    format!(
        "{}  {:<5}  {}",
        output::time(&ev["created_at"]),
        output::text(&ev["level"]),
        output::text(&ev["message"])
    )
}

fn split_pair<'a>(pair: &'a str, flag: &str) -> Result<(&'a str, &'a str)> {
    match pair.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim(), v)),
        _ => Err(Failure::Usage(format!(
            "{flag} expects KEY=VALUE, got '{pair}'"
        ))),
    }
}

/// Reads a job file (YAML or JSON; `-` is stdin) into a JSON object.
fn read_job_file(path: &Path) -> Result<Map<String, Value>> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| Failure::Usage(format!("reading the job from stdin: {e}")))?
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?
    };
    // YAML is a superset of JSON, but JSON's own parser gives better messages for JSON.
    let value: Value = if text.trim_start().starts_with('{') {
        serde_json::from_str(&text)
            .map_err(|e| Failure::Usage(format!("{} is not valid JSON: {e}", path.display())))?
    } else {
        serde_yaml::from_str(&text)
            .map_err(|e| Failure::Usage(format!("{} is not valid YAML: {e}", path.display())))?
    };
    match value {
        Value::Object(m) => Ok(m),
        Value::Null => Ok(Map::new()),
        _ => Err(Failure::Usage(format!(
            "{} must hold a mapping of the job's fields (model, training_file, …)",
            path.display()
        ))),
    }
}

/// A `--set` value: JSON when it parses as JSON, else the string itself.
fn parse_value(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_string()))
}

/// Sets `body[a][b]… = value` for the dotted `key`, creating objects on the way.
fn set_path(body: &mut Map<String, Value>, key: &str, value: Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(Failure::Usage(format!("--set: '{key}' is not a valid key")));
    }
    let mut cur = body;
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            cur.insert(part.to_string(), value);
            return Ok(());
        }
        let slot = cur
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if slot.is_null() {
            *slot = Value::Object(Map::new());
        }
        cur = match slot {
            Value::Object(m) => m,
            _ => {
                return Err(Failure::Usage(format!(
                    "--set {key}: '{}' is not an object",
                    parts[..=i].join(".")
                )))
            }
        };
    }
    Ok(())
}

/// Builds the create body from the job file and the flags (without uploading anything).
pub fn build_body(args: &CreateArgs) -> Result<Map<String, Value>> {
    let mut body = match &args.file {
        Some(p) => read_job_file(p)?,
        None => Map::new(),
    };
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            body.insert(k.to_string(), v);
        }
    };
    put("model", args.model.clone().map(Value::from));
    put("training_file", args.training_file.clone().map(Value::from));
    put("dataset_url", args.dataset_url.clone().map(Value::from));
    put(
        "validation_file",
        args.validation_file.clone().map(Value::from),
    );
    put(
        "validation_dataset_url",
        args.validation_dataset_url.clone().map(Value::from),
    );
    put("task", args.task.clone().map(Value::from));
    put("learning_rate", args.learning_rate.map(Value::from));
    put("lora_r", args.lora_r.map(Value::from));
    put("suffix", args.suffix.clone().map(Value::from));
    put("seed", args.seed.map(Value::from));
    if let Some(kind) = &args.method {
        // The method's hyperparameters move with it: `--method dpo` over a file's supervised
        // method keeps what the file set.
        let hp = body
            .get("method")
            .and_then(|m| m.get(m.get("type")?.as_str()?))
            .and_then(|b| b.get("hyperparameters"))
            .cloned();
        let mut m = json!({"type": kind});
        if let Some(hp) = hp {
            m[kind.as_str()] = json!({"hyperparameters": hp});
        }
        body.insert("method".into(), m);
    }
    let kind = body
        .get("method")
        .and_then(|m| m.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("supervised")
        .to_string();
    if args.beta.is_some() && kind != "dpo" {
        return Err(Failure::Usage("--beta applies to --method dpo".into()));
    }
    if args.epochs.is_some() || args.batch_size.is_some() || args.beta.is_some() {
        let legacy = body.contains_key("hyperparameters")
            && !body.contains_key("method")
            && args.beta.is_none();
        let prefix = if legacy {
            "hyperparameters".to_string()
        } else {
            if !body.contains_key("method") {
                body.insert("method".into(), json!({"type": "supervised"}));
            }
            format!("method.{kind}.hyperparameters")
        };
        if let Some(e) = args.epochs {
            set_path(&mut body, &format!("{prefix}.n_epochs"), json!(e))?;
        }
        if let Some(b) = args.batch_size {
            set_path(&mut body, &format!("{prefix}.batch_size"), json!(b))?;
        }
        if let Some(b) = args.beta {
            set_path(&mut body, &format!("{prefix}.beta"), json!(b))?;
        }
    }
    for pair in &args.metadata {
        let (k, v) = split_pair(pair, "--metadata")?;
        let meta = body
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        if meta.is_null() {
            *meta = Value::Object(Map::new());
        }
        match meta {
            Value::Object(m) => {
                m.insert(k.to_string(), Value::String(v.to_string()));
            }
            _ => return Err(Failure::Usage("`metadata` must be a mapping".into())),
        }
    }
    for pair in &args.set {
        let (k, v) = split_pair(pair, "--set")?;
        set_path(&mut body, k, parse_value(v))?;
    }
    if !body.contains_key("model") {
        return Err(Failure::Usage(
            "a job needs a model: pass --model or put `model` in the job file".into(),
        ));
    }
    if !body.contains_key("training_file") && !body.contains_key("dataset_url") {
        return Err(Failure::Usage(
            "a job needs training data: pass --training-file or --dataset-url (or put one in the job file)"
                .into(),
        ));
    }
    Ok(body)
}

/// Uploads `body[key]` first when it names an existing local file rather than a file id.
async fn upload_if_local(api: &Api, body: &mut Map<String, Value>, key: &str) -> Result<()> {
    let Some(Value::String(v)) = body.get(key) else {
        return Ok(());
    };
    let path = PathBuf::from(v);
    if !path.is_file() {
        return Ok(());
    }
    let file = files::upload(api, &path, "fine-tune").await?;
    let id = output::text(&file["id"]);
    eprintln!("uploaded {} as {id}", path.display());
    body.insert(key.to_string(), Value::String(id));
    Ok(())
}

async fn create(api: &Api, opts: &ClientOpts, args: CreateArgs) -> Result<()> {
    let mut body = build_body(&args)?;
    if args.dry_run {
        print_json(&Value::Object(body));
        return Ok(());
    }
    upload_if_local(api, &mut body, "training_file").await?;
    upload_if_local(api, &mut body, "validation_file").await?;
    let mut req = api
        .request(Method::POST, "/v1/fine_tuning/jobs")
        .json(&Value::Object(body));
    if let Some(k) = &args.idempotency_key {
        req = req.header("Idempotency-Key", k);
    }
    let job = api.json(req).await?;
    if opts.json {
        print_json(&job);
    } else {
        println!(
            "created {} ({})",
            output::text(&job["id"]),
            output::text(&job["status"])
        );
    }
    if args.watch {
        let id = output::text(&job["id"]);
        return watch::run(api, opts, &watch::WatchArgs::new(id)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        args: CreateArgs,
    }

    fn body(argv: &[&str]) -> Result<Value> {
        let mut full = vec!["t"];
        full.extend_from_slice(argv);
        build_body(&T::parse_from(full).args).map(Value::Object)
    }

    #[test]
    fn flags_build_the_api_body() {
        let b = body(&[
            "--model",
            "gpt2",
            "--training-file",
            "file-1",
            "--task",
            "causal_lm",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--learning-rate",
            "0.001",
            "--lora-r",
            "8",
            "--suffix",
            "s",
            "--seed",
            "7",
            "--metadata",
            "team=nlp",
            "--set",
            "warmup_ratio=0.1",
            "--set",
            "lora_target_modules=[\"c_attn\"]",
            "--set",
            "method.supervised.hyperparameters.learning_rate_multiplier=2",
        ])
        .unwrap();
        assert_eq!(
            b,
            json!({
                "model": "gpt2", "training_file": "file-1", "task": "causal_lm",
                "learning_rate": 0.001, "lora_r": 8, "suffix": "s", "seed": 7,
                "method": {"type": "supervised", "supervised": {"hyperparameters": {
                    "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2}}},
                "metadata": {"team": "nlp"},
                "warmup_ratio": 0.1, "lora_target_modules": ["c_attn"],
            })
        );
    }

    #[test]
    fn method_dpo_puts_beta_and_the_hyperparameters_under_dpo() {
        let b = body(&[
            "--model",
            "m",
            "--training-file",
            "f",
            "--method",
            "dpo",
            "--beta",
            "0.3",
            "--epochs",
            "2",
        ])
        .unwrap();
        assert_eq!(
            b["method"],
            json!({"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "beta": 0.3}}})
        );
        assert!(matches!(
            body(&["--model", "m", "--training-file", "f", "--beta", "0.3"]),
            Err(Failure::Usage(_))
        ));
    }

    #[test]
    fn missing_model_or_data_is_a_usage_error() {
        assert!(matches!(
            body(&["--training-file", "f"]),
            Err(Failure::Usage(_))
        ));
        assert!(matches!(body(&["--model", "m"]), Err(Failure::Usage(_))));
        assert!(matches!(
            body(&["--model", "m", "--training-file", "f", "--set", "novalue"]),
            Err(Failure::Usage(_))
        ));
        assert!(matches!(
            body(&["--model", "m", "--training-file", "f", "--set", "model.x=1"]),
            Err(Failure::Usage(_))
        ));
    }

    #[test]
    fn job_files_are_overridden_by_flags() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("job.yaml");
        std::fs::write(
            &p,
            "model: gpt2\ntraining_file: file-1\nhyperparameters:\n  n_epochs: 3\nlora_r: 4\n",
        )
        .unwrap();
        let b = body(&["-f", p.to_str().unwrap(), "--epochs", "5", "--seed", "1"]).unwrap();
        assert_eq!(
            b,
            json!({"model": "gpt2", "training_file": "file-1",
                   "hyperparameters": {"n_epochs": 5}, "lora_r": 4, "seed": 1})
        );
        std::fs::write(&p, "[1, 2]").unwrap();
        assert!(matches!(
            body(&["-f", p.to_str().unwrap()]),
            Err(Failure::Usage(_))
        ));
        let j = dir.path().join("job.json");
        std::fs::write(&j, r#"{"model": "m", "dataset_url": "s3://b/k"}"#).unwrap();
        assert_eq!(
            body(&["-f", j.to_str().unwrap()]).unwrap(),
            json!({"model": "m", "dataset_url": "s3://b/k"})
        );
    }
}
