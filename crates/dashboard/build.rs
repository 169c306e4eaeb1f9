//! Embeds the built dashboard (`web/dist`, written by `npm run build` in `web/`, which
//! scripts/setup.sh runs) into the crate: one `include_bytes!` per file, with its content type
//! and an ETag from its sha256. A missing build stops the compile with what to run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

fn main() {
    let web = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("web");
    let dist = web.join("dist");
    println!("cargo:rerun-if-changed={}", dist.display());
    // Only for the staleness warning below.
    let sources = ["src", "index.html", "build.mjs", "package-lock.json"].map(|p| web.join(p));
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    let index = dist.join("index.html");
    if !index.is_file() {
        panic!(
            "\n\nThe dashboard is not built: {} is missing.\n\
             Run scripts/setup.sh (it installs Node.js when missing and runs `npm ci && npm run build` in crates/dashboard/web).\n\n",
            index.display()
        );
    }
    let source = sources.iter().filter_map(|s| newest(s)).max();
    if let (Some(built), Some(source)) = (mtime(&index), source) {
        if source > built {
            println!(
                "cargo:warning=the dashboard's sources (crates/dashboard/web) are newer than its build: run scripts/setup.sh (or `npm run build` in crates/dashboard/web)"
            );
        }
    }
    let mut files = Vec::new();
    walk(&dist, &mut files);
    files.sort();
    let mut out = String::from("/// The built dashboard: (URL path, bytes, content type, ETag).\npub static ASSETS: &[Asset] = &[\n");
    for file in &files {
        let rel = file.strip_prefix(&dist).expect("inside dist");
        let url = format!("/{}", rel.to_string_lossy().replace('\\', "/"));
        let bytes =
            std::fs::read(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        let etag = format!("\"{}\"", &hex::encode(Sha256::digest(&bytes))[..32]);
        writeln!(
            out,
            "    Asset {{ path: {url:?}, bytes: include_bytes!({:?}), content_type: {:?}, etag: {etag:?} }},",
            file.display().to_string(),
            content_type(file),
        )
        .expect("writing to a String");
    }
    out.push_str("];\n");
    let dest = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("assets.rs");
    std::fs::write(&dest, out).unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn content_type(path: &Path) -> &'static str {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
    {
        "html" => "text/html; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "json" | "map" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The newest modification time of a file, or of the files under a directory.
fn newest(path: &Path) -> Option<SystemTime> {
    if !path.is_dir() {
        return mtime(path);
    }
    let mut files = Vec::new();
    walk(path, &mut files);
    files.iter().filter_map(|f| mtime(f)).max()
}
