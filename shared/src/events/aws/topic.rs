//! The SNS topic every committed event is announced on, and the subscriptions of the API
//! instances' inboxes to it.

use aws_sdk_sns::types::PublishBatchRequestEntry;
use aws_sdk_sns::Client;
use serde::{Deserialize, Serialize};

use super::super::Published;
use crate::error::Report;
use crate::{Error, Result};

/// SNS's limit on one message, and on all the messages of one `PublishBatch` together.
const MAX_PAYLOAD: usize = 256 * 1024;
/// SNS's limit on the messages of one `PublishBatch`.
const MAX_BATCH: usize = 10;

/// What an announcement carries: the stored event, whole, so an inbox needs no read to pass it
/// on.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Announcement {
    pub user_id: String,
    pub id: u64,
    pub name: String,
    pub data: String,
}

#[derive(Clone)]
pub struct Topic {
    client: Client,
    arn: String,
}

impl Topic {
    /// The topic named by `name_or_arn`. An ARN (what the template passes) is taken as it is;
    /// a bare name (local set-ups, `aws-init`) is looked up with `CreateTopic`, which returns
    /// the existing topic of that name (SNS has no other call from name to ARN).
    pub async fn resolve_topic(client: Client, name_or_arn: &str) -> Result<Topic> {
        if name_or_arn.starts_with("arn:") {
            return Ok(Topic {
                client,
                arn: name_or_arn.to_owned(),
            });
        }
        let out = client
            .create_topic()
            .name(name_or_arn)
            .send()
            .await
            .map_err(|e| Error::queue("find the events topic", e))?;
        let arn = out
            .topic_arn
            .ok_or_else(|| Error::internal_msg("CreateTopic answered no ARN"))?;
        Ok(Topic { client, arn })
    }

    pub fn arn(&self) -> &str {
        &self.arn
    }

    /// Publishes `events` (in batches of what SNS takes at once). Failures are logged: the
    /// events are stored already (see the module of the bus).
    pub async fn announce(&self, events: &[Published]) {
        let mut batch: Vec<PublishBatchRequestEntry> = Vec::new();
        let mut size = 0;
        for e in events {
            let message = match serde_json::to_string(&Announcement {
                user_id: e.user_id.clone(),
                id: e.id,
                name: e.event.name().to_owned(),
                data: e.data.clone(),
            }) {
                Ok(m) => m,
                Err(err) => {
                    tracing::warn!(error = %err, "could not encode an announcement");
                    continue;
                }
            };
            if message.len() > MAX_PAYLOAD {
                // Too big for SNS: streams read it from the table as a gap at the user's next
                // event; long polls on their re-read.
                tracing::warn!(
                    id = e.id,
                    bytes = message.len(),
                    "event too large to announce"
                );
                continue;
            }
            if batch.len() == MAX_BATCH || size + message.len() > MAX_PAYLOAD {
                self.publish_entries(std::mem::take(&mut batch)).await;
                size = 0;
            }
            size += message.len();
            match PublishBatchRequestEntry::builder()
                .id(batch.len().to_string())
                .message(message)
                .build()
            {
                Ok(entry) => batch.push(entry),
                Err(err) => tracing::warn!(error = %err, "could not build an announcement"),
            }
        }
        self.publish_entries(batch).await;
    }

    /// Publishes one batch; entries SNS reports failed are sent once more (the SDK already
    /// retries a failed call as a whole).
    async fn publish_entries(&self, entries: Vec<PublishBatchRequestEntry>) {
        let mut entries = entries;
        for last_try in [false, true] {
            if entries.is_empty() {
                return;
            }
            let sent = self
                .client
                .publish_batch()
                .topic_arn(&self.arn)
                .set_publish_batch_request_entries(Some(entries.clone()))
                .send()
                .await;
            let out = match sent {
                Ok(out) => out,
                Err(e) => {
                    let e = Error::queue("announce events", e);
                    tracing::warn!(error = %Report(&e), "events were not announced");
                    return;
                }
            };
            let failed: Vec<String> = out.failed().iter().map(|f| f.id().to_owned()).collect();
            if failed.is_empty() {
                return;
            }
            if last_try {
                tracing::warn!(failed = failed.len(), "some events were not announced");
                return;
            }
            entries.retain(|e| failed.iter().any(|id| id == e.id()));
        }
    }

    /// Subscribes an inbox queue, its messages as published (no SNS envelope). Returns the
    /// subscription's ARN.
    pub async fn subscribe_inbox(&self, queue_arn: &str) -> Result<String> {
        let out = self
            .client
            .subscribe()
            .topic_arn(&self.arn)
            .protocol("sqs")
            .endpoint(queue_arn)
            .attributes("RawMessageDelivery", "true")
            .return_subscription_arn(true)
            .send()
            .await
            .map_err(|e| Error::queue("subscribe the inbox", e))?;
        out.subscription_arn
            .ok_or_else(|| Error::internal_msg("Subscribe answered no ARN"))
    }

    pub async fn unsubscribe_inbox(&self, subscription_arn: &str) -> Result<()> {
        self.client
            .unsubscribe()
            .subscription_arn(subscription_arn)
            .send()
            .await
            .map_err(|e| Error::queue("unsubscribe an inbox", e))?;
        Ok(())
    }

    /// Every SQS subscription of the topic: (subscription ARN, queue ARN).
    pub async fn inbox_subscriptions(&self) -> Result<Vec<(String, String)>> {
        let mut found = Vec::new();
        let mut next = None;
        loop {
            let out = self
                .client
                .list_subscriptions_by_topic()
                .topic_arn(&self.arn)
                .set_next_token(next)
                .send()
                .await
                .map_err(|e| Error::queue("list the topic's subscriptions", e))?;
            for sub in out.subscriptions() {
                if let (Some("sqs"), Some(arn), Some(endpoint)) =
                    (sub.protocol(), sub.subscription_arn(), sub.endpoint())
                {
                    found.push((arn.to_owned(), endpoint.to_owned()));
                }
            }
            next = out.next_token;
            if next.is_none() {
                return Ok(found);
            }
        }
    }
}
