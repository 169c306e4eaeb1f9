//! The create-request parser against a recorded table of requests (tests/data/create_requests.jsonl):
//! for each body, either the error (`param` and the exact message docs/job-spec.md lists) or the
//! whole resolved result (spec, suffix, metadata, integrations, priority). The table was written by
//! the parser as it stood before its rewrite into typed knobs, so it pins that behaviour; add a line
//! for every new rule.

use serde_json::{json, Value};
use tuna_core::spec::{parse_create_request, SpecPolicy};

#[test]
fn every_recorded_request_parses_as_recorded() {
    let table = include_str!("data/create_requests.jsonl");
    let mut checked = 0;
    for (n, line) in table
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let case: Value = serde_json::from_str(line).unwrap();
        let body = &case["body"];
        let got = match parse_create_request(body, &SpecPolicy::default(), 42) {
            Ok(r) => json!({"spec": r.spec, "suffix": r.suffix, "metadata": r.metadata,
                            "integrations": r.integrations, "priority": r.priority}),
            Err(e) => json!({"param": e.param, "message": e.message}),
        };
        let want = case.get("ok").unwrap_or(&case["error"]);
        assert_eq!(&got, want, "line {}: {body}", n + 1);
        checked += 1;
    }
    assert!(checked > 100, "{checked}");
}
