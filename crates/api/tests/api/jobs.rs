//! `/v1/fine_tuning/jobs`: create, validation, idempotency, paging, control, events,
//! checkpoints, tenant isolation; `/v1/models`.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use tuna_db::queue::{self, Control, WorkerInfo};

use crate::helpers::{create, error_of, fixture, json, spawn_app, TestApp, CHAT, LABELED};

#[tokio::test]
async fn create_resolves_hyperparameters_echoes_extensions_and_queues() {
    let app = spawn_app().await;
    let file = app.upload_ok("train.jsonl", CHAT).await;
    let job = create(
        &app,
        json!({
            "model": "gpt2", "training_file": file, "suffix": "demo", "metadata": {"team": "a"},
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 2, "batch_size": "auto", "lora_r": 4, "lora_target_modules": ["c_attn"]}}},
            "warmup_ratio": 0.1, "max_seq_length": 32, "eval_interval": 5
        }),
    )
    .await;
    assert!(job["id"].as_str().unwrap().starts_with("ftjob-"));
    assert_eq!(job["object"], "fine_tuning.job");
    assert_eq!(job["status"], "queued");
    assert_eq!(
        job["hyperparameters"],
        json!({"batch_size": 8, "learning_rate_multiplier": 1.0, "n_epochs": 2})
    );
    let hp = &job["method"]["supervised"]["hyperparameters"];
    assert_eq!(
        (hp["lora_r"].as_i64(), hp["warmup_ratio"].as_f64()),
        (Some(4), Some(0.1))
    );
    assert_eq!(
        (hp["max_seq_length"].as_i64(), hp["eval_interval"].as_i64()),
        (Some(32), Some(5))
    );
    assert_eq!(hp["training_type"], "lora");
    assert_eq!(job["user_provided_suffix"], "demo");
    assert_eq!(job["metadata"], json!({"team": "a"}));
    assert_eq!(job["task"], "causal_lm");
    for k in [
        "error",
        "fine_tuned_model",
        "finished_at",
        "trained_tokens",
        "validation_file",
        "estimated_finish",
        "integrations",
    ] {
        assert!(
            job.get(k).is_some_and(Value::is_null),
            "{k} should be present and null: {job}"
        );
    }
    assert_eq!(job["result_files"], json!([]));
    assert!(job["seed"].as_i64().is_some());
    let done = app.wait_validated(job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "queued", "{done}");
}

#[tokio::test]
async fn validation_failures_name_the_cause() {
    let app = spawn_app().await;
    let chat = app.upload_ok("chat.jsonl", CHAT).await;
    let cases = [
        (
            json!({"model": "nope", "training_file": chat}),
            "model_not_found",
            "model",
        ),
        (
            json!({"model": "gpt2", "training_file": chat, "task": "sequence_classification"}),
            "invalid_training_file",
            "training_file",
        ),
        (
            json!({"model": "gpt2", "training_file": chat, "max_seq_length": 100000}),
            "invalid_hyperparameters",
            "max_seq_length",
        ),
        (
            json!({"model": "gpt2", "training_file": chat, "lora_target_modules": ["q_proj"]}),
            "invalid_hyperparameters",
            "lora_target_modules",
        ),
        (
            json!({"model": "gpt2", "training_file": chat, "freeze_patterns": ["model.layers.*"]}),
            "invalid_hyperparameters",
            "freeze_patterns",
        ),
        (
            json!({"model": "gpt2", "dataset_url": "https://example.com/d.jsonl", "freeze_layers": 50}),
            "invalid_hyperparameters",
            "freeze_layers",
        ),
    ];
    for (body, code, param) in cases {
        let job = create(&app, body.clone()).await;
        // Uploaded files carry their scan, so the check ran inside the create request.
        assert_eq!(job["status"], "failed", "{body} -> {job}");
        let done = app.wait_validated(job["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "failed", "{body} -> {done}");
        assert_eq!(done["error"]["code"], code, "{body} -> {done}");
        assert_eq!(done["error"]["param"], param, "{body} -> {done}");
        assert!(done["finished_at"].is_i64());
    }
    let labeled = app.upload_ok("l.jsonl", LABELED).await;
    let ok = create(
        &app,
        json!({"model": "gpt2", "training_file": labeled, "task": "sequence_classification",
                                 "freeze_patterns": ["transformer.h.0.*"]}),
    )
    .await;
    // "auto" max_seq_length is fitted to the tiny model's context length (64).
    assert_eq!(
        ok["method"]["supervised"]["hyperparameters"]["max_seq_length"],
        64
    );
    assert_eq!(
        app.wait_validated(ok["id"].as_str().unwrap()).await["status"],
        "queued"
    );
}

/// Creates each job of `cases` (body, the status it reaches after validation, a part of its
/// error message) and checks where it ends.
async fn assert_validated(app: &TestApp, cases: &[(Value, &str, &str)]) {
    for (body, status, message) in cases {
        let job = create(app, body.clone()).await;
        let done = app.wait_validated(job["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], *status, "{body} -> {done}");
        if !message.is_empty() {
            let got = done["error"]["message"].as_str().unwrap_or_default();
            assert!(got.contains(message), "{body} -> {got}");
        }
    }
}

/// Uploads `body` as `name` and checks the upload is refused with an error message holding
/// each of `parts` (the line and what is wrong with it).
async fn assert_upload_refused(app: &TestApp, name: &str, body: &[u8], parts: &[&str]) {
    let resp = app.upload(&app.key, name, body.to_vec(), "fine-tune").await;
    let (status, bad) = json(resp).await;
    assert_eq!(status, 400, "{bad}");
    let e = error_of(&bad);
    assert_eq!(e["code"], "invalid_file_format", "{bad}");
    let msg = e["message"].as_str().unwrap_or_default();
    assert!(parts.iter().all(|p| msg.contains(p)), "{msg}");
}

#[tokio::test]
async fn sequence_level_tasks_check_their_data_and_model_at_create_time() {
    let app = spawn_app().await;
    tuna_api::models::register_base_model(&app.db.pool, "bert", &fixture("bert"))
        .await
        .expect("register bert");
    let numbers = app
        .upload_ok(
            "scores.csv",
            "sentence1,sentence2,label\na cat,a cat sits,4.5\na dog,the sun,0.5\n",
        )
        .await;
    let mixed = app
        .upload_ok(
            "mixed.jsonl",
            "{\"text\": \"a\", \"label\": 1.5}\n{\"text\": \"b\", \"label\": 2}\n{\"text\": \"c\", \"label\": \"high\"}\n",
        )
        .await;
    let tags = app
        .upload_ok(
            "tags.jsonl",
            "{\"text\": \"a\", \"labels\": [\"x\", \"y\"]}\n{\"text\": \"b\", \"labels\": []}\n",
        )
        .await;
    let labeled = app.upload_ok("l.jsonl", LABELED).await;
    // (body, expected status, a part of the error message)
    let cases = [
        (json!({"model": "bert", "training_file": numbers, "task": "sequence_regression"}), "queued", ""),
        (json!({"model": "gpt2", "training_file": numbers, "task": "sequence_regression"}), "queued", ""),
        (
            json!({"model": "bert", "training_file": mixed, "task": "sequence_regression"}),
            "failed",
            "line 3: the label is not a number; task 'sequence_regression' trains on numeric labels",
        ),
        (json!({"model": "bert", "training_file": mixed, "task": "sequence_classification"}), "queued", ""),
        (json!({"model": "bert", "training_file": tags, "task": "multi_label_classification"}), "queued", ""),
        (
            json!({"model": "bert", "training_file": tags, "task": "sequence_classification"}),
            "failed",
            "holds `text_labels` records, but task 'sequence_classification' needs `text` + `label` records; these records suit task 'multi_label_classification'",
        ),
        (
            json!({"model": "bert", "training_file": labeled, "task": "multi_label_classification"}),
            "failed",
            "these records suit task 'sequence_classification' or 'sequence_regression'",
        ),
        (
            json!({"model": "bert", "training_file": labeled}),
            "failed",
            "model 'bert' does not support task 'causal_lm'; it supports: sequence_classification, sequence_regression, multi_label_classification, token_classification, question_answering",
        ),
    ];
    assert_validated(&app, &cases).await;
    // The task is echoed, and the model object lists every task the model can do.
    let job = create(
        &app,
        json!({"model": "bert", "training_file": numbers, "task": "sequence_regression"}),
    )
    .await;
    assert_eq!(job["task"], "sequence_regression");
    let (status, model) = json(app.get("/v1/models/bert").await).await;
    assert_eq!(status, 200, "{model}");
    assert_eq!(
        model["architecture"]["tasks"],
        json!([
            "sequence_classification",
            "sequence_regression",
            "multi_label_classification",
            "token_classification",
            "question_answering"
        ])
    );
}

#[tokio::test]
async fn question_answering_checks_its_data_and_model_at_create_time() {
    let app = spawn_app().await;
    tuna_api::models::register_base_model(&app.db.pool, "bert", &fixture("bert"))
        .await
        .expect("register bert");
    tuna_api::models::register_base_model(&app.db.pool, "llama", &fixture("llama"))
        .await
        .expect("register llama");
    let squad = app
        .upload_ok(
            "squad.jsonl",
            "{\"question\": \"Who?\", \"context\": \"Ann met Bob.\", \"answers\": {\"text\": [\"Bob\"], \"answer_start\": [8]}}\n",
        )
        .await;
    // An answer that is not where its offset says: the upload names the line.
    assert_upload_refused(
        &app,
        "bad.jsonl",
        b"{\"question\": \"Who?\", \"context\": \"Ann met Bob.\", \"answers\": {\"text\": [\"Bob\"], \"answer_start\": [8]}}\n{\"question\": \"Who?\", \"context\": \"Ann met Bob.\", \"answers\": {\"text\": [\"Bob\"], \"answer_start\": [2]}}\n",
        &["line 2: answer 0 `Bob` is not at character 2 of the context"],
    )
    .await;
    assert_validated(
        &app,
        &[
            (json!({"model": "bert", "training_file": squad, "task": "question_answering"}), "queued", ""),
            (json!({"model": "gpt2", "training_file": squad, "task": "question_answering", "doc_stride": 32}), "queued", ""),
            (
                json!({"model": "bert", "training_file": squad, "task": "sequence_classification"}),
                "failed",
                "holds `question_answers` records, but task 'sequence_classification' needs `text` + `label` records; these records suit task 'question_answering'",
            ),
            (
                json!({"model": "llama", "training_file": squad, "task": "question_answering"}),
                "failed",
                "model 'llama' does not support task 'question_answering'",
            ),
        ],
    )
    .await;
    let (status, body) = json(
        app.post_json(
            "/v1/fine_tuning/jobs",
            &json!({"model": "bert", "training_file": squad, "doc_stride": 16}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(error_of(&body)["param"], "doc_stride");
}

#[tokio::test]
async fn token_classification_checks_its_data_and_model_at_create_time() {
    let app = spawn_app().await;
    let db = &app.db.pool;
    tuna_api::models::register_base_model(db, "bert", &fixture("bert"))
        .await
        .expect("register bert");
    tuna_api::models::register_base_model(db, "olmo2", &fixture("olmo2"))
        .await
        .expect("register olmo2");
    let jsonl = app
        .upload_ok(
            "ner.jsonl",
            "{\"tokens\": [\"John\", \"lives\", \"in\", \"Paris\"], \"tags\": [\"B-PER\", \"O\", \"O\", \"B-LOC\"]}\n",
        )
        .await;
    let conll = app
        .upload_ok(
            "ner.conll",
            "-DOCSTART- O\n\nJohn B-PER\nlives O\n\nParis B-LOC\n",
        )
        .await;
    let (_, file) = json(app.get(&format!("/v1/files/{conll}")).await).await;
    assert_eq!(file["status"], "processed", "{file}");
    // A sentence whose tags are fewer than its words: the upload names the line.
    assert_upload_refused(
        &app,
        "bad.jsonl",
        b"{\"tokens\": [\"a\"], \"tags\": [\"O\"]}\n{\"tokens\": [\"a\", \"b\"], \"tags\": [\"O\"]}\n",
        &["line 2: 2 tokens but 1 tags", "length_mismatch"],
    )
    .await;
    let cases = [
        (json!({"model": "bert", "training_file": jsonl, "task": "token_classification"}), "queued", ""),
        (json!({"model": "bert", "training_file": conll, "task": "token_classification"}), "queued", ""),
        (json!({"model": "gpt2", "training_file": conll, "task": "token_classification"}), "queued", ""),
        (
            json!({"model": "bert", "training_file": conll, "task": "sequence_classification"}),
            "failed",
            "holds `tokens_tags` records, but task 'sequence_classification' needs `text` + `label` records; these records suit task 'token_classification'",
        ),
        (
            json!({"model": "olmo2", "training_file": conll, "task": "token_classification"}),
            "failed",
            "model 'olmo2' does not support task 'token_classification'; it supports: causal_lm, sequence_classification",
        ),
    ];
    assert_validated(&app, &cases).await;
}

#[tokio::test]
async fn idempotency_key_returns_the_same_job() {
    let app = spawn_app().await;
    let file = app.upload_ok("t.jsonl", CHAT).await;
    let body = json!({"model": "gpt2", "training_file": file});
    let send = || {
        app.req(Method::POST, "/v1/fine_tuning/jobs")
            .header("Idempotency-Key", "k-1")
            .json(&body)
            .send()
    };
    let (_, a) = json(send().await.unwrap()).await;
    let (_, b) = json(send().await.unwrap()).await;
    assert_eq!(a["id"], b["id"]);
    let (_, list) = json(app.get("/v1/fine_tuning/jobs").await).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    // Another organisation's key space is separate.
    let other_file = {
        let resp = app
            .upload(
                &app.other_key,
                "t.jsonl",
                CHAT.as_bytes().to_vec(),
                "fine-tune",
            )
            .await;
        json(resp).await.1["id"].as_str().unwrap().to_string()
    };
    let body2 = json!({"model": "gpt2", "training_file": other_file});
    let resp = app
        .req_as(&app.other_key, Method::POST, "/v1/fine_tuning/jobs")
        .header("Idempotency-Key", "k-1")
        .json(&body2)
        .send();
    let (_, c) = json(resp.await.unwrap()).await;
    assert_ne!(c["id"], a["id"]);
}

#[tokio::test]
async fn jobs_list_pages_newest_first_and_filters_metadata() {
    let app = spawn_app().await;
    let file = app.upload_ok("t.jsonl", CHAT).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let job = create(
            &app,
            json!({"model": "gpt2", "training_file": file, "metadata": {"i": i.to_string()}}),
        )
        .await;
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/v1/fine_tuning/jobs?limit=2&after={a}"),
            None => "/v1/fine_tuning/jobs?limit=2".to_string(),
        };
        let (_, page) = json(app.get(&path).await).await;
        let data = page["data"].as_array().unwrap();
        seen.extend(data.iter().map(|j| j["id"].as_str().unwrap().to_string()));
        if page["has_more"] == false {
            break;
        }
        after = data.last().map(|j| j["id"].as_str().unwrap().to_string());
    }
    ids.reverse();
    assert_eq!(seen, ids);
    let (_, filtered) = json(app.get("/v1/fine_tuning/jobs?metadata[i]=3").await).await;
    assert_eq!(filtered["data"].as_array().unwrap().len(), 1);
    assert_eq!(filtered["data"][0]["metadata"]["i"], "3");
}

#[tokio::test]
async fn jobs_list_filters_by_status_and_model() {
    let app = spawn_app().await;
    let file = app.upload_ok("t.jsonl", CHAT).await;
    let a = create(&app, json!({"model": "gpt2", "training_file": file})).await;
    let b = create(&app, json!({"model": "gpt2", "training_file": file})).await;
    let (a, b) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    let (status, paused) = json(
        app.post_json(&format!("/v1/fine_tuning/jobs/{b}/pause"), &json!({}))
            .await,
    )
    .await;
    assert_eq!((status, paused["status"].as_str()), (200, Some("paused")));
    let ids = |page: &Value| -> Vec<String> {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, queued) = json(app.get("/v1/fine_tuning/jobs?status=queued").await).await;
    assert_eq!(ids(&queued), [a]);
    let (_, paused) = json(
        app.get("/v1/fine_tuning/jobs?status=paused&model=gpt2")
            .await,
    )
    .await;
    assert_eq!(ids(&paused), [b]);
    let (_, both) = json(app.get("/v1/fine_tuning/jobs?model=gpt2&limit=1").await).await;
    assert_eq!(
        (ids(&both), both["has_more"].as_bool()),
        (vec![b.to_string()], Some(true))
    );
    let (_, none) = json(app.get("/v1/fine_tuning/jobs?model=bert").await).await;
    assert!(ids(&none).is_empty());
    let (status, bad) = json(app.get("/v1/fine_tuning/jobs?status=done").await).await;
    assert_eq!(status, 400);
    assert_eq!(error_of(&bad)["param"], "status");
    assert!(
        error_of(&bad)["message"]
            .as_str()
            .unwrap()
            .contains("`status` must be one of validating_files, queued, running"),
        "{bad}"
    );
    // A base model was made by no job.
    let (_, model) = json(app.get("/v1/models/gpt2").await).await;
    assert_eq!(model["job_id"], Value::Null);
}

#[tokio::test]
async fn another_organisations_job_is_404() {
    let app = spawn_app().await;
    let file = app.upload_ok("t.jsonl", CHAT).await;
    let job = create(&app, json!({"model": "gpt2", "training_file": file})).await;
    let id = job["id"].as_str().unwrap();
    for (method, path) in [
        (Method::GET, format!("/v1/fine_tuning/jobs/{id}")),
        (Method::GET, format!("/v1/fine_tuning/jobs/{id}/events")),
        (
            Method::GET,
            format!("/v1/fine_tuning/jobs/{id}/checkpoints"),
        ),
        (Method::POST, format!("/v1/fine_tuning/jobs/{id}/cancel")),
        (Method::POST, format!("/v1/fine_tuning/jobs/{id}/pause")),
        (Method::POST, format!("/v1/fine_tuning/jobs/{id}/resume")),
    ] {
        let (status, body) = json(
            app.req_as(&app.other_key, method, &path)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 404, "{path}: {body}");
        error_of(&body);
    }
    // Using another organisation's file is refused too.
    let resp = app
        .req_as(&app.other_key, Method::POST, "/v1/fine_tuning/jobs")
        .json(&json!({"model": "gpt2", "training_file": file}));
    let (status, body) = json(resp.send().await.unwrap()).await;
    assert_eq!(
        (status, &body["error"]["param"]),
        (400, &json!("training_file"))
    );
}

async fn queued_job(app: &TestApp) -> String {
    let file = app.upload_ok("t.jsonl", CHAT).await;
    let job = create(app, json!({"model": "gpt2", "training_file": file})).await;
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(app.wait_validated(&id).await["status"], "queued");
    id
}

#[tokio::test]
async fn pause_resume_cancel_and_conflicts() {
    let app = spawn_app().await;
    let id = queued_job(&app).await;
    let post = |op: &str| {
        app.req(Method::POST, &format!("/v1/fine_tuning/jobs/{id}/{op}"))
            .send()
    };
    let (status, job) = json(post("pause").await.unwrap()).await;
    assert_eq!((status, job["status"].as_str()), (200, Some("paused")));
    let (status, body) = json(post("pause").await.unwrap()).await;
    assert_eq!(status, 409, "{body}");
    let (_, job) = json(post("resume").await.unwrap()).await;
    assert_eq!(job["status"], "queued");
    let (_, job) = json(post("cancel").await.unwrap()).await;
    assert_eq!(job["status"], "cancelled");
    assert!(job["finished_at"].is_i64());
    let resp = post("cancel").await.unwrap();
    assert_eq!(resp.headers()["x-should-retry"], "false");
    let (status, body) = json(resp).await;
    assert_eq!(status, 409);
    assert_eq!(error_of(&body)["code"], "conflict");
}

fn worker() -> WorkerInfo {
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

#[tokio::test]
async fn cancel_and_pause_reach_the_lease_holder() {
    let app = spawn_app().await;
    let pool = &app.db.pool;
    let ttl = Duration::from_secs(60);
    for op in ["pause", "cancel"] {
        let id = queued_job(&app).await;
        let w = worker();
        queue::register_worker(pool, &w).await.unwrap();
        let claimed = queue::claim(pool, &w, ttl).await.unwrap().expect("claimed");
        assert_eq!(claimed.job.job_id, id);
        let mut listener = queue::Listener::connect(pool).await.unwrap();
        let (status, job) = json(
            app.req(Method::POST, &format!("/v1/fine_tuning/jobs/{id}/{op}"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{job}");
        assert_eq!(job["status"], "running");
        assert_eq!(job[format!("{op}_requested")], true);
        // The lease holder hears it at once (LISTEN/NOTIFY) and at its next heartbeat.
        let notified = loop {
            match listener.next(Duration::from_secs(5)).await {
                queue::Wake::Control(msg) => break msg,
                queue::Wake::JobsQueued => continue,
                other => panic!("expected a control notification, got {other:?}"),
            }
        };
        assert_eq!(notified.job_id, id);
        assert_eq!(notified.worker_id.as_deref(), Some(w.worker_id.as_str()));
        let control = queue::heartbeat(pool, &claimed.lease, ttl, None, None)
            .await
            .unwrap();
        let expected = if op == "pause" {
            Control::Pause
        } else {
            Control::Cancel
        };
        assert_eq!(control, expected);
        if op == "pause" {
            queue::release_paused(pool, &claimed.lease).await.unwrap();
            let (_, job) = json(app.get(&format!("/v1/fine_tuning/jobs/{id}")).await).await;
            assert_eq!(job["status"], "paused");
        } else {
            queue::finish_cancelled(pool, &claimed.lease).await.unwrap();
            let (_, job) = json(app.get(&format!("/v1/fine_tuning/jobs/{id}")).await).await;
            assert_eq!(job["status"], "cancelled");
        }
    }
}

#[tokio::test]
async fn events_and_checkpoints_page_newest_first() {
    let app = spawn_app().await;
    let pool = &app.db.pool;
    let id = queued_job(&app).await;
    let w = worker();
    queue::register_worker(pool, &w).await.unwrap();
    let claimed = queue::claim(pool, &w, Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    for step in [10, 20, 30] {
        let metrics = json!({"step": step, "train_loss": 1.0 / step as f64});
        queue::record_checkpoint(
            pool,
            &claimed.lease,
            step,
            &metrics,
            &format!("jobs/{id}/step-{step}"),
            "ft:gpt2:x",
        )
        .await
        .unwrap();
        queue::append_event(
            pool,
            &claimed.lease,
            queue::Level::Info,
            &format!("step {step}"),
            Some(&metrics),
            queue::EventKind::Metrics,
        )
        .await
        .unwrap();
    }
    let (_, page) = json(
        app.get(&format!("/v1/fine_tuning/jobs/{id}/checkpoints?limit=2"))
            .await,
    )
    .await;
    let data = page["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(
        (
            data[0]["step_number"].as_i64(),
            data[1]["step_number"].as_i64()
        ),
        (Some(30), Some(20))
    );
    assert_eq!(data[0]["object"], "fine_tuning.job.checkpoint");
    assert_eq!(
        data[0]["fine_tuned_model_checkpoint"],
        "ft:gpt2:x:ckpt-step-30"
    );
    assert_eq!(data[0]["fine_tuning_job_id"], id.as_str());
    assert_eq!(
        (&page["first_id"], &page["last_id"], &page["has_more"]),
        (&data[0]["id"], &data[1]["id"], &json!(true))
    );
    let last = page["last_id"].as_str().unwrap();
    let (_, rest) = json(
        app.get(&format!(
            "/v1/fine_tuning/jobs/{id}/checkpoints?after={last}"
        ))
        .await,
    )
    .await;
    assert_eq!(rest["data"].as_array().unwrap().len(), 1);
    assert_eq!(rest["data"][0]["step_number"], 10);
    assert_eq!(rest["has_more"], false);

    let (_, events) = json(
        app.get(&format!("/v1/fine_tuning/jobs/{id}/events?limit=2"))
            .await,
    )
    .await;
    let ev = events["data"].as_array().unwrap();
    assert_eq!(ev[0]["message"], "step 30");
    assert_eq!(ev[0]["type"], "metrics");
    assert_eq!(ev[0]["object"], "fine_tuning.job.event");
    assert_eq!(events["has_more"], true);
    let mut all = ev.len();
    let mut after = ev.last().unwrap()["id"].as_str().unwrap().to_string();
    loop {
        let (_, p) = json(
            app.get(&format!(
                "/v1/fine_tuning/jobs/{id}/events?limit=2&after={after}"
            ))
            .await,
        )
        .await;
        let d = p["data"].as_array().unwrap();
        all += d.len();
        if p["has_more"] == false {
            break;
        }
        after = d.last().unwrap()["id"].as_str().unwrap().to_string();
    }
    // created, validated, started, 3 metrics events.
    assert_eq!(all, 6);
}

#[tokio::test]
async fn models_list_and_retrieve() {
    let app = spawn_app().await;
    let (_, list) = json(app.get("/v1/models").await).await;
    let gpt2 = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "gpt2")
        .cloned()
        .expect("gpt2 listed");
    assert_eq!(gpt2["object"], "model");
    assert_eq!(gpt2["owned_by"], "tuna");
    assert_eq!(gpt2["architecture"]["family"], "gpt2");
    let (status, one) = json(app.get("/v1/models/gpt2").await).await;
    assert_eq!((status, &one["id"]), (200, &json!("gpt2")));
    let (status, body) = json(app.get("/v1/models/unknown").await).await;
    assert_eq!(status, 404);
    error_of(&body);
    let path = crate::helpers::fixture("llama");
    let (status, body) = json(
        app.post_json("/v1/models", &json!({"id": "tiny-llama", "path": path}))
            .await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["architecture"]["family"], "llama");
    let (status, body) = json(
        app.post_json("/v1/models", &json!({"id": "x", "path": "/nonexistent"}))
            .await,
    )
    .await;
    assert_eq!((status, &body["error"]["param"]), (400, &json!("path")));
}

#[tokio::test]
async fn startup_sweep_validates_jobs_left_in_validating_files() {
    let app = spawn_app().await;
    let file = app.upload_ok("t.jsonl", CHAT).await;
    let body = json!({"model": "gpt2", "training_file": file, "max_seq_length": 64});
    let req = tuna_core::spec::parse_create_request(&body, &Default::default(), 1).unwrap();
    // As if the server had stopped right after inserting the job.
    let new = queue::NewJob {
        job_id: tuna_core::ids::new_id(tuna_core::ids::JOB),
        organization_id: tuna_db::keys::DEFAULT_ORG.into(),
        model: "gpt2".into(),
        training_file: Some(file.clone()),
        validation_file: None,
        spec: serde_json::to_value(&req.spec).unwrap(),
        suffix: None,
        seed: 1,
        metadata: None,
        integrations: None,
        priority: 0,
        required_device: None,
        min_gpu_memory_mb: None,
        idempotency_key: None,
        max_attempts: 1,
        memory_estimate: None,
    };
    let row = queue::insert_job(&app.db.pool, &new)
        .await
        .unwrap()
        .into_job();
    assert_eq!(tuna_api::start_background(&app.state).await.unwrap(), 1);
    let done = app.wait_validated(&row.job_id).await;
    assert_eq!(done["status"], "queued", "{done}");
}

/// The events of a job, oldest first.
async fn event_messages(app: &TestApp, job_id: &str) -> Vec<String> {
    let (status, page) = json(
        app.get(&format!("/v1/fine_tuning/jobs/{job_id}/events"))
            .await,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let mut out: Vec<String> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect();
    out.reverse();
    out
}

#[tokio::test]
async fn checked_inline_jobs_are_queued_with_the_same_events_and_wake_workers() {
    let app = spawn_app().await;
    let file = app.upload_ok("t.jsonl", CHAT).await;
    let mut listener = queue::Listener::connect(&app.db.pool).await.unwrap();
    let job = create(&app, json!({"model": "gpt2", "training_file": file})).await;
    assert_eq!(job["status"], "queued", "{job}");
    let id = job["id"].as_str().unwrap();
    assert_eq!(
        event_messages(&app, id).await,
        vec![
            format!("Created fine-tuning job: {id}"),
            "Files validated, moving job to queued state".to_string()
        ]
    );
    let woke = tokio::time::timeout(
        Duration::from_secs(5),
        listener.next(Duration::from_secs(60)),
    )
    .await
    .expect("a queued job notifies idle workers");
    assert!(matches!(woke, queue::Wake::JobsQueued), "{woke:?}");
}

#[tokio::test]
async fn files_without_a_stored_scan_are_checked_in_the_background() {
    let app = spawn_app().await;
    // Two labels pass; one label fails. Both files look as if an older version had checked
    // them (no label count stored), so the job must read them.
    let two = app.upload_ok("two.jsonl", LABELED).await;
    let one = app
        .upload_ok(
            "one.jsonl",
            "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": 1}\n",
        )
        .await;
    sqlx::query("update files set label_count = null where file_id in ($1, $2)")
        .bind(&two)
        .bind(&one)
        .execute(&app.db.pool)
        .await
        .unwrap();
    for (file, outcome) in [(&two, "queued"), (&one, "failed")] {
        let job = create(
            &app,
            json!({"model": "gpt2", "training_file": file, "task": "sequence_classification"}),
        )
        .await;
        assert_eq!(job["status"], "validating_files", "{job}");
        let done = app.wait_validated(job["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], outcome, "{done}");
        if outcome == "failed" {
            assert_eq!(done["error"]["code"], "invalid_training_file", "{done}");
            assert!(
                done["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("1 distinct label"),
                "{done}"
            );
        }
    }
    // The same one-label file with its scan stored fails inside the create request.
    let inline_one = app
        .upload_ok("one-again.jsonl", "{\"text\": \"a\", \"label\": 1}\n")
        .await;
    let job = create(
        &app,
        json!({"model": "gpt2", "training_file": inline_one, "task": "sequence_classification"}),
    )
    .await;
    assert_eq!(
        (job["status"].as_str(), job["error"]["code"].as_str()),
        (Some("failed"), Some("invalid_training_file")),
        "{job}"
    );
}

#[tokio::test]
async fn a_file_deleted_behind_the_servers_back_is_not_used_by_later_jobs() {
    let app = spawn_app().await;
    let file = app.upload_ok("t.jsonl", CHAT).await;
    let body = json!({"model": "gpt2", "training_file": file});
    // The first create remembers the model and file rows (`tuna_api::inputs`).
    let first = create(&app, body.clone()).await;
    assert_eq!(first["status"], "queued", "{first}");
    // Deleted in the database directly, as another server sharing it would: the row this
    // server remembers is now stale, and the insert's own check must catch it.
    sqlx::query("update files set deleted_at = now() where file_id = $1")
        .bind(&file)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let (status, answer) = json(app.post_json("/v1/fine_tuning/jobs", &body).await).await;
    assert_eq!(status, 400, "{answer}");
    let err = error_of(&answer);
    assert_eq!(
        (err["param"].as_str(), err["code"].as_str()),
        (Some("training_file"), Some("invalid_file")),
        "{answer}"
    );
    let (_, list) = json(app.get("/v1/fine_tuning/jobs").await).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");

    // A file deleted through this server is forgotten at once.
    let other = app.upload_ok("u.jsonl", CHAT).await;
    let body = json!({"model": "gpt2", "training_file": other});
    create(&app, body.clone()).await;
    let resp = app
        .req(Method::DELETE, &format!("/v1/files/{other}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (status, answer) = json(app.post_json("/v1/fine_tuning/jobs", &body).await).await;
    assert_eq!(status, 400, "{answer}");
}

#[tokio::test]
async fn create_retrieve_and_list_answer_the_same_job_object() {
    let app = spawn_app().await;
    let file = app.upload_ok("t.jsonl", CHAT).await;
    let created = create(
        &app,
        json!({"model": "gpt2", "training_file": file, "metadata": {"k": "v"},
               "lora_r": 4, "lora_target_modules": ["c_attn"]}),
    )
    .await;
    let id = created["id"].as_str().unwrap();
    let (status, retrieved) = json(app.get(&format!("/v1/fine_tuning/jobs/{id}")).await).await;
    assert_eq!(status, 200);
    assert_eq!(retrieved, created);
    let (_, list) = json(app.get("/v1/fine_tuning/jobs").await).await;
    assert_eq!(list["data"][0], created);
    let hp = &created["method"]["supervised"]["hyperparameters"];
    assert_eq!(hp["lora_r"], 4, "{created}");
    assert_eq!(hp["lora_target_modules"], json!(["c_attn"]), "{created}");
    assert_eq!(hp["freeze_patterns"], json!([]), "{created}");
}

#[tokio::test]
async fn a_stored_spec_that_no_longer_reads_still_retrieves_and_lists() {
    let app = spawn_app().await;
    let file = app.upload_ok("t.jsonl", CHAT).await;
    let job = create(&app, json!({"model": "gpt2", "training_file": file})).await;
    let id = job["id"].as_str().unwrap();
    // As if written by another version of tuna.
    sqlx::query(r#"update jobs set spec = '{"model": 1}' where job_id = $1"#)
        .bind(id)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let (status, got) = json(app.get(&format!("/v1/fine_tuning/jobs/{id}")).await).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["hyperparameters"], json!({}), "{got}");
    assert!(got["method"].is_null() && got["task"].is_null(), "{got}");
    assert_eq!(got["status"], "queued");
    let (status, list) = json(app.get("/v1/fine_tuning/jobs").await).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["data"][0]["id"], id);
}

#[tokio::test]
async fn dpo_jobs_check_their_pairs_and_model_at_create_time() {
    let app = spawn_app().await;
    tuna_api::models::register_base_model(&app.db.pool, "bert", &fixture("bert"))
        .await
        .expect("register bert");
    let pairs = app
        .upload_ok(
            "pairs.jsonl",
            "{\"input\": {\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}, \"preferred_output\": [{\"role\": \"assistant\", \"content\": \"hello!\"}], \"non_preferred_output\": [{\"role\": \"assistant\", \"content\": \"go away\"}]}\n",
        )
        .await;
    let chats = app
        .upload_ok(
            "chats.jsonl",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n",
        )
        .await;
    // A malformed pair: the upload names its line.
    assert_upload_refused(
        &app,
        "bad.jsonl",
        b"{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"b\"}\n{\"prompt\": \"q\", \"chosen\": \"a\"}\n",
        &["line 2: a preference pair needs both `chosen` and `rejected`", "invalid_preference"],
    )
    .await;
    let dpo = json!({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}});
    assert_validated(
        &app,
        &[
            (json!({"model": "gpt2", "training_file": pairs, "method": dpo}), "queued", ""),
            (
                json!({"model": "gpt2", "training_file": chats, "method": dpo}),
                "failed",
                "holds `messages` records, but method 'dpo' trains on preference pairs",
            ),
            (
                json!({"model": "gpt2", "training_file": pairs}),
                "failed",
                "holds preference pairs, which train a job of method 'dpo'",
            ),
            (
                json!({"model": "bert", "training_file": pairs, "method": dpo}),
                "failed",
                "model 'bert' cannot be tuned with method 'dpo', which needs a causal language model",
            ),
        ],
    )
    .await;
    let (status, job) = json(
        app.get(&format!(
            "/v1/fine_tuning/jobs/{}",
            create(
                &app,
                json!({"model": "gpt2", "training_file": pairs, "method": dpo})
            )
            .await["id"]
                .as_str()
                .unwrap()
        ))
        .await,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(job["method"]["type"], "dpo", "{job}");
    assert_eq!(
        job["method"]["dpo"]["hyperparameters"]["beta"], 0.2,
        "{job}"
    );
    assert!(job["method"].get("supervised").is_none(), "{job}");
    let (status, body) = json(
        app.post_json(
            "/v1/fine_tuning/jobs",
            &json!({"model": "gpt2", "training_file": pairs, "method": {"type": "dpo"}, "task": "sequence_classification"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(error_of(&body)["param"], "task");
}
