//! Downloads of final models and checkpoints: listing, one file with Range / ETag / 304 / 416 /
//! sha256, the streamed tar, path traversal, tenant isolation, and the same over S3 (moto).
//!
//! Artifacts are seeded without training: a job is claimed by a test worker, a directory is
//! uploaded to the store with `Store::upload_dir`, and the checkpoint and completion are
//! recorded through `tuna_db::queue`.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::header;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tuna_db::queue::{self, Completion, Lease, WorkerInfo};
use tuna_store::testing::Moto;
use tuna_store::Store;

use crate::helpers::{error_of, json, spawn_app, spawn_in, TestApp, CHAT};

pub fn worker() -> WorkerInfo {
    WorkerInfo {
        worker_id: tuna_core::ids::new_id(tuna_core::ids::WORKER),
        hostname: "test".into(),
        device_kind: "cpu".into(),
        gpu_name: None,
        gpu_memory_mb: None,
        memory_bytes: None,
        labels: json!({}),
    }
}

/// A queued job of the default organisation, claimed by a test worker.
pub async fn claimed_job(app: &TestApp) -> Lease {
    let file = app.upload_ok("train.jsonl", CHAT).await;
    let (status, job) = json(
        app.post_json(
            "/v1/fine_tuning/jobs",
            &json!({"model": "gpt2", "training_file": file}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(app.wait_validated(&id).await["status"], "queued");
    let w = worker();
    queue::register_worker(&app.db.pool, &w).await.unwrap();
    let claimed = queue::claim(&app.db.pool, &w, Duration::from_secs(60))
        .await
        .unwrap()
        .expect("a queued job");
    assert_eq!(claimed.job.job_id, id);
    claimed.lease
}

/// The model files the tests publish: name → bytes (nested and long names included).
fn model_files(tag: &str) -> BTreeMap<String, Vec<u8>> {
    let mut weights = Vec::with_capacity(300_000);
    let mut x: u32 = 12345;
    for _ in 0..300_000 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        weights.push((x >> 16) as u8);
    }
    let mut m = BTreeMap::new();
    m.insert(
        "config.json".to_string(),
        format!("{{\"model_type\": \"gpt2\", \"tag\": \"{tag}\"}}").into_bytes(),
    );
    m.insert("model.safetensors".to_string(), weights);
    m.insert(
        "tokenizer/vocab.json".to_string(),
        b"{\"a\": 0, \"b\": 1}".to_vec(),
    );
    m.insert(
        format!("{}/{}.txt", "d".repeat(60), "n".repeat(120)),
        vec![],
    );
    m.insert("exactly-512.bin".to_string(), vec![7u8; 512]);
    m
}

async fn publish(store: &Store, prefix: &str, files: &BTreeMap<String, Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    store.upload_dir(dir.path(), prefix).await.unwrap();
}

/// A finished job with a checkpoint at step 5: (job id, checkpoint id, checkpoint files,
/// final files).
pub struct Seeded {
    pub job_id: String,
    pub checkpoint_id: String,
    pub checkpoint: BTreeMap<String, Vec<u8>>,
    pub final_files: BTreeMap<String, Vec<u8>>,
}

async fn seed(app: &TestApp) -> Seeded {
    let lease = claimed_job(app).await;
    let job_id = lease.job_id.clone();
    let store = &app.state.config.store;
    let model = format!("ft:gpt2:{job_id}");
    let ckpt_files = model_files("step-5");
    let prefix = format!("jobs/{job_id}/checkpoints/step-5");
    publish(store, &prefix, &ckpt_files).await;
    let ckpt = queue::record_checkpoint(
        &app.db.pool,
        &lease,
        5,
        &json!({"step": 5, "train_loss": 1.5}),
        &prefix,
        &model,
    )
    .await
    .unwrap();
    // Before the job succeeds there is no final model.
    let (status, body) = json(
        app.get(&format!("/v1/fine_tuning/jobs/{job_id}/artifacts"))
            .await,
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(error_of(&body)["message"]
        .as_str()
        .unwrap()
        .contains("no final model"));
    let final_files = model_files("final");
    let final_prefix = format!("jobs/{job_id}/final");
    publish(store, &final_prefix, &final_files).await;
    // Something next to the model that must never be reachable through it.
    store
        .put_bytes(&format!("jobs/{job_id}/secret"), b"secret".to_vec())
        .await
        .unwrap();
    queue::complete(
        &app.db.pool,
        &lease,
        &Completion {
            fine_tuned_model: model,
            trained_tokens: Some(1234),
            result_files: vec![],
            model_location: Some(final_prefix),
            architecture: None,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    Seeded {
        job_id,
        checkpoint_id: ckpt.checkpoint_id,
        checkpoint: ckpt_files,
        final_files,
    }
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn header_of(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

async fn check_listing(app: &TestApp, base: &str, files: &BTreeMap<String, Vec<u8>>) {
    let (status, list) = json(app.get(base).await).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["object"], "list");
    assert_eq!(list["has_more"], false);
    let got: BTreeMap<String, (u64, String)> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            assert_eq!(a["object"], "fine_tuning.job.artifact");
            (
                a["path"].as_str().unwrap().to_string(),
                (
                    a["bytes"].as_u64().unwrap(),
                    a["sha256"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect();
    let want: BTreeMap<String, (u64, String)> = files
        .iter()
        .map(|(k, v)| (k.clone(), (v.len() as u64, sha(v))))
        .collect();
    assert_eq!(got, want);
}

/// Full download, 304, ranges, 416 on one file of `base` (an `.../artifacts` URL).
async fn check_file(app: &TestApp, base: &str, name: &str, bytes: &[u8]) {
    let url = format!("{base}/{name}");
    let resp = app.get(&url).await;
    assert_eq!(resp.status(), 200);
    let etag = header_of(&resp, "etag");
    assert_eq!(etag, format!("\"{}\"", sha(bytes)));
    assert_eq!(header_of(&resp, "x-tuna-sha256"), sha(bytes));
    assert_eq!(header_of(&resp, "content-length"), bytes.len().to_string());
    assert_eq!(header_of(&resp, "accept-ranges"), "bytes");
    assert_eq!(&resp.bytes().await.unwrap()[..], bytes);

    let resp = app
        .req(reqwest::Method::GET, &url)
        .header(header::IF_NONE_MATCH, &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 304);
    assert_eq!(header_of(&resp, "etag"), etag);
    assert!(resp.bytes().await.unwrap().is_empty());

    let len = bytes.len();
    let ranged = |r: String| {
        app.req(reqwest::Method::GET, &url)
            .header(header::RANGE, r)
            .send()
    };
    let resp = ranged("bytes=10-19".into()).await.unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(
        header_of(&resp, "content-range"),
        format!("bytes 10-19/{len}")
    );
    assert_eq!(header_of(&resp, "content-length"), "10");
    assert_eq!(&resp.bytes().await.unwrap()[..], &bytes[10..20]);
    let resp = ranged("bytes=-7".into()).await.unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(&resp.bytes().await.unwrap()[..], &bytes[len - 7..]);
    let resp = ranged(format!("bytes={}-", len - 100_000)).await.unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(&resp.bytes().await.unwrap()[..], &bytes[len - 100_000..]);
    // A stale If-Range: the whole file.
    let resp = app
        .req(reqwest::Method::GET, &url)
        .header(header::RANGE, "bytes=0-0")
        .header(header::IF_RANGE, "\"0000\"")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().len(), len);
    let resp = ranged(format!("bytes={len}-")).await.unwrap();
    assert_eq!(resp.status(), 416);
    assert_eq!(header_of(&resp, "content-range"), format!("bytes */{len}"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(error_of(&body)["code"], "range_not_satisfiable");
}

/// Members of a tar archive: name → bytes (ustar prefix/name and pax `path` understood).
pub fn untar(data: &[u8]) -> BTreeMap<String, Vec<u8>> {
    fn field(b: &[u8]) -> String {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8(b[..end].to_vec()).unwrap()
    }
    let mut out = BTreeMap::new();
    let mut pos = 0;
    let mut pax_path: Option<String> = None;
    loop {
        let h = &data[pos..pos + 512];
        if h.iter().all(|&b| b == 0) {
            assert!(data[pos + 512..pos + 1024].iter().all(|&b| b == 0));
            assert_eq!(data.len(), pos + 1024, "bytes after the end marker");
            break;
        }
        assert_eq!(&h[257..263], b"ustar\0");
        let mut check = h.to_vec();
        check[148..156].fill(b' ');
        let sum: u32 = check.iter().map(|&b| u32::from(b)).sum();
        let stored = u32::from_str_radix(field(&h[148..155]).trim(), 8).unwrap();
        assert_eq!(sum, stored, "bad header checksum");
        let size = u64::from_str_radix(field(&h[124..136]).trim(), 8).unwrap() as usize;
        let (prefix, name) = (field(&h[345..500]), field(&h[0..100]));
        let content = data[pos + 512..pos + 512 + size].to_vec();
        pos += 512 + size.div_ceil(512) * 512;
        match h[156] {
            b'x' => {
                let text = String::from_utf8(content).unwrap();
                for rec in text.lines() {
                    let (_, kv) = rec.split_once(' ').unwrap();
                    if let Some(p) = kv.strip_prefix("path=") {
                        pax_path = Some(p.to_string());
                    }
                }
            }
            b'0' => {
                let full = pax_path.take().unwrap_or(if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                });
                out.insert(full, content);
            }
            other => panic!("unexpected tar member type {other}"),
        }
    }
    out
}

async fn check_tar(app: &TestApp, url: &str, files: &BTreeMap<String, Vec<u8>>) {
    let resp = app.get(url).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header_of(&resp, "content-type"), "application/x-tar");
    let announced: usize = header_of(&resp, "content-length").parse().unwrap();
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    let mut chunks = 0;
    use futures::StreamExt;
    while let Some(c) = stream.next().await {
        body.extend_from_slice(&c.unwrap());
        chunks += 1;
    }
    assert!(chunks > 1, "the archive came in one piece");
    assert_eq!(body.len(), announced);
    assert_eq!(&untar(&body), files);
    // And the system's tar reads it too.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.tar");
    std::fs::write(&path, &body).unwrap();
    let out = std::process::Command::new("tar")
        .arg("-tf")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut listed: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    listed.sort();
    assert_eq!(listed, files.keys().cloned().collect::<Vec<_>>());
}

#[tokio::test]
async fn final_model_and_checkpoint_files_download_with_ranges_and_etags() {
    let app = spawn_app().await;
    let s = seed(&app).await;
    let base = format!("/v1/fine_tuning/jobs/{}/artifacts", s.job_id);
    check_listing(&app, &base, &s.final_files).await;
    for (name, bytes) in &s.final_files {
        if bytes.len() > 100_000 {
            check_file(&app, &base, name, bytes).await;
        } else {
            let resp = app.get(&format!("{base}/{name}")).await;
            assert_eq!(resp.status(), 200, "{name}");
            assert_eq!(header_of(&resp, "x-tuna-sha256"), sha(bytes));
            assert_eq!(&resp.bytes().await.unwrap()[..], &bytes[..], "{name}");
        }
    }
    let ckpt = format!(
        "/v1/fine_tuning/jobs/{}/checkpoints/{}/artifacts",
        s.job_id, s.checkpoint_id
    );
    check_listing(&app, &ckpt, &s.checkpoint).await;
    check_file(
        &app,
        &ckpt,
        "model.safetensors",
        &s.checkpoint["model.safetensors"],
    )
    .await;
    let resp = app.get(&format!("{ckpt}/config.json")).await;
    assert_eq!(
        &resp.bytes().await.unwrap()[..],
        &s.checkpoint["config.json"][..]
    );
    // Missing names, the manifest and unknown checkpoints are 404s.
    for url in [
        format!("{base}/nope.bin"),
        format!("{base}/tuna-manifest.json"),
        format!(
            "/v1/fine_tuning/jobs/{}/checkpoints/ftckpt-nope/artifacts",
            s.job_id
        ),
    ] {
        let (status, body) = json(app.get(&url).await).await;
        assert_eq!(status, 404, "{url}: {body}");
    }
    // The job object shows what the worker filled in; checkpoints carry metrics.
    let (_, job) = json(app.get(&format!("/v1/fine_tuning/jobs/{}", s.job_id)).await).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["fine_tuned_model"], format!("ft:gpt2:{}", s.job_id));
    assert_eq!(job["trained_tokens"], 1234);
    assert_eq!(job["result_files"], json!([]));
    let (_, list) = json(
        app.get(&format!("/v1/fine_tuning/jobs/{}/checkpoints", s.job_id))
            .await,
    )
    .await;
    assert_eq!(list["data"][0]["metrics"]["train_loss"], 1.5);
    assert_eq!(
        list["data"][0]["fine_tuned_model_checkpoint"],
        format!("ft:gpt2:{}:ckpt-step-5", s.job_id)
    );
}

#[tokio::test]
async fn whole_models_stream_as_tar_archives() {
    let app = spawn_app().await;
    let s = seed(&app).await;
    check_tar(
        &app,
        &format!("/v1/fine_tuning/jobs/{}/artifacts.tar", s.job_id),
        &s.final_files,
    )
    .await;
    check_tar(
        &app,
        &format!(
            "/v1/fine_tuning/jobs/{}/checkpoints/{}/artifacts.tar",
            s.job_id, s.checkpoint_id
        ),
        &s.checkpoint,
    )
    .await;
}

/// Sends a request line as is (no client-side normalisation of `..`) and returns the status.
async fn raw_get(base: &str, path: &str, key: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.strip_prefix("http://").unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer to GET {path}: {out:?}"))
}

#[tokio::test]
async fn traversal_attempts_and_other_organisations_get_nothing() {
    let app = spawn_app().await;
    let s = seed(&app).await;
    let base = format!("/v1/fine_tuning/jobs/{}/artifacts", s.job_id);
    let ckpt = format!(
        "/v1/fine_tuning/jobs/{}/checkpoints/{}/artifacts",
        s.job_id, s.checkpoint_id
    );
    for b in [&base, &ckpt] {
        for evil in [
            "..%2Fsecret",
            "..%2F..%2F..%2Fsecret",
            "%2E%2E/secret",
            "%2E%2E%2Fsecret",
            "%2Fetc%2Fpasswd",
            "..%5Csecret",
            "tokenizer%2F..%2F..%2Fsecret",
            "a%00b",
        ] {
            let resp = app.get(&format!("{b}/{evil}")).await;
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap();
            assert!(status == 400 || status == 404, "{evil}: {status} {body}");
            assert!(!body.contains("secret\""), "{body}");
            assert!(body.contains("\"error\""), "{evil}: {body}");
        }
        for evil in [
            "../secret",
            "../../secret",
            "tokenizer/../../secret",
            "./config.json",
        ] {
            let status = raw_get(&app.base, &format!("{b}/{evil}"), &app.key).await;
            assert!(status == 400 || status == 404, "raw {evil}: {status}");
        }
    }
    let (status, body) = json(app.get(&format!("{base}/..%2Fsecret")).await).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(error_of(&body)["code"], "invalid_path");
    // Another organisation sees none of it.
    for url in [
        base.clone(),
        format!("{base}/config.json"),
        format!("{base}.tar"),
        ckpt.clone(),
        format!("{ckpt}/config.json"),
        format!("{ckpt}.tar"),
        format!("/v1/fine_tuning/jobs/{}/events/stream", s.job_id),
    ] {
        let resp = app
            .req_as(&app.other_key, reqwest::Method::GET, &url)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{url}");
    }
}

#[tokio::test]
async fn downloads_work_from_an_s3_store() {
    let moto = Moto::start().expect("moto_server (scripts/setup.sh installs it)");
    moto.create_bucket("tuna-test").unwrap();
    let store = Store::s3("tuna-test", "deploy/a", &moto.settings()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_in(dir, store.clone(), |_| {}).await;
    // Uploaded files land in the bucket and download from it.
    let file = app.upload_ok("train.jsonl", CHAT).await;
    assert_eq!(
        &store.get_bytes(&format!("files/{file}")).await.unwrap()[..],
        CHAT.as_bytes()
    );
    let content = app.get(&format!("/v1/files/{file}/content")).await;
    assert_eq!(&content.bytes().await.unwrap()[..], CHAT.as_bytes());
    let s = seed(&app).await;
    let base = format!("/v1/fine_tuning/jobs/{}/artifacts", s.job_id);
    check_listing(&app, &base, &s.final_files).await;
    check_file(
        &app,
        &base,
        "model.safetensors",
        &s.final_files["model.safetensors"],
    )
    .await;
    check_tar(&app, &format!("{base}.tar"), &s.final_files).await;
    let resp = app
        .req(reqwest::Method::DELETE, &format!("/v1/files/{file}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(store.size(&format!("files/{file}")).await.unwrap(), None);
}
