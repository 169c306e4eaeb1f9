//! The HTTP side: a keep-alive HTTP/1.1 client, setup (uploading a training file, checking that
//! a job reaches `queued`) and the closed-loop load runner (N clients, each sending its next
//! request as soon as the previous answer arrived, for a fixed duration).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::HeaderValue;
use hyper::Method;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::stats::Summary;
use tuna_core::status::JobStatus;

/// A client of one tuna server (setup requests; the load phases use [`LoadConn`]s).
#[derive(Clone)]
pub struct Api {
    client: reqwest::Client,
    base: String,
    /// `Authorization: Bearer <key>`, or nothing (a server with `--open-access`).
    auth: reqwest::header::HeaderMap,
}

/// One keep-alive HTTP/1.1 connection of a load client, driven through hyper's connection
/// API: no pool, URL parsing, redirect or retry layers between the load loop and the socket,
/// so the client takes less of the CPU it shares with the server. Reconnects after an error.
pub struct LoadConn {
    /// `host:port` of the server.
    addr: String,
    host: HeaderValue,
    auth: Option<HeaderValue>,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl LoadConn {
    fn new(api: &Api) -> anyhow::Result<LoadConn> {
        let addr = api
            .base
            .strip_prefix("http://")
            .context("the load phases need an http:// server URL")?
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        Ok(LoadConn {
            host: HeaderValue::from_str(&addr).context("the server address is not a valid Host")?,
            auth: api.auth.get(reqwest::header::AUTHORIZATION).cloned(),
            addr,
            sender: None,
        })
    }

    async fn connect(&mut self) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = tokio::net::TcpStream::connect(&self.addr)
                .await
                .with_context(|| format!("connecting to {}", self.addr))?;
            stream.set_nodelay(true)?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                // Ends with the connection (closed by either side, or an error already seen
                // by the request that was on it).
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("connected above"))
    }

    /// Sends one request (with the API key, if any) and reads the whole answer.
    async fn send(
        &mut self,
        method: Method,
        path: &str,
        json: Option<&Bytes>,
    ) -> anyhow::Result<(u16, Bytes)> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.host.clone());
        if let Some(auth) = &self.auth {
            req = req.header(hyper::header::AUTHORIZATION, auth.clone());
        }
        let body = match json {
            Some(b) => {
                req = req.header(
                    hyper::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Full::new(b.clone())
            }
            None => Full::new(Bytes::new()),
        };
        let req = req.body(body)?;
        let result = async {
            let sender = self.connect().await?;
            sender.ready().await?;
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, bytes))
        }
        .await;
        if result.is_err() {
            self.sender = None;
        }
        result
    }
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
            let status = job["status"].as_str().and_then(|s| s.parse().ok());
            match status {
                Some(JobStatus::Queued | JobStatus::Running) => return Ok(id),
                Some(JobStatus::ValidatingFiles) if Instant::now() < deadline => {
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
    /// `POST /v1/fine_tuning/jobs` with this JSON body.
    Create(Bytes),
    /// `GET` each of these paths (`/v1/fine_tuning/jobs/{id}`) in turn.
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

/// What a load request needs to know of the created job.
#[derive(Deserialize)]
struct Created {
    id: String,
}

/// One request of a load phase: the status, the created job's id (create), and the body of
/// a failure.
async fn one(
    conn: &mut LoadConn,
    op: &Op,
    i: usize,
) -> anyhow::Result<(u16, Option<String>, Option<Bytes>)> {
    let (status, body) = match op {
        Op::Create(body) => {
            conn.send(Method::POST, "/v1/fine_tuning/jobs", Some(body))
                .await?
        }
        Op::Retrieve(paths) => {
            conn.send(Method::GET, &paths[i % paths.len()], None)
                .await?
        }
        Op::Health => conn.send(Method::GET, "/healthz", None).await?,
    };
    if !(200..300).contains(&status) {
        return Ok((status, None, Some(body)));
    }
    let id = match op {
        Op::Create(_) => Some(
            serde_json::from_slice::<Created>(&body)
                .context("the create answer has no id")?
                .id,
        ),
        _ => None,
    };
    Ok((status, id, None))
}

/// Runs `op` from `concurrency` clients: `warmup` unrecorded, then `duration` recorded.
pub async fn run_load(
    api: &Api,
    op: Op,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    let concurrency = concurrency.max(1);
    let start = Instant::now();
    let record_from = start + warmup;
    let end = record_from + duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for c in 0..concurrency {
        let mut conn = LoadConn::new(api)?;
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
                let result = one(&mut conn, &op, i).await;
                let t1 = Instant::now();
                i += 1;
                // A request counts when it was sent inside the measured window.
                let recorded = t0 >= record_from;
                match result {
                    Ok((status, created, _)) if (200..300).contains(&status) => {
                        if let Some(id) = created {
                            log.created.push(id);
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
                    Ok((status, _, body)) => {
                        if recorded {
                            *log.failures.entry(status).or_default() += 1;
                        }
                        if log.sample_failure.is_none() {
                            let body = body.unwrap_or_default();
                            log.sample_failure =
                                Some(format!("{status}: {}", String::from_utf8_lossy(&body)));
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
    Ok(LoadResult {
        concurrency,
        duration_s: measured,
        ok_per_s: ok as f64 / measured,
        ok,
        failures,
        latency: Summary::of(&mut latencies),
        per_second,
        sample_failure,
        created,
    })
}
