//! `GET /v1/fine_tuning/jobs/{id}/events/stream`: server-sent events in order, live, resumable
//! with `Last-Event-ID`, ended by `event: end` once the job is terminal.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tuna_db::queue::{self, Completion, EventKind, Level};

use crate::artifacts::claimed_job;
use crate::helpers::{json, spawn_app, TestApp};

/// One server-sent event.
#[derive(Debug, Clone)]
struct Sse {
    id: Option<String>,
    event: String,
    data: Value,
}

/// Reads a stream until `event: end` (or `max` events), with a time limit.
async fn read_sse(resp: reqwest::Response, max: usize) -> Vec<Sse> {
    assert_eq!(resp.status(), 200);
    assert!(resp
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        while let Some(i) = buf.find("\n\n") {
            let block: String = buf.drain(..i + 2).collect();
            let (mut id, mut event, mut data) = (None, "message".to_string(), String::new());
            let mut any = false;
            for line in block.lines() {
                if line.starts_with(':') || line.is_empty() {
                    continue;
                }
                any = true;
                let (k, v) = line.split_once(':').unwrap_or((line, ""));
                let v = v.strip_prefix(' ').unwrap_or(v);
                match k {
                    "id" => id = Some(v.to_string()),
                    "event" => event = v.to_string(),
                    "data" => data.push_str(v),
                    _ => {}
                }
            }
            if any {
                let ev = Sse {
                    id,
                    event,
                    data: serde_json::from_str(&data).unwrap(),
                };
                let end = ev.event == "end";
                out.push(ev);
                if end || out.len() >= max {
                    return out;
                }
            }
        }
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("the event stream stalled");
        match next {
            Some(chunk) => buf.push_str(&String::from_utf8_lossy(&chunk.unwrap())),
            None => return out,
        }
    }
}

async fn all_events(app: &TestApp, job_id: &str) -> Vec<Value> {
    let (_, list) = json(
        app.get(&format!("/v1/fine_tuning/jobs/{job_id}/events?limit=100"))
            .await,
    )
    .await;
    let mut v = list["data"].as_array().unwrap().clone();
    v.reverse();
    v
}

#[tokio::test]
async fn events_stream_live_in_order_resume_and_end() {
    let app = spawn_app().await;
    let lease = claimed_job(&app).await;
    let job_id = lease.job_id.clone();
    for step in 1..=3 {
        queue::append_event(
            &app.db.pool,
            &lease,
            Level::Info,
            &format!("Step {step}/10: training loss={}", 2.0 / step as f64),
            Some(&json!({"step": step, "train_loss": 2.0 / step as f64})),
            EventKind::Metrics,
        )
        .await
        .unwrap();
    }
    let url = format!("/v1/fine_tuning/jobs/{job_id}/events/stream");
    let before = all_events(&app, &job_id).await;
    // Live: read what exists, then the rest as the worker writes it.
    let resp = app.get(&url).await;
    let pool = app.db.pool.clone();
    let writer_lease = lease.clone();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        queue::append_event(
            &pool,
            &writer_lease,
            Level::Info,
            "Step 4/10: training loss=0.4",
            Some(&json!({"step": 4, "train_loss": 0.4})),
            EventKind::Metrics,
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        queue::complete(
            &pool,
            &writer_lease,
            &Completion {
                fine_tuned_model: "ft:gpt2:x".into(),
                ..Completion::default()
            },
        )
        .await
        .unwrap();
    });
    let got = read_sse(resp, 1000).await;
    writer.await.unwrap();
    let all = all_events(&app, &job_id).await;
    assert!(all.len() > before.len() + 2);
    let (end, events) = got.split_last().unwrap();
    assert_eq!(end.event, "end");
    assert_eq!(end.data, json!({"status": "succeeded"}));
    assert_eq!(events.len(), all.len(), "{events:?}");
    for (sse, ev) in events.iter().zip(&all) {
        assert_eq!(sse.id.as_deref(), ev["id"].as_str());
        assert_eq!(&sse.data, ev);
        assert_eq!(sse.event, ev["type"].as_str().unwrap());
    }
    assert!(events.iter().any(|e| e.event == "metrics"));
    assert!(events.iter().any(|e| e.event == "message"));

    // Resume after the third event: the rest, then end.
    let third = all[2]["id"].as_str().unwrap();
    let resp = app
        .req(reqwest::Method::GET, &url)
        .header("Last-Event-ID", third)
        .send()
        .await
        .unwrap();
    let resumed = read_sse(resp, 1000).await;
    let ids: Vec<_> = resumed.iter().filter_map(|e| e.id.clone()).collect();
    let want: Vec<_> = all[3..]
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, want);
    assert_eq!(resumed.last().unwrap().event, "end");
    // `?after=` does the same; after the last event only `end` remains.
    let last = all.last().unwrap()["id"].as_str().unwrap();
    let resp = app.get(&format!("{url}?after={last}")).await;
    let tail = read_sse(resp, 1000).await;
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].event, "end");
    // An unknown event id is a clear 400.
    let (status, body) = json(app.get(&format!("{url}?after=ftevent-nope")).await).await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn a_running_job_stream_stays_open() {
    let app = spawn_app().await;
    let lease = claimed_job(&app).await;
    let url = format!("/v1/fine_tuning/jobs/{}/events/stream", lease.job_id);
    let resp = app.get(&url).await;
    let n = all_events(&app, &lease.job_id).await.len();
    let got = tokio::time::timeout(Duration::from_secs(2), read_sse(resp, n + 1)).await;
    // Still open after every event was sent, as it should be.
    if let Ok(evs) = got {
        panic!("the stream of a running job ended: {evs:?}");
    }
}

#[tokio::test]
async fn open_streams_end_when_the_server_shuts_down() {
    let mut app = spawn_app().await;
    let lease = claimed_job(&app).await;
    let url = format!("/v1/fine_tuning/jobs/{}/events/stream", lease.job_id);
    let resp = app.get(&url).await;
    let n = all_events(&app, &lease.job_id).await.len();
    let reader = tokio::spawn(read_sse(resp, n + 1));
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.shutdown();
    let got = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the stream stayed open after shutdown")
        .unwrap();
    assert_eq!(got.len(), n);
    assert!(got.iter().all(|e| e.event != "end"));
}
