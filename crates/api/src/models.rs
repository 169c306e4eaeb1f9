//! `/v1/models`: base models registered on the server plus the caller's fine-tuned models, and
//! an admin-only `POST /v1/models {id, path}` that registers a Hugging Face checkpoint directory.

use std::path::Path as FsPath;

use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tuna_core::hf_config::HfConfig;
use tuna_db::models as db;
use tuna_db::rows::ModelRow;
use tuna_db::PgPool;

use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ApiResult};
use crate::routes::Routes;
use crate::{objects, AppState};

pub fn routes() -> Routes {
    Routes::new()
        .get("/v1/models", list)
        .post("/v1/models", register)
        .get("/v1/models/{model}", retrieve)
}

async fn list(State(st): State<AppState>, caller: Caller) -> ApiResult<Json<Value>> {
    let rows = db::list_models(&st.db, &caller.organization_id).await?;
    Ok(Json(
        json!({"object": "list", "data": rows.iter().map(objects::model).collect::<Vec<_>>()}),
    ))
}

async fn retrieve(
    State(st): State<AppState>,
    caller: Caller,
    Path(model): Path<String>,
) -> ApiResult<Json<Value>> {
    let row = db::get_model(&st.db, &caller.organization_id, &model)
        .await?
        .ok_or_else(|| ApiError::NotFound {
            message: format!("The model '{model}' does not exist."),
            code: "model_not_found",
        })?;
    Ok(Json(objects::model(&row)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    id: String,
    path: String,
}

async fn register(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    let body: RegisterBody = serde_json::from_value(body).map_err(|e| {
        ApiError::bad_request(
            format!("expected {{\"id\": string, \"path\": string}}: {e}"),
            None,
        )
    })?;
    let row = register_base_model(&st.db, &body.id, FsPath::new(&body.path)).await?;
    Ok(Json(objects::model(&row)))
}

/// Reads `<dir>/config.json`, checks the architecture is supported and registers the model.
/// Shared with `tuna models register`.
pub async fn register_base_model(pool: &PgPool, id: &str, dir: &FsPath) -> ApiResult<ModelRow> {
    if id.trim().is_empty() || id.len() > 256 || id.chars().any(char::is_whitespace) {
        return Err(ApiError::bad_request(
            "`id` must be 1 to 256 characters without spaces",
            Some("id"),
        ));
    }
    let dir = tokio::fs::canonicalize(dir).await.map_err(|e| {
        ApiError::bad_request(
            format!("cannot open '{}': {e}", dir.display()),
            Some("path"),
        )
    })?;
    let text = tokio::fs::read_to_string(dir.join("config.json"))
        .await
        .map_err(|e| {
            ApiError::bad_request(
                format!("cannot read {}/config.json: {e}", dir.display()),
                Some("path"),
            )
        })?;
    let config = HfConfig::parse(&text).map_err(|e| ApiError::Unprocessable {
        message: format!("{}/config.json cannot be used: {e}", dir.display()),
        param: Some("path".into()),
    })?;
    // The description, and which methods fit which GPU sizes (`tuna_core::memory::fits_table`).
    let mut architecture =
        serde_json::to_value(config.describe()).map_err(|e| ApiError::Internal(e.to_string()))?;
    architecture["memory"] = serde_json::to_value(tuna_core::memory::fits_table(&config))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    db::register_base(pool, id, &dir.to_string_lossy(), &architecture)
        .await?
        .ok_or_else(|| {
            ApiError::Conflict(format!("'{id}' is already the name of a fine-tuned model"))
        })
}
