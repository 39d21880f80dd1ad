//! Conversations as people use them (issue #12): each message's status and request, the
//! persona's greeting, and conversations and personas as records to manage. On both backends
//! where the storage differs.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{with_chat, Hangs, TestApp, User};
use async_trait::async_trait;
use characterbot::Models;
use reqwest::StatusCode;
use serde_json::{json, Value};
use shared::domain::RequestKind;
use shared::ids::RequestId;
use shared::models::offline::{OfflineChatModel, OfflinePersonaModel};
use shared::models::{ChatModel, ChatRequest, ModelOutput};
use tokio::sync::mpsc::UnboundedSender;

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
    let accepted = app.say(&alice, &conv, "Hello?").await;
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
    let accepted = app.say(&alice, &conv, "Hello?").await;
    called.notified().await;
    // Marked running once the model has taken a moment (see `workers::start`).
    let messages = messages_until(&app, &alice, &conv, |m| {
        m.len() == 2 && m[1]["status"] == "streaming"
    })
    .await;
    assert_eq!(messages[1]["request_id"], accepted["request_id"]);
}

async fn create(app: &TestApp, user: &User, body: Value) -> Value {
    let (status, conv) = app.post(Some(&user.token), "/v1/conversations", body).await;
    assert_eq!(status, StatusCode::CREATED, "{conv}");
    conv
}

async fn listed(app: &TestApp, user: &User, query: &str) -> Vec<String> {
    let (status, page) = app
        .get(Some(&user.token), &format!("/v1/conversations{query}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["conversation_id"].as_str().unwrap().to_owned())
        .collect()
}

async fn conversations_are_records_people_manage(app: TestApp) {
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let holmes = app.persona(&alice, "Sherlock Holmes").await;
    let pirate = app.persona(&alice, "a grumpy pirate who loves cats").await;
    let id = |c: &Value| c["conversation_id"].as_str().unwrap().to_owned();

    // Begun with the greeting: it is the preview; a title only when given.
    let case = create(&app, &alice, json!({ "persona_id": holmes["persona_id"] })).await;
    assert_eq!(case["title"], Value::Null);
    assert_eq!(case["preview"], holmes["greeting"]);
    assert_eq!(case["last_message_at"], case["created_at"]);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let voyage = create(
        &app,
        &alice,
        json!({ "persona_id": pirate["persona_id"], "title": "  The voyage  " }),
    )
    .await;
    assert_eq!(voyage["title"], "The voyage");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let other = create(&app, &alice, json!({ "persona_id": holmes["persona_id"] })).await;
    let (case, voyage, other) = (id(&case), id(&voyage), id(&other));
    assert_eq!(
        listed(&app, &alice, "").await,
        [other.clone(), voyage.clone(), case.clone()]
    );

    // A turn moves its conversation first, titles it, and the reply becomes its preview.
    let accepted = app
        .say(&alice, &case, "Who stole the Blue Carbuncle?")
        .await;
    let done = app
        .finished(&alice, accepted["request_id"].as_str().unwrap())
        .await;
    let (_, record) = app
        .get(Some(&alice.token), &format!("/v1/conversations/{case}"))
        .await;
    assert_eq!(record["title"], "Who stole the Blue Carbuncle?");
    let reply = done["result"]["message"]["text"].as_str().unwrap();
    let preview = record["preview"].as_str().unwrap();
    assert!(
        preview.ends_with('…') && reply.starts_with(preview.trim_end_matches('…')),
        "{preview:?} of {reply:?}"
    );
    assert_eq!(
        record["last_message_at"],
        done["result"]["message"]["created_at"]
    );
    assert_eq!(
        listed(&app, &alice, "").await,
        [case.clone(), other.clone(), voyage.clone()]
    );
    let holmes_id = holmes["persona_id"].as_str().unwrap();
    assert_eq!(
        listed(&app, &alice, &format!("?persona_id={holmes_id}")).await,
        [case.clone(), other.clone()]
    );

    // Renamed by its owner; others find nothing to rename or delete.
    let path = format!("/v1/conversations/{voyage}");
    let renamed = app
        .send(
            app.http
                .patch(app.url(&path))
                .bearer_auth(&alice.token)
                .json(&json!({ "title": "Cats at sea" })),
        )
        .await;
    assert_eq!(renamed.0, StatusCode::OK, "{}", renamed.1);
    assert_eq!(renamed.1["title"], "Cats at sea");
    for (body, code) in [
        (json!({ "title": "   " }), "empty_title"),
        (json!({ "title": "x".repeat(81) }), "title_too_long"),
    ] {
        let (status, err) = app
            .send(
                app.http
                    .patch(app.url(&path))
                    .bearer_auth(&alice.token)
                    .json(&body),
            )
            .await;
        assert_eq!(
            (status, err["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code))
        );
    }
    let (status, _) = app
        .send(
            app.http
                .patch(app.url(&path))
                .bearer_auth(&bob.token)
                .json(&json!({ "title": "Mine" })),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.delete(Some(&bob.token), &path).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Deleted with its messages.
    let gone = format!("/v1/conversations/{case}");
    let (status, _) = app.delete(Some(&alice.token), &gone).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    for path in [gone.clone(), format!("{gone}/messages")] {
        let (status, _) = app.get(Some(&alice.token), &path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let (status, _) = app
        .post(
            Some(&alice.token),
            &format!("{gone}/messages"),
            json!({ "text": "Still there?" }),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.delete(Some(&alice.token), &gone).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(listed(&app, &alice, "").await, [other, voyage]);
    assert!(listed(&app, &bob, "").await.is_empty());
}

#[tokio::test]
async fn conversations_are_records_people_manage_on_the_embedded_default() {
    conversations_are_records_people_manage(TestApp::start().await).await;
}

#[tokio::test]
async fn conversations_are_records_people_manage_on_aws() {
    conversations_are_records_people_manage(TestApp::builder().on_aws().start().await).await;
}

#[tokio::test]
async fn a_conversation_begins_with_the_greeting_asked_for() {
    let app = TestApp::start().await;
    let alice = app.user("alice").await;
    let persona = app.persona(&alice, "Sherlock Holmes").await;
    let conv = create(&app, &alice, json!({ "persona_id": persona["persona_id"] })).await;
    let messages = app
        .all_messages(&alice, conv["conversation_id"].as_str().unwrap())
        .await;
    assert_eq!(messages.len(), 1);
    assert_eq!(
        (
            messages[0]["role"].as_str(),
            &messages[0]["text"],
            messages[0]["status"].as_str()
        ),
        (Some("assistant"), &persona["greeting"], Some("complete"))
    );
    let (status, err) = app
        .post(
            Some(&alice.token),
            "/v1/conversations",
            json!({ "persona_id": persona["persona_id"], "greeting_index": 1 }),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(err["error"]["code"], "bad_greeting_index");
}

async fn patch(app: &TestApp, user: &User, path: &str, body: Value) -> (StatusCode, Value) {
    app.send(
        app.http
            .patch(app.url(path))
            .bearer_auth(&user.token)
            .json(&body),
    )
    .await
}

async fn a_persona_is_edited_and_its_conversations_follow(app: TestApp) {
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let persona = app.persona(&alice, "Sherlock Holmes").await;
    let persona_id = persona["persona_id"].as_str().unwrap();
    let path = format!("/v1/personas/{persona_id}");
    let conv = create(&app, &alice, json!({ "persona_id": persona_id })).await;
    let conv = conv["conversation_id"].as_str().unwrap();

    let (status, edited) = patch(
        &app,
        &alice,
        &path,
        json!({
            "name": "  Mycroft Holmes ",
            "alternate_greetings": ["Ah. You again.", "Sit down; you are late."]
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{edited}");
    assert_eq!(edited["name"], "Mycroft Holmes");
    assert_eq!(
        edited["description"], persona["description"],
        "the rest stays"
    );
    let (_, read) = app.get(Some(&alice.token), &path).await;
    assert_eq!(read, edited);

    // The conversation made before answers from the edited persona, under its new name.
    let accepted = app.say(&alice, conv, "Who are you?").await;
    let done = app
        .finished(&alice, accepted["request_id"].as_str().unwrap())
        .await;
    let reply = done["result"]["message"]["text"].as_str().unwrap();
    assert!(reply.contains("As Mycroft Holmes"), "{reply}");
    let (_, record) = app
        .get(Some(&alice.token), &format!("/v1/conversations/{conv}"))
        .await;
    assert_eq!(record["persona_name"], "Mycroft Holmes");

    // A new conversation may begin with an alternate greeting.
    let second = create(
        &app,
        &alice,
        json!({ "persona_id": persona_id, "greeting_index": 2 }),
    )
    .await;
    let first = app
        .all_messages(&alice, second["conversation_id"].as_str().unwrap())
        .await;
    assert_eq!(first[0]["text"], "Sit down; you are late.");

    // Refused edits change nothing.
    let too_many: Vec<String> = (0..11).map(|i| format!("Hello {i}")).collect();
    for body in [
        json!({}),
        json!({ "name": "   " }),
        json!({ "greeting": "x".repeat(2001) }),
        json!({ "alternate_greetings": too_many }),
        json!({ "alternate_greetings": ["fine", ""] }),
    ] {
        let (status, err) = patch(&app, &alice, &path, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {err}");
        assert_eq!(err["error"]["code"], "invalid_persona", "{body}");
    }
    let (status, err) = patch(&app, &alice, &path, json!({ "source": "original" })).await;
    assert!(
        status.is_client_error(),
        "unknown fields are refused: {status} {err}"
    );
    let (status, _) = patch(&app, &bob, &path, json!({ "name": "Moriarty" })).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, after) = app.get(Some(&alice.token), &path).await;
    assert_eq!(after, edited);
}

#[tokio::test]
async fn a_persona_is_edited_and_its_conversations_follow_on_the_embedded_default() {
    a_persona_is_edited_and_its_conversations_follow(TestApp::start().await).await;
}

#[tokio::test]
async fn a_persona_is_edited_and_its_conversations_follow_on_aws() {
    a_persona_is_edited_and_its_conversations_follow(TestApp::builder().on_aws().start().await)
        .await;
}

/// A chat model that counts its calls and answers as the offline engine does.
struct Counting {
    calls: AtomicUsize,
    inner: OfflineChatModel,
}

#[async_trait]
impl ChatModel for Counting {
    fn model(&self) -> &str {
        "offline"
    }
    async fn reply(
        &self,
        request: &ChatRequest,
        tx: Option<UnboundedSender<String>>,
    ) -> shared::Result<ModelOutput<String>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.reply(request, tx).await
    }
}

/// A chat model that writes the first words of a reply, then never finishes; tells when its
/// call is dropped (stopped).
struct Stalls {
    dropped: Arc<AtomicBool>,
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

const FIRST_WORDS: &str = "It was a dark and stormy night; ";

#[async_trait]
impl ChatModel for Stalls {
    fn model(&self) -> &str {
        "stalls"
    }
    async fn reply(
        &self,
        _: &ChatRequest,
        tx: Option<UnboundedSender<String>>,
    ) -> shared::Result<ModelOutput<String>> {
        let _stopped = SetOnDrop(self.dropped.clone());
        if let Some(tx) = tx {
            let _ = tx.send(FIRST_WORDS.to_owned());
        }
        std::future::pending().await
    }
}

/// A turn whose reply is being written by a chat model that [`Stalls`]: its request, seen
/// running, and the flag telling when the model call is dropped.
async fn stalled_turn(
    app: &TestApp,
    user: &User,
    conv: &str,
    text: &str,
) -> (String, Arc<AtomicBool>) {
    let dropped = Arc::new(AtomicBool::new(false));
    app.start_worker(
        RequestKind::Chat,
        &with_chat(Arc::new(Stalls {
            dropped: dropped.clone(),
        })),
    );
    let accepted = app.say(user, conv, text).await;
    let request_id = accepted["request_id"].as_str().unwrap().to_owned();
    app.running(user, &request_id).await;
    (request_id, dropped)
}

async fn cancel(app: &TestApp, user: &User, request_id: &str) -> (StatusCode, Value) {
    app.post(
        Some(&user.token),
        &format!("/v1/requests/{request_id}/cancel"),
        json!({}),
    )
    .await
}

async fn a_queued_turn_is_cancelled_without_running(app: TestApp) {
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let conv = app.conversation(&alice, "Sherlock Holmes").await;
    let first = app.say(&alice, &conv, "Never mind this one.").await;
    let first_id = first["request_id"].as_str().unwrap();
    let (status, _) = cancel(&app, &bob, first_id).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not bob's to cancel");
    let (status, cancelled) = cancel(&app, &alice, first_id).await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    let (status, again) = cancel(&app, &alice, first_id).await;
    assert_eq!(
        (status, &again["status"]),
        (StatusCode::OK, &json!("cancelled"))
    );
    // A reply still queued is not regenerated (cancel it first, as here).
    let pending = app.say(&alice, &conv, "Still there?").await;
    let pending_reply = RequestId::from(pending["request_id"].as_str().unwrap()).reply_id();
    let (status, err) = app
        .post(
            Some(&alice.token),
            &format!("/v1/conversations/{conv}/messages/{pending_reply}/regenerate"),
            json!({}),
        )
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("reply_in_progress"))
    );
    let (status, _) = cancel(&app, &alice, pending["request_id"].as_str().unwrap()).await;
    assert_eq!(status, StatusCode::OK);

    // A worker comes: the cancelled turn does not reach the model; the next one is answered.
    let model = Arc::new(Counting {
        calls: AtomicUsize::new(0),
        inner: OfflineChatModel::default(),
    });
    app.start_worker(RequestKind::Chat, &with_chat(model.clone()));
    let second = app.say(&alice, &conv, "What do you make of it?").await;
    let done = app
        .finished(&alice, second["request_id"].as_str().unwrap())
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        model.calls.load(Ordering::SeqCst),
        1,
        "only the second turn ran"
    );
    let (_, first_now) = app
        .get(Some(&alice.token), &format!("/v1/requests/{first_id}"))
        .await;
    assert_eq!(first_now["status"], "cancelled");
    let messages = app.messages(&alice, &conv).await;
    let statuses: Vec<(&str, &str)> = messages
        .iter()
        .map(|m| (m["role"].as_str().unwrap(), m["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        statuses,
        [
            ("user", "complete"),
            ("assistant", "cancelled"),
            ("user", "complete"),
            ("assistant", "cancelled"),
            ("user", "complete"),
            ("assistant", "complete")
        ]
    );
    assert_eq!(messages[1]["text"], "");
    let (status, err) = cancel(&app, &alice, second["request_id"].as_str().unwrap()).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("request_finished"))
    );
}

#[tokio::test]
async fn a_queued_turn_is_cancelled_without_running_on_the_embedded_default() {
    a_queued_turn_is_cancelled_without_running(without_chat_workers(false).await).await;
}

#[tokio::test]
async fn a_queued_turn_is_cancelled_without_running_on_aws() {
    a_queued_turn_is_cancelled_without_running(without_chat_workers(true).await).await;
}

async fn a_reply_being_written_is_stopped_and_keeps_its_beginning(app: TestApp) {
    let alice = app.user("alice").await;
    let conv = app.conversation(&alice, "Sherlock Holmes").await;
    let (request_id, dropped) = stalled_turn(&app, &alice, &conv, "Tell me a story.").await;
    let request_id = request_id.as_str();
    let (status, asked) = cancel(&app, &alice, request_id).await;
    assert_eq!(status, StatusCode::OK, "{asked}");
    assert_eq!(
        (
            asked["status"].as_str(),
            asked["cancel_requested"].as_bool()
        ),
        (Some("running"), Some(true)),
        "its worker is told"
    );
    let done = app.finished(&alice, request_id).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(dropped.load(Ordering::SeqCst), "the model call was stopped");
    let reply = &done["result"]["message"];
    assert_eq!(
        (reply["text"].as_str(), reply["status"].as_str()),
        (Some(FIRST_WORDS), Some("cancelled"))
    );
    let messages = app.messages(&alice, &conv).await;
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[1]["message_id"], reply["message_id"]);
    assert_eq!(
        (messages[1]["text"].as_str(), messages[1]["status"].as_str()),
        (Some(FIRST_WORDS), Some("cancelled"))
    );
}

#[tokio::test]
async fn a_reply_being_written_is_stopped_and_keeps_its_beginning_on_the_embedded_default() {
    a_reply_being_written_is_stopped_and_keeps_its_beginning(without_chat_workers(false).await)
        .await;
}

#[tokio::test]
async fn a_reply_being_written_is_stopped_and_keeps_its_beginning_on_aws() {
    a_reply_being_written_is_stopped_and_keeps_its_beginning(without_chat_workers(true).await)
        .await;
}

/// A chat model that answers once let go.
struct Gated(Arc<tokio::sync::Notify>);

#[async_trait]
impl ChatModel for Gated {
    fn model(&self) -> &str {
        "gated"
    }
    async fn reply(
        &self,
        _: &ChatRequest,
        _: Option<UnboundedSender<String>>,
    ) -> shared::Result<ModelOutput<String>> {
        self.0.notified().await;
        Ok(ModelOutput {
            value: "Too late.".into(),
            usage: Default::default(),
            model: "gated".into(),
        })
    }
}

async fn a_reply_to_a_deleted_conversation_is_not_stored(app: TestApp) {
    let alice = app.user("alice").await;
    let conv = app.conversation(&alice, "Sherlock Holmes").await;
    let gate = Arc::new(tokio::sync::Notify::new());
    app.start_worker(RequestKind::Chat, &with_chat(Arc::new(Gated(gate.clone()))));
    let accepted = app.say(&alice, &conv, "Quick, before it goes.").await;
    let request_id = accepted["request_id"].as_str().unwrap();
    app.running(&alice, request_id).await;
    let (status, _) = app
        .delete(Some(&alice.token), &format!("/v1/conversations/{conv}"))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    gate.notify_one();
    let done = app.finished(&alice, request_id).await;
    assert_eq!(
        (done["status"].as_str(), done["error"]["code"].as_str()),
        (Some("failed"), Some("conversation_not_found")),
        "{done}"
    );
    let left = app
        .adapters
        .store
        .page_messages(&conv.as_str().into(), 10, None)
        .await
        .unwrap();
    assert!(left.items.is_empty(), "nothing stored: {:?}", left.items);
}

#[tokio::test]
async fn a_reply_to_a_deleted_conversation_is_not_stored_on_the_embedded_default() {
    a_reply_to_a_deleted_conversation_is_not_stored(without_chat_workers(false).await).await;
}

#[tokio::test]
async fn a_reply_to_a_deleted_conversation_is_not_stored_on_aws() {
    a_reply_to_a_deleted_conversation_is_not_stored(without_chat_workers(true).await).await;
}

/// A chat model whose every answer differs ("Version n"), that fails while `failing`, and
/// that keeps the history each call was given.
struct Versions {
    failing: AtomicBool,
    calls: AtomicUsize,
    seen: std::sync::Mutex<Vec<Vec<String>>>,
}

#[async_trait]
impl ChatModel for Versions {
    fn model(&self) -> &str {
        "versions"
    }
    async fn reply(
        &self,
        request: &ChatRequest,
        _: Option<UnboundedSender<String>>,
    ) -> shared::Result<ModelOutput<String>> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        self.seen
            .lock()
            .unwrap()
            .push(request.history.iter().map(|m| m.text.clone()).collect());
        if self.failing.load(Ordering::SeqCst) {
            return Err(shared::Error::ModelPermanent {
                code: "content_filtered".into(),
                message: "no".into(),
            });
        }
        Ok(ModelOutput {
            value: format!("Version {n}"),
            usage: Default::default(),
            model: "versions".into(),
        })
    }
}

async fn regenerate(app: &TestApp, user: &User, conv: &str, reply_id: &str) -> (StatusCode, Value) {
    app.post(
        Some(&user.token),
        &format!("/v1/conversations/{conv}/messages/{reply_id}/regenerate"),
        json!({}),
    )
    .await
}

async fn a_reply_is_regenerated_into_versions_and_one_is_selected(app: TestApp) {
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let conv = app.conversation(&alice, "Sherlock Holmes").await;
    let model = Arc::new(Versions {
        failing: AtomicBool::new(true),
        calls: AtomicUsize::new(0),
        seen: Default::default(),
    });
    app.start_worker(RequestKind::Chat, &with_chat(model.clone()));

    // The first try fails: it is retried by regenerating it, and the turn is not stored twice.
    let asked = app.say(&alice, &conv, "Hello?").await;
    let failed = app
        .finished(&alice, asked["request_id"].as_str().unwrap())
        .await;
    assert_eq!(failed["status"], "failed");
    let listed = turns(&app, &alice, &conv).await;
    let reply_id = listed[1]["message_id"].as_str().unwrap().to_owned();
    assert_eq!(listed[1]["status"], "failed");
    assert_eq!(listed[0]["reply_id"], reply_id.as_str());
    let (status, _) = regenerate(&app, &bob, &conv, &reply_id).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not bob's");
    model.failing.store(false, Ordering::SeqCst);
    let mut requests = Vec::new();
    for _ in 0..3 {
        let (status, accepted) = regenerate(&app, &alice, &conv, &reply_id).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        assert_eq!(accepted["message_id"], reply_id.as_str());
        let request_id = accepted["request_id"].as_str().unwrap().to_owned();
        let done = app.finished(&alice, &request_id).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        requests.push(request_id);
    }
    let listed = turns(&app, &alice, &conv).await;
    assert_eq!(listed.len(), 2, "one user message, one reply: {listed:?}");
    let reply = &listed[1];
    assert_eq!(reply["message_id"], reply_id.as_str());
    let variants = reply["variants"].as_array().unwrap();
    let texts: Vec<&str> = variants
        .iter()
        .map(|v| v["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["Version 2", "Version 3", "Version 4"]);
    assert_eq!(reply["selected"], variants[2]["variant_id"]);
    assert_eq!(
        (reply["text"].as_str(), reply["status"].as_str()),
        (Some("Version 4"), Some("complete"))
    );
    assert_eq!(reply["request_id"], requests[2].as_str());

    // The first version selected: shown, and the only one the model sees from now on.
    let path = format!("/v1/conversations/{conv}/messages/{reply_id}/selected");
    let pick = |variant: &Value| json!({ "variant_id": variant["variant_id"] });
    let (status, selected) = app
        .send(
            app.http
                .put(app.url(&path))
                .bearer_auth(&alice.token)
                .json(&pick(&variants[0])),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{selected}");
    assert_eq!(selected["text"], "Version 2");
    let (status, _) = app
        .send(
            app.http
                .put(app.url(&path))
                .bearer_auth(&alice.token)
                .json(&json!({ "variant_id": "var_nope" })),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app
        .send(
            app.http
                .put(app.url(&path))
                .bearer_auth(&bob.token)
                .json(&pick(&variants[1])),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not bob's");
    let next = app.say(&alice, &conv, "And then?").await;
    app.finished(&alice, next["request_id"].as_str().unwrap())
        .await;
    let seen = model.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        seen[1..],
        ["Hello?", "Version 2"],
        "the greeting, then the turn as selected"
    );
    let listed = turns(&app, &alice, &conv).await;
    assert_eq!(listed[1]["text"], "Version 2");
    assert_eq!(listed.len(), 4);
}

#[tokio::test]
async fn a_reply_is_regenerated_into_versions_and_one_is_selected_on_the_embedded_default() {
    a_reply_is_regenerated_into_versions_and_one_is_selected(without_chat_workers(false).await)
        .await;
}

#[tokio::test]
async fn a_reply_is_regenerated_into_versions_and_one_is_selected_on_aws() {
    a_reply_is_regenerated_into_versions_and_one_is_selected(without_chat_workers(true).await)
        .await;
}

async fn edit_message(
    app: &TestApp,
    user: &User,
    conv: &str,
    message_id: &str,
    body: Value,
) -> (StatusCode, Value) {
    patch(
        app,
        user,
        &format!("/v1/conversations/{conv}/messages/{message_id}"),
        body,
    )
    .await
}

async fn rewind(app: &TestApp, user: &User, conv: &str, message_id: &str) -> (StatusCode, Value) {
    app.post(
        Some(&user.token),
        &format!("/v1/conversations/{conv}/rewind"),
        json!({ "message_id": message_id }),
    )
    .await
}

fn texts(messages: &[Value]) -> Vec<&str> {
    messages
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect()
}

async fn a_conversation_is_rewound_and_edited(app: TestApp) {
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let conv = app.conversation(&alice, "Sherlock Holmes").await;
    for text in ["First", "Second", "Third"] {
        let accepted = app.say(&alice, &conv, text).await;
        app.finished(&alice, accepted["request_id"].as_str().unwrap())
            .await;
    }
    let all = turns(&app, &alice, &conv).await;
    assert_eq!(all.len(), 6);
    let (first, first_reply) = (
        all[0]["message_id"].as_str().unwrap().to_owned(),
        all[1]["message_id"].as_str().unwrap().to_owned(),
    );

    // Back to the first reply: the later turns are gone.
    let (status, _) = rewind(&app, &bob, &conv, &first_reply).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not bob's");
    let (status, record) = rewind(&app, &alice, &conv, &first_reply).await;
    assert_eq!(status, StatusCode::OK, "{record}");
    let preview = record["preview"].as_str().unwrap().trim_end_matches('…');
    assert!(
        all[1]["text"].as_str().unwrap().starts_with(preview),
        "the kept reply is the latest: {record}"
    );
    let left = turns(&app, &alice, &conv).await;
    assert_eq!(
        texts(&left),
        [
            all[0]["text"].as_str().unwrap(),
            all[1]["text"].as_str().unwrap()
        ]
    );

    // The first message edited: its reply is written again, for the new text.
    let (status, err) =
        edit_message(&app, &alice, &conv, &first_reply, json!({ "text": "x" })).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("not_a_user_message"))
    );
    let (status, _) = edit_message(&app, &bob, &conv, &first, json!({ "text": "Mine" })).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not bob's");
    let (status, accepted) = edit_message(
        &app,
        &alice,
        &conv,
        &first,
        json!({ "text": "First, again?" }),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!(accepted["message_id"], first.as_str());
    let request_id = accepted["request_id"].as_str().unwrap();
    let done = app.finished(&alice, request_id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let now = turns(&app, &alice, &conv).await;
    assert_eq!(now.len(), 2, "{now:?}");
    assert_eq!(
        (now[0]["text"].as_str(), now[0]["request_id"].as_str()),
        (Some("First, again?"), Some(request_id))
    );
    assert_eq!(
        now[1]["message_id"],
        RequestId::from(request_id).reply_id().to_string()
    );
    assert!(
        now[1]["text"].as_str().unwrap().contains("You ask"),
        "{}",
        now[1]["text"]
    );

    // Edited without an answer: the reply is dropped, and none is written.
    let (status, edited) = edit_message(
        &app,
        &alice,
        &conv,
        &first,
        json!({ "text": "Never mind.", "regenerate": false }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{edited}");
    assert_eq!(edited["text"], "Never mind.");
    assert_eq!(texts(&turns(&app, &alice, &conv).await), ["Never mind."]);
    // Back to the greeting: nothing left but it.
    let greeting = app.all_messages(&alice, &conv).await[0]["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = rewind(&app, &alice, &conv, &greeting).await;
    assert_eq!(status, StatusCode::OK);
    assert!(turns(&app, &alice, &conv).await.is_empty());
}

#[tokio::test]
async fn a_conversation_is_rewound_and_edited_on_the_embedded_default() {
    a_conversation_is_rewound_and_edited(TestApp::start().await).await;
}

#[tokio::test]
async fn a_conversation_is_rewound_and_edited_on_aws() {
    a_conversation_is_rewound_and_edited(TestApp::builder().on_aws().start().await).await;
}

async fn a_rewind_stops_the_reply_being_written(app: TestApp) {
    let alice = app.user("alice").await;
    let conv = app.conversation(&alice, "Sherlock Holmes").await;
    let (request_id, dropped) = stalled_turn(&app, &alice, &conv, "Tell me a long story.").await;
    let request_id = request_id.as_str();
    let greeting = app.all_messages(&alice, &conv).await[0]["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = rewind(&app, &alice, &conv, &greeting).await;
    assert_eq!(status, StatusCode::OK);
    let done = app.finished(&alice, request_id).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(dropped.load(Ordering::SeqCst), "the model call was stopped");
    assert!(
        turns(&app, &alice, &conv).await.is_empty(),
        "nothing of the dropped turn is stored"
    );
}

#[tokio::test]
async fn a_rewind_stops_the_reply_being_written_on_the_embedded_default() {
    a_rewind_stops_the_reply_being_written(without_chat_workers(false).await).await;
}

#[tokio::test]
async fn a_rewind_stops_the_reply_being_written_on_aws() {
    a_rewind_stops_the_reply_being_written(without_chat_workers(true).await).await;
}

/// A chat model that answers as the offline engine does and keeps every request it was given.
#[derive(Default)]
struct Recording {
    seen: std::sync::Mutex<Vec<ChatRequest>>,
    inner: OfflineChatModel,
}

#[async_trait]
impl ChatModel for Recording {
    fn model(&self) -> &str {
        "offline"
    }
    async fn reply(
        &self,
        request: &ChatRequest,
        tx: Option<UnboundedSender<String>>,
    ) -> shared::Result<ModelOutput<String>> {
        self.seen.lock().unwrap().push(request.clone());
        self.inner.reply(request, tx).await
    }
}

async fn put_memory(app: &TestApp, user: &User, conv: &str, body: Value) -> (StatusCode, Value) {
    app.send(
        app.http
            .put(app.url(&format!("/v1/conversations/{conv}/memory")))
            .bearer_auth(&user.token)
            .json(&body),
    )
    .await
}

async fn a_conversations_memory_is_kept_and_given_to_the_model(app: TestApp) {
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let conv = app.conversation(&alice, "Sherlock Holmes").await;
    let model = Arc::new(Recording::default());
    app.start_worker(RequestKind::Chat, &with_chat(model.clone()));
    let path = format!("/v1/conversations/{conv}/memory");
    let (_, empty) = app.get(Some(&alice.token), &path).await;
    assert_eq!(
        (
            empty["summary"].as_str(),
            empty["pinned"].as_array().map(Vec::len)
        ),
        (Some(""), Some(0))
    );

    let (status, kept) = put_memory(
        &app,
        &alice,
        &conv,
        json!({
            "summary": "  The butler was seen at midnight. ",
            "pinned": ["Alice is allergic to cats", "  ", "She lives on Baker Street"]
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{kept}");
    assert_eq!(kept["summary"], "The butler was seen at midnight.");
    assert_eq!(
        kept["pinned"],
        json!(["Alice is allergic to cats", "She lives on Baker Street"])
    );
    assert!(kept["updated_at"].is_string());
    let (_, read) = app.get(Some(&alice.token), &path).await;
    assert_eq!(read, kept);

    let too_many: Vec<String> = (0..21).map(|i| format!("fact {i}")).collect();
    for body in [
        json!({ "pinned": too_many }),
        json!({ "summary": "x".repeat(4001) }),
        json!({ "pinned": ["y".repeat(501)] }),
    ] {
        let (status, err) = put_memory(&app, &alice, &conv, body).await;
        assert_eq!(
            (status, err["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_memory"))
        );
    }
    let (status, _) = app.get(Some(&bob.token), &path).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = put_memory(&app, &bob, &conv, json!({ "summary": "mine" })).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let accepted = app.say(&alice, &conv, "Who did it?").await;
    app.finished(&alice, accepted["request_id"].as_str().unwrap())
        .await;
    let seen = model.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        seen.memory.pinned,
        ["Alice is allergic to cats", "She lives on Baker Street"]
    );
    let prompt = shared::models::system_prompt(&seen);
    assert!(
        prompt.contains("- Alice is allergic to cats")
            && prompt.contains("The butler was seen at midnight."),
        "{prompt}"
    );
}

#[tokio::test]
async fn a_conversations_memory_is_kept_and_given_to_the_model_on_the_embedded_default() {
    a_conversations_memory_is_kept_and_given_to_the_model(without_chat_workers(false).await).await;
}

#[tokio::test]
async fn a_conversations_memory_is_kept_and_given_to_the_model_on_aws() {
    a_conversations_memory_is_kept_and_given_to_the_model(without_chat_workers(true).await).await;
}

#[tokio::test]
async fn after_200_turns_the_context_is_within_its_token_budget_and_keeps_the_pinned_facts() {
    const BUDGET: usize = 600;
    let app = TestApp::builder()
        .without_workers()
        .arg("--context-tokens", &BUDGET.to_string())
        .arg("--history-messages", "100")
        .arg("--rate-limit-per-minute", "0")
        .start()
        .await;
    app.start_worker(RequestKind::Persona, &app.adapters.models.clone());
    let model = Arc::new(Recording::default());
    app.start_worker(RequestKind::Chat, &with_chat(model.clone()));
    let alice = app.user("alice").await;
    let conv = app.conversation(&alice, "Sherlock Holmes").await;
    let (status, _) = put_memory(
        &app,
        &alice,
        &conv,
        json!({ "pinned": ["Alice is allergic to cats"] }),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for i in 0..200 {
        let accepted = app
            .say(
                &alice,
                &conv,
                &format!("Message {i}: what do you make of the case now?"),
            )
            .await;
        let done = app
            .finished(&alice, accepted["request_id"].as_str().unwrap())
            .await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    let seen = model.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 200);
    let count = |t: &str| shared::models::estimate_tokens(t) as usize;
    for (i, request) in seen.iter().enumerate() {
        assert_eq!(
            request.memory.pinned,
            ["Alice is allergic to cats"],
            "call {i}"
        );
        let used = count(&shared::models::system_prompt(request))
            + count(&request.user_text)
            + request
                .history
                .iter()
                .map(|m| count(&m.text) + 4)
                .sum::<usize>()
            + 8;
        assert!(used <= BUDGET, "call {i} used {used} tokens");
    }
    // The budget is used, not left empty: the latest calls carry recent turns, the newest
    // exchange last.
    let last = seen.last().unwrap();
    assert!(last.history.len() >= 2, "{:?}", last.history.len());
    assert!(last.history[last.history.len() - 2]
        .text
        .starts_with("Message 198"));
    // What fell out is summarized: the newest message the last call no longer saw is in the
    // summary, which the model is given (within the budget, as checked above).
    let oldest_seen: usize = last.history[0]
        .text
        .trim_start_matches("Message ")
        .split(':')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(199);
    let dropped = format!("User: Message {}:", oldest_seen - 1);
    let memory = memory_until(&app, &alice, &conv, |m| {
        m["summary"].as_str().unwrap_or_default().contains(&dropped)
    })
    .await;
    assert!(memory["summarized_through"].is_string(), "{memory}");
    assert!(seen[150..]
        .iter()
        .all(|r| r.memory.summary.contains("User: Message")));
}

/// Reads the conversation's memory until `done` holds of it (10 s at most).
pub(crate) async fn memory_until(
    app: &TestApp,
    user: &User,
    conv: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, memory) = app
            .get(
                Some(&user.token),
                &format!("/v1/conversations/{conv}/memory"),
            )
            .await;
        if done(&memory) {
            return memory;
        }
        assert!(Instant::now() < deadline, "never came: {memory}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `text` and waits for its reply.
async fn exchange(app: &TestApp, user: &User, conv: &str, text: &str) {
    let accepted = app.say(user, conv, text).await;
    let done = app
        .finished(user, accepted["request_id"].as_str().unwrap())
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
}

async fn the_summary_covers_the_turns_that_fell_out_of_the_context(app: TestApp) {
    let model = Arc::new(Recording::default());
    app.start_worker(RequestKind::Chat, &with_chat(model.clone()));
    let alice = app.user("alice").await;
    let conv = app.conversation(&alice, "Sherlock Holmes").await;
    let path = format!("/v1/conversations/{conv}/memory");
    put_memory(
        &app,
        &alice,
        &conv,
        json!({ "pinned": ["Alice is allergic to cats"] }),
    )
    .await;
    // On default settings (20 messages of history): the first turns drop after ten.
    for i in 0..16 {
        exchange(
            &app,
            &alice,
            &conv,
            &format!("Clue {i}: the key was under stone {i}."),
        )
        .await;
    }
    let last = model.seen.lock().unwrap().last().cloned().unwrap();
    let shown: Vec<&str> = last.history.iter().map(|m| m.text.as_str()).collect();
    // The last message (clue 15) was the one answered, not history.
    let dropped: Vec<String> = (0..15)
        .map(|i| format!("Clue {i}: the key was under stone {i}."))
        .filter(|clue| !shown.contains(&clue.as_str()))
        .collect();
    assert!(dropped.len() >= 5, "{shown:?}");
    let memory = memory_until(&app, &alice, &conv, |m| {
        let summary = m["summary"].as_str().unwrap_or_default();
        dropped.iter().all(|clue| summary.contains(clue.as_str()))
    })
    .await;
    // A summary never rewrites the pinned facts.
    assert_eq!(memory["pinned"], json!(["Alice is allergic to cats"]));
    assert!(!memory["summary"].as_str().unwrap().contains("allergic"));
    let summary = memory["summary"].as_str().unwrap().to_owned();
    // The model is given it; a user's own summary keeps where the fold ended.
    exchange(&app, &alice, &conv, "What do we know?").await;
    let prompt =
        shared::models::system_prompt(&model.seen.lock().unwrap().last().cloned().unwrap());
    assert!(prompt.contains(&dropped[0]), "{prompt}");
    // A client's own summary (no `summarized_through` in its body) keeps where the fold ended.
    let (status, kept) = put_memory(
        &app,
        &alice,
        &conv,
        json!({ "summary": summary, "pinned": [], "summarized_through": "msg_made_up" }),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(kept["summarized_through"].is_string(), "{kept}");
    assert_ne!(kept["summarized_through"], "msg_made_up");

    // A rewind to before the summary's end clears it (the pinned facts stay, here none).
    let messages = app.all_messages(&alice, &conv).await;
    let (status, _) = rewind(
        &app,
        &alice,
        &conv,
        messages[2]["message_id"].as_str().unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, read) = app.get(Some(&alice.token), &path).await;
    assert_eq!(
        (read["summary"].as_str(), read.get("summarized_through")),
        (Some(""), None),
        "{read}"
    );
}

#[tokio::test]
async fn the_summary_covers_the_turns_that_fell_out_of_the_context_on_the_embedded_default() {
    the_summary_covers_the_turns_that_fell_out_of_the_context(without_chat_workers(false).await)
        .await;
}

#[tokio::test]
async fn the_summary_covers_the_turns_that_fell_out_of_the_context_on_aws() {
    the_summary_covers_the_turns_that_fell_out_of_the_context(without_chat_workers(true).await)
        .await;
}
