//! tuna's artifact store: where checkpoints, final models, result files and uploaded datasets
//! live, in a local directory (the default) or in any S3-compatible service (through the
//! `object_store` crate).
//!
//! - Names ("keys") are `/`-separated relative paths checked by [`check_key`]: no empty, `.` or
//!   `..` segment, no leading `/`, no backslash, no control character. A key therefore can never
//!   leave the store's root (local directory or bucket prefix).
//! - Layout used by tuna: `files/<file_id>` (uploaded and result files),
//!   `jobs/<job_id>/checkpoints/step-<n>/…` (checkpoints), `jobs/<job_id>/final/…` (the final
//!   model).
//! - [`Store::upload_dir`] writes every file of a directory under a prefix and a manifest
//!   (`tuna-manifest.json`: relative name → size and sha256) next to them; [`Store::list`] reports
//!   each object's size and sha256 (from the manifests, or computed by reading the object when no
//!   manifest covers it) and hides the manifests; [`Store::download_prefix`] checks what it
//!   downloads against the manifest.
//! - Reads: whole objects, byte ranges ([`Store::get_range`]) and streams ([`Store::get_stream`])
//!   for the HTTP download endpoints.
//! - [`fetch_s3_url`] downloads an `s3://bucket/key` dataset with a size cap.

#[cfg(feature = "testing")]
pub mod testing;

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Name of the manifest [`Store::upload_dir`] writes under each uploaded prefix.
pub const MANIFEST: &str = "tuna-manifest.json";

/// Longest accepted key, in bytes (S3's limit).
pub const MAX_KEY_BYTES: usize = 1024;

/// Files up to this size are written with one request; larger ones with a multipart upload.
const SINGLE_PUT_MAX: u64 = 16 * 1024 * 1024;
/// Part size of multipart uploads (S3's minimum is 5 MiB).
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Read buffer when hashing or uploading a local file.
const READ_CHUNK: usize = 1024 * 1024;

/// Errors of the store. Messages name the key and the backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid object name '{key}': {reason}")]
    InvalidKey { key: String, reason: String },
    #[error("object '{0}' not found in the artifact store")]
    NotFound(String),
    #[error("'{what}' is larger than the limit of {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    #[error("'{key}' does not match its manifest ({detail})")]
    Integrity { key: String, detail: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Backend {
        context: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{0}")]
    Config(String),
}

impl StoreError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }

    fn backend(context: impl Into<String>, key: &str, source: object_store::Error) -> Self {
        match source {
            object_store::Error::NotFound { .. } => StoreError::NotFound(key.to_string()),
            source => StoreError::Backend {
                context: context.into(),
                source,
            },
        }
    }

    /// Whether the error means the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound(_))
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One stored object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectInfo {
    /// The full key, relative to the store's root.
    pub key: String,
    pub size: u64,
    /// Hex sha256 of the content.
    pub sha256: String,
}

/// Credentials and endpoint for S3-compatible services. Every field is optional: unset fields
/// fall back to the usual AWS environment variables read by [`S3Settings::from_env`].
#[derive(Debug, Clone, Default)]
pub struct S3Settings {
    /// e.g. `http://127.0.0.1:9000` for MinIO or moto; none for AWS itself.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    /// Allow plain-HTTP endpoints (on by default when the endpoint starts with `http://`).
    pub allow_http: bool,
}

impl S3Settings {
    /// From `AWS_ENDPOINT_URL` (or `TUNA_S3_ENDPOINT`), `AWS_REGION` / `AWS_DEFAULT_REGION`,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`.
    pub fn from_env() -> S3Settings {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let endpoint = var("TUNA_S3_ENDPOINT").or_else(|| var("AWS_ENDPOINT_URL"));
        S3Settings {
            allow_http: endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://")),
            endpoint,
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")),
            access_key_id: var("AWS_ACCESS_KEY_ID"),
            secret_access_key: var("AWS_SECRET_ACCESS_KEY"),
            session_token: var("AWS_SESSION_TOKEN"),
        }
    }

    fn build(&self, bucket: &str) -> Result<Arc<dyn ObjectStore>> {
        let mut b = AmazonS3Builder::new().with_bucket_name(bucket).with_region(
            self.region
                .clone()
                .unwrap_or_else(|| "us-east-1".to_string()),
        );
        if let Some(e) = &self.endpoint {
            b = b
                .with_endpoint(e)
                .with_allow_http(self.allow_http || e.starts_with("http://"));
        }
        match (&self.access_key_id, &self.secret_access_key) {
            (Some(k), Some(s)) => {
                b = b.with_access_key_id(k).with_secret_access_key(s);
                if let Some(t) = &self.session_token {
                    b = b.with_token(t);
                }
            }
            // No credentials: anonymous access (public buckets).
            _ => b = b.with_skip_signature(true),
        }
        let s3 = b.build().map_err(|e| {
            StoreError::Config(format!("cannot configure S3 bucket '{bucket}': {e}"))
        })?;
        Ok(Arc::new(s3))
    }
}

/// Checks an object name: 1 to 1024 bytes of `/`-separated segments, none empty, `.` or `..`,
/// no leading `/`, no backslash, no control character.
pub fn check_key(key: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(StoreError::InvalidKey {
            key: key.to_string(),
            reason: reason.to_string(),
        })
    };
    if key.is_empty() {
        return bad("the name is empty");
    }
    if key.len() > MAX_KEY_BYTES {
        return bad("the name is longer than 1024 bytes");
    }
    if key.starts_with('/') {
        return bad("the name must be relative (no leading '/')");
    }
    if key.contains('\\') {
        return bad("backslashes are not allowed");
    }
    if key.chars().any(char::is_control) {
        return bad("control characters are not allowed");
    }
    for seg in key.split('/') {
        match seg {
            "" => return bad("empty path segment ('//' or a trailing '/')"),
            "." | ".." => return bad("'.' and '..' segments are not allowed"),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a prefix: empty (the whole store) or a key, optionally with one trailing `/`.
/// Returns it without the trailing `/`.
pub fn check_prefix(prefix: &str) -> Result<&str> {
    let p = prefix.strip_suffix('/').unwrap_or(prefix);
    if p.is_empty() {
        return Ok(p);
    }
    check_key(p)?;
    Ok(p)
}

fn obj_path(key: &str) -> Result<ObjPath> {
    check_key(key)?;
    ObjPath::parse(key).map_err(|e| StoreError::InvalidKey {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn join(prefix: &str, rel: &str) -> String {
    if prefix.is_empty() {
        rel.to_string()
    } else {
        format!("{prefix}/{rel}")
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    /// Relative name → size and sha256.
    files: std::collections::BTreeMap<String, ManifestEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ManifestEntry {
    size: u64,
    sha256: String,
}

/// The artifact store: a local directory or an S3 bucket (with an optional key prefix).
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    description: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("location", &self.description)
            .finish()
    }
}

impl Store {
    /// A store in a local directory (created if missing).
    pub fn local(root: impl AsRef<Path>) -> Result<Store> {
        let root = root.as_ref();
        std::fs::create_dir_all(root)
            .map_err(|e| StoreError::io(format!("creating {}", root.display()), e))?;
        let fs = LocalFileSystem::new_with_prefix(root).map_err(|source| StoreError::Backend {
            context: format!("opening {}", root.display()),
            source,
        })?;
        Ok(Store {
            inner: Arc::new(fs),
            description: format!("directory {}", root.display()),
        })
    }

    /// A store in an S3 bucket, every key under `prefix` (may be empty).
    pub fn s3(bucket: &str, prefix: &str, settings: &S3Settings) -> Result<Store> {
        if bucket.is_empty() {
            return Err(StoreError::Config("the S3 bucket name is empty".into()));
        }
        let prefix = check_prefix(prefix)?;
        let s3 = settings.build(bucket)?;
        let inner: Arc<dyn ObjectStore> = if prefix.is_empty() {
            s3
        } else {
            Arc::new(PrefixStore::new(s3, prefix))
        };
        Ok(Store {
            inner,
            description: format!("s3://{bucket}/{prefix}"),
        })
    }

    /// Opens `s3://bucket[/prefix]`, `file:///dir` or a plain directory path.
    pub fn open(location: &str, settings: &S3Settings) -> Result<Store> {
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            return Store::s3(bucket, prefix, settings);
        }
        if let Some(path) = location.strip_prefix("file://") {
            return Store::local(path);
        }
        if location.contains("://") {
            return Err(StoreError::Config(format!(
                "unsupported artifact store '{location}': use a directory, file:///dir or s3://bucket/prefix"
            )));
        }
        Store::local(location)
    }

    /// Where the store is, for logs and messages.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Writes `data` at `key`.
    pub async fn put_bytes(&self, key: &str, data: impl Into<Bytes>) -> Result<ObjectInfo> {
        let path = obj_path(key)?;
        let data: Bytes = data.into();
        let sha256 = hex::encode(Sha256::digest(&data));
        let size = data.len() as u64;
        self.inner
            .put(&path, PutPayload::from_bytes(data))
            .await
            .map_err(|e| {
                StoreError::backend(format!("writing '{key}' to {}", self.description), key, e)
            })?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size,
            sha256,
        })
    }

    /// Uploads a local file to `key` (streamed; multipart above 16 MiB).
    pub async fn put_file(&self, key: &str, file: &Path) -> Result<ObjectInfo> {
        let path = obj_path(key)?;
        let ctx = || format!("reading {}", file.display());
        let mut f = tokio::fs::File::open(file)
            .await
            .map_err(|e| StoreError::io(ctx(), e))?;
        let len = f
            .metadata()
            .await
            .map_err(|e| StoreError::io(ctx(), e))?
            .len();
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; READ_CHUNK];
        let werr =
            |e| StoreError::backend(format!("writing '{key}' to {}", self.description), key, e);
        if len <= SINGLE_PUT_MAX {
            let mut data = Vec::with_capacity(len as usize);
            f.read_to_end(&mut data)
                .await
                .map_err(|e| StoreError::io(ctx(), e))?;
            hasher.update(&data);
            size = data.len() as u64;
            self.inner
                .put(&path, PutPayload::from(data))
                .await
                .map_err(werr)?;
        } else {
            let upload = self.inner.put_multipart(&path).await.map_err(werr)?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            let result: Result<()> = async {
                loop {
                    let n = f
                        .read(&mut buf)
                        .await
                        .map_err(|e| StoreError::io(ctx(), e))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    size += n as u64;
                    w.wait_for_capacity(4).await.map_err(werr)?;
                    w.write(&buf[..n]);
                }
                Ok(())
            }
            .await;
            match result {
                Ok(()) => {
                    w.finish().await.map_err(werr)?;
                }
                Err(e) => {
                    let _ = w.abort().await;
                    return Err(e);
                }
            }
        }
        Ok(ObjectInfo {
            key: key.to_string(),
            size,
            sha256: hex::encode(hasher.finalize()),
        })
    }

    /// Uploads every regular file under `dir` (recursively; symlinks followed) to
    /// `prefix/<relative path>`, then writes the manifest. Returns the uploaded objects.
    pub async fn upload_dir(&self, dir: &Path, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let prefix = check_prefix(prefix)?;
        let files = walk_files(dir)?;
        let mut out = Vec::with_capacity(files.len());
        let mut manifest = Manifest::default();
        for rel in files {
            if rel == MANIFEST {
                continue;
            }
            let key = join(prefix, &rel);
            let info = self.put_file(&key, &dir.join(&rel)).await?;
            manifest.files.insert(
                rel,
                ManifestEntry {
                    size: info.size,
                    sha256: info.sha256.clone(),
                },
            );
            out.push(info);
        }
        let body = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        self.put_bytes(&join(prefix, MANIFEST), body).await?;
        Ok(out)
    }

    /// Downloads every object under `prefix` into `dir` (same relative names), checking sizes
    /// and sha256 against the manifest when there is one. Returns the downloaded objects.
    pub async fn download_prefix(&self, prefix: &str, dir: &Path) -> Result<Vec<ObjectInfo>> {
        let prefix = check_prefix(prefix)?;
        let metas = self.list_raw(prefix).await?;
        let manifest = self.read_manifest(prefix).await?;
        if metas
            .iter()
            .all(|(k, _)| k.rsplit('/').next() == Some(MANIFEST))
        {
            return Err(StoreError::NotFound(format!("{prefix}/")));
        }
        let mut out = Vec::new();
        for (key, _) in metas {
            let rel = key
                .strip_prefix(prefix)
                .map(|r| r.trim_start_matches('/'))
                .unwrap_or(&key)
                .to_string();
            if rel == MANIFEST {
                continue;
            }
            check_key(&rel)?;
            let dest = dir.join(&rel);
            let info = self.download_file(&key, &dest).await?;
            if let Some(entry) = manifest.as_ref().and_then(|m| m.files.get(&rel)) {
                if entry.size != info.size || entry.sha256 != info.sha256 {
                    return Err(StoreError::Integrity {
                        key,
                        detail: format!(
                            "got {} bytes sha256 {}, manifest says {} bytes sha256 {}",
                            info.size, info.sha256, entry.size, entry.sha256
                        ),
                    });
                }
            }
            out.push(info);
        }
        Ok(out)
    }

    /// Downloads one object to a local file (written to a temporary name, then renamed).
    pub async fn download_file(&self, key: &str, dest: &Path) -> Result<ObjectInfo> {
        let (size_hint, mut stream) = self.get_stream(key).await?;
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| StoreError::io(format!("creating {}", parent.display()), e))?;
        }
        let tmp = tmp_name(dest);
        let ctx = || format!("writing {}", tmp.display());
        let mut f = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| StoreError::io(ctx(), e))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let result: Result<()> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                hasher.update(&chunk);
                size += chunk.len() as u64;
                f.write_all(&chunk)
                    .await
                    .map_err(|e| StoreError::io(ctx(), e))?;
            }
            f.flush().await.map_err(|e| StoreError::io(ctx(), e))?;
            Ok(())
        }
        .await;
        drop(f);
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        if size != size_hint {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(StoreError::Integrity {
                key: key.to_string(),
                detail: format!("read {size} of {size_hint} bytes"),
            });
        }
        tokio::fs::rename(&tmp, dest)
            .await
            .map_err(|e| StoreError::io(format!("renaming to {}", dest.display()), e))?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size,
            sha256: hex::encode(hasher.finalize()),
        })
    }

    /// The whole object.
    pub async fn get_bytes(&self, key: &str) -> Result<Bytes> {
        let path = obj_path(key)?;
        let ctx = || format!("reading '{key}' from {}", self.description);
        let r = self
            .inner
            .get(&path)
            .await
            .map_err(|e| StoreError::backend(ctx(), key, e))?;
        r.bytes()
            .await
            .map_err(|e| StoreError::backend(ctx(), key, e))
    }

    /// Bytes `range` of the object (end exclusive, clamped to the object's size).
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let path = obj_path(key)?;
        let ctx = || format!("reading '{key}' from {}", self.description);
        if range.start >= range.end {
            return Ok(Bytes::new());
        }
        self.inner
            .get_range(&path, range)
            .await
            .map_err(|e| StoreError::backend(ctx(), key, e))
    }

    /// The object's size and a stream of its bytes.
    pub async fn get_stream(&self, key: &str) -> Result<(u64, BoxStream<'static, Result<Bytes>>)> {
        let path = obj_path(key)?;
        let ctx = format!("reading '{key}' from {}", self.description);
        let r = self
            .inner
            .get(&path)
            .await
            .map_err(|e| StoreError::backend(ctx.clone(), key, e))?;
        let size = r.meta.size;
        let k = key.to_string();
        let stream = r
            .into_stream()
            .map_err(move |e| StoreError::backend(ctx.clone(), &k, e))
            .boxed();
        Ok((size, stream))
    }

    /// The object's size, or `None` when it does not exist.
    pub async fn size(&self, key: &str) -> Result<Option<u64>> {
        let path = obj_path(key)?;
        match self.inner.head(&path).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(StoreError::backend(
                format!("reading '{key}' from {}", self.description),
                key,
                e,
            )),
        }
    }

    async fn list_raw(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let p = if prefix.is_empty() {
            None
        } else {
            Some(obj_path(prefix)?)
        };
        let mut items: Vec<(String, u64)> = self
            .inner
            .list(p.as_ref())
            .map_ok(|m| (m.location.to_string(), m.size))
            .try_collect()
            .await
            .map_err(|e| {
                StoreError::backend(
                    format!("listing '{prefix}' in {}", self.description),
                    prefix,
                    e,
                )
            })?;
        items.sort();
        Ok(items)
    }

    async fn read_manifest(&self, prefix: &str) -> Result<Option<Manifest>> {
        match self.get_bytes(&join(prefix, MANIFEST)).await {
            Ok(b) => Ok(serde_json::from_slice(&b).ok()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every object under `prefix` (a "directory": `jobs/x` lists `jobs/x/...`, not `jobs/xy`),
    /// sorted by key, with size and sha256. Manifests are not listed.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let prefix = check_prefix(prefix)?;
        let raw = self.list_raw(prefix).await?;
        let mut known: HashMap<String, ManifestEntry> = HashMap::new();
        for (key, _) in &raw {
            if let Some(dir) = key.strip_suffix(MANIFEST) {
                if !(dir.is_empty() || dir.ends_with('/')) {
                    continue;
                }
                let dir = dir.trim_end_matches('/');
                if let Ok(Some(m)) = self.read_manifest(dir).await {
                    for (rel, e) in m.files {
                        known.insert(join(dir, &rel), e);
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(raw.len());
        for (key, size) in raw {
            if key.rsplit('/').next() == Some(MANIFEST) {
                continue;
            }
            let sha256 = match known.get(&key) {
                Some(e) if e.size == size => e.sha256.clone(),
                _ => self.sha256_of(&key).await?,
            };
            out.push(ObjectInfo { key, size, sha256 });
        }
        Ok(out)
    }

    async fn sha256_of(&self, key: &str) -> Result<String> {
        let (_, mut stream) = self.get_stream(key).await?;
        let mut hasher = Sha256::new();
        while let Some(chunk) = stream.next().await {
            hasher.update(&chunk?);
        }
        Ok(hex::encode(hasher.finalize()))
    }

    /// Deletes one object (no error when it does not exist).
    pub async fn delete(&self, key: &str) -> Result<()> {
        let path = obj_path(key)?;
        match self.inner.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StoreError::backend(
                format!("deleting '{key}' from {}", self.description),
                key,
                e,
            )),
        }
    }

    /// Deletes every object under `prefix` (which must not be empty); returns how many.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize> {
        let prefix = check_prefix(prefix)?;
        if prefix.is_empty() {
            return Err(StoreError::InvalidKey {
                key: String::new(),
                reason: "refusing to delete the whole store".into(),
            });
        }
        let raw = self.list_raw(prefix).await?;
        for (key, _) in &raw {
            self.delete(key).await?;
        }
        Ok(raw.len())
    }
}

fn tmp_name(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.part-{}", std::process::id()))
}

/// Relative `/`-separated names of the regular files under `dir`, sorted.
fn walk_files(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, rel)) = stack.pop() {
        let entries = std::fs::read_dir(&path)
            .map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?;
        for entry in entries {
            let entry =
                entry.map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let child_rel = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let meta = std::fs::metadata(entry.path())
                .map_err(|e| StoreError::io(format!("reading {}", entry.path().display()), e))?;
            if meta.is_dir() {
                stack.push((entry.path(), child_rel));
            } else if meta.is_file() {
                check_key(&child_rel)?;
                out.push(child_rel);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Splits `s3://bucket/key`.
pub fn parse_s3_url(url: &str) -> Result<(String, String)> {
    let bad = || StoreError::Config(format!("'{url}' is not an s3://bucket/key URL"));
    let rest = url
        .strip_prefix("s3://")
        .or_else(|| url.strip_prefix("S3://"))
        .ok_or_else(bad)?;
    let (bucket, key) = rest.split_once('/').ok_or_else(bad)?;
    if bucket.is_empty() || key.is_empty() {
        return Err(bad());
    }
    Ok((bucket.to_string(), key.to_string()))
}

/// Downloads `s3://bucket/key` to `dest`, refusing objects larger than `max_bytes`. Returns the
/// size.
pub async fn fetch_s3_url(
    url: &str,
    settings: &S3Settings,
    dest: &Path,
    max_bytes: u64,
) -> Result<u64> {
    let (bucket, key) = parse_s3_url(url)?;
    let store = Store::s3(&bucket, "", settings)?;
    let size = store
        .size(&key)
        .await?
        .ok_or_else(|| StoreError::NotFound(url.to_string()))?;
    if size > max_bytes {
        return Err(StoreError::TooLarge {
            what: url.to_string(),
            limit: max_bytes,
        });
    }
    Ok(store.download_file(&key, dest).await?.size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "a/./b",
            "a/",
            "a\\..\\b",
            "a\nb",
            "..",
        ] {
            assert!(check_key(bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "files/file-abc",
            "jobs/j/final/model.safetensors",
            "a b/c.json",
            ".hidden",
        ] {
            check_key(good).unwrap();
        }
        assert_eq!(check_prefix("jobs/x/").unwrap(), "jobs/x");
        assert_eq!(check_prefix("").unwrap(), "");
        assert!(check_prefix("/").is_ok());
        assert!(check_prefix("../").is_err());
    }

    #[test]
    fn s3_urls() {
        assert_eq!(
            parse_s3_url("s3://b/k/x.jsonl").unwrap(),
            ("b".into(), "k/x.jsonl".into())
        );
        assert!(parse_s3_url("s3://b").is_err());
        assert!(parse_s3_url("s3:///k").is_err());
    }
}
