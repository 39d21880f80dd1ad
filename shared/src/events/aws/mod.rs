//! The event bus on AWS, for API and workers on any number of hosts.
//!
//! **Stored** in DynamoDB, for replay: each event is an item in its user's partition
//! (`pk = EVS#{user}`, `sk` = its id, zero-padded; `EVS`, not the `EVT` of the clock-based ids
//! before them, so the two never mix in one read during a rolling deploy), expired by TTL after
//! [`RETENTION_MS`](super::RETENTION_MS). A user's ids count 1, 2, 3, ... with no holes: a
//! counter item (`sk = #seq`) moves from n to n+k in the same transaction that writes events
//! n+1..=n+k, on the condition that it still says n. So an event becomes visible only after
//! every lower id did, two writers can never take one id (the second's condition fails and it
//! takes the next), and a reconnect that reads the ids after its `Last-Event-ID` misses
//! nothing. A replay starts at the oldest event still kept, found by a few reads of single
//! items, so an old `Last-Event-ID` never reads TTL-expired items DynamoDB has not deleted yet.
//!
//! **Announced** on an SNS topic once committed ([`topic`]). Each API instance owns an SQS
//! queue subscribed to the topic ([`inbox`]: made when the instance starts listening, removed
//! when it stops) and hands what arrives to its streams and long polls ([`super::fanout`]).
//! Nothing is read per open stream: an idle user costs nothing, and an instance's standing
//! cost is its inbox's long polls. SNS to SQS is at-least-once and unordered; dense ids let a
//! stream drop repeats and read a gap from the table when an event arrives early (or never: an
//! announcement lost with a writer that died just after committing shows up as a gap at the
//! user's next event, and long polls re-read their request now and then).
//!
//! Instances that die without removing their inbox leave it subscribed; each instance tags its
//! inbox as alive every so often and removes the inboxes (and subscriptions) of others that
//! stopped doing so.

mod inbox;
mod topic;

use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{Put, TransactWriteItem};
use aws_sdk_dynamodb::Client;
use futures::stream::BoxStream;
use tokio_util::sync::CancellationToken;

pub use inbox::InboxOptions;
pub use topic::Topic;

use super::fanout::{Backlog, Fanout, Read};
use super::{Event, EventBus, Published, RETENTION_MS};
use crate::domain::RequestRecord;
use crate::ids::RequestId;
use crate::memo::{KeyedLocks, Memo};
use crate::store::dynamodb::{get_n, get_s, key, n, put_if_absent, s, storage, Cancelled, Item};
use crate::time::now_secs;
use crate::{Error, Result};

/// The sort key of a user's event counter; `#` sorts before digits, so reads of ids never
/// meet it.
const COUNTER_SK: &str = "#seq";
/// Attempts of one publish whose counter other writers keep moving.
const MAX_TRIES: usize = 50;
/// Users whose newest id this process remembers (saving a read before its next write); the
/// memory is dropped whole past this.
const HEADS_KEPT: usize = 100_000;
/// Longest pause before trying again after another process moved a user's counter a second
/// time in a row (random, up to this: two writers that collided are unlikely to collide again).
/// The first retry goes at once: most collisions are a remembered head gone stale, not a race.
const CONFLICT_PAUSE_MS: u64 = 50;
/// How long a remembered head is trusted: long enough for one job's writes (its start, reply
/// fragments and settlement), short enough that a user's next turn, likely run by another
/// worker process, reads the counter instead of failing on a stale head.
const HEAD_FRESH: std::time::Duration = std::time::Duration::from_secs(10);

pub struct AwsEventBus {
    stored: Arc<Stored>,
    topic: Topic,
    sqs: aws_sdk_sqs::Client,
    inbox: InboxOptions,
    fanout: Arc<Fanout>,
    /// The newest id of each user this process wrote: the base of its next write. Wrong when
    /// another process wrote since; the counter's condition catches that.
    heads: Memo<String, (u64, std::time::Instant)>,
    /// One writer at a time per user in this process: the tasks of a process (a user's many
    /// jobs at once, a batch) take turns instead of racing each other for the counter, so
    /// only writers in other processes ever collide.
    turns: KeyedLocks<String>,
}

/// Events to write as a user's next ids, in a transaction of the caller's: the counter's
/// conditional put first, then one item per event. Hand it back to [`AwsEventBus::committed`]
/// once the transaction committed, or to [`AwsEventBus::moved`] if the counter's condition
/// failed.
pub struct Sequenced {
    pub items: Vec<TransactWriteItem>,
    user_id: String,
    published: Vec<Published>,
    /// This process's turn to write the user's events, held until the transaction ended.
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

impl AwsEventBus {
    pub fn new(
        client: Client,
        table: impl Into<String>,
        topic: Topic,
        sqs: aws_sdk_sqs::Client,
        inbox: InboxOptions,
    ) -> Self {
        AwsEventBus {
            stored: Arc::new(Stored {
                client,
                table: table.into(),
            }),
            topic,
            sqs,
            inbox,
            fanout: Arc::default(),
            heads: Memo::new(HEADS_KEPT),
            turns: KeyedLocks::new(HEADS_KEPT),
        }
    }

    /// The items that store `events` as the user's next ids (see [`Sequenced`]).
    pub async fn sequenced(&self, user_id: &str, events: &[Event]) -> Result<Sequenced> {
        let turn = self.turns.lock(&user_id.to_owned()).await;
        let head = match self.heads.get(user_id) {
            Some((head, at)) if at.elapsed() < HEAD_FRESH => head,
            _ => self.stored.current(user_id).await?,
        };
        let new_head = head + events.len() as u64;
        let mut items = vec![self.stored.counter_put(user_id, head, new_head)?];
        let mut published = Vec::with_capacity(events.len());
        for (id, event) in (head + 1..).zip(events) {
            let (name, data) = event.to_parts()?;
            let item = event_item(user_id, id, name, &data);
            items.push(put_if_absent(&self.stored.table, item)?);
            published.push(Published {
                id,
                user_id: user_id.to_owned(),
                event: event.clone(),
                data,
            });
        }
        Ok(Sequenced {
            items,
            user_id: user_id.to_owned(),
            published,
            _turn: turn,
        })
    }

    /// After the transaction of `seq` committed: remembers the user's new head and announces
    /// the events. An announcement that fails is logged, not returned: the events are stored,
    /// and streams find them at the user's next event (see the module).
    pub async fn committed(&self, seq: Sequenced) {
        let Sequenced {
            user_id,
            published,
            _turn,
            ..
        } = seq;
        if let Some(last) = published.last() {
            self.heads
                .insert(user_id, (last.id, std::time::Instant::now()));
        }
        // The next writer need not wait for the announcement: streams put events in order.
        drop(_turn);
        self.topic.announce(&published).await;
    }

    /// After the transaction of `seq` failed on the counter's condition: another process
    /// wrote the user's events since. The next write reads the counter again (after a short
    /// random pause if this is not the first collision of the write).
    pub async fn moved(&self, seq: Sequenced, collisions_before: usize) {
        self.heads.take(&seq.user_id);
        drop(seq);
        if collisions_before > 0 {
            let pause = rand::random::<u64>() % CONFLICT_PAUSE_MS;
            tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        }
    }
}

#[async_trait]
impl EventBus for AwsEventBus {
    async fn publish(&self, user_id: &str, event: &Event) -> Result<()> {
        for attempt in 0..MAX_TRIES {
            let seq = self.sequenced(user_id, std::slice::from_ref(event)).await?;
            let written = self
                .stored
                .client
                .transact_write_items()
                .set_transact_items(Some(seq.items.clone()))
                .send()
                .await;
            match written {
                Ok(_) => {
                    self.committed(seq).await;
                    return Ok(());
                }
                Err(e) => {
                    let cancelled = Cancelled::of(e, "publish event")?;
                    if !cancelled.failed(Some(0)) && !cancelled.conflicted() {
                        return Err(Error::storage_msg(format!(
                            "publish event cancelled: {:?}",
                            cancelled.0
                        )));
                    }
                    self.moved(seq, attempt).await;
                }
            }
        }
        Err(Error::storage_msg("the user's event counter kept moving"))
    }

    async fn subscribe(
        &self,
        user_id: &str,
        after: Option<u64>,
    ) -> Result<BoxStream<'static, Arc<Published>>> {
        self.fanout
            .subscribe(self.stored.clone(), user_id, after)
            .await
    }

    async fn watch_request(
        &self,
        _user_id: &str,
        request_id: &RequestId,
    ) -> Result<BoxStream<'static, Arc<Published>>> {
        Ok(self.fanout.watch(request_id))
    }

    fn note_accepted(&self, user_id: &str, record: &RequestRecord) {
        self.fanout.note_accepted(user_id, record);
    }

    fn known_request(&self, user_id: &str, request_id: &RequestId) -> Option<RequestRecord> {
        self.fanout.known(user_id, request_id)
    }

    async fn listen(&self, shutdown: CancellationToken) -> Result<tokio::task::JoinHandle<()>> {
        let inbox =
            inbox::Inbox::open_subscribed(self.sqs.clone(), &self.inbox, &self.topic).await?;
        tracing::info!(inbox = %inbox.arn(), "listening for events");
        let (topic, fanout) = (self.topic.clone(), self.fanout.clone());
        Ok(tokio::spawn(inbox::run(inbox, fanout, topic, shutdown)))
    }
}

/// The partition of a user's events.
fn events_pk(user_id: &str) -> String {
    format!("EVS#{user_id}")
}

fn sk(id: u64) -> String {
    format!("{id:020}")
}

fn event_item(user_id: &str, id: u64, name: &str, data: &str) -> Item {
    let mut item = key(events_pk(user_id), sk(id));
    item.insert("name".into(), s(name));
    item.insert("data".into(), s(data));
    item.insert("expires_at".into(), n(now_secs() + RETENTION_MS / 1000));
    item
}

/// The events table, as streams read their backlog from it.
struct Stored {
    client: Client,
    table: String,
}

impl Stored {
    /// The counter's move from `old` to `new`, only if no one moved it since `old` was read.
    fn counter_put(&self, user_id: &str, old: u64, new: u64) -> Result<TransactWriteItem> {
        let mut item = key(events_pk(user_id), COUNTER_SK);
        item.insert("seq".into(), n(new));
        let put = Put::builder().table_name(&self.table).set_item(Some(item));
        let put = if old == 0 {
            put.condition_expression("attribute_not_exists(pk)")
        } else {
            put.condition_expression("seq = :old")
                .expression_attribute_values(":old", n(old))
        };
        let put = put
            .build()
            .map_err(|e| storage("build a transaction item", e))?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// The user's newest id, as the counter says.
    async fn current(&self, user_id: &str) -> Result<u64> {
        Ok(self
            .item(user_id, COUNTER_SK)
            .await?
            .and_then(|i| get_n(&i, "seq"))
            .unwrap_or(0) as u64)
    }

    async fn item(&self, user_id: &str, sk: &str) -> Result<Option<Item>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(events_pk(user_id), sk)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| storage("read an event", e))?;
        Ok(out.item)
    }

    /// Whether event `id` is stored and not expired.
    async fn kept(&self, user_id: &str, id: u64) -> Result<bool> {
        let item = self.item(user_id, &sk(id)).await?;
        Ok(item.and_then(|i| get_n(&i, "expires_at")) > Some(now_secs()))
    }

    /// Where a read after `after` starts: `after`, or just before the oldest event still kept
    /// when those after `after` expired, or the head when `after` is past it (an id from a
    /// table that was replaced). Kept events are the newest ids, so a binary search finds
    /// the oldest in a few single-item reads.
    async fn start_after(&self, user_id: &str, after: u64) -> Result<u64> {
        if self.kept(user_id, after + 1).await? {
            return Ok(after);
        }
        let head = self.current(user_id).await?;
        if head <= after + 1 {
            return Ok(after.min(head));
        }
        let (mut lo, mut hi) = (after + 2, head + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.kept(user_id, mid).await? {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(lo - 1)
    }
}

#[async_trait]
impl Backlog for Stored {
    async fn read(&self, user_id: &str, after: u64, limit: usize) -> Result<Read> {
        let after = self.start_after(user_id, after).await?;
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk AND sk > :after")
            .filter_expression("expires_at > :now")
            .expression_attribute_values(":pk", s(events_pk(user_id)))
            .expression_attribute_values(":after", s(sk(after)))
            .expression_attribute_values(":now", n(now_secs()))
            .consistent_read(true)
            .limit(i32::try_from(limit).unwrap_or(i32::MAX))
            .send()
            .await
            .map_err(|e| storage("read events", e))?;
        let id_of = |item: &Item| get_s(item, "sk").and_then(|k| k.parse::<u64>().ok());
        let mut last = after;
        let mut events = Vec::new();
        for item in out.items.unwrap_or_default() {
            let Some(id) = id_of(&item) else { continue };
            last = last.max(id);
            let text = |k: &str| get_s(&item, k).unwrap_or_default().to_owned();
            if let Some(e) =
                Published::from_stored(id, user_id.to_owned(), &text("name"), text("data"))
            {
                events.push(e);
            }
        }
        let evaluated = out.last_evaluated_key.as_ref().and_then(id_of);
        Ok(Read {
            events,
            last: last.max(evaluated.unwrap_or(0)),
            more: out.last_evaluated_key.is_some(),
        })
    }

    async fn head(&self, user_id: &str) -> Result<u64> {
        self.current(user_id).await
    }

    fn dense(&self) -> bool {
        true
    }
}
