//! The per-organisation cap on waiting jobs (`Config::max_pending_jobs`), checked without a
//! count on every create.
//!
//! Counting an organisation's waiting jobs costs the database work in proportion to their
//! number, which made the count the most expensive part of a create under load. [`PendingGate`]
//! keeps, per organisation, the last count (at most [`RECOUNT_AFTER`] old) plus the jobs this
//! server created since. A create is admitted while that estimate is under the cap; at or over
//! the cap it counts again, so a refusal always rests on a fresh count. Jobs that left the
//! queue since the count only make the estimate high (never a wrong refusal); jobs another
//! API server created since the count can let a burst overshoot the cap by at most what that
//! server creates in [`RECOUNT_AFTER`]. The check and the insert were never one transaction,
//! so the cap was approximate under concurrency before as well.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tuna_db::PgPool;

use crate::error::{ApiError, ApiResult};

/// How old a count may get before a create counts again.
pub const RECOUNT_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Estimate {
    counted: i64,
    created_since: i64,
    at: Instant,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct PendingGate {
    orgs: Mutex<HashMap<String, Estimate>>,
}

impl PendingGate {
    fn estimate(&self, organization_id: &str) -> Option<i64> {
        let orgs = self.orgs.lock().unwrap_or_else(|e| e.into_inner());
        orgs.get(organization_id)
            .filter(|e| e.at.elapsed() < RECOUNT_AFTER)
            .map(|e| e.counted + e.created_since)
    }

    /// Admits one more waiting job of `organization_id`, or answers 429 when the organisation
    /// already has `cap` jobs waiting.
    pub async fn admit(&self, db: &PgPool, organization_id: &str, cap: i64) -> ApiResult<()> {
        if self.estimate(organization_id).is_some_and(|n| n < cap) {
            return Ok(());
        }
        let counted = tuna_db::jobs::count_pending(db, organization_id).await?;
        self.orgs.lock().unwrap_or_else(|e| e.into_inner()).insert(
            organization_id.to_string(),
            Estimate {
                counted,
                created_since: 0,
                at: Instant::now(),
            },
        );
        if counted >= cap {
            return Err(ApiError::TooManyRequests(format!(
                "Your organisation has {counted} jobs waiting to run, the most this server accepts; retry when some have started."
            )));
        }
        Ok(())
    }

    /// Records a job created in a waiting state (after [`PendingGate::admit`]).
    pub fn created(&self, organization_id: &str) {
        let mut orgs = self.orgs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = orgs.get_mut(organization_id) {
            e.created_since += 1;
        }
    }
}
