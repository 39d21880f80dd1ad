//! An API instance's inbox: an SQS queue of its own, subscribed to the events topic, that it
//! long-polls and relays to its streams. It holds only live news (a minute at most; replay
//! comes from the table), so it is made at start and deleted at stop, and the inboxes of
//! instances that died are found by their stale `alive` tag and removed by the others.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, QueueAttributeName};
use aws_sdk_sqs::Client;
use tokio_util::sync::CancellationToken;

use super::super::fanout::Fanout;
use super::super::Published;
use super::topic::{Announcement, Topic};
use crate::error::Report;
use crate::time::now_secs;
use crate::{Error, Result};

/// The tag an inbox's owner refreshes while it runs: seconds since the epoch.
const ALIVE_TAG: &str = "characterbot-alive";
/// How long an inbox keeps a message (SQS's least): what is received and not deleted is gone
/// after this.
const RETENTION: Duration = Duration::from_secs(60);
/// Announcements received in one retention window past which an inbox deletes what it
/// receives: in flight stay at most about twice this, against SQS's 120,000.
const BUSY: usize = 10_000;
/// SQS's limit on the messages of one receive, and of one delete batch.
const MAX_BATCH: usize = 10;

/// What becomes of the receipts of received announcements. They need no delete: they stay
/// hidden past the queue's retention and expire there (see `open_inbox`). Only a busy inbox
/// deletes them, ten to a call, to stay far under SQS's limit of 120,000 messages in flight.
struct Receipts {
    since: tokio::time::Instant,
    received: usize,
    kept: Vec<String>,
}

impl Default for Receipts {
    fn default() -> Self {
        Receipts {
            since: tokio::time::Instant::now(),
            received: 0,
            kept: Vec::new(),
        }
    }
}

impl Receipts {
    /// Takes a receive's receipts; returns whole batches to delete, when the inbox is busy.
    fn take(&mut self, handles: Vec<String>) -> Vec<String> {
        if self.since.elapsed() > RETENTION {
            (self.since, self.received) = (tokio::time::Instant::now(), 0);
        }
        self.received += handles.len();
        if self.received > BUSY {
            self.kept.extend(handles);
        }
        let full = self.kept.len() - self.kept.len() % MAX_BATCH;
        self.kept.drain(..full).collect()
    }
}

/// How API instances name, keep and clean up their inboxes.
#[derive(Debug, Clone)]
pub struct InboxOptions {
    /// Every inbox's name starts with this (and only inboxes' names do: others are removed
    /// when found stale).
    pub prefix: String,
    /// An inbox whose owner has not tagged it alive for this long is removed by the others.
    pub stale_after: Duration,
    /// How long one receive waits for news (SQS long polling, at most 20 s).
    pub wait: Duration,
}

impl InboxOptions {
    /// How often an owner tags its inbox alive, and looks for stale ones.
    fn heartbeat(&self) -> Duration {
        (self.stale_after / 4).max(Duration::from_secs(1))
    }
}

pub(super) struct Inbox {
    client: Client,
    name: String,
    url: String,
    arn: String,
    /// The topic's subscription of this queue.
    subscription: String,
    options: InboxOptions,
}

/// Why [`Inbox::relay`] returned.
#[derive(Debug, PartialEq)]
enum Ended {
    Shutdown,
    /// The queue or its subscription is gone (removed by another instance that took this one
    /// for dead, or by hand): a new inbox is needed.
    Lost,
}

/// What the stale-inbox sweeps remember between runs: an inbox is removed only when two sweeps
/// in a row find it stale, so one late heartbeat or a queue too new to be listed yet does not
/// cost a live instance its inbox.
#[derive(Default)]
struct Sweeps {
    suspects: Mutex<HashSet<String>>,
    /// This instance's own subscription was missing from the last sweep's listing.
    own_missing: AtomicBool,
    /// ... and from two in a row.
    lost: AtomicBool,
}

/// Runs this instance's inbox until `shutdown`, making a new one whenever it is lost, and
/// removes the last one at the end.
pub(super) async fn run(
    mut inbox: Inbox,
    fanout: Arc<Fanout>,
    topic: Topic,
    shutdown: CancellationToken,
) {
    loop {
        let ended = inbox.relay(&fanout, &topic, shutdown.clone()).await;
        inbox.close_inbox(&topic).await;
        if ended == Ended::Shutdown {
            return;
        }
        tracing::warn!(inbox = %inbox.name, "this instance's inbox is gone; making a new one");
        loop {
            match Inbox::open_subscribed(inbox.client.clone(), &inbox.options, &topic).await {
                Ok(new) => {
                    inbox = new;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %Report(&e), "could not make a new inbox");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                }
            }
        }
    }
}

/// The queue ARN of `name` beside the topic `topic_arn` (same partition, region and account).
fn queue_arn(topic_arn: &str, name: &str) -> Result<String> {
    match topic_arn.split(':').collect::<Vec<_>>().as_slice() {
        ["arn", partition, "sns", region, account, _] => {
            Ok(format!("arn:{partition}:sqs:{region}:{account}:{name}"))
        }
        _ => Err(Error::config_msg(format!(
            "not an SNS topic ARN: {topic_arn}"
        ))),
    }
}

impl Inbox {
    /// Makes this instance's queue, open to the topic's deliveries only, and subscribes it.
    pub(super) async fn open_subscribed(
        client: Client,
        options: &InboxOptions,
        topic: &Topic,
    ) -> Result<Inbox> {
        let mut inbox = Inbox::open_inbox(client, options, topic.arn()).await?;
        match topic.subscribe_inbox(&inbox.arn).await {
            Ok(subscription) => {
                inbox.subscription = subscription;
                Ok(inbox)
            }
            Err(e) => {
                let _ = remove_queue(&inbox.client, &inbox.url).await;
                Err(e)
            }
        }
    }

    async fn open_inbox(client: Client, options: &InboxOptions, topic_arn: &str) -> Result<Inbox> {
        // 64 random bits: unique among instances, and short enough for SQS's 80 characters.
        let id = &uuid::Uuid::new_v4().simple().to_string()[..16];
        let name = format!("{}{id}", options.prefix);
        if name.len() > 80 {
            return Err(Error::config_msg(format!(
                "inbox prefix too long: `{name}` is over SQS's 80 characters"
            )));
        }
        // The queue is made beside the topic (same region and account): the topic's
        // deliveries go to this ARN.
        let arn = queue_arn(topic_arn, &name)?;
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Principal": { "Service": "sns.amazonaws.com" },
                "Action": "sqs:SendMessage",
                "Resource": arn,
                "Condition": { "ArnEquals": { "aws:SourceArn": topic_arn } },
            }],
        });
        let out = client
            .create_queue()
            .queue_name(&name)
            // Live news only: a minute is the least SQS keeps a message. Received messages
            // stay hidden past that, so one whose delete failed expires instead of coming
            // back.
            .attributes(
                QueueAttributeName::MessageRetentionPeriod,
                RETENTION.as_secs().to_string(),
            )
            .attributes(QueueAttributeName::VisibilityTimeout, "120")
            .attributes(QueueAttributeName::SqsManagedSseEnabled, "true")
            .attributes(QueueAttributeName::Policy, policy.to_string())
            .tags(ALIVE_TAG, now_secs().to_string())
            .send()
            .await
            .map_err(|e| Error::queue("create this instance's inbox", e))?;
        let url = out
            .queue_url
            .ok_or_else(|| Error::internal_msg("CreateQueue answered no URL"))?;
        Ok(Inbox {
            client,
            name,
            url,
            arn,
            subscription: String::new(),
            options: options.clone(),
        })
    }

    pub(super) fn arn(&self) -> &str {
        &self.arn
    }

    /// Relays what arrives to `fanout` until `shutdown` or the inbox is lost; meanwhile tags
    /// the inbox alive and removes stale ones.
    async fn relay(&self, fanout: &Fanout, topic: &Topic, shutdown: CancellationToken) -> Ended {
        let mut receipts = Receipts::default();
        let mut heartbeat = tokio::time::interval(self.options.heartbeat());
        let sweeps = Arc::new(Sweeps::default());
        // Not cancelled by the other branches: a receive dropped mid-flight would hide what it
        // took until its visibility ran out.
        let mut receive = Box::pin(self.take_news());
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ended::Shutdown,
                news = &mut receive => {
                    match news {
                        Ok(Some((events, handles))) => {
                            for e in events {
                                fanout.deliver(Arc::new(e));
                            }
                            let batch = receipts.take(handles);
                            if !batch.is_empty() {
                                self.forget_news(batch).await;
                            }
                        }
                        Ok(None) => return Ended::Lost,
                        Err(e) => {
                            tracing::warn!(error = %Report(&e), "could not receive events");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                    receive = Box::pin(self.take_news());
                }
                _ = heartbeat.tick() => {
                    if sweeps.lost.load(Ordering::Relaxed) {
                        return Ended::Lost;
                    }
                    fanout.housekeep();
                    if let Err(e) = self.tag_alive().await {
                        tracing::warn!(error = %Report(&e), "could not tag this instance's inbox alive");
                    }
                    let (client, topic, options, own, sweeps) = (
                        self.client.clone(),
                        topic.clone(),
                        self.options.clone(),
                        self.subscription.clone(),
                        sweeps.clone(),
                    );
                    tokio::spawn(async move {
                        let swept = remove_stale_inboxes(&client, &topic, &options, &own, &sweeps);
                        if let Err(e) = swept.await {
                            tracing::warn!(error = %Report(&e), "could not look for stale inboxes");
                        }
                    });
                }
            }
        }
    }

    /// One long-polled receive (at least a second, so a zero wait cannot spin): the events
    /// announced, and the receipts to delete them by.
    /// `None` when the queue no longer exists.
    async fn take_news(&self) -> Result<Option<(Vec<Published>, Vec<String>)>> {
        let received = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(MAX_BATCH as i32)
            .wait_time_seconds(self.options.wait.as_secs().clamp(1, 20) as i32)
            .send()
            .await;
        let out = match received {
            Ok(out) => out,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_queue_does_not_exist()) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(Error::queue("receive events", e)),
        };
        let mut events = Vec::new();
        let mut receipts = Vec::new();
        for m in out.messages.unwrap_or_default() {
            receipts.extend(m.receipt_handle);
            let Some(body) = m.body else { continue };
            match serde_json::from_str::<Announcement>(&body) {
                Ok(a) => events.extend(a.into_published()),
                Err(e) => tracing::warn!(error = %e, "an announcement does not parse"),
            }
        }
        Ok(Some((events, receipts)))
    }

    /// Deletes received messages, ten to a call.
    async fn forget_news(&self, receipts: Vec<String>) {
        for chunk in receipts.chunks(MAX_BATCH) {
            let entries = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .build()
                        .ok()
                })
                .collect();
            let deleted = self
                .client
                .delete_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await;
            if let Err(e) = deleted {
                // They expire within the minute anyway.
                tracing::debug!(error = %Report(&Error::queue("delete received events", e)), "delete failed");
            }
        }
    }

    async fn tag_alive(&self) -> Result<()> {
        self.client
            .tag_queue()
            .queue_url(&self.url)
            .tags(ALIVE_TAG, now_secs().to_string())
            .send()
            .await
            .map_err(|e| Error::queue("tag the inbox alive", e))?;
        Ok(())
    }

    /// Unsubscribes and deletes the inbox; failures are logged (a stale inbox is removed by
    /// the other instances).
    async fn close_inbox(&self, topic: &Topic) {
        if let Err(e) = topic.unsubscribe_inbox(&self.subscription).await {
            tracing::warn!(error = %Report(&e), "could not unsubscribe this instance's inbox");
        }
        if let Err(e) = remove_queue(&self.client, &self.url).await {
            tracing::warn!(error = %Report(&e), "could not delete this instance's inbox");
        }
    }
}

async fn remove_queue(client: &Client, url: &str) -> Result<()> {
    client
        .delete_queue()
        .queue_url(url)
        .send()
        .await
        .map_err(|e| Error::queue("delete an inbox", e))?;
    Ok(())
}

/// Unsubscribes, and deletes, the inboxes of other instances that stopped tagging them alive
/// (they died without cleaning up), and the subscriptions of inboxes already deleted, when two
/// sweeps in a row find them so. Notes in `sweeps` whether this instance's own subscription
/// (`own`) is still listed.
async fn remove_stale_inboxes(
    client: &Client,
    topic: &Topic,
    options: &InboxOptions,
    own: &str,
    sweeps: &Sweeps,
) -> Result<()> {
    let subscriptions = topic.inbox_subscriptions().await?;
    let listed = subscriptions
        .iter()
        .any(|(subscription, _)| subscription == own);
    let missing_twice = !listed && sweeps.own_missing.swap(true, Ordering::Relaxed);
    if listed {
        sweeps.own_missing.store(false, Ordering::Relaxed);
    }
    if missing_twice {
        sweeps.lost.store(true, Ordering::Relaxed);
    }
    let mut stale = HashSet::new();
    for (subscription, queue) in subscriptions {
        let name = queue.rsplit(':').next().unwrap_or_default();
        if !name.starts_with(&options.prefix) || subscription == own {
            continue;
        }
        match inbox_state(client, name, options).await {
            Ok(InboxState::Alive) => continue,
            Ok(state) => {
                stale.insert(subscription.clone());
                let suspected = sweeps.suspects.lock().map(|s| s.contains(&subscription));
                if suspected.unwrap_or(false) {
                    tracing::info!(inbox = %name, "removing the inbox of an instance that stopped");
                    if let Err(e) = remove_inbox(client, topic, &subscription, state).await {
                        tracing::warn!(error = %Report(&e), inbox = %name, "could not remove a stale inbox");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %Report(&e), inbox = %name, "could not check an inbox")
            }
        }
    }
    if let Ok(mut suspects) = sweeps.suspects.lock() {
        *suspects = stale;
    }
    Ok(())
}

/// What a sweep finds of another instance's inbox.
enum InboxState {
    Alive,
    /// Its queue is gone; the subscription is left.
    Gone,
    /// Not tagged alive for too long: its URL.
    Stale(String),
}

async fn inbox_state(client: &Client, name: &str, options: &InboxOptions) -> Result<InboxState> {
    let url = match client.get_queue_url().queue_name(name).send().await {
        Ok(out) => out.queue_url.unwrap_or_default(),
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_queue_does_not_exist()) =>
        {
            return Ok(InboxState::Gone)
        }
        Err(e) => return Err(Error::queue("find an inbox", e)),
    };
    let tags = client
        .list_queue_tags()
        .queue_url(&url)
        .send()
        .await
        .map_err(|e| Error::queue("read an inbox's tags", e))?;
    let alive = tags
        .tags
        .as_ref()
        .and_then(|t| t.get(ALIVE_TAG))
        .and_then(|v| v.parse::<i64>().ok());
    // No tag: not an inbox made by this code (they are tagged when made); left alone.
    let Some(alive) = alive else {
        return Ok(InboxState::Alive);
    };
    if now_secs() - alive <= options.stale_after.as_secs() as i64 {
        return Ok(InboxState::Alive);
    }
    Ok(InboxState::Stale(url))
}

async fn remove_inbox(
    client: &Client,
    topic: &Topic,
    subscription: &str,
    state: InboxState,
) -> Result<()> {
    topic.unsubscribe_inbox(subscription).await?;
    if let InboxState::Stale(url) = state {
        remove_queue(client, &url).await?;
    }
    Ok(())
}

#[cfg(test)]
mod receipt_tests {
    use super::*;

    fn handles(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("r{i}")).collect()
    }

    #[test]
    fn a_quiet_inbox_deletes_nothing_and_a_busy_one_whole_batches() {
        let mut receipts = Receipts::default();
        assert!(receipts.take(handles(3)).is_empty());
        assert!(
            receipts.take(handles(BUSY - 3)).is_empty(),
            "not past the mark yet"
        );
        assert!(
            receipts.take(handles(4)).is_empty(),
            "busy now: kept for a batch"
        );
        let batch = receipts.take(handles(17));
        assert_eq!(batch.len(), 20, "whole batches only");
        assert_eq!(receipts.kept.len(), 1);
    }
}
