//! `tuna serve`: binds, opens the database, makes sure an admin key exists, serves until
//! SIGINT/SIGTERM, then drains requests and stops the private PostgreSQL it started.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{bail, Context};
use clap::Args;
use tuna_api::{AppState, Config};
use tuna_db::{keys, PgPool};

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
    /// Largest accepted upload in bytes.
    #[arg(long, env = "TUNA_MAX_UPLOAD_BYTES", default_value_t = 512 * 1024 * 1024)]
    max_upload_bytes: u64,
    /// Most jobs one organisation may have waiting (validating or queued); more answer 429.
    #[arg(long, env = "TUNA_MAX_PENDING_JOBS", default_value_t = 10_000)]
    max_pending_jobs: i64,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let ServeArgs {
        db,
        host,
        port,
        open_access,
        allow_file_urls,
        max_upload_bytes,
        max_pending_jobs,
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
    let config = Config {
        data_dir: db.data_dir.clone(),
        open_access,
        allow_file_urls,
        max_upload_bytes,
        max_pending_jobs,
        ..Config::new(&db.data_dir)
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
    println!("tuna listening on http://{addr}");
    tracing::info!(%addr, "tuna listening");
    let served = tuna_api::serve(listener, state, shutdown_signal()).await;
    tracing::info!("shutting down");
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
