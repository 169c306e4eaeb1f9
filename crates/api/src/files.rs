//! `/v1/files`: multipart upload streamed to a local temporary file (sha256 computed on the way,
//! never held in memory, size limit enforced), checked line by line for purpose `fine-tune`,
//! then put into the artifact store at `files/<file_id>` (the row's `storage_key`) where workers
//! on any machine read it; listed, retrieved, downloaded (streamed from the store) and deleted
//! (the stored object too). Result files written by workers live at the same kind of key.

use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::extract::multipart::{Field, MultipartRejection};
use axum::extract::{DefaultBodyLimit, Multipart, Path as UrlPath, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tuna_core::data::{self, Format};
use tuna_core::ids;
use tuna_db::files::{self as db, FileCheck, NewFile, Order};
use tuna_db::rows::FileRow;
use tuna_store::StoreError;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::objects::Rendered;
use crate::query::{page, ListParams};
use crate::routes::Routes;
use crate::{objects, AppState, Config};

/// Purposes OpenAI knows; only `fine-tune` files are checked.
pub const PURPOSES: &[&str] = &[
    "fine-tune",
    "fine-tune-results",
    "assistants",
    "batch",
    "vision",
    "user_data",
    "evals",
];

/// How many line errors an upload report shows.
const MAX_REPORTED_ERRORS: usize = 5;

/// How much of an oversized body is read (and dropped) before answering 413, so that a client
/// still sending sees the answer rather than a reset connection.
const DRAIN_LIMIT: u64 = 16 * 1024 * 1024;

pub fn routes() -> Routes {
    Routes::new()
        .get("/v1/files", list)
        .post_with("/v1/files", upload, |r| {
            r.layer(DefaultBodyLimit::disable())
        })
        .get("/v1/files/{file_id}", retrieve)
        .delete("/v1/files/{file_id}", delete)
        .get("/v1/files/{file_id}/content", content)
}

async fn upload(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> ApiResult<Json<Value>> {
    check_length(&headers, st.config.max_upload_bytes)?;
    let multipart = multipart.map_err(|e| {
        ApiError::bad_request_code(
            format!("expected a multipart/form-data body: {}", e.body_text()),
            None,
            "invalid_multipart",
        )
    })?;
    let row = receive(&st, &caller, multipart).await?;
    Ok(Json(objects::file(&row)))
}

async fn list(State(st): State<AppState>, caller: Caller, q: ListParams) -> ApiResult<Rendered> {
    let limit = q.limit(10_000, 10_000)?;
    let order = if q.descending()? {
        Order::Desc
    } else {
        Order::Asc
    };
    let rows = db::list_files(
        &st.db,
        &caller.organization_id,
        q.purpose(),
        q.after(),
        limit + 1,
        order,
    )
    .await?;
    Ok(page(&rows, limit, objects::file))
}

async fn retrieve(
    State(st): State<AppState>,
    caller: Caller,
    UrlPath(file_id): UrlPath<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(objects::file(&find(&st, &caller, &file_id).await?)))
}

async fn delete(
    State(st): State<AppState>,
    caller: Caller,
    UrlPath(file_id): UrlPath<String>,
) -> ApiResult<Json<Value>> {
    let row = db::delete_file(&st.db, &caller.organization_id, &file_id)
        .await?
        .ok_or_else(|| ApiError::not_found("file", &file_id))?;
    st.inputs.forget_file(&caller.organization_id, &row.file_id);
    if let Err(e) = st.config.store.delete(&row.storage_key).await {
        tracing::warn!(key = %row.storage_key, error = %e, "removing a deleted file's bytes failed");
    }
    Ok(Json(
        json!({"id": row.file_id, "object": "file", "deleted": true}),
    ))
}

async fn content(
    State(st): State<AppState>,
    caller: Caller,
    UrlPath(file_id): UrlPath<String>,
) -> ApiResult<Response> {
    let row = find(&st, &caller, &file_id).await?;
    let (size, stream) =
        st.config
            .store
            .get_stream(&row.storage_key)
            .await
            .map_err(|e| match e {
                StoreError::NotFound(_) => ApiError::NotFound {
                    message: format!("The content of file '{file_id}' is missing from the store."),
                    code: "not_found",
                },
                e => e.into(),
            })?;
    let body = Body::from_stream(stream);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        body,
    )
        .into_response())
}

/// A live file of the caller's organisation, or 404.
pub async fn find(st: &AppState, caller: &Caller, file_id: &str) -> ApiResult<FileRow> {
    db::get_file(&st.db, &caller.organization_id, file_id)
        .await?
        .ok_or_else(|| ApiError::not_found("file", file_id))
}

fn too_large(max: u64) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "The file is larger than this server's upload limit of {max} bytes."
    ))
}

/// Rejects at once a body announced far above the limit.
fn check_length(headers: &HeaderMap, max: u64) -> ApiResult<()> {
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match announced {
        Some(n) if n > max.saturating_add(DRAIN_LIMIT) => Err(too_large(max)),
        _ => Ok(()),
    }
}

fn multipart_err(e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::PayloadTooLarge("The request body is too large.".into());
    }
    ApiError::bad_request_code(
        format!("could not read the multipart body: {}", e.body_text()),
        None,
        "invalid_multipart",
    )
}

/// A file part written to disk.
struct Stored {
    filename: String,
    bytes: u64,
    sha256: String,
}

/// Reads the multipart parts, stores the `file` part, records and checks it.
async fn receive(st: &AppState, caller: &Caller, mut mp: Multipart) -> ApiResult<FileRow> {
    let file_id = ids::new_id(ids::FILE);
    let dir = st.config.tmp_dir();
    tokio::fs::create_dir_all(&dir).await?;
    let part = dir.join(format!("{file_id}.part"));
    let result = receive_part(st, caller, &mut mp, &file_id, &part).await;
    let _ = tokio::fs::remove_file(&part).await;
    result
}

/// Receives the upload into `part`, stores it, records and checks it.
async fn receive_part(
    st: &AppState,
    caller: &Caller,
    mp: &mut Multipart,
    file_id: &str,
    part: &Path,
) -> ApiResult<FileRow> {
    let (purpose, stored) = read_parts(mp, part, st.config.max_upload_bytes).await?;
    let key = Config::file_key(file_id);
    st.config.store.put_file(&key, part).await?;
    let new = NewFile {
        file_id: file_id.to_string(),
        organization_id: caller.organization_id.clone(),
        filename: stored.filename.clone(),
        purpose: purpose.clone(),
        bytes: stored.bytes as i64,
        storage_key: key.clone(),
        sha256: stored.sha256,
    };
    let row = match db::insert_file(&st.db, &new).await {
        Ok(r) => r,
        Err(e) => {
            let _ = st.config.store.delete(&key).await;
            return Err(e.into());
        }
    };
    let check = if purpose == "fine-tune" {
        check_file(part.to_path_buf(), stored.filename).await?
    } else {
        FileCheck {
            status: "processed".into(),
            status_details: None,
            format: None,
            example_count: None,
            label_count: None,
            non_numeric_label_line: None,
        }
    };
    let row = db::set_check(&st.db, &row.file_id, &check).await?;
    if row.status == "error" {
        return Err(ApiError::bad_request_code(
            format!(
                "Invalid file format for fine-tuning (file {} kept with status 'error'): {}",
                row.file_id,
                row.status_details.as_deref().unwrap_or_default()
            ),
            Some("file"),
            "invalid_file_format",
        ));
    }
    Ok(row)
}

async fn read_parts(mp: &mut Multipart, part: &Path, max: u64) -> ApiResult<(String, Stored)> {
    let mut purpose = None;
    let mut stored = None;
    while let Some(field) = mp.next_field().await.map_err(multipart_err)? {
        match field.name() {
            Some("purpose") => purpose = Some(small_text(field).await?),
            Some("file") if stored.is_none() => stored = Some(store_field(field, part, max).await?),
            _ => skip(field).await?,
        }
    }
    let stored = stored.ok_or_else(|| {
        ApiError::bad_request("the multipart body has no `file` part", Some("file"))
    })?;
    let purpose =
        purpose.ok_or_else(|| ApiError::bad_request("`purpose` is required", Some("purpose")))?;
    if !PURPOSES.contains(&purpose.as_str()) {
        return Err(ApiError::bad_request(
            format!(
                "'{purpose}' is not a supported purpose; use one of {}",
                PURPOSES.join(", ")
            ),
            Some("purpose"),
        ));
    }
    Ok((purpose, stored))
}

async fn small_text(field: Field<'_>) -> ApiResult<String> {
    let text = field.text().await.map_err(multipart_err)?;
    if text.len() > 1024 {
        return Err(ApiError::bad_request(
            "this form field is too long",
            Some("purpose"),
        ));
    }
    Ok(text.trim().to_string())
}

async fn skip(mut field: Field<'_>) -> ApiResult<()> {
    while field.chunk().await.map_err(multipart_err)?.is_some() {}
    Ok(())
}

async fn store_field(mut field: Field<'_>, part: &Path, max: u64) -> ApiResult<Stored> {
    let filename = field
        .file_name()
        .map(str::to_string)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "upload.jsonl".into());
    let mut out = tokio::fs::File::create(part).await?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    while let Some(chunk) = field.chunk().await.map_err(multipart_err)? {
        bytes += chunk.len() as u64;
        if bytes > max {
            drop(out);
            let mut drained = bytes;
            while drained < max.saturating_add(DRAIN_LIMIT) {
                match field.chunk().await {
                    Ok(Some(c)) => drained += c.len() as u64,
                    _ => break,
                }
            }
            return Err(too_large(max));
        }
        hasher.update(&chunk);
        out.write_all(&chunk).await?;
    }
    out.flush().await?;
    out.sync_all().await?;
    Ok(Stored {
        filename,
        bytes,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// Scans a stored fine-tune file (on a blocking thread, streaming) into a [`FileCheck`].
pub async fn check_file(path: PathBuf, filename: String) -> ApiResult<FileCheck> {
    let report = tokio::task::spawn_blocking(move || -> std::io::Result<data::Report> {
        let f = std::fs::File::open(&path)?;
        Ok(data::scan(
            std::io::BufReader::new(f),
            Format::from_filename(&filename),
            MAX_REPORTED_ERRORS,
            |_, _| {},
        ))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("file check task: {e}")))??;
    let label_count = report
        .shape
        .is_some_and(data::Shape::is_labelled)
        .then(|| i32::try_from(report.labels.len()).unwrap_or(i32::MAX));
    let (status, status_details) = if report.is_ok() {
        ("processed", None)
    } else {
        ("error", Some(report.summary()))
    };
    Ok(FileCheck {
        status: status.into(),
        status_details,
        format: report.shape.map(|s| s.as_str().to_string()),
        example_count: Some(report.examples as i64),
        label_count,
        non_numeric_label_line: report
            .first_non_numeric_label
            .as_ref()
            .map(|(line, _)| *line as i64),
    })
}
