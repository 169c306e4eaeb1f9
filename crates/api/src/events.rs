//! `GET /v1/fine_tuning/jobs/{id}/events/stream`: a job's events, live, as server-sent events
//! (tuna extension).
//!
//! Each event is sent oldest first as `id: <event id>`, `event: <message|metrics>`,
//! `data: <the fine_tuning.job.event JSON>`. A client resumes after the last event it saw with
//! the standard `Last-Event-ID` header (or `?after=<event id>`). New events are found by
//! polling `job_events` by `seq` every [`POLL`] (one query at a time, at most [`BATCH`] rows,
//! so each stream holds a bounded amount of memory and at most one pooled connection, briefly);
//! a comment is sent every 15 s to keep proxies from closing an idle stream. Once the job is
//! terminal (succeeded, failed, cancelled) and every event was sent, the stream ends with
//! `event: end` (`data: {"status": …}`). When the server shuts down, open streams end without
//! `end` (a client reconnects and resumes with `Last-Event-ID`).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{stream, Stream, StreamExt};
use serde_json::json;
use tuna_db::rows::EventRow;
use tuna_db::PgPool;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::query::ListParams;
use crate::routes::Routes;
use crate::{objects, AppState};
use tuna_core::status::JobStatus;

/// How often a stream looks for new events.
pub const POLL: Duration = Duration::from_millis(300);
/// Most events read (and buffered) at once.
pub const BATCH: i64 = 200;
/// Keep-alive comment interval.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub fn routes() -> Routes {
    Routes::new().get(
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events/stream",
        stream_events,
    )
}

/// Where a stream starts: after the event `after` (its `seq`), or from the beginning.
async fn start_seq(pool: &PgPool, job_id: &str, after: Option<&str>) -> ApiResult<i64> {
    let Some(after) = after.filter(|a| !a.is_empty()) else {
        return Ok(0);
    };
    let seq: Option<i64> =
        sqlx::query_scalar("select seq from job_events where job_id = $1 and event_id = $2")
            .bind(job_id)
            .bind(after)
            .fetch_optional(pool)
            .await?;
    seq.ok_or_else(|| {
        ApiError::bad_request_code(
            format!("No event '{after}' in fine-tuning job '{job_id}' to resume after."),
            Some("after"),
            "invalid_event_id",
        )
    })
}

async fn events_after(pool: &PgPool, job_id: &str, seq: i64) -> sqlx::Result<Vec<EventRow>> {
    sqlx::query_as("select * from job_events where job_id = $1 and seq > $2 order by seq limit $3")
        .bind(job_id)
        .bind(seq)
        .bind(BATCH)
        .fetch_all(pool)
        .await
}

async fn job_status(pool: &PgPool, job_id: &str) -> sqlx::Result<Option<JobStatus>> {
    let status: Option<String> = sqlx::query_scalar("select status from jobs where job_id = $1")
        .bind(job_id)
        .fetch_optional(pool)
        .await?;
    status
        .map(|s| s.parse().map_err(|e: String| sqlx::Error::Decode(e.into())))
        .transpose()
}

async fn stream_events(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    q: ListParams,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let job = crate::jobs::find(&st, &caller, &id).await?;
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let after = last_event_id.or(q.after());
    let seq = start_seq(&st.db, &job.job_id, after).await?;
    // On server shutdown the stream ends without `end`; clients resume with Last-Event-ID.
    let events = job_stream(st.db.clone(), job.job_id, seq)
        .take_until(st.shutdown.clone().cancelled_owned());
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// State of one stream.
struct Cursor {
    pool: PgPool,
    job_id: String,
    seq: i64,
    /// Wait before the next query (not before the first).
    wait: bool,
    done: bool,
}

/// The events of `job_id` after `seq`, then `end` once the job is terminal.
pub fn job_stream(
    pool: PgPool,
    job_id: String,
    seq: i64,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let cursor = Cursor {
        pool,
        job_id,
        seq,
        wait: false,
        done: false,
    };
    stream::unfold(cursor, |mut c| async move {
        if c.done {
            return None;
        }
        loop {
            if c.wait {
                tokio::time::sleep(POLL).await;
            }
            c.wait = true;
            // Status first: a job seen terminal before the read has all its events written.
            let status = match job_status(&c.pool, &c.job_id).await {
                Ok(Some(s)) => s,
                Ok(None) => {
                    c.done = true;
                    let ev = Event::default()
                        .event("end")
                        .data(json!({"status": "deleted"}).to_string());
                    return Some((vec![ev], c));
                }
                Err(e) => {
                    tracing::warn!(job_id = %c.job_id, error = %e, "event stream: reading the job failed");
                    continue;
                }
            };
            let rows = match events_after(&c.pool, &c.job_id, c.seq).await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(job_id = %c.job_id, error = %e, "event stream: reading events failed");
                    continue;
                }
            };
            if let Some(last) = rows.last() {
                c.seq = last.seq;
                // A full batch: read the next one at once.
                c.wait = rows.len() as i64 != BATCH;
                let out = rows.iter().map(sse_event).collect();
                return Some((out, c));
            }
            if status.is_terminal() {
                c.done = true;
                let ev = Event::default()
                    .event("end")
                    .data(json!({"status": status}).to_string());
                return Some((vec![ev], c));
            }
        }
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok)))
}

fn sse_event(row: &EventRow) -> Event {
    Event::default()
        .id(row.event_id.clone())
        .event(row.kind.clone())
        .data(objects::event(row).to_string())
}
