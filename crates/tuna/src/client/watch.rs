//! `tuna jobs watch ID`: follows a job until it ends, with a progress bar (step of total, loss,
//! tokens/s, time left) on stderr and the job's events on stdout; then prints the final
//! metrics. Exit: 0 when the job succeeded, 3 ([`Failure::JobEnded`]) when it failed or was
//! cancelled.
//!
//! Source of updates: the server's event stream `GET /v1/fine_tuning/jobs/{id}/events/stream`
//! (server-sent events, resumed with `Last-Event-ID`) when it has one, else polling `GET
//! …/events` (newest first; read until the last event already seen) and the job's `progress`
//! every `--interval` seconds. A paused job is still followed (it may be resumed).
//!
//! With `--json`, every event and finally the job are printed as one JSON document per line.

use std::time::Duration;

use clap::Args;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value};
use tuna_core::status::JobStatus;

use super::http::{api_error, Api};
use super::jobs::{error_text, event_line, job_path};
use super::output::{self, is_terminal, job_status};
use super::{ClientOpts, Failure, Result};

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Job id (`ftjob-…`).
    pub id: String,
    /// Seconds between polls (when polling).
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Poll even when the server offers an event stream.
    #[arg(long)]
    pub poll: bool,
}

impl WatchArgs {
    pub fn new(id: String) -> WatchArgs {
        WatchArgs {
            id,
            interval: 1.0,
            poll: false,
        }
    }
}

/// Consecutive failed polls tolerated (e.g. while the server restarts) before giving up.
const MAX_POLL_FAILURES: u32 = 10;

pub async fn run(api: &Api, opts: &ClientOpts, args: &WatchArgs) -> Result<()> {
    if !(args.interval.is_finite() && args.interval > 0.0) {
        return Err(Failure::Usage(
            "--interval must be a positive number".into(),
        ));
    }
    let interval = Duration::from_secs_f64(args.interval.max(0.05));
    let path = job_path(&args.id);
    let mut job = api.get(&path).await?;
    let mut view = View::new(&args.id, opts.json);
    view.job(&job);
    let mut seen = Seen::default();
    let mut streamed = false;
    if !args.poll && !is_terminal(&job) {
        // The recent history first, then the stream from there on.
        for ev in new_events(api, &path, &seen).await? {
            view.event(&ev, &mut seen);
        }
        seen.started = true;
        match follow_stream(api, &path, &mut view, &mut seen).await {
            Ok(Some(j)) => {
                job = j;
                streamed = true;
            }
            Ok(None) => {}
            Err(e) => {
                view.pb.finish_and_clear();
                return Err(e);
            }
        }
    }
    if !streamed {
        job = poll(api, &path, &mut view, &mut seen, interval, job).await?;
    }
    // Events written just before the job ended.
    if let Ok(rest) = new_events(api, &path, &seen).await {
        for ev in rest {
            view.event(&ev, &mut seen);
        }
    }
    view.job(&job);
    view.pb.finish_and_clear();
    finish(api, &path, &view, &job).await
}

/// Which events were printed already.
#[derive(Debug, Default)]
struct Seen {
    /// The newest event printed.
    last: Option<String>,
    /// Whether the first (bounded) look at the history happened.
    started: bool,
}

/// Polls the job and its events until the job ends; returns the final job.
async fn poll(
    api: &Api,
    path: &str,
    view: &mut View,
    seen: &mut Seen,
    interval: Duration,
    mut job: Value,
) -> Result<Value> {
    let mut failures = 0;
    loop {
        let ended = is_terminal(&job);
        match new_events(api, path, seen).await {
            Ok(events) => {
                failures = 0;
                for ev in events {
                    view.event(&ev, seen);
                }
            }
            Err(e) => {
                failures += 1;
                if failures > MAX_POLL_FAILURES {
                    view.pb.finish_and_clear();
                    return Err(e);
                }
            }
        }
        seen.started = true;
        view.job(&job);
        if ended {
            return Ok(job);
        }
        tokio::time::sleep(interval).await;
        match api.get(path).await {
            Ok(j) => {
                failures = 0;
                job = j;
            }
            Err(e) => {
                failures += 1;
                if failures > MAX_POLL_FAILURES {
                    view.pb.finish_and_clear();
                    return Err(e);
                }
            }
        }
    }
}

/// Events newer than `seen.last`, oldest first. The first look returns only the 20 most
/// recent (a long job has thousands).
async fn new_events(api: &Api, path: &str, seen: &Seen) -> Result<Vec<Value>> {
    let events = format!("{path}/events");
    let mut out: Vec<Value> = Vec::new();
    if !seen.started && seen.last.is_none() {
        out = api.list_all(&events, &[], 20, Some(20)).await?;
        out.reverse();
        return Ok(out);
    }
    let mut after: Option<String> = None;
    loop {
        let mut q = vec![("limit".to_string(), "100".to_string())];
        if let Some(a) = &after {
            q.push(("after".into(), a.clone()));
        }
        let page = api.get_query(&events, &q).await?;
        let data = page["data"].as_array().cloned().unwrap_or_default();
        for ev in &data {
            if seen.last.is_some() && ev["id"].as_str() == seen.last.as_deref() {
                out.reverse();
                return Ok(out);
            }
            out.push(ev.clone());
        }
        after = data
            .last()
            .and_then(|e| e["id"].as_str())
            .map(str::to_string);
        if page["has_more"].as_bool() != Some(true) || after.is_none() {
            out.reverse();
            return Ok(out);
        }
    }
}

/// Follows the server-sent event stream. `Ok(None)`: the server has no stream (fall back to
/// polling). `Ok(Some(job))`: the job ended.
async fn follow_stream(
    api: &Api,
    path: &str,
    view: &mut View,
    seen: &mut Seen,
) -> Result<Option<Value>> {
    let mut last_sse_id: Option<String> = seen.last.clone();
    let mut connected = false;
    let mut reconnects = 0u32;
    loop {
        let mut req = api
            .request(Method::GET, &format!("{path}/events/stream"))
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(id) = &last_sse_id {
            req = req.header("Last-Event-ID", id);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if reconnects < MAX_POLL_FAILURES && connected => {
                tracing::debug!(error = %e, "event stream connection failed; retrying");
                reconnects += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(api.transport(e)),
        };
        let status = resp.status();
        if matches!(
            status,
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED
        ) && !connected
        {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(api_error(resp).await);
        }
        let is_sse = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !is_sse {
            return Ok(None);
        }
        connected = true;
        let mut body = resp.bytes_stream();
        let mut buf = String::new();
        let mut check = tokio::time::interval(Duration::from_secs(5));
        check.tick().await;
        let mut done = false;
        loop {
            tokio::select! {
                chunk = body.next() => match chunk {
                    Some(Ok(bytes)) => {
                        buf.push_str(&String::from_utf8_lossy(&bytes));
                        while let Some((message, rest)) = split_message(&buf) {
                            buf = rest;
                            if let Some(sse) = parse_message(&message) {
                                if sse.id.is_some() {
                                    last_sse_id = sse.id.clone();
                                }
                                if sse.data.trim() == "[DONE]" || matches!(sse.event.as_deref(), Some("end" | "done")) {
                                    done = true;
                                    break;
                                }
                                if let Ok(v) = serde_json::from_str::<Value>(&sse.data) {
                                    match v["object"].as_str() {
                                        Some("fine_tuning.job") => view.job(&v),
                                        Some("fine_tuning.job.event") => view.event(&v, seen),
                                        _ => {}
                                    }
                                }
                            }
                        }
                        if done {
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "event stream broke; reconnecting");
                        break;
                    }
                    None => break,
                },
                _ = check.tick() => {
                    if let Ok(j) = api.get(path).await {
                        view.job(&j);
                        if is_terminal(&j) {
                            return Ok(Some(j));
                        }
                    }
                }
            }
        }
        let job = api.get(path).await?;
        view.job(&job);
        if is_terminal(&job) {
            return Ok(Some(job));
        }
        if done || reconnects >= MAX_POLL_FAILURES {
            // The stream ended although the job goes on: poll from here.
            return Ok(None);
        }
        reconnects += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One server-sent event.
#[derive(Debug, Default, PartialEq)]
struct Sse {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

/// Splits the first complete message (ended by a blank line) off `buf`.
fn split_message(buf: &str) -> Option<(String, String)> {
    let normalized_end = buf.find("\n\n").map(|i| (i, 2));
    let crlf_end = buf.find("\r\n\r\n").map(|i| (i, 4));
    let (i, n) = match (normalized_end, crlf_end) {
        (Some(a), Some(b)) => {
            if a.0 <= b.0 {
                a
            } else {
                b
            }
        }
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (None, None) => return None,
    };
    Some((buf[..i].to_string(), buf[i + n..].to_string()))
}

fn parse_message(message: &str) -> Option<Sse> {
    let mut sse = Sse::default();
    let mut data: Vec<&str> = Vec::new();
    for line in message.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => sse.id = Some(value.to_string()),
            "event" => sse.event = Some(value.to_string()),
            "data" => data.push(value),
            _ => {}
        }
    }
    if data.is_empty() && sse.event.is_none() {
        return None;
    }
    sse.data = data.join("\n");
    Some(sse)
}

/// What the watcher shows: the progress bar and the latest numbers.
struct View {
    pb: ProgressBar,
    json: bool,
    status: Option<JobStatus>,
    step: Option<u64>,
    total: Option<u64>,
    loss: Option<f64>,
    tokens_per_second: Option<f64>,
    seconds_left: Option<f64>,
    /// Latest value of every metric seen in metrics events.
    metrics: Map<String, Value>,
}

impl View {
    fn new(id: &str, json: bool) -> View {
        let pb = if json {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(0)
        };
        pb.set_prefix(id.to_string());
        if !pb.is_hidden() {
            pb.enable_steady_tick(Duration::from_millis(200));
        }
        let v = View {
            pb,
            json,
            status: None,
            step: None,
            total: None,
            loss: None,
            tokens_per_second: None,
            seconds_left: None,
            metrics: Map::new(),
        };
        v.style();
        v
    }

    fn style(&self) {
        let template = if self.total.is_some() {
            "{spinner} {prefix} [{bar:30}] {pos}/{len} {msg}"
        } else {
            "{spinner} {prefix} {msg}"
        };
        if let Ok(s) = ProgressStyle::with_template(template) {
            self.pb.set_style(s.progress_chars("=> "));
        }
    }

    fn event(&mut self, ev: &Value, seen: &mut Seen) {
        if let Some(id) = ev["id"].as_str() {
            if seen.last.as_deref() == Some(id) {
                return;
            }
            seen.last = Some(id.to_string());
        }
        if self.json {
            println!("{ev}");
        } else {
            self.pb.suspend(|| println!("{}", event_line(ev)));
        }
        if ev["type"] == "metrics" {
            if let Some(d) = ev["data"].as_object() {
                for (k, v) in d {
                    if v.is_number() {
                        self.metrics.insert(k.clone(), v.clone());
                    }
                }
                let num = |k: &str| d.get(k).and_then(Value::as_f64);
                if let Some(s) = d.get("step").and_then(Value::as_u64) {
                    self.step = Some(s);
                }
                if let Some(t) = d.get("total_steps").and_then(Value::as_u64) {
                    self.total = Some(t);
                }
                self.loss = num("train_loss").or(self.loss);
                // Smoothed: one logging window alone jumps around.
                if let Some(t) = num("tokens_per_second").filter(|t| t.is_finite()) {
                    self.tokens_per_second = Some(match self.tokens_per_second {
                        Some(old) => 0.8 * old + 0.2 * t,
                        None => t,
                    });
                }
                self.seconds_left = num("eta_seconds").or(self.seconds_left);
            }
        }
        self.redraw();
    }

    fn job(&mut self, job: &Value) {
        self.status = job_status(job);
        let p = &job["progress"];
        if let Some(s) = p["step"].as_u64() {
            self.step = Some(s);
        }
        if let Some(t) = p["total_steps"].as_u64() {
            self.total = Some(t);
        }
        if let Some(l) = p["train_loss"].as_f64() {
            self.loss = Some(l);
        }
        if let Some(s) = p["seconds_remaining"].as_f64() {
            self.seconds_left = Some(s);
        }
        self.redraw();
    }

    fn redraw(&self) {
        if let Some(t) = self.total {
            if self.pb.length() != Some(t) {
                self.pb.set_length(t);
                self.style();
            }
        }
        self.pb.set_position(self.step.unwrap_or(0));
        let mut parts: Vec<String> = vec![self.status.map(|s| s.to_string()).unwrap_or_default()];
        if self.total.is_none() {
            if let Some(s) = self.step {
                parts.push(format!("step {s}"));
            }
        }
        if let Some(l) = self.loss {
            parts.push(format!("loss {l:.4}"));
        }
        if let Some(t) = self.tokens_per_second {
            parts.push(format!("{t:.0} tok/s"));
        }
        if self.status == Some(JobStatus::Running) {
            if let Some(s) = self.seconds_left {
                parts.push(format!("{} left", output::duration(s)));
            }
        }
        self.pb.set_message(parts.join(" · "));
    }
}

/// Prints the outcome and the final metrics; the job's end decides the exit code.
async fn finish(api: &Api, path: &str, view: &View, job: &Value) -> Result<()> {
    let id = output::text(&job["id"]);
    let status = output::text(&job["status"]);
    let mut metrics: Map<String, Value> = view
        .metrics
        .iter()
        .filter(|(k, _)| output::is_summary_metric(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let ckpts = api
        .get_query(
            &format!("{path}/checkpoints"),
            &[("limit".to_string(), "1".to_string())],
        )
        .await
        .ok();
    if let Some(m) = ckpts
        .as_ref()
        .and_then(|c| c["data"][0]["metrics"].as_object())
    {
        for (k, v) in m.iter().filter(|(k, _)| output::is_summary_metric(k)) {
            metrics.insert(k.clone(), v.clone());
        }
    }
    if view.json {
        println!("{job}");
    } else {
        let took = match (job["started_at"].as_i64(), job["finished_at"].as_i64()) {
            (Some(s), Some(f)) if f >= s => format!(" in {}", output::duration((f - s) as f64)),
            _ => String::new(),
        };
        println!("job {id} {status}{took}");
        if !job["fine_tuned_model"].is_null() {
            println!(
                "fine-tuned model: {}",
                output::text(&job["fine_tuned_model"])
            );
        }
        if !job["trained_tokens"].is_null() {
            println!("trained tokens: {}", output::text(&job["trained_tokens"]));
        }
        if !metrics.is_empty() {
            println!(
                "final metrics: {}",
                output::metrics_line(&Value::Object(metrics))
            );
        }
    }
    match job_status(job) {
        Some(JobStatus::Succeeded) => Ok(()),
        Some(JobStatus::Failed) => Err(Failure::JobEnded(format!(
            "job {id} failed: {}",
            error_text(&job["error"])
        ))),
        _ => Err(Failure::JobEnded(format!("job {id} was {status}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_messages_are_split_and_parsed() {
        let buf = "id: 3\nevent: event\ndata: {\"a\":\ndata: 1}\n\n: keep-alive\n\nid: 4\r\ndata: [DONE]\r\n\r\npartial";
        let (m1, rest) = split_message(buf).unwrap();
        assert_eq!(
            parse_message(&m1).unwrap(),
            Sse {
                id: Some("3".into()),
                event: Some("event".into()),
                data: "{\"a\":\n1}".into()
            }
        );
        let (m2, rest) = split_message(&rest).unwrap();
        assert_eq!(parse_message(&m2), None);
        let (m3, rest) = split_message(&rest).unwrap();
        assert_eq!(parse_message(&m3).unwrap().data, "[DONE]");
        assert_eq!(rest, "partial");
        assert!(split_message(&rest).is_none());
    }
}
