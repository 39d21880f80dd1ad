//! The pipeline on the AWS backend — queues on SQS, records and events on DynamoDB, accounts on
//! Cognito, all on the moto server of `scripts/test` — through the same HTTP API and the same
//! workers as the embedded default, in this process: the adapters change, nothing else does.
//! The backend is built as the product builds it (`--backend aws`, `aws-init`,
//! `open_ports`); `aws_backend.rs` runs it as separate processes.

use std::sync::Arc;
use std::time::Duration;

use crate::common::{Hangs, TestApp};
use async_trait::async_trait;
use characterbot::Models;
use reqwest::StatusCode;
use serde_json::json;
use shared::domain::RequestKind;
use shared::models::offline::{OfflineChatModel, OfflinePersonaModel};
use shared::models::{ChatModel, ChatRequest, ModelOutput};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::Notify;

struct Overloaded;

#[async_trait]
impl ChatModel for Overloaded {
    fn model(&self) -> &str {
        "overloaded"
    }
    async fn reply(
        &self,
        _: &ChatRequest,
        _: Option<UnboundedSender<String>>,
    ) -> shared::Result<ModelOutput<String>> {
        Err(shared::Error::ModelTransient {
            message: "overloaded".into(),
            retry_after: None,
        })
    }
}

fn models(chat: Arc<dyn ChatModel>) -> Models {
    Models {
        persona: Arc::new(OfflinePersonaModel::default()),
        chat,
    }
}

#[tokio::test]
async fn the_flow_runs_unchanged_on_sqs_and_dynamodb() {
    let app = TestApp::builder().on_aws().start().await;
    let alice = app.user("alice").await;
    let persona = app.persona(&alice, "Sherlock Holmes").await;
    assert_eq!(persona["name"], "Sherlock Holmes");
    let (status, conv) = app
        .post(
            Some(&alice.token),
            "/v1/conversations",
            json!({ "persona_id": persona["persona_id"] }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let conv_id = conv["conversation_id"].as_str().unwrap();
    for text in ["Who stole the pearl?", "The butler?"] {
        let (_, accepted) = app
            .post(
                Some(&alice.token),
                &format!("/v1/conversations/{conv_id}/messages"),
                json!({ "text": text }),
            )
            .await;
        let done = app
            .finished(&alice, accepted["request_id"].as_str().unwrap())
            .await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    let history = app.messages(&alice, conv_id).await;
    let roles: Vec<_> = history
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    let (_, batch) = app
        .post(
            Some(&alice.token),
            "/v1/personas/batch",
            json!({ "prompts": ["Yoda", "Gandalf", "a shy robot"] }),
        )
        .await;
    for id in batch["request_ids"].as_array().unwrap() {
        app.finished(&alice, id.as_str().unwrap()).await;
    }
    let (_, counts) = app
        .get(
            Some(&alice.token),
            &format!("/v1/batches/{}", batch["batch_id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(
        (counts["succeeded"].as_u64(), counts["pending"].as_u64()),
        (Some(3), Some(0)),
        "{counts}"
    );
    let bob = app.user("bob").await;
    let (status, _) = app
        .get(
            Some(&bob.token),
            &format!("/v1/conversations/{conv_id}/messages"),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_killed_worker_and_a_poison_job_on_sqs() {
    let app = TestApp::builder()
        .on_aws()
        .without_workers()
        // SQS counts visibility in whole seconds: 2 s leaves the heartbeat room to keep ahead.
        .arg("--visibility-timeout-secs", "2")
        .arg("--max-receives", "3")
        .arg("--retry-base-ms", "100")
        .arg("--inprocess-retries", "0")
        .start()
        .await;
    app.start_worker(
        RequestKind::Persona,
        &models(Arc::new(OfflineChatModel::default())),
    );
    let alice = app.user("alice").await;
    let conv = app.conversation(&alice, "Yoda").await;
    let path = format!("/v1/conversations/{conv}/messages");

    // Killed mid-job: SQS redelivers after the visibility timeout; one reply.
    let started = Arc::new(Notify::new());
    let doomed = app.start_worker(RequestKind::Chat, &models(Arc::new(Hangs(started.clone()))));
    let (_, accepted) = app
        .post(Some(&alice.token), &path, json!({ "text": "Teach me" }))
        .await;
    tokio::time::timeout(Duration::from_secs(30), started.notified())
        .await
        .expect("job started");
    // Killed once the attempt is on the request (a worker killed sooner leaves no trace of it).
    app.running(&alice, accepted["request_id"].as_str().unwrap())
        .await;
    doomed.abort();
    let survivor = app.start_worker(
        RequestKind::Chat,
        &models(Arc::new(OfflineChatModel::default())),
    );
    let done = app
        .finished(&alice, accepted["request_id"].as_str().unwrap())
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    // At least the killed delivery and the one that finished. The killed worker's pending long
    // poll may still claim the message once more on the server (SQS does the same with a dead
    // client), which is why the invariant is the single reply, not the count.
    assert!(done["attempts"].as_u64().unwrap() >= 2, "{done}");
    assert_eq!(app.messages(&alice, &conv).await.len(), 2);
    survivor.abort();

    // Always failing: dead-lettered on SQS after max_receives, the request failed with the reason.
    app.start_worker(RequestKind::Chat, &models(Arc::new(Overloaded)));
    let (_, accepted) = app
        .post(Some(&alice.token), &path, json!({ "text": "Again" }))
        .await;
    let failed = app
        .finished(&alice, accepted["request_id"].as_str().unwrap())
        .await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["attempts"], 3);
    assert!(failed["error"]["message"]
        .as_str()
        .unwrap()
        .contains("gave up after 3 attempts"));
    for _ in 0..100 {
        if app.adapters.chat_queue.stats().await.unwrap().dead == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not dead-lettered on SQS");
}
