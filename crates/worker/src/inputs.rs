//! A job's inputs: its datasets (an uploaded file in the store, an http(s):// URL, an s3:// URL,
//! or a file:// URL where the worker allows it) and its base model (a `models` row: a directory
//! for base models, an artifact-store prefix for fine-tuned ones, downloaded once into a cache).
//!
//! Every failure is a [`JobError`] that names the parameter to fix.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use sqlx::PgPool;
use tokio::io::AsyncWriteExt;
use tuna_core::data::Format;
use tuna_db::queue::JobError;
use tuna_store::{S3Settings, Store, StoreError};

/// Limits on dataset downloads.
#[derive(Debug, Clone)]
pub struct FetchLimits {
    pub max_bytes: u64,
    pub connect_timeout: Duration,
    /// Whole download (headers and body).
    pub total_timeout: Duration,
    pub max_redirects: usize,
    pub allow_file_urls: bool,
}

impl Default for FetchLimits {
    fn default() -> Self {
        FetchLimits {
            max_bytes: 10 * 1024 * 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(30 * 60),
            max_redirects: 5,
            allow_file_urls: false,
        }
    }
}

/// A dataset on local disk, ready for the trainer.
#[derive(Debug, Clone)]
pub struct LocalDataset {
    pub path: PathBuf,
    pub format: Format,
    pub bytes: u64,
}

fn err(code: &str, param: &str, message: String) -> JobError {
    JobError {
        code: code.to_string(),
        message,
        param: Some(param.to_string()),
    }
}

fn file_name(format: Format, stem: &str) -> String {
    format!("{stem}.{}", format.as_str())
}

/// Fetches an uploaded file (`files` row of the job's organisation) from the store.
pub async fn fetch_uploaded(
    pool: &PgPool,
    store: &Store,
    organization_id: &str,
    file_id: &str,
    param: &str,
    dir: &Path,
    stem: &str,
) -> Result<LocalDataset, JobError> {
    let row: Option<(String, String, Option<chrono::DateTime<chrono::Utc>>)> = sqlx::query_as(
        "select filename, storage_key, deleted_at from files where file_id = $1 and organization_id = $2",
    )
    .bind(file_id)
    .bind(organization_id)
    .fetch_optional(pool)
    .await
    .map_err(|e| err("internal", param, format!("cannot read file {file_id}: {e}")))?;
    let Some((filename, key, deleted)) = row else {
        return Err(err(
            "invalid_file",
            param,
            format!("file {file_id} does not exist"),
        ));
    };
    if deleted.is_some() {
        return Err(err(
            "invalid_file",
            param,
            format!("file {file_id} was deleted"),
        ));
    }
    let format = Format::from_filename(&filename);
    let path = dir.join(file_name(format, stem));
    let info = store
        .download_file(&key, &path)
        .await
        .map_err(|e| match e {
            StoreError::NotFound(_) => err(
                "invalid_file",
                param,
                format!("the content of file {file_id} is missing from the store"),
            ),
            e => err(
                "internal",
                param,
                format!("cannot read file {file_id} from the store: {e}"),
            ),
        })?;
    Ok(LocalDataset {
        path,
        format,
        bytes: info.size,
    })
}

/// Fetches a dataset URL (http, https, s3, or file when allowed) to `dir/<stem>.<ext>`.
pub async fn fetch_url(
    url: &str,
    param: &str,
    dir: &Path,
    stem: &str,
    limits: &FetchLimits,
    s3: &S3Settings,
) -> Result<LocalDataset, JobError> {
    let lower = url.to_ascii_lowercase();
    let format = Format::from_filename(url);
    let path = dir.join(file_name(format, stem));
    let fail = |m: String| err("dataset_download_failed", param, m);
    let bytes = if lower.starts_with("http://") || lower.starts_with("https://") {
        fetch_http(url, &path, limits)
            .await
            .map_err(|m| fail(format!("could not download {url}: {m}")))?
    } else if lower.starts_with("s3://") {
        tuna_store::fetch_s3_url(url, s3, &path, limits.max_bytes)
            .await
            .map_err(|e| {
                fail(match e {
                    StoreError::NotFound(_) => format!("could not download {url}: no such object"),
                    e => format!("could not download {url}: {e}"),
                })
            })?
    } else if lower.starts_with("file://") {
        if !limits.allow_file_urls {
            return Err(err(
                "invalid_dataset_url",
                param,
                "file:// dataset URLs are disabled on this worker (an operator can allow them with --allow-file-urls)".into(),
            ));
        }
        let src = url::Url::parse(url)
            .ok()
            .and_then(|u| u.to_file_path().ok())
            .ok_or_else(|| {
                err(
                    "invalid_dataset_url",
                    param,
                    format!("'{url}' is not a valid file:// URL"),
                )
            })?;
        let meta = tokio::fs::metadata(&src)
            .await
            .map_err(|e| fail(format!("cannot read {}: {e}", src.display())))?;
        if meta.len() > limits.max_bytes {
            return Err(fail(format!(
                "{url} is larger than the limit of {} bytes",
                limits.max_bytes
            )));
        }
        tokio::fs::copy(&src, &path)
            .await
            .map_err(|e| fail(format!("cannot copy {}: {e}", src.display())))?
    } else {
        return Err(err(
            "invalid_dataset_url",
            param,
            format!("unsupported dataset URL '{url}'"),
        ));
    };
    Ok(LocalDataset {
        path,
        format,
        bytes,
    })
}

async fn fetch_http(url: &str, dest: &Path, limits: &FetchLimits) -> Result<u64, String> {
    let client = reqwest::Client::builder()
        .connect_timeout(limits.connect_timeout)
        .timeout(limits.total_timeout)
        .redirect(reqwest::redirect::Policy::limited(limits.max_redirects))
        .user_agent(concat!("tuna-worker/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())?;
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| describe_reqwest(&e, limits))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("the server answered HTTP {status}"));
    }
    if let Some(len) = resp.content_length() {
        if len > limits.max_bytes {
            return Err(format!(
                "the file is {len} bytes, larger than the limit of {} bytes",
                limits.max_bytes
            ));
        }
    }
    let tmp = dest.with_extension("part");
    let mut f = tokio::fs::File::create(&tmp)
        .await
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    let mut n = 0u64;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| describe_reqwest(&e, limits))?;
        n += chunk.len() as u64;
        if n > limits.max_bytes {
            drop(f);
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(format!(
                "the file is larger than the limit of {} bytes",
                limits.max_bytes
            ));
        }
        f.write_all(&chunk)
            .await
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    }
    f.flush().await.map_err(|e| e.to_string())?;
    drop(f);
    tokio::fs::rename(&tmp, dest)
        .await
        .map_err(|e| e.to_string())?;
    Ok(n)
}

fn describe_reqwest(e: &reqwest::Error, limits: &FetchLimits) -> String {
    use std::error::Error as _;
    if e.is_redirect() {
        return format!("more than {} redirects", limits.max_redirects);
    }
    if e.is_timeout() {
        return format!(
            "timed out (connect {:?}, total {:?})",
            limits.connect_timeout, limits.total_timeout
        );
    }
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    if e.is_connect() {
        format!("cannot connect ({msg})")
    } else {
        msg
    }
}

/// Checks a local dataset line by line; on bad records the error lists the first ones with
/// their line numbers.
pub async fn validate_dataset(
    ds: &LocalDataset,
    param: &str,
    what: &str,
) -> Result<tuna_core::data::Report, JobError> {
    let path = ds.path.clone();
    let format = ds.format;
    let report = tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&path)?;
        Ok::<_, std::io::Error>(tuna_core::data::scan(
            std::io::BufReader::new(f),
            format,
            5,
            |_, _| {},
        ))
    })
    .await
    .map_err(|e| {
        err(
            "internal",
            param,
            format!("validating the {what} failed: {e}"),
        )
    })?
    .map_err(|e| err("internal", param, format!("cannot read the {what}: {e}")))?;
    if report.is_ok() {
        Ok(report)
    } else {
        Err(err(
            "invalid_data",
            param,
            format!("the {what} is invalid: {}", report.summary()),
        ))
    }
}

/// A resolved base model.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub model_id: String,
    pub dir: PathBuf,
    pub architecture: Value,
}

/// Resolves `model` through the `models` table (visible to everyone or owned by the job's
/// organisation). Fine-tuned models are downloaded from the store into `cache_dir` once.
pub async fn resolve_model(
    pool: &PgPool,
    store: &Store,
    organization_id: &str,
    model: &str,
    cache_dir: &Path,
) -> Result<ResolvedModel, JobError> {
    let row: Option<(String, String, Value)> = sqlx::query_as(
        "select kind, location, architecture from models \
         where model_id = $1 and (organization_id is null or organization_id = $2)",
    )
    .bind(model)
    .bind(organization_id)
    .fetch_optional(pool)
    .await
    .map_err(|e| {
        err(
            "internal",
            "model",
            format!("cannot look up model {model}: {e}"),
        )
    })?;
    let Some((kind, location, architecture)) = row else {
        return Err(err(
            "model_not_found",
            "model",
            format!("model '{model}' does not exist or is not available to you"),
        ));
    };
    let dir = if kind == "base" {
        let dir = PathBuf::from(&location);
        if !dir.join("config.json").is_file() {
            return Err(err(
                "invalid_model",
                "model",
                format!("base model '{model}' is registered at {location}, but no config.json is there on this worker"),
            ));
        }
        dir
    } else {
        let dir = cache_dir.join(sanitize(model));
        if !dir.join(".complete").is_file() {
            let tmp = cache_dir.join(format!(
                ".{}.{}",
                sanitize(model),
                uuid::Uuid::new_v4().simple()
            ));
            let res = store.download_prefix(&location, &tmp).await;
            if let Err(e) = res {
                let _ = tokio::fs::remove_dir_all(&tmp).await;
                return Err(err(
                    "invalid_model",
                    "model",
                    format!("cannot download fine-tuned model '{model}': {e}"),
                ));
            }
            let _ = std::fs::write(tmp.join(".complete"), b"");
            let _ = tokio::fs::remove_dir_all(&dir).await;
            tokio::fs::rename(&tmp, &dir).await.map_err(|e| {
                err(
                    "internal",
                    "model",
                    format!("cannot move the model into the cache: {e}"),
                )
            })?;
        }
        dir
    };
    Ok(ResolvedModel {
        model_id: model.to_string(),
        dir,
        architecture,
    })
}

/// A file-name-safe, collision-free version of a model id (readable part + hash).
pub fn sanitize(name: &str) -> String {
    use sha2::Digest;
    let readable: String = name
        .chars()
        .take(80)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let hash = hex::encode(sha2::Sha256::digest(name.as_bytes()));
    format!("{readable}-{}", &hash[..12])
}
