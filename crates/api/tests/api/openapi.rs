//! What the router serves ([`tuna_api::api_routes`], recorded as the router is built, so no
//! served route can be missing from it) and `openapi.yaml` agree: every route in one is in the
//! other, and each is answered. (Response bodies are validated against the spec's schemas by the Python tests.)

use std::collections::BTreeSet;

use reqwest::Method;

use crate::helpers::spawn_app;

fn spec() -> serde_yaml::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi.yaml");
    serde_yaml::from_str(&std::fs::read_to_string(path).expect("openapi.yaml")).expect("valid YAML")
}

#[tokio::test]
async fn routes_and_openapi_paths_agree() {
    let app = spawn_app().await;
    let spec = spec();
    let mut in_spec = BTreeSet::new();
    for (path, item) in spec["paths"].as_mapping().expect("paths") {
        for (method, _) in item.as_mapping().expect("path item") {
            let m = method.as_str().unwrap().to_ascii_uppercase();
            if ["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&m.as_str()) {
                in_spec.insert((m, path.as_str().unwrap().to_string()));
            }
        }
    }
    let in_router: BTreeSet<(String, String)> = tuna_api::api_routes(&app.state.config)
        .served()
        .iter()
        .map(|(m, p)| (m.to_string(), p.clone()))
        .collect();
    assert_eq!(
        in_router.len(),
        tuna_api::api_routes(&app.state.config).served().len(),
        "a route is added twice"
    );
    let missing_in_spec: Vec<_> = in_router.difference(&in_spec).collect();
    let missing_in_router: Vec<_> = in_spec.difference(&in_router).collect();
    assert!(
        missing_in_spec.is_empty(),
        "routes missing from openapi.yaml: {missing_in_spec:?}"
    );
    assert!(
        missing_in_router.is_empty(),
        "openapi.yaml paths the router lacks: {missing_in_router:?}"
    );
}

#[tokio::test]
async fn every_listed_route_is_served() {
    let app = spawn_app().await;
    for (method, path) in tuna_api::api_routes(&app.state.config).served() {
        let concrete = path
            .replace("{file_id}", "file-x")
            .replace("{fine_tuning_job_id}", "ftjob-x")
            .replace("{model}", "gpt2");
        let resp = app
            .req(Method::from_bytes(method.as_bytes()).unwrap(), &concrete)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap();
        assert_ne!(status, 405, "{method} {path}: {body}");
        assert!(
            !body.contains("unknown_url"),
            "{method} {path} is not routed: {body}"
        );
    }
}
