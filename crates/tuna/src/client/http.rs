//! Requests to the tuna server: base URL, Bearer key, JSON bodies, and the API's error shape
//! (`{"error": {"message", "type", "param", "code"}}`) turned into [`Failure::Api`].

use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;

use super::{ClientOpts, Failure, Result};

/// How long a JSON request may take (uploads, downloads and streams have no overall limit).
const JSON_TIMEOUT: Duration = Duration::from_secs(120);

/// A connection to one tuna server.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Api {
    /// The server and key of `opts` (key: `--api-key`, else `<data-dir>/admin_key` if present).
    pub fn new(opts: &ClientOpts) -> Result<Api> {
        let base = normalize_base(&opts.url)?;
        let key = match opts.api_key.as_deref().map(str::trim) {
            Some(k) if !k.is_empty() => Some(k.to_string()),
            _ => read_key_file(&opts.data_dir.join("admin_key"))?,
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("tuna-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Failure::Api(format!("setting up the HTTP client: {e}")))?;
        Ok(Api { http, base, key })
    }

    /// A request to `path` (which starts with `/`), with the key when there is one.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let b = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(k) => b.bearer_auth(k),
            None => b,
        }
    }

    /// Sends a request; a non-2xx answer becomes [`Failure::Api`] with the API's message.
    pub async fn send(&self, req: RequestBuilder) -> Result<Response> {
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(api_error(resp).await)
        }
    }

    /// Sends a request and reads its JSON answer.
    pub async fn json(&self, req: RequestBuilder) -> Result<Value> {
        let resp = self.send(req.timeout(JSON_TIMEOUT)).await?;
        resp.json::<Value>()
            .await
            .map_err(|e| Failure::Api(format!("the server's answer is not JSON: {e}")))
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.json(self.request(Method::GET, path)).await
    }

    pub async fn get_query(&self, path: &str, query: &[(String, String)]) -> Result<Value> {
        self.json(self.request(Method::GET, path).query(query))
            .await
    }

    pub async fn post(&self, path: &str, body: Option<&Value>) -> Result<Value> {
        let req = self.request(Method::POST, path);
        let req = match body {
            Some(b) => req.json(b),
            None => req,
        };
        self.json(req).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value> {
        self.json(self.request(Method::DELETE, path)).await
    }

    /// Describes a failure to reach the server.
    pub fn transport(&self, e: reqwest::Error) -> Failure {
        if e.is_connect() {
            Failure::Api(format!(
                "cannot reach the tuna server at {}: {}; start one with `tuna serve` or point --url / TUNA_URL at it",
                self.base,
                root_cause(&e)
            ))
        } else if e.is_timeout() {
            Failure::Api(format!(
                "the tuna server at {} did not answer in time",
                self.base
            ))
        } else {
            Failure::Api(format!(
                "request to {} failed: {}",
                self.base,
                root_cause(&e)
            ))
        }
    }

    /// Every item of a list endpoint, following `has_more` / `after` (at most `max` items).
    pub async fn list_all(
        &self,
        path: &str,
        query: &[(String, String)],
        page_size: u32,
        max: Option<usize>,
    ) -> Result<Vec<Value>> {
        let mut items: Vec<Value> = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut q = query.to_vec();
            q.push(("limit".into(), page_size.to_string()));
            if let Some(a) = &after {
                q.push(("after".into(), a.clone()));
            }
            let page = self.get_query(path, &q).await?;
            let data = page["data"].as_array().cloned().unwrap_or_default();
            let has_more = page["has_more"].as_bool().unwrap_or(false);
            after = data
                .last()
                .and_then(|v| v["id"].as_str())
                .map(str::to_string);
            items.extend(data);
            if let Some(m) = max {
                if items.len() >= m {
                    items.truncate(m);
                    return Ok(items);
                }
            }
            if !has_more || after.is_none() {
                return Ok(items);
            }
        }
    }
}

/// The innermost error message (reqwest's own text is often just "error sending request").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

fn normalize_base(url: &str) -> Result<String> {
    let trimmed = url.trim().trim_end_matches('/');
    let trimmed = trimmed.strip_suffix("/v1").unwrap_or(trimmed);
    let parsed = reqwest::Url::parse(trimmed)
        .map_err(|e| Failure::Usage(format!("--url '{url}' is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(Failure::Usage(format!(
            "--url '{url}' must start with http:// or https://"
        )));
    }
    Ok(trimmed.to_string())
}

fn read_key_file(path: &std::path::Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string()).filter(|s| !s.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Failure::Usage(format!(
            "cannot read the API key from {}: {e}",
            path.display()
        ))),
    }
}

/// A non-2xx answer as [`Failure::Api`]: the API's message, the status and the error code.
pub async fn api_error(resp: Response) -> Failure {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    Failure::Api(describe_error(status, &text))
}

fn describe_error(status: StatusCode, body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let err = parsed.as_ref().map(|v| &v["error"]);
    let message = err
        .and_then(|e| e["message"].as_str().or_else(|| e.as_str()))
        .map(str::to_string)
        .unwrap_or_else(|| {
            let t = body.trim();
            if t.is_empty() {
                status.canonical_reason().unwrap_or("error").to_string()
            } else {
                t.chars().take(500).collect()
            }
        });
    let mut detail = format!("HTTP {}", status.as_u16());
    if let Some(code) = err.and_then(|e| e["code"].as_str()) {
        detail.push_str(&format!(", {code}"));
    }
    if let Some(param) = err.and_then(|e| e["param"].as_str()) {
        detail.push_str(&format!(", param {param}"));
    }
    let hint = if status == StatusCode::UNAUTHORIZED {
        "; pass --api-key or set TUNA_API_KEY (tuna serve writes an admin key to <data-dir>/admin_key)"
    } else {
        ""
    };
    format!("{message} ({detail}){hint}")
}

/// A path segment, percent-encoded (ids are plain, but user input may not be).
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_normalized() {
        assert_eq!(
            normalize_base("http://h:1/v1/").unwrap(),
            "http://h:1".to_string()
        );
        assert_eq!(normalize_base("https://h").unwrap(), "https://h");
        assert!(matches!(normalize_base("ftp://h"), Err(Failure::Usage(_))));
        assert!(matches!(
            normalize_base("not a url"),
            Err(Failure::Usage(_))
        ));
    }

    #[test]
    fn api_errors_show_message_status_and_code() {
        let body = r#"{"error":{"message":"No file found with id 'x'.","type":"invalid_request_error","param":null,"code":"not_found"}}"#;
        assert_eq!(
            describe_error(StatusCode::NOT_FOUND, body),
            "No file found with id 'x'. (HTTP 404, not_found)"
        );
        assert_eq!(
            describe_error(StatusCode::BAD_GATEWAY, ""),
            "Bad Gateway (HTTP 502)"
        );
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(seg("ftjob-abc_1"), "ftjob-abc_1");
        assert_eq!(seg("a/b c"), "a%2Fb%20c");
    }
}
