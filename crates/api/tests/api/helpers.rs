//! `spawn_app()`: a server on 127.0.0.1:0 over a fresh database, with an admin key for the
//! default organisation, a key for a second organisation, and the fixture GPT-2 registered as
//! base model `gpt2`.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::{Client, Method, RequestBuilder, Response};
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tuna_api::{AppState, Config};
use tuna_db::keys;
use tuna_db::testing::TestDb;
use tuna_store::Store;

pub struct TestApp {
    pub base: String,
    pub client: Client,
    /// Admin key of the default organisation.
    pub key: String,
    /// Key of another organisation.
    pub other_key: String,
    pub db: TestDb,
    pub state: AppState,
    pub _dir: TempDir,
    stop: Option<oneshot::Sender<()>>,
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../.fixtures")
        .join(name)
}

pub async fn spawn_app() -> TestApp {
    spawn_with(|_| {}).await
}

pub async fn spawn_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::local(dir.path().join("artifacts")).expect("local store");
    spawn_in(dir, store, tweak).await
}

/// A server whose artifact store is `store` (local or S3).
pub async fn spawn_in(dir: TempDir, store: Store, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let db = TestDb::new().await.expect("test database");
    let mut config = Config::new(dir.path(), store);
    tweak(&mut config);
    keys::ensure_default_org(&db.pool).await.unwrap();
    let key = keys::create_key(&db.pool, keys::DEFAULT_ORG, "admin", true)
        .await
        .unwrap()
        .secret;
    let other_org = keys::create_org(&db.pool, "other").await.unwrap();
    let other_key = keys::create_key(&db.pool, &other_org, "other", false)
        .await
        .unwrap()
        .secret;
    tuna_api::models::register_base_model(&db.pool, "gpt2", &fixture("gpt2"))
        .await
        .expect("register gpt2");
    let state = AppState::new(db.pool.clone(), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let served = state.clone();
    tokio::spawn(async move {
        let _ = tuna_api::serve(listener, served, async move {
            let _ = stopped.await;
        })
        .await;
    });
    TestApp {
        base,
        client: Client::new(),
        key,
        other_key,
        db,
        state,
        _dir: dir,
        stop: Some(stop),
    }
}

impl TestApp {
    /// Starts the server's graceful shutdown.
    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub fn req(&self, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }

    pub fn req_as(&self, key: &str, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(key)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.req(Method::GET, path).send().await.unwrap()
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.req(Method::POST, path)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn upload(&self, key: &str, name: &str, bytes: Vec<u8>, purpose: &str) -> Response {
        let form = reqwest::multipart::Form::new()
            .text("purpose", purpose.to_string())
            .part(
                "file",
                reqwest::multipart::Part::bytes(bytes).file_name(name.to_string()),
            );
        self.req_as(key, Method::POST, "/v1/files")
            .multipart(form)
            .send()
            .await
            .unwrap()
    }

    /// Uploads a valid file and returns its id.
    pub async fn upload_ok(&self, name: &str, text: &str) -> String {
        let resp = self
            .upload(&self.key, name, text.as_bytes().to_vec(), "fine-tune")
            .await;
        let (status, body) = json(resp).await;
        assert_eq!(status, 200, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    /// Polls a job until it leaves `validating_files`.
    pub async fn wait_validated(&self, job_id: &str) -> Value {
        for _ in 0..100 {
            let (_, job) = json(self.get(&format!("/v1/fine_tuning/jobs/{job_id}")).await).await;
            if job["status"] != "validating_files" {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("job {job_id} stayed in validating_files");
    }
}

/// `POST /v1/fine_tuning/jobs` that must answer 200: the job object.
pub async fn create(app: &TestApp, body: Value) -> Value {
    let (status, job) = json(app.post_json("/v1/fine_tuning/jobs", &body).await).await;
    assert_eq!(status, 200, "{job}");
    job
}

pub async fn json(resp: Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let value =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, value)
}

/// Asserts OpenAI's error shape and returns `error`.
pub fn error_of(body: &Value) -> &Value {
    let e = &body["error"];
    for k in ["message", "type", "param", "code"] {
        assert!(e.get(k).is_some(), "error lacks `{k}`: {body}");
    }
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    e
}

pub const CHAT: &str = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
"#;

pub const LABELED: &str =
    "{\"text\": \"great\", \"label\": \"pos\"}\n{\"text\": \"awful\", \"label\": \"neg\"}\n";
