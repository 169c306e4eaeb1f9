//! Reading job events for the API (the queue writes them).

use sqlx::PgPool;

use crate::rows::EventRow;
use crate::Result;

/// Up to `limit` events of a job, newest first, after the event `after`.
pub async fn list_events(
    pool: &PgPool,
    job_id: &str,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<EventRow>> {
    Ok(sqlx::query_as(
        "select * from job_events where job_id = $1 \
           and ($2::text is null or seq < (select seq from job_events where event_id = $2 and job_id = $1)) \
         order by seq desc limit $3",
    )
    .bind(job_id)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
