//! The event bus on DynamoDB, for API and workers on different hosts: each event is an item in
//! the user's partition (`pk = EVT#{user}`, `sk` = its id, zero-padded), expired by TTL after
//! [`RETENTION_MS`](super::RETENTION_MS). The API instance that holds a user's stream queries
//! that partition for newer items a few times a second — one cheap key-range query per open
//! stream, and nothing at all for users who are not connected.
//!
//! Ids are microseconds since the epoch, made strictly increasing within a process. Writers on
//! other hosts may be a little behind in clock, so each poll looks back [`LOOKBACK`] and skips
//! ids it has already sent.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use futures::stream::BoxStream;
use futures::StreamExt;

use super::{Event, EventBus, Published, RETENTION_MS};
use crate::error::Report;
use crate::store::dynamodb::storage;
use crate::Result;

/// How often an open stream looks for new events.
const POLL: Duration = Duration::from_millis(250);
/// How far back each poll looks, for writers whose clocks run behind.
const LOOKBACK: Duration = Duration::from_secs(2);

pub struct DynamoEventBus {
    client: Client,
    table: String,
    last_id: AtomicU64,
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

fn sk(id: u64) -> String {
    format!("{id:020}")
}

impl DynamoEventBus {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        DynamoEventBus {
            client,
            table: table.into(),
            last_id: AtomicU64::new(0),
        }
    }

    /// A new id, strictly greater than any this process made before.
    fn next_id(&self) -> u64 {
        let now = now_micros();
        let prev = self.last_id.fetch_max(now, Ordering::SeqCst);
        if prev >= now {
            self.last_id.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            now
        }
    }

    async fn read_after(
        client: &Client,
        table: &str,
        user_id: &str,
        after: u64,
    ) -> Result<Vec<Published>> {
        let mut events = Vec::new();
        let mut start = None;
        loop {
            let out = client
                .query()
                .table_name(table)
                .key_condition_expression("pk = :pk AND sk > :after")
                .expression_attribute_values(":pk", AttributeValue::S(format!("EVT#{user_id}")))
                .expression_attribute_values(":after", AttributeValue::S(sk(after)))
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| storage("read events", e))?;
            for item in out.items.unwrap_or_default() {
                let get = |k: &str| {
                    item.get(k)
                        .and_then(|v| v.as_s().ok())
                        .cloned()
                        .unwrap_or_default()
                };
                let id = get("sk").parse().unwrap_or_default();
                if let Some(e) =
                    Published::from_stored(id, user_id.to_owned(), &get("name"), get("data"))
                {
                    events.push(e);
                }
            }
            start = out.last_evaluated_key;
            if start.is_none() {
                return Ok(events);
            }
        }
    }
}

impl DynamoEventBus {
    /// The item of a new event, for a writer that puts it inside its own transaction
    /// (`shared::atomic::aws`); `publish` puts it alone.
    pub fn event_item(
        &self,
        user_id: &str,
        name: &str,
        data: &str,
    ) -> HashMap<String, AttributeValue> {
        let id = self.next_id();
        HashMap::from([
            ("pk".into(), AttributeValue::S(format!("EVT#{user_id}"))),
            ("sk".into(), AttributeValue::S(sk(id))),
            ("name".into(), AttributeValue::S(name.to_owned())),
            ("data".into(), AttributeValue::S(data.to_owned())),
            (
                "expires_at".into(),
                AttributeValue::N(((id / 1_000_000) as i64 + RETENTION_MS / 1000).to_string()),
            ),
        ])
    }
}

#[async_trait]
impl EventBus for DynamoEventBus {
    async fn publish(&self, user_id: &str, event: &Event) -> Result<()> {
        let (name, data) = event.to_parts()?;
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(self.event_item(user_id, name, &data)))
            .send()
            .await
            .map_err(|e| storage("publish event", e))?;
        Ok(())
    }

    async fn subscribe(
        &self,
        user_id: &str,
        after: Option<u64>,
    ) -> Result<BoxStream<'static, Arc<Published>>> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Arc<Published>>(256);
        let (client, table, user) = (self.client.clone(), self.table.clone(), user_id.to_owned());
        // Everything up to `start` is the past: already seen (`Last-Event-ID`), or before now.
        let start = after.unwrap_or_else(now_micros);
        let lookback = LOOKBACK.as_micros() as u64;
        let mut sent: BTreeSet<u64> = BTreeSet::new();
        tokio::spawn(async move {
            let mut cursor = start;
            loop {
                match Self::read_after(&client, &table, &user, cursor.saturating_sub(lookback))
                    .await
                {
                    Ok(events) => {
                        for e in events {
                            if e.id <= start || !sent.insert(e.id) {
                                continue;
                            }
                            cursor = cursor.max(e.id);
                            if tx.send(Arc::new(e)).await.is_err() {
                                return; // the stream was dropped
                            }
                        }
                        // Forget ids that fell out of the window.
                        let keep_from = cursor.saturating_sub(2 * lookback);
                        sent = sent.split_off(&keep_from);
                    }
                    Err(e) => tracing::warn!(error = %Report(&e), "event poll failed"),
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(POLL) => {}
                }
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
    }
}
