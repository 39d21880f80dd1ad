//! The queue on Amazon SQS: one queue per kind, each with its dead-letter queue. A queue whose
//! name ends `.fifo` (chat jobs) is a FIFO queue: a message's group is its `MessageGroupId`,
//! and a receive takes one message (SQS may return several of one group in one receive), so a
//! group goes one message at a time: its next is received once the one before is deleted or
//! visible again.
//!
//! SQS gives the semantics the port describes natively (visibility timeout, receive count,
//! receipts); this adapter maps names and limits: batches of at most 10, long polls of at most
//! 20 s, visibility in whole seconds. The consume loop dead-letters explicitly (so the request is
//! failed with a reason); the queue's redrive policy, set well above `max_receives`
//! ([`super::redrive_after`]), is the backstop for a consumer that cannot.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use backon::{BackoffBuilder, ExponentialBuilder};

use super::{Attributes, DeadLetter, Delivery, Outgoing, Queue, QueueStats};
use crate::{Error, Result};

mod setup;

/// SQS caps.
const MAX_BATCH: usize = 10;
const MAX_WAIT: Duration = Duration::from_secs(20);
/// Attributes the adapter adds to a dead-lettered copy (SQS allows 10 per message; a job has
/// at most 5: its request and trace ids, its outbox item, the sweep's re-send mark).
const DLQ_REASON: &str = "dlq_reason";
const DLQ_RECEIVE_COUNT: &str = "dlq_receive_count";

pub struct SqsQueue {
    client: aws_sdk_sqs::Client,
    name: String,
    url: String,
    dlq_url: String,
    /// A FIFO queue (its name ends `.fifo`): messages carry their group, and are deduplicated
    /// by their body for five minutes, so the outbox sweep's re-send of a job still waiting in
    /// the queue is dropped by SQS itself.
    fifo: bool,
}

/// Whether a queue name or URL is a FIFO queue's.
fn is_fifo(name: &str) -> bool {
    name.ends_with(".fifo")
}

/// The name of a queue's dead-letter queue: `<name>-dlq`, before the `.fifo` of a FIFO queue.
pub fn dead_letter_name(name: &str) -> String {
    match name.strip_suffix(".fifo") {
        Some(base) => format!("{base}-dlq.fifo"),
        None => format!("{name}-dlq"),
    }
}

fn queue_error(op: &str, e: impl Into<crate::error::BoxError>) -> Error {
    Error::queue(format!("sqs {op}"), e)
}

/// Whole seconds, rounded up: SQS takes no fractions, and rounding down could end a
/// visibility early.
fn secs(d: Duration) -> i32 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.min(43_200) as i32
}

impl SqsQueue {
    /// Sends up to ten messages with `SendMessageBatch`, which answers `200` even when some
    /// entries failed. Entries that failed on SQS's side (`SenderFault: false`: throttling, an
    /// internal error) are sent again, with jittered exponential back-off, a few times; an
    /// entry refused as the sender's fault (too large, bad attributes) fails at once.
    async fn send_chunk(&self, chunk: &[Outgoing]) -> Result<()> {
        let mut pending: Vec<usize> = (0..chunk.len()).collect();
        let mut pauses = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(1))
            .with_max_times(4)
            .with_jitter()
            .build();
        loop {
            let again = self.send_entries(chunk, &pending).await?;
            if again.is_empty() {
                return Ok(());
            }
            let Some(pause) = pauses.next() else {
                return Err(Error::queue_msg(format!(
                    "sqs send: {} of {} entries still failing after retries",
                    again.len(),
                    chunk.len()
                )));
            };
            tracing::warn!(failed = again.len(), retry_in = ?pause, "sqs send: entries failed; sending them again");
            tokio::time::sleep(pause).await;
            pending = again;
        }
    }

    /// One `SendMessageBatch` of the entries `pending` of `chunk`: the entries to send again
    /// (failed on SQS's side), or an error for one refused as the sender's fault.
    async fn send_entries(&self, chunk: &[Outgoing], pending: &[usize]) -> Result<Vec<usize>> {
        let entries = pending
            .iter()
            .map(|&i| {
                let m = &chunk[i];
                // A message without a group is a group of its own: nothing holds it back.
                let group = self.fifo.then(|| {
                    m.group
                        .clone()
                        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
                });
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(&m.body)
                    .set_message_attributes(Some(to_sqs(&m.attributes)?))
                    .set_message_group_id(group)
                    .build()
                    .map_err(|e| Error::queue("sqs message entry", e))
            })
            .collect::<Result<Vec<_>>>()?;
        let out = self
            .client
            .send_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| queue_error("send", e))?;
        let mut again = Vec::new();
        for failed in &out.failed {
            let reason = failed.message.as_deref().unwrap_or("no reason");
            if failed.sender_fault {
                return Err(Error::queue_msg(format!(
                    "sqs send: entry refused ({}): {reason}",
                    failed.code
                )));
            }
            let i = failed
                .id
                .parse::<usize>()
                .ok()
                .filter(|i| *i < chunk.len())
                .ok_or_else(|| {
                    Error::queue_msg(format!("sqs send: unknown entry {}", failed.id))
                })?;
            again.push(i);
        }
        Ok(again)
    }

    async fn count(&self, url: &str) -> Result<(u64, u64)> {
        let attrs = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(|e| queue_error("read attributes", e))?
            .attributes
            .unwrap_or_default();
        let get = |k: &QueueAttributeName| {
            attrs
                .get(k)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok((
            get(&QueueAttributeName::ApproximateNumberOfMessages),
            get(&QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        ))
    }
}

fn string_attribute(value: &str) -> Result<MessageAttributeValue> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .map_err(|e| Error::queue("sqs message attribute", e))
}

fn to_sqs(attributes: &Attributes) -> Result<HashMap<String, MessageAttributeValue>> {
    attributes
        .iter()
        .map(|(k, v)| Ok((k.clone(), string_attribute(v)?)))
        .collect()
}

/// The string attributes of a received message, less the ones named in `except`.
fn from_sqs(
    attributes: Option<&HashMap<String, MessageAttributeValue>>,
    except: &[&str],
) -> Attributes {
    attributes
        .into_iter()
        .flatten()
        .filter(|(k, _)| !except.contains(&k.as_str()))
        .filter_map(|(k, v)| Some((k.clone(), v.string_value.clone()?)))
        .collect()
}

#[async_trait]
impl Queue for SqsQueue {
    fn name(&self) -> &str {
        &self.name
    }

    /// Every chunk of ten is tried, so one refused chunk does not leave the later ones unsent;
    /// the first error is reported once all were tried. (What an accept could not send stays in
    /// its outbox and is sent by a sweep: see `crate::atomic::aws`.)
    async fn send(&self, messages: &[Outgoing]) -> Result<()> {
        let mut first_error = None;
        for chunk in messages.chunks(MAX_BATCH) {
            if let Err(e) = self.send_chunk(chunk).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn receive(
        &self,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Delivery>> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            // A FIFO receive takes one message: SQS may return several of one group at once
            // (and handing the later ones back would count receives against them, towards
            // the redrive), while the port hands a group out one message at a time.
            .max_number_of_messages(if self.fifo {
                1
            } else {
                max.clamp(1, MAX_BATCH) as i32
            })
            .visibility_timeout(secs(visibility))
            .wait_time_seconds(wait.min(MAX_WAIT).as_secs() as i32)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| queue_error("receive", e))?;
        Ok(out
            .messages
            .unwrap_or_default()
            .into_iter()
            .map(|m| Delivery {
                group: m
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId))
                    .cloned(),
                receive_count: m
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1),
                attributes: from_sqs(m.message_attributes.as_ref(), &[]),
                message_id: m.message_id.unwrap_or_default(),
                receipt: m.receipt_handle.unwrap_or_default(),
                body: m.body.unwrap_or_default(),
            })
            .collect())
    }

    async fn delete(&self, receipt: &str) -> Result<()> {
        self.client
            .delete_message()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(|e| queue_error("delete", e))?;
        Ok(())
    }

    async fn change_visibility(&self, receipt: &str, timeout: Duration) -> Result<()> {
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .visibility_timeout(secs(timeout))
            .send()
            .await
            .map_err(|e| queue_error("change visibility", e))?;
        Ok(())
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<()> {
        // Copy, then delete: a crash between the two leaves the message in both queues, and the
        // next delivery of the original finds its request already failed and drops it.
        self.client
            .send_message()
            .queue_url(&self.dlq_url)
            .message_body(&delivery.body)
            .set_message_attributes(Some(to_sqs(&delivery.attributes)?))
            .message_attributes(DLQ_REASON, string_attribute(reason)?)
            .message_attributes(
                DLQ_RECEIVE_COUNT,
                string_attribute(&delivery.receive_count.to_string())?,
            )
            // A FIFO dead-letter queue: each dead letter a group of its own.
            .set_message_group_id(self.fifo.then(|| delivery.message_id.clone()))
            .set_message_deduplication_id(self.fifo.then(|| delivery.message_id.clone()))
            .send()
            .await
            .map_err(|e| queue_error("dead-letter", e))?;
        self.delete(&delivery.receipt).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        // A peek: received with no visibility timeout, so the messages stay where they are.
        let out = self
            .client
            .receive_message()
            .queue_url(&self.dlq_url)
            .max_number_of_messages(limit.clamp(1, MAX_BATCH) as i32)
            .visibility_timeout(0)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| queue_error("read dead letters", e))?;
        Ok(out
            .messages
            .unwrap_or_default()
            .into_iter()
            .map(|m| {
                let attr = |k: &str| {
                    m.message_attributes
                        .as_ref()
                        .and_then(|a| a.get(k))
                        .and_then(|v| v.string_value.clone())
                };
                DeadLetter {
                    reason: attr(DLQ_REASON).unwrap_or_else(|| "redriven by the queue".into()),
                    receive_count: attr(DLQ_RECEIVE_COUNT)
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0),
                    attributes: from_sqs(
                        m.message_attributes.as_ref(),
                        &[DLQ_REASON, DLQ_RECEIVE_COUNT],
                    ),
                    message_id: m.message_id.clone().unwrap_or_default(),
                    body: m.body.clone().unwrap_or_default(),
                }
            })
            .collect())
    }

    async fn stats(&self) -> Result<QueueStats> {
        let (visible, in_flight) = self.count(&self.url).await?;
        let (dead, dead_hidden) = self.count(&self.dlq_url).await?;
        Ok(QueueStats {
            visible,
            in_flight,
            dead: dead + dead_hidden,
        })
    }
}
