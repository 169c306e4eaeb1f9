//! Row types shared by the queue and the API-facing queries. Columns as in migrations/0001_init.sql.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::{PgTypeInfo, PgValueRef};
use sqlx::Postgres;
use tuna_core::spec::JobSpec;
use tuna_core::status::JobStatus;
use uuid::Uuid;

/// A job's `spec` column, read straight from the column's bytes into a [`JobSpec`]. A stored
/// spec that no longer reads (written by another version) is kept as its error rather than
/// failing the whole row, so listings still work and the job can fail with a clear message.
#[derive(Debug, Clone)]
pub struct SpecColumn(pub Result<JobSpec, String>);

impl SpecColumn {
    /// The spec, or why the stored one cannot be read.
    pub fn get(&self) -> Result<&JobSpec, &str> {
        self.0.as_ref().map_err(String::as_str)
    }
}

impl sqlx::Type<Postgres> for SpecColumn {
    fn type_info() -> PgTypeInfo {
        <sqlx::types::Json<JobSpec> as sqlx::Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <sqlx::types::Json<JobSpec> as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, Postgres> for SpecColumn {
    fn decode(value: PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        Ok(SpecColumn(
            <sqlx::types::Json<JobSpec> as sqlx::Decode<'r, Postgres>>::decode(value)
                .map(|j| j.0)
                .map_err(|e| e.to_string()),
        ))
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub job_id: String,
    pub seq: i64,
    pub organization_id: String,
    #[sqlx(try_from = "String")]
    pub status: JobStatus,
    pub model: String,
    pub training_file: Option<String>,
    pub validation_file: Option<String>,
    /// The resolved job spec.
    pub spec: SpecColumn,
    pub suffix: Option<String>,
    pub seed: i64,
    pub metadata: Option<Value>,
    pub integrations: Option<Value>,
    pub priority: i32,
    pub required_device: Option<String>,
    pub min_gpu_memory_mb: Option<i64>,
    pub attempt: i32,
    pub max_attempts: i32,
    pub infra_retries: i32,
    pub max_infra_retries: i32,
    pub lease_owner: Option<String>,
    pub lease_token: Option<Uuid>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub attempted_at: Option<DateTime<Utc>>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub pause_requested_at: Option<DateTime<Utc>>,
    pub checkpoint_step: Option<i64>,
    pub checkpoint_uri: Option<String>,
    pub progress: Option<Value>,
    pub estimated_finish: Option<DateTime<Utc>>,
    /// See migrations/0006_memory.sql.
    pub memory_estimate: Option<Value>,
    pub fine_tuned_model: Option<String>,
    pub trained_tokens: Option<i64>,
    pub result_files: Value,
    pub error: Option<Value>,
    pub idempotency_key: Option<String>,
    pub scheduled_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, sqlx::FromRow, serde::Deserialize)]
pub struct FileRow {
    pub file_id: String,
    pub seq: i64,
    pub organization_id: String,
    pub filename: String,
    pub purpose: String,
    pub bytes: i64,
    pub status: String,
    pub status_details: Option<String>,
    pub format: Option<String>,
    pub example_count: Option<i64>,
    pub storage_key: String,
    pub sha256: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub deleted_at: Option<DateTime<Utc>>,
    /// Distinct labels of a processed text+label file (migration 0003).
    pub label_count: Option<i32>,
    /// The first line whose label is not a number (migration 0007).
    pub non_numeric_label_line: Option<i64>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    pub event_id: String,
    pub seq: i64,
    pub job_id: String,
    pub created_at: DateTime<Utc>,
    pub level: String,
    pub message: String,
    pub data: Option<Value>,
    #[sqlx(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CheckpointRow {
    pub checkpoint_id: String,
    pub seq: i64,
    pub job_id: String,
    pub step_number: i64,
    pub metrics: Value,
    pub fine_tuned_model_checkpoint: String,
    pub artifact_prefix: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, sqlx::FromRow, serde::Deserialize)]
pub struct ModelRow {
    pub model_id: String,
    pub seq: i64,
    pub organization_id: Option<String>,
    pub kind: String,
    pub location: String,
    pub job_id: Option<String>,
    pub architecture: Value,
    pub created_at: DateTime<Utc>,
}
