//! tuna's HTTP API: OpenAI-compatible `/v1/fine_tuning/jobs` and `/v1/files`, `/v1/models`, and
//! operations endpoints (`/healthz`, `/readyz`, `/metrics`).
//!
//! - `error`: [`error::ApiError`], the one error type, answered in OpenAI's error shape.
//! - `auth`: Bearer API keys ([`auth::Caller`]), open access for local use.
//! - `files`, `jobs`, `models`, `ops`: one module per resource, each with a `router()`.
//! - `artifacts`: downloads of final models and checkpoints from the artifact store (one file
//!   with ranges and ETags, or a whole model as one streamed tar built by `tar`).
//! - `events`: the live event stream (server-sent events) of a job.
//! - `objects`: the JSON objects the API answers (jobs, events, checkpoints, files, models).
//! - `query`: list parameters (`after`, `limit`, `order`, `metadata[k]`) and list envelopes.
//! - `validate`: the check a new job goes through before it is queued.
//! - `limits`: the cap on an organisation's waiting jobs.
//! - `routes`: the router built by method and path, so it lists what it serves ([`api_routes`]);
//!   a test compares that list with `openapi.yaml` both ways. Routes outside the API (the web
//!   dashboard, `tuna-dashboard`) join through [`router_with`] and are not listed.
//!
//! Handlers stay short and call named functions over the pool; only `tuna_db::queue` changes a
//! job's status. The crate never links libtorch.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use tokio_util::sync::CancellationToken;
use tuna_db::PgPool;
use tuna_store::Store;

pub mod artifacts;
pub mod auth;
pub mod error;
pub mod events;
pub mod files;
pub mod fit;
pub mod inputs;
pub mod jobs;
pub mod limits;
pub mod models;
pub mod objects;
pub mod ops;
pub mod query;
pub mod routes;
pub mod tar;
pub mod validate;

/// Server settings the handlers need.
#[derive(Debug, Clone)]
pub struct Config {
    /// Local scratch: uploads are received in `<data_dir>/tmp` before they go to the store.
    pub data_dir: PathBuf,
    /// The artifact store: uploaded and result files (`files/<file_id>`), checkpoints and final
    /// models (`jobs/<job_id>/...`). Shared with the workers.
    pub store: Store,
    /// Requests without a valid key act as the default organisation (loopback only).
    pub open_access: bool,
    /// Accept `file://` dataset URLs.
    pub allow_file_urls: bool,
    /// Largest accepted upload, in bytes.
    pub max_upload_bytes: u64,
    /// Largest accepted JSON body, in bytes.
    pub max_json_bytes: usize,
    /// Most jobs an organisation may have waiting (validating or queued); more answer 429.
    pub max_pending_jobs: i64,
    /// How long a valid API key is remembered without asking the database (see `auth`).
    pub key_cache_ttl: std::time::Duration,
}

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>, store: Store) -> Config {
        Config {
            data_dir: data_dir.into(),
            store,
            open_access: false,
            allow_file_urls: false,
            max_upload_bytes: 512 * 1024 * 1024,
            max_json_bytes: 1024 * 1024,
            max_pending_jobs: 10_000,
            key_cache_ttl: std::time::Duration::from_secs(5),
        }
    }

    /// Where uploads are received before they are put into the store.
    pub fn tmp_dir(&self) -> PathBuf {
        self.data_dir.join("tmp")
    }

    /// The store key of an uploaded (or result) file.
    pub fn file_key(file_id: &str) -> String {
        format!("files/{file_id}")
    }
}

/// What every handler gets.
#[derive(Debug, Clone)]
pub struct AppState {
    pub db: PgPool,
    pub config: Arc<Config>,
    /// Cancelled when the server starts shutting down: long-lived responses (event streams)
    /// end then, so that draining open requests finishes.
    pub shutdown: CancellationToken,
    /// Recently seen valid API keys.
    pub keys: Arc<auth::KeyCache>,
    /// The waiting-jobs cap per organisation.
    pub pending: Arc<limits::PendingGate>,
    /// Connections for the hottest statements (job retrieval and creation), reused without
    /// the pool's ping on release (`tuna_db::direct`).
    pub direct: Arc<tuna_db::direct::Direct>,
    /// Settled model and file rows that new jobs refer to.
    pub inputs: Arc<inputs::InputCache>,
    /// Model configs and worker memory for the create-time memory check.
    pub fit: Arc<fit::FitCache>,
}

impl AppState {
    pub fn new(db: PgPool, config: Config) -> AppState {
        let max = db.options().get_max_connections() as usize;
        AppState {
            direct: Arc::new(tuna_db::direct::Direct::new(&db, max)),
            db,
            config: Arc::new(config),
            shutdown: CancellationToken::new(),
            keys: Arc::default(),
            pending: Arc::default(),
            inputs: Arc::default(),
            fit: Arc::default(),
        }
    }
}

/// Every route of the API, and what the router serves (`(method, path)`, [`routes::Routes`]).
pub fn api_routes(config: &Config) -> routes::Routes {
    files::routes()
        .merge(jobs::routes(config))
        .merge(models::routes())
        .merge(artifacts::routes())
        .merge(events::routes())
        .merge(ops::routes())
}

/// The whole application: resource routers, error fallbacks and the middleware stack.
pub fn router(state: AppState) -> Router {
    router_with(state, Router::new())
}

/// [`router`] plus `pages`: routes that are not part of the API (the web dashboard's pages and
/// files), so neither listed by [`api_routes`] nor in `openapi.yaml`. They get the same
/// middleware (request ids, tracing, metrics, error shape).
pub fn router_with(state: AppState, pages: Router<AppState>) -> Router {
    let api = api_routes(&state.config).into_router().merge(pages);
    ops::layers(api, state)
}

/// Finishes what a previous run left (jobs still validating). Call once at startup.
pub async fn start_background(state: &AppState) -> Result<usize, error::ApiError> {
    validate::sweep(state).await
}

/// Serves `router(state)` on `listener` until `shutdown` resolves, then ends event streams
/// (`state.shutdown`) and drains open requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, Router::new(), shutdown).await
}

/// [`serve`] of [`router_with`]`(state, pages)`.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: AppState,
    pages: Router<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let streams = state.shutdown.clone();
    let shutdown = async move {
        shutdown.await;
        streams.cancel();
    };
    axum::serve(listener, router_with(state, pages))
        .with_graceful_shutdown(shutdown)
        .await
}
