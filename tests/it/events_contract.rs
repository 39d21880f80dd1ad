//! The `EventBus` contract, run against each implementation: the embedded SQLite bus, and the
//! DynamoDB bus on the moto server of `scripts/test`. Two bus instances on the same database
//! stand for two processes or hosts (the API holding a stream, a worker publishing).

use std::sync::Arc;
use std::time::Duration;

use crate::common;
use futures::StreamExt;
use serde_json::json;
use shared::domain::{RequestInput, RequestKind, RequestRecord, RequestStatus};
use shared::events::dynamodb::DynamoEventBus;
use shared::events::{Event, EventBus, Published, SqliteEventBus};
use shared::sqlite::Db;
use shared::store::dynamodb::DynamoStore;

/// Two buses on one backing store, and what must live as long as they do.
struct Subject {
    api: Arc<dyn EventBus>,
    worker: Arc<dyn EventBus>,
    _dir: Option<tempfile::TempDir>,
}

async fn embedded() -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).await.unwrap();
    Subject {
        api: SqliteEventBus::start(db.clone()).await.unwrap(),
        worker: SqliteEventBus::start(db).await.unwrap(),
        _dir: Some(dir),
    }
}

async fn dynamodb() -> Subject {
    let client = aws_sdk_dynamodb::Client::new(&common::aws_test_sdk_config());
    let table = format!("events-{}", uuid::Uuid::new_v4().simple());
    DynamoStore::create_table(&client, &table).await.unwrap();
    Subject {
        api: Arc::new(DynamoEventBus::new(client.clone(), &table)),
        worker: Arc::new(DynamoEventBus::new(client, &table)),
        _dir: None,
    }
}

async fn next(stream: &mut futures::stream::BoxStream<'static, Arc<Published>>) -> Arc<Published> {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an event in time")
        .expect("stream open")
}

/// A piece of a reply: `message.delta` with `text`.
fn delta(text: &str) -> Event {
    Event::delta(&"req_1".into(), text)
}

/// A change of a request's record: `request.updated` with its id and `status`.
fn updated(request_id: &str, status: RequestStatus) -> Event {
    let mut record = RequestRecord::with_id(
        request_id.into(),
        RequestKind::Persona,
        RequestInput::Persona {
            prompt: "Yoda".into(),
        },
        None,
    );
    record.status = status;
    Event::updated(&record)
}

async fn a_stream_gets_its_users_events_from_another_process_in_order(s: Subject) {
    s.worker.publish("alice", &delta("old")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut stream = s.api.subscribe("alice", None).await.unwrap();
    s.worker
        .publish("bob", &delta("not alice's"))
        .await
        .unwrap();
    for i in 1..=5 {
        s.worker
            .publish("alice", &delta(&i.to_string()))
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(next(&mut stream).await);
    }
    assert!(
        got.iter()
            .all(|e| e.user_id == "alice" && e.event.name() == "message.delta"),
        "{got:?}"
    );
    assert_eq!(
        got.iter().map(|e| e.event.clone()).collect::<Vec<_>>(),
        ["1", "2", "3", "4", "5"].map(delta)
    );
    assert!(got.windows(2).all(|w| w[0].id < w[1].id), "ids increase");
}

async fn a_reconnecting_client_is_replayed_what_it_missed(s: Subject) {
    let mut stream = s.api.subscribe("carol", None).await.unwrap();
    s.worker.publish("carol", &delta("a")).await.unwrap();
    let first = next(&mut stream).await;
    drop(stream);
    s.worker.publish("carol", &delta("b")).await.unwrap();
    s.worker.publish("carol", &delta("c")).await.unwrap();
    let mut resumed = s.api.subscribe("carol", Some(first.id)).await.unwrap();
    assert_eq!(next(&mut resumed).await.event, delta("b"));
    assert_eq!(next(&mut resumed).await.event, delta("c"));
    s.worker.publish("carol", &delta("d")).await.unwrap();
    assert_eq!(
        next(&mut resumed).await.event,
        delta("d"),
        "live after the replay"
    );
}

async fn a_watch_gets_its_requests_updates_until_it_finishes(s: Subject) {
    let mut watch = s.api.watch_request("dave", &"req_1".into()).await.unwrap();
    s.worker
        .publish("dave", &updated("req_2", RequestStatus::Running))
        .await
        .unwrap();
    s.worker
        .publish("dave", &updated("req_1", RequestStatus::Running))
        .await
        .unwrap();
    s.worker
        .publish("dave", &Event::delta(&"req_1".into(), "Hi"))
        .await
        .unwrap();
    s.worker
        .publish("dave", &updated("req_1", RequestStatus::Succeeded))
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let e = next(&mut watch).await;
        // As a client reads it: the event's name and its JSON data.
        let data: serde_json::Value = serde_json::from_str(&e.data).unwrap();
        got.push((
            e.event.name().to_string(),
            data["request_id"].clone(),
            data["status"].clone(),
        ));
    }
    assert_eq!(
        got,
        [
            (
                "request.updated".to_string(),
                json!("req_1"),
                json!("running")
            ),
            (
                "request.updated".to_string(),
                json!("req_1"),
                json!("succeeded")
            ),
        ],
        "only req_1's updates, in order: its delta is not a change of the record"
    );
}

contract!(
    embedded_events => embedded,
    dynamodb_events => dynamodb;
    a_stream_gets_its_users_events_from_another_process_in_order,
    a_reconnecting_client_is_replayed_what_it_missed,
    a_watch_gets_its_requests_updates_until_it_finishes,
);
