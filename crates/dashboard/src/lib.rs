//! tuna's web dashboard: a single-page app (`web/`: Preact, uPlot, TypeScript, built by esbuild
//! into `web/dist`) embedded in the binary by `build.rs` and served by [`router`].
//!
//! The pages speak only the public `/v1` API, with the user's API key (kept in the browser's
//! session storage); this crate serves files and knows nothing of jobs, the database or keys.
//! Every page's path answers `index.html` (the app routes in the browser); the hashed files
//! under `/assets/` are cached for good, `index.html` is revalidated on every load.

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// One embedded file.
#[derive(Debug)]
pub struct Asset {
    /// URL path: `/index.html`, `/assets/app-HASH.js`, …
    pub path: &'static str,
    pub bytes: &'static [u8],
    pub content_type: &'static str,
    /// Quoted, from the sha256 of the bytes.
    pub etag: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/assets.rs"));

/// The paths of the app's pages (each answers `index.html`).
pub const PAGES: [&str; 7] = [
    "/",
    "/jobs",
    "/jobs/{job_id}",
    "/compare",
    "/new",
    "/models",
    "/models/{*model}",
];

/// The page sources: scripts, styles and API calls to this origin only; no framing.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The dashboard's routes, to merge into the API's router (any state).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut r = Router::new().route("/assets/{file}", get(asset));
    for page in PAGES {
        r = r.route(page, get(index));
    }
    r
}

/// An embedded file by URL path.
pub fn find(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

async fn index(headers: HeaderMap) -> Response {
    let page = find("/index.html").expect("build.rs requires index.html");
    let mut resp = serve(page, &headers, "no-cache");
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    match find(&format!("/assets/{file}")) {
        Some(a) => serve(a, &headers, "public, max-age=31536000, immutable"),
        None => (
            StatusCode::NOT_FOUND,
            format!("No dashboard asset '{file}'."),
        )
            .into_response(),
    }
}

fn serve(a: &'static Asset, headers: &HeaderMap, cache: &'static str) -> Response {
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == a.etag || t.trim() == "*"));
    let common = [
        (header::ETAG, a.etag),
        (header::CACHE_CONTROL, cache),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (common, [(header::CONTENT_TYPE, a.content_type)], a.bytes).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(path: &str, etag: Option<&str>) -> Response {
        let mut req = Request::get(path);
        if let Some(e) = etag {
            req = req.header(header::IF_NONE_MATCH, e);
        }
        router::<()>()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    async fn text(resp: Response) -> String {
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn header_of(resp: &Response, name: header::HeaderName) -> &str {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn every_page_answers_the_app_and_its_assets_are_served() {
        for path in [
            "/",
            "/jobs",
            "/jobs/ftjob-x",
            "/compare",
            "/new",
            "/models",
            "/models/ft:gpt2:org:x",
        ] {
            let resp = get(path, None).await;
            assert_eq!(resp.status(), 200, "{path}");
            assert_eq!(
                header_of(&resp, header::CONTENT_TYPE),
                "text/html; charset=utf-8"
            );
            assert_eq!(header_of(&resp, header::CACHE_CONTROL), "no-cache");
            assert!(
                header_of(&resp, header::CONTENT_SECURITY_POLICY).contains("default-src 'self'")
            );
            let html = text(resp).await;
            assert!(html.contains("<div id=\"app\">"), "{html}");
            // Every file the page loads is embedded, with its type, cached for good.
            for src in html.split('"').filter(|s| s.starts_with("/assets/")) {
                let asset = get(src, None).await;
                assert_eq!(asset.status(), 200, "{src}");
                assert_eq!(
                    header_of(&asset, header::CACHE_CONTROL),
                    "public, max-age=31536000, immutable"
                );
                let ctype = header_of(&asset, header::CONTENT_TYPE).to_string();
                assert!(
                    ctype.starts_with(if src.ends_with(".js") {
                        "text/javascript"
                    } else {
                        "text/css"
                    }),
                    "{src}: {ctype}"
                );
                assert!(!text(asset).await.is_empty());
            }
        }
    }

    #[tokio::test]
    async fn a_known_etag_is_not_modified_and_unknown_assets_are_404() {
        let first = get("/jobs", None).await;
        let etag = header_of(&first, header::ETAG).to_string();
        assert!(etag.starts_with('"') && etag.len() == 34, "{etag}");
        let again = get("/jobs", Some(&etag)).await;
        assert_eq!(again.status(), 304);
        assert!(text(again).await.is_empty());
        assert_eq!(get("/jobs", Some("\"other\"")).await.status(), 200);
        let missing = get("/assets/nope.js", None).await;
        assert_eq!(missing.status(), 404);
        assert!(text(missing).await.contains("nope.js"));
        // Only the pages are the app's: other paths are left to the API's fallback.
        assert_eq!(get("/jobs/a/b", None).await.status(), 404);
        assert_eq!(get("/v1/nope", None).await.status(), 404);
    }
}
