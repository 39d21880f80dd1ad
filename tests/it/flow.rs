//! The whole product, end to end through HTTP on the embedded default: sign up, sign in,
//! persona, poll, long poll, SSE, conversation, messages, replies, history, batch.

use std::time::Duration;

use crate::common::{read_sse, TestApp};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn the_whole_flow_on_the_embedded_default() {
    let app = TestApp::start().await;
    let alice = app.user("alice").await;
    assert_eq!(alice.tokens["token_type"], "Bearer");
    assert_eq!(alice.tokens["expires_in"], 3600);

    // The event stream is open before anything happens.
    let sse = app
        .http
        .get(app.url("/v1/events"))
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), StatusCode::OK);
    assert!(sse.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));

    // Persona: 202, then poll until done.
    let (status, accepted) = app
        .post(
            Some(&alice.token),
            "/v1/personas",
            json!({ "prompt": "Sherlock Holmes" }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(accepted["status"], "queued");
    let request_id = accepted["request_id"].as_str().unwrap().to_owned();
    let done = app.finished(&alice, &request_id).await;
    assert_eq!(done["kind"], "persona");
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["attempts"], 1);
    assert_eq!(done["model"], "offline");
    assert!(done["usage"]["output_tokens"].as_u64().unwrap() > 0);
    let persona = &done["result"]["persona"];
    assert_eq!(persona["name"], "Sherlock Holmes");
    assert_eq!(persona["source"], "famous");
    assert_eq!(persona["model"], "offline");
    for field in ["description", "personality", "speaking_style", "greeting"] {
        assert!(!persona[field].as_str().unwrap().is_empty(), "{field}");
    }
    let persona_id = persona["persona_id"].as_str().unwrap().to_owned();

    // The stream saw the request go queued → succeeded: an instant job is never marked
    // running (a job is once it has run a moment; `workers::start`), so one event.
    let events = read_sse(sse, Duration::from_secs(10), |name, data| {
        name == "request.updated" && data["status"] == "succeeded"
    })
    .await;
    let statuses: Vec<_> = events
        .iter()
        .filter(|(n, d)| n == "request.updated" && d["request_id"] == request_id.as_str())
        .map(|(_, d)| d["status"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(statuses, ["succeeded"]);

    // The persona is listed and readable.
    let (_, list) = app.get(Some(&alice.token), "/v1/personas").await;
    assert_eq!(list["items"][0]["persona_id"], persona_id.as_str());
    let (status, got) = app
        .get(Some(&alice.token), &format!("/v1/personas/{persona_id}"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&got, persona);

    // An original persona from free text.
    let pirate = app.persona(&alice, "a grumpy pirate who loves cats").await;
    assert_eq!(pirate["source"], "original");
    assert!(pirate["name"].as_str().unwrap().contains("Grumpy Pirate"));

    // Conversation and messages; each reply is polled with a long poll.
    let (status, conv) = app
        .post(
            Some(&alice.token),
            "/v1/conversations",
            json!({ "persona_id": persona_id }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{conv}");
    assert_eq!(conv["persona_name"], "Sherlock Holmes");
    let conv_id = conv["conversation_id"].as_str().unwrap().to_owned();
    let texts = [
        "Who stole the pearl?",
        "Was it the butler?",
        "Thank you, Holmes.",
    ];
    for text in texts {
        let (status, accepted) = app
            .post(
                Some(&alice.token),
                &format!("/v1/conversations/{conv_id}/messages"),
                json!({ "text": text }),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        let (_, polled) = app
            .get(
                Some(&alice.token),
                &format!(
                    "/v1/requests/{}?wait=15",
                    accepted["request_id"].as_str().unwrap()
                ),
            )
            .await;
        assert_eq!(polled["status"], "succeeded", "long poll returned {polled}");
        assert_eq!(polled["kind"], "chat");
        let reply = &polled["result"]["message"];
        assert_eq!(reply["role"], "assistant");
        assert!(
            reply["text"]
                .as_str()
                .unwrap()
                .contains("As Sherlock Holmes"),
            "{reply}"
        );
    }

    // History: user/assistant alternating, in order, the later replies aware of the earlier turns.
    let history = app.messages(&alice, &conv_id).await;
    assert_eq!(history.len(), 6);
    for (i, m) in history.iter().enumerate() {
        assert_eq!(m["role"], if i % 2 == 0 { "user" } else { "assistant" });
    }
    let user_texts: Vec<_> = history
        .iter()
        .step_by(2)
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(user_texts, texts);
    assert!(history[1]["text"]
        .as_str()
        .unwrap()
        .contains("start of our conversation"));
    assert!(history[5]["text"]
        .as_str()
        .unwrap()
        .contains("exchanged 4 messages"));

    // Pagination of history with an opaque token.
    let (_, page1) = app
        .get(
            Some(&alice.token),
            &format!("/v1/conversations/{conv_id}/messages?limit=4"),
        )
        .await;
    assert_eq!(page1["items"].as_array().unwrap().len(), 4);
    assert_eq!(page1["items"][1], history[0], "after the greeting");
    let token = page1["next_token"].as_str().unwrap();
    let (_, page2) = app
        .get(
            Some(&alice.token),
            &format!("/v1/conversations/{conv_id}/messages?limit=4&next_token={token}"),
        )
        .await;
    assert_eq!(page2["items"].as_array().unwrap().len(), 3);
    assert!(page2["next_token"].is_null());
    assert_eq!(page2["items"][2], history[5]);

    let (_, convs) = app.get(Some(&alice.token), "/v1/conversations").await;
    assert_eq!(convs["items"][0]["conversation_id"], conv_id.as_str());
    let (status, _) = app
        .get(Some(&alice.token), &format!("/v1/conversations/{conv_id}"))
        .await;
    assert_eq!(status, StatusCode::OK);

    // Batch: many prompts, counts as they finish.
    let prompts = [
        "Yoda",
        "Gandalf",
        "a shy robot chef",
        "Marie Curie",
        "a cheerful dragon",
    ];
    let (status, batch) = app
        .post(
            Some(&alice.token),
            "/v1/personas/batch",
            json!({ "prompts": prompts }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{batch}");
    let ids = batch["request_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 5);
    let batch_id = batch["batch_id"].as_str().unwrap();
    for id in ids {
        app.finished(&alice, id.as_str().unwrap()).await;
    }
    let (_, counts) = app
        .get(Some(&alice.token), &format!("/v1/batches/{batch_id}"))
        .await;
    assert_eq!(
        (
            counts["total"].as_u64(),
            counts["succeeded"].as_u64(),
            counts["failed"].as_u64(),
            counts["pending"].as_u64()
        ),
        (Some(5), Some(5), Some(0), Some(0)),
        "{counts}"
    );
    assert_eq!(&counts["request_ids"], &batch["request_ids"]);
    let (_, first) = app
        .get(
            Some(&alice.token),
            &format!("/v1/requests/{}", ids[0].as_str().unwrap()),
        )
        .await;
    assert_eq!(first["result"]["persona"]["name"], "Yoda");
    assert_eq!(first["batch_id"], batch_id);

    // Personas can be deleted.
    let (status, _) = app
        .delete(Some(&alice.token), &format!("/v1/personas/{persona_id}"))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = app
        .get(Some(&alice.token), &format!("/v1/personas/{persona_id}"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn refresh_tokens_give_new_access_tokens() {
    let app = TestApp::start().await;
    let bob = app.user("bob").await;
    // Embedded accounts need no confirmation; the route answers as Cognito's would.
    let (status, body) = app
        .post(
            None,
            "/v1/auth/confirm",
            json!({ "email": bob.email, "code": "000000" }),
        )
        .await;
    assert_eq!(
        (status, body["confirmed"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    let (status, fresh) = app
        .post(
            None,
            "/v1/auth/refresh",
            json!({ "refresh_token": bob.tokens["refresh_token"] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{fresh}");
    let token = fresh["access_token"].as_str().unwrap();
    let (status, _) = app.get(Some(token), "/v1/personas").await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app
        .post(None, "/v1/auth/refresh", json!({ "refresh_token": "nope" }))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "unauthorized");
}

#[tokio::test]
async fn operational_endpoints_answer() {
    let app = TestApp::start().await;
    let (status, body) = app.get(None, "/healthz").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, _) = app.get(None, "/readyz").await;
    assert_eq!(status, StatusCode::OK);

    let (status, doc) = app.get(None, "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/v1/personas",
        "/v1/personas/batch",
        "/v1/conversations/{id}/messages",
        "/v1/requests/{id}",
        "/v1/events",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());

    let (status, jwks) = app.get(None, "/.well-known/jwks.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(jwks["keys"][0]["alg"], "RS256");
    assert_eq!(jwks["keys"][0]["kty"], "RSA");

    let alice = app.user("alice").await;
    app.persona(&alice, "Yoda").await;
    // The job is counted just after its request is settled: wait for the count.
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = app
            .http
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics.contains(r#"outcome="succeeded"} 1"#) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        metrics.contains(r#"characterbot_jobs_total{kind="persona",outcome="succeeded"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(
        r#"characterbot_http_requests_total{method="POST",route="/v1/personas",status="202"} 1"#
    ));
    assert!(metrics.contains(r#"characterbot_queue_messages{queue="persona",state="visible"} 0"#));
    assert!(metrics.contains(
        r#"characterbot_model_tokens_total{kind="persona",model="offline",direction="output"}"#
    ));

    let (status, body) = app.get(None, "/no/such/route").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
}

/// A conversation keeps the persona it began with: deleting the persona leaves the
/// conversation and its messages readable, and refuses new messages with `409
/// persona_deleted`, on both backends.
async fn a_deleted_personas_conversation_stays_readable_and_refuses_messages(app: TestApp) {
    let alice = app.user("alice").await;
    let conv = app.conversation(&alice, "Sherlock Holmes").await;
    let path = format!("/v1/conversations/{conv}/messages");
    let (_, accepted) = app
        .post(Some(&alice.token), &path, json!({ "text": "Hello" }))
        .await;
    let done = app
        .finished(&alice, accepted["request_id"].as_str().unwrap())
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");

    let (_, about) = app
        .get(Some(&alice.token), &format!("/v1/conversations/{conv}"))
        .await;
    let persona = about["persona_id"].as_str().unwrap().to_owned();
    let (status, _) = app
        .delete(Some(&alice.token), &format!("/v1/personas/{persona}"))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let (status, refused) = app
        .post(Some(&alice.token), &path, json!({ "text": "Still there?" }))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert_eq!(refused["error"]["code"], "persona_deleted", "{refused}");
    let (status, _) = app
        .get(Some(&alice.token), &format!("/v1/conversations/{conv}"))
        .await;
    assert_eq!(status, StatusCode::OK);
    let texts: Vec<String> = app
        .messages(&alice, &conv)
        .await
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert_eq!(texts[0], "Hello");
    // And a new conversation with the deleted persona is refused.
    let (status, _) = app
        .post(
            Some(&alice.token),
            "/v1/conversations",
            json!({ "persona_id": persona }),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_deleted_personas_conversation_stays_readable_on_the_embedded_default() {
    a_deleted_personas_conversation_stays_readable_and_refuses_messages(
        TestApp::builder().start().await,
    )
    .await;
}

#[tokio::test]
async fn a_deleted_personas_conversation_stays_readable_on_aws() {
    a_deleted_personas_conversation_stays_readable_and_refuses_messages(
        TestApp::builder().on_aws().start().await,
    )
    .await;
}

/// Messages sent back to back are answered one at a time, in the order accepted: each reply
/// sees the replies before it (the model takes a while, so that unordered jobs would overlap).
async fn a_conversations_turns_are_answered_in_order(app: TestApp) {
    let alice = app.user("alice").await;
    let conv = app.conversation(&alice, "Sherlock Holmes").await;
    let path = format!("/v1/conversations/{conv}/messages");
    let texts = ["First", "Second", "Third"];
    let mut ids = Vec::new();
    for text in texts {
        let (status, accepted) = app
            .post(Some(&alice.token), &path, json!({ "text": text }))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        ids.push(accepted["request_id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        let done = app.finished(&alice, id).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    let history = app.messages(&alice, &conv).await;
    let said: Vec<&str> = history
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(said.len(), 6, "{said:?}");
    assert_eq!([said[0], said[2], said[4]], texts);
    assert!(said[1].contains("start of our conversation"), "{}", said[1]);
    assert!(said[3].contains("exchanged 2 messages"), "{}", said[3]);
    assert!(said[5].contains("exchanged 4 messages"), "{}", said[5]);
}

#[tokio::test]
async fn a_conversations_turns_are_answered_in_order_on_the_embedded_default() {
    a_conversations_turns_are_answered_in_order(
        TestApp::builder()
            .arg("--offline-delay-ms", "300")
            .start()
            .await,
    )
    .await;
}

#[tokio::test]
async fn a_conversations_turns_are_answered_in_order_on_aws() {
    a_conversations_turns_are_answered_in_order(
        TestApp::builder()
            .on_aws()
            .arg("--offline-delay-ms", "300")
            .start()
            .await,
    )
    .await;
}
