//! `/v1/files`: upload checks, size limit, listing, content, deletion, tenant isolation.

use reqwest::Method;

use crate::helpers::{error_of, json, spawn_app, spawn_with, CHAT};

#[tokio::test]
async fn valid_upload_is_processed_and_round_trips() {
    let app = spawn_app().await;
    let resp = app
        .upload(
            &app.key,
            "train.jsonl",
            CHAT.as_bytes().to_vec(),
            "fine-tune",
        )
        .await;
    let (status, file) = json(resp).await;
    assert_eq!(status, 200, "{file}");
    assert_eq!(file["object"], "file");
    assert_eq!(file["status"], "processed");
    assert_eq!(file["bytes"], CHAT.len());
    assert_eq!(file["filename"], "train.jsonl");
    assert_eq!(file["purpose"], "fine-tune");
    assert_eq!(file["format"], "messages");
    assert_eq!(file["example_count"], 2);
    assert!(file["status_details"].is_null() && file["expires_at"].is_null());
    let id = file["id"].as_str().unwrap();
    assert!(id.starts_with("file-"));
    let (_, got) = json(app.get(&format!("/v1/files/{id}")).await).await;
    assert_eq!(got, file);
    let content = app
        .get(&format!("/v1/files/{id}/content"))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(&content[..], CHAT.as_bytes());
    // The bytes live in the artifact store (where workers read them), not in a temp file.
    let key = format!("files/{id}");
    let stored = app.state.config.store.get_bytes(&key).await.unwrap();
    assert_eq!(&stored[..], CHAT.as_bytes());
    assert_eq!(
        std::fs::read_dir(app.state.config.tmp_dir())
            .unwrap()
            .count(),
        0
    );
    let (status, del) = json(
        app.req(Method::DELETE, &format!("/v1/files/{id}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, &del["deleted"]), (200, &serde_json::json!(true)));
    let (status, _) = json(app.get(&format!("/v1/files/{id}")).await).await;
    assert_eq!(status, 404);
    assert_eq!(app.state.config.store.size(&key).await.unwrap(), None);
}

#[tokio::test]
async fn bad_jsonl_lines_are_reported_with_numbers_and_rules() {
    let app = spawn_app().await;
    let text = format!(
        "{}not json\n{{\"messages\": [{{\"role\": \"robot\", \"content\": \"x\"}}]}}\n",
        CHAT
    );
    let (status, body) = json(
        app.upload(&app.key, "bad.jsonl", text.into_bytes(), "fine-tune")
            .await,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let e = error_of(&body);
    assert_eq!(e["code"], "invalid_file_format");
    assert_eq!(e["param"], "file");
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("line 3") && msg.contains("invalid_json"),
        "{msg}"
    );
    assert!(
        msg.contains("line 4") && msg.contains("unrecognized_role"),
        "{msg}"
    );
    // The record is kept with status `error`.
    let (_, list) = json(app.get("/v1/files").await).await;
    let kept = &list["data"][0];
    assert_eq!(kept["status"], "error");
    assert!(kept["status_details"].as_str().unwrap().contains("line 3"));
}

#[tokio::test]
async fn csv_with_header_and_other_purposes() {
    let app = spawn_app().await;
    let csv = "sentence,label\n\"good, really\",1\nbad,0\n";
    let (status, file) = json(
        app.upload(&app.key, "sst.csv", csv.as_bytes().to_vec(), "fine-tune")
            .await,
    )
    .await;
    assert_eq!(status, 200, "{file}");
    assert_eq!(
        (file["format"].as_str(), file["example_count"].as_i64()),
        (Some("text_label"), Some(2))
    );
    let (status, file) = json(
        app.upload(&app.key, "notes.txt", b"anything".to_vec(), "user_data")
            .await,
    )
    .await;
    assert_eq!((status, file["status"].as_str()), (200, Some("processed")));
    let (status, body) = json(
        app.upload(&app.key, "x.jsonl", b"{}".to_vec(), "bogus")
            .await,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(error_of(&body)["param"], "purpose");
}

#[tokio::test]
async fn oversized_upload_is_413_and_leaves_nothing() {
    let app = spawn_with(|c| c.max_upload_bytes = 1000).await;
    let (status, body) = json(
        app.upload(&app.key, "big.jsonl", vec![b'x'; 5000], "fine-tune")
            .await,
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(error_of(&body)["code"], "payload_too_large");
    let (_, list) = json(app.get("/v1/files").await).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    let leftovers = std::fs::read_dir(app.state.config.tmp_dir())
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(leftovers, 0);
    assert!(app
        .state
        .config
        .store
        .list("files")
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn files_list_pages_in_both_orders() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.upload_ok(&format!("f{i}.jsonl"), CHAT).await);
    }
    let (_, page1) = json(app.get("/v1/files?limit=2&order=asc").await).await;
    let got: Vec<&str> = page1["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[0].as_str(), ids[1].as_str()]);
    assert_eq!(page1["has_more"], true);
    let (_, page2) = json(
        app.get(&format!("/v1/files?limit=10&order=asc&after={}", ids[1]))
            .await,
    )
    .await;
    assert_eq!(page2["data"].as_array().unwrap().len(), 3);
    assert_eq!(page2["has_more"], false);
    let (_, desc) = json(app.get("/v1/files?limit=1").await).await;
    assert_eq!(desc["data"][0]["id"], ids[4].as_str());
    let (status, body) = json(app.get("/v1/files?limit=0").await).await;
    assert_eq!(
        (status, &error_of(&body)["param"]),
        (400, &serde_json::json!("limit"))
    );
}

#[tokio::test]
async fn another_organisations_file_is_404() {
    let app = spawn_app().await;
    let id = app.upload_ok("t.jsonl", CHAT).await;
    for path in [format!("/v1/files/{id}"), format!("/v1/files/{id}/content")] {
        let (status, body) = json(
            app.req_as(&app.other_key, Method::GET, &path)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 404, "{body}");
    }
    let (status, _) = json(
        app.req_as(&app.other_key, Method::DELETE, &format!("/v1/files/{id}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
    let (_, list) = json(
        app.req_as(&app.other_key, Method::GET, "/v1/files")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
}
