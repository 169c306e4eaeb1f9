//! The `models` table: base models registered by an operator (visible to all) and fine-tuned
//! models (owned by an organisation; written by the queue when a job succeeds).

use serde_json::Value;
use sqlx::PgPool;

use crate::rows::ModelRow;
use crate::Result;

/// Registers (or re-registers) a base model at a checkpoint directory. `None` when the id is
/// taken by a fine-tuned model.
pub async fn register_base(
    pool: &PgPool,
    model_id: &str,
    location: &str,
    architecture: &Value,
) -> Result<Option<ModelRow>> {
    Ok(sqlx::query_as(
        "insert into models (model_id, organization_id, kind, location, architecture) values ($1, null, 'base', $2, $3) \
         on conflict (model_id) do update set location = excluded.location, architecture = excluded.architecture \
           where models.kind = 'base' \
         returning *",
    )
    .bind(model_id)
    .bind(location)
    .bind(architecture)
    .fetch_optional(pool)
    .await?)
}

/// Base models and the organisation's fine-tuned models, oldest first.
pub async fn list_models(pool: &PgPool, organization_id: &str) -> Result<Vec<ModelRow>> {
    Ok(sqlx::query_as(
        "select * from models where organization_id is null or organization_id = $1 order by seq",
    )
    .bind(organization_id)
    .fetch_all(pool)
    .await?)
}

/// A model visible to the organisation.
pub async fn get_model(
    pool: &PgPool,
    organization_id: &str,
    model_id: &str,
) -> Result<Option<ModelRow>> {
    Ok(sqlx::query_as("select * from models where model_id = $1 and (organization_id is null or organization_id = $2)")
        .bind(model_id)
        .bind(organization_id)
        .fetch_optional(pool)
        .await?)
}
