//! Reading checkpoints for the API (the queue records them).

use sqlx::PgPool;

use crate::rows::CheckpointRow;
use crate::Result;

/// Up to `limit` checkpoints of a job, newest (highest step) first, after the checkpoint `after`.
pub async fn list_checkpoints(
    pool: &PgPool,
    job_id: &str,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<CheckpointRow>> {
    Ok(sqlx::query_as(
        "select * from checkpoints where job_id = $1 \
           and ($2::text is null or (step_number, seq) < \
                (select step_number, seq from checkpoints where checkpoint_id = $2 and job_id = $1)) \
         order by step_number desc, seq desc limit $3",
    )
    .bind(job_id)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
