//! `Idempotency-Key`: a repeat with the same key and body replays the first answer and
//! enqueues nothing; the same key with another body is a 422; keys are per user.

use crate::common::{key_claim, stored, TestApp};
use reqwest::StatusCode;
use serde_json::json;
use shared::domain::RequestKind;
use shared::models::PersonaModel;
use shared::store::IdempotencyBegin;

#[tokio::test]
async fn a_repeated_key_replays_the_first_answer_and_enqueues_once() {
    // No workers, so the queue shows exactly what was enqueued.
    let app = TestApp::builder().without_workers().start().await;
    let alice = app.user("alice").await;
    let post = |key: &str, body: serde_json::Value| {
        app.http
            .post(app.url("/v1/personas"))
            .bearer_auth(&alice.token)
            .header("Idempotency-Key", key)
            .json(&body)
    };

    let (s1, first) = app.send(post("key-1", json!({ "prompt": "Yoda" }))).await;
    let res = post("key-1", json!({ "prompt": "Yoda" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    let (s2, second) = (res.status(), res.json::<serde_json::Value>().await.unwrap());
    assert_eq!((s1, s2), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    assert_eq!(first["request_id"], second["request_id"]);
    assert_eq!(
        app.queue_total(RequestKind::Persona).await,
        1,
        "one message enqueued"
    );

    let (status, body) = app
        .send(post("key-1", json!({ "prompt": "Gandalf" })))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["code"], "idempotency_key_reused");
    assert_eq!(app.queue_total(RequestKind::Persona).await, 1);

    // A new key is a new request; another user's identical key is independent.
    let (_, third) = app.send(post("key-2", json!({ "prompt": "Yoda" }))).await;
    assert_ne!(third["request_id"], first["request_id"]);
    let bob = app.user("bob").await;
    let (status, bobs) = app
        .send(
            app.http
                .post(app.url("/v1/personas"))
                .bearer_auth(&bob.token)
                .header("Idempotency-Key", "key-1")
                .json(&json!({ "prompt": "Yoda" })),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_ne!(bobs["request_id"], first["request_id"]);
    assert_eq!(app.queue_total(RequestKind::Persona).await, 3);

    // Chat messages too: the user message is stored once.
    let (_, conv) = {
        let app2 = &app;
        // A persona is needed; without workers, store one directly.
        let persona = shared::domain::Persona::from_draft(
            "per_test".into(),
            shared::models::offline::OfflinePersonaModel::default()
                .create_persona("Yoda")
                .await
                .unwrap()
                .value,
            "offline".into(),
            "Yoda".into(),
        );
        app2.adapters
            .store
            .put_persona(&alice.user_id, &persona)
            .await
            .unwrap();
        app2.post(
            Some(&alice.token),
            "/v1/conversations",
            json!({ "persona_id": "per_test" }),
        )
        .await
    };
    let path = format!(
        "/v1/conversations/{}/messages",
        conv["conversation_id"].as_str().unwrap()
    );
    for _ in 0..3 {
        let (status, _) = app
            .send(
                app.http
                    .post(app.url(&path))
                    .bearer_auth(&alice.token)
                    .header("Idempotency-Key", "msg-1")
                    .json(&json!({ "text": "Hello there" })),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    assert_eq!(app.queue_total(RequestKind::Chat).await, 1);
    assert_eq!(
        app.messages(&alice, conv["conversation_id"].as_str().unwrap())
            .await
            .iter()
            .filter(|m| m["role"] == "user")
            .count(),
        1
    );

    // Bad keys are refused before anything happens.
    let (status, body) = app
        .send(post(&"k".repeat(300), json!({ "prompt": "Yoda" })))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_idempotency_key"))
    );
}

#[tokio::test]
async fn a_key_in_flight_is_a_conflict_and_an_abandoned_claim_can_be_taken_over() {
    let app = TestApp::builder().without_workers().start().await;
    let store = &app.adapters.store;
    let begin = |fp: &'static str, lock_ms: u64| {
        store.idempotency_begin(key_claim("u", "k", fp, lock_ms, 86_400_000))
    };
    assert!(matches!(
        begin("a", 60_000).await.unwrap(),
        IdempotencyBegin::Started { .. }
    ));
    assert_eq!(
        begin("a", 60_000).await.unwrap(),
        IdempotencyBegin::InFlight
    );
    assert_eq!(
        begin("b", 60_000).await.unwrap(),
        IdempotencyBegin::Mismatch
    );
    // The first handler died: after the lock time the claim is taken over.
    let IdempotencyBegin::Started { claim, .. } = begin("a", 0).await.unwrap() else {
        panic!("the abandoned claim is taken over");
    };
    store
        .idempotency_complete("u", "k", claim, &stored(202, "{\"x\":1}"))
        .await
        .unwrap();
    assert_eq!(
        begin("a", 60_000).await.unwrap(),
        IdempotencyBegin::Replay(stored(202, "{\"x\":1}"))
    );
}
