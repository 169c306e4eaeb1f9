//! `tuna files upload|list|show|delete|content`.

use std::path::{Path, PathBuf};

use clap::{Subcommand, ValueEnum};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use super::http::{seg, Api};
use super::output::{self, print_json};
use super::{ClientOpts, Failure, Result};

#[derive(Debug, Subcommand)]
pub enum FilesCommand {
    /// Upload a file (JSONL training data is checked line by line by the server).
    Upload {
        /// The local file.
        path: PathBuf,
        /// What the file is for.
        #[arg(long, default_value = "fine-tune")]
        purpose: String,
    },
    /// List files, newest first.
    List {
        /// Only files with this purpose.
        #[arg(long)]
        purpose: Option<String>,
        /// At most this many files.
        #[arg(long)]
        limit: Option<u32>,
        /// Files after this id (in the listing order).
        #[arg(long)]
        after: Option<String>,
        /// Listing order by creation time.
        #[arg(long, value_enum, default_value_t = Order::Desc)]
        order: Order,
    },
    /// Show one file.
    Show {
        /// File id (`file-…`).
        id: String,
    },
    /// Delete a file.
    Delete {
        /// File id (`file-…`).
        id: String,
    },
    /// Write a file's bytes to stdout (or to `--out`).
    Content {
        /// File id (`file-…`).
        id: String,
        /// Write to this path instead of stdout.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Order {
    Asc,
    Desc,
}

pub async fn run(opts: &ClientOpts, command: FilesCommand) -> Result<()> {
    let api = Api::new(opts)?;
    match command {
        FilesCommand::Upload { path, purpose } => {
            let file = upload(&api, &path, &purpose).await?;
            if opts.json {
                print_json(&file);
            } else {
                print_file(&file);
            }
        }
        FilesCommand::List {
            purpose,
            limit,
            after,
            order,
        } => {
            let mut q: Vec<(String, String)> = Vec::new();
            if let Some(p) = purpose {
                q.push(("purpose".into(), p));
            }
            if let Some(l) = limit {
                q.push(("limit".into(), l.to_string()));
            }
            if let Some(a) = after {
                q.push(("after".into(), a));
            }
            let order = match order {
                Order::Asc => "asc",
                Order::Desc => "desc",
            };
            q.push(("order".into(), order.into()));
            let page = api.get_query("/v1/files", &q).await?;
            if opts.json {
                print_json(&page);
            } else {
                let rows: Vec<Vec<String>> = page["data"]
                    .as_array()
                    .map(|d| d.iter().map(file_row).collect())
                    .unwrap_or_default();
                output::table(
                    &[
                        "ID", "PURPOSE", "STATUS", "SIZE", "EXAMPLES", "FORMAT", "CREATED",
                        "FILENAME",
                    ],
                    &rows,
                );
            }
        }
        FilesCommand::Show { id } => {
            let file = api.get(&format!("/v1/files/{}", seg(&id))).await?;
            if opts.json {
                print_json(&file);
            } else {
                print_file(&file);
            }
        }
        FilesCommand::Delete { id } => {
            let v = api.delete(&format!("/v1/files/{}", seg(&id))).await?;
            if opts.json {
                print_json(&v);
            } else {
                println!("deleted {}", output::text(&v["id"]));
            }
        }
        FilesCommand::Content { id, out } => content(&api, &id, out.as_deref()).await?,
    }
    Ok(())
}

fn file_row(f: &Value) -> Vec<String> {
    vec![
        output::text(&f["id"]),
        output::text(&f["purpose"]),
        output::text(&f["status"]),
        f["bytes"]
            .as_u64()
            .map(output::bytes)
            .unwrap_or_else(|| "-".into()),
        output::text(&f["example_count"]),
        output::text(&f["format"]),
        output::time(&f["created_at"]),
        output::text(&f["filename"]),
    ]
}

fn print_file(f: &Value) {
    let mut pairs = vec![
        ("id", output::text(&f["id"])),
        ("filename", output::text(&f["filename"])),
        ("purpose", output::text(&f["purpose"])),
        ("status", output::text(&f["status"])),
        ("bytes", output::text(&f["bytes"])),
        ("format", output::text(&f["format"])),
        ("examples", output::text(&f["example_count"])),
        ("created", output::time(&f["created_at"])),
    ];
    if !f["status_details"].is_null() {
        pairs.push(("details", output::text(&f["status_details"])));
    }
    output::fields(&pairs);
}

/// A byte progress bar on stderr (hidden when stderr is not a terminal).
pub fn byte_bar(len: u64, label: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta} left {msg}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_prefix(label.to_string());
    pb
}

/// Uploads `path` (streamed, with a progress bar) and returns the file object.
pub async fn upload(api: &Api, path: &Path, purpose: &str) -> Result<Value> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Failure::Usage(format!("cannot open {}: {e}", path.display())))?;
    let meta = file
        .metadata()
        .await
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(Failure::Usage(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let len = meta.len();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "upload.jsonl".into());
    let pb = byte_bar(len, &format!("uploading {name}"));
    let counter = pb.clone();
    let stream = tokio_util::io::ReaderStream::new(file).inspect(move |chunk| {
        if let Ok(c) = chunk {
            counter.inc(c.len() as u64);
        }
    });
    let part =
        reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(stream), len)
            .file_name(name)
            .mime_str("application/octet-stream")
            .map_err(|e| Failure::Api(format!("building the upload: {e}")))?;
    let form = reqwest::multipart::Form::new()
        .text("purpose", purpose.to_string())
        .part("file", part);
    let resp = api
        .send(api.request(Method::POST, "/v1/files").multipart(form))
        .await;
    pb.finish_and_clear();
    resp?
        .json::<Value>()
        .await
        .map_err(|e| Failure::Api(format!("the server's answer is not JSON: {e}")))
}

async fn content(api: &Api, id: &str, out: Option<&Path>) -> Result<()> {
    let resp = api
        .send(api.request(Method::GET, &format!("/v1/files/{}/content", seg(id))))
        .await?;
    let mut sink: Box<dyn tokio::io::AsyncWrite + Unpin> = match out {
        Some(p) => Box::new(
            tokio::fs::File::create(p)
                .await
                .map_err(|e| Failure::Usage(format!("cannot create {}: {e}", p.display())))?,
        ),
        None => Box::new(tokio::io::stdout()),
    };
    let mut body = resp.bytes_stream();
    let write_err = |e: std::io::Error| Failure::Api(format!("writing the content: {e}"));
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| api.transport(e))?;
        sink.write_all(&chunk).await.map_err(write_err)?;
    }
    sink.flush().await.map_err(write_err)?;
    if let Some(p) = out {
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
