//! Test databases: [`TestDb::new`] gives each test a fresh, migrated database.
//!
//! - With `TUNA_TEST_DATABASE_URL` set (any database on a server where the user may create
//!   databases), the test databases are created on that server.
//! - Otherwise one shared private cluster serves every test process of the workspace. It lives
//!   in `$TUNA_TEST_PGDATA`, else `$CARGO_TARGET_DIR/tuna-test-pg`, else
//!   `<workspace>/target/tuna-test-pg`. The first test to need it starts it (under a file lock
//!   `<dir>.lock`, since several test binaries start at once) with fsync off; it is left running
//!   for the next tests and test runs. Stop it at the end of a run with
//!   `cargo run -p tuna-db --example stop-test-cluster`, by calling [`stop_test_cluster`], or
//!   with `pg_ctl -D target/tuna-test-pg stop -m fast` (as the `postgres` user when root:
//!   `runuser -u postgres -- /usr/lib/postgresql/<v>/bin/pg_ctl ...`).
//! - Migrations run once per migration set into a template database `tuna_tpl_<hash>`; each
//!   test database is a copy (`create database … template …`), which takes tens of
//!   milliseconds. The template name changes whenever a migration changes.
//! - Test databases are named `tuna_test_<pid>_<random>` and dropped when the [`TestDb`] is
//!   dropped (set `TUNA_TEST_KEEP_DB=1` to keep them); databases left by dead test processes are
//!   dropped the next time a test process starts on the private cluster.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use rand::Rng;
use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::OnceCell;

use crate::pg::{ClusterOptions, PrivateCluster};
use crate::{DbError, Result};

/// A fresh migrated database for one test. Dropping it drops the database.
#[derive(Debug)]
pub struct TestDb {
    pub pool: PgPool,
    /// URL of this test's database.
    pub url: String,
    /// The database's name.
    pub name: String,
    /// URL of the server's maintenance database (`postgres`).
    admin_url: String,
}

/// Server URL (of its `postgres` database) and template name, computed once per process.
static SERVER: OnceCell<(String, String)> = OnceCell::const_new();

/// The shared test cluster's data directory.
pub fn test_cluster_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TUNA_TEST_PGDATA") {
        return PathBuf::from(dir);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("tuna-test-pg");
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::canonicalize(&workspace)
        .unwrap_or(workspace)
        .join("target/tuna-test-pg")
}

/// Stops the shared private test cluster if it is running.
pub fn stop_test_cluster() -> Result<()> {
    crate::pg::stop_data_dir(&test_cluster_dir())
}

/// Starts the shared test cluster unless it runs; returns its port. Holds a file lock meanwhile.
fn ensure_test_cluster() -> Result<u16> {
    let dir = test_cluster_dir();
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| DbError::io(format!("creating {}", parent.display()), e))?;
    }
    let lock_path = dir.with_extension("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| DbError::io(format!("opening {}", lock_path.display()), e))?;
    let _lock = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| DbError::Cluster(format!("locking {}: {e}", lock_path.display())))?;
    if let Some(port) = crate::pg::running_port(&dir) {
        return Ok(port);
    }
    let opts = ClusterOptions {
        max_connections: 300,
        unsafe_fast: true,
        create_database: false,
    };
    let cluster = PrivateCluster::start_with(&dir, &opts)?;
    let port = cluster.port();
    // Left running for the other tests and test processes.
    cluster.leave_running();
    Ok(port)
}

/// Name of the template database for the current migration set.
fn template_name() -> String {
    let mut h = Sha256::new();
    for m in crate::MIGRATOR.iter() {
        h.update(m.version.to_le_bytes());
        h.update(&m.checksum);
    }
    format!("tuna_tpl_{}", &hex::encode(h.finalize())[..16])
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Replaces the database name (path) of a postgres URL.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    format!("{}/{}{}", &base[..host_end], db, query)
}

async fn server() -> Result<&'static (String, String)> {
    SERVER
        .get_or_try_init(|| async {
            let (admin_url, private) = match std::env::var("TUNA_TEST_DATABASE_URL") {
                Ok(url) if !url.trim().is_empty() => (with_database(&url, "postgres"), false),
                _ => {
                    let port = tokio::task::spawn_blocking(ensure_test_cluster)
                        .await
                        .map_err(|e| {
                            DbError::Cluster(format!("starting the test cluster panicked: {e}"))
                        })??;
                    (
                        format!(
                            "postgres://{}@127.0.0.1:{port}/postgres",
                            crate::pg::SUPERUSER
                        ),
                        true,
                    )
                }
            };
            let template = template_name();
            let mut conn =
                PgConnection::connect(&admin_url)
                    .await
                    .map_err(|source| DbError::Connect {
                        url: crate::redact_url(&admin_url),
                        source,
                    })?;
            if private {
                drop_orphans(&mut conn).await;
            }
            ensure_template(&mut conn, &admin_url, &template).await?;
            let _ = conn.close().await;
            Ok::<_, DbError>((admin_url, template))
        })
        .await
}

/// Creates the migrated template database unless it exists (under an advisory lock, so that
/// concurrent test processes build it once).
async fn ensure_template(conn: &mut PgConnection, admin_url: &str, template: &str) -> Result<()> {
    const LOCK: i64 = 0x7475_6e61_7470_6c00; // "tunatpl\0"
    sqlx::query("select pg_advisory_lock($1)")
        .bind(LOCK)
        .execute(&mut *conn)
        .await?;
    let result = async {
        let exists: bool =
            sqlx::query_scalar("select exists(select 1 from pg_database where datname = $1)")
                .bind(template)
                .fetch_one(&mut *conn)
                .await?;
        if exists {
            return Ok(());
        }
        let building = format!("{template}_building");
        sqlx::query(&format!(
            "drop database if exists {} with (force)",
            quote_ident(&building)
        ))
        .execute(&mut *conn)
        .await?;
        sqlx::query(&format!("create database {}", quote_ident(&building)))
            .execute(&mut *conn)
            .await?;
        {
            let url = with_database(admin_url, &building);
            let mut c = PgConnection::connect(&url).await?;
            crate::MIGRATOR.run(&mut c).await?;
            c.close().await?;
        }
        sqlx::query(&format!(
            "alter database {} rename to {}",
            quote_ident(&building),
            quote_ident(template)
        ))
        .execute(&mut *conn)
        .await?;
        Ok::<_, DbError>(())
    }
    .await;
    let _ = sqlx::query("select pg_advisory_unlock($1)")
        .bind(LOCK)
        .execute(&mut *conn)
        .await;
    result
}

/// Drops the test databases of test processes that are gone (templates stay: test binaries
/// built from another revision may still use theirs).
async fn drop_orphans(conn: &mut PgConnection) {
    let names: Vec<String> =
        sqlx::query_scalar("select datname from pg_database where datname like 'tuna\\_test\\_%'")
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_default();
    for name in names {
        let pid: i32 = name["tuna_test_".len()..]
            .split('_')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let gone =
            pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err();
        if gone {
            let sql = format!(
                "drop database if exists {} with (force)",
                quote_ident(&name)
            );
            let _ = sqlx::query(&sql).execute(&mut *conn).await;
        }
    }
}

impl TestDb {
    /// A fresh database migrated to the current schema, with a pool of up to 10 connections.
    pub async fn new() -> Result<TestDb> {
        Self::with_pool_size(10).await
    }

    /// [`TestDb::new`] with a given pool size.
    pub async fn with_pool_size(max_connections: u32) -> Result<TestDb> {
        let (admin_url, template) = server().await?;
        let name = format!(
            "tuna_test_{}_{:08x}",
            std::process::id(),
            rand::thread_rng().gen::<u32>()
        );
        let mut conn =
            PgConnection::connect(admin_url)
                .await
                .map_err(|source| DbError::Connect {
                    url: crate::redact_url(admin_url),
                    source,
                })?;
        let create = format!(
            "create database {} template {}",
            quote_ident(&name),
            quote_ident(template)
        );
        // The template is briefly busy when another process copies it at the same instant in
        // old servers, or autovacuum visits it: retry a few times.
        let mut tries = 0;
        loop {
            match sqlx::query(&create).execute(&mut conn).await {
                Ok(_) => break,
                Err(e) if tries < 20 && e.to_string().contains("being accessed by other users") => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let _ = conn.close().await;
        let url = with_database(admin_url, &name);
        let pool = crate::connect_with_size(&url, max_connections).await?;
        Ok(TestDb {
            pool,
            url,
            name,
            admin_url: admin_url.clone(),
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if std::env::var_os("TUNA_TEST_KEEP_DB").is_some() {
            return;
        }
        let admin_url = self.admin_url.clone();
        let sql = format!(
            "drop database if exists {} with (force)",
            quote_ident(&self.name)
        );
        // Drop runs inside the test's runtime: do the async work on a thread of its own.
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async move {
                let mut conn = PgConnection::connect(&admin_url).await.ok()?;
                sqlx::query(&sql).execute(&mut conn).await.ok()?;
                conn.close().await.ok()
            })
        });
        let _ = handle.join();
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(
            with_database("postgres://u@h:1/a", "b"),
            "postgres://u@h:1/b"
        );
        assert_eq!(with_database("postgres://u@h:1", "b"), "postgres://u@h:1/b");
        assert_eq!(
            with_database("postgres://u@h/a?sslmode=disable", "b"),
            "postgres://u@h/b?sslmode=disable"
        );
    }
}
