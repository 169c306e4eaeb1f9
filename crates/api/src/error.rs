//! [`ApiError`]: the one error type of the API, answered as OpenAI's
//! `{"error": {"message", "type", "param", "code"}}` with a matching status.
//!
//! Internal causes (database, IO) are logged in the request's span and never sent to the
//! client. Every error but 429 and 503 carries `x-should-retry: false`, so the `openai` SDK
//! does not repeat a request that cannot succeed (it retries 409 and 5xx by default).

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::json;
use tuna_core::spec::SpecError;
use tuna_db::queue::{ControlError, QueueError};
use tuna_db::DbError;
use tuna_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed or names something unusable.
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    /// 401: no key, or not a live key.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: the key may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such object for the caller (another organisation's ids included) or route.
    #[error("{message}")]
    NotFound { message: String, code: &'static str },
    /// 405: the route exists, with other methods.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409: the object's state does not allow the request.
    #[error("{0}")]
    Conflict(String),
    /// 416: the `Range` header asks for bytes past the end of a file of `size` bytes.
    #[error("{message}")]
    RangeNotSatisfiable { message: String, size: u64 },
    /// 413: the body is larger than allowed.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 422: well-formed but semantically unusable.
    #[error("{message}")]
    Unprocessable {
        message: String,
        param: Option<String>,
    },
    /// 429: too many requests.
    #[error("{0}")]
    TooManyRequests(String),
    /// 503: the database (or another dependency) is unreachable; retrying later may work.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// 500: a bug or an unexpected failure; the cause is logged only.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn bad_request_code(
        message: impl Into<String>,
        param: Option<&str>,
        code: &'static str,
    ) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: param.map(str::to_string),
            code: Some(code),
        }
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        ApiError::NotFound {
            message: format!("No {what} found with id '{id}'."),
            code: "not_found",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::Unauthorized(_) => "authentication_error",
            ApiError::Forbidden(_) => "permission_error",
            ApiError::TooManyRequests(_) => "rate_limit_error",
            ApiError::Unavailable(_) | ApiError::Internal(_) => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::BadRequest { code, .. } => *code,
            ApiError::Unauthorized(_) => Some("invalid_api_key"),
            ApiError::Forbidden(_) => Some("insufficient_permissions"),
            ApiError::NotFound { code, .. } => Some(code),
            ApiError::MethodNotAllowed => Some("method_not_allowed"),
            ApiError::Conflict(_) => Some("conflict"),
            ApiError::PayloadTooLarge(_) => Some("payload_too_large"),
            ApiError::RangeNotSatisfiable { .. } => Some("range_not_satisfiable"),
            ApiError::Unprocessable { .. } => Some("unprocessable"),
            ApiError::TooManyRequests(_) => Some("rate_limit_exceeded"),
            ApiError::Unavailable(_) => Some("service_unavailable"),
            ApiError::Internal(_) => Some("internal_error"),
        }
    }

    fn client_message(&self) -> String {
        match self {
            ApiError::Unavailable(_) => {
                "The service is temporarily unavailable (database unreachable); retry later.".into()
            }
            ApiError::Internal(_) => {
                "The server had an error while processing your request.".into()
            }
            ApiError::MethodNotAllowed => "This method is not allowed for this route.".into(),
            other => other.to_string(),
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            ApiError::BadRequest { param, .. } | ApiError::Unprocessable { param, .. } => {
                param.as_deref()
            }
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            ApiError::Internal(cause) => tracing::error!(%cause, "internal error"),
            ApiError::Unavailable(cause) => tracing::warn!(%cause, "dependency unavailable"),
            _ => tracing::debug!(error = %self, status = status.as_u16(), "request rejected"),
        }
        let body = json!({"error": {
            "message": self.client_message(),
            "type": self.kind(),
            "param": self.param(),
            "code": self.code(),
        }});
        let mut resp = (status, Json(body)).into_response();
        if let ApiError::RangeNotSatisfiable { size, .. } = &self {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                resp.headers_mut()
                    .insert(axum::http::header::CONTENT_RANGE, v);
            }
        }
        if !matches!(
            self,
            ApiError::TooManyRequests(_) | ApiError::Unavailable(_)
        ) {
            resp.headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        resp
    }
}

impl From<SpecError> for ApiError {
    fn from(e: SpecError) -> Self {
        ApiError::BadRequest {
            message: e.message,
            param: e.param,
            code: Some("invalid_request_parameter"),
        }
    }
}

/// Connection-level failures are 503; anything else is a 500.
pub fn from_sqlx(e: sqlx::Error) -> ApiError {
    match &e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_) => ApiError::Unavailable(e.to_string()),
        sqlx::Error::Database(db)
            if db
                .code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")) =>
        {
            ApiError::Unavailable(e.to_string())
        }
        _ => ApiError::Internal(e.to_string()),
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        from_sqlx(e)
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Sqlx(e) => from_sqlx(e),
            DbError::Connect { source, .. } => from_sqlx(source),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::Db(e) => from_sqlx(e),
            QueueError::Invalid(m) => ApiError::bad_request(m, None),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::NotFound => ApiError::NotFound {
                message: "No such fine-tuning job.".into(),
                code: "not_found",
            },
            ControlError::Conflict(m) => ApiError::Conflict(m),
            ControlError::Db(e) => from_sqlx(e),
        }
    }
}

/// A missing object is a 404; invalid names are 400s; anything else is a 500 (or 503 when the
/// store cannot be reached).
impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(key) => ApiError::NotFound {
                message: format!("'{key}' was not found in the artifact store."),
                code: "not_found",
            },
            StoreError::InvalidKey { key, reason } => ApiError::bad_request_code(
                format!("invalid file name '{key}': {reason}"),
                Some("path"),
                "invalid_path",
            ),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> Self {
        ApiError::Internal(format!("io: {e}"))
    }
}

/// `Json` whose rejections are [`ApiError`]s (400 malformed, 413 too large).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rej) => Err(json_rejection(rej)),
        }
    }
}

fn json_rejection(rej: JsonRejection) -> ApiError {
    match rej.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::PayloadTooLarge("The request body is too large.".into())
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::bad_request_code(
            "Expected a JSON body with `Content-Type: application/json`.",
            None,
            "invalid_content_type",
        ),
        _ => ApiError::bad_request_code(
            format!(
                "We could not parse the JSON body of your request: {}",
                rej.body_text()
            ),
            None,
            "invalid_json",
        ),
    }
}

/// Fallback for unknown routes.
pub async fn unknown_route(req: Request) -> ApiError {
    ApiError::NotFound {
        message: format!(
            "Unknown request URL: {} {}.",
            req.method(),
            req.uri().path()
        ),
        code: "unknown_url",
    }
}

/// Fallback for a known route with another method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
