//! The database of a command: `--database-url` / `DATABASE_URL`, or the private cluster in
//! `<data-dir>/pg` (started if needed; a cluster that was already running, e.g. under
//! `tuna serve`, is left running).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use tuna_db::pg::{self, PrivateCluster};
use tuna_db::PgPool;

#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// Directory for tuna's state: uploaded files, the private PostgreSQL cluster, the admin key.
    #[arg(long, env = "TUNA_DATA_DIR", default_value = ".tuna")]
    pub data_dir: PathBuf,
    /// PostgreSQL URL; when unset, tuna runs a private cluster under `<data-dir>/pg`.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

/// An open, migrated database and the private cluster serving it, if tuna started one.
pub struct Database {
    pub pool: PgPool,
    cluster: Option<PrivateCluster>,
    adopted: bool,
}

impl Database {
    pub async fn open(args: &DbArgs) -> anyhow::Result<Database> {
        std::fs::create_dir_all(&args.data_dir)
            .with_context(|| format!("creating {}", args.data_dir.display()))?;
        let (url, cluster, adopted) = match args
            .database_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
        {
            Some(url) => (url.to_string(), None, false),
            None => {
                let dir = args.data_dir.join("pg");
                let adopted = pg::running_port(&dir).is_some();
                let cluster = start_cluster(dir).await?;
                (cluster.url(), Some(cluster), adopted)
            }
        };
        let pool = tuna_db::connect(&url)
            .await
            .context("connecting to PostgreSQL")?;
        tuna_db::migrate(&pool)
            .await
            .context("migrating the database")?;
        Ok(Database {
            pool,
            cluster,
            adopted,
        })
    }

    /// Closes the pool and stops the private cluster if this process started it.
    pub async fn close(mut self) {
        self.pool.close().await;
        if let Some(cluster) = self.cluster.take() {
            if self.adopted {
                cluster.leave_running();
            } else {
                let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
            }
        }
    }
}

async fn start_cluster(dir: PathBuf) -> anyhow::Result<PrivateCluster> {
    let shown = dir.clone();
    tokio::task::spawn_blocking(move || PrivateCluster::start(Path::new(&dir)))
        .await
        .context("starting the private PostgreSQL cluster")?
        .with_context(|| {
            format!(
                "starting the private PostgreSQL cluster in {}",
                shown.display()
            )
        })
}
