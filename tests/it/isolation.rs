//! A user never sees or touches another user's records: every id of one user is a 404 to the
//! other, on every route, and listings show only one's own.

use crate::common::TestApp;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn another_users_ids_answer_404_everywhere() {
    let app = TestApp::start().await;
    let alice = app.user("alice").await;
    let mallory = app.user("mallory").await;

    let persona = app.persona(&alice, "Gandalf").await;
    let persona_id = persona["persona_id"].as_str().unwrap();
    let (_, conv) = app
        .post(
            Some(&alice.token),
            "/v1/conversations",
            json!({ "persona_id": persona_id }),
        )
        .await;
    let conv_id = conv["conversation_id"].as_str().unwrap();
    let (_, msg) = app
        .post(
            Some(&alice.token),
            &format!("/v1/conversations/{conv_id}/messages"),
            json!({ "text": "Hello" }),
        )
        .await;
    let request_id = msg["request_id"].as_str().unwrap();
    app.finished(&alice, request_id).await;
    let (_, batch) = app
        .post(
            Some(&alice.token),
            "/v1/personas/batch",
            json!({ "prompts": ["Yoda"] }),
        )
        .await;
    let batch_id = batch["batch_id"].as_str().unwrap();

    let reads = [
        format!("/v1/personas/{persona_id}"),
        format!("/v1/conversations/{conv_id}"),
        format!("/v1/conversations/{conv_id}/messages"),
        format!("/v1/requests/{request_id}"),
        format!("/v1/requests/{request_id}?wait=1"),
        format!("/v1/batches/{batch_id}"),
    ];
    for path in &reads {
        let (status, body) = app.get(Some(&mallory.token), path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert_eq!(body["error"]["code"], "not_found");
    }
    let (status, _) = app
        .delete(Some(&mallory.token), &format!("/v1/personas/{persona_id}"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app
        .post(
            Some(&mallory.token),
            "/v1/conversations",
            json!({ "persona_id": persona_id }),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app
        .post(
            Some(&mallory.token),
            &format!("/v1/conversations/{conv_id}/messages"),
            json!({ "text": "mine now" }),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    for path in ["/v1/personas", "/v1/conversations"] {
        let (_, list) = app.get(Some(&mallory.token), path).await;
        assert_eq!(list["items"], json!([]), "{path}");
    }
    // Alice's records are untouched by all of that.
    assert_eq!(app.messages(&alice, conv_id).await.len(), 2);
    let (status, _) = app
        .get(Some(&alice.token), &format!("/v1/personas/{persona_id}"))
        .await;
    assert_eq!(status, StatusCode::OK);
}
