//! Shared setup for the worker's end-to-end tests: a fresh database (`TestDb`), an organisation,
//! the tiny gpt2 and bert fixtures registered as base models, an artifact store, datasets, jobs
//! created through the queue as the API would, and workers running the real `tuna-trainer`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tuna_core::spec::{parse_create_request, SpecPolicy};
use tuna_db::queue::{self, NewJob};
use tuna_db::rows::{EventRow, JobRow};
use tuna_db::testing::TestDb;
use tuna_store::Store;
use tuna_worker::{default_trainer_bin, DeviceChoice, Worker, WorkerConfig};

pub const ORG: &str = "org-test";

pub struct Env {
    pub db: TestDb,
    pub store: Store,
    pub dir: tempfile::TempDir,
}

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The real trainer (`target/<profile>/tuna-trainer`, or `$TUNA_TRAINER_BIN`).
pub fn trainer_bin() -> PathBuf {
    let p = default_trainer_bin();
    assert!(
        p.is_file(),
        "{} is missing: build it first with `cargo build -p tuna-train`",
        p.display()
    );
    p
}

impl Env {
    /// A database with the organisation and the base models, and a local store (or `store`).
    pub async fn new(store: Option<Store>) -> Env {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let db = TestDb::new().await.expect("test database");
        let dir = tempfile::tempdir().unwrap();
        let store = store.unwrap_or_else(|| Store::local(dir.path().join("store")).unwrap());
        sqlx::query("insert into organizations (organization_id, name) values ($1, 'Test org')")
            .bind(ORG)
            .execute(&db.pool)
            .await
            .unwrap();
        for (id, fixture) in [
            ("gpt2-tiny", "gpt2"),
            ("bert-tiny", "bert"),
            ("llama-tiny", "llama"),
        ] {
            let loc = workspace().join(".fixtures").join(fixture);
            sqlx::query("insert into models (model_id, kind, location) values ($1, 'base', $2)")
                .bind(id)
                .bind(loc.display().to_string())
                .execute(&db.pool)
                .await
                .unwrap();
        }
        Env { db, store, dir }
    }

    pub fn pool(&self) -> &sqlx::PgPool {
        &self.db.pool
    }

    /// Stores `data` as an uploaded file, as the API does (`files/<id>` in the store).
    pub async fn upload(&self, filename: &str, data: &[u8]) -> String {
        let id = tuna_core::ids::new_id(tuna_core::ids::FILE);
        let key = format!("files/{id}");
        let info = self.store.put_bytes(&key, data.to_vec()).await.unwrap();
        sqlx::query(
            "insert into files (file_id, organization_id, filename, purpose, bytes, status, storage_key, sha256) \
             values ($1, $2, $3, 'fine-tune', $4, 'processed', $5, $6)",
        )
        .bind(&id)
        .bind(ORG)
        .bind(filename)
        .bind(info.size as i64)
        .bind(&key)
        .bind(&info.sha256)
        .execute(self.pool())
        .await
        .unwrap();
        id
    }

    /// Creates a queued job from an API request body.
    pub async fn create_job(&self, body: Value) -> String {
        let req = parse_create_request(
            &body,
            &SpecPolicy {
                allow_file_urls: true,
            },
            7,
        )
        .expect("valid request");
        let job_id = tuna_core::ids::new_id(tuna_core::ids::JOB);
        let new = NewJob {
            job_id: job_id.clone(),
            organization_id: ORG.into(),
            model: req.spec.model.clone(),
            training_file: req.spec.training_file.clone(),
            validation_file: req.spec.validation_file.clone(),
            spec: serde_json::to_value(&req.spec).unwrap(),
            suffix: req.suffix.clone(),
            seed: req.spec.seed as i64,
            metadata: None,
            integrations: None,
            priority: req.priority,
            required_device: None,
            min_gpu_memory_mb: None,
            idempotency_key: None,
            max_attempts: 1,
            memory_estimate: None,
        };
        queue::insert_job(self.pool(), &new).await.unwrap();
        queue::finish_validation(self.pool(), &job_id, Ok(()))
            .await
            .unwrap()
            .expect("queued");
        job_id
    }

    pub fn config(&self, name: &str) -> WorkerConfig {
        let mut cfg = WorkerConfig::new(
            self.dir.path().join(name),
            self.store.clone(),
            trainer_bin(),
        );
        cfg.worker_id = Some(format!("worker-{name}"));
        cfg.device = DeviceChoice::Cpu;
        cfg.lease_ttl = Duration::from_secs(20);
        cfg.heartbeat_every = Duration::from_millis(500);
        cfg.poll_every = Duration::from_millis(300);
        cfg.rescue_every = Duration::from_millis(500);
        cfg.cancel_grace = Duration::from_secs(5);
        cfg.pause_grace = Duration::from_secs(60);
        cfg.trainer_threads = Some(1);
        cfg.fetch.connect_timeout = Duration::from_secs(3);
        cfg.fetch.total_timeout = Duration::from_secs(20);
        cfg.fetch.allow_file_urls = true;
        cfg
    }

    pub fn worker(&self, name: &str) -> Worker {
        Worker::new(self.pool().clone(), self.config(name))
    }

    pub async fn job(&self, job_id: &str) -> JobRow {
        queue::job(self.pool(), job_id).await.unwrap().unwrap()
    }

    pub async fn events(&self, job_id: &str) -> Vec<EventRow> {
        sqlx::query_as("select * from job_events where job_id = $1 order by seq")
            .bind(job_id)
            .fetch_all(self.pool())
            .await
            .unwrap()
    }

    /// Waits until `f(job)` holds (panics after `timeout`, printing the events).
    pub async fn wait_job(
        &self,
        job_id: &str,
        timeout: Duration,
        f: impl Fn(&JobRow) -> bool,
    ) -> JobRow {
        let t0 = Instant::now();
        loop {
            let j = self.job(job_id).await;
            if f(&j) {
                return j;
            }
            if t0.elapsed() > timeout {
                let ev: Vec<String> = self
                    .events(job_id)
                    .await
                    .iter()
                    .map(|e| format!("{} {}", e.level, e.message))
                    .collect();
                panic!(
                    "timed out; job status {} error {:?}; events:\n{}",
                    j.status,
                    j.error,
                    ev.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn metric_events(&self, job_id: &str) -> Vec<EventRow> {
        self.events(job_id)
            .await
            .into_iter()
            .filter(|e| e.kind == "metrics")
            .collect()
    }

    pub async fn wait_metrics(&self, job_id: &str, n: usize, timeout: Duration) {
        let t0 = Instant::now();
        while self.metric_events(job_id).await.len() < n {
            assert!(
                t0.elapsed() < timeout,
                "no metrics after {timeout:?}: {:?}",
                self.job(job_id).await.error
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

const WORDS: &[&str] = &[
    "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "park", "with", "ball",
    "red", "blue",
];

fn pick(i: usize, k: usize) -> &'static str {
    WORDS[(i * 7 + k * 3 + (i * k) % 5) % WORDS.len()]
}

/// `n` prompt/completion lines.
pub fn gpt2_data(n: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..n {
        let p: Vec<&str> = (0..5).map(|k| pick(i, k)).collect();
        let c: Vec<&str> = (5..9).map(|k| pick(i, k)).collect();
        out.push_str(
            &json!({"prompt": p.join(" "), "completion": format!(" {}", c.join(" "))}).to_string(),
        );
        out.push('\n');
    }
    out.into_bytes()
}

/// `n` text/label lines (labels of the bert fixture).
pub fn cls_data(n: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..n {
        let (label, word) = if i % 2 == 0 {
            ("positive", "good")
        } else {
            ("negative", "bad")
        };
        let t: Vec<&str> = (0..5).map(|k| pick(i, k)).collect();
        out.push_str(
            &json!({"text": format!("{} {word}", t.join(" ")), "label": label}).to_string(),
        );
        out.push('\n');
    }
    out.into_bytes()
}
