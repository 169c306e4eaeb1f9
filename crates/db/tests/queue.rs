//! The job queue against a real PostgreSQL (the shared private test cluster): exclusive claims
//! under concurrency, leases and fencing, the rescuer, cancel/pause/resume with notifications,
//! idempotent inserts, priorities and worker capabilities.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use tuna_core::status::JobStatus;
use tuna_db::queue::{
    self, Completion, Control, ControlAction, ControlError, EventKind, JobError, Level, NewJob,
    QueueError, Wake, WorkerInfo,
};
use tuna_db::testing::TestDb;

const TTL: Duration = Duration::from_secs(60);
const ORG: &str = "org-test";

async fn db() -> TestDb {
    let db = TestDb::new().await.expect("test database");
    sqlx::query("insert into organizations (organization_id, name) values ($1, 'test'), ('org-other', 'other')")
        .bind(ORG)
        .execute(&db.pool)
        .await
        .unwrap();
    db
}

fn new_job(id: &str) -> NewJob {
    NewJob {
        job_id: id.to_string(),
        organization_id: ORG.to_string(),
        model: "tiny-bert".to_string(),
        training_file: Some("file-train".to_string()),
        validation_file: None,
        spec: json!({"method": "supervised"}),
        suffix: None,
        seed: 42,
        metadata: None,
        integrations: None,
        priority: 0,
        required_device: None,
        min_gpu_memory_mb: None,
        idempotency_key: None,
        max_attempts: 1,
        memory_estimate: None,
    }
}

/// Inserts and validates a job: it ends up queued.
async fn queued(pool: &PgPool, job: NewJob) -> String {
    let id = job.job_id.clone();
    queue::insert_job(pool, &job).await.unwrap();
    queue::finish_validation(pool, &id, Ok(()))
        .await
        .unwrap()
        .expect("was validating");
    id
}

async fn worker(pool: &PgPool, id: &str, device: &str, gpu_memory_mb: Option<i64>) -> WorkerInfo {
    let w = WorkerInfo {
        worker_id: id.to_string(),
        hostname: "test-host".to_string(),
        device_kind: device.to_string(),
        gpu_name: gpu_memory_mb.map(|_| "Test GPU".to_string()),
        gpu_memory_mb,
        memory_bytes: None,
        labels: json!({}),
    };
    queue::register_worker(pool, &w).await.unwrap();
    w
}

async fn status(pool: &PgPool, id: &str) -> JobStatus {
    queue::job(pool, id).await.unwrap().unwrap().status
}

async fn events(pool: &PgPool, id: &str) -> Vec<(String, String, Option<Value>)> {
    sqlx::query_as("select level, message, data from job_events where job_id = $1 order by seq")
        .bind(id)
        .fetch_all(pool)
        .await
        .unwrap()
}

fn assert_lost<T: std::fmt::Debug>(r: Result<T, QueueError>) {
    match r {
        Err(QueueError::LeaseLost { .. }) => {}
        other => panic!("expected LeaseLost, got {other:?}"),
    }
}

/// Jobs and events keep their references without foreign keys (migration 0005): every job's
/// organisation exists and every event's job exists.
async fn assert_references_hold(pool: &PgPool) {
    let (orphan_jobs, orphan_events): (i64, i64) = sqlx::query_as(
        "select (select count(*) from jobs j where not exists \
                   (select 1 from organizations o where o.organization_id = j.organization_id)), \
                (select count(*) from job_events e where not exists \
                   (select 1 from jobs j where j.job_id = e.job_id))",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((orphan_jobs, orphan_events), (0, 0));
    let events: i64 = sqlx::query_scalar("select count(*) from job_events")
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(events > 0, "the test wrote no events to check");
}

async fn expire_lease(pool: &PgPool, id: &str) {
    sqlx::query("update jobs set lease_expires_at = now() - interval '1 second' where job_id = $1")
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claimers_claim_every_job_exactly_once() {
    let db = TestDb::with_pool_size(12).await.unwrap();
    let pool = db.pool.clone();
    sqlx::query("insert into organizations (organization_id, name) values ($1, 'test')")
        .bind(ORG)
        .execute(&pool)
        .await
        .unwrap();
    const JOBS: i64 = 400;
    sqlx::query(
        "insert into jobs (job_id, organization_id, status, model, spec, seed, priority) \
         select 'ftjob-' || i, $1, 'queued', 'm', '{}', i, (i % 7)::int from generate_series(1, $2) i",
    )
    .bind(ORG)
    .bind(JOBS)
    .execute(&pool)
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let info = worker(&pool, &format!("worker-{w}"), "cpu", None).await;
            let mut mine = Vec::new();
            while let Some(c) = queue::claim(&pool, &info, TTL).await.unwrap() {
                assert_eq!(c.job.status, JobStatus::Running);
                assert_eq!(c.job.lease_token, Some(c.lease.token));
                queue::heartbeat(&pool, &c.lease, TTL, None, None)
                    .await
                    .unwrap();
                let done = Completion {
                    fine_tuned_model: format!("ft:{}", c.job.job_id),
                    ..Default::default()
                };
                queue::complete(&pool, &c.lease, &done).await.unwrap();
                mine.push(c.job.job_id);
            }
            mine
        }));
    }
    let mut all = Vec::new();
    let mut per_worker = Vec::new();
    for t in tasks {
        let mine = t.await.unwrap();
        per_worker.push(mine.len());
        all.extend(mine);
    }
    let unique: HashSet<_> = all.iter().cloned().collect();
    assert_eq!(all.len() as i64, JOBS, "claims: {}", all.len());
    assert_eq!(unique.len() as i64, JOBS, "a job was claimed twice");
    assert!(
        per_worker.iter().filter(|n| **n > 0).count() > 1,
        "only one worker got work: {per_worker:?}"
    );
    let counts = queue::count_by_status(&pool).await.unwrap();
    assert_eq!(counts, vec![(JobStatus::Succeeded, JOBS)]);
    let started: i64 = sqlx::query_scalar(
        "select count(*) from job_events where message = 'Fine-tuning job started'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(started, JOBS);
    assert_references_hold(&db.pool).await;
}

#[tokio::test]
async fn expired_lease_is_rescued_and_the_old_token_is_fenced_off() {
    let db = db().await;
    let pool = &db.pool;
    let id = queued(pool, new_job("ftjob-lost")).await;
    let w1 = worker(pool, "worker-1", "cpu", None).await;
    let w2 = worker(pool, "worker-2", "cpu", None).await;
    let c1 = queue::claim(pool, &w1, TTL).await.unwrap().unwrap();
    assert_eq!(c1.job.attempt, 1);
    let ck = queue::record_checkpoint(
        pool,
        &c1.lease,
        5,
        &json!({"train_loss": 0.5}),
        "jobs/ftjob-lost/ckpt-5",
        "ft:tiny:x",
    )
    .await
    .unwrap();
    assert!(ck.checkpoint_id.starts_with("ftckpt-"));
    assert_eq!(ck.fine_tuned_model_checkpoint, "ft:tiny:x:ckpt-step-5");

    // Not expired yet: nothing to rescue.
    assert!(queue::rescue_expired(pool).await.unwrap().is_empty());
    expire_lease(pool, &id).await;
    assert_eq!(queue::rescue_expired(pool).await.unwrap(), vec![id.clone()]);

    let job = queue::job(pool, &id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.infra_retries, 1);
    assert_eq!(job.attempt, 1, "a lost worker is not a job failure");
    assert!(
        job.lease_token.is_none() && job.lease_owner.is_none() && job.lease_expires_at.is_none()
    );
    assert_eq!(job.checkpoint_step, Some(5));
    let evs = events(pool, &id).await;
    let (level, msg, data) = evs.last().unwrap();
    assert_eq!(level, "warn");
    assert!(
        msg.contains("worker-1") && msg.contains("checkpoint step 5"),
        "{msg}"
    );
    assert_eq!(data.as_ref().unwrap()["reason"], "lease_expired");

    // The old lease holder can change nothing.
    assert_lost(queue::heartbeat(pool, &c1.lease, TTL, None, None).await);
    assert_lost(
        queue::append_event(
            pool,
            &c1.lease,
            Level::Info,
            "late",
            None,
            EventKind::Message,
        )
        .await,
    );
    assert_lost(queue::record_checkpoint(pool, &c1.lease, 6, &json!({}), "p", "m").await);
    assert_lost(queue::complete(pool, &c1.lease, &Completion::default()).await);
    assert_lost(queue::fail(pool, &c1.lease, &JobError::new("x", "y")).await);
    assert_lost(queue::release(pool, &c1.lease).await);

    // A new worker takes over from the checkpoint; the old token stays fenced off.
    let c2 = queue::claim(pool, &w2, TTL).await.unwrap().unwrap();
    assert_eq!(c2.job.job_id, id);
    assert_ne!(c2.lease.token, c1.lease.token);
    let evs = events(pool, &id).await;
    assert!(
        evs.last()
            .unwrap()
            .1
            .contains("resuming from checkpoint step 5"),
        "{:?}",
        evs.last()
    );
    assert_lost(queue::heartbeat(pool, &c1.lease, TTL, None, None).await);
    assert_lost(queue::complete(pool, &c1.lease, &Completion::default()).await);
    assert_eq!(
        queue::heartbeat(pool, &c2.lease, TTL, Some(&json!({"step": 7})), None)
            .await
            .unwrap(),
        Control::Continue
    );
    queue::append_event(
        pool,
        &c2.lease,
        Level::Info,
        "Step 7: loss=0.4",
        Some(&json!({"step": 7})),
        EventKind::Metrics,
    )
    .await
    .unwrap();
    let done = queue::complete(
        pool,
        &c2.lease,
        &Completion {
            fine_tuned_model: "ft:tiny:x".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.progress, Some(json!({"step": 7})));
    let late: i64 = sqlx::query_scalar("select count(*) from job_events where message = 'late'")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(late, 0);
    assert_references_hold(&db.pool).await;
}

#[tokio::test]
async fn exhausted_infra_retries_fail_the_job() {
    let db = db().await;
    let pool = &db.pool;
    let id = queued(pool, new_job("ftjob-flaky")).await;
    sqlx::query("update jobs set max_infra_retries = 1 where job_id = $1")
        .bind(&id)
        .execute(pool)
        .await
        .unwrap();
    let w = worker(pool, "worker-1", "cpu", None).await;
    for round in 0..2 {
        queue::claim(pool, &w, TTL).await.unwrap().unwrap();
        expire_lease(pool, &id).await;
        assert_eq!(
            queue::rescue_expired(pool).await.unwrap().len(),
            1,
            "round {round}"
        );
    }
    let job = queue::job(pool, &id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    assert!(job.finished_at.is_some());
    assert_eq!(job.error.as_ref().unwrap()["code"], "worker_lost");
    assert_eq!(events(pool, &id).await.last().unwrap().0, "error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_lease_holder_by_notification_and_heartbeat() {
    let db = db().await;
    let pool = &db.pool;
    let mut listener = queue::Listener::connect(pool).await.unwrap();
    let id = queued(pool, new_job("ftjob-cancel")).await;
    assert_eq!(
        listener.next(Duration::from_secs(5)).await,
        Wake::JobsQueued
    );
    let w = worker(pool, "worker-1", "cpu", None).await;
    let c = queue::claim(pool, &w, TTL).await.unwrap().unwrap();

    assert!(matches!(
        queue::request_cancel(pool, "org-other", &id).await,
        Err(ControlError::NotFound)
    ));
    let row = queue::request_cancel(pool, ORG, &id).await.unwrap();
    assert_eq!(row.status, JobStatus::Running);
    assert!(row.cancel_requested_at.is_some());
    let wake = listener.next(Duration::from_secs(5)).await;
    assert_eq!(
        wake,
        Wake::Control(queue::ControlMessage {
            job_id: id.clone(),
            action: ControlAction::Cancel,
            worker_id: Some(w.worker_id.clone())
        })
    );
    assert_eq!(
        queue::heartbeat(pool, &c.lease, TTL, None, None)
            .await
            .unwrap(),
        Control::Cancel
    );
    // Asking again is harmless.
    queue::request_cancel(pool, ORG, &id).await.unwrap();
    let row = queue::finish_cancelled(pool, &c.lease).await.unwrap();
    assert_eq!(row.status, JobStatus::Cancelled);
    assert!(row.finished_at.is_some() && row.lease_token.is_none());
    match queue::request_cancel(pool, ORG, &id).await {
        Err(ControlError::Conflict(m)) => assert_eq!(m, "job is already cancelled"),
        other => panic!("{other:?}"),
    }

    // Jobs that are not running are cancelled at once.
    let q = queued(pool, new_job("ftjob-cancel-queued")).await;
    assert_eq!(
        queue::request_cancel(pool, ORG, &q).await.unwrap().status,
        JobStatus::Cancelled
    );
    queue::insert_job(pool, &new_job("ftjob-cancel-validating"))
        .await
        .unwrap();
    assert_eq!(
        queue::request_cancel(pool, ORG, "ftjob-cancel-validating")
            .await
            .unwrap()
            .status,
        JobStatus::Cancelled
    );
    assert!(
        queue::finish_validation(pool, "ftjob-cancel-validating", Ok(()))
            .await
            .unwrap()
            .is_none()
    );
    assert!(queue::claim(pool, &w, TTL).await.unwrap().is_none());
    assert_references_hold(&db.pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_keep_the_checkpoint() {
    let db = db().await;
    let pool = &db.pool;
    let id = queued(pool, new_job("ftjob-pause")).await;
    let w = worker(pool, "worker-1", "cpu", None).await;
    let mut listener = queue::Listener::connect(pool).await.unwrap();
    let c = queue::claim(pool, &w, TTL).await.unwrap().unwrap();
    queue::record_checkpoint(
        pool,
        &c.lease,
        10,
        &json!({}),
        "jobs/ftjob-pause/ckpt-10",
        "ft:m",
    )
    .await
    .unwrap();

    assert!(matches!(
        queue::resume(pool, ORG, &id).await,
        Err(ControlError::Conflict(_))
    ));
    let row = queue::request_pause(pool, ORG, &id).await.unwrap();
    assert_eq!(row.status, JobStatus::Running);
    match listener.next(Duration::from_secs(5)).await {
        Wake::Control(m) => assert_eq!(
            (m.job_id.as_str(), m.action),
            (id.as_str(), ControlAction::Pause)
        ),
        other => panic!("expected a pause notification, got {other:?}"),
    }
    assert_eq!(
        queue::heartbeat(pool, &c.lease, TTL, None, None)
            .await
            .unwrap(),
        Control::Pause
    );
    let row = queue::release_paused(pool, &c.lease).await.unwrap();
    assert_eq!(row.status, JobStatus::Paused);
    assert!(row.lease_token.is_none() && row.finished_at.is_none());
    assert!(
        queue::claim(pool, &w, TTL).await.unwrap().is_none(),
        "a paused job is not claimable"
    );
    assert!(matches!(
        queue::request_pause(pool, ORG, &id).await,
        Err(ControlError::Conflict(_))
    ));

    let row = queue::resume(pool, ORG, &id).await.unwrap();
    assert_eq!(row.status, JobStatus::Queued);
    assert_eq!(row.checkpoint_step, Some(10));
    assert_eq!(
        row.checkpoint_uri.as_deref(),
        Some("jobs/ftjob-pause/ckpt-10")
    );
    assert_eq!(
        listener.next(Duration::from_secs(5)).await,
        Wake::JobsQueued
    );
    let c2 = queue::claim(pool, &w, TTL).await.unwrap().unwrap();
    assert_eq!(c2.job.checkpoint_step, Some(10));
    assert_eq!(c2.job.attempt, 1);
    assert!(events(pool, &id)
        .await
        .last()
        .unwrap()
        .1
        .contains("resuming from checkpoint step 10"));

    // A queued job pauses at once.
    let q = queued(pool, new_job("ftjob-pause-queued")).await;
    assert_eq!(
        queue::request_pause(pool, ORG, &q).await.unwrap().status,
        JobStatus::Paused
    );
    assert_eq!(
        queue::resume(pool, ORG, &q).await.unwrap().status,
        JobStatus::Queued
    );
    assert_references_hold(&db.pool).await;
}

#[tokio::test]
async fn idempotent_insert_returns_the_existing_job() {
    let db = db().await;
    let pool = &db.pool;
    let mut a = new_job("ftjob-a");
    a.idempotency_key = Some("key-1".into());
    let mut b = new_job("ftjob-b");
    b.idempotency_key = Some("key-1".into());
    let first = queue::insert_job(pool, &a).await.unwrap();
    assert!(matches!(first, queue::Inserted::Created(_)));
    assert_eq!(first.job().status, JobStatus::ValidatingFiles);
    match queue::insert_job(pool, &b).await.unwrap() {
        queue::Inserted::Existing(j) => assert_eq!(j.job_id, "ftjob-a"),
        other => panic!("{other:?}"),
    }
    // Same key in another organisation: a new job.
    let mut c = new_job("ftjob-c");
    c.idempotency_key = Some("key-1".into());
    c.organization_id = "org-other".into();
    assert!(matches!(
        queue::insert_job(pool, &c).await.unwrap(),
        queue::Inserted::Created(_)
    ));
    let evs = events(pool, "ftjob-a").await;
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].1, "Created fine-tuning job: ftjob-a");
    assert!(queue::job(pool, "ftjob-b").await.unwrap().is_none());
}

#[tokio::test]
async fn higher_priority_first_then_oldest() {
    let db = db().await;
    let pool = &db.pool;
    for (id, prio) in [
        ("ftjob-p0", 0),
        ("ftjob-p5a", 5),
        ("ftjob-p1", 1),
        ("ftjob-p5b", 5),
    ] {
        let mut j = new_job(id);
        j.priority = prio;
        queued(pool, j).await;
    }
    let w = worker(pool, "worker-1", "cpu", None).await;
    let mut order = Vec::new();
    while let Some(c) = queue::claim(pool, &w, TTL).await.unwrap() {
        order.push(c.job.job_id);
    }
    assert_eq!(order, ["ftjob-p5a", "ftjob-p5b", "ftjob-p1", "ftjob-p0"]);
}

#[tokio::test]
async fn jobs_only_go_to_capable_workers() {
    let db = db().await;
    let pool = &db.pool;
    let mut big = new_job("ftjob-cuda-big");
    big.required_device = Some("cuda".into());
    big.min_gpu_memory_mb = Some(40_000);
    big.priority = 10;
    queued(pool, big).await;
    let mut small = new_job("ftjob-cuda-small");
    small.required_device = Some("cuda".into());
    small.min_gpu_memory_mb = Some(8_000);
    queued(pool, small).await;
    let mut cpu_only = new_job("ftjob-cpu");
    cpu_only.required_device = Some("cpu".into());
    queued(pool, cpu_only).await;

    let cpu = worker(pool, "worker-cpu", "cpu", None).await;
    let gpu16 = worker(pool, "worker-16g", "cuda", Some(16_000)).await;
    let gpu80 = worker(pool, "worker-80g", "cuda", Some(80_000)).await;

    let drained = worker(pool, "worker-drained", "cuda", Some(80_000)).await;
    queue::set_worker_draining(pool, &drained.worker_id, true)
        .await
        .unwrap();
    assert!(
        queue::claim(pool, &drained, TTL).await.unwrap().is_none(),
        "draining workers claim nothing"
    );

    let c = queue::claim(pool, &cpu, TTL).await.unwrap().unwrap();
    assert_eq!(c.job.job_id, "ftjob-cpu");
    assert!(
        queue::claim(pool, &cpu, TTL).await.unwrap().is_none(),
        "cpu worker must not get cuda jobs"
    );
    let c = queue::claim(pool, &gpu16, TTL).await.unwrap().unwrap();
    assert_eq!(
        c.job.job_id, "ftjob-cuda-small",
        "16 GB is not enough for the 40 GB job"
    );
    assert!(queue::claim(pool, &gpu16, TTL).await.unwrap().is_none());
    let c = queue::claim(pool, &gpu80, TTL).await.unwrap().unwrap();
    assert_eq!(c.job.job_id, "ftjob-cuda-big");
    assert_eq!(c.job.lease_owner.as_deref(), Some("worker-80g"));
}

#[tokio::test]
async fn failures_retry_until_max_attempts() {
    let db = db().await;
    let pool = &db.pool;
    let mut j = new_job("ftjob-fails");
    j.max_attempts = 2;
    let id = queued(pool, j).await;
    let w = worker(pool, "worker-1", "cpu", None).await;
    let c = queue::claim(pool, &w, TTL).await.unwrap().unwrap();
    assert_eq!(c.job.attempt, 1);
    let row = queue::fail(
        pool,
        &c.lease,
        &JobError::new("training_error", "loss is NaN"),
    )
    .await
    .unwrap();
    assert_eq!((row.status, row.attempt), (JobStatus::Queued, 2));
    assert!(row.error.is_none());
    let c = queue::claim(pool, &w, TTL).await.unwrap().unwrap();
    assert_eq!(c.job.attempt, 2);
    let err = JobError {
        code: "training_error".into(),
        message: "loss is NaN again".into(),
        param: Some("hyperparameters".into()),
    };
    let row = queue::fail(pool, &c.lease, &err).await.unwrap();
    assert_eq!(row.status, JobStatus::Failed);
    assert!(row.finished_at.is_some());
    let stored: JobError = serde_json::from_value(row.error.unwrap()).unwrap();
    assert_eq!(stored, err);
    let evs = events(pool, &id).await;
    assert!(evs
        .iter()
        .any(|(l, m, _)| l == "warn" && m.contains("Attempt 1 of 2 failed")));
    assert_eq!(evs.last().unwrap().0, "error");
}

#[tokio::test]
async fn validation_outcomes_and_status_counts() {
    let db = db().await;
    let pool = &db.pool;
    queue::insert_job(pool, &new_job("ftjob-ok")).await.unwrap();
    queue::insert_job(pool, &new_job("ftjob-bad"))
        .await
        .unwrap();
    queue::insert_job(pool, &new_job("ftjob-later"))
        .await
        .unwrap();
    let ids: Vec<String> = queue::validating_jobs(pool)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.job_id)
        .collect();
    assert_eq!(ids, ["ftjob-ok", "ftjob-bad", "ftjob-later"]);
    let ok = queue::finish_validation(pool, "ftjob-ok", Ok(()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ok.status, JobStatus::Queued);
    let mut e = JobError::new("invalid_training_file", "line 3: missing \"messages\"");
    e.param = Some("training_file".into());
    let bad = queue::finish_validation(pool, "ftjob-bad", Err(e.clone()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bad.status, JobStatus::Failed);
    assert!(bad.finished_at.is_some());
    assert_eq!(
        serde_json::from_value::<JobError>(bad.error.unwrap()).unwrap(),
        e
    );
    assert!(queue::finish_validation(pool, "ftjob-bad", Ok(()))
        .await
        .unwrap()
        .is_none());
    let counts = queue::count_by_status(pool).await.unwrap();
    assert_eq!(
        counts,
        vec![
            (JobStatus::Failed, 1),
            (JobStatus::Queued, 1),
            (JobStatus::ValidatingFiles, 1)
        ]
    );
    assert_references_hold(&db.pool).await;
}

#[tokio::test]
async fn release_requeues_without_counting_and_complete_registers_the_model() {
    let db = db().await;
    let pool = &db.pool;
    let id = queued(pool, new_job("ftjob-rel")).await;
    let w = worker(pool, "worker-1", "cpu", None).await;
    let c = queue::claim(pool, &w, TTL).await.unwrap().unwrap();
    let row = queue::release(pool, &c.lease).await.unwrap();
    assert_eq!(
        (row.status, row.attempt, row.infra_retries),
        (JobStatus::Queued, 1, 0)
    );
    let done = Completion {
        fine_tuned_model: "ft:tiny-bert:org-test::abc".into(),
        trained_tokens: Some(1234),
        result_files: vec!["file-results".into()],
        results_file: Some(queue::ResultsFile {
            file_id: "file-results".into(),
            filename: "step_metrics.csv".into(),
            bytes: 42,
            rows: 3,
            storage_key: "files/file-results".into(),
            sha256: "00".into(),
        }),
        model_location: Some("jobs/ftjob-rel/final".into()),
        architecture: Some(json!({"family": "bert"})),
    };
    let results_rows = || async {
        sqlx::query_scalar::<_, i64>("select count(*) from files where file_id = 'file-results'")
            .fetch_one(pool)
            .await
            .unwrap()
    };
    // The released lease can complete nothing, its results file included.
    assert_lost(queue::complete(pool, &c.lease, &done).await);
    assert_eq!(results_rows().await, 0);
    let c = queue::claim(pool, &w, TTL).await.unwrap().unwrap();
    assert_eq!(c.job.attempt, 1);
    let row = queue::complete(pool, &c.lease, &done).await.unwrap();
    assert_eq!(results_rows().await, 1);
    assert_eq!(row.status, JobStatus::Succeeded);
    assert_eq!(row.trained_tokens, Some(1234));
    assert_eq!(row.result_files, json!(["file-results"]));
    let (org, kind, loc): (Option<String>, String, String) =
        sqlx::query_as("select organization_id, kind, location from models where model_id = $1")
            .bind(&done.fine_tuned_model)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(
        (org.as_deref(), kind.as_str(), loc.as_str()),
        (Some(ORG), "fine_tuned", "jobs/ftjob-rel/final")
    );
    assert_eq!(
        events(pool, &id).await.last().unwrap().1,
        "The job has successfully completed"
    );
    assert_eq!(status(pool, &id).await, JobStatus::Succeeded);
    assert_lost(queue::complete(pool, &c.lease, &done).await);
    assert_references_hold(&db.pool).await;
}

#[tokio::test]
async fn each_test_database_is_fresh() {
    let started = std::time::Instant::now();
    let a = db().await;
    let b = db().await;
    assert_ne!(a.name, b.name);
    queue::insert_job(&a.pool, &new_job("ftjob-only-in-a"))
        .await
        .unwrap();
    assert!(queue::job(&b.pool, "ftjob-only-in-a")
        .await
        .unwrap()
        .is_none());
    let name = b.name.clone();
    drop(b);
    let gone: bool =
        sqlx::query_scalar("select not exists(select 1 from pg_database where datname = $1)")
            .bind(&name)
            .fetch_one(&a.pool)
            .await
            .unwrap();
    assert!(gone, "dropping a TestDb drops its database");
    eprintln!("two test databases in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_reconnects_after_its_connection_is_killed() {
    let db = db().await;
    let pool = &db.pool;
    let mut listener = queue::Listener::connect(pool).await.unwrap();
    queued(pool, new_job("ftjob-n1")).await;
    assert_eq!(
        listener.next(Duration::from_secs(5)).await,
        Wake::JobsQueued
    );
    let killed: i64 = sqlx::query_scalar(
        "select count(*) from (select pg_terminate_backend(pid) from pg_stat_activity \
         where datname = current_database() and pid <> pg_backend_pid() and query ilike '%listen%') t",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(killed, 1);
    assert_eq!(
        listener.next(Duration::from_secs(10)).await,
        Wake::Reconnected
    );
    queued(pool, new_job("ftjob-n2")).await;
    assert_eq!(
        listener.next(Duration::from_secs(5)).await,
        Wake::JobsQueued
    );
    // Nothing else pending: the poll interval elapses.
    assert_eq!(
        listener.next(Duration::from_millis(200)).await,
        Wake::Timeout
    );
}

#[tokio::test]
async fn heartbeat_stores_progress_and_an_estimate_by_the_database_clock() {
    let db = db().await;
    let pool = &db.pool;
    let id = queued(pool, new_job("ftjob-hb")).await;
    let w = worker(pool, "worker-1", "cpu", None).await;
    let c = queue::claim(pool, &w, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    let before = c.job.lease_expires_at.unwrap();
    let ctl = queue::heartbeat(
        pool,
        &c.lease,
        Duration::from_secs(300),
        Some(&json!({"step": 3, "total": 10})),
        Some(Duration::from_secs(600)),
    )
    .await
    .unwrap();
    assert_eq!(ctl, Control::Continue);
    let job = queue::job(pool, &id).await.unwrap().unwrap();
    assert!(job.lease_expires_at.unwrap() > before + chrono::Duration::seconds(200));
    assert_eq!(job.progress, Some(json!({"step": 3, "total": 10})));
    // The estimate is the database's now() plus the time left (the lease uses the same now()).
    let estimate = job.estimated_finish.unwrap();
    assert_eq!(
        estimate - job.lease_expires_at.unwrap(),
        chrono::Duration::seconds(300)
    );
    // A heartbeat without progress keeps the last one.
    queue::heartbeat(pool, &c.lease, TTL, None, None)
        .await
        .unwrap();
    let job = queue::job(pool, &id).await.unwrap().unwrap();
    assert_eq!(job.progress, Some(json!({"step": 3, "total": 10})));
    assert_eq!(job.estimated_finish, Some(estimate));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_rescuers_rescue_each_job_once() {
    let db = db().await;
    let pool = &db.pool;
    let w = worker(pool, "worker-1", "cpu", None).await;
    for i in 0..40 {
        queued(pool, new_job(&format!("ftjob-r{i}"))).await;
        queue::claim(pool, &w, TTL).await.unwrap().unwrap();
    }
    sqlx::query("update jobs set lease_expires_at = now() - interval '1 minute'")
        .execute(pool)
        .await
        .unwrap();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { queue::rescue_expired(&pool).await.unwrap() })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!((all.len(), unique.len()), (40, 40));
    let retries: Vec<i32> = sqlx::query_scalar("select distinct infra_retries from jobs")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(retries, vec![1]);
    assert_eq!(
        queue::count_by_status(pool).await.unwrap(),
        vec![(JobStatus::Queued, 40)]
    );
}

#[tokio::test]
async fn lost_workers_and_releases_honour_pending_cancel_and_pause() {
    let db = db().await;
    let pool = &db.pool;
    let w = worker(pool, "worker-1", "cpu", None).await;
    let a = queued(pool, new_job("ftjob-a")).await;
    let b = queued(pool, new_job("ftjob-b")).await;
    let c = queued(pool, new_job("ftjob-c")).await;
    let ca = queue::claim(pool, &w, TTL).await.unwrap().unwrap();
    let cb = queue::claim(pool, &w, TTL).await.unwrap().unwrap();
    let cc = queue::claim(pool, &w, TTL).await.unwrap().unwrap();
    assert_eq!(
        [&ca.job.job_id, &cb.job.job_id, &cc.job.job_id],
        [&a, &b, &c]
    );
    queue::request_cancel(pool, ORG, &a).await.unwrap();
    queue::request_pause(pool, ORG, &b).await.unwrap();
    assert!(matches!(
        queue::request_pause(pool, ORG, &a).await,
        Err(ControlError::Conflict(_))
    ));
    expire_lease(pool, &a).await;
    expire_lease(pool, &b).await;
    assert_eq!(queue::rescue_expired(pool).await.unwrap().len(), 2);
    let ja = queue::job(pool, &a).await.unwrap().unwrap();
    assert_eq!((ja.status, ja.infra_retries), (JobStatus::Cancelled, 0));
    assert!(ja.finished_at.is_some());
    let jb = queue::job(pool, &b).await.unwrap().unwrap();
    assert_eq!((jb.status, jb.infra_retries), (JobStatus::Paused, 0));
    assert!(jb.finished_at.is_none());
    // A clean release with a pending cancel ends cancelled, not queued.
    queue::request_cancel(pool, ORG, &c).await.unwrap();
    let jc = queue::release(pool, &cc.lease).await.unwrap();
    assert_eq!(jc.status, JobStatus::Cancelled);
    assert!(jc.finished_at.is_some());
    assert_references_hold(&db.pool).await;
}
