//! Links libtorch_cuda even though nothing references it directly (its CUDA backend registers
//! itself through static initialisers, so `--as-needed` would drop it), and sets an rpath to the
//! libtorch the crate was built against. See ../shared/notes/tch.md section 1.3.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(root) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        panic!("LIBTORCH is not set: run scripts/setup.sh, which installs torch==2.11.0 into .venv and links it at .libtorch");
    };
    let root = root.canonicalize().unwrap_or_else(|_| {
        panic!(
            "libtorch not found at {}: run scripts/setup.sh (it installs torch==2.11.0 from PyPI into .venv and links it at .libtorch)",
            root.display()
        )
    });
    // The pip wheel has no build-version file, so torch-sys checks nothing in LIBTORCH mode: check here.
    let version_py = std::fs::read_to_string(root.join("version.py")).unwrap_or_default();
    let version = version_py
        .lines()
        .find_map(|l| l.strip_prefix("__version__ = "))
        .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string())
        .unwrap_or_default();
    if !version.starts_with("2.11.0") {
        panic!(
            "tch 0.24.0 needs libtorch 2.11.0, found '{version}' at {}: run scripts/setup.sh",
            root.display()
        );
    }
    let lib = root.join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
