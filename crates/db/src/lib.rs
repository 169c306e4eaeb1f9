//! Postgres for tuna.
//!
//! - `pg`: find the machine's PostgreSQL binaries and run a private cluster (also as root).
//! - `testing`: a fresh migrated database per test on a shared private test cluster.
//! - `queue`: the job queue (claim with SKIP LOCKED, lease + heartbeat + fencing token,
//!   rescuer, cancel/pause notifications, worker capabilities). Only this module writes a
//!   job's status, lease and attempt columns.
//! - `rows`: row types.
//! - API-facing queries (organisations and keys, files, jobs, events, checkpoints, models).
//!
//! [`connect`] opens a pool and [`migrate`] applies `migrations/` (embedded at build time).

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
pub use sqlx::PgPool;

pub mod checkpoints;
pub mod direct;
pub mod events;
pub mod files;
pub mod jobs;
pub mod keys;
pub mod models;
pub mod pg;
pub mod queue;
pub mod rows;
#[cfg(feature = "testing")]
pub mod testing;

/// The migrations in the repository's `migrations/` folder, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Errors of this crate outside the queue (connecting, migrating, the private cluster).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to PostgreSQL at {url}: {source}")]
    Connect {
        /// The URL with any password replaced by `***`.
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("applying the database migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// The private PostgreSQL cluster could not be found, created, started or stopped.
    #[error("{0}")]
    Cluster(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl DbError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        DbError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = DbError> = std::result::Result<T, E>;

/// Default pool size; `TUNA_DB_POOL_SIZE` overrides it.
pub const DEFAULT_POOL_SIZE: u32 = 16;

/// Opens a connection pool (size `TUNA_DB_POOL_SIZE` or 16, 10 s to get a connection) and checks
/// that the server answers.
pub async fn connect(url: &str) -> Result<PgPool> {
    let size = std::env::var("TUNA_DB_POOL_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_POOL_SIZE);
    connect_with_size(url, size).await
}

/// How long a pooled connection may sit idle before it is pinged on its next use.
pub const PING_IDLE_AFTER: Duration = Duration::from_secs(5);

/// [`connect`] with an explicit maximum number of connections.
///
/// A connection is pinged before use only when it sat idle for [`PING_IDLE_AFTER`]: sqlx's
/// default pings before every use, a round trip per query that doubled the database work of a
/// simple request (BENCHMARKS.md, control plane). A busy connection proves itself with every
/// query; an idle one may have been closed by the server or the network meanwhile, and one
/// that fails its ping (or does not answer it in 2 s) is dropped and replaced.
pub async fn connect_with_size(url: &str, max_connections: u32) -> Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for < PING_IDLE_AFTER {
                    return Ok(true);
                }
                use sqlx::Connection;
                Ok(tokio::time::timeout(Duration::from_secs(2), conn.ping())
                    .await
                    .is_ok_and(|r| r.is_ok()))
            })
        })
        .acquire_timeout(Duration::from_secs(10))
        .idle_timeout(Duration::from_secs(600))
        .connect(url)
        .await
        .map_err(|source| DbError::Connect {
            url: redact_url(url),
            source,
        })
}

/// Applies every migration not applied yet.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// `url` with the password (if any) replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}://{}:***{}",
            &url[..scheme_end],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("postgres://h/db?x=1"), "postgres://h/db?x=1");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
