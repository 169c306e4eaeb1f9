//! List parameters (`after`, `limit`, `order`, `purpose`, `metadata[k]=v`) and list envelopes.
//!
//! Lists answer `{"object": "list", "data": [...], "has_more": bool}`; `after` is the id of the
//! last item of the previous page, in the same order. A page is fetched with `limit + 1` rows to
//! know `has_more`.

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use serde_json::{json, Map, Value};
use tuna_db::jobs::MetadataFilter;

use crate::error::ApiError;

/// The raw query pairs, with parse failures as [`ApiError`]s.
#[derive(Debug, Clone, Default)]
pub struct ListParams(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for ListParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<Vec<(String, String)>>::from_request_parts(parts, state).await {
            Ok(Query(pairs)) => Ok(ListParams(pairs)),
            Err(e) => Err(ApiError::bad_request_code(
                format!("invalid query string: {}", e.body_text()),
                None,
                "invalid_query",
            )),
        }
    }
}

impl ListParams {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `after`, if given and non-empty.
    pub fn after(&self) -> Option<&str> {
        self.get("after").filter(|s| !s.is_empty())
    }

    /// `limit` in `1..=max`, `default` when absent.
    pub fn limit(&self, default: i64, max: i64) -> Result<i64, ApiError> {
        match self.get("limit") {
            None | Some("") => Ok(default),
            Some(s) => match s.parse::<i64>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(ApiError::bad_request(
                    format!("`limit` must be an integer from 1 to {max}, got '{s}'"),
                    Some("limit"),
                )),
            },
        }
    }

    /// `order`: `asc` or `desc` (default).
    pub fn descending(&self) -> Result<bool, ApiError> {
        match self.get("order") {
            None | Some("") | Some("desc") => Ok(true),
            Some("asc") => Ok(false),
            Some(o) => Err(ApiError::bad_request(
                format!("`order` must be 'asc' or 'desc', got '{o}'"),
                Some("order"),
            )),
        }
    }

    pub fn purpose(&self) -> Option<&str> {
        self.get("purpose").filter(|s| !s.is_empty())
    }

    /// `metadata[k]=v` pairs (all must match), or `metadata=null` (jobs without metadata).
    pub fn metadata(&self) -> Result<MetadataFilter, ApiError> {
        let mut pairs = Map::new();
        for (k, v) in &self.0 {
            if k == "metadata" {
                if v == "null" {
                    return Ok(MetadataFilter::Null);
                }
                return Err(ApiError::bad_request(
                    "use `metadata[key]=value` or `metadata=null`",
                    Some("metadata"),
                ));
            }
            if let Some(key) = k
                .strip_prefix("metadata[")
                .and_then(|r| r.strip_suffix(']'))
            {
                pairs.insert(key.to_string(), Value::String(v.clone()));
            }
        }
        Ok(if pairs.is_empty() {
            MetadataFilter::Any
        } else {
            MetadataFilter::Contains(Value::Object(pairs))
        })
    }
}

/// A list envelope from `limit + 1` fetched rows.
pub fn page<T>(mut rows: Vec<T>, limit: i64, render: impl Fn(&T) -> Value) -> Value {
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit.max(0) as usize);
    json!({"object": "list", "data": rows.iter().map(render).collect::<Vec<_>>(), "has_more": has_more})
}
