//! API keys as Bearer tokens. [`Caller`] extracts the organisation a request acts for.
//!
//! With `open_access` (allowed only on loopback), a request without a valid key acts as the
//! default organisation with admin rights; a valid key still selects its own organisation.

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
            if let Some(owner) = keys::authenticate(&state.db, token).await? {
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
