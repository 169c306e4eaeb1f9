//! The check a new job goes through in `validating_files` before it is queued: everything that
//! can be known without training.
//!
//! - The base model is registered (or is one of the organisation's fine-tuned models), its
//!   architecture supports the task, `max_seq_length` fits its context length, LoRA target
//!   modules and freeze patterns name modules it has, `freeze_layers` is below its depth.
//! - The training and validation files (uploaded ones; `dataset_url` data cannot be read here)
//!   have a shape the task can use: causal LM needs chat, prompt/completion or text records;
//!   classification needs text+label records with at least two distinct labels, regression
//!   text+label records whose labels are numbers (checked here when the file is read; the
//!   trainer names the line otherwise), multi-label classification text+labels records with at
//!   least two distinct labels.
//!
//! The outcome goes to `tuna_db::queue::finish_validation` (queued, or failed with an error
//! naming the cause and what would fit). Jobs left in `validating_files` by a previous run are
//! picked up by [`sweep`] at startup.

use serde::Deserialize;
use tuna_core::data::{self, Format, Shape};
use tuna_core::hf_config::HfConfig;
use tuna_core::spec::{JobSpec, Task};
use tuna_db::jobs::{self, CreateContext};
use tuna_db::models;
use tuna_db::queue::{self, JobError};
use tuna_db::rows::{FileRow, JobRow, ModelRow};

use crate::error::ApiError;
use crate::AppState;

/// Starts the validation of a job in the background.
pub fn spawn(st: AppState, job: JobRow) {
    tokio::spawn(async move { run(&st, &job).await });
}

/// Validates every job still in `validating_files`; returns how many were started.
pub async fn sweep(st: &AppState) -> Result<usize, ApiError> {
    let jobs = queue::validating_jobs(&st.db).await?;
    let n = jobs.len();
    for job in jobs {
        spawn(st.clone(), job);
    }
    Ok(n)
}

#[tracing::instrument(skip_all, fields(job_id = %job.job_id))]
async fn run(st: &AppState, job: &JobRow) {
    let outcome = match check(st, job).await {
        Ok(outcome) => outcome,
        Err(e) => {
            tracing::warn!(error = %e, "job validation could not run; it stays in validating_files until the next start");
            return;
        }
    };
    if let Err(e) = &outcome {
        tracing::info!(code = %e.code, message = %e.message, "job failed validation");
    }
    if let Err(e) = queue::finish_validation(&st.db, &job.job_id, outcome).await {
        tracing::warn!(error = %e, "recording the validation outcome failed");
    }
}

/// The architecture summary stored with a model (`ModelDescription`); every field optional so
/// that rows written by other versions still load.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Arch {
    tasks: Option<Vec<Task>>,
    context_length: Option<i64>,
    num_layers: Option<i64>,
    lora_target_modules: Option<Vec<String>>,
    freeze_patterns: Option<Vec<String>>,
}

fn fail(code: &str, param: &str, message: String) -> JobError {
    JobError {
        code: code.to_string(),
        message,
        param: Some(param.to_string()),
    }
}

/// `Ok(Err(..))`: the job is invalid; `Err(..)`: the check itself could not run. Reads the
/// model and files from the database and, when a file's upload scan was not stored, the file.
pub async fn check(st: &AppState, job: &JobRow) -> Result<Result<(), JobError>, ApiError> {
    let spec: &JobSpec = match job.spec.get() {
        Ok(s) => s,
        Err(e) => {
            return Ok(Err(JobError::new(
                "invalid_spec",
                format!("the stored job spec cannot be read: {e}"),
            )))
        }
    };
    let ctx = jobs::create_context(
        &st.db,
        &job.organization_id,
        &spec.model,
        spec.training_file.as_deref(),
        spec.validation_file.as_deref(),
    )
    .await?;
    let hf = st.fit.config(ctx.model.as_ref()).await;
    let outcome = check_with(
        st,
        &job.organization_id,
        spec,
        &ctx,
        hf.as_deref(),
        Some(&job.job_id),
    )
    .await?;
    Ok(outcome.unwrap_or_else(|| {
        Err(JobError::new(
            "internal",
            "the job's files could not be checked",
        ))
    }))
}

/// The check of a new job from what the create request already read (`ctx`, the model's
/// config `hf`) and the scans stored at upload, without reading any file. `None` when a
/// file's scan was not stored (it was checked by an older version): the job must be checked
/// by [`spawn`] instead.
pub async fn check_inline(
    st: &AppState,
    organization_id: &str,
    spec: &JobSpec,
    ctx: &CreateContext,
    hf: Option<&HfConfig>,
) -> Result<Option<Result<(), JobError>>, ApiError> {
    check_with(st, organization_id, spec, ctx, hf, None).await
}

/// Model first (with whether the job fits a live worker, `crate::fit`), then each file.
/// `read_files_as`: the job id under which a file without a
/// stored scan is downloaded and scanned; `None` answers `None` for such a file.
async fn check_with(
    st: &AppState,
    organization_id: &str,
    spec: &JobSpec,
    ctx: &CreateContext,
    hf: Option<&HfConfig>,
    read_files_as: Option<&str>,
) -> Result<Option<Result<(), JobError>>, ApiError> {
    if let Err(e) = check_model(st, organization_id, spec, ctx.model.as_ref(), hf).await? {
        return Ok(Some(Err(e)));
    }
    if let Some(hf) = hf {
        let workers = st.fit.workers(&st.db).await?;
        if let Err(e) = crate::fit::check(hf, spec, &workers) {
            return Ok(Some(Err(e)));
        }
    }
    for (file_id, row, param) in [
        (&spec.training_file, &ctx.training_file, "training_file"),
        (
            &spec.validation_file,
            &ctx.validation_file,
            "validation_file",
        ),
    ] {
        let Some(file_id) = file_id else { continue };
        let code = if param == "training_file" {
            "invalid_training_file"
        } else {
            "invalid_validation_file"
        };
        let Some(file) = row else {
            return Ok(Some(Err(fail(
                code,
                param,
                format!("file '{file_id}' no longer exists"),
            ))));
        };
        let outcome = match (stored_scan(file), read_files_as) {
            (Some(scan), _) => check_shape(spec, &scan, file_id, code, param),
            (None, Some(job_id)) => check_content(st, job_id, spec, file, code, param).await?,
            (None, None) => return Ok(None),
        };
        if let Err(e) = outcome {
            return Ok(Some(Err(e)));
        }
    }
    Ok(Some(Ok(())))
}

/// What a job check needs of a file's scan.
struct Scan {
    shape: Option<Shape>,
    /// Distinct labels.
    labels: usize,
    /// The first line whose label is not a number (None: all are, or not recorded).
    non_numeric_label_line: Option<u64>,
}

/// The scan of a processed file, as its upload stored it.
fn stored_scan(file: &FileRow) -> Option<Scan> {
    file.example_count?;
    let shape = match &file.format {
        None => None,
        Some(name) => Some(Shape::parse(name)?),
    };
    let labels = match shape {
        Some(s) if s.is_labelled() => usize::try_from(file.label_count?).unwrap_or(0),
        _ => 0,
    };
    Some(Scan {
        shape,
        labels,
        non_numeric_label_line: file.non_numeric_label_line.map(|l| l as u64),
    })
}

async fn check_model(
    st: &AppState,
    organization_id: &str,
    spec: &JobSpec,
    model: Option<&ModelRow>,
    config: Option<&HfConfig>,
) -> Result<Result<(), JobError>, ApiError> {
    let Some(model) = model else {
        let known: Vec<String> = models::list_models(&st.db, organization_id)
            .await?
            .into_iter()
            .map(|m| m.model_id)
            .collect();
        let list = if known.is_empty() {
            "none are registered".to_string()
        } else {
            known.join(", ")
        };
        return Ok(Err(fail(
            "model_not_found",
            "model",
            format!(
                "model '{}' is not registered on this server (available: {list}); an operator adds base models with `tuna models register <id> <dir>`",
                spec.model
            ),
        )));
    };
    let arch: Arch = Arch::deserialize(&model.architecture).unwrap_or_default();
    Ok(check_arch(spec, &arch, config))
}

fn check_arch(spec: &JobSpec, arch: &Arch, config: Option<&HfConfig>) -> Result<(), JobError> {
    // The live config.json knows the tasks of this version; a stored summary may be older.
    let tasks = config.map(HfConfig::tasks).or_else(|| arch.tasks.clone());
    if let Some(tasks) = &tasks {
        if !tasks.contains(&spec.task) {
            let names: Vec<&str> = tasks.iter().map(|t| t.as_str()).collect();
            if spec.dpo.is_some() {
                return Err(fail(
                    "unsupported_task",
                    "method",
                    format!(
                        "model '{}' cannot be tuned with method 'dpo', which needs a causal language model; it supports: {}",
                        spec.model,
                        names.join(", ")
                    ),
                ));
            }
            return Err(fail(
                "unsupported_task",
                "task",
                format!(
                    "model '{}' does not support task '{}'; it supports: {}",
                    spec.model,
                    spec.task.as_str(),
                    names.join(", ")
                ),
            ));
        }
    }
    if let Some(ctx) = arch.context_length {
        if i64::from(spec.max_seq_length) > ctx {
            return Err(fail(
                "invalid_hyperparameters",
                "max_seq_length",
                format!("max_seq_length {} exceeds the context length of '{}' ({ctx}); use at most {ctx}", spec.max_seq_length, spec.model),
            ));
        }
    }
    if let (Some(layers), true) = (arch.num_layers, spec.freeze.layers > 0) {
        if i64::from(spec.freeze.layers) >= layers {
            return Err(fail(
                "invalid_hyperparameters",
                "freeze_layers",
                format!("freeze_layers {} leaves nothing to train: '{}' has {layers} layers; use at most {}", spec.freeze.layers, spec.model, layers - 1),
            ));
        }
    }
    if let (Some(lora), Some(known)) = (&spec.lora, &arch.lora_target_modules) {
        if let Some(bad) = lora.target_modules.iter().find(|m| !known.contains(m)) {
            return Err(fail(
                "invalid_hyperparameters",
                "lora_target_modules",
                format!(
                    "'{}' has no module '{bad}' to put LoRA on; valid target modules: {}",
                    spec.model,
                    known.join(", ")
                ),
            ));
        }
    }
    let candidates = freeze_candidates(arch, config);
    if !candidates.is_empty() {
        if let Some(bad) = spec
            .freeze
            .patterns
            .iter()
            .find(|p| !pattern_matches_any(p, &candidates))
        {
            let examples = arch.freeze_patterns.clone().unwrap_or_default().join(", ");
            return Err(fail(
                "invalid_hyperparameters",
                "freeze_patterns",
                format!("freeze pattern '{bad}' matches no parameter of '{}'; patterns look like: {examples}", spec.model),
            ));
        }
    }
    Ok(())
}

/// Parameter-like names of the model: every linear module's weight and bias, plus the example
/// freeze patterns with their wildcards filled in.
fn freeze_candidates(arch: &Arch, config: Option<&HfConfig>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(cfg) = config {
        for m in cfg.linear_modules() {
            out.push(format!("{m}.weight"));
            out.push(format!("{m}.bias"));
        }
    }
    for p in arch.freeze_patterns.iter().flatten() {
        out.push(p.replace(".*", ".0.weight").replace('*', "0"));
        out.push(p.replace(".*", ".weight").replace('*', "0"));
    }
    out
}

/// A pattern fits when it matches a candidate, or when its literal part before the first
/// wildcard is a prefix of one (patterns may name parameters the candidates do not list).
fn pattern_matches_any(pattern: &str, candidates: &[String]) -> bool {
    let literal = pattern.split('*').next().unwrap_or_default();
    candidates
        .iter()
        .any(|c| glob(pattern, c) || (!literal.is_empty() && c.starts_with(literal)))
}

/// `*` matches any run of characters.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

async fn check_content(
    st: &AppState,
    job_id: &str,
    spec: &JobSpec,
    file: &FileRow,
    code: &str,
    param: &str,
) -> Result<Result<(), JobError>, ApiError> {
    let file_id = file.file_id.as_str();
    let tmp = st.config.tmp_dir();
    tokio::fs::create_dir_all(&tmp).await?;
    let path = tmp.join(format!("{job_id}-{file_id}.check"));
    match st
        .config
        .store
        .download_file(&file.storage_key, &path)
        .await
    {
        Ok(_) => {}
        Err(e) if e.is_not_found() => {
            return Ok(Err(fail(
                code,
                param,
                format!("the content of file '{file_id}' is missing from the artifact store"),
            )));
        }
        Err(e) => return Err(e.into()),
    }
    let filename = file.filename.clone();
    let scanned = path.clone();
    let report = tokio::task::spawn_blocking(move || -> std::io::Result<data::Report> {
        let f = std::fs::File::open(&scanned)?;
        Ok(data::scan(
            std::io::BufReader::new(f),
            Format::from_filename(&filename),
            5,
            |_, _| {},
        ))
    })
    .await;
    let _ = tokio::fs::remove_file(&path).await;
    let report = report.map_err(|e| ApiError::Internal(format!("data check task: {e}")))??;
    if !report.is_ok() {
        return Ok(Err(fail(
            code,
            param,
            format!("file '{file_id}' is not valid: {}", report.summary()),
        )));
    }
    let scan = Scan {
        shape: report.shape,
        labels: report.labels.len(),
        non_numeric_label_line: report.first_non_numeric_label.map(|(line, _)| line),
    };
    Ok(check_shape(spec, &scan, file_id, code, param))
}

fn check_shape(
    spec: &JobSpec,
    scan: &Scan,
    file_id: &str,
    code: &str,
    param: &str,
) -> Result<(), JobError> {
    let (task, labels) = (spec.task, scan.labels);
    let Some(shape) = scan.shape else {
        return Err(fail(
            code,
            param,
            format!("file '{file_id}' holds no examples"),
        ));
    };
    match (spec.dpo.is_some(), shape == Shape::Preference) {
        (true, false) => {
            return Err(fail(
                code,
                param,
                format!(
                    "file '{file_id}' holds `{}` records, but method 'dpo' trains on preference pairs (`input`, `preferred_output` and `non_preferred_output`, or `prompt`, `chosen` and `rejected`)",
                    shape.as_str()
                ),
            ))
        }
        (false, true) => {
            return Err(fail(
                code,
                param,
                format!(
                    "file '{file_id}' holds preference pairs, which train a job of method 'dpo' (`\"method\": {{\"type\": \"dpo\"}}`)"
                ),
            ))
        }
        (true, true) => return Ok(()),
        (false, false) => {}
    }
    if !shape.fits(task) {
        let need = match task {
            Task::CausalLm => "chat `messages`, `prompt`/`completion` or `text` records",
            Task::SequenceClassification | Task::SequenceRegression => "`text` + `label` records",
            Task::MultiLabelClassification => "`text` + `labels` (a list) records",
            Task::QuestionAnswering => {
                "`question` + `context` + `answers` records (SQuAD's layout)"
            }
            Task::TokenClassification => {
                "`tokens` + `tags` records (JSONL) or a CoNLL file (`.conll`: a word and its tag per line)"
            }
        };
        let instead = Task::ALL
            .into_iter()
            .filter(|t| shape.fits(*t))
            .map(|t| format!("'{}'", t.as_str()))
            .collect::<Vec<_>>()
            .join(" or ");
        return Err(fail(
            code,
            param,
            format!(
                "file '{file_id}' holds `{}` records, but task '{}' needs {need}; these records suit task {instead}",
                shape.as_str(),
                task.as_str()
            ),
        ));
    }
    match task {
        Task::SequenceRegression if scan.non_numeric_label_line.is_some() => Err(fail(
            code,
            param,
            format!(
                "file '{file_id}' line {}: the label is not a number; task 'sequence_regression' trains on numeric labels (for named classes use 'sequence_classification')",
                scan.non_numeric_label_line.unwrap_or_default()
            ),
        )),
        Task::SequenceClassification | Task::MultiLabelClassification
            if labels < 2 && param == "training_file" =>
        {
            Err(fail(
                code,
                param,
                format!("file '{file_id}' has {labels} distinct label(s); classification needs at least 2"),
            ))
        }
        Task::TokenClassification if labels < 2 && param == "training_file" => Err(fail(
            code,
            param,
            format!("file '{file_id}' has {labels} distinct tag(s); token classification needs at least 2"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs() {
        assert!(glob(
            "transformer.h.*.attn.*",
            "transformer.h.3.attn.c_attn.weight"
        ));
        assert!(glob("*", "x"));
        assert!(glob("a*b*c", "aXbYc"));
        assert!(!glob("a*b*c", "aXc"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
    }
}
