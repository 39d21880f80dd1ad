//! An API instance's inbox: an SQS queue of its own, subscribed to the events topic, that it
//! long-polls and relays to its streams. It holds only live news (a minute at most; replay
//! comes from the table), so it is made at start and deleted at stop, and the inboxes of
//! instances that died are found by their stale `alive` tag and removed by the others.

use std::sync::Arc;
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
/// How long a received announcement may wait for its delete: deletes go in batches, at most
/// this far apart (the queue expires what is never deleted anyway).
const DELETE_EVERY: Duration = Duration::from_secs(1);
/// SQS's limit on the messages of one receive, and of one delete batch.
const MAX_BATCH: usize = 10;

fn sqs(op: &'static str, e: impl Into<crate::error::BoxError>) -> Error {
    Error::queue(op, e)
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
    options: InboxOptions,
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
    /// Makes this instance's queue, open to the topic's deliveries only.
    pub(super) async fn open_inbox(
        client: Client,
        options: &InboxOptions,
        topic_arn: &str,
    ) -> Result<Inbox> {
        let name = format!("{}{}", options.prefix, uuid::Uuid::new_v4().simple());
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
            .attributes(QueueAttributeName::MessageRetentionPeriod, "60")
            .attributes(QueueAttributeName::VisibilityTimeout, "120")
            .attributes(QueueAttributeName::SqsManagedSseEnabled, "true")
            .attributes(QueueAttributeName::Policy, policy.to_string())
            .tags(ALIVE_TAG, now_secs().to_string())
            .send()
            .await
            .map_err(|e| sqs("create this instance's inbox", e))?;
        let url = out
            .queue_url
            .ok_or_else(|| Error::internal_msg("CreateQueue answered no URL"))?;
        Ok(Inbox {
            client,
            name,
            url,
            arn,
            options: options.clone(),
        })
    }

    pub(super) fn arn(&self) -> &str {
        &self.arn
    }

    /// Relays what arrives to `fanout` until `shutdown`; meanwhile tags the inbox alive and
    /// removes stale ones.
    pub(super) async fn relay(&self, fanout: &Fanout, topic: &Topic, shutdown: CancellationToken) {
        let mut receipts: Vec<String> = Vec::new();
        let mut deletes = tokio::time::interval(DELETE_EVERY);
        let mut heartbeat = tokio::time::interval(self.options.heartbeat());
        // Not cancelled by the other branches: a receive dropped mid-flight would hide what it
        // took until its visibility ran out.
        let mut receive = Box::pin(self.take_news());
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                news = &mut receive => {
                    match news {
                        Ok((events, handles)) => {
                            for e in events {
                                fanout.deliver(Arc::new(e));
                            }
                            receipts.extend(handles);
                        }
                        Err(e) => {
                            tracing::warn!(error = %Report(&e), "could not receive events");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                    receive = Box::pin(self.take_news());
                }
                _ = deletes.tick() => self.forget_news(std::mem::take(&mut receipts)).await,
                _ = heartbeat.tick() => {
                    fanout.housekeep();
                    if let Err(e) = self.tag_alive().await {
                        tracing::warn!(error = %Report(&e), "could not tag this instance's inbox alive");
                    }
                    let (client, topic, options, own) =
                        (self.client.clone(), topic.clone(), self.options.clone(), self.name.clone());
                    tokio::spawn(async move {
                        if let Err(e) = remove_stale_inboxes(&client, &topic, &options, &own).await {
                            tracing::warn!(error = %Report(&e), "could not look for stale inboxes");
                        }
                    });
                }
            }
        }
    }

    /// One long-polled receive: the events announced, and the receipts to delete them by.
    async fn take_news(&self) -> Result<(Vec<Published>, Vec<String>)> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(MAX_BATCH as i32)
            .wait_time_seconds(self.options.wait.as_secs().min(20) as i32)
            .send()
            .await
            .map_err(|e| sqs("receive events", e))?;
        let mut events = Vec::new();
        let mut receipts = Vec::new();
        for m in out.messages.unwrap_or_default() {
            receipts.extend(m.receipt_handle);
            let Some(body) = m.body else { continue };
            match serde_json::from_str::<Announcement>(&body) {
                Ok(a) => events.extend(Published::from_stored(a.id, a.user_id, &a.name, a.data)),
                Err(e) => tracing::warn!(error = %e, "an announcement does not parse"),
            }
        }
        Ok((events, receipts))
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
                tracing::debug!(error = %Report(&sqs("delete received events", e)), "delete failed");
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
            .map_err(|e| sqs("tag the inbox alive", e))?;
        Ok(())
    }

    pub(super) async fn close_inbox(&self) -> Result<()> {
        remove_queue(&self.client, &self.url).await
    }
}

async fn remove_queue(client: &Client, url: &str) -> Result<()> {
    client
        .delete_queue()
        .queue_url(url)
        .send()
        .await
        .map_err(|e| sqs("delete an inbox", e))?;
    Ok(())
}

/// Unsubscribes, and deletes, the inboxes of other instances that stopped tagging them alive
/// (they died without cleaning up), and the subscriptions of inboxes already deleted.
async fn remove_stale_inboxes(
    client: &Client,
    topic: &Topic,
    options: &InboxOptions,
    own: &str,
) -> Result<usize> {
    let mut removed = 0;
    for (subscription, queue) in topic.inbox_subscriptions().await? {
        let name = queue.rsplit(':').next().unwrap_or_default();
        if !name.starts_with(&options.prefix) || name == own {
            continue;
        }
        let url = match client.get_queue_url().queue_name(name).send().await {
            Ok(out) => out.queue_url,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_queue_does_not_exist()) =>
            {
                None
            }
            Err(e) => return Err(sqs("find an inbox", e)),
        };
        if let Some(url) = &url {
            let tags = client
                .list_queue_tags()
                .queue_url(url)
                .send()
                .await
                .map_err(|e| sqs("read an inbox's tags", e))?;
            let alive = tags
                .tags
                .as_ref()
                .and_then(|t| t.get(ALIVE_TAG))
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0);
            if now_secs() - alive <= options.stale_after.as_secs() as i64 {
                continue;
            }
        }
        tracing::info!(inbox = %name, "removing the inbox of an instance that stopped");
        topic.unsubscribe_inbox(&subscription).await?;
        if let Some(url) = url {
            remove_queue(client, &url).await?;
        }
        removed += 1;
    }
    Ok(removed)
}
