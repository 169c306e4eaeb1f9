//! Insert-to-claim latency: an idle claimer that waits on the queue's LISTEN wake-ups
//! ([`tuna_db::queue::Listener`]) and claims with [`tuna_db::queue::claim`], like a worker with
//! nothing to do, while jobs are made claimable one at a time with gaps.
//!
//! Two producers:
//! - queue level: the bench inserts a job ([`queue::insert_job`]) and then makes it claimable
//!   with [`queue::finish_validation`] (the `queued` update + `NOTIFY` in one transaction). The
//!   latency runs from the start of that call to `claim()` returning the job.
//! - end to end: `POST /v1/fine_tuning/jobs`; the server validates the job and queues it. The
//!   latency runs from sending the request to `claim()` returning the job, and the database's
//!   own clock splits it into insert -> queued (validation) and queued -> claim.
//!
//! Also: draining a backlog of queued jobs with several claimers (claims per second).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tuna_core::ids;
use tuna_db::keys::DEFAULT_ORG;
use tuna_db::queue::{self, Listener, NewJob, Wake, WorkerInfo};
use tuna_db::PgPool;

use crate::http::Api;
use crate::stats::Summary;
use tuna_core::status::JobStatus;

/// The lease the bench's claims take; nothing renews it, and the jobs are left `running`.
const LEASE: Duration = Duration::from_secs(3600);

/// How a claim was triggered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Notify,
    Poll,
    Reconnect,
}

/// One claimed job.
pub struct ClaimEvent {
    pub job_id: String,
    pub at: Instant,
    pub via: Via,
}

fn worker(name: &str) -> WorkerInfo {
    WorkerInfo {
        worker_id: format!("bench-{name}-{}", std::process::id()),
        hostname: "tuna-bench".into(),
        device_kind: "cpu".into(),
        gpu_name: None,
        gpu_memory_mb: None,
        memory_bytes: None,
        labels: json!({"bench": true}),
    }
}

/// The idle claimer: a task that sleeps on the listener and, on every wake-up, claims until
/// nothing is left.
pub struct Claimer {
    pub events: mpsc::UnboundedReceiver<ClaimEvent>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Claimer {
    /// Registers a worker, connects its listener and starts waiting. `poll` is the fallback
    /// poll interval (claims it triggers are counted apart).
    pub async fn start(pool: &PgPool, poll: Duration) -> anyhow::Result<Claimer> {
        let w = worker("idle");
        queue::register_worker(pool, &w)
            .await
            .context("registering the bench worker")?;
        let mut listener = Listener::connect(pool)
            .await
            .context("connecting the LISTEN connection")?;
        let (tx, events) = mpsc::unbounded_channel();
        let (stop, mut stopped) = watch::channel(false);
        let pool = pool.clone();
        let task = tokio::spawn(async move {
            loop {
                let wake = tokio::select! {
                    w = listener.next(poll) => w,
                    _ = stopped.changed() => return Ok(()),
                };
                let via = match wake {
                    Wake::JobsQueued => Via::Notify,
                    Wake::Timeout => Via::Poll,
                    Wake::Reconnected => Via::Reconnect,
                    Wake::Control(_) => continue,
                };
                while let Some(c) = queue::claim(&pool, &w, LEASE).await? {
                    let at = Instant::now();
                    let _ = tx.send(ClaimEvent {
                        job_id: c.job.job_id,
                        at,
                        via,
                    });
                }
            }
        });
        Ok(Claimer { events, stop, task })
    }

    /// Waits for the claim of `job_id` (claims of other jobs are returned too, in order).
    pub async fn until(
        &mut self,
        job_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<Vec<ClaimEvent>> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) => {
                    let done = e.job_id == job_id;
                    seen.push(e);
                    if done {
                        return Ok(seen);
                    }
                }
                Ok(None) => bail!("the claimer stopped: {}", self.error().await),
                Err(_) => bail!("job {job_id} was not claimed within {timeout:?}"),
            }
        }
    }

    async fn error(&mut self) -> String {
        match (&mut self.task).await {
            Ok(Ok(())) => "no error".into(),
            Ok(Err(e)) => format!("{e:#}"),
            Err(e) => e.to_string(),
        }
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => bail!("the claimer task failed: {e}"),
        }
    }
}

/// Result of a latency phase.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyResult {
    pub jobs: usize,
    pub gap_ms: u64,
    /// Queue level: start of `finish_validation` (queued + NOTIFY, committed) -> claim returned.
    pub notify_to_claim: Option<Summary>,
    /// End to end: create request sent -> claim returned.
    pub request_to_claim: Option<Summary>,
    /// End to end, database clock: job inserted (`created_at`) -> queued event.
    pub db_insert_to_queued: Option<Summary>,
    /// End to end, database clock: queued event -> claim transaction (`attempted_at`).
    pub db_queued_to_claim: Option<Summary>,
    /// Claims triggered by the fallback poll or a reconnect instead of a notification.
    pub claims_not_by_notify: usize,
}

fn queue_job() -> NewJob {
    NewJob {
        job_id: ids::new_id(ids::JOB),
        organization_id: DEFAULT_ORG.to_string(),
        model: "tuna-bench".into(),
        training_file: None,
        validation_file: None,
        spec: json!({"tuna_bench": true}),
        suffix: None,
        seed: 0,
        metadata: Some(json!({"tuna_bench": "queue"})),
        integrations: None,
        priority: 0,
        required_device: None,
        min_gpu_memory_mb: None,
        idempotency_key: None,
        max_attempts: 1,
        memory_estimate: None,
    }
}

/// Queue level: `jobs` jobs, one at a time, `gap` apart.
pub async fn queue_latency(
    producer: &PgPool,
    claimer: &mut Claimer,
    jobs: usize,
    gap: Duration,
) -> anyhow::Result<LatencyResult> {
    let mut lat = Vec::with_capacity(jobs);
    let mut not_notify = 0;
    for _ in 0..jobs {
        let job = queue_job();
        queue::insert_job(producer, &job)
            .await
            .context("inserting a job")?;
        let t0 = Instant::now();
        queue::finish_validation(producer, &job.job_id, Ok(()))
            .await
            .context("queueing a job")?;
        for e in claimer.until(&job.job_id, Duration::from_secs(30)).await? {
            if e.via != Via::Notify {
                not_notify += 1;
            }
            if e.job_id == job.job_id {
                lat.push(e.at.saturating_duration_since(t0));
            }
        }
        tokio::time::sleep(gap).await;
    }
    Ok(LatencyResult {
        jobs,
        gap_ms: gap.as_millis() as u64,
        notify_to_claim: Some(Summary::of(&mut lat)),
        request_to_claim: None,
        db_insert_to_queued: None,
        db_queued_to_claim: None,
        claims_not_by_notify: not_notify,
    })
}

/// A job's `created_at`, the start of its queueing transaction and its `attempted_at`.
type Stamps = (DateTime<Utc>, Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// End to end: `jobs` jobs created over HTTP, one at a time, `gap` apart.
pub async fn http_latency(
    api: &Api,
    body: &Value,
    db: &PgPool,
    claimer: &mut Claimer,
    jobs: usize,
    gap: Duration,
) -> anyhow::Result<LatencyResult> {
    let mut e2e = Vec::with_capacity(jobs);
    let mut ids = Vec::with_capacity(jobs);
    let mut not_notify = 0;
    for _ in 0..jobs {
        let t0 = Instant::now();
        let a = api.create_job(body).await?;
        let job = a.body.unwrap_or(Value::Null);
        if a.status != 200 {
            bail!("creating a job answered {}: {job}", a.status);
        }
        let id = job["id"].as_str().context("no job id")?.to_string();
        for e in claimer.until(&id, Duration::from_secs(30)).await? {
            if e.via != Via::Notify {
                not_notify += 1;
            }
            if e.job_id == id {
                e2e.push(e.at.saturating_duration_since(t0));
            }
        }
        ids.push(id);
        tokio::time::sleep(gap).await;
    }
    // The database's clock: created_at is the insert transaction's start, the queued event's
    // created_at the queueing transaction's start, attempted_at the claim transaction's start.
    let rows: Vec<Stamps> = sqlx::query_as(
        "select j.created_at, \
                (select min(e.created_at) from job_events e where e.job_id = j.job_id \
                   and e.message like 'Files validated%'), \
                j.attempted_at \
         from jobs j where j.job_id = any($1)",
    )
    .bind(&ids)
    .fetch_all(db)
    .await
    .context("reading the jobs' timestamps")?;
    let span = |a: DateTime<Utc>, b: DateTime<Utc>| (b - a).to_std().unwrap_or(Duration::ZERO);
    let mut validation = Vec::new();
    let mut queued_to_claim = Vec::new();
    for (created, queued, attempted) in rows {
        if let Some(q) = queued {
            validation.push(span(created, q));
            if let Some(a) = attempted {
                queued_to_claim.push(span(q, a));
            }
        }
    }
    Ok(LatencyResult {
        jobs,
        gap_ms: gap.as_millis() as u64,
        notify_to_claim: None,
        request_to_claim: Some(Summary::of(&mut e2e)),
        db_insert_to_queued: Some(Summary::of(&mut validation)),
        db_queued_to_claim: Some(Summary::of(&mut queued_to_claim)),
        claims_not_by_notify: not_notify,
    })
}

/// Result of draining the backlog.
#[derive(Debug, Clone, Serialize)]
pub struct DrainResult {
    pub claimers: usize,
    pub claimed: usize,
    pub seconds: f64,
    pub claims_per_s: f64,
}

/// Number of jobs in `status`.
pub async fn count(db: &PgPool, status: JobStatus) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("select count(*) from jobs where status = $1")
            .bind(status.as_str())
            .fetch_one(db)
            .await?,
    )
}

/// Waits until no job is in `validating_files` (the server validates in the background).
pub async fn wait_validated(db: &PgPool, timeout: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let n = count(db, JobStatus::ValidatingFiles).await?;
        if n == 0 {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("{n} jobs still in validating_files after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Claims every queued job with `claimers` concurrent claim loops.
pub async fn drain(db: &PgPool, claimers: usize) -> anyhow::Result<DrainResult> {
    let claimers = claimers.max(1);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..claimers {
        let w = worker(&format!("drain{c}"));
        queue::register_worker(db, &w).await?;
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            while queue::claim(&db, &w, LEASE).await?.is_some() {
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut claimed = 0;
    for t in tasks {
        claimed += t.await.context("a drain task failed")??;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(DrainResult {
        claimers,
        claimed,
        seconds,
        claims_per_s: claimed as f64 / seconds,
    })
}
