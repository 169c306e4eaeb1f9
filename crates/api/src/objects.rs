//! The JSON objects the API answers, in OpenAI's shapes (nullable fields present as null) plus
//! tuna's extensions.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use tuna_core::spec::JobSpec;
use tuna_db::rows::{CheckpointRow, EventRow, FileRow, JobRow, ModelRow};

fn ts(t: &DateTime<Utc>) -> i64 {
    t.timestamp()
}

fn opt_ts(t: &Option<DateTime<Utc>>) -> Value {
    t.as_ref().map_or(Value::Null, |t| json!(t.timestamp()))
}

/// A `fine_tuning.job`. Hyperparameters are the resolved ones of the stored spec.
pub fn job(row: &JobRow) -> Value {
    let spec: Option<JobSpec> = JobSpec::deserialize(&row.spec).ok();
    let (hyperparameters, method, task, dataset_url, validation_dataset_url) = match &spec {
        Some(s) => (
            s.openai_hyperparameters(),
            s.method(),
            json!(s.task),
            json!(s.dataset_url),
            json!(s.validation_dataset_url),
        ),
        None => (
            json!({}),
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
        ),
    };
    json!({
        "id": row.job_id,
        "object": "fine_tuning.job",
        "created_at": ts(&row.created_at),
        "error": row.error,
        "fine_tuned_model": row.fine_tuned_model,
        "finished_at": opt_ts(&row.finished_at),
        "hyperparameters": hyperparameters,
        "model": row.model,
        "organization_id": row.organization_id,
        "result_files": row.result_files,
        "status": row.status,
        "trained_tokens": row.trained_tokens,
        "training_file": row.training_file,
        "validation_file": row.validation_file,
        "seed": row.seed,
        "estimated_finish": opt_ts(&row.estimated_finish),
        "integrations": row.integrations,
        "metadata": row.metadata,
        "method": method,
        "user_provided_suffix": row.suffix,
        "task": task,
        "dataset_url": dataset_url,
        "validation_dataset_url": validation_dataset_url,
        "progress": row.progress,
        "attempt": row.attempt,
        "max_attempts": row.max_attempts,
        "checkpoint_step": row.checkpoint_step,
        "started_at": opt_ts(&row.started_at),
        "cancel_requested": row.cancel_requested_at.is_some(),
        "pause_requested": row.pause_requested_at.is_some(),
    })
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

/// A `model`; `architecture` is tuna's extension.
pub fn model(row: &ModelRow) -> Value {
    json!({
        "id": row.model_id,
        "object": "model",
        "created": ts(&row.created_at),
        "owned_by": row.organization_id.as_deref().unwrap_or("tuna"),
        "kind": row.kind,
        "architecture": row.architecture,
    })
}
