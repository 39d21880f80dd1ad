//! The `Store` contract, run against each implementation: the embedded SQLite store, and the
//! DynamoDB store through the real AWS SDK against the moto server that `scripts/test` starts
//! (a table per test).

use std::sync::Arc;

use crate::common::{self, key_claim, stored};
use shared::domain::{
    Batch, BatchStatus, Conversation, ErrorBody, Memory, Message, Persona, PersonaDraft,
    PersonaSource, RequestInput, RequestKind, RequestRecord, RequestResult, RequestStatus, Role,
    Usage,
};
use shared::ids::{BatchId, ConversationId, MessageId, PersonaId};
use shared::sqlite::Db;
use shared::store::dynamodb::DynamoStore;
use shared::store::sqlite::SqliteStore;
use shared::store::{
    IdempotencyBegin, IdempotencyStore, PersonaStore, RequestStore, Store, Transition,
};
use shared::Error;

struct Subject {
    store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
}

async fn embedded() -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).await.unwrap();
    Subject {
        store: Arc::new(SqliteStore::new(db)),
        _dir: Some(dir),
    }
}

async fn dynamodb() -> Subject {
    let client = aws_sdk_dynamodb::Client::from_conf(aws_sdk_dynamodb::Config::from(
        &common::aws_test_sdk_config(),
    ));
    let table = format!("contract-{}", uuid::Uuid::new_v4().simple());
    DynamoStore::create_table(&client, &table).await.unwrap();
    Subject {
        store: Arc::new(DynamoStore::new(client, table)),
        _dir: None,
    }
}

fn persona(id: &str, name: &str) -> Persona {
    Persona::from_draft(
        id.into(),
        PersonaDraft {
            name: name.into(),
            description: "d".into(),
            personality: "p".into(),
            speaking_style: "s".into(),
            greeting: "g".into(),
            source: PersonaSource::Original,
        },
        "offline".into(),
        name.into(),
    )
}

fn message(role: Role, text: &str) -> Message {
    Message {
        created_at: shared::time::now_rfc3339(),
        ..Message::new(MessageId::new(), role, text.into(), None)
    }
}

/// The persona's first line, with which every conversation here begins.
fn greeting() -> Message {
    message(Role::Assistant, "greeting")
}

fn conversation() -> Conversation {
    Conversation {
        conversation_id: ConversationId::new(),
        persona_id: "per_x".into(),
        persona_name: "X".into(),
        title: None,
        last_message_at: None,
        preview: None,
        created_at: shared::time::now_rfc3339(),
    }
}

/// A conversation of `user` with a persona of theirs, both stored.
async fn stored_conversation<S: Store + ?Sized>(st: &S, user: &str) -> Conversation {
    let p = persona("per_x", "X");
    st.put_persona(user, &p).await.unwrap();
    let conv = conversation();
    let greeting = greeting();
    st.create_conversation(user, &conv, &p, &greeting)
        .await
        .unwrap();
    conv.begun_with(&greeting)
}

fn chat_request(conv: &str, m: &Message) -> RequestRecord {
    RequestRecord::new(
        RequestKind::Chat,
        RequestInput::Chat {
            conversation_id: conv.into(),
            message_id: m.message_id.clone(),
            text: m.text.clone(),
            reply_to: None,
        },
        None,
    )
}

fn error(code: &str) -> ErrorBody {
    ErrorBody {
        code: code.into(),
        message: code.into(),
    }
}

async fn personas_are_written_once_listed_newest_first_and_paged(s: Subject) {
    let st = s.store.as_ref();
    let ids: Vec<PersonaId> = (0..3).map(|_| PersonaId::new()).collect();
    for (i, id) in ids.iter().enumerate() {
        st.put_persona("alice", &persona(id, &format!("P{i}")))
            .await
            .unwrap();
    }
    // A second put of the same id keeps the first.
    st.put_persona("alice", &persona(&ids[0], "Twin"))
        .await
        .unwrap();
    assert_eq!(
        st.get_persona("alice", &ids[0])
            .await
            .unwrap()
            .unwrap()
            .name,
        "P0"
    );
    assert!(
        st.get_persona("bob", &ids[0]).await.unwrap().is_none(),
        "owner scoped"
    );

    let page1 = st.list_personas("alice", 2, None).await.unwrap();
    let names: Vec<_> = page1.items.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["P2", "P1"], "newest first");
    let page2 = st
        .list_personas("alice", 2, page1.next_token.as_deref())
        .await
        .unwrap();
    assert_eq!(
        page2
            .items
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["P0"]
    );
    assert!(st
        .list_personas("bob", 10, None)
        .await
        .unwrap()
        .items
        .is_empty());
    assert!(matches!(
        st.list_personas("alice", 2, Some("garbage!")).await,
        Err(Error::Invalid(_))
    ));

    assert!(!st.delete_persona("bob", &ids[0]).await.unwrap());
    assert!(st.delete_persona("alice", &ids[0]).await.unwrap());
    assert!(!st.delete_persona("alice", &ids[0]).await.unwrap());
}

async fn each_user_message_gets_one_reply_in_its_place(s: Subject) {
    let st = s.store.as_ref();
    let conv = stored_conversation(st, "alice").await;
    let c = &conv.conversation_id;
    assert_eq!(
        st.get_conversation("alice", c).await.unwrap().unwrap(),
        conv
    );
    assert!(st.get_conversation("bob", c).await.unwrap().is_none());
    assert_eq!(
        st.list_conversations("alice", None, 10, None)
            .await
            .unwrap()
            .items,
        vec![conv.clone()]
    );

    let (m1, m2) = (message(Role::User, "one"), message(Role::User, "two"));
    st.add_user_message("alice", c, &m1, &chat_request(c, &m1))
        .await
        .unwrap();
    st.add_user_message("alice", c, &m2, &chat_request(c, &m2))
        .await
        .unwrap();
    // The reply to the second message lands first; the first's arrives late.
    let r2 = message(Role::Assistant, "reply two");
    assert_eq!(
        st.put_reply("alice", c, &m2.message_id, &r2).await.unwrap(),
        r2
    );
    let r1 = message(Role::Assistant, "reply one");
    st.put_reply("alice", c, &m1.message_id, &r1).await.unwrap();
    // A redelivery's reply does not replace the stored one.
    let twin = message(Role::Assistant, "a second reply");
    assert_eq!(
        st.put_reply("alice", c, &m1.message_id, &twin)
            .await
            .unwrap(),
        r1
    );
    assert_eq!(st.get_reply(c, &m1.message_id).await.unwrap().unwrap(), r1);

    let all = st.list_messages("alice", c, 10, None).await.unwrap();
    let texts: Vec<_> = all.items.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["greeting", "one", "reply one", "two", "reply two"]);
    let first = st.list_messages("alice", c, 3, None).await.unwrap();
    assert_eq!(first.items.len(), 3);
    let rest = st
        .list_messages("alice", c, 3, first.next_token.as_deref())
        .await
        .unwrap();
    assert_eq!(
        rest.items
            .iter()
            .map(|m| m.text.as_str())
            .collect::<Vec<_>>(),
        ["two", "reply two"]
    );
    assert!(matches!(
        st.list_messages("bob", c, 10, None).await,
        Err(Error::NotFound)
    ));

    let history = st.history_before(c, &m2.message_id, 10).await.unwrap();
    assert_eq!(
        history.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
        ["greeting", "one", "reply one"]
    );
    assert_eq!(
        st.history_before(c, &m2.message_id, 1).await.unwrap()[0].text,
        "reply one",
        "the newest within the limit"
    );
    let before_first = st.history_before(c, &m1.message_id, 10).await.unwrap();
    assert_eq!(before_first.len(), 1, "the greeting: {before_first:?}");
    assert_eq!(before_first[0].text, "greeting");
}

/// What a chat job reads: the persona as the conversation began with it (kept after the
/// persona is deleted), and the messages before the one it answers, skipping that turn and
/// any later one (sent while the job waited).
async fn the_chat_context_is_the_persona_snapshot_and_the_turns_before(s: Subject) {
    let st = s.store.as_ref();
    let conv = stored_conversation(st, "alice").await;
    let c = &conv.conversation_id;
    let ms: Vec<Message> = ["one", "two", "three"]
        .iter()
        .map(|t| message(Role::User, t))
        .collect();
    for m in &ms {
        st.add_user_message("alice", c, m, &chat_request(c, m))
            .await
            .unwrap();
    }
    for (m, text) in ms.iter().zip(["reply one", "reply two"]) {
        st.put_reply("alice", c, &m.message_id, &message(Role::Assistant, text))
            .await
            .unwrap();
    }
    let texts = |h: &[Message]| h.iter().map(|m| m.text.clone()).collect::<Vec<_>>();
    let context = st
        .chat_context("alice", c, &ms[1].message_id, 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(context.conversation.conversation_id, conv.conversation_id);
    assert_eq!(context.persona.as_ref().unwrap().name, "X");
    assert_eq!(texts(&context.history), ["greeting", "one", "reply one"]);
    let newest = st
        .chat_context("alice", c, &ms[2].message_id, 3)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(texts(&newest.history), ["reply one", "two", "reply two"]);
    assert!(st
        .chat_context("bob", c, &ms[1].message_id, 10)
        .await
        .unwrap()
        .is_none());

    // The persona goes; its conversation keeps the snapshot, and takes no new message.
    assert!(st.delete_persona("alice", &conv.persona_id).await.unwrap());
    let after = st
        .chat_context("alice", c, &ms[2].message_id, 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.persona, context.persona);
    let late = message(Role::User, "late");
    assert!(matches!(
        st.add_user_message("alice", c, &late, &chat_request(c, &late))
            .await,
        Err(Error::PersonaDeleted)
    ));
    assert_eq!(
        st.list_messages("alice", c, 10, None)
            .await
            .unwrap()
            .items
            .len(),
        6,
        "the greeting and five messages"
    );
    // Nor does a new conversation begin with it.
    assert!(matches!(
        st.create_conversation(
            "alice",
            &conversation(),
            after.persona.as_ref().unwrap(),
            &greeting()
        )
        .await,
        Err(Error::NotFound)
    ));
}

/// A conversation of `user` with `persona` (stored already), a few milliseconds after the last
/// one: listings order by time, to the millisecond.
async fn conversation_with<S: Store + ?Sized>(
    st: &S,
    user: &str,
    persona: &Persona,
) -> ConversationId {
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    let conv = Conversation {
        persona_id: persona.persona_id.clone(),
        ..conversation()
    };
    st.create_conversation(user, &conv, persona, &greeting())
        .await
        .unwrap();
    conv.conversation_id
}

async fn conversations_are_listed_by_activity_renamed_and_deleted(s: Subject) {
    let st = s.store.as_ref();
    let (one, two) = (persona("per_1", "One"), persona("per_2", "Two"));
    st.put_persona("alice", &one).await.unwrap();
    st.put_persona("alice", &two).await.unwrap();
    let a = conversation_with(st, "alice", &one).await;
    let b = conversation_with(st, "alice", &two).await;
    let c = conversation_with(st, "alice", &one).await;
    let ids = |page: Vec<Conversation>| {
        page.into_iter()
            .map(|c| c.conversation_id)
            .collect::<Vec<_>>()
    };
    let list = |persona: Option<PersonaId>, limit: usize, token: Option<String>| async move {
        st.list_conversations("alice", persona.as_ref(), limit, token.as_deref())
            .await
            .unwrap()
    };
    assert_eq!(
        ids(list(None, 10, None).await.items),
        [c.clone(), b.clone(), a.clone()]
    );
    let fresh = st.get_conversation("alice", &a).await.unwrap().unwrap();
    assert_eq!(
        (fresh.title.as_deref(), fresh.preview.as_deref()),
        (None, Some("greeting")),
        "untitled until the first message; the greeting is the latest"
    );

    // A message makes its conversation the latest, titles it, and its reply is the preview.
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    let asked = message(Role::User, "Who stole   the pearl?");
    st.add_user_message("alice", &a, &asked, &chat_request(&a, &asked))
        .await
        .unwrap();
    assert_eq!(
        ids(list(None, 10, None).await.items),
        [a.clone(), c.clone(), b.clone()]
    );
    let reply = message(Role::Assistant, "The butler, naturally.");
    st.put_reply("alice", &a, &asked.message_id, &reply)
        .await
        .unwrap();
    let now = st.get_conversation("alice", &a).await.unwrap().unwrap();
    assert_eq!(now.title.as_deref(), Some("Who stole the pearl?"));
    assert_eq!(now.preview.as_deref(), Some("The butler, naturally."));
    assert_eq!(
        now.last_message_at.as_deref(),
        Some(reply.created_at.as_str())
    );

    // By persona, a page at a time.
    let first = list(Some(one.persona_id.clone()), 1, None).await;
    assert_eq!(ids(first.items), vec![a.clone()]);
    let rest = list(Some(one.persona_id.clone()), 1, first.next_token).await;
    assert_eq!(ids(rest.items), vec![c.clone()]);
    if let Some(token) = rest.next_token {
        assert!(list(Some(one.persona_id.clone()), 1, Some(token))
            .await
            .items
            .is_empty());
    }
    assert_eq!(
        ids(list(Some(two.persona_id.clone()), 10, None).await.items),
        vec![b.clone()]
    );

    // Renamed by its owner only; a rename does not move it.
    assert_eq!(
        st.rename_conversation("alice", &b, "Case notes")
            .await
            .unwrap()
            .title
            .as_deref(),
        Some("Case notes")
    );
    assert!(matches!(
        st.rename_conversation("bob", &b, "Mine now").await,
        Err(Error::NotFound)
    ));
    assert_eq!(
        st.get_conversation("alice", &b)
            .await
            .unwrap()
            .unwrap()
            .title
            .as_deref(),
        Some("Case notes")
    );
    assert_eq!(
        ids(list(None, 10, None).await.items),
        [a.clone(), c.clone(), b.clone()]
    );

    // Deleted by its owner only, with its messages: nothing of it is left to read or add to.
    assert!(matches!(
        st.delete_conversation("bob", &a).await,
        Err(Error::NotFound)
    ));
    st.delete_conversation("alice", &a).await.unwrap();
    assert!(st.get_conversation("alice", &a).await.unwrap().is_none());
    assert!(matches!(
        st.list_messages("alice", &a, 10, None).await,
        Err(Error::NotFound)
    ));
    assert!(st
        .page_messages(&a, 10, None)
        .await
        .unwrap()
        .items
        .is_empty());
    let late = message(Role::User, "Still there?");
    assert!(matches!(
        st.add_user_message("alice", &a, &late, &chat_request(&a, &late))
            .await,
        Err(Error::NotFound)
    ));
    assert!(matches!(
        st.delete_conversation("alice", &a).await,
        Err(Error::NotFound)
    ));
    assert_eq!(ids(list(None, 10, None).await.items), [c, b]);
}

async fn a_user_message_goes_only_into_the_users_own_conversation(s: Subject) {
    let st = s.store.as_ref();
    let conv = stored_conversation(st, "alice").await;
    let c = &conv.conversation_id;
    let intruder = message(Role::User, "not yours");
    let request = chat_request(c, &intruder);
    assert!(matches!(
        st.add_user_message("mallory", c, &intruder, &request).await,
        Err(Error::NotFound)
    ));
    let unknown = ConversationId::new();
    assert!(matches!(
        st.add_user_message("alice", &unknown, &intruder, &request)
            .await,
        Err(Error::NotFound)
    ));
    // Nothing of either attempt was stored: the greeting stays alone.
    assert_eq!(
        st.list_messages("alice", c, 10, None)
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    assert!(st
        .get_request("mallory", &request.request_id)
        .await
        .unwrap()
        .is_none());
    assert!(st
        .get_request("alice", &request.request_id)
        .await
        .unwrap()
        .is_none());
}

async fn requests_only_move_forward_and_batches_count_them(s: Subject) {
    let st = s.store.as_ref();
    let batch_id = BatchId::new();
    let requests: Vec<RequestRecord> = ["a", "b", "c"]
        .iter()
        .map(|p| {
            RequestRecord::new(
                RequestKind::Persona,
                RequestInput::Persona {
                    prompt: (*p).into(),
                },
                Some(batch_id.clone()),
            )
        })
        .collect();
    let batch = Batch::new(
        batch_id.clone(),
        requests.iter().map(|r| r.request_id.clone()).collect(),
    );
    st.create_requests("alice", &requests, Some(&batch))
        .await
        .unwrap();
    let (a, b) = (&requests[0].request_id, &requests[1].request_id);
    assert_eq!(
        st.get_request("alice", a).await.unwrap().unwrap(),
        requests[0]
    );
    assert!(
        st.get_request("bob", a).await.unwrap().is_none(),
        "owner scoped"
    );

    let (started, applied) = st.transition(a, Transition::Start).await.unwrap();
    assert!(applied);
    assert_eq!(
        (started.status, started.attempts),
        (RequestStatus::Running, 1)
    );
    let result = RequestResult::Persona(persona("per_a", "A"));
    let succeed = Transition::Succeed {
        result: Box::new(result.clone()),
        usage: Usage {
            input_tokens: 3,
            output_tokens: 4,
        },
        model: "m".into(),
        latency_ms: 5,
    };
    let (done, applied) = st.transition(a, succeed.clone()).await.unwrap();
    assert!(applied);
    assert_eq!(
        (done.status, done.result.as_ref(), done.latency_ms),
        (RequestStatus::Succeeded, Some(&result), Some(5))
    );
    // Finished is final: neither a failure nor a restart moves it.
    let (after, applied) = st
        .transition(
            a,
            Transition::Fail {
                error: error("late"),
            },
        )
        .await
        .unwrap();
    assert!(!applied);
    assert_eq!(after.status, RequestStatus::Succeeded);
    assert!(!st.transition(a, Transition::Start).await.unwrap().1);
    // A hand-back on shutdown queues the request again and takes its attempt back.
    st.transition(b, Transition::Start).await.unwrap();
    let (released, applied) = st
        .transition(
            b,
            Transition::Release {
                error: error("interrupted"),
            },
        )
        .await
        .unwrap();
    assert!(applied);
    assert_eq!(
        (released.status, released.attempts),
        (RequestStatus::Queued, 0)
    );
    let (again, _) = st.transition(b, Transition::Start).await.unwrap();
    assert_eq!(again.attempts, 1);
    st.transition(
        b,
        Transition::Fail {
            error: error("bad"),
        },
    )
    .await
    .unwrap();
    assert!(!st.transition(b, succeed).await.unwrap().1);
    assert!(matches!(
        st.transition(&"req_nope".into(), Transition::Start).await,
        Err(Error::NotFound)
    ));

    let counts = st.get_batch("alice", &batch_id).await.unwrap().unwrap();
    assert_eq!(
        (
            counts.total,
            counts.succeeded,
            counts.failed,
            counts.pending
        ),
        (3, 1, 1, 1)
    );
    assert_eq!(counts.request_ids, batch.request_ids);
    assert_eq!(counts.status, BatchStatus::InProgress);
    assert!(counts.finished_at.is_none());
    assert!(st.get_batch("bob", &batch_id).await.unwrap().is_none());

    // Listed for its owner only; its requests read back in the order asked, owner scoped.
    let listed = st.list_batches("alice", 10, None).await.unwrap();
    assert_eq!(listed.items, vec![counts.clone()]);
    assert!(st
        .list_batches("bob", 10, None)
        .await
        .unwrap()
        .items
        .is_empty());
    let ids: Vec<_> = batch.request_ids.iter().rev().cloned().collect();
    let read = st.batch_requests("alice", &ids).await.unwrap();
    let read_ids: Vec<_> = read.iter().map(|r| r.request_id.clone()).collect();
    assert_eq!(read_ids, ids);
    assert!(st.batch_requests("bob", &ids).await.unwrap().is_empty());

    // Cancelled by its owner (once: the first time is kept); `cancelled` once none is pending.
    assert!(!st.mark_batch_cancelled("bob", &batch_id).await.unwrap());
    assert!(st.mark_batch_cancelled("alice", &batch_id).await.unwrap());
    let first = st.get_batch("alice", &batch_id).await.unwrap().unwrap();
    assert!(st.mark_batch_cancelled("alice", &batch_id).await.unwrap());
    let again = st.get_batch("alice", &batch_id).await.unwrap().unwrap();
    assert!(first.cancelled_at.is_some());
    assert_eq!(again.cancelled_at, first.cancelled_at);
    assert_eq!(again.status, BatchStatus::InProgress, "one still pending");
    let (last, _) = st
        .transition(&requests[2].request_id, Transition::Cancel)
        .await
        .unwrap();
    let ended = st.get_batch("alice", &batch_id).await.unwrap().unwrap();
    assert_eq!(
        (ended.status, ended.cancelled, ended.pending),
        (BatchStatus::Cancelled, 1, 0)
    );
    assert_eq!(ended.finished_at.as_deref(), Some(last.updated_at.as_str()));
}

async fn idempotency_keys_claim_replay_and_release(s: Subject) {
    let st = s.store.as_ref();
    let day = 86_400_000;
    let IdempotencyBegin::Started {
        first_ms,
        claim: first_claim,
    } = st
        .idempotency_begin(key_claim("alice", "k", "fp1", 60_000, day))
        .await
        .unwrap()
    else {
        panic!("a new key is started");
    };
    assert!(first_ms > 0);
    assert_eq!(
        st.idempotency_begin(key_claim("alice", "k", "fp1", 60_000, day))
            .await
            .unwrap(),
        IdempotencyBegin::InFlight
    );
    assert_eq!(
        st.idempotency_begin(key_claim("alice", "k", "fp2", 60_000, day))
            .await
            .unwrap(),
        IdempotencyBegin::Mismatch
    );
    let bob_started = st
        .idempotency_begin(key_claim("bob", "k", "fp2", 60_000, day))
        .await
        .unwrap();
    assert!(
        matches!(bob_started, IdempotencyBegin::Started { .. }),
        "per user"
    );
    // The handler died: the claim is abandoned after the lock time, and taken over with the
    // time of the first claim, so ids derived from the key come out the same.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let IdempotencyBegin::Started {
        first_ms: taken_over_first,
        claim,
    } = st
        .idempotency_begin(key_claim("alice", "k", "fp1", 0, day))
        .await
        .unwrap()
    else {
        panic!("an abandoned claim is taken over");
    };
    assert_eq!(taken_over_first, first_ms);
    assert_ne!(claim, first_claim);
    // The first handler, not dead after all, finishes late: its claim is gone, so it neither
    // answers nor releases the key for the new claim.
    st.idempotency_complete("alice", "k", first_claim, &stored(500, "{\"late\":true}"))
        .await
        .unwrap();
    st.idempotency_release("alice", "k", first_claim)
        .await
        .unwrap();
    assert_eq!(
        st.idempotency_begin(key_claim("alice", "k", "fp1", 60_000, day))
            .await
            .unwrap(),
        IdempotencyBegin::InFlight,
        "the new claim still holds the key, unanswered"
    );
    st.idempotency_complete("alice", "k", claim, &stored(202, "{\"ok\":true}"))
        .await
        .unwrap();
    assert_eq!(
        st.idempotency_begin(key_claim("alice", "k", "fp1", 60_000, day))
            .await
            .unwrap(),
        IdempotencyBegin::Replay(stored(202, "{\"ok\":true}"))
    );
    st.idempotency_release("alice", "k", claim).await.unwrap(); // answered keys are not released
    assert!(matches!(
        st.idempotency_begin(key_claim("alice", "k", "fp1", 60_000, day))
            .await
            .unwrap(),
        IdempotencyBegin::Replay { .. }
    ));
    let IdempotencyBegin::Started {
        claim: bob_claim, ..
    } = bob_started
    else {
        panic!("bob's key is started");
    };
    st.idempotency_release("bob", "k", bob_claim).await.unwrap();
    assert!(matches!(
        st.idempotency_begin(key_claim("bob", "k", "fp3", 60_000, day))
            .await
            .unwrap(),
        IdempotencyBegin::Started { .. }
    ));
    st.ping().await.unwrap();
}

async fn expired_idempotency_keys_are_forgotten(s: Subject) {
    let st = s.store.as_ref();
    // Kept for 1 ms: expired by the time it is asked again, whether or not the backend has
    // deleted it yet (DynamoDB's TTL sweeps up to days late, so reads must check the time).
    let IdempotencyBegin::Started { claim, .. } = st
        .idempotency_begin(key_claim("alice", "k", "fp1", 60_000, 1))
        .await
        .unwrap()
    else {
        panic!("a new key is started");
    };
    st.idempotency_complete("alice", "k", claim, &stored(202, "{}"))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert!(
        matches!(
            st.idempotency_begin(key_claim("alice", "k", "fp2", 60_000, 86_400_000))
                .await
                .unwrap(),
            IdempotencyBegin::Started { .. }
        ),
        "a new request, neither a replay nor a mismatch"
    );
}

async fn a_fold_replaces_the_memory_only_as_it_was_read(s: Subject) {
    let st = s.store.as_ref();
    let one = persona("per_1", "One");
    st.put_persona("alice", &one).await.unwrap();
    let id = &conversation_with(st, "alice", &one).await;
    let read = st.get_memory("alice", id).await.unwrap();
    let folded = |summary: &str| Memory {
        summary: summary.into(),
        summarized_through: Some("msg_9".into()),
        ..read.clone()
    };
    // Another user's conversation is not found, and keeps its memory.
    assert!(matches!(
        st.replace_memory("bob", id, &read, &folded("bob's")).await,
        Err(Error::NotFound)
    ));
    assert!(st
        .replace_memory("alice", id, &read, &folded("first"))
        .await
        .unwrap());
    let now = st.get_memory("alice", id).await.unwrap();
    assert_eq!(now.summary, "first");
    assert_eq!(
        now.summarized_through.as_ref().map(|m| m.as_str()),
        Some("msg_9")
    );
    // A second fold from the same read finds it changed: nothing written.
    assert!(!st
        .replace_memory("alice", id, &read, &folded("second"))
        .await
        .unwrap());
    assert_eq!(st.get_memory("alice", id).await.unwrap().summary, "first");
    // A fold that comes after its conversation was deleted writes nothing.
    st.delete_conversation("alice", id).await.unwrap();
    assert!(matches!(
        st.replace_memory("alice", id, &now, &folded("late")).await,
        Err(Error::NotFound)
    ));
    assert!(matches!(
        st.get_memory("alice", id).await,
        Err(Error::NotFound)
    ));
}

contract!(
    embedded_store => embedded,
    dynamodb_store => dynamodb;
    personas_are_written_once_listed_newest_first_and_paged,
    each_user_message_gets_one_reply_in_its_place,
    conversations_are_listed_by_activity_renamed_and_deleted,
    a_user_message_goes_only_into_the_users_own_conversation,
    the_chat_context_is_the_persona_snapshot_and_the_turns_before,
    requests_only_move_forward_and_batches_count_them,
    idempotency_keys_claim_replay_and_release,
    expired_idempotency_keys_are_forgotten,
    a_fold_replaces_the_memory_only_as_it_was_read,
);

/// What DynamoDB's TTL needs, read back from the raw items: TTL is enabled on `expires_at`, and
/// every item that should go away carries it as epoch seconds (finished requests, idempotency
/// keys, events), while live records (a queued request, personas) do not.
mod dynamodb_ttl {
    use super::*;
    use aws_sdk_dynamodb::types::{AttributeValue, TimeToLiveStatus};
    use shared::events::EventBus;
    use shared::time::now_secs;

    async fn item(
        client: &aws_sdk_dynamodb::Client,
        table: &str,
        pk: &str,
        sk: &str,
    ) -> std::collections::HashMap<String, AttributeValue> {
        client
            .get_item()
            .table_name(table)
            .key("pk", AttributeValue::S(pk.into()))
            .key("sk", AttributeValue::S(sk.into()))
            .consistent_read(true)
            .send()
            .await
            .unwrap()
            .item
            .unwrap_or_else(|| panic!("no item {pk} / {sk}"))
    }

    fn expires_at(item: &std::collections::HashMap<String, AttributeValue>) -> Option<i64> {
        match item.get("expires_at")? {
            AttributeValue::N(n) => Some(n.parse().unwrap()),
            other => panic!("expires_at must be a number (epoch seconds), got {other:?}"),
        }
    }

    #[tokio::test]
    async fn expiring_items_carry_expires_at_in_epoch_seconds() {
        let client = aws_sdk_dynamodb::Client::from_conf(aws_sdk_dynamodb::Config::from(
            &common::aws_test_sdk_config(),
        ));
        let table = format!("ttl-{}", uuid::Uuid::new_v4().simple());
        DynamoStore::create_table(&client, &table).await.unwrap();
        let ttl = client
            .describe_time_to_live()
            .table_name(&table)
            .send()
            .await
            .unwrap()
            .time_to_live_description
            .unwrap();
        assert_eq!(ttl.attribute_name.as_deref(), Some("expires_at"));
        assert_eq!(ttl.time_to_live_status, Some(TimeToLiveStatus::Enabled));

        let st = DynamoStore::new(client.clone(), table.clone());
        let now = now_secs();
        let day = 86_400;

        // A request: no expiry while it may still be answered, 30 days once finished.
        let request = RequestRecord::new(
            RequestKind::Persona,
            RequestInput::Persona { prompt: "p".into() },
            None,
        );
        let id = request.request_id.clone();
        st.create_requests("alice", std::slice::from_ref(&request), None)
            .await
            .unwrap();
        let req_pk = format!("REQ#{id}");
        assert_eq!(
            expires_at(&item(&client, &table, &req_pk, "REQ").await),
            None
        );
        st.transition(&id, Transition::Start).await.unwrap();
        assert_eq!(
            expires_at(&item(&client, &table, &req_pk, "REQ").await),
            None
        );
        st.transition(
            &id,
            Transition::Fail {
                error: ErrorBody {
                    code: "x".into(),
                    message: "y".into(),
                },
            },
        )
        .await
        .unwrap();
        let at = expires_at(&item(&client, &table, &req_pk, "REQ").await).expect("finished");
        assert!(
            (now + 29 * day..=now + 31 * day).contains(&at),
            "{at} vs {now}"
        );

        // An idempotency key: as long as its answer is kept.
        let IdempotencyBegin::Started { claim, .. } = st
            .idempotency_begin(key_claim("alice", "k", "fp", 60_000, 2 * 3_600_000))
            .await
            .unwrap()
        else {
            panic!("a new key is started");
        };
        st.idempotency_complete("alice", "k", claim, &stored(202, "{}"))
            .await
            .unwrap();
        let at = expires_at(&item(&client, &table, "USER#alice", "IDEM#k").await).unwrap();
        assert!((now + 7_000..=now + 7_300).contains(&at), "{at} vs {now}");

        // A persona is kept until its owner deletes it.
        st.put_persona("alice", &persona("per_1", "P"))
            .await
            .unwrap();
        assert_eq!(
            expires_at(&item(&client, &table, "USER#alice", "PERSONA#per_1").await),
            None
        );

        // Events: an hour.
        let bus = common::aws_event_bus(&table, &table, std::time::Duration::from_secs(300)).await;
        bus.publish(
            "alice",
            &shared::events::Event::delta(&"req_1".into(), "Hi"),
        )
        .await
        .unwrap();
        let events = client
            .query()
            .table_name(&table)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", AttributeValue::S("EVS#alice".into()))
            .send()
            .await
            .unwrap()
            .items
            .unwrap();
        // The event, and the user's counter of ids, which stays: ids never start over.
        assert_eq!(events.len(), 2);
        let counter = events
            .iter()
            .find(|e| e["sk"].as_s().unwrap() == "#seq")
            .unwrap();
        assert_eq!(expires_at(counter), None);
        let event = events
            .iter()
            .find(|e| e["sk"].as_s().unwrap() != "#seq")
            .unwrap();
        let at = expires_at(event).unwrap();
        assert!((now + 3_500..=now + 3_700).contains(&at), "{at} vs {now}");
    }
}

/// Two processes appending to one conversation on DynamoDB: each remembers the last turn it
/// saw and sends its append without reading, so the other's appends make its guess stale. The
/// counter's condition refuses a stale turn and the append is built again: every message gets
/// its own turn, in the order the appends committed, with none lost or doubled.
mod dynamodb_turns {
    use super::*;
    use shared::store::ConversationStore;

    #[tokio::test]
    async fn two_processes_appending_to_one_conversation_take_distinct_turns() {
        let client = aws_sdk_dynamodb::Client::from_conf(aws_sdk_dynamodb::Config::from(
            &common::aws_test_sdk_config(),
        ));
        let table = format!("turns-{}", uuid::Uuid::new_v4().simple());
        DynamoStore::create_table(&client, &table).await.unwrap();
        let (a, b) = (
            DynamoStore::new(client.clone(), table.clone()),
            DynamoStore::new(client.clone(), table.clone()),
        );
        let conv = stored_conversation(&a, "alice").await;
        let c = &conv.conversation_id;

        // One after the other, alternating: each append after the first of a process starts
        // from a turn the other process has moved past.
        let mut sent = Vec::new();
        for i in 0..6 {
            let st = if i % 2 == 0 { &a } else { &b };
            let m = message(Role::User, &format!("m{i}"));
            st.add_user_message("alice", c, &m, &chat_request(c, &m))
                .await
                .unwrap();
            sent.push(m.text);
        }
        // Then both at once, several each.
        let both = (0..8).map(|i| {
            let st = if i % 2 == 0 { &a } else { &b };
            let m = message(Role::User, &format!("c{i}"));
            async move {
                st.add_user_message("alice", c, &m, &chat_request(c, &m))
                    .await
                    .map(|()| m.text)
            }
        });
        let concurrent: Vec<String> = futures::future::join_all(both)
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();

        let stored: Vec<String> = a
            .list_messages("alice", c, 100, None)
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|m| m.text)
            .collect();
        assert_eq!(stored[0], "greeting");
        assert_eq!(
            stored[1..7],
            sent[..],
            "sequential appends keep their order"
        );
        let mut rest = stored[7..].to_vec();
        rest.sort();
        let mut expected = concurrent;
        expected.sort();
        assert_eq!(rest, expected, "every concurrent append stored once");
        // A process that never saw the conversation's turns finds the message by id.
        let fresh = DynamoStore::new(client, table);
        let page = a.list_messages("alice", c, 100, None).await.unwrap().items;
        let context = fresh
            .chat_context("alice", c, &page[4].message_id, 2)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            context
                .history
                .iter()
                .map(|m| m.text.as_str())
                .collect::<Vec<_>>(),
            [sent[1].as_str(), sent[2].as_str()]
        );
        // And a stale guess still refuses another user.
        let intruder = message(Role::User, "not yours");
        assert!(matches!(
            b.add_user_message("mallory", c, &intruder, &chat_request(c, &intruder))
                .await,
            Err(Error::NotFound)
        ));
    }
}

/// A table made before the activity index: `aws-init` adds the index and gives the
/// conversations already there what it reads, so they are listed (and filtered) again.
mod dynamodb_upgrade {
    use super::*;
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
        ScalarAttributeType,
    };
    use shared::store::ConversationStore;

    #[tokio::test]
    async fn conversations_made_before_the_activity_index_are_listed_after_aws_init() {
        let client = aws_sdk_dynamodb::Client::from_conf(aws_sdk_dynamodb::Config::from(
            &common::aws_test_sdk_config(),
        ));
        let table = format!("upgrade-{}", uuid::Uuid::new_v4().simple());
        let mut create = client
            .create_table()
            .table_name(&table)
            .billing_mode(BillingMode::PayPerRequest);
        for (name, kind) in [("pk", KeyType::Hash), ("sk", KeyType::Range)] {
            create = create
                .attribute_definitions(
                    AttributeDefinition::builder()
                        .attribute_name(name)
                        .attribute_type(ScalarAttributeType::S)
                        .build()
                        .unwrap(),
                )
                .key_schema(
                    KeySchemaElement::builder()
                        .attribute_name(name)
                        .key_type(kind)
                        .build()
                        .unwrap(),
                );
        }
        create.send().await.unwrap();
        // A conversation as the previous release stored it: its record in `body` alone.
        let old = conversation();
        let body = serde_json::json!({
            "conversation_id": old.conversation_id,
            "persona_id": "per_x",
            "persona_name": "X",
            "created_at": old.created_at,
        });
        client
            .put_item()
            .table_name(&table)
            .item("pk", AttributeValue::S("USER#alice".into()))
            .item(
                "sk",
                AttributeValue::S(format!("CONV#{}", old.conversation_id)),
            )
            .item("body", AttributeValue::S(body.to_string()))
            .send()
            .await
            .unwrap();

        DynamoStore::ensure_table(&client, &table).await.unwrap();
        let st = DynamoStore::new(client, table);
        let listed = st
            .list_conversations("alice", None, 10, None)
            .await
            .unwrap();
        assert_eq!(listed.items.len(), 1, "{listed:?}");
        assert_eq!(listed.items[0].conversation_id, old.conversation_id);
        assert_eq!(
            listed.items[0].last_message_at.as_deref(),
            Some(old.created_at.as_str())
        );
        let mine = st
            .list_conversations("alice", Some(&PersonaId::from("per_x")), 10, None)
            .await
            .unwrap();
        assert_eq!(mine.items.len(), 1);
        // A newer conversation is listed before it.
        let newer = stored_conversation(&st, "alice").await;
        let ids: Vec<_> = st
            .list_conversations("alice", None, 10, None)
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|c| c.conversation_id)
            .collect();
        assert_eq!(ids, [newer.conversation_id, old.conversation_id]);
    }
}
