//! API keys as Bearer tokens. [`Caller`] extracts the organisation a request acts for.
//!
//! With `open_access` (allowed only on loopback), a request without a valid key acts as the
//! default organisation with admin rights; a valid key still selects its own organisation.
//!
//! [`KeyCache`] remembers valid keys for `Config::key_cache_ttl` (5 s by default), so that most
//! requests need no key lookup in the database: a revoked key keeps working for at most that
//! long on a server that saw it just before. Unknown or revoked keys are never cached.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use tuna_db::keys;

use crate::error::ApiError;
use crate::AppState;

/// The authenticated organisation of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub organization_id: String,
    pub is_admin: bool,
}

impl Caller {
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin {
            Ok(())
        } else {
            Err(ApiError::Forbidden(
                "This request needs an admin API key.".into(),
            ))
        }
    }
}

/// Valid keys seen recently, by the sha256 of their secret.
#[derive(Debug, Default)]
pub struct KeyCache {
    keys: RwLock<HashMap<String, (keys::KeyOwner, Instant)>>,
}

/// Cached keys beyond this are dropped all at once (a bound on memory, not an eviction policy).
const MAX_CACHED_KEYS: usize = 10_000;

impl KeyCache {
    /// The owner of a valid key: from the cache while it is younger than `ttl`, else from the
    /// database (which also records the key's use).
    pub async fn authenticate(
        &self,
        db: &tuna_db::PgPool,
        secret: &str,
        ttl: Duration,
    ) -> Result<Option<keys::KeyOwner>, ApiError> {
        let hash = keys::hash_secret(secret);
        if let Some((owner, at)) = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&hash)
        {
            if at.elapsed() < ttl {
                return Ok(Some(owner.clone()));
            }
        }
        let owner = keys::authenticate(db, &hash).await?;
        let mut cache = self.keys.write().unwrap_or_else(|e| e.into_inner());
        match &owner {
            Some(owner) if !ttl.is_zero() => {
                if cache.len() >= MAX_CACHED_KEYS {
                    cache.clear();
                }
                cache.insert(hash, (owner.clone(), Instant::now()));
            }
            _ => {
                cache.remove(&hash);
            }
        }
        Ok(owner)
    }
}

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts);
        if let Some(token) = token {
            let ttl = state.config.key_cache_ttl;
            if let Some(owner) = state.keys.authenticate(&state.db, token, ttl).await? {
                return Ok(Caller {
                    organization_id: owner.organization_id,
                    is_admin: owner.is_admin,
                });
            }
        }
        if state.config.open_access {
            return Ok(Caller {
                organization_id: keys::DEFAULT_ORG.to_string(),
                is_admin: true,
            });
        }
        Err(ApiError::Unauthorized(match token {
            Some(_) => "Incorrect API key provided.".into(),
            None => {
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.".into()
            }
        }))
    }
}
