use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::admin::tests::{call, keyed, keyless};
use crate::RunningBalancers;

async fn served_document(running: &RunningBalancers) -> Value {
    let (status, headers, body) = call(running, "GET", "/api/v1/openapi.json", "").await;
    assert_eq!(status, 200);
    assert_eq!(headers[http::header::CONTENT_TYPE], "application/json");
    serde_json::from_slice(&body).expect("the document is JSON")
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

fn operation<'a>(document: &'a Value, method: &str, path: &str) -> &'a Value {
    &document["paths"][path][method.to_lowercase()]
}

#[tokio::test]
async fn the_document_describes_every_route_and_every_route_is_routed() {
    let running = keyless();
    let document = served_document(&running).await;
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));
    let expected: BTreeSet<(String, String)> = [
        ("GET", "/healthz"),
        ("GET", "/metrics"),
        ("GET", "/api/v1/openapi.json"),
        ("GET", "/api/v1/balancers"),
        ("GET", "/api/v1/balancers/{service}/config"),
        ("PUT", "/api/v1/balancers/{service}/config"),
        ("GET", "/api/v1/balancers/{service}/stats"),
        ("PUT", "/api/v1/balancers/{service}/config-key"),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    assert_eq!(operations(&document), expected);
    for (method, path) in operations(&document) {
        let uri = path.replace("{service}", "media");
        let (status, _, body) = call(&running, &method, &uri, "").await;
        assert_ne!(status, 405, "{method} {uri}");
        if status == 404 {
            let body: Value = serde_json::from_slice(&body).unwrap();
            let error = body["error"].as_str().unwrap();
            assert!(!error.starts_with("no such endpoint"), "{method} {uri}");
        }
    }
}

/// The schema a `$ref` names, resolved in `document`.
fn resolve<'a>(document: &'a Value, reference: &str) -> &'a Value {
    let name = reference
        .strip_prefix("#/components/schemas/")
        .unwrap_or_else(|| panic!("{reference} is not a component schema"));
    let schema = &document["components"]["schemas"][name];
    assert!(schema.is_object(), "{reference} does not resolve");
    schema
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

#[tokio::test]
async fn every_reference_resolves_and_every_error_is_json_with_an_error_field() {
    let document = served_document(&keyless()).await;
    let mut all = Vec::new();
    references(&document, &mut all);
    assert!(!all.is_empty());
    for reference in &all {
        resolve(&document, reference);
    }
    // Each error schema is one object requiring `error`, or any of such objects.
    let requires_error = |schema: &Value| {
        schema["required"]
            .as_array()
            .unwrap()
            .contains(&json!("error"))
    };
    for (method, path) in operations(&document) {
        let responses = operation(&document, &method, &path)["responses"]
            .as_object()
            .unwrap();
        for (status, response) in responses {
            if !(status.starts_with('4') || status.starts_with('5')) {
                continue;
            }
            let reference = response["content"]["application/json"]["schema"]["$ref"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path} {status}: {response}"));
            let schema = resolve(&document, reference);
            match schema["anyOf"].as_array() {
                Some(items) => {
                    for item in items {
                        let schema = resolve(&document, item["$ref"].as_str().unwrap());
                        assert!(requires_error(schema), "{method} {path} {status}");
                    }
                }
                None => assert!(requires_error(schema), "{method} {path} {status}"),
            }
        }
    }
    let cursor = &document["components"]["schemas"]["CursorProblem"]["enum"];
    assert_eq!(*cursor, json!(["cursor_ahead", "cursor_too_old"]));
}

#[tokio::test]
async fn the_signed_read_guards_the_reads_required_only_when_every_balancer_is_keyed() {
    for (running, keyed) in [(keyed(), true), (keyless(), false)] {
        let document = served_document(&running).await;
        let scheme = &document["components"]["securitySchemes"][super::SIGNED_READ];
        assert_eq!(
            *scheme,
            json!({"type": "apiKey", "in": "header", "name": "x-understudy-auth",
                   "description": scheme["description"]})
        );
        for (method, path) in operations(&document) {
            let operation = operation(&document, &method, &path);
            let read = method == "GET" && (path.ends_with("/config") || path.ends_with("/stats"));
            let expected = match (read, keyed) {
                (false, _) => Value::Null,
                (true, true) => json!([{ "signed_read": [] }]),
                (true, false) => json!([{ "signed_read": [] }, {}]),
            };
            assert_eq!(operation["security"], expected, "{method} {path}");
            if let Some(parameters) = operation["parameters"].as_array() {
                for parameter in parameters.iter().filter(|p| p["name"] == "service") {
                    assert_eq!(
                        parameter["schema"]["enum"],
                        json!(["media"]),
                        "{method} {path}"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn the_wire_types_are_the_schemas_and_the_config_body_is_either_form() {
    let document = served_document(&keyless()).await;
    let schemas = &document["components"]["schemas"];
    let config = &schemas["BalancerConfig"];
    assert_eq!(config["additionalProperties"], json!(false));
    assert_eq!(
        config["required"],
        json!(["service", "version", "machines"])
    );
    assert_eq!(
        schemas["MachineEntry"]["properties"]["weight"]["maximum"],
        json!(1000)
    );
    // The documented example is a config this balancer takes.
    let example: understudy_wire::BalancerConfig =
        serde_json::from_value(config["example"].clone()).unwrap();
    crate::config::ValidConfig::new(&example).unwrap();
    let body = &operation(&document, "PUT", "/api/v1/balancers/{service}/config")["requestBody"];
    let body = resolve(
        &document,
        body["content"]["application/json"]["schema"]["$ref"]
            .as_str()
            .unwrap(),
    );
    assert_eq!(
        body["oneOf"],
        json!([{"$ref": "#/components/schemas/Envelope"}, {"$ref": "#/components/schemas/BalancerConfig"}])
    );
}
