//! Bad input gets the documented 4xx with a machine-readable code, and changes nothing.

use crate::common::TestApp;
use reqwest::StatusCode;
use serde_json::json;
use shared::domain::RequestKind;

#[tokio::test]
async fn bad_input_is_refused_with_a_clear_error_and_nothing_is_enqueued() {
    let app = TestApp::builder()
        .without_workers()
        .arg("--max-body-bytes", "4096")
        .arg("--max-prompt-chars", "100")
        .arg("--max-batch", "5")
        .start()
        .await;
    let alice = app.user("alice").await;
    let raw = |path: &str, body: &str, content_type: Option<&str>| {
        let mut req = app
            .http
            .post(app.url(path))
            .bearer_auth(&alice.token)
            .body(body.to_owned());
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        req
    };
    let json_ct = Some("application/json");
    let cases: Vec<(&str, reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            "malformed JSON",
            raw("/v1/personas", "{\"prompt\": ", json_ct),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "wrong type",
            raw("/v1/personas", "{\"prompt\": 42}", json_ct),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            "missing field",
            raw("/v1/personas", "{}", json_ct),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            "not JSON content type",
            raw("/v1/personas", "{\"prompt\": \"Yoda\"}", Some("text/plain")),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "empty prompt",
            raw("/v1/personas", "{\"prompt\": \"   \"}", json_ct),
            StatusCode::BAD_REQUEST,
            "empty_prompt",
        ),
        (
            "prompt too long",
            raw(
                "/v1/personas",
                &json!({ "prompt": "x".repeat(101) }).to_string(),
                json_ct,
            ),
            StatusCode::BAD_REQUEST,
            "prompt_too_long",
        ),
        (
            "body too large",
            raw(
                "/v1/personas",
                &json!({ "prompt": "x".repeat(5000) }).to_string(),
                json_ct,
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            "empty batch",
            raw("/v1/personas/batch", "{\"prompts\": []}", json_ct),
            StatusCode::BAD_REQUEST,
            "empty_batch",
        ),
        (
            "batch too big",
            raw(
                "/v1/personas/batch",
                &json!({ "prompts": vec!["Yoda"; 6] }).to_string(),
                json_ct,
            ),
            StatusCode::BAD_REQUEST,
            "too_many_prompts",
        ),
        (
            "one bad prompt in a batch",
            raw(
                "/v1/personas/batch",
                &json!({ "prompts": ["Yoda", ""] }).to_string(),
                json_ct,
            ),
            StatusCode::BAD_REQUEST,
            "empty_prompt",
        ),
        (
            "batch prompts not strings",
            raw("/v1/personas/batch", "{\"prompts\": [1, 2]}", json_ct),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            "unknown persona",
            raw(
                "/v1/conversations",
                "{\"persona_id\": \"per_nope\"}",
                json_ct,
            ),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "message to unknown conversation",
            raw(
                "/v1/conversations/conv_nope/messages",
                "{\"text\": \"hi\"}",
                json_ct,
            ),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ];
    for (what, req, status, code) in cases {
        let (got, body) = app.send(req).await;
        assert_eq!(got, status, "{what}: {body}");
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }
    let gets = [
        (
            "/v1/personas?limit=0",
            StatusCode::BAD_REQUEST,
            "invalid_limit",
        ),
        (
            "/v1/personas?limit=abc",
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "/v1/personas?next_token=%25%25",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        ("/v1/requests/req_nope", StatusCode::NOT_FOUND, "not_found"),
        (
            "/v1/requests/req_nope?wait=soon",
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
    ];
    for (path, status, code) in gets {
        let (got, body) = app.get(Some(&alice.token), path).await;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{path}: {body}"
        );
    }
    assert_eq!(app.queue_total(RequestKind::Persona).await, 0);
    assert_eq!(app.queue_total(RequestKind::Chat).await, 0);
    let (_, list) = app.get(Some(&alice.token), "/v1/conversations").await;
    assert_eq!(list["items"], json!([]));
}

#[tokio::test]
async fn messages_are_checked_too() {
    let app = TestApp::builder()
        .arg("--max-message-chars", "50")
        .start()
        .await;
    let alice = app.user("alice").await;
    let conv = app.conversation(&alice, "Yoda").await;
    let path = format!("/v1/conversations/{conv}/messages");
    let (status, body) = app
        .post(Some(&alice.token), &path, json!({ "text": "" }))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("empty_message"))
    );
    let (status, body) = app
        .post(Some(&alice.token), &path, json!({ "text": "y".repeat(51) }))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("message_too_long"))
    );
    assert!(app.messages(&alice, &conv).await.is_empty());
    assert_eq!(app.queue_total(RequestKind::Chat).await, 0);
}

#[tokio::test]
async fn the_per_user_rate_limit_answers_429_with_retry_after() {
    let app = TestApp::builder()
        .without_workers()
        .arg("--rate-limit-per-minute", "10")
        .start()
        .await;
    let alice = app.user("alice").await;
    let mut limited = None;
    for _ in 0..30 {
        let res = app
            .http
            .get(app.url("/v1/personas"))
            .bearer_auth(&alice.token)
            .send()
            .await
            .unwrap();
        if res.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(res);
            break;
        }
    }
    let res = limited.expect("the limit was reached");
    assert!(
        res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    // Another user has their own allowance.
    let bob = app.user("bob").await;
    let (status, _) = app.get(Some(&bob.token), "/v1/personas").await;
    assert_eq!(status, StatusCode::OK);
}
