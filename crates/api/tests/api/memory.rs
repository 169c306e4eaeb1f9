//! Will the job fit? The create-time memory check: the estimate in the job object, the check
//! against the live workers' memory, and the fits table of `GET /v1/models/{id}`.

use serde_json::{json, Value};
use tuna_core::hf_config::HfConfig;
use tuna_core::memory::{self, Accelerator};
use tuna_db::queue::{self, WorkerInfo};

use crate::helpers::{create, fixture, json, spawn_app, TestApp, CHAT};

fn gpt2() -> HfConfig {
    HfConfig::parse(&std::fs::read_to_string(fixture("gpt2").join("config.json")).unwrap()).unwrap()
}

async fn live_worker(app: &TestApp, device: &str, memory_bytes: Option<i64>) -> String {
    let w = WorkerInfo {
        worker_id: tuna_core::ids::new_id(tuna_core::ids::WORKER),
        hostname: "test".into(),
        device_kind: device.into(),
        gpu_name: (device == "cuda").then(|| "Test GPU".into()),
        gpu_memory_mb: memory_bytes.filter(|_| device == "cuda").map(|b| b >> 20),
        memory_bytes,
        labels: json!({}),
    };
    queue::register_worker(&app.db.pool, &w).await.unwrap();
    w.worker_id
}

#[tokio::test]
async fn the_job_object_carries_the_planners_estimate_for_its_stored_spec() {
    let app = spawn_app().await;
    let file = app.upload_ok("t.jsonl", CHAT).await;
    let job = create(
        &app,
        json!({"model": "gpt2", "training_file": file, "lora_r": 4,
               "hyperparameters": {"batch_size": 4}, "gradient_accumulation_steps": 2}),
    )
    .await;
    // No worker said what it has: nothing to check against, the job is queued.
    assert_eq!(job["status"], "queued", "{job}");
    let row = tuna_db::jobs::get_job(
        &app.db.pool,
        tuna_db::keys::DEFAULT_ORG,
        job["id"].as_str().unwrap(),
    )
    .await
    .unwrap()
    .unwrap();
    let spec = row.spec.get().unwrap();
    let hf = gpt2();
    for (name, accelerator) in [("cpu", Accelerator::Cpu), ("cuda", Accelerator::Cuda)] {
        let e = &job["memory_estimate"][name];
        let expected = serde_json::to_value(memory::estimate(&hf, spec, accelerator)).unwrap();
        assert_eq!(e, &expected, "{name}");
        assert_eq!(
            (e["micro_batch"].as_u64(), e["accelerator"].as_str()),
            (Some(2), Some(name))
        );
    }
    // Retrieval answers the same estimate.
    let (_, again) = json(
        app.get(&format!(
            "/v1/fine_tuning/jobs/{}",
            job["id"].as_str().unwrap()
        ))
        .await,
    )
    .await;
    assert_eq!(again["memory_estimate"], job["memory_estimate"]);
}

#[tokio::test]
async fn a_job_no_live_worker_can_hold_fails_at_create_with_what_it_needs() {
    let app = spawn_app().await;
    // A CPU worker that lets a job use 100 MiB (less than libtorch itself), a draining one and
    // one without figures: only the first counts.
    let small = live_worker(&app, "cpu", Some(100 << 20)).await;
    let draining = live_worker(&app, "cpu", Some(1 << 40)).await;
    queue::set_worker_draining(&app.db.pool, &draining, true)
        .await
        .unwrap();
    live_worker(&app, "cpu", None).await;
    let file = app.upload_ok("t.jsonl", CHAT).await;

    let job = create(&app, json!({"model": "gpt2", "training_file": file})).await;
    assert_eq!(job["status"], "failed", "{job}");
    let err = &job["error"];
    assert_eq!(
        (err["code"].as_str(), err["param"].as_str()),
        (Some("insufficient_memory"), Some("batch_size"))
    );
    let msg = err["message"].as_str().unwrap();
    let needed = job["memory_estimate"]["cpu"]["total_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        msg.starts_with(&format!(
            "The job needs about {} of memory (",
            memory::gib(needed)
        )),
        "{msg}"
    );
    assert!(
        msg.contains(&format!(
            "but the CPU of worker {small} (the only live worker) has 0.1 GiB"
        )),
        "{msg}"
    );
    assert!(
        msg.contains("use a smaller model or a device with more memory"),
        "{msg}"
    );

    // A job only a GPU may run is not held to the CPU worker's figure (no GPU worker said).
    let cuda = create(
        &app,
        json!({"model": "gpt2", "training_file": file, "device": "cuda"}),
    )
    .await;
    assert_eq!(cuda["status"], "queued", "{cuda}");
}

#[tokio::test]
async fn a_job_fits_when_one_live_worker_has_the_memory() {
    let app = spawn_app().await;
    live_worker(&app, "cpu", Some(100 << 20)).await;
    let big = live_worker(&app, "cuda", Some(8 << 30)).await;
    let file = app.upload_ok("t.jsonl", CHAT).await;
    let job = create(&app, json!({"model": "gpt2", "training_file": file})).await;
    assert_eq!(job["status"], "queued", "{job}");
    // Held to the CPU alone, it does not fit, and the message names the larger pool it had.
    let cpu = create(
        &app,
        json!({"model": "gpt2", "training_file": file, "device": "cpu"}),
    )
    .await;
    assert_eq!(cpu["error"]["code"], "insufficient_memory", "{cpu}");
    assert!(!cpu["error"]["message"].as_str().unwrap().contains(&big));
}

#[tokio::test]
async fn a_model_says_which_methods_fit_which_gpu_sizes() {
    let app = spawn_app().await;
    let (status, model) = json(app.get("/v1/models/gpt2").await).await;
    assert_eq!(status, 200, "{model}");
    let rows = model["architecture"]["memory"]
        .as_array()
        .expect("memory table");
    let expected = serde_json::to_value(memory::fits_table(&gpt2())).unwrap();
    assert_eq!(&Value::Array(rows.clone()), &expected);
    let methods: Vec<(&str, &str, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["training_type"].as_str().unwrap(),
                r["quantization"].as_str().unwrap(),
                r["micro_batch"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        methods,
        [
            ("full", "none", 1),
            ("full", "none", 8),
            ("lora", "none", 1),
            ("lora", "none", 8),
            ("lora", "nf4", 1),
            ("lora", "nf4", 8)
        ]
    );
    for r in rows {
        let gib: Vec<&String> = r["fits_gib"].as_object().unwrap().keys().collect();
        assert_eq!(gib, ["24", "48", "80"]);
        // A tiny model fits every size.
        assert!(
            r["fits_gib"]
                .as_object()
                .unwrap()
                .values()
                .all(|v| v == true),
            "{r}"
        );
    }
}

#[tokio::test]
async fn gradient_checkpointing_is_a_knob_of_every_family() {
    let app = spawn_app().await;
    let file = app.upload_ok("t.jsonl", CHAT).await;
    // true, "auto" and false are accepted and echoed.
    for value in [json!(true), json!("auto"), json!(false)] {
        let job = create(
            &app,
            json!({"model": "gpt2", "training_file": file, "gradient_checkpointing": value}),
        )
        .await;
        assert_eq!(job["status"], "queued", "{job}");
        assert_eq!(
            job["method"]["supervised"]["hyperparameters"]["gradient_checkpointing"],
            value
        );
    }
}

#[tokio::test]
async fn bf16_optimizer_moments_are_echoed_and_planned_at_half_the_state() {
    let app = spawn_app().await;
    let file = app.upload_ok("t.jsonl", CHAT).await;
    let plain = create(&app, json!({"model": "gpt2", "training_file": file})).await;
    let bf16 = create(
        &app,
        json!({"model": "gpt2", "training_file": file, "optimizer_moments": "bf16"}),
    )
    .await;
    assert_eq!(bf16["status"], "queued", "{bf16}");
    let hp = |j: &Value| j["method"]["supervised"]["hyperparameters"].clone();
    assert_eq!(hp(&bf16)["optimizer_moments"], "bf16", "{bf16}");
    assert!(hp(&plain).get("optimizer_moments").is_none(), "{plain}");
    let state = |j: &Value| {
        j["memory_estimate"]["cuda"]["optimizer_bytes"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(2 * state(&bf16), state(&plain), "{bf16} {plain}");
    let (status, body) = json(
        app.post_json(
            "/v1/fine_tuning/jobs",
            &json!({"model": "gpt2", "training_file": file, "optimizer_moments": "fp16"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "optimizer_moments", "{body}");
}

#[tokio::test]
async fn qlora_is_a_lora_job_over_an_nf4_base_with_checkpointing() {
    let app = spawn_app().await;
    let file = app.upload_ok("t.jsonl", CHAT).await;
    let gpt2 = create(
        &app,
        json!({"model": "gpt2", "training_file": file, "quantization": "nf4"}),
    )
    .await;
    assert_eq!(gpt2["status"], "queued", "{gpt2}");
    assert_eq!(
        gpt2["method"]["supervised"]["hyperparameters"]["gradient_checkpointing"], true,
        "{gpt2}"
    );
    // Not LoRA: a 400 naming the knob, and no job.
    let (status, body) = json(
        app.post_json(
            "/v1/fine_tuning/jobs",
            &json!({"model": "gpt2", "training_file": file, "quantization": "nf4",
                    "training_type": "full"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "quantization", "{body}");

    let (status, model) = json(
        app.post_json(
            "/v1/models",
            &json!({"id": "tiny-llama", "path": crate::helpers::fixture("llama")}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{model}");
    let rows = model["architecture"]["memory"].as_array().unwrap();
    assert!(
        rows.iter().any(|r| r["quantization"] == "nf4"),
        "a QLoRA row: {model}"
    );
    let job = create(
        &app,
        json!({"model": "tiny-llama", "training_file": file, "quantization": "nf4",
               "double_quantization": false}),
    )
    .await;
    assert_eq!(job["status"], "queued", "{job}");
    let hp = &job["method"]["supervised"]["hyperparameters"];
    assert_eq!(
        (
            &hp["training_type"],
            &hp["quantization"],
            &hp["double_quantization"],
            &hp["gradient_checkpointing"]
        ),
        (&json!("lora"), &json!("nf4"), &json!(false), &json!(true)),
        "{job}"
    );
    // The estimate the job carries is the planner's for QLoRA: less than the same LoRA's.
    let lora = create(
        &app,
        json!({"model": "tiny-llama", "training_file": file, "lora_r": 16,
                                   "gradient_checkpointing": true}),
    )
    .await;
    let weights = |j: &Value| {
        j["memory_estimate"]["cuda"]["weights_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(weights(&job) < weights(&lora), "{job} {lora}");
}
