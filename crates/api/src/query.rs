//! List parameters (`after`, `limit`, `order`, `purpose`, `metadata[k]=v`, and for jobs `status`
//! and `model`) and list envelopes.
//!
//! Lists answer `{"object": "list", "data": [...], "has_more": bool}`; `after` is the id of the
//! last item of the previous page, in the same order. A page is fetched with `limit + 1` rows to
//! know `has_more`.

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use serde::Serialize;
use serde_json::{Map, Value};
use tuna_core::status::JobStatus;
use tuna_db::jobs::MetadataFilter;

use crate::error::ApiError;
use crate::objects::Rendered;

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

    /// `status`: jobs in this state only (tuna extension).
    pub fn status(&self) -> Result<Option<JobStatus>, ApiError> {
        match self.get("status").filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(s) => s.parse().map(Some).map_err(|_| {
                let known: Vec<&str> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
                ApiError::bad_request(
                    format!("`status` must be one of {}, got '{s}'", known.join(", ")),
                    Some("status"),
                )
            }),
        }
    }

    /// `model`: jobs of this model only (tuna extension).
    pub fn model(&self) -> Option<&str> {
        self.get("model").filter(|s| !s.is_empty())
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

/// The first `limit` rows, and whether there were more.
fn split<T>(rows: &[T], limit: i64) -> (&[T], bool) {
    let limit = limit.max(0) as usize;
    (&rows[..rows.len().min(limit)], rows.len() > limit)
}

#[derive(Serialize)]
struct List<'a, T> {
    object: &'static str,
    data: Vec<T>,
    has_more: bool,
    /// Only in lists that carry them (checkpoints); inside, null on an empty page.
    #[serde(skip_serializing_if = "Option::is_none")]
    first_id: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_id: Option<Option<&'a str>>,
}

/// A list envelope from `limit + 1` fetched rows.
pub fn page<'r, T, S: Serialize>(
    rows: &'r [T],
    limit: i64,
    render: impl Fn(&'r T) -> S,
) -> Rendered {
    envelope(rows, limit, render, None::<fn(&'r T) -> &'r str>)
}

/// [`page`] plus `first_id` and `last_id` (null on an empty page), as checkpoint lists have.
pub fn page_with_ids<'r, T, S: Serialize>(
    rows: &'r [T],
    limit: i64,
    render: impl Fn(&'r T) -> S,
    id: impl Fn(&'r T) -> &'r str,
) -> Rendered {
    envelope(rows, limit, render, Some(id))
}

fn envelope<'r, T, S: Serialize>(
    rows: &'r [T],
    limit: i64,
    render: impl Fn(&'r T) -> S,
    id: Option<impl Fn(&'r T) -> &'r str>,
) -> Rendered {
    let (rows, has_more) = split(rows, limit);
    let ids = id.map(|id| (rows.first().map(&id), rows.last().map(&id)));
    Rendered::new(&List {
        object: "list",
        data: rows.iter().map(render).collect(),
        has_more,
        first_id: ids.map(|(first, _)| first),
        last_id: ids.map(|(_, last)| last),
    })
}
