//! The served OpenAPI document as client generators read it (issue #13): valid by
//! `openapi-spec-validator`, every answered status declared with the error schema, the
//! `Idempotency-Key` header wherever it is honoured, operation ids unique, the configured
//! limits stated.

use std::collections::HashSet;
use std::process::Command;

use crate::common::TestApp;
use serde_json::Value;

fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            out.push((method.clone(), path.clone(), op));
        }
    }
    out
}

#[tokio::test]
async fn the_document_passes_the_spec_validator() {
    let app = TestApp::start().await;
    let (_, doc) = app.get(None, "/openapi.json").await;
    let file = app.dir.path().join("openapi.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let exe = std::env::var("CHARACTERBOT_TEST_OPENAPI_SPEC_VALIDATOR").expect(
        "CHARACTERBOT_TEST_OPENAPI_SPEC_VALIDATOR is not set: run the tests with `scripts/test`, which installs it",
    );
    let out = Command::new(exe)
        .arg(&file)
        .output()
        .expect("run the validator");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("OK"), "{text}");
}

#[tokio::test]
async fn every_operation_declares_what_it_can_answer() {
    let app = TestApp::builder()
        .arg("--max-prompt-chars", "123")
        .arg("--max-batch", "7")
        .start()
        .await;
    let (_, doc) = app.get(None, "/openapi.json").await;
    let mut ids = HashSet::new();
    for (method, path, op) in operations(&doc) {
        let at = format!("{method} {path}");
        assert!(
            ids.insert(op["operationId"].as_str().unwrap().to_owned()),
            "{at}: operationId taken"
        );
        let responses = op["responses"].as_object().unwrap();
        let declares = |code: &str| responses.contains_key(code);
        let secured = op.get("security").is_some();
        if secured {
            assert!(declares("401"), "{at}: 401");
        }
        if path.starts_with("/v1/") {
            assert!(declares("429") && declares("503"), "{at}: 429, 503");
        }
        if op.get("requestBody").is_some() {
            for code in ["400", "413", "415"] {
                assert!(declares(code), "{at}: {code}");
            }
        }
        if path.contains('{') {
            assert!(declares("404"), "{at}: 404");
        }
        for (code, answer) in responses {
            if code.starts_with('4') || code.starts_with('5') {
                assert_eq!(
                    answer["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorResponse",
                    "{at} {code}"
                );
            }
        }
        let params = op["parameters"].as_array().cloned().unwrap_or_default();
        for p in &params {
            if p["in"] == "path" {
                assert!(
                    path.contains(&format!("{{{}}}", p["name"].as_str().unwrap())),
                    "{at}: {p}"
                );
            }
        }
        if secured && (method == "post" || method == "patch") {
            assert!(
                params
                    .iter()
                    .any(|p| p["in"] == "header" && p["name"] == "Idempotency-Key"),
                "{at}: Idempotency-Key"
            );
        }
    }
    assert!(ids.len() > 30);
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["CreatePersona"]["properties"]["prompt"]["maxLength"],
        123
    );
    assert_eq!(schemas["CreateBatch"]["properties"]["items"]["maxItems"], 7);
    let limit = doc["paths"]["/v1/personas"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "limit")
        .unwrap();
    assert_eq!(
        (&limit["in"], &limit["schema"]["maximum"]),
        (&"query".into(), &100.into())
    );
    let metrics = &doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"];
    assert!(
        metrics["application/openmetrics-text"].is_object(),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_method_a_path_lacks_is_405_with_allow_before_authentication() {
    let app = TestApp::start().await;
    let res = app
        .http
        .patch(app.url("/v1/personas"))
        .header("Idempotency-Key", "k")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    assert_eq!(res.headers()["allow"], "POST,GET,HEAD");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

/// The chat page and the API reference are served by the binary itself, with their assets
/// and the Swagger UI licence, under a policy that loads nothing from elsewhere.
#[tokio::test]
async fn the_chat_page_and_the_api_reference_are_served_offline() {
    let app = TestApp::start().await;
    for (path, kind, holds) in [
        ("/", "text/html", "<script src=\"/app.js\""),
        ("/app.js", "text/javascript", "GET /v1/sync"),
        ("/app.css", "text/css", "@media"),
        ("/docs", "text/html", "/docs/swagger-ui-bundle.js"),
        ("/docs/init.js", "text/javascript", "/openapi.json"),
        (
            "/docs/swagger-ui-bundle.js",
            "text/javascript",
            "SwaggerUIBundle",
        ),
        ("/docs/swagger-ui.css", "text/css", ".swagger-ui"),
        ("/docs/LICENSE", "text/plain", "Apache License"),
    ] {
        let res = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let headers = res.headers().clone();
        assert!(
            headers["content-type"].to_str().unwrap().starts_with(kind),
            "{path}"
        );
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("default-src 'self'") && csp.contains("script-src 'self'"),
            "{csp}"
        );
        let body = res.text().await.unwrap();
        assert!(body.contains(holds), "{path} lacks {holds}");
    }
    // Every script and stylesheet the pages name is served.
    for page in ["/", "/docs"] {
        let html = app
            .http
            .get(app.url(page))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for link in html
            .split(['"', '\''])
            .filter(|s| s.starts_with('/') && (s.ends_with(".js") || s.ends_with(".css")))
        {
            let status = app.http.get(app.url(link)).send().await.unwrap().status();
            assert_eq!(status, 200, "{page} names {link}");
        }
    }
}
