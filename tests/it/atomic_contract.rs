//! The `Atomic` contract (accept, start, settle), run against each implementation: the embedded
//! one (one SQLite transaction) and the AWS one (DynamoDB and SQS on the moto server that
//! `scripts/test` starts). What only a single transaction can promise — a failure half-way
//! leaves nothing visible — is checked on the embedded backend alone, at the end: the AWS
//! adapter does not promise it yet (issue #8: DynamoDB transaction + enqueue marker + sweeper).

use std::sync::Arc;
use std::time::Duration;

use crate::common::{self, key_claim, stored};
use shared::atomic::aws::AwsAtomic;
use shared::atomic::sqlite::SqliteAtomic;
use shared::atomic::{
    Accept, AcceptOutcome, Ack, Answer, Atomic, Found, Settle, Started, UserMessage,
};
use shared::domain::{
    Batch, Conversation, ErrorBody, Message, Persona, PersonaDraft, PersonaSource, RequestInput,
    RequestKind, RequestRecord, RequestResult, RequestStatus, Role, Usage,
};
use shared::events::aws::AwsEventBus;
use shared::events::{Event, EventBus, Published, SqliteEventBus};
use shared::ids::{ConversationId, MessageId, PersonaId, RequestId};
use shared::job::{Job, TraceContext};
use shared::queue::sqlite::SqliteQueue;
use shared::queue::sqs::SqsQueue;
use shared::queue::{Delivery, Outgoing, Queue};
use shared::sqlite::Db;
use shared::store::dynamodb::DynamoStore;
use shared::store::sqlite::SqliteStore;
use shared::store::{IdempotencyBegin, Store, Transition};

struct Subject {
    atomic: Arc<dyn Atomic>,
    store: Arc<dyn Store>,
    persona_queue: Arc<dyn Queue>,
    chat_queue: Arc<dyn Queue>,
    events: Arc<dyn EventBus>,
    /// The embedded database, for injecting failures.
    db: Option<Db>,
    /// The DynamoDB table (AWS).
    table: Option<String>,
    _dir: Option<tempfile::TempDir>,
    /// Stops the AWS bus's intake (its inbox) when the test ends.
    _listening: Option<tokio_util::sync::DropGuard>,
}

async fn embedded() -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).await.unwrap();
    let persona_queue = Arc::new(SqliteQueue::new(db.clone(), "persona"));
    let chat_queue = Arc::new(SqliteQueue::new(db.clone(), "chat"));
    let events = SqliteEventBus::start(db.clone()).await.unwrap();
    Subject {
        atomic: Arc::new(SqliteAtomic::new(
            db.clone(),
            persona_queue.clone(),
            chat_queue.clone(),
            events.clone(),
        )),
        store: Arc::new(SqliteStore::new(db.clone())),
        persona_queue,
        chat_queue,
        events,
        db: Some(db),
        table: None,
        _dir: Some(dir),
        _listening: None,
    }
}

async fn aws() -> Subject {
    let sdk = common::aws_test_sdk_config();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    let persona_queue: Arc<dyn Queue> = Arc::new(
        SqsQueue::ensure(sqs.clone(), "persona", &format!("persona-{run}"), 10)
            .await
            .unwrap(),
    );
    let chat_queue: Arc<dyn Queue> = Arc::new(
        SqsQueue::ensure(sqs, "chat", &format!("chat-{run}.fifo"), 10)
            .await
            .unwrap(),
    );
    let dynamo = aws_sdk_dynamodb::Client::new(&sdk);
    let table = format!("atomic-{run}");
    DynamoStore::create_table(&dynamo, &table).await.unwrap();
    let dynamo_store = Arc::new(DynamoStore::new(dynamo.clone(), &table));
    let store: Arc<dyn Store> = dynamo_store.clone();
    let dynamo_events = common::aws_event_bus(&table, &table, Duration::from_secs(300)).await;
    let events: Arc<dyn EventBus> = dynamo_events.clone();
    // Streams of this process get what its inbox receives, as in the API.
    let listening = tokio_util::sync::CancellationToken::new();
    events.listen(listening.clone()).await.unwrap();
    Subject {
        _listening: Some(listening.drop_guard()),
        atomic: Arc::new(AwsAtomic::new(
            dynamo_store,
            persona_queue.clone(),
            chat_queue.clone(),
            dynamo_events,
            Duration::from_secs(30),
        )),
        store,
        persona_queue,
        chat_queue,
        events,
        db: None,
        table: Some(table),
        _dir: None,
    }
}

fn persona_request() -> RequestRecord {
    RequestRecord::new(
        RequestKind::Persona,
        RequestInput::Persona {
            prompt: "Sherlock Holmes".into(),
        },
        None,
    )
}

/// Alice's persona request, accepted, and its job's delivery.
async fn accepted_persona(s: &Subject) -> (RequestRecord, Delivery) {
    let r = persona_request();
    s.atomic
        .accept(persona_accept("alice", &r, None))
        .await
        .unwrap();
    let d = receive_n(s.persona_queue.as_ref(), 1).await.remove(0);
    (r, d)
}

fn job(user: &str, r: &RequestRecord) -> Outgoing {
    Job {
        request_id: r.request_id.clone(),
        user_id: user.into(),
        kind: r.kind,
        trace: TraceContext::default(),
        accepted: None,
    }
    .encode()
}

fn persona_accept(user: &str, r: &RequestRecord, answer: Option<Answer>) -> Accept {
    Accept {
        user_id: user.into(),
        kind: RequestKind::Persona,
        requests: vec![r.clone()],
        jobs: vec![job(user, r)],
        batch: None,
        message: None,
        answer,
    }
}

fn persona(id: impl Into<PersonaId>) -> Persona {
    Persona::from_draft(
        id.into(),
        PersonaDraft {
            name: "Sherlock Holmes".into(),
            description: "d".into(),
            personality: "p".into(),
            speaking_style: "s".into(),
            greeting: "g".into(),
            source: PersonaSource::Famous,
        },
        "offline".into(),
        "Sherlock Holmes".into(),
    )
}

fn answer(key: &str, body: &str) -> Answer {
    Answer {
        key: key.into(),
        fingerprint: "fp".into(),
        stored: stored(202, body),
        ttl: std::time::Duration::from_secs(86_400),
    }
}

/// A successful settlement of alice's request with `result`, deleting the message.
fn succeed(kind: RequestKind, request_id: &str, result: RequestResult) -> Settle {
    Settle {
        kind,
        user_id: "alice".into(),
        request_id: request_id.into(),
        transition: Transition::Succeed {
            result: Box::new(result),
            usage: Usage::default(),
            model: "offline".into(),
            latency_ms: 1,
        },
        ack: Ack::Delete,
        last_fragment: None,
        unstarted: None,
    }
}

/// The next event of a stream (bounded), as a client reads it: its name and its JSON data.
async fn next_event(
    events: &mut futures::stream::BoxStream<'static, Arc<Published>>,
) -> (String, serde_json::Value) {
    let e = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(events))
        .await
        .expect("an event in time")
        .expect("stream open");
    (
        e.event.name().to_owned(),
        serde_json::from_str(&e.data).expect("JSON data"),
    )
}

/// Whether alice's key is free to be claimed: no answer was recorded for it.
async fn key_is_unanswered(s: &Subject, key: &str) -> bool {
    matches!(
        s.store
            .idempotency_begin(key_claim("alice", key, "fp", 5_000, 86_400_000))
            .await
            .unwrap(),
        IdempotencyBegin::Started { .. }
    )
}

async fn stored_request(s: &Subject, user: &str, request_id: &RequestId) -> Option<RequestRecord> {
    s.store.get_request(user, request_id).await.unwrap()
}

async fn messages(s: &Subject, conv: &ConversationId) -> shared::domain::Page<Message> {
    s.store
        .list_messages("alice", conv, 10, None)
        .await
        .unwrap()
}

/// Alice's persona request, accepted, delivered and started: the request and its delivery.
async fn running_persona_job(s: &Subject) -> (RequestRecord, Delivery) {
    let (r, d) = accepted_persona(s).await;
    s.atomic.start("alice", &r.request_id).await.unwrap();
    (r, d)
}

/// Receives until `n` deliveries arrived (bounded).
async fn receive_n(q: &dyn Queue, n: usize) -> Vec<Delivery> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < n && tokio::time::Instant::now() < deadline {
        got.extend(
            q.receive(10, Duration::from_secs(30), Duration::from_secs(1))
                .await
                .unwrap(),
        );
    }
    got
}

async fn a_conversation(s: &Subject, user: &str) -> ConversationId {
    let with = persona(PersonaId::new());
    s.store.put_persona(user, &with).await.unwrap();
    let conversation = Conversation {
        conversation_id: ConversationId::new(),
        persona_id: with.persona_id.clone(),
        persona_name: "Sherlock Holmes".into(),
        title: None,
        last_message_at: None,
        preview: None,
        created_at: shared::time::now_rfc3339(),
    };
    s.store
        .create_conversation(
            user,
            &conversation,
            &with,
            &Message::new(MessageId::new(), Role::Assistant, "Hello.".into(), None),
        )
        .await
        .unwrap();
    conversation.conversation_id
}

fn chat_accept(user: &str, conv: &str, text: &str) -> (Accept, RequestRecord, Message) {
    let message = Message {
        created_at: shared::time::now_rfc3339(),
        ..Message::new(MessageId::new(), Role::User, text.into(), None)
    };
    let request = RequestRecord::new(
        RequestKind::Chat,
        RequestInput::Chat {
            conversation_id: conv.into(),
            message_id: message.message_id.clone(),
            text: text.into(),
            reply_to: None,
        },
        None,
    );
    let accept = Accept {
        user_id: user.into(),
        kind: RequestKind::Chat,
        requests: vec![request.clone()],
        jobs: vec![job(user, &request)],
        batch: None,
        message: Some(UserMessage {
            conversation_id: conv.into(),
            message: message.clone(),
        }),
        answer: None,
    };
    (accept, request, message)
}

async fn an_accept_records_the_request_its_job_and_the_keys_answer(s: Subject) {
    let r = persona_request();
    let body = format!("{{\"request_id\":\"{}\"}}", r.request_id);
    let day = 86_400_000;
    assert!(matches!(
        s.store
            .idempotency_begin(key_claim("alice", "k1", "fp", 5_000, day))
            .await
            .unwrap(),
        IdempotencyBegin::Started { .. }
    ));
    let out = s
        .atomic
        .accept(persona_accept("alice", &r, Some(answer("k1", &body))))
        .await
        .unwrap();
    assert_eq!(out, AcceptOutcome::Recorded);
    let stored = stored_request(&s, "alice", &r.request_id).await;
    assert_eq!(stored.map(|x| x.status), Some(RequestStatus::Queued));
    assert!(stored_request(&s, "bob", &r.request_id).await.is_none());
    let jobs = receive_n(s.persona_queue.as_ref(), 1).await;
    assert_eq!(jobs.len(), 1);
    let msg = Job::decode(&jobs[0]).unwrap();
    assert_eq!(msg.request_id, r.request_id);
    // The key's answer was recorded with the work: a retry replays it.
    assert_eq!(
        s.store
            .idempotency_begin(key_claim("alice", "k1", "fp", 5_000, day))
            .await
            .unwrap(),
        IdempotencyBegin::Replay(common::stored(202, &body))
    );
}

async fn a_chat_turn_is_accepted_only_in_the_users_own_conversation(s: Subject) {
    let conv = a_conversation(&s, "alice").await;
    let (mallory, request, _) = chat_accept("mallory", &conv, "Give me her secrets");
    let refused = s.atomic.accept(mallory).await;
    assert!(
        matches!(refused, Err(shared::Error::NotFound)),
        "{refused:?}"
    );
    assert!(stored_request(&s, "mallory", &request.request_id)
        .await
        .is_none());
    let page = messages(&s, &conv).await;
    assert!(
        page.items.len() == 1 && page.items[0].role == Role::Assistant,
        "nothing was added to her conversation, beside its greeting"
    );
    assert!(
        receive_n(s.chat_queue.as_ref(), 1).await.is_empty(),
        "nothing was queued"
    );

    let (alice, request, message) = chat_accept("alice", &conv, "Who stole the pearl?");
    assert_eq!(
        s.atomic.accept(alice).await.unwrap(),
        AcceptOutcome::Recorded
    );
    let page = messages(&s, &conv).await;
    assert_eq!(page.items[1..], [message], "after the greeting");
    let jobs = receive_n(s.chat_queue.as_ref(), 1).await;
    let msg = Job::decode(&jobs[0]).unwrap();
    assert_eq!(msg.request_id, request.request_id);
}

async fn start_and_settle_move_the_request_store_the_result_once_and_ack(s: Subject) {
    let (r, d) = accepted_persona(&s).await;
    let mut events = s.events.subscribe("alice", None).await.unwrap();

    // Another user's job message names a request they cannot see.
    assert!(matches!(
        s.atomic.start("mallory", &r.request_id).await.unwrap(),
        Started::Missing
    ));
    let Started::Running(running) = s.atomic.start("alice", &r.request_id).await.unwrap() else {
        panic!("the request starts");
    };
    assert_eq!(
        (running.status, running.attempts),
        (RequestStatus::Running, 1)
    );

    let made = persona(r.request_id.persona_id());
    let succeed = |p: Persona| {
        succeed(
            RequestKind::Persona,
            &r.request_id,
            RequestResult::Persona(p),
        )
    };
    let done = s
        .atomic
        .settle(&d, succeed(made.clone()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.status, RequestStatus::Succeeded);
    assert_eq!(
        s.store
            .get_persona("alice", &made.persona_id)
            .await
            .unwrap(),
        Some(made.clone())
    );
    // The message is gone: nothing comes back after its visibility timeout either.
    let stats = s.persona_queue.stats().await.unwrap();
    assert_eq!(stats.visible + stats.in_flight, 0, "{stats:?}");
    // The client was told, in order: running, then succeeded.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (name, data) = next_event(&mut events).await;
        if name == "request.updated" {
            seen.push(data["status"].as_str().unwrap_or_default().to_owned());
        }
    }
    assert_eq!(seen, ["running", "succeeded"]);

    // A duplicate delivery settling again changes nothing and stores no second persona.
    let mut twin = made.clone();
    twin.name = "A twin".into();
    let again = s.atomic.settle(&d, succeed(twin)).await.unwrap().unwrap();
    assert_eq!(again.result, done.result);
    assert!(matches!(
        s.atomic.start("alice", &r.request_id).await.unwrap(),
        Started::Finished(_)
    ));
    let page = s.store.list_personas("alice", 10, None).await.unwrap();
    assert_eq!(page.items, vec![made]);
}

/// A job that finishes before anyone could see it running writes no start: `look` reads the
/// request without changing it, and the settlement counts the attempt itself, so the request
/// goes from `queued` straight to its final state, in one write and one event.
async fn a_job_settled_without_a_start_counts_its_attempt_in_the_settlement(s: Subject) {
    let (r, d) = accepted_persona(&s).await;
    let mut events = s.events.subscribe("alice", None).await.unwrap();

    assert!(matches!(
        s.atomic.look("mallory", &r.request_id, None).await.unwrap(),
        Found::Missing
    ));
    let Found::Pending(seen) = s.atomic.look("alice", &r.request_id, None).await.unwrap() else {
        panic!("a queued request is pending");
    };
    assert_eq!((seen.status, seen.attempts), (RequestStatus::Queued, 0));
    let stored = s
        .store
        .get_request("alice", &r.request_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, RequestStatus::Queued, "look writes nothing");

    let made = persona(r.request_id.persona_id());
    let mut settle = succeed(
        RequestKind::Persona,
        &r.request_id,
        RequestResult::Persona(made.clone()),
    );
    settle.unstarted = Some(0);
    let done = s.atomic.settle(&d, settle).await.unwrap().unwrap();
    assert_eq!((done.status, done.attempts), (RequestStatus::Succeeded, 1));
    let (name, data) = next_event(&mut events).await;
    assert_eq!(
        (
            name.as_str(),
            data["status"].as_str(),
            data["attempts"].as_u64()
        ),
        ("request.updated", Some("succeeded"), Some(1)),
        "one event, the final one"
    );
    assert!(matches!(
        s.atomic.look("alice", &r.request_id, None).await.unwrap(),
        Found::Finished(_)
    ));
}

async fn a_replys_last_fragment_is_pushed_just_before_the_update_that_ends_it(s: Subject) {
    let conv = a_conversation(&s, "alice").await;
    let (accept, r, _) = chat_accept("alice", &conv, "Hello?");
    s.atomic.accept(accept).await.unwrap();
    let d = receive_n(s.chat_queue.as_ref(), 1).await.remove(0);
    s.atomic.start("alice", &r.request_id).await.unwrap();
    let mut events = s.events.subscribe("alice", None).await.unwrap();
    let reply = Message {
        model: Some("offline".into()),
        created_at: shared::time::now_rfc3339(),
        ..Message::new(
            MessageId::new(),
            Role::Assistant,
            "Elementary.".into(),
            None,
        )
    };
    let mut settle = succeed(
        RequestKind::Chat,
        &r.request_id,
        RequestResult::Message(reply.clone()),
    );
    settle.last_fragment = Some("Elementary.".into());
    s.atomic.settle(&d, settle.clone()).await.unwrap();
    // A twin settling again (its own last fragment included) pushes nothing more.
    s.atomic.settle(&d, settle).await.unwrap();
    // A marker after them: everything before it was pushed by the settles.
    s.events
        .publish("alice", &Event::delta(&"marker".into(), ""))
        .await
        .unwrap();
    let mut seen = Vec::new();
    loop {
        let (name, data) = next_event(&mut events).await;
        if data["request_id"] == "marker" {
            break;
        }
        let what = match name.as_str() {
            "message.delta" => data["text"].as_str().unwrap_or_default().to_owned(),
            _ => data["status"].as_str().unwrap_or_default().to_owned(),
        };
        assert_eq!(data["request_id"], r.request_id.as_str());
        seen.push((name, what));
    }
    assert_eq!(
        seen,
        [
            ("message.delta".to_string(), "Elementary.".to_string()),
            ("request.updated".to_string(), "succeeded".to_string()),
        ]
    );
}

async fn a_retry_puts_the_job_back_and_the_request_back_in_the_queue(s: Subject) {
    let (r, d) = running_persona_job(&s).await;
    let retry = Settle {
        kind: RequestKind::Persona,
        user_id: "alice".into(),
        request_id: r.request_id.clone(),
        transition: Transition::Retry {
            error: ErrorBody {
                code: "model_unavailable".into(),
                message: "overloaded".into(),
            },
        },
        ack: Ack::Retry {
            delay: Duration::ZERO,
        },
        last_fragment: None,
        unstarted: None,
    };
    let record = s.atomic.settle(&d, retry).await.unwrap().unwrap();
    assert_eq!(record.status, RequestStatus::Queued);
    let again = receive_n(s.persona_queue.as_ref(), 1).await;
    assert_eq!(again.len(), 1, "handed back at once");
    assert_eq!(again[0].receive_count, 2);
}

async fn a_key_answered_once_replays_and_queues_nothing_more(s: Subject) {
    let first = persona_request();
    let body = format!("{{\"request_id\":\"{}\"}}", first.request_id);
    s.atomic
        .accept(persona_accept("alice", &first, Some(answer("k2", &body))))
        .await
        .unwrap();
    // A racing twin (another id, same key) finds the answer and records nothing.
    let twin = persona_request();
    let out = s
        .atomic
        .accept(persona_accept("alice", &twin, Some(answer("k2", "{}"))))
        .await
        .unwrap();
    assert_eq!(out, AcceptOutcome::Replay(stored(202, &body)));
    assert!(stored_request(&s, "alice", &twin.request_id)
        .await
        .is_none());
    assert_eq!(
        receive_n(s.persona_queue.as_ref(), 2).await.len(),
        1,
        "one job"
    );
}

async fn a_batch_is_accepted_whole(s: Subject) {
    let requests: Vec<RequestRecord> = (0..3)
        .map(|_| {
            let mut r = persona_request();
            r.batch_id = Some("bat_1".into());
            r
        })
        .collect();
    let batch = Batch::new(
        "bat_1".into(),
        requests.iter().map(|r| r.request_id.clone()).collect(),
    );
    let accept = Accept {
        user_id: "alice".into(),
        kind: RequestKind::Persona,
        jobs: requests.iter().map(|r| job("alice", r)).collect(),
        requests: requests.clone(),
        batch: Some(batch),
        message: None,
        answer: None,
    };
    assert_eq!(
        s.atomic.accept(accept).await.unwrap(),
        AcceptOutcome::Recorded
    );
    for r in &requests {
        assert!(stored_request(&s, "alice", &r.request_id).await.is_some());
    }
    let b = s
        .store
        .get_batch("alice", &"bat_1".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((b.total, b.pending), (3, 3));
    assert_eq!(receive_n(s.persona_queue.as_ref(), 3).await.len(), 3);
}

async fn a_result_a_twin_stored_first_stands(s: Subject) {
    let (r, d) = running_persona_job(&s).await;
    let id = r.request_id.persona_id();
    let mut twin = persona(id.clone());
    twin.name = "The twin's".into();
    s.store.put_persona("alice", &twin).await.unwrap();
    let settle = succeed(
        RequestKind::Persona,
        &r.request_id,
        RequestResult::Persona(persona(id.clone())),
    );
    let done = s.atomic.settle(&d, settle).await.unwrap().unwrap();
    assert_eq!(done.status, RequestStatus::Succeeded);
    assert_eq!(done.result, Some(RequestResult::Persona(twin.clone())));
    assert_eq!(s.store.get_persona("alice", &id).await.unwrap(), Some(twin));
}

contract!(
    embedded_atomic => embedded,
    aws_atomic => aws;
    an_accept_records_the_request_its_job_and_the_keys_answer,
    a_key_answered_once_replays_and_queues_nothing_more,
    a_batch_is_accepted_whole,
    a_result_a_twin_stored_first_stands,
    a_chat_turn_is_accepted_only_in_the_users_own_conversation,
    start_and_settle_move_the_request_store_the_result_once_and_ack,
    a_retry_puts_the_job_back_and_the_request_back_in_the_queue,
    a_replys_last_fragment_is_pushed_just_before_the_update_that_ends_it,
    a_job_settled_without_a_start_counts_its_attempt_in_the_settlement,
);

/// One transaction: a failure inside an accept leaves nothing of it visible, and a failure
/// inside a settlement leaves the request and its message as they were.
mod embedded_only {
    use super::*;

    #[tokio::test]
    async fn a_failure_inside_an_accept_leaves_nothing_visible() {
        let s = embedded().await;
        let conv = a_conversation(&s, "alice").await;
        let first = persona_request();
        s.atomic
            .accept(persona_accept("alice", &first, None))
            .await
            .unwrap();
        receive_n(s.persona_queue.as_ref(), 1).await;
        // A chat turn whose second request collides with an existing one: the insert fails
        // after the message and the first request were written.
        let (mut accept, second, message) = chat_accept("alice", &conv, "Hello?");
        accept.requests.push(first.clone());
        accept.answer = Some(answer("k9", "{}"));
        assert!(s.atomic.accept(accept).await.is_err());
        assert!(stored_request(&s, "alice", &second.request_id)
            .await
            .is_none());
        let page = messages(&s, &conv).await;
        assert!(
            !page.items.contains(&message) && page.items.len() == 1,
            "the greeting alone"
        );
        assert!(
            receive_n(s.chat_queue.as_ref(), 1).await.is_empty(),
            "no job"
        );
        assert!(
            key_is_unanswered(&s, "k9").await,
            "no answer recorded: the client may retry"
        );
    }

    #[tokio::test]
    async fn a_failure_inside_a_settlement_leaves_the_request_and_its_message_as_they_were() {
        let s = embedded().await;
        let conv = a_conversation(&s, "alice").await;
        let (accept, request, message) = chat_accept("alice", &conv, "Hello?");
        s.atomic.accept(accept).await.unwrap();
        let d = receive_n(s.chat_queue.as_ref(), 1).await.remove(0);
        s.atomic.start("alice", &request.request_id).await.unwrap();
        // The queue refuses the delete, the settlement's last step: the reply and the new
        // state written before it must go with it.
        let db = s.db.clone().unwrap();
        db.write(|c| {
            Ok(c.execute_batch(
                "CREATE TRIGGER refuse_delete BEFORE DELETE ON queue_messages
                 BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
            )?)
        })
        .await
        .unwrap();
        let reply = Message {
            model: Some("offline".into()),
            created_at: shared::time::now_rfc3339(),
            ..Message::new(
                MessageId::new(),
                Role::Assistant,
                "Elementary.".into(),
                None,
            )
        };
        let settle = succeed(
            RequestKind::Chat,
            &request.request_id,
            RequestResult::Message(reply),
        );
        let failed = s.atomic.settle(&d, settle).await;
        assert!(failed.is_err(), "{failed:?}");
        let record = stored_request(&s, "alice", &request.request_id)
            .await
            .unwrap();
        assert_eq!(record.status, RequestStatus::Running, "state unchanged");
        let page = messages(&s, &conv).await;
        assert_eq!(page.items[1..], [message], "no reply stored");
        let stats = s.chat_queue.stats().await.unwrap();
        assert_eq!(stats.in_flight, 1, "the message waits for its redelivery");
    }
}

/// The transactional outbox of the AWS adapter: what the DynamoDB transaction records is sent
/// to SQS even when the sender dies right after it.
mod aws_only {
    use super::*;
    use async_trait::async_trait;
    use shared::queue::{DeadLetter, QueueStats};

    /// A queue whose sends fail, as if the API process died before `SendMessage`.
    struct DeadSender(Arc<dyn Queue>);

    #[async_trait]
    impl Queue for DeadSender {
        fn name(&self) -> &str {
            self.0.name()
        }
        async fn send(&self, _: &[Outgoing]) -> shared::Result<()> {
            Err(shared::Error::queue_msg("the process died before sending"))
        }
        async fn receive(
            &self,
            max: usize,
            v: Duration,
            w: Duration,
        ) -> shared::Result<Vec<Delivery>> {
            self.0.receive(max, v, w).await
        }
        async fn delete(&self, receipt: &str) -> shared::Result<()> {
            self.0.delete(receipt).await
        }
        async fn change_visibility(&self, receipt: &str, t: Duration) -> shared::Result<()> {
            self.0.change_visibility(receipt, t).await
        }
        async fn dead_letter(&self, d: &Delivery, reason: &str) -> shared::Result<()> {
            self.0.dead_letter(d, reason).await
        }
        async fn dead_letters(&self, limit: usize) -> shared::Result<Vec<DeadLetter>> {
            self.0.dead_letters(limit).await
        }
        async fn stats(&self) -> shared::Result<QueueStats> {
            self.0.stats().await
        }
    }

    async fn atomic_of_events(s: &Subject) -> Arc<AwsEventBus> {
        let table = s.table.clone().unwrap();
        common::aws_event_bus(&table, &table, Duration::from_secs(300)).await
    }

    async fn atomic_of(
        s: &Subject,
        store: Arc<DynamoStore>,
        persona_queue: Arc<dyn Queue>,
        after: Duration,
    ) -> AwsAtomic {
        AwsAtomic::new(
            store,
            persona_queue,
            s.chat_queue.clone(),
            atomic_of_events(s).await,
            after,
        )
    }

    async fn subject() -> (Subject, Arc<DynamoStore>) {
        let sdk = common::aws_test_sdk_config();
        let s = aws().await;
        // The same table as the subject's store.
        let table = s.table.clone().unwrap();
        (
            s,
            Arc::new(DynamoStore::new(aws_sdk_dynamodb::Client::new(&sdk), table)),
        )
    }

    #[tokio::test]
    async fn jobs_a_dead_sender_left_behind_are_sent_by_the_sweep_once() {
        let (s, store) = subject().await;
        let api = atomic_of(
            &s,
            store.clone(),
            Arc::new(DeadSender(s.persona_queue.clone())),
            Duration::ZERO,
        )
        .await;
        let worker = atomic_of(&s, store, s.persona_queue.clone(), Duration::ZERO).await;
        let r = persona_request();
        let out = api.accept(persona_accept("alice", &r, None)).await.unwrap();
        assert_eq!(
            out,
            AcceptOutcome::Recorded,
            "recorded: the client gets its 202"
        );
        assert!(stored_request(&s, "alice", &r.request_id).await.is_some());
        assert!(
            receive_n(s.persona_queue.as_ref(), 1).await.is_empty(),
            "not sent"
        );

        assert_eq!(worker.sweep(RequestKind::Persona).await.unwrap(), 1);
        let jobs = receive_n(s.persona_queue.as_ref(), 2).await;
        assert_eq!(jobs.len(), 1);
        let msg = Job::decode(&jobs[0]).unwrap();
        assert_eq!(msg.request_id, r.request_id);
        assert_eq!(
            worker.sweep(RequestKind::Persona).await.unwrap(),
            0,
            "sent once"
        );
        assert_eq!(worker.sweep(RequestKind::Chat).await.unwrap(), 0);
    }

    /// A single job's outbox item stays until its worker starts or settles the job, and goes
    /// in that transaction; until then the sweep sends the job again, marked, so that its
    /// worker reads the request instead of trusting the job's copy.
    #[tokio::test]
    async fn a_single_jobs_outbox_item_goes_with_its_start_or_settlement() {
        let (s, store) = subject().await;
        let atomic = atomic_of(&s, store, s.persona_queue.clone(), Duration::ZERO).await;
        let accepted = |r: &RequestRecord| {
            let mut a = persona_accept("alice", r, None);
            a.jobs = vec![Job {
                request_id: r.request_id.clone(),
                user_id: "alice".into(),
                kind: r.kind,
                trace: TraceContext::default(),
                accepted: Some(r.clone()),
            }
            .encode()];
            a
        };

        // Taken by no worker yet: sent again by the sweep, marked; then cleared.
        let r = persona_request();
        atomic.accept(accepted(&r)).await.unwrap();
        let first = receive_n(s.persona_queue.as_ref(), 1).await.remove(0);
        assert!(shared::job::outbox_of(&first).is_some());
        assert_eq!(Job::decode(&first).unwrap().accepted, Some(r.clone()));
        assert_eq!(atomic.sweep(RequestKind::Persona).await.unwrap(), 1);
        let again = receive_n(s.persona_queue.as_ref(), 1).await.remove(0);
        assert_eq!(Job::decode(&again).unwrap().request_id, r.request_id);
        assert_eq!(
            Job::decode(&again).unwrap().accepted,
            None,
            "re-sent: read it"
        );
        assert_eq!(atomic.sweep(RequestKind::Persona).await.unwrap(), 0);

        // Started: the start took the item with it.
        let r = persona_request();
        atomic.accept(accepted(&r)).await.unwrap();
        let d = receive_n(s.persona_queue.as_ref(), 1).await.remove(0);
        let started = atomic.start_delivery(&d, "alice", &r.request_id).await;
        assert!(matches!(started.unwrap(), Started::Running(_)));
        assert_eq!(atomic.sweep(RequestKind::Persona).await.unwrap(), 0);

        // Settled without a start, from the job's copy: the settlement took it.
        let r = persona_request();
        atomic.accept(accepted(&r)).await.unwrap();
        let d = receive_n(s.persona_queue.as_ref(), 1).await.remove(0);
        let copy = Job::decode(&d).unwrap().accepted;
        assert!(matches!(
            atomic
                .look("alice", &r.request_id, copy.as_ref())
                .await
                .unwrap(),
            Found::Pending(_)
        ));
        let mut settle = succeed(
            RequestKind::Persona,
            &r.request_id,
            RequestResult::Persona(persona(r.request_id.persona_id())),
        );
        settle.unstarted = Some(0);
        let done = atomic.settle(&d, settle).await.unwrap().unwrap();
        assert_eq!((done.status, done.attempts), (RequestStatus::Succeeded, 1));
        assert_eq!(atomic.sweep(RequestKind::Persona).await.unwrap(), 0);
    }

    /// A job's copy of the request stands in for a read, and may be stale (the queue delivered
    /// a finished job again as new): the writes are conditional on the version, so the late
    /// twin's settlement finds the first result and changes nothing.
    #[tokio::test]
    async fn a_stale_copy_of_the_request_overwrites_nothing() {
        let (s, _) = subject().await;
        let (r, d) = accepted_persona(&s).await;
        let made = persona(r.request_id.persona_id());
        let mut first = succeed(
            RequestKind::Persona,
            &r.request_id,
            RequestResult::Persona(made.clone()),
        );
        first.unstarted = Some(0);
        let done = s.atomic.settle(&d, first).await.unwrap().unwrap();

        let found = s
            .atomic
            .look("alice", &r.request_id, Some(&r))
            .await
            .unwrap();
        assert!(matches!(found, Found::Pending(_)), "the copy is taken");
        let mut twin = made.clone();
        twin.name = "A twin".into();
        let mut late = succeed(
            RequestKind::Persona,
            &r.request_id,
            RequestResult::Persona(twin),
        );
        late.unstarted = Some(0);
        let after = s.atomic.settle(&d, late).await.unwrap().unwrap();
        assert_eq!(after, done, "the first settlement stands");
        let page = s.store.list_personas("alice", 10, None).await.unwrap();
        assert_eq!(page.items, vec![made]);
    }

    #[tokio::test]
    async fn the_sweep_leaves_an_accept_to_its_sender_until_it_is_due() {
        let (s, store) = subject().await;
        let api = atomic_of(
            &s,
            store.clone(),
            Arc::new(DeadSender(s.persona_queue.clone())),
            Duration::from_secs(30),
        )
        .await;
        let worker = atomic_of(&s, store, s.persona_queue.clone(), Duration::from_secs(30)).await;
        api.accept(persona_accept("alice", &persona_request(), None))
            .await
            .unwrap();
        assert_eq!(
            worker.sweep(RequestKind::Persona).await.unwrap(),
            0,
            "not due yet"
        );
    }

    #[tokio::test]
    async fn a_failure_inside_the_transaction_leaves_nothing_visible() {
        let (s, _) = subject().await;
        let existing = persona_request();
        s.atomic
            .accept(persona_accept("alice", &existing, None))
            .await
            .unwrap();
        receive_n(s.persona_queue.as_ref(), 1).await;
        let fresh = persona_request();
        let mut accept = persona_accept("alice", &fresh, Some(answer("k3", "{}")));
        // The second request collides with one already stored.
        accept.requests.push(existing.clone());
        accept.jobs.push(job("alice", &existing));
        assert!(s.atomic.accept(accept).await.is_err());
        assert!(stored_request(&s, "alice", &fresh.request_id)
            .await
            .is_none());
        assert!(
            receive_n(s.persona_queue.as_ref(), 1).await.is_empty(),
            "no job"
        );
        assert!(
            key_is_unanswered(&s, "k3").await,
            "no answer recorded: the client may retry"
        );
    }
}
