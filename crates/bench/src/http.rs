//! The HTTP side: a keep-alive HTTP/1.1 client, setup (uploading a training file, checking that
//! a job reaches `queued`) and the closed-loop load runner (N clients, each sending its next
//! request as soon as the previous answer arrived, for a fixed duration).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

use crate::stats::Summary;

/// A client of one tuna server.
#[derive(Clone)]
pub struct Api {
    client: reqwest::Client,
    base: String,
    /// `Authorization: Bearer <key>`, or nothing (a server with `--open-access`).
    auth: reqwest::header::HeaderMap,
}

/// What one request did.
pub struct Answer {
    pub status: u16,
    pub body: Option<Value>,
}

impl Api {
    /// `pool` is the number of idle keep-alive connections kept per host (>= the concurrency).
    pub fn new(base: &str, api_key: &str, pool: usize) -> anyhow::Result<Api> {
        let client = reqwest::Client::builder()
            .http1_only()
            .pool_max_idle_per_host(pool)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(30))
            .build()
            .context("building the HTTP client")?;
        let mut auth = reqwest::header::HeaderMap::new();
        if !api_key.is_empty() {
            let value = format!("Bearer {api_key}")
                .parse()
                .context("the API key is not a valid header value")?;
            auth.insert(reqwest::header::AUTHORIZATION, value);
        }
        Ok(Api {
            client,
            base: base.trim_end_matches('/').to_string(),
            auth,
        })
    }

    async fn answer(resp: reqwest::Response, keep_body: bool) -> anyhow::Result<Answer> {
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.context("reading the response body")?;
        let body = if keep_body || status >= 400 {
            serde_json::from_slice(&bytes).ok()
        } else {
            None
        };
        Ok(Answer { status, body })
    }

    /// `POST /v1/fine_tuning/jobs`.
    pub async fn create_job(&self, body: &Value) -> anyhow::Result<Answer> {
        let resp = self
            .client
            .post(format!("{}/v1/fine_tuning/jobs", self.base))
            .headers(self.auth.clone())
            .json(body)
            .send()
            .await?;
        Self::answer(resp, true).await
    }

    /// `GET /v1/fine_tuning/jobs/{id}` (body read but not parsed unless an error).
    pub async fn retrieve_job(&self, job_id: &str) -> anyhow::Result<Answer> {
        let resp = self
            .client
            .get(format!("{}/v1/fine_tuning/jobs/{job_id}", self.base))
            .headers(self.auth.clone())
            .send()
            .await?;
        Self::answer(resp, false).await
    }

    pub async fn health(&self) -> anyhow::Result<Answer> {
        let resp = self
            .client
            .get(format!("{}/healthz", self.base))
            .send()
            .await?;
        Self::answer(resp, false).await
    }

    async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self
            .client
            .get(format!("{}{path}", self.base))
            .headers(self.auth.clone())
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = resp.status();
        let body: Value = resp.json().await.with_context(|| format!("GET {path}"))?;
        if !status.is_success() {
            bail!("GET {path} answered {status}: {body}");
        }
        Ok(body)
    }

    /// Uploads a small chat-format JSONL file (purpose `fine-tune`) and waits until it is
    /// processed; returns its id.
    pub async fn upload_training_file(&self) -> anyhow::Result<String> {
        let mut jsonl = String::new();
        for i in 0..32 {
            let line = json!({"messages": [
                {"role": "user", "content": format!("What is {i} plus {i}?")},
                {"role": "assistant", "content": format!("{}", 2 * i)},
            ]});
            jsonl.push_str(&line.to_string());
            jsonl.push('\n');
        }
        let part = reqwest::multipart::Part::bytes(jsonl.into_bytes())
            .file_name("bench.jsonl")
            .mime_str("application/jsonl")?;
        let form = reqwest::multipart::Form::new()
            .text("purpose", "fine-tune")
            .part("file", part);
        let resp = self
            .client
            .post(format!("{}/v1/files", self.base))
            .headers(self.auth.clone())
            .multipart(form)
            .send()
            .await
            .context("uploading the training file")?;
        let status = resp.status();
        let body: Value = resp.json().await.context("reading the upload answer")?;
        if !status.is_success() {
            bail!("uploading the training file answered {status}: {body}");
        }
        let id = body["id"]
            .as_str()
            .context("the upload answer has no id")?
            .to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let file = self.get_json(&format!("/v1/files/{id}")).await?;
            match file["status"].as_str() {
                Some("processed") => return Ok(id),
                Some("error") => bail!("the training file was rejected: {file}"),
                _ if Instant::now() > deadline => {
                    bail!("the training file is not processed after 30 s: {file}")
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Creates one job and waits until it leaves `validating_files`; fails unless it is
    /// claimable (`queued`, or already `running`).
    pub async fn probe_job(&self, body: &Value) -> anyhow::Result<String> {
        let a = self.create_job(body).await?;
        let job = a.body.unwrap_or(Value::Null);
        if a.status != 200 {
            bail!("creating a job answered {}: {job}", a.status);
        }
        let id = job["id"]
            .as_str()
            .context("the create answer has no id")?
            .to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let job = self.get_json(&format!("/v1/fine_tuning/jobs/{id}")).await?;
            match job["status"].as_str() {
                Some("queued") | Some("running") => return Ok(id),
                Some("validating_files") if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                _ => bail!(
                    "the probe job did not become claimable (is the model registered?): {job}"
                ),
            }
        }
    }
}

/// Which request a load phase sends.
#[derive(Clone)]
pub enum Op {
    /// `POST /v1/fine_tuning/jobs` with this body.
    Create(Arc<Value>),
    /// `GET /v1/fine_tuning/jobs/{id}`, cycling through these ids.
    Retrieve(Arc<Vec<String>>),
    /// `GET /healthz`: no key, no database; what the HTTP stack and the client alone reach.
    Health,
}

/// Result of a load phase.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    pub concurrency: usize,
    pub duration_s: f64,
    /// Successful (2xx) requests per second over the measured duration.
    pub ok_per_s: f64,
    pub ok: usize,
    /// Non-2xx answers by status, and transport errors (status 0).
    pub failures: BTreeMap<u16, usize>,
    /// Latency of successful requests.
    pub latency: Summary,
    /// Successful requests finished in each second of the measured window (shows whether the
    /// rate holds as the tables grow).
    pub per_second: Vec<usize>,
    /// A sample failure body, if any.
    pub sample_failure: Option<String>,
    /// Ids of created jobs (create phase only; not serialised).
    #[serde(skip)]
    pub created: Vec<String>,
}

struct ClientLog {
    latencies: Vec<Duration>,
    per_second: Vec<usize>,
    failures: BTreeMap<u16, usize>,
    sample_failure: Option<String>,
    created: Vec<String>,
}

async fn one(api: &Api, op: &Op, i: usize) -> anyhow::Result<Answer> {
    match op {
        Op::Create(body) => api.create_job(body).await,
        Op::Retrieve(ids) => api.retrieve_job(&ids[i % ids.len()]).await,
        Op::Health => api.health().await,
    }
}

/// Runs `op` from `concurrency` clients: `warmup` unrecorded, then `duration` recorded.
pub async fn run_load(
    api: &Api,
    op: Op,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> LoadResult {
    let concurrency = concurrency.max(1);
    let start = Instant::now();
    let record_from = start + warmup;
    let end = record_from + duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for c in 0..concurrency {
        let api = api.clone();
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut log = ClientLog {
                latencies: Vec::with_capacity(1 << 14),
                per_second: Vec::new(),
                failures: BTreeMap::new(),
                sample_failure: None,
                created: Vec::new(),
            };
            let mut i = c * 7919;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let result = one(&api, &op, i).await;
                let t1 = Instant::now();
                i += 1;
                // A request counts when it was sent inside the measured window.
                let recorded = t0 >= record_from;
                match result {
                    Ok(a) if (200..300).contains(&a.status) => {
                        if let Some(id) = a.body.as_ref().and_then(|b| b["id"].as_str()) {
                            log.created.push(id.to_string());
                        }
                        if recorded {
                            log.latencies.push(t1 - t0);
                            let sec = (t1 - record_from).as_secs() as usize;
                            if log.per_second.len() <= sec {
                                log.per_second.resize(sec + 1, 0);
                            }
                            log.per_second[sec] += 1;
                        }
                    }
                    Ok(a) => {
                        if recorded {
                            *log.failures.entry(a.status).or_default() += 1;
                        }
                        if log.sample_failure.is_none() {
                            log.sample_failure =
                                Some(format!("{}: {}", a.status, a.body.unwrap_or(Value::Null)));
                        }
                    }
                    Err(e) => {
                        if recorded {
                            *log.failures.entry(0).or_default() += 1;
                        }
                        if log.sample_failure.is_none() {
                            log.sample_failure = Some(format!("transport error: {e:#}"));
                        }
                    }
                }
            }
            log
        }));
    }
    let mut latencies = Vec::new();
    let mut per_second: Vec<usize> = Vec::new();
    let mut failures = BTreeMap::new();
    let mut sample_failure = None;
    let mut created = Vec::new();
    for t in tasks {
        match t.await {
            Ok(log) => {
                latencies.extend(log.latencies);
                if per_second.len() < log.per_second.len() {
                    per_second.resize(log.per_second.len(), 0);
                }
                for (i, n) in log.per_second.into_iter().enumerate() {
                    per_second[i] += n;
                }
                for (k, v) in log.failures {
                    *failures.entry(k).or_default() += v;
                }
                sample_failure = sample_failure.or(log.sample_failure);
                created.extend(log.created);
            }
            Err(e) => sample_failure = Some(format!("a client task failed: {e}")),
        }
    }
    // Requests sent just before `end` finish after it; measure over the real span.
    let measured = (Instant::now().max(end) - record_from).as_secs_f64();
    let ok = latencies.len();
    LoadResult {
        concurrency,
        duration_s: measured,
        ok_per_s: ok as f64 / measured,
        ok,
        failures,
        latency: Summary::of(&mut latencies),
        per_second,
        sample_failure,
        created,
    }
}
