//! `tuna download JOB_ID [--checkpoint STEP] [--out DIR]`: the files of a job's final model (or
//! of one checkpoint) into a directory, with a progress bar.
//!
//! The listing (`GET /v1/fine_tuning/jobs/{id}/artifacts`, or
//! `…/checkpoints/{checkpoint_id}/artifacts`) gives each file's `path`, `bytes` and `sha256`.
//! Each file is written to `<out>/<path>.part` and renamed once its sha256 matches. A `.part`
//! left by an interrupted run is resumed with `Range: bytes=N-` and `If-Range: "<sha256>"` (the
//! server's ETag), so a changed file is fetched whole again; a file already present with the
//! right sha256 is skipped. A mismatch removes the partial file and fails (exit 1).

use std::path::{Component, Path, PathBuf};

use clap::Args;
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::files::byte_bar;
use super::http::{seg, Api};
use super::jobs::job_path;
use super::output::{self, print_json};
use super::{ClientOpts, Failure, Result};

#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// Job id (`ftjob-…`).
    pub job_id: String,
    /// A checkpoint instead of the final model: its step number (or its `ftckpt-…` id).
    #[arg(long, value_name = "STEP")]
    pub checkpoint: Option<String>,
    /// Output directory. Default: `./<job id>`, or `./<job id>-step-<STEP>` for a checkpoint.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub opts: ClientOpts,
}

/// One file of the listing.
#[derive(Debug, Clone)]
struct Artifact {
    path: String,
    bytes: u64,
    sha256: String,
}

pub async fn run(args: DownloadArgs) -> Result<()> {
    let DownloadArgs {
        opts,
        job_id,
        checkpoint,
        out,
    } = args;
    let api = Api::new(&opts)?;
    let (base, default_dir) = match &checkpoint {
        None => (job_path(&job_id), job_id.clone()),
        Some(c) => {
            let (ckpt_id, step) = resolve_checkpoint(&api, &job_id, c).await?;
            (
                format!("{}/checkpoints/{}", job_path(&job_id), seg(&ckpt_id)),
                format!("{job_id}-step-{step}"),
            )
        }
    };
    let listing = api.get(&format!("{base}/artifacts")).await?;
    let files = parse_listing(&listing)?;
    let out = out.unwrap_or_else(|| PathBuf::from(default_dir));
    tokio::fs::create_dir_all(&out)
        .await
        .map_err(|e| Failure::Usage(format!("cannot create {}: {e}", out.display())))?;
    let total: u64 = files.iter().map(|f| f.bytes).sum();
    let pb = byte_bar(total, &format!("downloading {job_id}"));
    let mut fetched = 0u64;
    let mut skipped = 0usize;
    for f in &files {
        pb.set_message(f.path.clone());
        let dest = out.join(&f.path);
        match fetch(&api, &base, f, &dest, &pb).await {
            Ok(Fetched::Skipped) => skipped += 1,
            Ok(Fetched::Downloaded(n)) => fetched += n,
            Err(e) => {
                pb.abandon();
                return Err(e);
            }
        }
    }
    pb.finish_and_clear();
    if opts.json {
        let mut v = listing.clone();
        v["directory"] = Value::String(out.display().to_string());
        print_json(&v);
    } else {
        for f in &files {
            println!("{}  {:>10}  {}", &f.sha256, output::bytes(f.bytes), f.path);
        }
        println!(
            "downloaded {} files ({}, {} fetched now, {skipped} already present) to {}",
            files.len(),
            output::bytes(total),
            output::bytes(fetched),
            out.display()
        );
    }
    Ok(())
}

/// The checkpoint id and step of `--checkpoint` (a step number or a checkpoint id).
async fn resolve_checkpoint(api: &Api, job_id: &str, c: &str) -> Result<(String, i64)> {
    let ckpts = api
        .list_all(&format!("{}/checkpoints", job_path(job_id)), &[], 100, None)
        .await?;
    let wanted_step: Option<i64> = c.parse().ok();
    let found = ckpts.iter().find(|k| match wanted_step {
        Some(s) => k["step_number"].as_i64() == Some(s),
        None => k["id"].as_str() == Some(c),
    });
    match found {
        Some(k) => Ok((
            output::text(&k["id"]),
            k["step_number"].as_i64().unwrap_or(0),
        )),
        None => {
            let steps: Vec<String> = ckpts
                .iter()
                .map(|k| output::text(&k["step_number"]))
                .collect();
            Err(Failure::Api(format!(
                "job {job_id} has no checkpoint '{c}'; its checkpoints are at steps: {}",
                if steps.is_empty() {
                    "(none)".into()
                } else {
                    steps.join(", ")
                }
            )))
        }
    }
}

fn parse_listing(v: &Value) -> Result<Vec<Artifact>> {
    let data = v["data"]
        .as_array()
        .ok_or_else(|| Failure::Api("the artifact listing has no `data` array".into()))?;
    let mut out = Vec::new();
    for f in data {
        let path = f["path"]
            .as_str()
            .ok_or_else(|| Failure::Api(format!("an artifact without a path: {f}")))?;
        check_relative(path)?;
        out.push(Artifact {
            path: path.to_string(),
            bytes: f["bytes"].as_u64().unwrap_or(0),
            sha256: f["sha256"]
                .as_str()
                .unwrap_or_default()
                .to_ascii_lowercase(),
        });
    }
    Ok(out)
}

/// Refuses listed paths that would write outside the output directory.
fn check_relative(path: &str) -> Result<()> {
    let p = Path::new(path);
    let ok = !path.is_empty()
        && !path.contains('\\')
        && p.components().all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(Failure::Api(format!(
            "the server listed an unsafe artifact path '{path}'"
        )))
    }
}

enum Fetched {
    Skipped,
    Downloaded(u64),
}

fn part_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".part");
    PathBuf::from(s)
}

/// The sha256 of a file (hex), on a blocking thread.
async fn sha256_file(path: &Path) -> std::io::Result<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&path)?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h)?;
        Ok(hex::encode(h.finalize()))
    })
    .await
    .map_err(std::io::Error::other)?
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Failure + '_ {
    move |e| Failure::Api(format!("writing {}: {e}", path.display()))
}

async fn fetch(
    api: &Api,
    base: &str,
    f: &Artifact,
    dest: &Path,
    pb: &indicatif::ProgressBar,
) -> Result<Fetched> {
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(io_err(parent))?;
    }
    // Already complete?
    if let Ok(meta) = tokio::fs::metadata(dest).await {
        if meta.len() == f.bytes && sha256_file(dest).await.ok().as_deref() == Some(&f.sha256) {
            pb.inc(f.bytes);
            return Ok(Fetched::Skipped);
        }
    }
    let part = part_path(dest);
    let mut offset = tokio::fs::metadata(&part)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    if offset > f.bytes {
        offset = 0;
    }
    let url_path = f.path.split('/').map(seg).collect::<Vec<_>>().join("/");
    let mut req = api.request(Method::GET, &format!("{base}/artifacts/{url_path}"));
    if offset > 0 && !f.sha256.is_empty() {
        req = req
            .header(reqwest::header::RANGE, format!("bytes={offset}-"))
            .header(reqwest::header::IF_RANGE, format!("\"{}\"", f.sha256));
    } else {
        offset = 0;
    }
    let mut resp = req.send().await.map_err(|e| api.transport(e))?;
    if resp.status() == StatusCode::RANGE_NOT_SATISFIABLE {
        // The partial file is no prefix of the current one: start again.
        offset = 0;
        resp = api
            .request(Method::GET, &format!("{base}/artifacts/{url_path}"))
            .send()
            .await
            .map_err(|e| api.transport(e))?;
    }
    if !resp.status().is_success() {
        return Err(super::http::api_error(resp).await);
    }
    let resumed = resp.status() == StatusCode::PARTIAL_CONTENT;
    if resumed {
        let start = resp
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes "))
            .and_then(|v| v.split('-').next())
            .and_then(|v| v.parse::<u64>().ok());
        if start != Some(offset) {
            return Err(Failure::Api(format!(
                "the server answered a range that does not start at byte {offset} for {}",
                f.path
            )));
        }
    } else {
        offset = 0;
    }
    let mut file = if resumed {
        tokio::fs::OpenOptions::new()
            .append(true)
            .open(&part)
            .await
            .map_err(io_err(&part))?
    } else {
        tokio::fs::File::create(&part)
            .await
            .map_err(io_err(&part))?
    };
    pb.inc(offset);
    let mut written = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            Failure::Api(format!(
                "the download of {} broke off after {} bytes ({}); run the command again to resume",
                f.path,
                offset + written,
                e
            ))
        })?;
        file.write_all(&chunk).await.map_err(io_err(&part))?;
        written += chunk.len() as u64;
        pb.inc(chunk.len() as u64);
    }
    file.flush().await.map_err(io_err(&part))?;
    file.sync_all().await.map_err(io_err(&part))?;
    drop(file);
    let got = sha256_file(&part).await.map_err(io_err(&part))?;
    if !f.sha256.is_empty() && got != f.sha256 {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(Failure::Api(format!(
            "sha256 mismatch for {}: expected {}, got {got}; the partial file was removed, run the command again",
            f.path, f.sha256
        )));
    }
    tokio::fs::rename(&part, dest).await.map_err(io_err(dest))?;
    Ok(Fetched::Downloaded(written))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn listings_with_unsafe_paths_are_refused() {
        let ok = json!({"data": [{"path": "a/b.json", "bytes": 3, "sha256": "AB"}]});
        let files = parse_listing(&ok).unwrap();
        assert_eq!(files[0].path, "a/b.json");
        assert_eq!(files[0].sha256, "ab");
        for bad in ["../x", "/etc/passwd", "a/../../x", "a\\b", ""] {
            let v = json!({"data": [{"path": bad, "bytes": 1, "sha256": "x"}]});
            assert!(parse_listing(&v).is_err(), "{bad}");
        }
        assert_eq!(
            part_path(Path::new("d/m.bin")),
            PathBuf::from("d/m.bin.part")
        );
    }
}
