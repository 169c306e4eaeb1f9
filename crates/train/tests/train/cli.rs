//! The `tuna-trainer` binary as the worker runs it: JSON events on stdout, control on stdin,
//! exit statuses.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::support::{fixture, job_spec};

fn setup(dir: &Path, epochs: u32, lines: &str) -> (PathBuf, PathBuf) {
    let spec = job_spec(
        &json!({"model": "gpt2", "training_file": "f", "seed": 5, "hyperparameters": {"n_epochs": epochs, "batch_size": 2},
                "learning_rate": 1e-3, "log_interval": 1, "validation_split": 0.2}),
    );
    let spec_path = dir.join("spec.json");
    std::fs::write(&spec_path, serde_json::to_string(&spec).unwrap()).unwrap();
    let data = dir.join("train.jsonl");
    std::fs::write(&data, lines).unwrap();
    (spec_path, data)
}

fn good_lines() -> String {
    (0..10)
        .map(|i| {
            format!(
                "{{\"prompt\":\"count {i}\",\"completion\":\" {} {}\"}}\n",
                i + 1,
                i + 2
            )
        })
        .collect()
}

fn trainer(dir: &Path, spec: &Path, data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tuna-trainer"));
    c.args(["run", "--model-dir"])
        .arg(fixture("gpt2"))
        .arg("--spec")
        .arg(spec)
        .arg("--train-file")
        .arg(data);
    c.arg("--output-dir")
        .arg(dir.join("out"))
        .args(["--device", "cpu", "--threads", "1"]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    c
}

fn events(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn run_prints_events_and_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, data) = setup(dir.path(), 2, &good_lines());
    // Keep stdin open while it runs: EOF would mean "the worker died".
    let mut child = trainer(dir.path(), &spec, &data).spawn().unwrap();
    let stdin = child.stdin.take().unwrap();
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    assert_eq!(out.status.code(), Some(0));
    let ev = events(&out.stdout);
    let kinds: Vec<&str> = ev.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds[0], "phase");
    assert!(
        kinds.contains(&"data")
            && kinds.contains(&"metrics")
            && kinds.contains(&"eval")
            && kinds.contains(&"checkpoint")
    );
    let m = ev.iter().find(|e| e["event"] == "metrics").unwrap();
    for k in [
        "step",
        "total_steps",
        "epoch",
        "train_loss",
        "train_mean_token_accuracy",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
        "examples_per_second",
        "elapsed_seconds",
        "eta_seconds",
    ] {
        assert!(m.get(k).is_some(), "metrics lacks {k}: {m}");
    }
    let done = ev.last().unwrap();
    assert_eq!(done["event"], "done");
    assert!(Path::new(done["final_dir"].as_str().unwrap())
        .join("model.safetensors")
        .is_file());
}

#[test]
fn pause_on_stdin_saves_a_checkpoint_and_eof_aborts() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, data) = setup(dir.path(), 50, &good_lines());
    let mut child = trainer(dir.path(), &spec, &data).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut last = Value::Null;
    let mut sent = false;
    while reader.read_line(&mut line).unwrap() > 0 {
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["event"] == "metrics" && !sent {
            writeln!(stdin, "pause").unwrap();
            stdin.flush().unwrap();
            sent = true;
        }
        last = v;
        line.clear();
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(last["event"], "paused", "{last}");
    assert!(Path::new(last["checkpoint"].as_str().unwrap())
        .join("training_state/trainer_state.json")
        .is_file());
    drop(stdin);

    // EOF on stdin: stop at once, no terminal event, status 3.
    let mut child = trainer(dir.path(), &spec, &data).spawn().unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(!events(&out.stdout).iter().any(|e| e["event"] == "done"));
}

#[test]
fn bad_data_is_an_error_event_with_status_2() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, data) = setup(
        dir.path(),
        1,
        "{\"prompt\":\"a\",\"completion\":\"b\"}\nnot json\n",
    );
    let mut child = trainer(dir.path(), &spec, &data).spawn().unwrap();
    let stdin = child.stdin.take().unwrap();
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    assert_eq!(out.status.code(), Some(2));
    let ev = events(&out.stdout);
    let e = ev.last().unwrap();
    assert_eq!(
        (e["event"].as_str(), e["code"].as_str()),
        (Some("error"), Some("invalid_data"))
    );
    assert!(e["message"].as_str().unwrap().contains("line 2"), "{e}");

    let out = Command::new(env!("CARGO_BIN_EXE_tuna-trainer"))
        .args(["info", "--model-dir"])
        .arg(fixture("gpt2"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["model_type"], "gpt2");
}

/// `tuna-trainer bench` prints one JSON line with the timing keys `scripts/bench-train.sh`
/// reads, for plain, packed and LoRA runs; a bad batch file is an error event with status 2.
#[test]
fn bench_prints_one_json_line_per_run() {
    let dir = tempfile::tempdir().unwrap();
    let batches: Vec<Vec<Value>> = (0..2)
        .map(|b| {
            [3usize, 9, 5, 14]
                .iter()
                .map(|n| json!({"input_ids": (0..*n).map(|j| (b * 7 + j * 13) % 400).collect::<Vec<_>>()}))
                .collect()
        })
        .collect();
    let data = dir.path().join("batches.json");
    std::fs::write(
        &data,
        json!({"task": "causal_lm", "max_len": 32, "batches": batches}).to_string(),
    )
    .unwrap();
    let bench = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tuna-trainer"))
            .args(["bench", "--model-dir"])
            .arg(fixture("gpt2"))
            .arg("--data")
            .arg(&data)
            .args(["--warmup", "1", "--steps", "3", "--threads", "1"])
            .args(extra)
            .stderr(Stdio::null())
            .output()
            .unwrap();
        (out.status.code(), events(&out.stdout))
    };
    for extra in [&[][..], &["--packing"][..], &["--lora-r", "4"][..]] {
        let (code, ev) = bench(extra);
        assert_eq!(code, Some(0), "{extra:?}: {ev:?}");
        assert_eq!(ev.len(), 1);
        let r = &ev[0];
        assert_eq!(r["side"], "tuna");
        assert_eq!(r["timed_steps"], 3);
        assert_eq!(r["real_tokens"], 3 * (3 + 9 + 5 + 14));
        for key in [
            "step_time_median_s",
            "step_time_mean_s",
            "tokens_per_s_real",
            "tokens_per_s_padded",
            "tflops",
            "timed_loss_per_target",
        ] {
            let v = r[key].as_f64().unwrap_or_else(|| panic!("{key}: {r}"));
            assert!(v.is_finite() && v > 0.0, "{key}: {r}");
        }
        let padded = r["padded_tokens"].as_u64().unwrap();
        if extra == ["--packing"] {
            // 31 tokens fit one row of 32: no padding at all.
            assert_eq!(padded, 3 * 31, "{r}");
            assert_eq!(r["packing"], "packed rows");
        } else {
            assert_eq!(padded, 3 * 4 * 14, "{r}");
        }
        if extra.contains(&"--lora-r") {
            assert!(r["lora_params"].as_i64().unwrap() > 0);
            assert!(r["trainable_params"].as_i64() < r["params"].as_i64());
        }
    }
    std::fs::write(
        &data,
        r#"{"task": "causal_lm", "max_len": 8, "batches": []}"#,
    )
    .unwrap();
    let (code, ev) = bench(&[]);
    assert_eq!(code, Some(2));
    assert_eq!(ev[0]["event"], "error");
}

#[test]
fn bench_generate_times_the_prompts_of_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let prompts: Vec<Vec<usize>> = [12usize, 7, 9]
        .iter()
        .map(|n| (0..*n).map(|j| 5 + j * 11 % 390).collect())
        .collect();
    let file = dir.path().join("prompts.json");
    std::fs::write(&file, json!({ "prompts": prompts }).to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tuna-trainer"))
        .args(["bench-generate", "--model-dir"])
        .arg(fixture("gpt2"))
        .arg("--prompts")
        .arg(&file)
        .args([
            "--batch",
            "3",
            "--new-tokens",
            "6",
            "--rounds",
            "2",
            "--threads",
            "1",
        ])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let ev = events(&out.stdout);
    assert_eq!(ev.len(), 1, "{ev:?}");
    let r = &ev[0];
    assert_eq!(
        (r["batch"].as_u64(), r["new_tokens"].as_u64()),
        (Some(3), Some(6))
    );
    assert_eq!(r["prompt_tokens"], json!([12, 7, 9]));
    assert_eq!(r["ttft_times_s"].as_array().unwrap().len(), 2);
    assert!(
        r["ttft_s"].as_f64().unwrap() > 0.0 && r["decode_tokens_per_s"].as_f64().unwrap() > 0.0,
        "{r}"
    );
    // Fewer prompts than the batch: an error, not a number.
    let out = Command::new(env!("CARGO_BIN_EXE_tuna-trainer"))
        .args(["bench-generate", "--model-dir"])
        .arg(fixture("gpt2"))
        .arg("--prompts")
        .arg(&file)
        .args(["--batch", "4"])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
}
