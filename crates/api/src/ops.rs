//! Operations: `/healthz`, `/readyz` (database reachable), Prometheus `/metrics`, and the
//! middleware stack (request ids, tracing span per request, metrics by route and status,
//! panics as 500s, error fallbacks).
//!
//! Metrics (prefix `tuna_`): `tuna_http_requests_total{method,route,status}`,
//! `tuna_http_request_duration_seconds{method,route}` (histogram) and `tuna_jobs{status}`
//! (gauge, refreshed on each scrape).

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderName};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::{json, Value};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tuna_core::status::JobStatus;
use tuna_db::queue;

use crate::error::{self, ApiError, ApiResult};
use crate::routes::Routes;
use crate::AppState;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn routes() -> Routes {
    Routes::new()
        .get("/healthz", healthz)
        .get("/readyz", readyz)
        .get("/metrics", metrics_text)
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(st): State<AppState>) -> ApiResult<Json<Value>> {
    sqlx::query("select 1")
        .execute(&st.db)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(Json(json!({"status": "ready"})))
}

async fn metrics_text(State(st): State<AppState>) -> Response {
    match queue::count_by_status(&st.db).await {
        Ok(counts) => {
            for s in JobStatus::ALL {
                let n = counts.iter().find(|(k, _)| *k == s).map_or(0, |(_, n)| *n);
                metrics::gauge!("tuna_jobs", "status" => s.as_str()).set(n as f64);
            }
        }
        Err(e) => tracing::warn!(error = %e, "counting jobs for /metrics failed"),
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        prometheus().render(),
    )
        .into_response()
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let buckets = [
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("tuna_http_request_duration_seconds".into()),
                &buckets,
            )
            .expect("non-empty buckets");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!(
                "a metrics recorder was already installed; /metrics shows only tuna's own registry"
            );
        }
        metrics::describe_counter!(
            "tuna_http_requests_total",
            "HTTP requests answered, by method, route and status"
        );
        metrics::describe_histogram!(
            "tuna_http_request_duration_seconds",
            metrics::Unit::Seconds,
            "HTTP request latency, by method and route"
        );
        metrics::describe_gauge!("tuna_jobs", "Jobs by status");
        handle
    })
}

/// The matched route of a request, passed from the inner to the outer metrics middleware.
#[derive(Clone)]
struct RouteLabel(String);

async fn label_route(path: MatchedPath, req: Request, next: Next) -> Response {
    let label = RouteLabel(path.as_str().to_string());
    let mut resp = next.run(req).await;
    resp.extensions_mut().insert(label);
    resp
}

/// Rewrites error responses that did not come from [`ApiError`] (rejections of axum's own
/// extractors, such as a malformed path parameter) into the error shape.
async fn normalize_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !status.is_client_error() && !status.is_server_error() || is_json {
        return resp;
    }
    let text = axum::body::to_bytes(resp.into_body(), 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let err = match status.as_u16() {
        401 => ApiError::Unauthorized(message),
        404 => ApiError::NotFound {
            message,
            code: "not_found",
        },
        405 => ApiError::MethodNotAllowed,
        409 => ApiError::Conflict(message),
        413 => ApiError::PayloadTooLarge(message),
        422 => ApiError::Unprocessable {
            message,
            param: None,
        },
        429 => ApiError::TooManyRequests(message),
        503 => ApiError::Unavailable(message),
        400..=499 => ApiError::bad_request(message, None),
        _ => ApiError::Internal(message),
    };
    err.into_response()
}

async fn track(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let resp = next.run(req).await;
    let route = resp
        .extensions()
        .get::<RouteLabel>()
        .map_or_else(|| "unmatched".to_string(), |r| r.0.clone());
    let status = resp.status().as_u16().to_string();
    metrics::counter!("tuna_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("tuna_http_request_duration_seconds", "method" => method, "route" => route)
        .record(start.elapsed().as_secs_f64());
    resp
}

/// One line per answered request, in the request's span (method, path, request id): server
/// errors at `error`, client errors at `info`, the rest at `debug`. Writing a line for every
/// successful request cost about 15 % of the throughput of job creation and retrieval
/// (BENCHMARKS.md, control plane); `RUST_LOG=info,tuna_api::ops=debug` turns them on.
fn access_log(resp: &Response, latency: std::time::Duration, _: &tracing::Span) {
    let status = resp.status().as_u16();
    let ms = latency.as_secs_f64() * 1000.0;
    if status >= 500 {
        tracing::error!(status, latency_ms = ms, "finished processing request");
    } else if status >= 400 {
        tracing::info!(status, latency_ms = ms, "finished processing request");
    } else {
        tracing::debug!(status, latency_ms = ms, "finished processing request");
    }
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::Internal("a handler panicked".into()).into_response()
}

/// Wraps the routes with fallbacks and the middleware stack, and binds the state.
pub fn layers(api: Router<AppState>, state: AppState) -> Router {
    prometheus();
    let trace = TraceLayer::new_for_http()
        .make_span_with(|req: &Request| {
            let request_id = req
                .headers()
                .get(&X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let (method, path) = (req.method(), req.uri().path());
            tracing::info_span!("request", %method, %path, %request_id)
        })
        .on_response(access_log);
    api.route_layer(middleware::from_fn(label_route))
        .fallback(error::unknown_route)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(
                    X_REQUEST_ID.clone(),
                    MakeRequestUuid,
                ))
                .layer(PropagateRequestIdLayer::new(X_REQUEST_ID.clone()))
                .layer(trace)
                .layer(middleware::from_fn(track))
                .layer(middleware::from_fn(normalize_errors))
                .layer(CatchPanicLayer::custom(panic_response)),
        )
        .with_state(state)
}
