//! tuna's worker: joins the Postgres job queue and the training engine.
//!
//! A [`Worker`] registers itself with its capabilities (CPU or CUDA, GPU memory), waits for
//! work (LISTEN wake-ups with a polling fallback), claims one job at a time and runs it in a
//! `tuna-trainer` child process (one process per job, in its own process group: a crash, an
//! abort or a CUDA error fails that job only, and the device memory is freed when the process
//! ends). While the job runs it renews the lease, forwards cancel/pause to the child, turns the
//! child's JSON events into job events and progress, uploads checkpoints and the final model to
//! the artifact store ([`tuna_store::Store`]) and ends the job through the fenced queue calls of
//! [`tuna_db::queue`]. It also runs the lease rescuer periodically (safe on any number of
//! workers).
//!
//! - `child`: the trainer process and its line protocol.
//! - `inputs`: datasets (uploaded files, http(s), s3, file://) and base models.
//! - `job`: one job from claim to its end.
//! - `results`: the results CSV.
//!
//! Library use: `Worker::new(pool, WorkerConfig::new(data_dir, store, trainer_bin)).run(token)`,
//! or [`Worker::try_run_one`] to claim and run at most one job (tests).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tuna_core::status::JobStatus;
use tuna_db::queue::{self, Listener, QueueError, Wake, WorkerInfo};
use tuna_store::{S3Settings, Store};

pub mod child;
pub mod inputs;
pub mod job;
pub mod results;

pub use inputs::FetchLimits;
pub use job::fine_tuned_model_name;
pub use tokio_util::sync::CancellationToken as ShutdownToken;
pub use tuna_store;

/// Which device kind the worker offers: `Auto` is CUDA when `nvidia-smi` reports a GPU, else
/// CPU. The same names as a job's `device` (`auto`, `cpu`, `cuda`).
pub type DeviceChoice = tuna_core::spec::Device;

/// Worker settings. [`WorkerConfig::new`] fills in the defaults.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Stable id (e.g. one per machine and GPU); a random `worker-…` id when `None`.
    pub worker_id: Option<String>,
    /// Local scratch: `work/<job>-<lease>/` per job (removed afterwards) and `model-cache/`
    /// (fine-tuned models downloaded from the store).
    pub data_dir: PathBuf,
    /// The artifact store (uploaded files are read from it, artifacts written to it).
    pub store: Store,
    pub trainer_bin: PathBuf,
    pub device: DeviceChoice,
    /// Lease length; renewed every `heartbeat_every`.
    pub lease_ttl: Duration,
    pub heartbeat_every: Duration,
    /// Poll for work this often when no notification arrives.
    pub poll_every: Duration,
    /// Run the lease rescuer this often.
    pub rescue_every: Duration,
    /// After `cancel`, how long the trainer gets before it is killed.
    pub cancel_grace: Duration,
    /// After `pause` (or on shutdown), how long the trainer gets to save its checkpoint.
    pub pause_grace: Duration,
    /// A trainer that prints nothing (no step, evaluation, checkpoint or phase event) for this
    /// long is taken as hung: it is killed and its job fails with `trainer_stalled`. `None`:
    /// never.
    pub stall_timeout: Option<Duration>,
    /// Dataset download limits, and whether file:// dataset URLs are allowed.
    pub fetch: FetchLimits,
    /// Endpoint and credentials for s3:// dataset URLs.
    pub s3: S3Settings,
    /// `--threads` for the trainer (CPU intra-op threads).
    pub trainer_threads: Option<u32>,
    /// Free-form labels stored with the worker.
    pub labels: Value,
    /// Keep each job's scratch directory (debugging).
    pub keep_work_dirs: bool,
    /// Memory one job may use, in bytes; `None`: the GPU's memory, or the machine's on CPU.
    pub memory_limit: Option<u64>,
}

impl WorkerConfig {
    pub fn new(
        data_dir: impl Into<PathBuf>,
        store: Store,
        trainer_bin: impl Into<PathBuf>,
    ) -> WorkerConfig {
        WorkerConfig {
            worker_id: None,
            data_dir: data_dir.into(),
            store,
            trainer_bin: trainer_bin.into(),
            device: DeviceChoice::Auto,
            lease_ttl: Duration::from_secs(60),
            heartbeat_every: Duration::from_secs(5),
            poll_every: Duration::from_secs(5),
            rescue_every: Duration::from_secs(15),
            cancel_grace: Duration::from_secs(5),
            pause_grace: Duration::from_secs(300),
            stall_timeout: Some(Duration::from_secs(3600)),
            fetch: FetchLimits::default(),
            s3: S3Settings::from_env(),
            trainer_threads: None,
            labels: json!({}),
            keep_work_dirs: false,
            memory_limit: None,
        }
    }
}

/// `$TUNA_TRAINER_BIN`, else `tuna-trainer` next to the running executable (or one directory
/// up, for test binaries in `target/<profile>/deps`).
pub fn default_trainer_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TUNA_TRAINER_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let here = dir.join("tuna-trainer");
    if here.is_file() {
        return here;
    }
    match dir.parent() {
        Some(up) if up.join("tuna-trainer").is_file() => up.join("tuna-trainer"),
        _ => here,
    }
}

/// Errors that stop the worker or the current step (job failures are not errors: they end the
/// job with its error).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    #[error("the lease on job {0} was lost")]
    LeaseLost(String),
    #[error("artifact store: {0}")]
    Store(String),
    #[error("trainer: {0}")]
    Trainer(String),
    #[error("{0}")]
    Config(String),
}

/// What [`Worker::try_run_one`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No job to claim.
    Idle,
    /// The job ended in `status` (succeeded, failed, cancelled, paused, or queued again for a
    /// retry).
    Finished { job_id: String, status: JobStatus },
    /// The worker gave the job back on shutdown (`status`: queued, or paused/cancelled when
    /// requested meanwhile).
    Released { job_id: String, status: JobStatus },
    /// The lease was lost; the job was stopped and nothing more was written.
    LeaseLost { job_id: String },
}

/// Probes the device: `nvidia-smi` for CUDA (name and memory of GPU 0).
pub fn detect_device(choice: DeviceChoice) -> (String, Option<String>, Option<i64>) {
    let probe = || -> Option<(String, i64)> {
        let out = std::process::Command::new("nvidia-smi")
            .args([
                "--query-gpu=name,memory.total",
                "--format=csv,noheader,nounits",
            ])
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().next()?;
        let (name, mem) = line.rsplit_once(',')?;
        Some((name.trim().to_string(), mem.trim().parse().ok()?))
    };
    match choice {
        DeviceChoice::Cpu => ("cpu".into(), None, None),
        DeviceChoice::Cuda => match probe() {
            Some((n, m)) => ("cuda".into(), Some(n), Some(m)),
            None => ("cuda".into(), None, None),
        },
        DeviceChoice::Auto => match probe() {
            Some((n, m)) => ("cuda".into(), Some(n), Some(m)),
            None => ("cpu".into(), None, None),
        },
    }
}

/// What a job may use on this worker: which memory, how much, and how messages name it.
#[derive(Debug, Clone)]
pub struct JobMemory {
    pub accelerator: tuna_core::memory::Accelerator,
    pub bytes: u64,
    pub device: String,
}

/// The machine's memory (`MemTotal`), if the platform reports it.
fn machine_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The memory a job may use on the worker `info` describes, at most `limit` (`None`: unknown,
/// then nothing is checked).
fn job_memory(info: &WorkerInfo, limit: Option<u64>) -> Option<JobMemory> {
    use tuna_core::memory::Accelerator;
    let (accelerator, device, bytes) = if info.device_kind == "cuda" {
        let gpu = info.gpu_memory_mb.map(|mb| mb.max(0) as u64 * (1 << 20));
        let name = info.gpu_name.clone().unwrap_or_else(|| "GPU".into());
        (Accelerator::Cuda, name, gpu)
    } else {
        (Accelerator::Cpu, "CPU".to_string(), machine_memory())
    };
    let (bytes, device) = match (limit, bytes) {
        (Some(l), Some(b)) if l < b => (l, format!("{device} (limited by --memory-limit-mb)")),
        (Some(l), None) => (l, format!("{device} (limited by --memory-limit-mb)")),
        (_, Some(b)) => (b, device),
        (None, None) => return None,
    };
    Some(JobMemory {
        accelerator,
        bytes,
        device,
    })
}

/// A worker: one job at a time.
pub struct Worker {
    pool: PgPool,
    cfg: WorkerConfig,
    info: WorkerInfo,
    registered: bool,
    last_rescue: Option<tokio::time::Instant>,
}

impl Worker {
    pub fn new(pool: PgPool, cfg: WorkerConfig) -> Worker {
        let (device_kind, gpu_name, gpu_memory_mb) = detect_device(cfg.device);
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "unknown".into());
        let worker_id = cfg
            .worker_id
            .clone()
            .unwrap_or_else(|| tuna_core::ids::new_id(tuna_core::ids::WORKER));
        let mut info = WorkerInfo {
            worker_id,
            hostname,
            device_kind,
            gpu_name,
            gpu_memory_mb,
            memory_bytes: None,
            labels: cfg.labels.clone(),
        };
        info.memory_bytes =
            job_memory(&info, cfg.memory_limit).and_then(|m| i64::try_from(m.bytes).ok());
        Worker {
            pool,
            cfg,
            info,
            registered: false,
            last_rescue: None,
        }
    }

    /// What this worker announces.
    pub fn info(&self) -> &WorkerInfo {
        &self.info
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.cfg
    }

    /// Checks the trainer binary and registers the worker (done by the first claim otherwise).
    pub async fn register(&mut self) -> Result<(), WorkerError> {
        if !self.cfg.trainer_bin.is_file() {
            return Err(WorkerError::Config(format!(
                "the trainer binary {} does not exist (build it with `cargo build -p tuna-train`, or set --trainer-bin / TUNA_TRAINER_BIN)",
                self.cfg.trainer_bin.display()
            )));
        }
        for dir in [
            self.cfg.data_dir.join("work"),
            self.cfg.data_dir.join("model-cache"),
        ] {
            std::fs::create_dir_all(&dir).map_err(|e| {
                WorkerError::Config(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        queue::register_worker(&self.pool, &self.info).await?;
        self.registered = true;
        tracing::info!(worker_id = %self.info.worker_id, device = %self.info.device_kind, gpu = ?self.info.gpu_name,
            store = %self.cfg.store.description(), "worker registered");
        Ok(())
    }

    async fn maybe_rescue(&mut self) {
        let due = self
            .last_rescue
            .is_none_or(|t| t.elapsed() >= self.cfg.rescue_every);
        if !due {
            return;
        }
        self.last_rescue = Some(tokio::time::Instant::now());
        match queue::rescue_expired(&self.pool).await {
            Ok(ids) if !ids.is_empty() => tracing::warn!(?ids, "rescued jobs whose lease expired"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "lease rescue failed"),
        }
    }

    /// Rescues expired leases, then claims and runs at most one job.
    pub async fn try_run_one(&mut self) -> Result<Outcome, WorkerError> {
        let never = CancellationToken::new();
        self.step(None, &never).await
    }

    async fn step(
        &mut self,
        listener: Option<&mut Listener>,
        shutdown: &CancellationToken,
    ) -> Result<Outcome, WorkerError> {
        if !self.registered {
            self.register().await?;
        }
        self.last_rescue = None;
        self.maybe_rescue().await;
        self.claim_and_run(listener, shutdown).await
    }

    async fn claim_and_run(
        &mut self,
        listener: Option<&mut Listener>,
        shutdown: &CancellationToken,
    ) -> Result<Outcome, WorkerError> {
        let Some(claimed) = queue::claim(&self.pool, &self.info, self.cfg.lease_ttl).await? else {
            return Ok(Outcome::Idle);
        };
        tracing::info!(job_id = %claimed.job.job_id, attempt = claimed.job.attempt, "claimed job");
        let out = job::run_job(
            &self.pool,
            &self.cfg,
            &self.info.device_kind,
            job_memory(&self.info, self.cfg.memory_limit),
            claimed,
            listener,
            shutdown,
        )
        .await?;
        tracing::info!(?out, "job ended");
        Ok(out)
    }

    /// Starts [`Worker::run`] on the current runtime (what `tuna serve` does for its in-process
    /// worker).
    pub fn spawn(
        self,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<Result<(), WorkerError>> {
        tokio::spawn(self.run(shutdown))
    }

    /// Runs until `shutdown` is cancelled. On shutdown a running job is checkpointed and
    /// released (queued again for another worker).
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        self.register().await?;
        let mut listener = match Listener::connect(&self.pool).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN failed; polling only");
                None
            }
        };
        let mut backoff = Duration::from_secs(1);
        while !shutdown.is_cancelled() {
            self.maybe_rescue().await;
            match queue::worker_heartbeat(&self.pool, &self.info.worker_id).await {
                Ok(true) => {
                    // Draining: claim nothing, wait.
                    tokio::select! {
                        _ = tokio::time::sleep(self.cfg.poll_every) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    continue;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "worker heartbeat failed"),
            }
            match self.claim_and_run(listener.as_mut(), &shutdown).await {
                Ok(Outcome::Idle) => {
                    backoff = Duration::from_secs(1);
                    let wait = async {
                        match listener.as_mut() {
                            Some(l) => {
                                // Control wake-ups concern running jobs only.
                                while let Wake::Control(_) = l.next(self.cfg.poll_every).await {}
                            }
                            None => tokio::time::sleep(self.cfg.poll_every).await,
                        }
                    };
                    tokio::select! {
                        _ = wait => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
                Ok(_) => backoff = Duration::from_secs(1),
                Err(e) => {
                    tracing::error!(error = %e, "worker step failed; retrying in {backoff:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
        tracing::info!(worker_id = %self.info.worker_id, "worker stopped");
        Ok(())
    }
}
