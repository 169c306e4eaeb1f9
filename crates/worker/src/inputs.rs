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
    /// Fetch http(s) URLs that resolve to (or redirect to) loopback, private, link-local and
    /// other non-public addresses. Off by default: a dataset URL is chosen by the API's caller,
    /// and must not reach the worker's own network (cloud metadata services, databases, ...).
    pub allow_private_urls: bool,
}

impl Default for FetchLimits {
    fn default() -> Self {
        FetchLimits {
            max_bytes: 10 * 1024 * 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(30 * 60),
            max_redirects: 5,
            allow_file_urls: false,
            allow_private_urls: false,
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

/// Addresses a dataset URL may not reach unless the worker allows private URLs: unspecified,
/// loopback, private (RFC 1918, fc00::/7), link-local (169.254.0.0/16, where cloud metadata
/// services live, and fe80::/10), shared (100.64.0.0/10), benchmarking, multicast, broadcast and
/// reserved ranges, and IPv4 addresses mapped into IPv6.
pub fn is_non_public(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_non_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
}

fn private_refusal(host: &str, ip: std::net::IpAddr) -> String {
    format!(
        "{host} is a non-public address ({ip}); this worker does not fetch datasets from loopback, private or link-local addresses (an operator can allow it with --allow-private-urls)"
    )
}

/// Resolves names like the system does, keeping only public addresses.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let all: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<std::net::SocketAddr> = all
                .iter()
                .copied()
                .filter(|a| !is_non_public(a.ip()))
                .collect();
            match (public.is_empty(), all.first()) {
                (true, Some(first)) => Err(private_refusal(&host, first.ip()).into()),
                _ => Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

/// The non-public IP literal `url` names as its host, if any (names go through [`PublicOnly`]).
fn private_literal(url: &url::Url) -> Option<String> {
    let ip = match url.host()? {
        url::Host::Ipv4(ip) => std::net::IpAddr::V4(ip),
        url::Host::Ipv6(ip) => std::net::IpAddr::V6(ip),
        url::Host::Domain(_) => return None,
    };
    is_non_public(ip).then(|| private_refusal(&ip.to_string(), ip))
}

async fn fetch_http(url: &str, dest: &Path, limits: &FetchLimits) -> Result<u64, String> {
    let max_redirects = limits.max_redirects;
    let allow_private = limits.allow_private_urls;
    let mut builder = reqwest::Client::builder()
        .connect_timeout(limits.connect_timeout)
        .timeout(limits.total_timeout)
        .redirect(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max_redirects {
                return attempt.error(format!("more than {max_redirects} redirects"));
            }
            match private_literal(attempt.url()).filter(|_| !allow_private) {
                Some(why) => {
                    let msg = format!("redirected to {}: {why}", attempt.url());
                    attempt.error(msg)
                }
                None => attempt.follow(),
            }
        }))
        .user_agent(concat!("tuna-worker/", env!("CARGO_PKG_VERSION")));
    if !allow_private {
        let parsed = url::Url::parse(url).map_err(|e| format!("not a valid URL: {e}"))?;
        if let Some(why) = private_literal(&parsed) {
            return Err(why);
        }
        builder = builder.dns_resolver(std::sync::Arc::new(PublicOnly));
    }
    let client = builder.build().map_err(|e| e.to_string())?;
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
        // The policy's own message (too many redirects, or a redirect to a private address).
        return match e.source() {
            Some(s) => s.to_string(),
            None => format!("more than {} redirects", limits.max_redirects),
        };
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
            if !tmp.join("config.json").is_file()
                && !tmp.join("merged").join("config.json").is_file()
            {
                let adapter = std::fs::read_to_string(tmp.join("adapter_config.json")).ok();
                let _ = tokio::fs::remove_dir_all(&tmp).await;
                return Err(err(
                    "invalid_model",
                    "model",
                    match adapter {
                        Some(text) => {
                            let base = serde_json::from_str::<Value>(&text)
                                .ok()
                                .and_then(|v| {
                                    v["base_model_name_or_path"].as_str().map(str::to_string)
                                })
                                .unwrap_or_else(|| "its base model".into());
                            format!(
                                "fine-tuned model '{model}' is a LoRA adapter without merged weights, so a new job cannot start from it; fine-tune its base ({base}) with `merge_lora: true` to get a model that can be fine-tuned further, or load the adapter with PEFT"
                            )
                        }
                        None => format!(
                            "fine-tuned model '{model}' has no config.json in the artifact store"
                        ),
                    },
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
        // A LoRA job with `merge_lora` keeps the adapter at the top and full weights in
        // `merged/`: a new job starts from those.
        if dir.join("config.json").is_file() {
            dir
        } else {
            dir.join("merged")
        }
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

#[cfg(test)]
mod private_url_tests {
    use super::*;

    #[test]
    fn non_public_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_non_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
        ] {
            assert!(!is_non_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn ip_literals_are_checked_names_are_left_to_the_resolver() {
        let check = |u: &str| private_literal(&url::Url::parse(u).unwrap());
        assert!(check("http://127.0.0.1:8000/x").is_some());
        assert!(check("http://[::1]/x").is_some());
        assert!(check("http://169.254.169.254/latest").is_some());
        assert!(check("https://93.184.215.14/x").is_none());
        assert!(check("https://example.com/x").is_none());
    }

    #[tokio::test]
    async fn names_resolving_only_to_private_addresses_are_refused() {
        use reqwest::dns::Resolve;
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let refused = PublicOnly
            .resolve(name)
            .await
            .err()
            .expect("localhost is refused");
        assert!(
            refused.to_string().contains("non-public address"),
            "{refused}"
        );
    }
}
