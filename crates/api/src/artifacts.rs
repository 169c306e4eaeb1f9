//! Downloads of a job's models from the artifact store (tuna extensions), for the job's own
//! organisation only (another organisation's job is a 404):
//!
//! - `GET /v1/fine_tuning/jobs/{id}/artifacts`: the final model's files (`path`, `bytes`,
//!   `sha256`); 409 while the job has no final model.
//! - `GET /v1/fine_tuning/jobs/{id}/artifacts/{path}`: one file, streamed, with `ETag` (the
//!   quoted sha256) and `If-None-Match` (304), single-range `Range` requests (206, 416) with
//!   `If-Range`, `Content-Length` and `x-tuna-sha256`.
//! - `GET /v1/fine_tuning/jobs/{id}/artifacts.tar`: the whole model as one tar archive, built
//!   on the fly and streamed file by file (exact `Content-Length` known up front).
//! - The same three under `/v1/fine_tuning/jobs/{id}/checkpoints/{checkpoint_id}/…` for a
//!   checkpoint (its `artifact_prefix`).
//!
//! File names are relative to the model's directory and checked with
//! [`tuna_store::check_key`]: `..`, absolute paths and backslashes are rejected with 400, so a
//! request can never read outside the model's prefix.

use std::ops::Range;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures::{stream, Stream, StreamExt, TryStreamExt};
use serde_json::{json, Value};
use tuna_db::rows::{CheckpointRow, JobRow};
use tuna_store::{check_key, ObjectInfo, Store, StoreError};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::routes::Routes;
use crate::tar;
use crate::AppState;
use tuna_core::status::JobStatus;

/// Ranges are read from the store in pieces of this size, so a large range is streamed too.
const RANGE_CHUNK: u64 = 4 * 1024 * 1024;

pub fn routes() -> Routes {
    const JOB: &str = "/v1/fine_tuning/jobs/{fine_tuning_job_id}";
    const CKPT: &str = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints/{checkpoint_id}";
    Routes::new()
        .get(&format!("{JOB}/artifacts"), final_list)
        .get(&format!("{JOB}/artifacts.tar"), final_tar)
        .get(&format!("{JOB}/artifacts/{{*path}}"), final_file)
        .get(&format!("{CKPT}/artifacts"), checkpoint_list)
        .get(&format!("{CKPT}/artifacts.tar"), checkpoint_tar)
        .get(&format!("{CKPT}/artifacts/{{*path}}"), checkpoint_file)
}

/// A directory of the store holding one model.
#[derive(Debug, Clone)]
pub struct Source {
    /// Store prefix, without a trailing `/`.
    pub prefix: String,
    /// What the messages call it ("the final model of job …").
    pub what: String,
    /// Download name of the tar archive.
    pub archive_name: String,
    /// Modification time written into the archive (Unix seconds).
    pub mtime: u64,
}

/// The final model of a job of the caller's organisation.
pub async fn final_source(st: &AppState, caller: &Caller, job_id: &str) -> ApiResult<Source> {
    let job = crate::jobs::find(st, caller, job_id).await?;
    let model = match (&job.fine_tuned_model, job.status) {
        (Some(m), JobStatus::Succeeded) => m.clone(),
        (_, status) => return Err(no_final_model(&job, status)),
    };
    let location = tuna_db::models::get_model(&st.db, &job.organization_id, &model)
        .await?
        .filter(|m| m.job_id.as_deref() == Some(job.job_id.as_str()))
        .map(|m| m.location)
        .unwrap_or_else(|| format!("jobs/{}/final", job.job_id));
    Ok(Source {
        prefix: location.trim_end_matches('/').to_string(),
        what: format!("the final model of fine-tuning job '{}'", job.job_id),
        archive_name: format!("{}.tar", job.job_id),
        mtime: job.finished_at.map_or(0, |t| t.timestamp().max(0) as u64),
    })
}

fn no_final_model(job: &JobRow, status: JobStatus) -> ApiError {
    let when = if status.is_terminal() {
        "it will have none"
    } else {
        "its files can be downloaded once it has succeeded"
    };
    ApiError::Conflict(format!(
        "Fine-tuning job '{}' has no final model (status '{status}'); {when}. Its checkpoints, if \
         any, are listed by GET /v1/fine_tuning/jobs/{}/checkpoints and downloadable under \
         /v1/fine_tuning/jobs/{}/checkpoints/{{checkpoint_id}}/artifacts.",
        job.job_id, job.job_id, job.job_id
    ))
}

/// A checkpoint of a job of the caller's organisation.
pub async fn checkpoint_source(
    st: &AppState,
    caller: &Caller,
    job_id: &str,
    checkpoint_id: &str,
) -> ApiResult<Source> {
    let job = crate::jobs::find(st, caller, job_id).await?;
    let row: Option<CheckpointRow> =
        sqlx::query_as("select * from checkpoints where job_id = $1 and checkpoint_id = $2")
            .bind(&job.job_id)
            .bind(checkpoint_id)
            .fetch_optional(&st.db)
            .await?;
    let row = row.ok_or_else(|| ApiError::NotFound {
        message: format!(
            "No checkpoint found with id '{checkpoint_id}' for fine-tuning job '{job_id}'."
        ),
        code: "not_found",
    })?;
    Ok(Source {
        prefix: row.artifact_prefix.trim_end_matches('/').to_string(),
        what: format!(
            "checkpoint '{}' (step {}) of fine-tuning job '{}'",
            row.checkpoint_id, row.step_number, job.job_id
        ),
        archive_name: format!("{}-step-{}.tar", job.job_id, row.step_number),
        mtime: row.created_at.timestamp().max(0) as u64,
    })
}

/// The files of a source: `(path relative to the prefix, object)`, sorted. 404 when the store
/// holds nothing there.
pub async fn files_of(store: &Store, src: &Source) -> ApiResult<Vec<(String, ObjectInfo)>> {
    let objects = store.list(&src.prefix).await?;
    let files: Vec<(String, ObjectInfo)> = objects
        .into_iter()
        .filter_map(|o| {
            let rel = o.key.strip_prefix(&src.prefix)?.strip_prefix('/')?;
            Some((rel.to_string(), o.clone()))
        })
        .collect();
    if files.is_empty() {
        return Err(ApiError::NotFound {
            message: format!(
                "The files of {} are missing from the artifact store.",
                src.what
            ),
            code: "artifacts_missing",
        });
    }
    Ok(files)
}

fn list_body(files: &[(String, ObjectInfo)]) -> Value {
    let data: Vec<Value> = files
        .iter()
        .map(|(path, o)| {
            json!({
                "object": "fine_tuning.job.artifact",
                "path": path,
                "bytes": o.size,
                "sha256": o.sha256,
            })
        })
        .collect();
    json!({"object": "list", "data": data, "has_more": false})
}

async fn final_list(
    State(st): State<AppState>,
    caller: Caller,
    Path(job_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let src = final_source(&st, &caller, &job_id).await?;
    Ok(Json(list_body(&files_of(&st.config.store, &src).await?)))
}

async fn checkpoint_list(
    State(st): State<AppState>,
    caller: Caller,
    Path((job_id, checkpoint_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let src = checkpoint_source(&st, &caller, &job_id, &checkpoint_id).await?;
    Ok(Json(list_body(&files_of(&st.config.store, &src).await?)))
}

async fn final_file(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path((job_id, path)): Path<(String, String)>,
) -> ApiResult<Response> {
    check_path(&path)?;
    let src = final_source(&st, &caller, &job_id).await?;
    serve_file(&st.config.store, &src, &path, &headers).await
}

async fn checkpoint_file(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path((job_id, checkpoint_id, path)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    check_path(&path)?;
    let src = checkpoint_source(&st, &caller, &job_id, &checkpoint_id).await?;
    serve_file(&st.config.store, &src, &path, &headers).await
}

async fn final_tar(
    State(st): State<AppState>,
    caller: Caller,
    Path(job_id): Path<String>,
) -> ApiResult<Response> {
    let src = final_source(&st, &caller, &job_id).await?;
    serve_tar(&st.config.store, &src).await
}

async fn checkpoint_tar(
    State(st): State<AppState>,
    caller: Caller,
    Path((job_id, checkpoint_id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let src = checkpoint_source(&st, &caller, &job_id, &checkpoint_id).await?;
    serve_tar(&st.config.store, &src).await
}

/// Rejects names that could leave the model's directory (`..`, absolute, backslashes, …).
pub fn check_path(path: &str) -> ApiResult<()> {
    check_key(path).map_err(|e| {
        let reason = match e {
            StoreError::InvalidKey { reason, .. } => reason,
            other => other.to_string(),
        };
        ApiError::bad_request_code(
            format!("invalid artifact path '{path}': {reason}"),
            Some("path"),
            "invalid_path",
        )
    })
}

fn etag_of(sha256: &str) -> String {
    format!("\"{sha256}\"")
}

/// Whether an `If-None-Match` / `If-Range` list names `etag` (weak comparison).
fn etag_matches(list: &str, etag: &str) -> bool {
    list.split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

/// What a `Range` header asks of a file of `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeAsk {
    /// No usable range: the whole file (absent, malformed or multi-range headers).
    Whole,
    /// Bytes `start..end` (end exclusive).
    Part(Range<u64>),
    /// A well-formed range that misses the file: 416.
    Unsatisfiable,
}

/// Parses a single `bytes=` range (RFC 9110); anything else asks for the whole file.
pub fn parse_range(value: &str, size: u64) -> RangeAsk {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeAsk::Whole;
    };
    if spec.contains(',') {
        return RangeAsk::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAsk::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    if a.is_empty() {
        return match num(b) {
            None => RangeAsk::Whole,
            Some(0) => RangeAsk::Unsatisfiable,
            Some(_) if size == 0 => RangeAsk::Unsatisfiable,
            Some(n) => RangeAsk::Part(size.saturating_sub(n)..size),
        };
    }
    let Some(start) = num(a) else {
        return RangeAsk::Whole;
    };
    let end = if b.is_empty() {
        size
    } else {
        match num(b) {
            Some(last) if last >= start => last.saturating_add(1).min(size),
            _ => return RangeAsk::Whole,
        }
    };
    if start >= size {
        RangeAsk::Unsatisfiable
    } else {
        RangeAsk::Part(start..end)
    }
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn disposition(name: &str) -> HeaderValue {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    hv(&format!("attachment; filename=\"{safe}\""))
}

/// Serves one file of `src`: 200 / 206 / 304 / 416.
async fn serve_file(
    store: &Store,
    src: &Source,
    path: &str,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    let files = files_of(store, src).await?;
    let Some((_, obj)) = files.into_iter().find(|(rel, _)| rel == path) else {
        return Err(ApiError::NotFound {
            message: format!("{} has no file '{path}'.", capitalise(&src.what)),
            code: "not_found",
        });
    };
    let etag = etag_of(&obj.sha256);
    let header_str = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
    let base_name = path.rsplit('/').next().unwrap_or(path);
    let mut common = HeaderMap::new();
    common.insert(header::ETAG, hv(&etag));
    common.insert("x-tuna-sha256", hv(&obj.sha256));
    common.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    common.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache"),
    );
    if header_str(header::IF_NONE_MATCH).is_some_and(|v| etag_matches(v, &etag)) {
        return Ok((StatusCode::NOT_MODIFIED, common).into_response());
    }
    let if_range_ok = header_str(header::IF_RANGE).is_none_or(|v| etag_matches(v, &etag));
    let ask = match header_str(header::RANGE) {
        Some(r) if if_range_ok => parse_range(r, obj.size),
        _ => RangeAsk::Whole,
    };
    common.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    common.insert(header::CONTENT_DISPOSITION, disposition(base_name));
    match ask {
        RangeAsk::Unsatisfiable => Err(ApiError::RangeNotSatisfiable {
            message: format!(
                "The requested range is not satisfiable: '{path}' has {} bytes.",
                obj.size
            ),
            size: obj.size,
        }),
        RangeAsk::Whole => {
            let (size, body) = store.get_stream(&obj.key).await?;
            common.insert(header::CONTENT_LENGTH, hv(&size.to_string()));
            Ok((StatusCode::OK, common, Body::from_stream(body)).into_response())
        }
        RangeAsk::Part(range) => {
            common.insert(
                header::CONTENT_RANGE,
                hv(&format!(
                    "bytes {}-{}/{}",
                    range.start,
                    range.end - 1,
                    obj.size
                )),
            );
            common.insert(
                header::CONTENT_LENGTH,
                hv(&(range.end - range.start).to_string()),
            );
            let body = range_stream(store.clone(), obj.key.clone(), range);
            Ok((StatusCode::PARTIAL_CONTENT, common, Body::from_stream(body)).into_response())
        }
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// Bytes `range` of `key`, read in [`RANGE_CHUNK`] pieces.
fn range_stream(
    store: Store,
    key: String,
    range: Range<u64>,
) -> impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static {
    stream::try_unfold(range.start, move |pos| {
        let (store, key, end) = (store.clone(), key.clone(), range.end);
        async move {
            if pos >= end {
                return Ok(None);
            }
            let next = (pos + RANGE_CHUNK).min(end);
            let bytes = store.get_range(&key, pos..next).await?;
            if bytes.len() as u64 != next - pos {
                return Err(StoreError::Integrity {
                    key: key.clone(),
                    detail: format!(
                        "read {} bytes at offset {pos}, expected {}",
                        bytes.len(),
                        next - pos
                    ),
                });
            }
            Ok(Some((bytes, next)))
        }
    })
}

/// The whole of `src` as one tar archive, streamed.
async fn serve_tar(store: &Store, src: &Source) -> ApiResult<Response> {
    let files = files_of(store, src).await?;
    let entries: Vec<(tar::Entry, String)> = files
        .into_iter()
        .map(|(rel, o)| {
            (
                tar::Entry {
                    name: rel,
                    size: o.size,
                    mtime: src.mtime,
                },
                o.key,
            )
        })
        .collect();
    let len = tar::archive_len(&entries.iter().map(|(e, _)| e.clone()).collect::<Vec<_>>());
    let store = store.clone();
    let body = stream::iter(entries)
        .flat_map(move |(entry, key)| entry_stream(store.clone(), key, entry))
        .chain(stream::once(async {
            Ok::<_, StoreError>(Bytes::from_static(&tar::END))
        }))
        .inspect_err(|e| tracing::warn!(error = %e, "streaming a tar archive failed"));
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-tar"),
        ),
        (header::CONTENT_LENGTH, hv(&len.to_string())),
        (header::CONTENT_DISPOSITION, disposition(&src.archive_name)),
    ];
    Ok((StatusCode::OK, headers, Body::from_stream(body)).into_response())
}

/// One archive member: header, content (checked against the listed size), padding.
fn entry_stream(
    store: Store,
    key: String,
    entry: tar::Entry,
) -> impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static {
    let head = Bytes::from(tar::header(&entry));
    let pad = tar::padding(entry.size);
    let expected = entry.size;
    let content = stream::once(async move {
        let (size, s) = store.get_stream(&key).await?;
        if size != expected {
            return Err(StoreError::Integrity {
                key,
                detail: format!("listed with {expected} bytes, the store has {size}"),
            });
        }
        Ok(s)
    })
    .try_flatten();
    stream::once(async move { Ok(head) })
        .chain(content)
        .chain(stream::once(async move { Ok(Bytes::from(vec![0u8; pad])) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), RangeAsk::Part(0..10));
        assert_eq!(parse_range("bytes=90-", 100), RangeAsk::Part(90..100));
        assert_eq!(parse_range("bytes=90-1000", 100), RangeAsk::Part(90..100));
        assert_eq!(parse_range("bytes=-10", 100), RangeAsk::Part(90..100));
        assert_eq!(parse_range("bytes=-1000", 100), RangeAsk::Part(0..100));
        assert_eq!(parse_range("bytes=100-", 100), RangeAsk::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), RangeAsk::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-0", 0), RangeAsk::Unsatisfiable);
        assert_eq!(parse_range("bytes=5-2", 100), RangeAsk::Whole);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeAsk::Whole);
        assert_eq!(parse_range("items=0-1", 100), RangeAsk::Whole);
        assert_eq!(parse_range("bytes=x-1", 100), RangeAsk::Whole);
    }

    #[test]
    fn etags() {
        assert!(etag_matches("\"ab\"", "\"ab\""));
        assert!(etag_matches("W/\"ab\", \"cd\"", "\"ab\""));
        assert!(etag_matches("*", "\"ab\""));
        assert!(!etag_matches("\"cd\"", "\"ab\""));
    }
}
