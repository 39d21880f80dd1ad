//! Conversations as people use them (issue #12): each message's status and request, the
//! persona's greeting, and conversations and personas as records to manage. On both backends
//! where the storage differs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{Hangs, TestApp, User};
use characterbot::Models;
use reqwest::StatusCode;
use serde_json::{json, Value};
use shared::domain::RequestKind;
use shared::ids::RequestId;
use shared::models::offline::OfflinePersonaModel;

/// An app with a persona worker and no chat worker (each test starts its own).
async fn without_chat_workers(aws: bool) -> TestApp {
    let mut builder = TestApp::builder().without_workers();
    if aws {
        builder = builder.on_aws();
    }
    let app = builder.start().await;
    app.start_worker(RequestKind::Persona, &app.adapters.models.clone());
    app
}

async fn say(app: &TestApp, user: &User, conv: &str, text: &str) -> Value {
    let (status, body) = app
        .post(
            Some(&user.token),
            &format!("/v1/conversations/{conv}/messages"),
            json!({ "text": text }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body
}

async fn turns(app: &TestApp, user: &User, conv: &str) -> Vec<Value> {
    app.messages(user, conv).await
}

/// Lists the conversation's messages until `done` holds of them (10 s at most).
async fn messages_until(
    app: &TestApp,
    user: &User,
    conv: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let messages = turns(app, user, conv).await;
        if done(&messages) {
            return messages;
        }
        assert!(Instant::now() < deadline, "never came: {messages:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_listing_shows_each_reply_as_it_stands(app: TestApp) {
    let alice = app.user("alice").await;
    let conv = app.conversation(&alice, "Sherlock Holmes").await;
    let accepted = say(&app, &alice, &conv, "Hello?").await;
    let request_id = accepted["request_id"].as_str().unwrap();
    let reply_id = RequestId::from(request_id).reply_id().to_string();

    // Queued: the user message, then its reply's stand-in under the id the reply will have.
    let queued = turns(&app, &alice, &conv).await;
    assert_eq!(queued.len(), 2, "{queued:?}");
    assert_eq!(queued[0]["message_id"], accepted["message_id"]);
    assert_eq!(queued[0]["status"], "complete");
    assert_eq!(queued[0]["request_id"], request_id);
    assert_eq!(
        (
            queued[1]["message_id"].as_str(),
            queued[1]["role"].as_str(),
            queued[1]["status"].as_str(),
            queued[1]["request_id"].as_str(),
            queued[1]["text"].as_str(),
        ),
        (
            Some(reply_id.as_str()),
            Some("assistant"),
            Some("pending"),
            Some(request_id),
            Some("")
        )
    );

    app.start_worker(RequestKind::Chat, &app.adapters.models.clone());
    app.finished(&alice, request_id).await;
    let answered = turns(&app, &alice, &conv).await;
    assert_eq!(answered.len(), 2, "{answered:?}");
    assert_eq!(answered[1]["message_id"], reply_id.as_str());
    assert_eq!(answered[1]["status"], "complete");
    assert_eq!(answered[1]["request_id"], request_id);
    assert!(!answered[1]["text"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn a_listing_shows_each_reply_as_it_stands_on_the_embedded_default() {
    a_listing_shows_each_reply_as_it_stands(without_chat_workers(false).await).await;
}

#[tokio::test]
async fn a_listing_shows_each_reply_as_it_stands_on_aws() {
    a_listing_shows_each_reply_as_it_stands(without_chat_workers(true).await).await;
}

#[tokio::test]
async fn a_reply_being_written_is_streaming() {
    let app = without_chat_workers(false).await;
    let alice = app.user("alice").await;
    let conv = app.conversation(&alice, "Sherlock Holmes").await;
    let called = Arc::new(tokio::sync::Notify::new());
    let models = Models {
        persona: Arc::new(OfflinePersonaModel::default()),
        chat: Arc::new(Hangs(called.clone())),
    };
    app.start_worker(RequestKind::Chat, &models);
    let accepted = say(&app, &alice, &conv, "Hello?").await;
    called.notified().await;
    // Marked running once the model has taken a moment (see `workers::start`).
    let messages = messages_until(&app, &alice, &conv, |m| {
        m.len() == 2 && m[1]["status"] == "streaming"
    })
    .await;
    assert_eq!(messages[1]["request_id"], accepted["request_id"]);
}
