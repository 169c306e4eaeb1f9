//! Every error answers `{"error": {message, type, param, code}}` with the right status.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::helpers::{error_of, json, spawn_app, spawn_with};

#[tokio::test]
async fn malformed_json_is_400_invalid_json() {
    let app = spawn_app().await;
    let resp = app
        .req(Method::POST, "/v1/fine_tuning/jobs")
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-should-retry"], "false");
    let (status, body) = json(resp).await;
    assert_eq!(status, 400);
    assert_eq!(error_of(&body)["code"], "invalid_json");
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn unknown_route_is_404_and_wrong_method_405() {
    let app = spawn_app().await;
    let (status, body) = json(app.get("/v1/fine-tuning/jobs").await).await;
    assert_eq!(status, 404);
    assert_eq!(error_of(&body)["code"], "unknown_url");
    let (status, body) = json(
        app.req(Method::DELETE, "/v1/fine_tuning/jobs")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 405);
    assert_eq!(error_of(&body)["code"], "method_not_allowed");
    let (status, body) = json(
        app.req(Method::GET, "/v1/fine_tuning/jobs/ftjob-x/cancel")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 405, "{body}");
}

#[tokio::test]
async fn too_large_json_body_is_413() {
    let app = spawn_with(|c| c.max_json_bytes = 4096).await;
    let body =
        json!({"model": "gpt2", "training_file": "file-x", "metadata": {"k": "v".repeat(10_000)}});
    let (status, body) = json(app.post_json("/v1/fine_tuning/jobs", &body).await).await;
    assert_eq!(status, 413);
    assert_eq!(error_of(&body)["code"], "payload_too_large");
}

#[tokio::test]
async fn unknown_fields_and_wrong_types_name_the_param() {
    let app = spawn_app().await;
    let cases = [
        (
            json!({"model": "gpt2", "training_file": "file-x", "nepochs": 3}),
            "nepochs",
        ),
        (json!({"model": 7, "training_file": "file-x"}), "model"),
        (
            json!({"model": "gpt2", "training_file": "file-x", "hyperparameters": {"n_epochs": "many"}}),
            "hyperparameters.n_epochs",
        ),
        (
            json!({"model": "gpt2", "training_file": "file-x",
                   "method": {"type": "supervised", "supervised": {"hyperparameters": {"lora_r": -1}}}}),
            "method.supervised.hyperparameters.lora_r",
        ),
        (
            json!({"model": "gpt2", "training_file": "file-x", "warmup_ratio": "lots"}),
            "warmup_ratio",
        ),
        (
            json!({"model": "gpt2", "dataset_url": "file:///etc/passwd"}),
            "dataset_url",
        ),
        (
            json!({"model": "gpt2", "training_file": "file-missing"}),
            "training_file",
        ),
    ];
    for (req, param) in cases {
        let (status, body) = json(app.post_json("/v1/fine_tuning/jobs", &req).await).await;
        assert_eq!(status, 400, "{req} -> {body}");
        assert_eq!(error_of(&body)["param"], param, "{req} -> {body}");
    }
}

#[tokio::test]
async fn missing_or_wrong_key_is_401() {
    let app = spawn_app().await;
    let resp = app
        .client
        .get(format!("{}/v1/fine_tuning/jobs", app.base))
        .send()
        .await
        .unwrap();
    let (status, body) = json(resp).await;
    assert_eq!(status, 401);
    assert_eq!(error_of(&body)["type"], "authentication_error");
    let (status, _) = json(
        app.req_as("tuna-sk-wrong", Method::GET, "/v1/files")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn open_access_maps_keyless_requests_to_the_default_org() {
    let app = spawn_with(|c| c.open_access = true).await;
    let resp = app
        .client
        .get(format!("{}/v1/fine_tuning/jobs", app.base))
        .send()
        .await
        .unwrap();
    let (status, body) = json(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
}

#[tokio::test]
async fn non_admin_cannot_register_models() {
    let app = spawn_app().await;
    let body = json!({"id": "x", "path": "/nonexistent"});
    let resp = app
        .req_as(&app.other_key, Method::POST, "/v1/models")
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, body) = json(resp).await;
    assert_eq!(status, 403, "{body}");
    error_of(&body);
}

#[tokio::test]
async fn database_outage_is_503_and_readyz_fails() {
    let app = spawn_app().await;
    let (status, _) = json(app.get("/readyz").await).await;
    assert_eq!(status, 200);
    app.state.db.close().await;
    let resp = app.get("/v1/fine_tuning/jobs").await;
    assert!(resp.headers().get("x-should-retry").is_none());
    let (status, body) = json(resp).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(error_of(&body)["type"], "server_error");
    assert!(
        !body.to_string().contains("pool"),
        "internal details leaked: {body}"
    );
    let (status, _) = json(app.get("/readyz").await).await;
    assert_eq!(status, 503);
    let (status, _) = json(app.get("/healthz").await).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn request_id_is_echoed_or_generated() {
    let app = spawn_app().await;
    let resp = app
        .req(Method::GET, "/healthz")
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "abc-123");
    let resp = app.get("/v1/nothing").await;
    assert!(!resp.headers()["x-request-id"].is_empty());
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_jobs_by_state() {
    let app = spawn_app().await;
    app.get("/v1/fine_tuning/jobs").await;
    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(text.contains("tuna_http_requests_total"), "{text}");
    assert!(text.contains("route=\"/v1/fine_tuning/jobs\""), "{text}");
    assert!(
        text.contains("tuna_http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("tuna_jobs{status=\"queued\"}"), "{text}");
}

#[tokio::test]
async fn too_many_pending_jobs_is_429_but_replays_still_answer() {
    let app = spawn_with(|c| c.max_pending_jobs = 1).await;
    let file = app.upload_ok("t.jsonl", crate::helpers::CHAT).await;
    let body = json!({"model": "gpt2", "training_file": file});
    let send = |key: &'static str| {
        app.req(Method::POST, "/v1/fine_tuning/jobs")
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
    };
    let (status, first) = json(send("a").await.unwrap()).await;
    assert_eq!(status, 200, "{first}");
    let resp = send("b").await.unwrap();
    assert!(resp.headers().get("x-should-retry").is_none());
    let (status, err) = json(resp).await;
    assert_eq!(status, 429, "{err}");
    assert_eq!(error_of(&err)["type"], "rate_limit_error");
    let (status, again) = json(send("a").await.unwrap()).await;
    assert_eq!((status, &again["id"]), (200, &first["id"]));
}

#[tokio::test]
async fn unsupported_model_config_is_422() {
    let app = spawn_app().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "t5", "d_model": 8}"#,
    )
    .unwrap();
    let (status, body) = json(
        app.post_json("/v1/models", &json!({"id": "t5", "path": dir.path()}))
            .await,
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(error_of(&body)["param"], "path");
}

#[tokio::test]
async fn extractor_rejections_use_the_error_shape() {
    let app = spawn_app().await;
    // Invalid percent-encoding in a path parameter is rejected by axum's Path extractor.
    let (status, body) = json(app.get("/v1/files/%FF%FE").await).await;
    assert_eq!(status, 400, "{body}");
    error_of(&body);
    let (status, body) = json(app.get("/v1/fine_tuning/jobs?limit=abc").await).await;
    assert_eq!((status, &body["error"]["param"]), (400, &json!("limit")));
}

#[tokio::test]
async fn the_waiting_jobs_cap_counts_again_before_refusing() {
    let app = spawn_with(|c| c.max_pending_jobs = 2).await;
    let file = app.upload_ok("t.jsonl", crate::helpers::CHAT).await;
    let body = json!({"model": "gpt2", "training_file": file});
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, job) = json(app.post_json("/v1/fine_tuning/jobs", &body).await).await;
        assert_eq!(status, 200, "{job}");
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    let (status, err) = json(app.post_json("/v1/fine_tuning/jobs", &body).await).await;
    assert_eq!(status, 429, "{err}");
    // One job leaves the queue: the next create counts again and is admitted at once.
    let (status, _) = json(
        app.post_json(
            &format!("/v1/fine_tuning/jobs/{}/cancel", ids[0]),
            &json!({}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200);
    let (status, job) = json(app.post_json("/v1/fine_tuning/jobs", &body).await).await;
    assert_eq!(status, 200, "{job}");
    let (status, err) = json(app.post_json("/v1/fine_tuning/jobs", &body).await).await;
    assert_eq!(status, 429, "{err}");
}

#[tokio::test]
async fn a_revoked_key_stops_working_once_its_cache_entry_expires() {
    for ttl in [Duration::from_secs(2), Duration::ZERO] {
        let app = spawn_with(|c| c.key_cache_ttl = ttl).await;
        let key = tuna_db::keys::create_key(&app.db.pool, tuna_db::keys::DEFAULT_ORG, "k", false)
            .await
            .unwrap();
        let status = |resp: reqwest::Response| resp.status().as_u16();
        let get = || app.req_as(&key.secret, Method::GET, "/v1/files").send();
        assert_eq!(status(get().await.unwrap()), 200);
        assert!(tuna_db::keys::revoke_key(&app.db.pool, &key.row.api_key_id)
            .await
            .unwrap());
        if !ttl.is_zero() {
            // Remembered for at most `ttl` (documented in auth.rs and docs/configuration.md).
            assert_eq!(status(get().await.unwrap()), 200);
            tokio::time::sleep(ttl + Duration::from_millis(100)).await;
        }
        let (code, err) = json(get().await.unwrap()).await;
        assert_eq!(code, 401, "ttl {ttl:?}: {err}");
    }
}
