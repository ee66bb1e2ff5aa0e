use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use understudy_wire as wire;

use crate::runtime::balancer::FakeBalancer;
use crate::runtime::controller::Core;
use crate::store::Store;

fn core() -> Arc<Core> {
    let cluster = crate::config::cluster::parse("t.toml", crate::testing::SAMPLE).unwrap();
    let store = Store::open_in_memory().unwrap();
    let balancers = Arc::new(FakeBalancer::new());
    Arc::new(Core::open(cluster, store, balancers, "s3cret".into()).unwrap())
}

async fn served_document() -> Value {
    let request = http::Request::get("/api/v1/openapi.json")
        .body(Body::empty())
        .unwrap();
    let response = crate::api::admin::router(core())
        .oneshot(request)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).expect("the document is JSON")
}

/// (method, path) of every operation in the document.
fn operations(document: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[tokio::test]
async fn the_document_describes_every_route_of_the_admin_endpoint() {
    let document = served_document().await;
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));
    let expected: BTreeSet<(String, String)> = [
        ("GET", "/healthz"),
        ("GET", "/metrics"),
        ("GET", "/api/v1/openapi.json"),
        ("GET", "/api/v1/services"),
        ("GET", "/api/v1/machines"),
        ("POST", "/api/v1/machines"),
        ("GET", "/api/v1/machines/{id}/history"),
        ("POST", "/api/v1/machines/{id}/rotate-key"),
        ("GET", "/api/v1/balancers"),
        ("POST", "/api/v1/balancers/{service}/rotate-key"),
        ("GET", "/api/v1/monitor"),
        ("GET", "/api/v1/monitor/actions"),
        ("GET", "/api/v1/rollouts"),
        ("GET", "/api/v1/rollouts/{id}"),
        ("GET", "/api/v1/rollouts/{id}/pairs.csv"),
        ("GET", "/api/v1/rollouts/{id}/charts"),
        ("GET", "/api/v1/session"),
        ("GET", "/api/v1/releases"),
        ("POST", "/api/v1/releases"),
        ("POST", "/api/v1/rollouts/{id}/approve"),
        ("POST", "/api/v1/rollouts/{id}/abort"),
        ("POST", "/api/v1/rollouts/{id}/rollback"),
        ("GET", "/api/v1/predictions"),
        ("GET", "/api/v1/predictions/alerts"),
        ("GET", "/api/v1/predictions/{service}"),
        ("GET", "/api/v1/predictions/{service}/{version}"),
        ("GET", "/api/v1/leader"),
        ("POST", "/api/v1/hub/publish"),
        ("GET", "/api/v1/hub/subscribe"),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    assert_eq!(operations(&document), expected);
}

#[tokio::test]
async fn every_documented_operation_is_routed() {
    let document = served_document().await;
    let core = core();
    for (method, path) in operations(&document) {
        // Any value for the path parameters: the route must match, whatever the handler answers.
        let uri = path
            .replace("{id}", "1")
            .replace("{service}", "db")
            .replace("{version}", "v1");
        let request = http::Request::builder()
            .method(method.as_str())
            .uri(&uri)
            .body(Body::empty())
            .unwrap();
        let response = crate::api::admin::router(core.clone())
            .oneshot(request)
            .await
            .unwrap();
        let status = response.status();
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
        if status == StatusCode::NOT_FOUND {
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            let error = body["error"].as_str().unwrap();
            assert!(!error.starts_with("no such endpoint"), "{method} {uri}");
        }
    }
}

#[tokio::test]
async fn the_bearer_scheme_guards_exactly_the_token_calls() {
    let document = served_document().await;
    let scheme = &document["components"]["securitySchemes"][super::BEARER];
    assert_eq!(scheme["type"], "http");
    assert_eq!(scheme["scheme"], "bearer");
    for (method, path) in operations(&document) {
        let operation = &document["paths"][&path][method.to_lowercase()];
        let guarded = operation["security"] == serde_json::json!([{ super::BEARER: [] }]);
        // The hub's publish is authenticated by the envelope's signature instead; the session
        // read says whose the token is.
        let needs_token =
            (method == "POST" && path != "/api/v1/hub/publish") || path == "/api/v1/session";
        assert_eq!(guarded, needs_token, "{method} {path}");
        if needs_token {
            assert!(operation["responses"]["401"].is_object(), "{method} {path}");
        }
    }
}

#[tokio::test]
async fn every_error_answer_is_documented_as_json_with_an_error_field() {
    let document = served_document().await;
    let schemas = &document["components"]["schemas"];
    assert_eq!(
        schemas["ErrorBody"]["required"],
        serde_json::json!(["error"])
    );
    assert_eq!(schemas["Refusal"]["required"][0], "error");
    for (method, path) in operations(&document) {
        let responses = document["paths"][&path][method.to_lowercase()]["responses"]
            .as_object()
            .unwrap();
        for (status, response) in responses {
            if !(status.starts_with('4') || status.starts_with('5')) {
                continue;
            }
            let schema = &response["content"]["application/json"]["schema"]["$ref"];
            let schema = schema.as_str().unwrap_or_default();
            assert!(
                schema.ends_with("/ErrorBody") || schema.ends_with("/Refusal"),
                "{method} {path} {status}: {response}"
            );
        }
    }
}

/// Property names of a component schema.
fn properties(document: &Value, name: &str) -> BTreeSet<String> {
    document["components"]["schemas"][name]["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("schema {name} has properties"))
        .keys()
        .cloned()
        .collect()
}

fn keys(value: &impl serde::Serialize) -> BTreeSet<String> {
    serde_json::to_value(value)
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

/// Every `$ref` under `value`.
fn references(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                out.push(r.clone());
            }
            map.values().for_each(|v| references(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| references(v, out)),
        _ => {}
    }
}

/// The balancer's wire types are `understudy_wire`'s own schemas: every reference to them
/// (and to anything else) names a component the document holds.
#[tokio::test]
async fn every_reference_resolves() {
    let document = served_document().await;
    let mut all = Vec::new();
    references(&document, &mut all);
    for name in [
        "BalancerConfig",
        "MachineStatus",
        "KeyRotationAck",
        "PoolRole",
    ] {
        let reference = format!("#/components/schemas/{name}");
        assert!(all.contains(&reference), "{name} is not referred to");
    }
    for reference in &all {
        let name = reference
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("{reference} is not a component schema"));
        assert!(
            document["components"]["schemas"][name].is_object(),
            "{reference} does not resolve"
        );
    }
    // No schema of the controller's own shadows a wire type of the same name.
    fn schema_of<T: utoipa::PartialSchema>() -> Value {
        serde_json::to_value(T::schema()).unwrap()
    }
    let schemas = &document["components"]["schemas"];
    assert_eq!(
        schemas["BalancerConfig"],
        schema_of::<wire::BalancerConfig>()
    );
    assert_eq!(schemas["MachineEntry"], schema_of::<wire::MachineEntry>());
    assert_eq!(schemas["MachineStatus"], schema_of::<wire::MachineStatus>());
    assert_eq!(schemas["MachineState"], schema_of::<wire::MachineState>());
    assert_eq!(
        schemas["KeyRotationAck"],
        schema_of::<wire::KeyRotationAck>()
    );
    assert_eq!(schemas["PoolRole"], schema_of::<wire::PoolRole>());
}

#[tokio::test]
async fn an_alert_record_shows_the_fields_its_schema_names() {
    let document = served_document().await;
    let record = crate::runtime::predictions::AlertRecord {
        at_ms: 1,
        config: wire::PoolRole::Simulation,
        alert: understudy_predict::Alert {
            object: "call-1".into(),
            service: "media".into(),
            version: "v2".into(),
            state: "media".into(),
            artifact: "error".into(),
            probability: 0.5,
            cause: understudy_predict::AlertCause::Dwelling { elapsed_secs: 3.0 },
        },
    };
    let mut documented = properties(&document, "AlertFields");
    documented.extend(["at_ms".to_string(), "config".to_string()]);
    assert_eq!(documented, keys(&record));
}

#[tokio::test]
async fn a_rollout_detail_shows_its_mirror_as_its_schema_names_it() {
    use crate::core::mirror::{BudgetView, MirrorReason, MirrorView};
    let document = served_document().await;
    // The detail flattens the rollout's view: its own fields are one part of an `allOf`.
    let detail = &document["components"]["schemas"]["RolloutDetail"];
    let parts = detail["allOf"].as_array().expect("allOf");
    assert!(
        parts.iter().any(|p| p["properties"]["mirror"].is_object()),
        "{detail}"
    );
    let budget = BudgetView {
        copies_per_second: 200.0,
        max_fraction: 1.0,
        watch_fraction: 0.05,
    };
    let view = MirrorView {
        fraction: 0.2,
        reason: MirrorReason::Judging,
        since_ms: 1,
        budget: Some(budget.clone()),
        caller_rate: Some(1_000.0),
        open_tests: vec!["errors".into()],
    };
    assert_eq!(properties(&document, "MirrorView"), keys(&view));
    assert_eq!(properties(&document, "BudgetView"), keys(&budget));
    let reasons = &document["components"]["schemas"]["MirrorReason"]["enum"];
    assert_eq!(
        reasons,
        &serde_json::json!([
            "not_judging",
            "fixed",
            "measuring",
            "judging",
            "watching",
            "failed"
        ])
    );
}

#[tokio::test]
async fn a_rollout_detail_shows_its_fields_as_their_schemas_name_them() {
    use crate::core::fields::{FieldsView, SampleValues};
    let document = served_document().await;
    let detail = &document["components"]["schemas"]["RolloutDetail"];
    let parts = detail["allOf"].as_array().expect("allOf");
    assert!(
        parts.iter().any(|p| p["properties"]["fields"].is_object()),
        "{detail}"
    );
    let mut tests = understudy_judge::FieldTests::new(0.005, 0.0025, 0.05, 0.01);
    let price = understudy_judge::FieldValues {
        path: "items[].price".into(),
        v1: Some("12.5".into()),
        copy: Some("13.0".into()),
    };
    for _ in 0..300 {
        let v2 = understudy_judge::AnswerFields {
            paths: vec![price.clone()],
        };
        tests.observe(&v2, None);
    }
    let view = FieldsView::of(&tests.report());
    assert_eq!(properties(&document, "FieldsView"), keys(&view));
    assert_eq!(properties(&document, "FieldView"), keys(&view.fields[0]));
    let sample = SampleValues {
        v1: None,
        copy: Some("1".into()),
    };
    assert_eq!(properties(&document, "SampleValues"), keys(&sample));
}
