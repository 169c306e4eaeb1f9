//! The private PostgreSQL cluster: created (as the `postgres` user when running as root),
//! started on a free port, connected to, stopped, restarted over the same data, and a stale
//! `postmaster.pid` cleaned up.

use std::os::unix::fs::PermissionsExt;

use tuna_db::pg::PrivateCluster;

fn tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    // The server may run as another user (root -> postgres): it must reach the data directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_cluster_starts_connects_stops_and_restarts() {
    let tmp = tempdir();
    let data = tmp.path().join("pg");
    let d = data.clone();
    let mut cluster = tokio::task::spawn_blocking(move || PrivateCluster::start(&d))
        .await
        .unwrap()
        .unwrap();
    assert!(
        cluster.url().starts_with("postgres://postgres@localhost:")
            && cluster.url().contains("?host=/"),
        "{}",
        cluster.url()
    );
    let pool = tuna_db::connect(&cluster.url()).await.unwrap();
    tuna_db::migrate(&pool).await.unwrap();
    // The URL reaches the server through its unix socket (no client address), the TCP URL
    // through 127.0.0.1.
    let (one, addr): (i32, Option<String>) = sqlx::query_as("select 1, inet_client_addr()::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((one, addr), (1, None));
    let tcp = tuna_db::connect(&cluster.tcp_url_for("tuna"))
        .await
        .unwrap();
    let addr: Option<String> = sqlx::query_scalar("select host(inet_client_addr())")
        .fetch_one(&tcp)
        .await
        .unwrap();
    assert_eq!(addr.as_deref(), Some("127.0.0.1"));
    tcp.close().await;
    sqlx::query("insert into organizations (organization_id, name) values ('org-kept', 'k')")
        .execute(&pool)
        .await
        .unwrap();
    let owner: String = sqlx::query_scalar("select current_user::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(owner, "postgres");
    pool.close().await;
    tokio::task::spawn_blocking(move || cluster.stop())
        .await
        .unwrap()
        .unwrap();
    assert!(
        !data.join("postmaster.pid").exists(),
        "server still running after stop"
    );

    // A stale pid file (a crash) does not prevent the restart; the data is reused.
    std::fs::write(
        data.join("postmaster.pid"),
        "999999\n/nowhere\n0\n5432\n\n\n\nready\n",
    )
    .unwrap();
    let d = data.clone();
    let cluster = tokio::task::spawn_blocking(move || PrivateCluster::start(&d))
        .await
        .unwrap()
        .unwrap();
    let pool = tuna_db::connect(&cluster.url()).await.unwrap();
    let n: i64 =
        sqlx::query_scalar("select count(*) from organizations where organization_id = 'org-kept'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(n, 1);
    pool.close().await;
    // Dropping the value stops the server.
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
    assert!(
        !data.join("postmaster.pid").exists(),
        "server still running after drop"
    );
}

#[test]
fn unreachable_data_dir_is_a_clear_error_when_root() {
    if !nix::unistd::Uid::effective().is_root() {
        return; // only root switches to the postgres user
    }
    let tmp = tempfile::tempdir().unwrap(); // mode 0700, owned by root
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let err = PrivateCluster::start(&tmp.path().join("pg"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("chmod o+x"), "{err}");
}

/// Pooled connections are not pinged on every use, only after idling; one the server closed
/// meanwhile is replaced, so the next query works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_closed_while_idle_is_replaced() {
    let db = tuna_db::testing::TestDb::new().await.unwrap();
    let pool = tuna_db::connect_with_size(&db.url, 1).await.unwrap();
    let pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let killed: bool = sqlx::query_scalar("select pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(killed);
    tokio::time::sleep(tuna_db::PING_IDLE_AFTER + std::time::Duration::from_millis(300)).await;
    let again: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .expect("the closed connection is replaced after its ping fails");
    assert_ne!(again, pid);
}

/// Direct connections: released ones are reused (same server process, no new connection);
/// dropped ones (a failed or cancelled request) are closed, never reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_connections_are_reused_only_when_released() {
    async fn pid(c: &mut tuna_db::direct::DirectConn<'_>) -> i32 {
        sqlx::query_scalar("select pg_backend_pid()")
            .fetch_one(c.conn())
            .await
            .unwrap()
    }
    let db = tuna_db::testing::TestDb::new().await.unwrap();
    let direct = tuna_db::direct::Direct::new(&db.pool, 2);
    let mut a = direct.get().await.unwrap();
    let first = pid(&mut a).await;
    a.release();
    assert_eq!(direct.idle_count(), 1);
    let mut b = direct.get().await.unwrap();
    assert_eq!(
        pid(&mut b).await,
        first,
        "the released connection is reused"
    );
    drop(b);
    assert_eq!(direct.idle_count(), 0);
    let mut c = direct.get().await.unwrap();
    let third = pid(&mut c).await;
    assert_ne!(third, first, "a dropped connection is not reused");
    c.release();
    // The dropped connection's server process goes away.
    let mut gone = false;
    for _ in 0..50 {
        let alive: bool =
            sqlx::query_scalar("select exists (select 1 from pg_stat_activity where pid = $1)")
                .bind(first)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        if !alive {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(gone, "the dropped connection was closed");
}
