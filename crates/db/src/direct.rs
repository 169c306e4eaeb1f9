//! Connections for the API's hottest statements, kept outside sqlx's pool.
//!
//! sqlx 0.8's pool sends a ping (a `Sync` and a wait for `ReadyForQuery`, one round trip to the
//! server) every time a connection goes back to it. For a request made of one statement that
//! doubles the round trips, and the server's CPU per request with them (BENCHMARKS.md, control
//! plane). [`Direct`] hands out plain connections instead: one that finished its statements is
//! put back with [`DirectConn::release`] and reused without a ping; one that is dropped without
//! it (an error, or a request cancelled in the middle of a statement, which can leave the
//! connection in an unknown state) is closed. An idle connection is pinged before reuse after
//! [`crate::PING_IDLE_AFTER`], as the pool's are.

use std::sync::Mutex;
use std::time::Instant;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection, PgPool};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::Result;

/// At most `max` connections, opened when first needed.
#[derive(Debug)]
pub struct Direct {
    options: PgConnectOptions,
    idle: Mutex<Vec<(PgConnection, Instant)>>,
    permits: Semaphore,
}

/// A connection from [`Direct::get`]; use it through `conn()` and give it back with
/// [`DirectConn::release`] once its statements succeeded.
pub struct DirectConn<'a> {
    owner: &'a Direct,
    conn: Option<PgConnection>,
    _permit: SemaphorePermit<'a>,
}

impl Direct {
    /// Connections to the same database as `pool`, with its options.
    pub fn new(pool: &PgPool, max: usize) -> Direct {
        Direct {
            options: pool.connect_options().as_ref().clone(),
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(max.max(1)),
        }
    }

    /// An idle connection, or a new one when none is idle (waits while `max` are in use).
    pub async fn get(&self) -> Result<DirectConn<'_>> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        loop {
            let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some((mut conn, since)) = idle else { break };
            if since.elapsed() < crate::PING_IDLE_AFTER
                || tokio::time::timeout(std::time::Duration::from_secs(2), conn.ping())
                    .await
                    .is_ok_and(|r| r.is_ok())
            {
                return Ok(DirectConn {
                    owner: self,
                    conn: Some(conn),
                    _permit: permit,
                });
            }
        }
        let conn = self.options.connect().await?;
        Ok(DirectConn {
            owner: self,
            conn: Some(conn),
            _permit: permit,
        })
    }

    /// Connections idle now (for tests).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl DirectConn<'_> {
    pub fn conn(&mut self) -> &mut PgConnection {
        self.conn
            .as_mut()
            .expect("a DirectConn holds its connection until dropped")
    }

    /// Puts the connection back for reuse: call only after its statements completed.
    pub fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            self.owner
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((conn, Instant::now()));
        }
    }
}
