//! [`Routes`]: the router of the API, built so that it knows what it serves. Each resource
//! module adds its handlers here by method and path, so the list of routes ([`crate::routes`],
//! which a test compares with `openapi.yaml` both ways) cannot miss one the router serves.

use axum::handler::Handler;
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;

use crate::AppState;

/// A router and the `(method, path)` of every route it serves, paths in OpenAPI's `{param}`
/// syntax (axum's wildcard `{*path}` is listed as `{path}`).
#[derive(Default)]
pub struct Routes {
    router: Router<AppState>,
    served: Vec<(&'static str, String)>,
}

impl Routes {
    pub fn new() -> Routes {
        Routes::default()
    }

    pub fn get<H: Handler<T, AppState>, T: 'static>(self, path: &str, handler: H) -> Routes {
        self.on("GET", path, on(MethodFilter::GET, handler))
    }

    pub fn post<H: Handler<T, AppState>, T: 'static>(self, path: &str, handler: H) -> Routes {
        self.on("POST", path, on(MethodFilter::POST, handler))
    }

    pub fn delete<H: Handler<T, AppState>, T: 'static>(self, path: &str, handler: H) -> Routes {
        self.on("DELETE", path, on(MethodFilter::DELETE, handler))
    }

    /// A POST route whose method router is changed by `wrap` first (a body limit, say).
    pub fn post_with<H: Handler<T, AppState>, T: 'static>(
        self,
        path: &str,
        handler: H,
        wrap: impl FnOnce(MethodRouter<AppState>) -> MethodRouter<AppState>,
    ) -> Routes {
        self.on("POST", path, wrap(on(MethodFilter::POST, handler)))
    }

    fn on(mut self, method: &'static str, path: &str, route: MethodRouter<AppState>) -> Routes {
        self.served
            .push((method, path.replace("{*", "{").to_string()));
        self.router = self.router.route(path, route);
        self
    }

    pub fn merge(mut self, other: Routes) -> Routes {
        self.served.extend(other.served);
        self.router = self.router.merge(other.router);
        self
    }

    /// What the router serves: `(method, path)`.
    pub fn served(&self) -> &[(&'static str, String)] {
        &self.served
    }

    pub fn into_router(self) -> Router<AppState> {
        self.router
    }
}
