//! `tuna serve` with its in-process worker (the default): a tiny real job (GPT-2 fixture, CPU,
//! the real `tuna-trainer`) goes from upload to a downloadable model through the HTTP API only,
//! watched over the live event stream; SIGTERM then stops the server cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tuna_db::testing::TestDb;

const BIN: &str = env!("CARGO_BIN_EXE_tuna");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_jobs_in_process_and_serves_their_models() {
    let trainer = tuna_worker::default_trainer_bin();
    assert!(
        trainer.is_file(),
        "{} is missing: build it with `cargo build -p tuna-train`",
        trainer.display()
    );
    let db = TestDb::new().await.unwrap();
    let fixture = format!("{}/../../.fixtures/gpt2", env!("CARGO_MANIFEST_DIR"));
    tuna_api::models::register_base_model(&db.pool, "gpt2", std::path::Path::new(&fixture))
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--port", "0", "--worker-device", "cpu"])
        .arg("--data-dir")
        .arg(data.path())
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let base = loop {
        let line = lines.next().expect("tuna serve exited").unwrap();
        if let Some(addr) = line.strip_prefix("tuna listening on ") {
            break addr.trim().to_string();
        }
    };
    let key = std::fs::read_to_string(data.path().join("admin_key"))
        .unwrap()
        .trim()
        .to_string();
    let http = reqwest::Client::new();
    let get = |path: String| http.get(format!("{base}{path}")).bearer_auth(&key).send();

    let train: String = (0..16)
        .map(|i| {
            json!({"prompt": format!("Count {i}:"), "completion": format!(" {} {}", i + 1, i + 2)})
                .to_string()
                + "\n"
        })
        .collect();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "fine-tune")
        .part(
            "file",
            reqwest::multipart::Part::bytes(train.into_bytes()).file_name("train.jsonl"),
        );
    let file: Value = http
        .post(format!("{base}/v1/files"))
        .bearer_auth(&key)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // The upload is in the artifact store, where the worker reads it.
    let file_id = file["id"].as_str().unwrap();
    assert!(data.path().join("artifacts/files").join(file_id).is_file());
    let job: Value = http
        .post(format!("{base}/v1/fine_tuning/jobs"))
        .bearer_auth(&key)
        .json(&json!({"model": "gpt2", "training_file": file_id,
                      "hyperparameters": {"n_epochs": 1, "batch_size": 4},
                      "max_seq_length": 16, "checkpoint_interval": 2}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job_id = job["id"].as_str().expect("a job").to_string();

    // Watch it live until the end event.
    let resp = get(format!("/v1/fine_tuning/jobs/{job_id}/events/stream"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let watched = tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if text.contains("event: end") {
                break;
            }
        }
    })
    .await;
    assert!(watched.is_ok(), "the job did not finish in time: {text}");
    assert!(text.contains("\"status\":\"succeeded\""), "{text}");
    assert!(text.contains("event: metrics"), "{text}");

    let job: Value = get(format!("/v1/fine_tuning/jobs/{job_id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(job["fine_tuned_model"].as_str().is_some());
    assert!(job["trained_tokens"].as_i64().unwrap() > 0);
    let results = job["result_files"][0].as_str().unwrap();
    let csv = get(format!("/v1/files/{results}/content"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(csv.starts_with("step,"), "{csv}");

    let list: Value = get(format!("/v1/fine_tuning/jobs/{job_id}/artifacts"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["path"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"config.json") && names.contains(&"model.safetensors"),
        "{list}"
    );
    let tar = get(format!("/v1/fine_tuning/jobs/{job_id}/artifacts.tar"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let path = data.path().join("model.tar");
    std::fs::write(&path, &tar).unwrap();
    let out = Command::new("tar").arg("-tf").arg(&path).output().unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    for n in &names {
        assert!(
            listed.lines().any(|l| l == *n),
            "{n} not in the archive: {listed}"
        );
    }
    let ckpts: Value = get(format!("/v1/fine_tuning/jobs/{job_id}/checkpoints"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ckpt = ckpts["data"][0]["id"].as_str().expect("a checkpoint");
    let files: Value = get(format!(
        "/v1/fine_tuning/jobs/{job_id}/checkpoints/{ckpt}/artifacts"
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert!(!files["data"].as_array().unwrap().is_empty(), "{files}");

    // SIGTERM: the server and its worker stop cleanly.
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tuna serve did not stop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}");
}
