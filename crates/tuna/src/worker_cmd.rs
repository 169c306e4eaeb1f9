//! `tuna worker`: a worker process that joins a shared Postgres queue (many workers on many
//! machines may share one database and one artifact store).
//!
//! ```text
//! tuna worker --database-url postgres://… [--data-dir DIR] [--store DIR|s3://bucket/prefix]
//!             [--trainer-bin PATH] [--device auto|cpu|cuda] [--worker-id ID]
//!             [--lease-ttl-secs 60] [--heartbeat-secs 5] [--poll-secs 5]
//!             [--allow-file-urls] [--allow-private-urls] [--threads N] [--max-dataset-mb 10240] [--stall-timeout-secs 3600]
//! ```
//! SIGINT / SIGTERM stop it cleanly: a running job is checkpointed and given back to the queue.
//! S3 credentials and endpoint come from the usual `AWS_*` variables (`AWS_ENDPOINT_URL` or
//! `TUNA_S3_ENDPOINT` for S3-compatible services).
//!
//! `tuna serve` uses [`worker_config`] and [`tuna_worker::Worker::spawn`] for its in-process
//! worker.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tuna_worker::tuna_store::{S3Settings, Store};
use tuna_worker::{default_trainer_bin, DeviceChoice, ShutdownToken, Worker, WorkerConfig};

/// Options of `tuna worker` (also flattened into `tuna serve` for its in-process worker, minus
/// `database_url`).
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerOptions {
    /// Where job scratch space and the fine-tuned model cache live.
    #[arg(long, env = "TUNA_DATA_DIR", default_value = ".tuna")]
    pub data_dir: PathBuf,
    /// Artifact store: a directory or s3://bucket/prefix (default: <data-dir>/artifacts, as
    /// for `tuna serve`). Must be the same store the API server uses.
    #[arg(long = "artifacts", alias = "store", env = "TUNA_ARTIFACTS")]
    pub store: Option<String>,
    /// The training engine binary (default: `tuna-trainer` next to this executable).
    #[arg(long, env = "TUNA_TRAINER_BIN")]
    pub trainer_bin: Option<PathBuf>,
    /// Device this worker offers: auto (CUDA if nvidia-smi sees a GPU), cpu or cuda.
    #[arg(long, env = "TUNA_DEVICE", default_value = "auto")]
    pub device: String,
    /// Stable worker id (default: a random one).
    #[arg(long, env = "TUNA_WORKER_ID")]
    pub worker_id: Option<String>,
    #[arg(long, default_value_t = 60)]
    pub lease_ttl_secs: u64,
    #[arg(long, default_value_t = 5)]
    pub heartbeat_secs: u64,
    #[arg(long, default_value_t = 5)]
    pub poll_secs: u64,
    /// Allow file:// dataset URLs (trusted single-user setups only).
    #[arg(long, env = "TUNA_ALLOW_FILE_URLS")]
    pub allow_file_urls: bool,
    /// Fetch dataset URLs on loopback, private and link-local addresses (trusted setups only).
    #[arg(long, env = "TUNA_ALLOW_PRIVATE_URLS")]
    pub allow_private_urls: bool,
    /// CPU threads per training process.
    #[arg(long, env = "TUNA_TRAINER_THREADS")]
    pub threads: Option<u32>,
    /// Largest dataset a URL may deliver, in MiB.
    #[arg(long, default_value_t = 10240)]
    pub max_dataset_mb: u64,
    /// A trainer silent this long (no step, evaluation or checkpoint event) is killed and its
    /// job fails as hung; 0 never.
    #[arg(long, default_value_t = 3600)]
    pub stall_timeout_secs: u64,
    /// Memory one job may use, in MiB (default: all of the GPU's, or the machine's on CPU). A
    /// job whose estimated peak is larger fails before training with what it needs and what
    /// would fit.
    #[arg(long, env = "TUNA_MEMORY_LIMIT_MB")]
    pub memory_limit_mb: Option<u64>,
}

/// `tuna worker`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// The shared PostgreSQL database.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    #[command(flatten)]
    pub options: WorkerOptions,
}

/// Opens the artifact store named by `store` (default `<data_dir>/artifacts`, as `tuna serve`).
pub fn open_store(store: Option<&str>, data_dir: &std::path::Path) -> anyhow::Result<Store> {
    let s3 = S3Settings::from_env();
    match store {
        Some(loc) => {
            Store::open(loc, &s3).with_context(|| format!("opening the artifact store {loc}"))
        }
        None => Store::local(data_dir.join("artifacts")).context("opening the artifact store"),
    }
}

/// The worker configuration for these options.
pub fn worker_config(o: &WorkerOptions) -> anyhow::Result<WorkerConfig> {
    let store = open_store(o.store.as_deref(), &o.data_dir)?;
    let trainer = o.trainer_bin.clone().unwrap_or_else(default_trainer_bin);
    let mut cfg = WorkerConfig::new(o.data_dir.join("worker"), store, trainer);
    cfg.worker_id = o.worker_id.clone();
    cfg.device = o
        .device
        .parse::<DeviceChoice>()
        .map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    cfg.lease_ttl = Duration::from_secs(o.lease_ttl_secs.max(5));
    cfg.heartbeat_every = Duration::from_secs(o.heartbeat_secs.max(1));
    if cfg.heartbeat_every * 2 > cfg.lease_ttl {
        anyhow::bail!("--heartbeat-secs must be at most half of --lease-ttl-secs");
    }
    cfg.poll_every = Duration::from_secs(o.poll_secs.max(1));
    cfg.fetch.allow_file_urls = o.allow_file_urls;
    cfg.fetch.allow_private_urls = o.allow_private_urls;
    cfg.fetch.max_bytes = o.max_dataset_mb.saturating_mul(1024 * 1024);
    cfg.trainer_threads = o.threads;
    cfg.stall_timeout =
        (o.stall_timeout_secs > 0).then(|| Duration::from_secs(o.stall_timeout_secs));
    cfg.memory_limit = o.memory_limit_mb.map(|mb| mb.saturating_mul(1 << 20));
    Ok(cfg)
}

/// Cancelled on SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> ShutdownToken {
    let token = ShutdownToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM");
                    let _ = tokio::signal::ctrl_c().await;
                    t.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down: the running job (if any) is checkpointed and released");
        t.cancel();
    });
    token
}

/// Runs `tuna worker` until SIGINT/SIGTERM.
pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let cfg = worker_config(&args.options)?;
    let pool = tuna_db::connect(&args.database_url).await?;
    let worker = Worker::new(pool, cfg);
    let info = worker.info();
    tracing::info!(worker_id = %info.worker_id, device = %info.device_kind, gpu = ?info.gpu_name,
        gpu_memory_mb = ?info.gpu_memory_mb, "starting worker");
    worker.run(shutdown_on_signals()).await?;
    Ok(())
}
