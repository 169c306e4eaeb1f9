//! The job queue: jobs move through `tuna_core::status::JobStatus` only through this module.
//!
//! ```text
//! insert_job -> validating_files --finish_validation--> queued | failed
//! queued --claim--> running --complete--> succeeded
//!                           --fail--> queued (attempt+1, if attempt < max_attempts) | failed
//!                           --finish_cancelled--> cancelled   --release_paused--> paused
//!                           --release--> queued (clean give-up, nothing counted)
//!                           --rescue_expired--> queued (infra_retries+1) | failed | cancelled | paused
//! queued|paused|validating_files --request_cancel--> cancelled;  queued --request_pause--> paused
//! paused --resume--> queued (checkpoint kept: the next run resumes from it)
//! ```
//!
//! Invariants (each function keeps them; the schema checks the first two):
//! - A job has a lease (`lease_owner`, `lease_token`, `lease_expires_at`) if and only if it is
//!   `running`; `finished_at` is set if and only if it is terminal.
//! - Claiming is one short transaction: a CTE selects the best queued job the worker can run
//!   (`priority desc, scheduled_at, seq`) with `FOR UPDATE SKIP LOCKED LIMIT 1` (the CTE is the
//!   planner fence that keeps the update to that one row) and sets a fresh random lease token.
//!   No transaction stays open while a job runs. A job is never held by two leases.
//! - All times come from the database's `now()`, never from a worker's clock.
//! - Every write a worker makes about its job (heartbeat, events, checkpoints, completion,
//!   failure, release) is fenced by `job_id AND lease_token AND status = 'running'`. A worker
//!   whose lease was rescued or whose job was finished elsewhere changes nothing and gets
//!   [`QueueError::LeaseLost`]; it must stop training at once.
//! - A worker must also stop by itself if it cannot renew its lease before `lease_expires_at`.
//!   [`rescue_expired`] re-queues jobs whose lease expired, counting `infra_retries` apart from
//!   job failures (`attempt` / `max_attempts`); when `infra_retries` reaches
//!   `max_infra_retries` the job fails with code `worker_lost`. A pending cancel or pause is
//!   honoured instead of re-queueing. Each rescue writes a warning event naming the lost worker
//!   and the checkpoint step the next run resumes from.
//! - `attempt` is the job's current attempt (1 from the first claim on). Only a job failure
//!   ([`fail`]) moves to the next attempt; lost workers, releases and pauses do not.
//! - Capabilities: a job with `required_device` only goes to workers of that device kind; a job
//!   with `min_gpu_memory_mb` only to workers with at least that much GPU memory; draining
//!   workers get nothing.
//! - Cancel and pause of a running job set `cancel_requested_at` / `pause_requested_at` and
//!   notify [`CHANNEL_CONTROL`] (JSON [`ControlMessage`]) in the same transaction; the lease
//!   holder learns it from the notification or, at the latest, from its next [`heartbeat`].
//!   Jobs that are not running are cancelled or paused at once.
//! - Every change that makes a job claimable notifies [`CHANNEL_QUEUED`] (constant payload, so
//!   Postgres folds duplicates). Notifications are hints: [`Listener::next`] also returns
//!   [`Wake::Timeout`] after the poll interval and [`Wake::Reconnected`] after a lost
//!   connection, and the worker then tries to claim anyway.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio::sync::mpsc;
use tuna_core::ids;
use tuna_core::status::JobStatus;
use uuid::Uuid;

use crate::rows::{CheckpointRow, JobRow};

/// Notified (payload `queued`) whenever a job becomes claimable.
pub const CHANNEL_QUEUED: &str = "tuna_jobs_queued";
/// Notified with a JSON [`ControlMessage`] when a running job is asked to cancel or pause.
pub const CHANNEL_CONTROL: &str = "tuna_job_control";

/// Errors of the worker-side queue functions.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The fencing check failed: the lease expired and was rescued, or the job is no longer
    /// running under this token. The worker must stop working on the job.
    #[error("the lease on job {job_id} is lost (it expired or the job is no longer running under this lease)")]
    LeaseLost { job_id: String },
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

pub type Result<T, E = QueueError> = std::result::Result<T, E>;

/// Errors of the user-facing control functions (cancel, pause, resume).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("job not found")]
    NotFound,
    /// The job's state does not allow the request; the message says why.
    #[error("{0}")]
    Conflict(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

/// A job's error, stored in `jobs.error` as `{code, message, param}` (OpenAI's shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

impl JobError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> JobError {
        JobError {
            code: code.into(),
            message: message.into(),
            param: None,
        }
    }

    fn to_json(&self) -> Value {
        json!({"code": self.code, "message": self.message, "param": self.param})
    }
}

/// Event severity (`job_events.level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// Event type (`job_events.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Message,
    Metrics,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Message => "message",
            EventKind::Metrics => "metrics",
        }
    }
}

async fn insert_event(
    conn: &mut PgConnection,
    job_id: &str,
    level: Level,
    message: &str,
    data: Option<&Value>,
    kind: EventKind,
) -> sqlx::Result<()> {
    sqlx::query("insert into job_events (event_id, job_id, level, message, data, type) values ($1, $2, $3, $4, $5, $6)")
        .bind(ids::new_id(ids::EVENT))
        .bind(job_id)
        .bind(level.as_str())
        .bind(message)
        .bind(data)
        .bind(kind.as_str())
        .execute(conn)
        .await?;
    Ok(())
}

async fn notify_queued(conn: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::query("select pg_notify($1, 'queued')")
        .bind(CHANNEL_QUEUED)
        .execute(conn)
        .await?;
    Ok(())
}

/// What a worker is asked to do with a running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlAction {
    Cancel,
    Pause,
}

/// Payload of [`CHANNEL_CONTROL`] notifications.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlMessage {
    pub job_id: String,
    pub action: ControlAction,
    /// The lease holder when the request was made.
    pub worker_id: Option<String>,
}

async fn notify_control(
    conn: &mut PgConnection,
    job: &JobRow,
    action: ControlAction,
) -> sqlx::Result<()> {
    let msg = ControlMessage {
        job_id: job.job_id.clone(),
        action,
        worker_id: job.lease_owner.clone(),
    };
    let payload = serde_json::to_string(&msg).unwrap_or_default();
    sqlx::query("select pg_notify($1, $2)")
        .bind(CHANNEL_CONTROL)
        .bind(payload)
        .execute(conn)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// API side: creating jobs, validation, control.
// ---------------------------------------------------------------------------------------------

/// A job to create (status `validating_files`).
#[derive(Debug, Clone)]
pub struct NewJob {
    pub job_id: String,
    pub organization_id: String,
    pub model: String,
    pub training_file: Option<String>,
    pub validation_file: Option<String>,
    pub spec: Value,
    pub suffix: Option<String>,
    pub seed: i64,
    pub metadata: Option<Value>,
    pub integrations: Option<Value>,
    pub priority: i32,
    pub required_device: Option<String>,
    pub min_gpu_memory_mb: Option<i64>,
    pub idempotency_key: Option<String>,
    pub max_attempts: i32,
    /// The memory planner's estimate (`tuna_core::memory::JobEstimates` as JSON), if the
    /// model's config could be read.
    pub memory_estimate: Option<Value>,
}

/// Result of [`insert_job`].
#[derive(Debug, Clone)]
pub enum Inserted {
    Created(JobRow),
    /// A job with the same `(organization_id, idempotency_key)` already existed; it is returned
    /// unchanged.
    Existing(JobRow),
}

impl Inserted {
    pub fn job(&self) -> &JobRow {
        match self {
            Inserted::Created(j) | Inserted::Existing(j) => j,
        }
    }

    pub fn into_job(self) -> JobRow {
        match self {
            Inserted::Created(j) | Inserted::Existing(j) => j,
        }
    }
}

/// Creates a job in `validating_files` with a "Created fine-tuning job: <id>" event, or returns
/// the existing job with the same idempotency key.
pub async fn insert_job(pool: &PgPool, job: &NewJob) -> Result<Inserted> {
    check_device(job)?;
    let mut tx = pool.begin().await?;
    let query = sqlx::query_as(
        "insert into jobs (job_id, organization_id, status, model, training_file, validation_file, spec, suffix, seed, \
                           metadata, integrations, priority, required_device, min_gpu_memory_mb, idempotency_key, max_attempts, \
                           memory_estimate) \
         values ($1, $2, 'validating_files', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, greatest($15, 1), $16) \
         on conflict (organization_id, idempotency_key) where idempotency_key is not null do nothing \
         returning *",
    );
    let created: Option<JobRow> = bind_new_job(query, job).fetch_optional(&mut *tx).await?;
    if let Some(row) = created {
        let msg = format!("Created fine-tuning job: {}", row.job_id);
        insert_event(
            &mut tx,
            &row.job_id,
            Level::Info,
            &msg,
            None,
            EventKind::Message,
        )
        .await?;
        tx.commit().await?;
        return Ok(Inserted::Created(row));
    }
    tx.commit().await?;
    // The insert did nothing, so the key is set and its job exists.
    let key = job.idempotency_key.as_deref().unwrap_or_default();
    match crate::jobs::by_idempotency_key(pool, &job.organization_id, key).await? {
        Some(row) => Ok(Inserted::Existing(row)),
        None => Err(sqlx::Error::RowNotFound.into()),
    }
}

/// Inserts a job whose checks already ran (the API checks a job inline when everything it needs
/// is in the database): straight to `queued` (workers notified) when `outcome` is `Ok`, or to
/// `failed` with the error stored. The same rows and events as [`insert_job`] followed by
/// [`finish_validation`], in one statement and one commit. An existing job with the same
/// idempotency key is returned unchanged, as [`insert_job`] does.
///
/// The checks may have used remembered rows, so the insert only happens while the job's
/// training and validation files are still live (not deleted): `None` when one is gone, and
/// nothing was written.
pub async fn insert_checked_job(
    conn: &mut PgConnection,
    job: &NewJob,
    outcome: &Result<(), JobError>,
) -> Result<Option<Inserted>> {
    check_device(job)?;
    let error = outcome.as_ref().err().map(JobError::to_json);
    let (level, message) = match outcome {
        Ok(()) => (Level::Info, "Files validated, moving job to queued state"),
        Err(e) => (Level::Error, e.message.as_str()),
    };
    // The events' `seq` follows the order of the VALUES rows (created, then the outcome), and
    // the NOTIFY reaches workers when the statement commits.
    let query = sqlx::query_as(
        "with j as ( \
           insert into jobs (job_id, organization_id, status, model, training_file, validation_file, spec, suffix, \
                             seed, metadata, integrations, priority, required_device, min_gpu_memory_mb, \
                             idempotency_key, max_attempts, memory_estimate, error, finished_at) \
           select $1, $2, case when $17::jsonb is null then 'queued' else 'failed' end, $3, $4, $5, $6, $7, $8, \
                  $9, $10, $11, $12, $13, $14, greatest($15, 1), $16, $17, case when $17::jsonb is null then null else now() end \
           where ($4::text is null or exists (select 1 from files f where f.file_id = $4 \
                                              and f.organization_id = $2 and f.deleted_at is null)) \
             and ($5::text is null or exists (select 1 from files f where f.file_id = $5 \
                                              and f.organization_id = $2 and f.deleted_at is null)) \
           on conflict (organization_id, idempotency_key) where idempotency_key is not null do nothing \
           returning *), \
         e as ( \
           insert into job_events (event_id, job_id, level, message, data, type) \
           select v.event_id, j.job_id, v.level, v.message, v.data, 'message' \
           from j cross join (values (1, $18, 'info', 'Created fine-tuning job: ' || $1, null::jsonb), \
                                     (2, $19, $20, $21, $17::jsonb)) as v (n, event_id, level, message, data) \
           order by v.n) \
         select j.*, case when j.status = 'queued' then pg_notify($22, 'queued') is null end as notified from j",
    );
    let created: Option<JobRow> = bind_new_job(query, job)
        .bind(&error)
        .bind(ids::new_id(ids::EVENT))
        .bind(ids::new_id(ids::EVENT))
        .bind(level.as_str())
        .bind(message)
        .bind(CHANNEL_QUEUED)
        .fetch_optional(&mut *conn)
        .await?;
    if let Some(row) = created {
        return Ok(Some(Inserted::Created(row)));
    }
    // Nothing inserted: an earlier job with this idempotency key, or a file gone.
    let Some(key) = &job.idempotency_key else {
        return Ok(None);
    };
    Ok(
        crate::jobs::by_idempotency_key(conn, &job.organization_id, key)
            .await?
            .map(Inserted::Existing),
    )
}

/// Binds a new job's columns as `$1` to `$16`, in the order both inserts list them.
fn bind_new_job<'q>(
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, JobRow, sqlx::postgres::PgArguments>,
    job: &'q NewJob,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, JobRow, sqlx::postgres::PgArguments> {
    query
        .bind(&job.job_id)
        .bind(&job.organization_id)
        .bind(&job.model)
        .bind(&job.training_file)
        .bind(&job.validation_file)
        .bind(&job.spec)
        .bind(&job.suffix)
        .bind(job.seed)
        .bind(&job.metadata)
        .bind(&job.integrations)
        .bind(job.priority)
        .bind(&job.required_device)
        .bind(job.min_gpu_memory_mb)
        .bind(&job.idempotency_key)
        .bind(job.max_attempts)
        .bind(&job.memory_estimate)
}

fn check_device(job: &NewJob) -> Result<()> {
    match job.required_device.as_deref() {
        None | Some("cpu" | "cuda") => Ok(()),
        Some(dev) => Err(QueueError::Invalid(format!(
            "required_device must be 'cpu' or 'cuda', not '{dev}'"
        ))),
    }
}

/// Ends file validation: `validating_files` -> `queued` (and notifies workers) or `failed`
/// (error stored, error event). `None` when the job is not in `validating_files` (for example
/// cancelled meanwhile).
pub async fn finish_validation(
    pool: &PgPool,
    job_id: &str,
    outcome: Result<(), JobError>,
) -> Result<Option<JobRow>> {
    let mut tx = pool.begin().await?;
    let row: Option<JobRow> = match &outcome {
        Ok(()) => {
            sqlx::query_as("update jobs set status = 'queued' where job_id = $1 and status = 'validating_files' returning *")
                .bind(job_id)
                .fetch_optional(&mut *tx)
                .await?
        }
        Err(e) => sqlx::query_as(
            "update jobs set status = 'failed', finished_at = now(), error = $2 \
             where job_id = $1 and status = 'validating_files' returning *",
        )
        .bind(job_id)
        .bind(e.to_json())
        .fetch_optional(&mut *tx)
        .await?,
    };
    let Some(row) = row else {
        return Ok(None);
    };
    match &outcome {
        Ok(()) => {
            insert_event(
                &mut tx,
                job_id,
                Level::Info,
                "Files validated, moving job to queued state",
                None,
                EventKind::Message,
            )
            .await?;
            notify_queued(&mut tx).await?;
        }
        Err(e) => {
            let data = e.to_json();
            insert_event(
                &mut tx,
                job_id,
                Level::Error,
                &e.message,
                Some(&data),
                EventKind::Message,
            )
            .await?;
        }
    }
    tx.commit().await?;
    Ok(Some(row))
}

/// Jobs still in `validating_files`, oldest first (to finish after a server restart).
pub async fn validating_jobs(pool: &PgPool) -> Result<Vec<JobRow>> {
    Ok(
        sqlx::query_as("select * from jobs where status = 'validating_files' order by seq")
            .fetch_all(pool)
            .await?,
    )
}

/// One job by id.
pub async fn job(pool: &PgPool, job_id: &str) -> Result<Option<JobRow>> {
    Ok(sqlx::query_as("select * from jobs where job_id = $1")
        .bind(job_id)
        .fetch_optional(pool)
        .await?)
}

/// Number of jobs per status (statuses with no job are absent), sorted by status.
pub async fn count_by_status(pool: &PgPool) -> Result<Vec<(JobStatus, i64)>> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("select status, count(*) from jobs group by status order by status")
            .fetch_all(pool)
            .await?;
    rows.into_iter()
        .map(|(s, n)| {
            Ok((
                s.parse::<JobStatus>()
                    .map_err(|e| sqlx::Error::Decode(e.into()))?,
                n,
            ))
        })
        .collect()
}

async fn lock_for_control(
    conn: &mut PgConnection,
    organization_id: &str,
    job_id: &str,
) -> Result<JobRow, ControlError> {
    sqlx::query_as("select * from jobs where job_id = $1 and organization_id = $2 for update")
        .bind(job_id)
        .bind(organization_id)
        .fetch_optional(conn)
        .await?
        .ok_or(ControlError::NotFound)
}

/// Cancels a job. Jobs validating, queued or paused are cancelled at once; a running job gets
/// `cancel_requested_at` and its worker is notified (it stays `running` until the worker
/// finishes it, or the rescuer finds its lease expired). Repeating the request on a running job
/// is harmless. Terminal jobs: `Conflict`.
pub async fn request_cancel(
    pool: &PgPool,
    organization_id: &str,
    job_id: &str,
) -> Result<JobRow, ControlError> {
    let mut tx = pool.begin().await?;
    let job = lock_for_control(&mut tx, organization_id, job_id).await?;
    let row: JobRow = match job.status {
        JobStatus::ValidatingFiles | JobStatus::Queued | JobStatus::Paused => {
            let row = sqlx::query_as(
                "update jobs set status = 'cancelled', finished_at = now(), cancel_requested_at = now(), \
                 pause_requested_at = null where job_id = $1 returning *",
            )
            .bind(job_id)
            .fetch_one(&mut *tx)
            .await?;
            insert_event(
                &mut tx,
                job_id,
                Level::Info,
                "Job cancelled",
                None,
                EventKind::Message,
            )
            .await?;
            row
        }
        JobStatus::Running => {
            let row = sqlx::query_as(
                "update jobs set cancel_requested_at = coalesce(cancel_requested_at, now()) where job_id = $1 returning *",
            )
            .bind(job_id)
            .fetch_one(&mut *tx)
            .await?;
            if job.cancel_requested_at.is_none() {
                insert_event(
                    &mut tx,
                    job_id,
                    Level::Info,
                    "Cancellation requested",
                    None,
                    EventKind::Message,
                )
                .await?;
            }
            notify_control(&mut tx, &job, ControlAction::Cancel).await?;
            row
        }
        other @ (JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled) => {
            return Err(ControlError::Conflict(format!("job is already {other}")))
        }
    };
    tx.commit().await?;
    Ok(row)
}

/// Pauses a job. A queued job is paused at once; a running job gets `pause_requested_at` and
/// its worker is notified (it saves a checkpoint and calls [`release_paused`]). Anything else:
/// `Conflict`.
pub async fn request_pause(
    pool: &PgPool,
    organization_id: &str,
    job_id: &str,
) -> Result<JobRow, ControlError> {
    let mut tx = pool.begin().await?;
    let job = lock_for_control(&mut tx, organization_id, job_id).await?;
    let row: JobRow = match job.status {
        JobStatus::Queued => {
            let row =
                sqlx::query_as("update jobs set status = 'paused' where job_id = $1 returning *")
                    .bind(job_id)
                    .fetch_one(&mut *tx)
                    .await?;
            insert_event(
                &mut tx,
                job_id,
                Level::Info,
                "Job paused",
                None,
                EventKind::Message,
            )
            .await?;
            row
        }
        JobStatus::Running if job.cancel_requested_at.is_some() => {
            return Err(ControlError::Conflict("job is being cancelled".to_string()))
        }
        JobStatus::Running => {
            let row = sqlx::query_as(
                "update jobs set pause_requested_at = coalesce(pause_requested_at, now()) where job_id = $1 returning *",
            )
            .bind(job_id)
            .fetch_one(&mut *tx)
            .await?;
            if job.pause_requested_at.is_none() {
                insert_event(
                    &mut tx,
                    job_id,
                    Level::Info,
                    "Pause requested",
                    None,
                    EventKind::Message,
                )
                .await?;
            }
            notify_control(&mut tx, &job, ControlAction::Pause).await?;
            row
        }
        JobStatus::Paused => {
            return Err(ControlError::Conflict("job is already paused".to_string()))
        }
        other @ (JobStatus::ValidatingFiles
        | JobStatus::Succeeded
        | JobStatus::Failed
        | JobStatus::Cancelled) => {
            return Err(ControlError::Conflict(format!(
                "cannot pause a job that is {other}"
            )))
        }
    };
    tx.commit().await?;
    Ok(row)
}

/// Resumes a paused job: back to `queued` (workers notified), keeping `checkpoint_step` and
/// `checkpoint_uri` so the next run continues from there. Anything else: `Conflict`.
pub async fn resume(
    pool: &PgPool,
    organization_id: &str,
    job_id: &str,
) -> Result<JobRow, ControlError> {
    let mut tx = pool.begin().await?;
    let job = lock_for_control(&mut tx, organization_id, job_id).await?;
    if job.status != JobStatus::Paused {
        return Err(ControlError::Conflict(format!(
            "cannot resume a job that is {} (only paused jobs)",
            job.status
        )));
    }
    let row: JobRow =
        sqlx::query_as("update jobs set status = 'queued', pause_requested_at = null where job_id = $1 returning *")
            .bind(job_id)
            .fetch_one(&mut *tx)
            .await?;
    let msg = match row.checkpoint_step {
        Some(step) => format!("Job resumed; it will continue from checkpoint step {step}"),
        None => "Job resumed".to_string(),
    };
    insert_event(&mut tx, job_id, Level::Info, &msg, None, EventKind::Message).await?;
    notify_queued(&mut tx).await?;
    tx.commit().await?;
    Ok(row)
}

// ---------------------------------------------------------------------------------------------
// Worker side.
// ---------------------------------------------------------------------------------------------

/// What a worker offers; stored in `workers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub hostname: String,
    /// `cpu` or `cuda`.
    pub device_kind: String,
    pub gpu_name: Option<String>,
    pub gpu_memory_mb: Option<i64>,
    /// The memory a job may use on this worker, in bytes (`None`: unknown).
    #[serde(default)]
    pub memory_bytes: Option<i64>,
    pub labels: Value,
}

/// Registers (or re-registers) a worker. Must precede [`claim`].
pub async fn register_worker(pool: &PgPool, w: &WorkerInfo) -> Result<()> {
    if w.device_kind != "cpu" && w.device_kind != "cuda" {
        return Err(QueueError::Invalid(format!(
            "device_kind must be 'cpu' or 'cuda', not '{}'",
            w.device_kind
        )));
    }
    sqlx::query(
        "insert into workers (worker_id, hostname, device_kind, gpu_name, gpu_memory_mb, labels, memory_bytes) \
         values ($1, $2, $3, $4, $5, $6, $7) \
         on conflict (worker_id) do update set hostname = excluded.hostname, device_kind = excluded.device_kind, \
           gpu_name = excluded.gpu_name, gpu_memory_mb = excluded.gpu_memory_mb, labels = excluded.labels, \
           memory_bytes = excluded.memory_bytes, started_at = now(), last_heartbeat_at = now()",
    )
    .bind(&w.worker_id)
    .bind(&w.hostname)
    .bind(&w.device_kind)
    .bind(&w.gpu_name)
    .bind(w.gpu_memory_mb)
    .bind(&w.labels)
    .bind(w.memory_bytes)
    .execute(pool)
    .await?;
    Ok(())
}

/// A live worker's capacity, for the API's check that a new job fits somewhere.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct WorkerCapacity {
    pub worker_id: String,
    pub device_kind: String,
    pub gpu_name: Option<String>,
    pub gpu_memory_mb: Option<i64>,
    pub memory_bytes: i64,
}

/// Workers that may still claim jobs (not draining, heard from within `within`) and said how
/// much memory a job may use on them.
pub async fn worker_capacities(pool: &PgPool, within: Duration) -> Result<Vec<WorkerCapacity>> {
    Ok(sqlx::query_as(
        "select worker_id, device_kind, gpu_name, gpu_memory_mb, memory_bytes from workers \
         where not draining and memory_bytes is not null \
           and last_heartbeat_at > now() - make_interval(secs => $1) \
         order by worker_id",
    )
    .bind(secs(within))
    .fetch_all(pool)
    .await?)
}

/// Refreshes the worker's `last_heartbeat_at`; returns whether it is asked to drain (claim
/// nothing new).
pub async fn worker_heartbeat(pool: &PgPool, worker_id: &str) -> Result<bool> {
    let draining: Option<bool> = sqlx::query_scalar(
        "update workers set last_heartbeat_at = now() where worker_id = $1 returning draining",
    )
    .bind(worker_id)
    .fetch_optional(pool)
    .await?;
    Ok(draining.unwrap_or(false))
}

/// Sets a worker's `draining` flag (a draining worker claims nothing).
pub async fn set_worker_draining(pool: &PgPool, worker_id: &str, draining: bool) -> Result<()> {
    sqlx::query("update workers set draining = $2 where worker_id = $1")
        .bind(worker_id)
        .bind(draining)
        .execute(pool)
        .await?;
    Ok(())
}

/// The right to work on one job, until `lease_expires_at` unless renewed by [`heartbeat`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: String,
    /// The fencing token; every worker write carries it.
    pub token: Uuid,
    pub worker_id: String,
}

/// A claimed job and its lease.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub job: JobRow,
    pub lease: Lease,
}

fn secs(ttl: Duration) -> f64 {
    ttl.as_secs_f64()
}

/// Claims the best queued job this worker can run (highest `priority`, then oldest
/// `scheduled_at`, then `seq`), with a lease of `ttl`. Sets `started_at` on the first run and
/// `attempted_at` on every run; writes a "started" or "restarted" event. `None` when nothing
/// fits (or the worker is draining).
pub async fn claim(pool: &PgPool, worker: &WorkerInfo, ttl: Duration) -> Result<Option<Claimed>> {
    let token = Uuid::new_v4();
    let mut tx = pool.begin().await?;
    let job: Option<JobRow> = sqlx::query_as(
        "with c as ( \
           select job_id from jobs \
           where status = 'queued' and scheduled_at <= now() \
             and (required_device is null or required_device = $2) \
             and (min_gpu_memory_mb is null or min_gpu_memory_mb <= $3) \
             and not exists (select 1 from workers w where w.worker_id = $1 and w.draining) \
           order by priority desc, scheduled_at, seq \
           limit 1 \
           for update skip locked) \
         update jobs j set status = 'running', attempt = greatest(j.attempt, 1), attempted_at = now(), \
           started_at = coalesce(j.started_at, now()), lease_owner = $1, lease_token = $4, \
           lease_expires_at = now() + make_interval(secs => $5), pause_requested_at = null \
         from c where j.job_id = c.job_id \
         returning j.*",
    )
    .bind(&worker.worker_id)
    .bind(&worker.device_kind)
    .bind(worker.gpu_memory_mb.unwrap_or(0))
    .bind(token)
    .bind(secs(ttl))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(job) = job else {
        return Ok(None);
    };
    let first = job.started_at == job.attempted_at;
    let msg = if first {
        "Fine-tuning job started".to_string()
    } else {
        match job.checkpoint_step {
            Some(step) => format!(
                "Job restarted on worker {}, resuming from checkpoint step {step}",
                worker.worker_id
            ),
            None => format!(
                "Job restarted on worker {} from the beginning",
                worker.worker_id
            ),
        }
    };
    let data = json!({"worker_id": worker.worker_id, "attempt": job.attempt, "infra_retries": job.infra_retries,
                      "checkpoint_step": job.checkpoint_step});
    insert_event(
        &mut tx,
        &job.job_id,
        Level::Info,
        &msg,
        Some(&data),
        EventKind::Message,
    )
    .await?;
    sqlx::query("update workers set last_heartbeat_at = now() where worker_id = $1")
        .bind(&worker.worker_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let lease = Lease {
        job_id: job.job_id.clone(),
        token,
        worker_id: worker.worker_id.clone(),
    };
    Ok(Some(Claimed { job, lease }))
}

/// What the lease holder should do, as of its last heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop, then call [`finish_cancelled`].
    Cancel,
    /// Save a checkpoint, stop, then call [`release_paused`].
    Pause,
}

/// Renews the lease for `ttl` from now (also refreshing the worker's heartbeat), stores
/// `progress` when given and, from `remaining` (the trainer's estimate of the time left), sets
/// `estimated_finish` to the database's `now()` plus it. Returns the pending control request;
/// `LeaseLost` when the lease is gone.
pub async fn heartbeat(
    pool: &PgPool,
    lease: &Lease,
    ttl: Duration,
    progress: Option<&Value>,
    remaining: Option<Duration>,
) -> Result<Control> {
    let flags: Option<(bool, bool)> = sqlx::query_as(
        "with w as (update workers set last_heartbeat_at = now() where worker_id = $6) \
         update jobs set lease_expires_at = now() + make_interval(secs => $3), progress = coalesce($4, progress), \
           estimated_finish = coalesce(now() + make_interval(secs => $5), estimated_finish) \
         where job_id = $1 and lease_token = $2 and status = 'running' \
         returning cancel_requested_at is not null, pause_requested_at is not null",
    )
    .bind(&lease.job_id)
    .bind(lease.token)
    .bind(secs(ttl))
    .bind(progress)
    .bind(remaining.map(secs))
    .bind(&lease.worker_id)
    .fetch_optional(pool)
    .await?;
    match flags {
        None => Err(lost(lease)),
        Some((true, _)) => Ok(Control::Cancel),
        Some((false, true)) => Ok(Control::Pause),
        Some((false, false)) => Ok(Control::Continue),
    }
}

fn lost(lease: &Lease) -> QueueError {
    QueueError::LeaseLost {
        job_id: lease.job_id.clone(),
    }
}

/// Appends an event to the leased job (fenced).
pub async fn append_event(
    pool: &PgPool,
    lease: &Lease,
    level: Level,
    message: &str,
    data: Option<&Value>,
    kind: EventKind,
) -> Result<()> {
    let done = sqlx::query(
        "insert into job_events (event_id, job_id, level, message, data, type) \
         select $3, job_id, $4, $5, $6, $7 from jobs \
         where job_id = $1 and lease_token = $2 and status = 'running' for share",
    )
    .bind(&lease.job_id)
    .bind(lease.token)
    .bind(ids::new_id(ids::EVENT))
    .bind(level.as_str())
    .bind(message)
    .bind(data)
    .bind(kind.as_str())
    .execute(pool)
    .await?;
    if done.rows_affected() == 0 {
        return Err(lost(lease));
    }
    Ok(())
}

/// Locks the leased job row for a transition, or `LeaseLost`.
async fn lock_leased(conn: &mut PgConnection, lease: &Lease) -> Result<JobRow> {
    sqlx::query_as("select * from jobs where job_id = $1 and lease_token = $2 and status = 'running' for update")
        .bind(&lease.job_id)
        .bind(lease.token)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| lost(lease))
}

/// Records a checkpoint of the leased job: a `checkpoints` row (`ftckpt-` id,
/// `fine_tuned_model_checkpoint` = `<model_name>:ckpt-step-<step>`; recording the same step
/// again replaces it) and the job's `checkpoint_step` / `checkpoint_uri` (= `artifact_prefix`),
/// which a later run resumes from.
pub async fn record_checkpoint(
    pool: &PgPool,
    lease: &Lease,
    step: i64,
    metrics: &Value,
    artifact_prefix: &str,
    model_name: &str,
) -> Result<CheckpointRow> {
    let mut tx = pool.begin().await?;
    lock_leased(&mut tx, lease).await?;
    sqlx::query("update jobs set checkpoint_step = $2, checkpoint_uri = $3 where job_id = $1")
        .bind(&lease.job_id)
        .bind(step)
        .bind(artifact_prefix)
        .execute(&mut *tx)
        .await?;
    let row: CheckpointRow = sqlx::query_as(
        "insert into checkpoints (checkpoint_id, job_id, step_number, metrics, fine_tuned_model_checkpoint, artifact_prefix) \
         values ($1, $2, $3, $4, $5, $6) \
         on conflict (job_id, step_number) do update set metrics = excluded.metrics, \
           fine_tuned_model_checkpoint = excluded.fine_tuned_model_checkpoint, artifact_prefix = excluded.artifact_prefix, \
           created_at = now() \
         returning *",
    )
    .bind(ids::new_id(ids::CHECKPOINT))
    .bind(&lease.job_id)
    .bind(step)
    .bind(metrics)
    .bind(format!("{model_name}:ckpt-step-{step}"))
    .bind(artifact_prefix)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(row)
}

/// The outcome of a successful run.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    pub fine_tuned_model: String,
    pub trained_tokens: Option<i64>,
    /// File ids of result files (`result_files` of the job).
    pub result_files: Vec<String>,
    /// The `files` row of a results file already in the store, written in the same fenced
    /// transaction (a worker that lost its lease leaves no row behind).
    pub results_file: Option<ResultsFile>,
    /// When set, a `models` row (`kind = 'fine_tuned'`, owned by the job's organisation) is
    /// written for `fine_tuned_model` at this artifact-store prefix.
    pub model_location: Option<String>,
    /// Architecture summary for the `models` row.
    pub architecture: Option<Value>,
}

/// A results file of a job (`purpose = 'fine-tune-results'`, CSV).
#[derive(Debug, Clone, Default)]
pub struct ResultsFile {
    pub file_id: String,
    pub filename: String,
    pub bytes: i64,
    /// Data rows (the header not counted).
    pub rows: i64,
    pub storage_key: String,
    pub sha256: String,
}

const CLEAR_LEASE: &str = "lease_owner = null, lease_token = null, lease_expires_at = null";

/// Marks the leased job `succeeded` with its outputs (fenced).
pub async fn complete(pool: &PgPool, lease: &Lease, done: &Completion) -> Result<JobRow> {
    let mut tx = pool.begin().await?;
    let job = lock_leased(&mut tx, lease).await?;
    let row: JobRow = sqlx::query_as(&format!(
        "update jobs set status = 'succeeded', finished_at = now(), {CLEAR_LEASE}, pause_requested_at = null, \
           fine_tuned_model = $2, trained_tokens = $3, result_files = $4, error = null, estimated_finish = null \
         where job_id = $1 returning *"
    ))
    .bind(&lease.job_id)
    .bind(&done.fine_tuned_model)
    .bind(done.trained_tokens)
    .bind(json!(done.result_files))
    .fetch_one(&mut *tx)
    .await?;
    if let Some(f) = &done.results_file {
        sqlx::query(
            "insert into files (file_id, organization_id, filename, purpose, bytes, status, format, example_count, storage_key, sha256) \
             values ($1, $2, $3, 'fine-tune-results', $4, 'processed', 'csv', $5, $6, $7)",
        )
        .bind(&f.file_id)
        .bind(&job.organization_id)
        .bind(&f.filename)
        .bind(f.bytes)
        .bind(f.rows)
        .bind(&f.storage_key)
        .bind(&f.sha256)
        .execute(&mut *tx)
        .await?;
    }
    if let Some(location) = &done.model_location {
        sqlx::query(
            "insert into models (model_id, organization_id, kind, location, job_id, architecture) \
             values ($1, $2, 'fine_tuned', $3, $4, $5) \
             on conflict (model_id) do update set location = excluded.location, architecture = excluded.architecture",
        )
        .bind(&done.fine_tuned_model)
        .bind(&job.organization_id)
        .bind(location)
        .bind(&lease.job_id)
        .bind(done.architecture.clone().unwrap_or_else(|| json!({})))
        .execute(&mut *tx)
        .await?;
    }
    let msg = format!("New fine-tuned model created: {}", done.fine_tuned_model);
    insert_event(
        &mut tx,
        &lease.job_id,
        Level::Info,
        &msg,
        None,
        EventKind::Message,
    )
    .await?;
    insert_event(
        &mut tx,
        &lease.job_id,
        Level::Info,
        "The job has successfully completed",
        None,
        EventKind::Message,
    )
    .await?;
    tx.commit().await?;
    Ok(row)
}

/// A job failure (fenced), retried at once. See [`fail_with_retry_delay`].
pub async fn fail(pool: &PgPool, lease: &Lease, error: &JobError) -> Result<JobRow> {
    fail_with_retry_delay(pool, lease, error, Duration::ZERO).await
}

/// A job failure (fenced). With attempts left (`attempt < max_attempts`) the job moves to its
/// next attempt: queued again after `retry_delay` (or paused / cancelled when that was
/// requested meanwhile). Otherwise it fails with `error`.
pub async fn fail_with_retry_delay(
    pool: &PgPool,
    lease: &Lease,
    error: &JobError,
    retry_delay: Duration,
) -> Result<JobRow> {
    let mut tx = pool.begin().await?;
    let job = lock_leased(&mut tx, lease).await?;
    let data = error.to_json();
    let row: JobRow = if job.cancel_requested_at.is_some() {
        insert_event(
            &mut tx,
            &job.job_id,
            Level::Error,
            &error.message,
            Some(&data),
            EventKind::Message,
        )
        .await?;
        insert_event(
            &mut tx,
            &job.job_id,
            Level::Info,
            "Job cancelled",
            None,
            EventKind::Message,
        )
        .await?;
        sqlx::query_as(&format!(
            "update jobs set status = 'cancelled', finished_at = now(), {CLEAR_LEASE}, pause_requested_at = null \
             where job_id = $1 returning *"
        ))
        .bind(&job.job_id)
        .fetch_one(&mut *tx)
        .await?
    } else if job.attempt < job.max_attempts {
        let next = if job.pause_requested_at.is_some() {
            JobStatus::Paused
        } else {
            JobStatus::Queued
        };
        let msg = format!(
            "Attempt {} of {} failed: {}; the job will be retried",
            job.attempt, job.max_attempts, error.message
        );
        insert_event(
            &mut tx,
            &job.job_id,
            Level::Warn,
            &msg,
            Some(&data),
            EventKind::Message,
        )
        .await?;
        let row = sqlx::query_as(&format!(
            "update jobs set status = $2, attempt = attempt + 1, {CLEAR_LEASE}, pause_requested_at = null, \
               scheduled_at = now() + make_interval(secs => $3) \
             where job_id = $1 returning *"
        ))
        .bind(&job.job_id)
        .bind(next.as_str())
        .bind(secs(retry_delay))
        .fetch_one(&mut *tx)
        .await?;
        if next == JobStatus::Queued {
            notify_queued(&mut tx).await?;
        }
        row
    } else {
        insert_event(
            &mut tx,
            &job.job_id,
            Level::Error,
            &error.message,
            Some(&data),
            EventKind::Message,
        )
        .await?;
        sqlx::query_as(&format!(
            "update jobs set status = 'failed', finished_at = now(), error = $2, {CLEAR_LEASE}, pause_requested_at = null \
             where job_id = $1 returning *"
        ))
        .bind(&job.job_id)
        .bind(&data)
        .fetch_one(&mut *tx)
        .await?
    };
    tx.commit().await?;
    Ok(row)
}

/// The worker stopped the leased job on a cancel request (or by its own decision): `cancelled`.
pub async fn finish_cancelled(pool: &PgPool, lease: &Lease) -> Result<JobRow> {
    let mut tx = pool.begin().await?;
    lock_leased(&mut tx, lease).await?;
    let row: JobRow = sqlx::query_as(&format!(
        "update jobs set status = 'cancelled', finished_at = now(), {CLEAR_LEASE}, pause_requested_at = null, \
           cancel_requested_at = coalesce(cancel_requested_at, now()) \
         where job_id = $1 returning *"
    ))
    .bind(&lease.job_id)
    .fetch_one(&mut *tx)
    .await?;
    insert_event(
        &mut tx,
        &lease.job_id,
        Level::Info,
        "Job cancelled",
        None,
        EventKind::Message,
    )
    .await?;
    tx.commit().await?;
    Ok(row)
}

/// The worker stopped the leased job on a pause request after saving its checkpoint: `paused`
/// (the checkpoint columns stay; [`resume`] queues it again).
pub async fn release_paused(pool: &PgPool, lease: &Lease) -> Result<JobRow> {
    let mut tx = pool.begin().await?;
    lock_leased(&mut tx, lease).await?;
    let row: JobRow = sqlx::query_as(&format!(
        "update jobs set status = 'paused', {CLEAR_LEASE}, pause_requested_at = null where job_id = $1 returning *"
    ))
    .bind(&lease.job_id)
    .fetch_one(&mut *tx)
    .await?;
    let msg = match row.checkpoint_step {
        Some(step) => format!("Job paused at checkpoint step {step}"),
        None => "Job paused".to_string(),
    };
    insert_event(
        &mut tx,
        &lease.job_id,
        Level::Info,
        &msg,
        None,
        EventKind::Message,
    )
    .await?;
    tx.commit().await?;
    Ok(row)
}

/// The worker gives the job back without a verdict (shutting down): `queued` again, nothing
/// counted (or `cancelled` / `paused` when that was requested meanwhile).
pub async fn release(pool: &PgPool, lease: &Lease) -> Result<JobRow> {
    let mut tx = pool.begin().await?;
    let job = lock_leased(&mut tx, lease).await?;
    let (status, msg) = if job.cancel_requested_at.is_some() {
        (JobStatus::Cancelled, "Job cancelled".to_string())
    } else if job.pause_requested_at.is_some() {
        (JobStatus::Paused, "Job paused".to_string())
    } else {
        (
            JobStatus::Queued,
            format!(
                "Worker {} released the job; it is queued again",
                lease.worker_id
            ),
        )
    };
    let row: JobRow = sqlx::query_as(&format!(
        "update jobs set status = $2, {CLEAR_LEASE}, pause_requested_at = null, \
           finished_at = case when $2 = 'cancelled' then now() end \
         where job_id = $1 returning *"
    ))
    .bind(&lease.job_id)
    .bind(status.as_str())
    .fetch_one(&mut *tx)
    .await?;
    insert_event(
        &mut tx,
        &lease.job_id,
        Level::Info,
        &msg,
        None,
        EventKind::Message,
    )
    .await?;
    if status == JobStatus::Queued {
        notify_queued(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(row)
}

/// Rescues running jobs whose lease expired (at most 100 per call; safe to run on several
/// servers at once: rows are taken with SKIP LOCKED). Each goes back to `queued` with
/// `infra_retries + 1`, or fails with code `worker_lost` once `max_infra_retries` is reached;
/// a pending cancel or pause request is honoured instead. Returns the rescued job ids.
pub async fn rescue_expired(pool: &PgPool) -> Result<Vec<String>> {
    let mut tx = pool.begin().await?;
    let expired: Vec<JobRow> = sqlx::query_as(
        "select * from jobs where status = 'running' and lease_expires_at < now() \
         order by lease_expires_at limit 100 for update skip locked",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut requeued = false;
    let mut ids = Vec::with_capacity(expired.len());
    for job in expired {
        let worker = job
            .lease_owner
            .clone()
            .unwrap_or_else(|| "(unknown)".to_string());
        let resume_from = match job.checkpoint_step {
            Some(step) => format!("will resume from checkpoint step {step}"),
            None => "will restart from the beginning".to_string(),
        };
        let (status, level, msg, error): (JobStatus, Level, String, Option<Value>) = if job
            .cancel_requested_at
            .is_some()
        {
            (
                JobStatus::Cancelled,
                Level::Warn,
                format!("Worker {worker} was lost while cancelling; job cancelled"),
                None,
            )
        } else if job.pause_requested_at.is_some() {
            (
                JobStatus::Paused,
                Level::Warn,
                format!("Worker {worker} was lost while pausing; job paused, resume {resume_from}"),
                None,
            )
        } else if job.infra_retries < job.max_infra_retries {
            let msg = format!(
                "Worker {worker} stopped renewing its lease; the job was re-queued (infrastructure retry {} of {}) and {resume_from}",
                job.infra_retries + 1,
                job.max_infra_retries
            );
            (JobStatus::Queued, Level::Warn, msg, None)
        } else {
            let e = JobError::new(
                "worker_lost",
                format!(
                    "The job's worker was lost {} times; giving up",
                    job.infra_retries + 1
                ),
            );
            (
                JobStatus::Failed,
                Level::Error,
                e.message.clone(),
                Some(e.to_json()),
            )
        };
        sqlx::query(&format!(
            "update jobs set status = $2, {CLEAR_LEASE}, pause_requested_at = null, \
               infra_retries = infra_retries + case when $2 = 'queued' then 1 else 0 end, \
               finished_at = case when $2 in ('failed', 'cancelled') then now() end, \
               error = coalesce($3, error) \
             where job_id = $1"
        ))
        .bind(&job.job_id)
        .bind(status.as_str())
        .bind(&error)
        .execute(&mut *tx)
        .await?;
        let data = json!({"reason": "lease_expired", "worker_id": job.lease_owner, "status": status,
                          "infra_retries": job.infra_retries + i32::from(status == JobStatus::Queued),
                          "checkpoint_step": job.checkpoint_step});
        insert_event(
            &mut tx,
            &job.job_id,
            level,
            &msg,
            Some(&data),
            EventKind::Message,
        )
        .await?;
        requeued |= status == JobStatus::Queued;
        ids.push(job.job_id);
    }
    if requeued {
        notify_queued(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(ids)
}

// ---------------------------------------------------------------------------------------------
// Wake-ups.
// ---------------------------------------------------------------------------------------------

/// Why [`Listener::next`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// A job became claimable.
    JobsQueued,
    /// A running job was asked to cancel or pause.
    Control(ControlMessage),
    /// The LISTEN connection was lost and re-established; notifications may have been missed.
    Reconnected,
    /// Nothing arrived within the poll interval: poll anyway.
    Timeout,
}

/// LISTENs on [`CHANNEL_QUEUED`] and [`CHANNEL_CONTROL`] on a dedicated connection in a
/// background task. The connection is taken from the pool for the listener's lifetime (size the
/// pool accordingly) and re-established when lost ([`Wake::Reconnected`]). Dropping the
/// listener stops the task.
pub struct Listener {
    rx: mpsc::UnboundedReceiver<Wake>,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    /// Connects and starts listening; notifications sent after this returns are delivered.
    pub async fn connect(pool: &PgPool) -> Result<Listener> {
        let mut pg = PgListener::connect_with(pool).await?;
        pg.listen_all([CHANNEL_QUEUED, CHANNEL_CONTROL]).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut lost = false;
            loop {
                let wake = match pg.try_recv().await {
                    Ok(Some(n)) => {
                        if lost {
                            lost = false;
                            if tx.send(Wake::Reconnected).is_err() {
                                return;
                            }
                        }
                        if n.channel() == CHANNEL_CONTROL {
                            match serde_json::from_str::<ControlMessage>(n.payload()) {
                                Ok(m) => Wake::Control(m),
                                Err(e) => {
                                    tracing::warn!(payload = n.payload(), error = %e, "bad control notification");
                                    continue;
                                }
                            }
                        } else {
                            Wake::JobsQueued
                        }
                    }
                    // Connection lost and re-established (sqlx re-LISTENs).
                    Ok(None) => Wake::Reconnected,
                    Err(e) => {
                        if tx.is_closed() {
                            return;
                        }
                        if !lost {
                            tracing::warn!(error = %e, "LISTEN connection lost; retrying");
                        }
                        lost = true;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                if tx.send(wake).is_err() {
                    return;
                }
            }
        });
        Ok(Listener { rx, task })
    }

    /// The next wake-up, or [`Wake::Timeout`] after `poll`.
    pub async fn next(&mut self, poll: Duration) -> Wake {
        match tokio::time::timeout(poll, self.rx.recv()).await {
            Ok(Some(w)) => w,
            Ok(None) => {
                // The task ended (cannot happen while we hold the receiver); behave as polling.
                tokio::time::sleep(poll).await;
                Wake::Timeout
            }
            Err(_) => Wake::Timeout,
        }
    }

    /// A wake-up already received, without waiting.
    pub fn try_next(&mut self) -> Option<Wake> {
        self.rx.try_recv().ok()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}
