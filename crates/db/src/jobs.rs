//! Reading jobs for the API (writes go through `queue`).

use serde_json::Value;
use sqlx::PgPool;
use tuna_core::status::JobStatus;

use crate::rows::{FileRow, JobRow, ModelRow};
use crate::Result;

/// The `metadata` filter of a job listing.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataFilter {
    Any,
    /// Only jobs without metadata (`metadata=null`).
    Null,
    /// Jobs whose metadata holds all these pairs.
    Contains(Value),
}

/// A job of the organisation (`db`: the pool, or a connection).
pub async fn get_job<'e>(
    db: impl sqlx::PgExecutor<'e>,
    organization_id: &str,
    job_id: &str,
) -> Result<Option<JobRow>> {
    Ok(
        sqlx::query_as("select * from jobs where job_id = $1 and organization_id = $2")
            .bind(job_id)
            .bind(organization_id)
            .fetch_optional(db)
            .await?,
    )
}

/// Which jobs a listing shows: all of [`MetadataFilter`], the status and the model must match.
#[derive(Debug, Clone, PartialEq)]
pub struct JobFilter {
    pub metadata: MetadataFilter,
    pub status: Option<JobStatus>,
    /// The job's `model` (its base model, or the fine-tuned model it started from).
    pub model: Option<String>,
}

/// Up to `limit` jobs of the organisation, newest first, after the job `after`, that match
/// `filter`.
pub async fn list_jobs(
    pool: &PgPool,
    organization_id: &str,
    after: Option<&str>,
    limit: i64,
    filter: &JobFilter,
) -> Result<Vec<JobRow>> {
    let (null_only, contains) = match &filter.metadata {
        MetadataFilter::Any => (false, None),
        MetadataFilter::Null => (true, None),
        MetadataFilter::Contains(v) => (false, Some(v)),
    };
    Ok(sqlx::query_as(
        "select * from jobs where organization_id = $1 \
           and ($2::text is null or seq < (select seq from jobs where job_id = $2 and organization_id = $1)) \
           and (not $3 or metadata is null or metadata = 'null'::jsonb) \
           and ($4::jsonb is null or metadata @> $4) \
           and ($5::text is null or status = $5) \
           and ($6::text is null or model = $6) \
         order by seq desc limit $7",
    )
    .bind(organization_id)
    .bind(after)
    .bind(null_only)
    .bind(contains)
    .bind(filter.status.map(JobStatus::as_str))
    .bind(filter.model.as_deref())
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Jobs of the organisation waiting to run (`validating_files` or `queued`).
pub async fn count_pending(pool: &PgPool, organization_id: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "select count(*) from jobs where organization_id = $1 and status in ('validating_files', 'queued')",
    )
    .bind(organization_id)
    .fetch_one(pool)
    .await?)
}

/// What creating a job needs to know about its model and files, read in one round trip.
#[derive(Debug, Clone, Default)]
pub struct CreateContext {
    /// The model as [`crate::models::get_model`] finds it.
    pub model: Option<ModelRow>,
    /// The live files as [`crate::files::get_file`] finds them.
    pub training_file: Option<FileRow>,
    pub validation_file: Option<FileRow>,
}

/// Reads the model and the input files of a new job with one statement (`db`: the pool, or a
/// connection) (each part is the same
/// lookup as `models::get_model` and `files::get_file`; absent ids give `None`).
pub async fn create_context<'e>(
    db: impl sqlx::PgExecutor<'e>,
    organization_id: &str,
    model_id: &str,
    training_file: Option<&str>,
    validation_file: Option<&str>,
) -> Result<CreateContext> {
    let (model, training, validation): (Option<Value>, Option<Value>, Option<Value>) =
        sqlx::query_as(
            "select (select to_jsonb(m) from models m \
                     where m.model_id = $2 and (m.organization_id is null or m.organization_id = $1)), \
                    (select to_jsonb(f) from files f \
                     where f.file_id = $3 and f.organization_id = $1 and f.deleted_at is null), \
                    (select to_jsonb(f) from files f \
                     where f.file_id = $4 and f.organization_id = $1 and f.deleted_at is null)",
        )
        .bind(organization_id)
        .bind(model_id)
        .bind(training_file)
        .bind(validation_file)
        .fetch_one(db)
        .await?;
    fn decode<T: serde::de::DeserializeOwned>(v: Option<Value>) -> Result<Option<T>> {
        v.map(serde_json::from_value)
            .transpose()
            .map_err(|e| sqlx::Error::Decode(e.into()).into())
    }
    Ok(CreateContext {
        model: decode(model)?,
        training_file: decode(training)?,
        validation_file: decode(validation)?,
    })
}

/// The job created earlier with this idempotency key, if any (`db`: the pool, or a
/// connection).
pub async fn by_idempotency_key<'e>(
    db: impl sqlx::PgExecutor<'e>,
    organization_id: &str,
    key: &str,
) -> Result<Option<JobRow>, sqlx::Error> {
    sqlx::query_as("select * from jobs where organization_id = $1 and idempotency_key = $2")
        .bind(organization_id)
        .bind(key)
        .fetch_optional(db)
        .await
}
