//! Organisations and API keys. Secrets (`tuna-sk-…`) are shown once and stored as sha256 hashes.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tuna_core::ids;

use crate::Result;

/// The organisation that open-access requests and the first admin key belong to.
pub const DEFAULT_ORG: &str = "org-default";

/// An API key as listed (never the secret).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKeyRow {
    pub api_key_id: String,
    pub organization_id: String,
    pub name: String,
    pub key_prefix: String,
    pub is_admin: bool,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Who a valid key belongs to.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct KeyOwner {
    pub api_key_id: String,
    pub organization_id: String,
    pub is_admin: bool,
}

/// A freshly created key: the row and the secret, which is not stored anywhere.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub row: ApiKeyRow,
    pub secret: String,
}

/// Hex sha256 of a secret, as stored in `api_keys.key_hash`.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Creates the default organisation if it does not exist.
pub async fn ensure_default_org(pool: &PgPool) -> Result<()> {
    sqlx::query("insert into organizations (organization_id, name) values ($1, 'default') on conflict do nothing")
        .bind(DEFAULT_ORG)
        .execute(pool)
        .await?;
    Ok(())
}

/// Creates an organisation and returns its id.
pub async fn create_org(pool: &PgPool, name: &str) -> Result<String> {
    let id = ids::new_id(ids::ORG);
    sqlx::query("insert into organizations (organization_id, name) values ($1, $2)")
        .bind(&id)
        .bind(name)
        .execute(pool)
        .await?;
    Ok(id)
}

/// The id of the organisation named `name`, if any (oldest first when several share it).
pub async fn org_by_name(pool: &PgPool, name: &str) -> Result<Option<String>> {
    Ok(sqlx::query_scalar("select organization_id from organizations where name = $1 or organization_id = $1 order by created_at limit 1")
        .bind(name)
        .fetch_optional(pool)
        .await?)
}

/// Creates a key for an existing organisation.
pub async fn create_key(
    pool: &PgPool,
    organization_id: &str,
    name: &str,
    is_admin: bool,
) -> Result<NewKey> {
    let secret = ids::new_secret();
    let row: ApiKeyRow = sqlx::query_as(
        "insert into api_keys (api_key_id, organization_id, name, key_hash, key_prefix, is_admin) \
         values ($1, $2, $3, $4, $5, $6) \
         returning api_key_id, organization_id, name, key_prefix, is_admin, created_at, last_used_at, revoked_at",
    )
    .bind(ids::new_id(ids::API_KEY))
    .bind(organization_id)
    .bind(name)
    .bind(hash_secret(&secret))
    .bind(&secret[..12])
    .bind(is_admin)
    .fetch_one(pool)
    .await?;
    Ok(NewKey { row, secret })
}

/// The owner of a secret (given by its hash), if it is a live key; records its use.
///
/// `last_used_at` is refreshed at most once a minute: writing it on every request made all
/// requests with one key queue on that row's lock (see BENCHMARKS.md, control plane).
/// `key_hash` is [`hash_secret`] of the presented secret.
pub async fn authenticate(pool: &PgPool, key_hash: &str) -> Result<Option<KeyOwner>> {
    Ok(sqlx::query_as(
        "with k as (select api_key_id, organization_id, is_admin, last_used_at from api_keys \
                    where key_hash = $1 and revoked_at is null), \
              touched as (update api_keys a set last_used_at = now() from k \
                    where a.api_key_id = k.api_key_id \
                      and (k.last_used_at is null or k.last_used_at < now() - interval '60 seconds') \
                    returning 1) \
         select api_key_id, organization_id, is_admin from k",
    )
    .bind(key_hash)
    .fetch_optional(pool)
    .await?)
}

/// Every key, oldest first.
pub async fn list_keys(pool: &PgPool) -> Result<Vec<ApiKeyRow>> {
    Ok(sqlx::query_as(
        "select api_key_id, organization_id, name, key_prefix, is_admin, created_at, last_used_at, revoked_at \
         from api_keys order by created_at, api_key_id",
    )
    .fetch_all(pool)
    .await?)
}

/// Number of live admin keys.
pub async fn count_admin_keys(pool: &PgPool) -> Result<i64> {
    Ok(
        sqlx::query_scalar("select count(*) from api_keys where is_admin and revoked_at is null")
            .fetch_one(pool)
            .await?,
    )
}

/// Revokes a key; false when there is no live key with that id.
pub async fn revoke_key(pool: &PgPool, api_key_id: &str) -> Result<bool> {
    let done = sqlx::query(
        "update api_keys set revoked_at = now() where api_key_id = $1 and revoked_at is null",
    )
    .bind(api_key_id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}
