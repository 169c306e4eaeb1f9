//! `tuna serve`: binds, opens the database and the artifact store, makes sure an admin key
//! exists, serves the API and the web dashboard (`tuna-dashboard`, at `/`) (and, unless `--no-worker`, runs one in-process worker on the same database
//! and store) until SIGINT/SIGTERM, then drains requests, lets the worker checkpoint and release
//! its job, and stops the private PostgreSQL it started.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use tokio_util::sync::CancellationToken;
use tuna_api::{AppState, Config};
use tuna_db::{keys, PgPool};
use tuna_store::{S3Settings, Store};
use tuna_worker::{DeviceChoice, Worker, WorkerConfig};

use crate::db::{Database, DbArgs};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Address to listen on.
    #[arg(long, env = "TUNA_HOST", default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0: any free port; the bound address is printed as
    /// `tuna listening on http://ADDR`).
    #[arg(long, env = "TUNA_PORT", default_value_t = 8000)]
    port: u16,
    /// Serve requests without a valid API key as the default organisation (only on a loopback
    /// address, for local use).
    #[arg(long, env = "TUNA_OPEN_ACCESS")]
    open_access: bool,
    /// Accept `file://` dataset URLs (trusted single-user setups only).
    #[arg(long, env = "TUNA_ALLOW_FILE_URLS")]
    allow_file_urls: bool,
    /// Let the in-process worker fetch dataset URLs on loopback, private and link-local
    /// addresses (trusted setups only).
    #[arg(long, env = "TUNA_ALLOW_PRIVATE_URLS")]
    allow_private_urls: bool,
    /// Largest accepted upload in bytes.
    #[arg(long, env = "TUNA_MAX_UPLOAD_BYTES", default_value_t = 512 * 1024 * 1024)]
    max_upload_bytes: u64,
    /// Most jobs one organisation may have waiting (validating or queued); more answer 429.
    #[arg(long, env = "TUNA_MAX_PENDING_JOBS", default_value_t = 10_000)]
    max_pending_jobs: i64,
    /// Artifact store shared with the workers (uploaded files, checkpoints, final models): a
    /// directory, file:///dir or s3://bucket/prefix (endpoint and credentials from
    /// AWS_ENDPOINT_URL / TUNA_S3_ENDPOINT, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
    /// Default: <data-dir>/artifacts.
    #[arg(long, visible_alias = "store", env = "TUNA_ARTIFACTS")]
    artifacts: Option<String>,
    /// Do not run the in-process worker (jobs then wait for `tuna worker` processes).
    #[arg(long, env = "TUNA_NO_WORKER")]
    no_worker: bool,
    /// The in-process worker's device: auto (CUDA when nvidia-smi sees a GPU), cpu or cuda.
    #[arg(long, env = "TUNA_WORKER_DEVICE", default_value = "auto")]
    worker_device: DeviceChoice,
    /// The trainer binary the in-process worker runs (default: $TUNA_TRAINER_BIN, else
    /// `tuna-trainer` next to `tuna`).
    #[arg(long)]
    trainer_bin: Option<PathBuf>,
}

/// Opens `--artifacts`, or `<data_dir>/artifacts`.
pub fn open_store(location: Option<&str>, data_dir: &Path) -> anyhow::Result<Store> {
    let store = match location.filter(|l| !l.trim().is_empty()) {
        Some(l) => Store::open(l, &S3Settings::from_env()),
        None => Store::local(data_dir.join("artifacts")),
    }
    .map_err(|e| anyhow::anyhow!("opening the artifact store: {e}"))?;
    tracing::info!(store = %store.description(), "artifact store");
    Ok(store)
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let ServeArgs {
        db,
        host,
        port,
        open_access,
        allow_file_urls,
        allow_private_urls,
        max_upload_bytes,
        max_pending_jobs,
        artifacts,
        no_worker,
        worker_device,
        trainer_bin,
    } = args;
    if open_access && !host.is_loopback() {
        bail!("--open-access is only allowed on a loopback address (--host 127.0.0.1 or ::1), not {host}");
    }
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(host, port))
        .await
        .with_context(|| format!("binding {host}:{port}"))?;
    let addr = listener.local_addr()?;
    let database = Database::open(&db).await?;
    ensure_admin_key(&database.pool, &db.data_dir).await?;
    let store = open_store(artifacts.as_deref(), &db.data_dir)?;
    let config = Config {
        open_access,
        allow_file_urls,
        max_upload_bytes,
        max_pending_jobs,
        ..Config::new(&db.data_dir, store.clone())
    };
    let state = AppState::new(database.pool.clone(), config);
    let pending = tuna_api::start_background(&state)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if pending > 0 {
        tracing::info!(
            jobs = pending,
            "resumed validation of jobs left in validating_files"
        );
    }
    if open_access {
        tracing::warn!("open access: requests without an API key act as the default organisation");
    }
    let shutdown = CancellationToken::new();
    let worker = if no_worker {
        None
    } else {
        let mut cfg = WorkerConfig::new(
            db.data_dir.join("worker"),
            store,
            trainer_bin.unwrap_or_else(tuna_worker::default_trainer_bin),
        );
        cfg.device = worker_device;
        cfg.fetch.allow_file_urls = allow_file_urls;
        cfg.fetch.allow_private_urls = allow_private_urls;
        let worker = Worker::new(database.pool.clone(), cfg);
        let token = shutdown.clone();
        Some(tokio::spawn(async move {
            if let Err(e) = worker.run(token).await {
                tracing::error!(error = %e, "the in-process worker stopped; jobs wait for a `tuna worker` (or restart with --no-worker to silence this)");
            }
        }))
    };
    let signal = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signal.cancel();
    });
    println!("tuna listening on http://{addr}");
    eprintln!("tuna: dashboard at http://{addr}/");
    tracing::info!(%addr, worker = !no_worker, "tuna listening");
    let served = tuna_api::serve_with(
        listener,
        state,
        tuna_dashboard::router(),
        shutdown.clone().cancelled_owned(),
    )
    .await;
    tracing::info!("shutting down");
    shutdown.cancel();
    if let Some(w) = worker {
        // The worker checkpoints and releases a running job before it returns.
        if let Err(e) = w.await {
            tracing::error!(error = %e, "the in-process worker panicked");
        }
    }
    database.close().await;
    served.context("serving HTTP")
}

/// Creates an admin key for the default organisation when there is none, and writes it to
/// `<data_dir>/admin_key` (mode 0600).
async fn ensure_admin_key(pool: &PgPool, data_dir: &Path) -> anyhow::Result<()> {
    keys::ensure_default_org(pool).await?;
    if keys::count_admin_keys(pool).await? > 0 {
        return Ok(());
    }
    let key = keys::create_key(pool, keys::DEFAULT_ORG, "admin", true).await?;
    let path = data_dir.join("admin_key");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(&mut f, format!("{}\n", key.secret).as_bytes())?;
    let shown = std::fs::canonicalize(&path).unwrap_or(path);
    tracing::info!(path = %shown.display(), "created the first admin API key");
    eprintln!(
        "tuna: created an admin API key; it is in {}",
        shown.display()
    );
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
