//! The `Queue` contract, run against each implementation: the embedded SQLite queue, and the
//! SQS queue through the real AWS SDK against the moto server that `scripts/test` starts.
//! Each test gets its own queues, so the suites run in parallel.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::common;
use shared::queue::sqlite::SqliteQueue;
use shared::queue::sqs::SqsQueue;
use shared::queue::{Outgoing, Queue};
use shared::sqlite::Db;

const HIDE: Duration = Duration::from_secs(1);
const NO_WAIT: Duration = Duration::ZERO;

/// A queue and whatever must live as long as it.
struct Subject {
    queue: Arc<dyn Queue>,
    _dir: Option<tempfile::TempDir>,
}

async fn embedded() -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).await.unwrap();
    Subject {
        queue: Arc::new(SqliteQueue::new(db, "contract")),
        _dir: Some(dir),
    }
}

async fn sqs() -> Subject {
    sqs_named("").await
}

/// An SQS queue of a fresh name ending in `suffix` (`.fifo`: a FIFO queue).
async fn sqs_named(suffix: &str) -> Subject {
    let client = aws_sdk_sqs::Client::from_conf(common::aws_test_config().await);
    let name = format!("contract-{}{suffix}", uuid::Uuid::new_v4().simple());
    let queue = SqsQueue::ensure(client, "contract", &name, 10)
        .await
        .unwrap();
    Subject {
        queue: Arc::new(queue),
        _dir: None,
    }
}

/// Receives until `n` deliveries arrived or `limit` passed.
async fn receive_n(q: &dyn Queue, n: usize, limit: Duration) -> Vec<shared::queue::Delivery> {
    let deadline = tokio::time::Instant::now() + limit;
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

async fn a_received_message_is_hidden_then_reappears_counted(s: Subject) {
    let q = s.queue.as_ref();
    q.send(&["a".into()]).await.unwrap();
    let first = q.receive(10, HIDE, Duration::from_secs(2)).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!((first[0].body.as_str(), first[0].receive_count), ("a", 1));
    assert!(
        q.receive(10, HIDE, NO_WAIT).await.unwrap().is_empty(),
        "hidden"
    );
    let stats = q.stats().await.unwrap();
    assert_eq!((stats.visible, stats.in_flight), (0, 1));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let again = q
        .receive(10, Duration::from_secs(30), Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(again.len(), 1, "visible again after the timeout");
    assert_eq!(again[0].receive_count, 2);
    assert_eq!(again[0].message_id, first[0].message_id);
    assert_ne!(again[0].receipt, first[0].receipt);
    q.delete(&again[0].receipt).await.unwrap();
    let stats = q.stats().await.unwrap();
    assert_eq!((stats.visible, stats.in_flight, stats.dead), (0, 0, 0));
}

async fn visibility_can_be_extended_and_released(s: Subject) {
    let q = s.queue.as_ref();
    q.send(&["x".into()]).await.unwrap();
    let d = q
        .receive(1, HIDE, Duration::from_secs(2))
        .await
        .unwrap()
        .remove(0);
    // A heartbeat keeps it hidden past the first timeout.
    q.change_visibility(&d.receipt, Duration::from_secs(30))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(q.receive(1, HIDE, NO_WAIT).await.unwrap().is_empty());
    // Released: visible at once.
    q.change_visibility(&d.receipt, Duration::ZERO)
        .await
        .unwrap();
    let again = q.receive(1, HIDE, Duration::from_secs(2)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].receive_count, 2);
}

async fn dead_letters_keep_body_reason_and_count(s: Subject) {
    let q = s.queue.as_ref();
    q.send(&["poison".into(), "fine".into()]).await.unwrap();
    let got = receive_n(q, 2, Duration::from_secs(5)).await;
    let poison = got.iter().find(|d| d.body == "poison").unwrap();
    let fine = got.iter().find(|d| d.body == "fine").unwrap();
    q.dead_letter(poison, "always fails").await.unwrap();
    q.delete(&fine.receipt).await.unwrap();
    let stats = q.stats().await.unwrap();
    assert_eq!((stats.visible, stats.in_flight, stats.dead), (0, 0, 1));
    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].body.as_str(),
            dead[0].reason.as_str(),
            dead[0].receive_count
        ),
        ("poison", "always fails", 1)
    );
    // Reading dead letters does not consume them.
    assert_eq!(q.dead_letters(10).await.unwrap().len(), 1);
}

async fn many_messages_round_trip_exactly_once(s: Subject) {
    let q = s.queue.as_ref();
    let bodies: Vec<String> = (0..25).map(|i| format!("m{i}")).collect();
    for chunk in bodies.chunks(10) {
        let messages: Vec<Outgoing> = chunk.iter().cloned().map(Outgoing::new).collect();
        q.send(&messages).await.unwrap();
    }
    let got = receive_n(q, 25, Duration::from_secs(15)).await;
    let received: BTreeSet<String> = got.iter().map(|d| d.body.clone()).collect();
    assert_eq!(got.len(), 25, "no duplicates while hidden");
    assert_eq!(received, bodies.iter().cloned().collect());
    for d in &got {
        q.delete(&d.receipt).await.unwrap();
    }
    assert_eq!(
        q.stats().await.unwrap().visible + q.stats().await.unwrap().in_flight,
        0
    );
}

async fn a_long_poll_returns_when_a_message_arrives(s: Subject) {
    let q = s.queue.clone();
    let sender = q.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        sender.send(&["late".into()]).await.unwrap();
    });
    let started = std::time::Instant::now();
    let got = q.receive(1, HIDE, Duration::from_secs(10)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "returned on arrival, not at the end of the wait"
    );
}

async fn attributes_travel_with_the_message_and_into_the_dead_letters(s: Subject) {
    let q = s.queue.as_ref();
    let traced = Outgoing::new("traced")
        .with("request_id", "req-1")
        .with("trace_id", "1-5759e988-bd862e3fe1be46a994272793");
    q.send(&[traced.clone(), "plain".into()]).await.unwrap();
    let got = receive_n(q, 2, Duration::from_secs(5)).await;
    let d = got.iter().find(|d| d.body == "traced").unwrap();
    assert_eq!(d.attributes, traced.attributes);
    let plain = got.iter().find(|d| d.body == "plain").unwrap();
    assert!(plain.attributes.is_empty(), "{:?}", plain.attributes);
    q.dead_letter(d, "gave up").await.unwrap();
    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attributes, traced.attributes);
    assert_eq!(dead[0].reason, "gave up");
}

contract!(
    embedded_queue => embedded,
    sqs_queue => sqs;
    a_received_message_is_hidden_then_reappears_counted,
    visibility_can_be_extended_and_released,
    dead_letters_keep_body_reason_and_count,
    many_messages_round_trip_exactly_once,
    a_long_poll_returns_when_a_message_arrives,
    attributes_travel_with_the_message_and_into_the_dead_letters,
);

async fn sqs_fifo() -> Subject {
    sqs_named(".fifo").await
}

/// A group's messages (a conversation's turns) come one at a time, in the order sent: the next
/// only once the one before is deleted; a message waiting for a retry holds its group back;
/// other groups and messages without one are not held back.
async fn messages_of_a_group_come_one_at_a_time_in_order(s: Subject) {
    let q = s.queue.as_ref();
    let sent: Vec<Outgoing> = ["a1", "a2", "a3"]
        .iter()
        .map(|b| Outgoing::new(*b).in_group("a"))
        .chain([Outgoing::new("b1").in_group("b"), Outgoing::new("none")])
        .collect();
    for m in &sent {
        // One at a time, so that the order sent is the order of the sends.
        q.send(std::slice::from_ref(m)).await.unwrap();
    }
    let bodies = |ds: &[shared::queue::Delivery]| {
        let mut b: Vec<String> = ds.iter().map(|d| d.body.clone()).collect();
        b.sort();
        b
    };
    let first = receive_n(q, 3, Duration::from_secs(5)).await;
    assert_eq!(bodies(&first), ["a1", "b1", "none"]);
    let more = q
        .receive(10, Duration::from_secs(30), Duration::from_secs(1))
        .await
        .unwrap();
    assert!(
        more.is_empty(),
        "a1 in flight holds a2 back: {:?}",
        bodies(&more)
    );

    // a1 goes back for a retry later: still in flight, still holding the group.
    let a1 = first.iter().find(|d| d.body == "a1").unwrap();
    q.change_visibility(&a1.receipt, Duration::from_secs(1))
        .await
        .unwrap();
    let again = receive_n(q, 1, Duration::from_secs(10)).await;
    assert_eq!(bodies(&again), ["a1"], "the retry comes first");
    q.delete(&again[0].receipt).await.unwrap();
    let next = receive_n(q, 1, Duration::from_secs(10)).await;
    assert_eq!(bodies(&next), ["a2"]);
    q.delete(&next[0].receipt).await.unwrap();
    let last = receive_n(q, 1, Duration::from_secs(10)).await;
    assert_eq!(bodies(&last), ["a3"]);
}

contract!(
    sqs_fifo_queue => sqs_fifo;
    a_received_message_is_hidden_then_reappears_counted,
    visibility_can_be_extended_and_released,
    dead_letters_keep_body_reason_and_count,
    many_messages_round_trip_exactly_once,
    a_long_poll_returns_when_a_message_arrives,
    attributes_travel_with_the_message_and_into_the_dead_letters,
    messages_of_a_group_come_one_at_a_time_in_order,
);

contract!(
    embedded_groups => embedded;
    messages_of_a_group_come_one_at_a_time_in_order,
);
