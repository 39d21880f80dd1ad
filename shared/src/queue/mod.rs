//! The `Queue` port: a work queue with Amazon SQS semantics, so the consume loop is written once
//! and runs unchanged on either backend.
//!
//! - `receive` hides each message it returns for a visibility timeout and counts the delivery;
//!   a consumer that dies without deleting lets the message reappear when the timeout ends.
//! - `delete` (by receipt) acknowledges. With a stale receipt — the message was meanwhile
//!   delivered again — the embedded queue deletes nothing; SQS may still delete. The consume loop
//!   relies on neither: every effect is idempotent.
//! - `dead_letter` moves a message out of the way for good; the consume loop decides when.
//! - Messages of one *group* (a conversation's chat turns) are handed out one at a time, in the
//!   order sent: the next is received only once the one before is deleted or dead-lettered (a
//!   message waiting for a retry holds its group back). Messages without a group, and other
//!   groups, are not held back. On AWS this is an SQS FIFO queue (`.fifo` names) with the group
//!   as `MessageGroupId`, received a message at a time; the embedded queue does the same in
//!   its receive.
//!
//! Delivery is at least once: consumers must make their effects idempotent.

pub mod sqlite;
pub mod sqs;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;

use crate::Result;

/// String attributes carried beside a body (SQS message attributes): tracing context, never
/// payload. SQS allows at most 10 per message.
pub type Attributes = BTreeMap<String, String>;

/// A message to send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outgoing {
    pub body: String,
    pub attributes: Attributes,
    /// The message's group: messages of one group are received one at a time, in order.
    pub group: Option<String>,
}

impl Outgoing {
    pub fn new(body: impl Into<String>) -> Outgoing {
        Outgoing {
            body: body.into(),
            attributes: Attributes::new(),
            group: None,
        }
    }

    /// Puts the message in `group` (see the module).
    pub fn in_group(mut self, group: impl Into<String>) -> Outgoing {
        self.group = Some(group.into());
        self
    }

    pub fn with(mut self, name: &str, value: impl Into<String>) -> Outgoing {
        self.attributes.insert(name.to_owned(), value.into());
        self
    }
}

impl From<&str> for Outgoing {
    fn from(body: &str) -> Outgoing {
        Outgoing::new(body)
    }
}

impl From<String> for Outgoing {
    fn from(body: String) -> Outgoing {
        Outgoing::new(body)
    }
}

/// One delivery of a message.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message_id: String,
    /// Names this delivery; acknowledgements with an older receipt are ignored.
    pub receipt: String,
    pub body: String,
    pub attributes: Attributes,
    /// How many times the message has been delivered, this delivery included.
    pub receive_count: u32,
    /// The message's group, if it has one (see the module).
    pub group: Option<String>,
}

/// Depths of a queue, for metrics and readiness.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Ready to be received.
    pub visible: u64,
    /// Received and not yet deleted or reappeared.
    pub in_flight: u64,
    /// Dead-lettered.
    pub dead: u64,
}

/// A dead-lettered message, kept for inspection and redrive.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub message_id: String,
    pub body: String,
    pub attributes: Attributes,
    pub receive_count: u32,
    pub reason: String,
}

/// Receives after which a queue's own redrive policy (SQS) dead-letters a message: the backstop
/// for messages no worker can settle. Well above `max_receives`, because the consume loop counts
/// attempts by the request and hands messages back on shutdown for free, while the queue counts
/// every receive: a job interrupted by a few deploys must still get all its attempts.
pub fn redrive_after(max_receives: u32) -> u32 {
    max_receives.saturating_mul(4)
}

#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// The queue's name (`persona`, `chat`), for logs and metrics.
    fn name(&self) -> &str;

    /// Enqueues each message. Batches of up to 10 (SQS's limit) are all or none; callers that
    /// need that guarantee send no more per call.
    async fn send(&self, messages: &[Outgoing]) -> Result<()>;

    /// Receives up to `max` messages, waiting up to `wait` for the first one, and hides each for
    /// `visibility`.
    async fn receive(
        &self,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Delivery>>;

    /// Acknowledges a delivery. A stale receipt is not an error.
    async fn delete(&self, receipt: &str) -> Result<()>;

    /// Hides a delivered message for `timeout` from now (0 makes it visible at once). Used to
    /// keep a long job's message hidden (heartbeat), to back off before a retry, and to hand a
    /// message back on shutdown.
    async fn change_visibility(&self, receipt: &str, timeout: Duration) -> Result<()>;

    /// Moves a delivered message to the dead-letter queue, with the reason.
    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<()>;

    /// Lists dead-lettered messages, oldest first.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>>;

    async fn stats(&self) -> Result<QueueStats>;
}
