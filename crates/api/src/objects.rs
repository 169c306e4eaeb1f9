//! The JSON objects the API answers, in OpenAI's shapes (nullable fields present as null) plus
//! tuna's extensions.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::{json, Value};
use tuna_core::spec::{JobSpec, Method, OpenAiHyperparameters, Task};
use tuna_core::status::JobStatus;
use tuna_db::rows::{CheckpointRow, EventRow, FileRow, JobRow, ModelRow};

fn ts(t: &DateTime<Utc>) -> i64 {
    t.timestamp()
}

fn opt_ts(t: &Option<DateTime<Utc>>) -> Value {
    t.as_ref().map_or(Value::Null, |t| json!(t.timestamp()))
}

/// A JSON answer serialised once, straight from borrowed rows (no intermediate `Value`).
#[derive(Debug, Clone)]
pub struct Rendered(pub bytes::Bytes);

impl Rendered {
    pub fn new(value: &impl Serialize) -> Rendered {
        // Serialising these objects cannot fail: every map key is a string.
        Rendered(
            serde_json::to_vec(value)
                .expect("JSON objects serialise")
                .into(),
        )
    }
}

impl IntoResponse for Rendered {
    fn into_response(self) -> Response {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.0,
        )
            .into_response()
    }
}

/// Unix seconds, or null.
fn opt_secs<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => secs(t, s),
        None => s.serialize_none(),
    }
}

/// Unix seconds, as [`ts`].
fn secs<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_i64(ts(t))
}

/// `{}` when the stored spec cannot be read (the job itself says why when it runs).
fn or_empty<T: Serialize, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => v.serialize(s),
        None => s.serialize_map(Some(0))?.end(),
    }
}

/// A `fine_tuning.job`: OpenAI's fields (nullable ones present as null), then tuna's.
/// Hyperparameters are the resolved ones of the stored spec.
#[derive(Serialize)]
pub struct Job<'a> {
    id: &'a str,
    object: &'static str,
    #[serde(serialize_with = "secs")]
    created_at: DateTime<Utc>,
    error: &'a Option<Value>,
    fine_tuned_model: &'a Option<String>,
    #[serde(serialize_with = "opt_secs")]
    finished_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "or_empty")]
    hyperparameters: Option<OpenAiHyperparameters>,
    model: &'a str,
    organization_id: &'a str,
    result_files: &'a Value,
    status: JobStatus,
    trained_tokens: Option<i64>,
    training_file: &'a Option<String>,
    validation_file: &'a Option<String>,
    seed: i64,
    #[serde(serialize_with = "opt_secs")]
    estimated_finish: Option<DateTime<Utc>>,
    integrations: &'a Option<Value>,
    metadata: &'a Option<Value>,
    method: Option<Method<'a>>,
    user_provided_suffix: &'a Option<String>,
    task: Option<Task>,
    dataset_url: Option<&'a str>,
    validation_dataset_url: Option<&'a str>,
    progress: &'a Option<Value>,
    attempt: i32,
    max_attempts: i32,
    checkpoint_step: Option<i64>,
    #[serde(serialize_with = "opt_secs")]
    started_at: Option<DateTime<Utc>>,
    cancel_requested: bool,
    pause_requested: bool,
    /// The memory planner's estimate of the job's peak memory on either accelerator
    /// (`tuna_core::memory::JobEstimates`), null when the model's config could not be read.
    memory_estimate: &'a Option<Value>,
}

/// A `fine_tuning.job`.
pub fn job(row: &JobRow) -> Job<'_> {
    let spec = row.spec.get().ok();
    Job {
        id: &row.job_id,
        object: "fine_tuning.job",
        created_at: row.created_at,
        error: &row.error,
        fine_tuned_model: &row.fine_tuned_model,
        finished_at: row.finished_at,
        hyperparameters: spec.map(JobSpec::openai_hyperparameters),
        model: &row.model,
        organization_id: &row.organization_id,
        result_files: &row.result_files,
        status: row.status,
        trained_tokens: row.trained_tokens,
        training_file: &row.training_file,
        validation_file: &row.validation_file,
        seed: row.seed,
        estimated_finish: row.estimated_finish,
        integrations: &row.integrations,
        metadata: &row.metadata,
        method: spec.map(JobSpec::method),
        user_provided_suffix: &row.suffix,
        task: spec.map(|s| s.task),
        dataset_url: spec.and_then(|s| s.dataset_url.as_deref()),
        validation_dataset_url: spec.and_then(|s| s.validation_dataset_url.as_deref()),
        progress: &row.progress,
        attempt: row.attempt,
        max_attempts: row.max_attempts,
        checkpoint_step: row.checkpoint_step,
        started_at: row.started_at,
        cancel_requested: row.cancel_requested_at.is_some(),
        pause_requested: row.pause_requested_at.is_some(),
        memory_estimate: &row.memory_estimate,
    }
}

/// A `fine_tuning.job.event`.
pub fn event(row: &EventRow) -> Value {
    json!({
        "id": row.event_id,
        "object": "fine_tuning.job.event",
        "created_at": ts(&row.created_at),
        "level": row.level,
        "message": row.message,
        "data": row.data,
        "type": row.kind,
    })
}

/// A `fine_tuning.job.checkpoint`.
pub fn checkpoint(row: &CheckpointRow) -> Value {
    json!({
        "id": row.checkpoint_id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": ts(&row.created_at),
        "fine_tuning_job_id": row.job_id,
        "step_number": row.step_number,
        "fine_tuned_model_checkpoint": row.fine_tuned_model_checkpoint,
        "metrics": row.metrics,
    })
}

/// A `file`; `format` and `example_count` are tuna's extensions.
pub fn file(row: &FileRow) -> Value {
    json!({
        "id": row.file_id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": ts(&row.created_at),
        "expires_at": opt_ts(&row.expires_at),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": row.status,
        "status_details": row.status_details,
        "format": row.format,
        "example_count": row.example_count,
    })
}

/// A `model`; `kind`, `architecture` and `job_id` (the job that made a fine-tuned model) are
/// tuna's extensions.
pub fn model(row: &ModelRow) -> Value {
    json!({
        "id": row.model_id,
        "object": "model",
        "created": ts(&row.created_at),
        "owned_by": row.organization_id.as_deref().unwrap_or("tuna"),
        "kind": row.kind,
        "architecture": row.architecture,
        "job_id": row.job_id,
    })
}
