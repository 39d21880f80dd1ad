//! An accepted request is never lost and never answered twice: worker deaths, duplicate
//! deliveries, poison jobs, permanent errors and shutdowns each end in exactly one outcome.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{with_chat, Hangs, TestApp, User};
use async_trait::async_trait;
use characterbot::Models;
use serde_json::json;
use shared::domain::{Message, RequestKind, Role};
use shared::ids::RequestId;
use shared::job::{Job, TraceContext};
use shared::models::offline::OfflineChatModel;
use shared::models::{ChatModel, ChatRequest, ModelOutput};
use shared::Error;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A chat model that fails every call with the error `make` builds, counting calls.
struct Fails {
    calls: AtomicUsize,
    make: fn() -> Error,
}

#[async_trait]
impl ChatModel for Fails {
    fn model(&self) -> &str {
        "fails"
    }
    async fn reply(
        &self,
        _: &ChatRequest,
        _: Option<UnboundedSender<String>>,
    ) -> shared::Result<ModelOutput<String>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err((self.make)())
    }
}

fn offline() -> Models {
    with_chat(Arc::new(OfflineChatModel::default()))
}

/// An app whose persona worker runs and whose chat workers each test starts itself.
async fn app(extra: &[(&str, &str)]) -> (TestApp, User, String) {
    let mut b = TestApp::builder().without_workers();
    for (k, v) in extra {
        b = b.arg(k, v);
    }
    let app = b.start().await;
    app.start_worker(RequestKind::Persona, &offline());
    let alice = app.user("alice").await;
    let conv = app.conversation(&alice, "Sherlock Holmes").await;
    (app, alice, conv)
}

async fn say(app: &TestApp, user: &User, conv: &str, text: &str) -> String {
    app.say(user, conv, text).await["request_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The request is failed before its message is moved (so a crash between the two still leaves
/// the client an answer); wait for the move.
/// The chat message is received `times` times by workers that die before settling anything.
async fn received_by_dying_workers(app: &TestApp, times: usize) {
    for _ in 0..times {
        let got = app
            .adapters
            .chat_queue
            .receive(1, Duration::ZERO, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got.len(), 1);
        // Each started the job (where it had not finished), then died before settling it.
        let job = Job::decode(&got[0]).unwrap();
        app.adapters
            .atomic
            .start(&job.user_id, &job.request_id)
            .await
            .unwrap();
    }
}

async fn dead_letters(app: &TestApp, n: usize) -> Vec<shared::queue::DeadLetter> {
    for _ in 0..100 {
        let dead = app.adapters.chat_queue.dead_letters(10).await.unwrap();
        if dead.len() >= n {
            return dead;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("expected {n} dead letters");
}

/// The request is settled before its message is deleted; wait for the delete.
async fn queue_drained(app: &TestApp) {
    for _ in 0..100 {
        if app.queue_total(RequestKind::Chat).await == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the chat queue was not drained");
}

async fn status_of(app: &TestApp, user: &User, request_id: &str) -> serde_json::Value {
    app.get(Some(&user.token), &format!("/v1/requests/{request_id}"))
        .await
        .1
}

#[tokio::test]
async fn a_worker_killed_mid_job_is_replaced_and_the_conversation_gets_exactly_one_reply() {
    let (app, alice, conv) = app(&[("--visibility-timeout-secs", "1")]).await;
    let started = Arc::new(Notify::new());
    let doomed = app.start_worker(
        RequestKind::Chat,
        &with_chat(Arc::new(Hangs(started.clone()))),
    );
    let request_id = say(&app, &alice, &conv, "Who did it?").await;
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("job started");
    app.running(&alice, &request_id).await;
    doomed.abort(); // killed: nothing settled, the message is still hidden

    app.start_worker(RequestKind::Chat, &offline());
    let done = app.finished(&alice, &request_id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        done["attempts"], 2,
        "delivered again after the visibility timeout"
    );
    let messages = app.messages(&alice, &conv).await;
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[1]["role"], "assistant");
    queue_drained(&app).await;
}

#[tokio::test]
async fn duplicate_deliveries_never_produce_a_second_reply_or_a_second_model_call() {
    let (app, alice, conv) = app(&[]).await;
    app.start_worker(RequestKind::Chat, &offline());
    let request_id = say(&app, &alice, &conv, "First question").await;
    let done = app.finished(&alice, &request_id).await;

    // The queue delivers the same job again (SQS standard queues may).
    let job = Job {
        request_id: request_id.as_str().into(),
        user_id: alice.user_id.clone(),
        kind: RequestKind::Chat,
        trace: TraceContext::default(),
        accepted: None,
    };
    app.adapters.chat_queue.send(&[job.encode()]).await.unwrap();
    queue_drained(&app).await;
    assert_eq!(app.messages(&alice, &conv).await.len(), 2);
    assert_eq!(
        status_of(&app, &alice, &request_id).await,
        done,
        "the finished request is unchanged"
    );
    let metrics = app.adapters.metrics.render();
    assert!(
        metrics.contains(r#"characterbot_jobs_total{kind="chat",outcome="duplicate"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_reply_stored_by_a_twin_delivery_stands_and_no_second_is_stored() {
    let (app, alice, conv) = app(&[]).await;
    let request_id = say(&app, &alice, &conv, "Are you there?").await;
    // Another delivery of the same job stored its reply first (settlement is atomic, so on the
    // embedded backend only a twin settling concurrently can do that).
    let (_, history) = app
        .get(
            Some(&alice.token),
            &format!("/v1/conversations/{conv}/messages"),
        )
        .await;
    let user_message_id = history["items"][1]["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let earlier = Message {
        model: Some("offline".into()),
        created_at: shared::time::now_rfc3339(),
        ..Message::new(
            RequestId::from(request_id.as_str()).reply_id(),
            Role::Assistant,
            "The reply the twin wrote.".into(),
            None,
        )
    };
    app.adapters
        .store
        .put_reply(
            &alice.user_id,
            &conv.as_str().into(),
            &user_message_id.into(),
            &earlier,
        )
        .await
        .unwrap();

    app.start_worker(
        RequestKind::Chat,
        &with_chat(Arc::new(OfflineChatModel::default())),
    );
    let done = app.finished(&alice, &request_id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        done["result"]["message"]["text"], "The reply the twin wrote.",
        "the request carries the reply that stands"
    );
    let messages = app.messages(&alice, &conv).await;
    assert_eq!(messages.len(), 2, "one reply: {messages:?}");
    assert_eq!(messages[1]["text"], "The reply the twin wrote.");
}

#[tokio::test]
async fn a_job_that_always_fails_is_dead_lettered_after_max_receives() {
    let (app, alice, conv) = app(&[
        ("--max-receives", "3"),
        ("--retry-base-ms", "50"),
        ("--retry-max-ms", "200"),
        ("--inprocess-retries", "1"),
    ])
    .await;
    let model = Arc::new(Fails {
        calls: AtomicUsize::new(0),
        make: || Error::ModelTransient {
            message: "provider is overloaded".into(),
            retry_after: None,
        },
    });
    app.start_worker(RequestKind::Chat, &with_chat(model.clone()));
    let request_id = say(&app, &alice, &conv, "Hello?").await;
    let done = app.finished(&alice, &request_id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["attempts"], 3);
    assert_eq!(done["error"]["code"], "model_unavailable");
    let message = done["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("gave up after 3 attempts") && message.contains("overloaded"),
        "{message}"
    );
    // 3 deliveries × (1 try + 1 in-process retry).
    assert_eq!(model.calls.load(Ordering::SeqCst), 6);
    let dead = dead_letters(&app, 1).await;
    assert_eq!(dead.len(), 1);
    assert!(dead[0].body.contains(&request_id));
    assert_eq!(dead[0].receive_count, 3);
    let stats = app.adapters.chat_queue.stats().await.unwrap();
    assert_eq!((stats.visible, stats.in_flight, stats.dead), (0, 0, 1));
    let messages = app.messages(&alice, &conv).await;
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(
        (messages[1]["status"].as_str(), messages[1]["text"].as_str()),
        (Some("failed"), Some("")),
        "no fake reply: the failure in its place"
    );
    assert_eq!(messages[1]["error"]["code"], "model_unavailable");
}

#[tokio::test]
async fn a_permanent_error_fails_the_request_at_once() {
    let (app, alice, conv) = app(&[]).await;
    let model = Arc::new(Fails {
        calls: AtomicUsize::new(0),
        make: || Error::ModelPermanent {
            code: "content_filtered".into(),
            message: "the reply was blocked".into(),
        },
    });
    app.start_worker(RequestKind::Chat, &with_chat(model.clone()));
    let request_id = say(&app, &alice, &conv, "Something rude").await;
    let done = app.finished(&alice, &request_id).await;
    assert_eq!(
        (done["status"].as_str(), done["attempts"].as_u64()),
        (Some("failed"), Some(1))
    );
    assert_eq!(
        done["error"],
        json!({ "code": "content_filtered", "message": "the reply was blocked" })
    );
    assert_eq!(model.calls.load(Ordering::SeqCst), 1);
    queue_drained(&app).await; // deleted, not dead-lettered
    assert!(app
        .adapters
        .chat_queue
        .dead_letters(10)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn a_message_whose_workers_keep_dying_is_dead_lettered_without_running_again() {
    let (app, alice, conv) = app(&[("--max-receives", "2")]).await;
    let request_id = say(&app, &alice, &conv, "Crash me").await;
    // Two workers received it and died before settling anything.
    received_by_dying_workers(&app, 2).await;
    let model = Arc::new(Fails {
        calls: AtomicUsize::new(0),
        make: || Error::internal_msg("must not run"),
    });
    app.start_worker(RequestKind::Chat, &with_chat(model.clone()));
    let done = app.finished(&alice, &request_id).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["error"]["code"], "max_attempts_exceeded");
    assert_eq!(model.calls.load(Ordering::SeqCst), 0);
    assert_eq!(dead_letters(&app, 1).await.len(), 1);
}

/// A job that kills its worker at once, before it would be marked running, is not redelivered
/// forever: from its second delivery on, each attempt is counted before the job runs, and once
/// they are used up the request fails and the message is dead-lettered.
#[tokio::test]
async fn a_job_that_kills_its_worker_at_once_is_still_dead_lettered() {
    let (app, alice, conv) =
        app(&[("--max-receives", "2"), ("--visibility-timeout-secs", "1")]).await;
    let request_id = say(&app, &alice, &conv, "Crash me fast").await;
    for _ in 0..3 {
        let started = Arc::new(Notify::new());
        let doomed = app.start_worker(
            RequestKind::Chat,
            &with_chat(Arc::new(Hangs(started.clone()))),
        );
        tokio::time::timeout(Duration::from_secs(10), started.notified())
            .await
            .expect("job started");
        doomed.abort(); // well within the 250 ms before a job is marked running
    }
    let model = Arc::new(Fails {
        calls: AtomicUsize::new(0),
        make: || Error::internal_msg("must not run"),
    });
    app.start_worker(RequestKind::Chat, &with_chat(model.clone()));
    let done = app.finished(&alice, &request_id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "max_attempts_exceeded");
    assert_eq!(model.calls.load(Ordering::SeqCst), 0);
    assert_eq!(dead_letters(&app, 1).await.len(), 1);
}

#[tokio::test]
async fn a_finished_requests_message_that_keeps_coming_back_is_dropped_not_dead_lettered() {
    let (app, alice, conv) = app(&[("--max-receives", "2")]).await;
    let stop = CancellationToken::new();
    let first = app.start_worker_until(RequestKind::Chat, &offline(), stop.clone());
    let request_id = say(&app, &alice, &conv, "Answer me once").await;
    let done = app.finished(&alice, &request_id).await;
    assert_eq!(done["status"], "succeeded");
    stop.cancel();
    first.await.unwrap();
    // Its delete was lost: the message is back, and is received past `max_receives` by
    // workers that die before doing anything.
    let job = Job {
        request_id: request_id.as_str().into(),
        user_id: alice.user_id.clone(),
        kind: RequestKind::Chat,
        trace: TraceContext::default(),
        accepted: None,
    };
    app.adapters.chat_queue.send(&[job.encode()]).await.unwrap();
    received_by_dying_workers(&app, 2).await;
    app.start_worker(RequestKind::Chat, &offline());
    queue_drained(&app).await;
    assert!(
        app.adapters
            .chat_queue
            .dead_letters(10)
            .await
            .unwrap()
            .is_empty(),
        "a finished request was dead-lettered"
    );
    assert_eq!(status_of(&app, &alice, &request_id).await, done);
}

/// A chat worker takes the queued job, starts it (its model never answers), and is shut down
/// mid-job.
async fn interrupted_by_a_shutdown(app: &TestApp) {
    let started = Arc::new(Notify::new());
    let stop = CancellationToken::new();
    let worker = app.start_worker_until(
        RequestKind::Chat,
        &with_chat(Arc::new(Hangs(started.clone()))),
        stop.clone(),
    );
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("job started");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("worker stopped")
        .unwrap();
}

#[tokio::test]
async fn shutdown_hands_in_flight_messages_back_and_the_next_worker_finishes_them() {
    let (app, alice, conv) = app(&[
        ("--shutdown-grace-secs", "0"),
        ("--visibility-timeout-secs", "60"),
    ])
    .await;
    let request_id = say(&app, &alice, &conv, "Slow question").await;
    interrupted_by_a_shutdown(&app).await;

    let record = status_of(&app, &alice, &request_id).await;
    assert_eq!(record["status"], "queued", "{record}");
    assert_eq!(record["error"]["code"], "interrupted");
    let stats = app.adapters.chat_queue.stats().await.unwrap();
    assert_eq!(
        (stats.visible, stats.in_flight),
        (1, 0),
        "visible again at once, not after 60 s"
    );

    app.start_worker(RequestKind::Chat, &offline());
    let done = app.finished(&alice, &request_id).await;
    assert_eq!(done["status"], "succeeded");
    assert!(done.get("error").is_none(), "{done}");
    assert_eq!(
        done["attempts"], 1,
        "the interrupted attempt was given back"
    );
    assert_eq!(app.messages(&alice, &conv).await.len(), 2);
}

#[tokio::test]
async fn hand_backs_on_shutdown_never_use_up_a_jobs_attempts() {
    // Two attempts allowed; the job is interrupted by three shutdowns (three deploys) first.
    let (app, alice, conv) = app(&[
        ("--shutdown-grace-secs", "0"),
        ("--visibility-timeout-secs", "60"),
        ("--max-receives", "2"),
    ])
    .await;
    let request_id = say(&app, &alice, &conv, "Patience").await;
    for _ in 0..3 {
        interrupted_by_a_shutdown(&app).await;
        let record = status_of(&app, &alice, &request_id).await;
        assert_eq!(
            (record["status"].as_str(), record["attempts"].as_u64()),
            (Some("queued"), Some(0)),
            "{record}"
        );
    }
    app.start_worker(RequestKind::Chat, &offline());
    let done = app.finished(&alice, &request_id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 1);
    assert!(app
        .adapters
        .chat_queue
        .dead_letters(10)
        .await
        .unwrap()
        .is_empty());
}
