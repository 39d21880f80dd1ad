//! The `EventBus` contract, run against each implementation: the embedded SQLite bus, and the
//! DynamoDB bus on the moto server of `scripts/test`. Two bus instances on the same database
//! stand for two processes or hosts (the API holding a stream, a worker publishing).

use std::sync::Arc;
use std::time::Duration;

use crate::common;
use futures::StreamExt;
use serde_json::json;
use shared::domain::{RequestInput, RequestKind, RequestRecord, RequestStatus};
use shared::events::{Event, EventBus, Published, SqliteEventBus};
use shared::sqlite::Db;
use shared::store::dynamodb::DynamoStore;

/// Two buses on one backing store, and what must live as long as they do.
struct Subject {
    api: Arc<dyn EventBus>,
    worker: Arc<dyn EventBus>,
    _dir: Option<tempfile::TempDir>,
    /// The DynamoDB table (AWS).
    table: Option<String>,
    /// Stops the API bus's intake (its inbox) when the test ends.
    _listening: Option<tokio_util::sync::DropGuard>,
}

async fn embedded() -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).await.unwrap();
    Subject {
        api: SqliteEventBus::start(db.clone()).await.unwrap(),
        worker: SqliteEventBus::start(db).await.unwrap(),
        _dir: Some(dir),
        table: None,
        _listening: None,
    }
}

async fn aws() -> Subject {
    let client = aws_sdk_dynamodb::Client::new(&common::aws_test_sdk_config());
    let table = format!("events-{}", uuid::Uuid::new_v4().simple());
    DynamoStore::create_table(&client, &table).await.unwrap();
    // The API's bus listens (an inbox on the topic); the worker's only publishes.
    let stale = Duration::from_secs(300);
    let api = common::aws_event_bus(&table, &table, stale).await;
    let worker = common::aws_event_bus(&table, &table, stale).await;
    let stop = tokio_util::sync::CancellationToken::new();
    api.listen(stop.clone()).await.unwrap();
    Subject {
        api,
        worker,
        _dir: None,
        table: Some(table),
        _listening: Some(stop.drop_guard()),
    }
}

/// Another writer (process) on the AWS subject's table and topic.
async fn aws_writer(s: &Subject) -> Arc<dyn EventBus> {
    let table = s.table.clone().unwrap();
    common::aws_event_bus(&table, &table, Duration::from_secs(300)).await
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
    aws_events => aws;
    a_stream_gets_its_users_events_from_another_process_in_order,
    a_reconnecting_client_is_replayed_what_it_missed,
    a_watch_gets_its_requests_updates_until_it_finishes,
);

/// What only the AWS bus promises: ids per user with no holes, taken by any number of writers
/// without two taking one, and replays that leave out what expired.
mod aws_only {
    use super::*;
    use aws_sdk_dynamodb::types::AttributeValue;

    #[tokio::test]
    async fn writers_racing_for_one_user_take_every_id_once_with_no_holes() {
        let s = aws().await;
        let other = aws_writer(&s).await;
        let (first, second) = (s.worker.clone(), other);
        let write = |bus: Arc<dyn EventBus>, tag: &'static str| async move {
            for i in 0..15 {
                bus.publish("erin", &delta(&format!("{tag}{i}")))
                    .await
                    .unwrap();
            }
        };
        tokio::join!(write(first, "a"), write(second, "b"));
        let mut replay = s.api.subscribe("erin", Some(0)).await.unwrap();
        let mut ids = Vec::new();
        let mut texts = std::collections::BTreeSet::new();
        for _ in 0..30 {
            let e = next(&mut replay).await;
            ids.push(e.id);
            let Event::MessageDelta(d) = &e.event else {
                panic!("{:?}", e.event)
            };
            texts.insert(d.text.clone());
        }
        assert_eq!(ids, (1..=30).collect::<Vec<u64>>(), "dense, in order, once");
        assert_eq!(texts.len(), 30, "no event overwrote another");
    }

    #[tokio::test]
    async fn a_replay_from_long_ago_starts_at_the_oldest_event_still_kept() {
        let s = aws().await;
        for i in 1..=6 {
            s.worker
                .publish("fay", &delta(&i.to_string()))
                .await
                .unwrap();
        }
        // The first four expired; DynamoDB's TTL has not deleted them yet (it takes its time).
        let sdk = common::aws_test_sdk_config();
        let client = aws_sdk_dynamodb::Client::new(&sdk);
        let table = s.table.clone().unwrap();
        for id in 1..=4u64 {
            client
                .update_item()
                .table_name(&table)
                .key("pk", AttributeValue::S("EVS#fay".into()))
                .key("sk", AttributeValue::S(format!("{id:020}")))
                .update_expression("SET expires_at = :past")
                .expression_attribute_values(":past", AttributeValue::N("1000".into()))
                .send()
                .await
                .unwrap();
        }
        let mut replay = s.api.subscribe("fay", Some(0)).await.unwrap();
        assert_eq!(next(&mut replay).await.event, delta("5"));
        assert_eq!(next(&mut replay).await.event, delta("6"));
        s.worker.publish("fay", &delta("7")).await.unwrap();
        assert_eq!(next(&mut replay).await.event, delta("7"), "then live");
    }
}

mod aws_inbox {
    use super::*;

    async fn inbox_urls(prefix: &str) -> Vec<String> {
        aws_sdk_sqs::Client::new(&common::aws_test_sdk_config())
            .list_queues()
            .queue_name_prefix(prefix)
            .send()
            .await
            .unwrap()
            .queue_urls()
            .to_vec()
    }

    /// An instance whose inbox is deleted under it (by hand, or by another instance that took
    /// it for a dead one's) makes a new one and goes on relaying.
    #[tokio::test]
    async fn an_instance_whose_inbox_was_deleted_makes_a_new_one() {
        let client = aws_sdk_dynamodb::Client::new(&common::aws_test_sdk_config());
        let table = format!("events-{}", uuid::Uuid::new_v4().simple());
        DynamoStore::create_table(&client, &table).await.unwrap();
        let (stale, wait) = (Duration::from_secs(300), Duration::from_secs(1));
        let api = common::aws_event_bus_waiting(&table, &table, stale, wait).await;
        let worker = common::aws_event_bus(&table, &table, stale).await;
        let stop = tokio_util::sync::CancellationToken::new();
        let _stop = stop.clone().drop_guard();
        api.listen(stop).await.unwrap();
        let mut stream = api.subscribe("gus", None).await.unwrap();
        let prefix = format!("inbox-{table}-");
        let first = inbox_urls(&prefix).await;
        assert_eq!(first.len(), 1);

        aws_sdk_sqs::Client::new(&common::aws_test_sdk_config())
            .delete_queue()
            .queue_url(&first[0])
            .send()
            .await
            .unwrap();
        let mut now = Vec::new();
        for _ in 0..80 {
            now = inbox_urls(&prefix).await;
            if now.len() == 1 && now != first {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(now.len() == 1 && now != first, "a new inbox: {now:?}");
        worker.publish("gus", &delta("after")).await.unwrap();
        assert_eq!(next(&mut stream).await.event, delta("after"));
    }
}
