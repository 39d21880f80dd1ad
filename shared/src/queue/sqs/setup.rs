//! Finding and creating the queues: `connect` at start-up, `ensure` for `characterbot
//! aws-init` (a queue and its dead-letter queue with their redrive policy, encrypted at rest).
//! Apart from the adapter's calls so that those read as the port's semantics only.

use std::collections::HashMap;

use aws_sdk_sqs::types::QueueAttributeName;

use super::{dead_letter_name, is_fifo, queue_error, SqsQueue};
use crate::Result;

impl SqsQueue {
    /// Creates (or finds) the queue `name` and its dead-letter queue (see
    /// [`dead_letter_name`]), with a redrive policy of `redrive_after` receives, and returns the
    /// adapter. A `.fifo` name makes FIFO queues: groups kept in order, deduplicated by body,
    /// with the throughput of one group at a time per conversation, not per queue.
    pub async fn ensure(
        client: aws_sdk_sqs::Client,
        kind: &str,
        name: &str,
        redrive_after: u32,
    ) -> Result<SqsQueue> {
        let fifo = is_fifo(name);
        let mut dlq_attributes = HashMap::from([
            (QueueAttributeName::MessageRetentionPeriod, "1209600".into()),
            (QueueAttributeName::SqsManagedSseEnabled, "true".into()),
        ]);
        if fifo {
            dlq_attributes.insert(QueueAttributeName::FifoQueue, "true".into());
        }
        let dlq_url = create_or_update(&client, &dead_letter_name(name), dlq_attributes).await?;
        let dlq_arn = client
            .get_queue_attributes()
            .queue_url(&dlq_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| queue_error("read dead-letter queue", e))?
            .attributes
            .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
            .unwrap_or_default();
        let redrive = serde_json::json!({
            "deadLetterTargetArn": dlq_arn,
            "maxReceiveCount": redrive_after.to_string(),
        });
        let mut attributes = HashMap::from([
            (QueueAttributeName::RedrivePolicy, redrive.to_string()),
            (QueueAttributeName::SqsManagedSseEnabled, "true".into()),
        ]);
        if fifo {
            attributes.extend([
                (QueueAttributeName::FifoQueue, "true".into()),
                (QueueAttributeName::ContentBasedDeduplication, "true".into()),
                (
                    QueueAttributeName::DeduplicationScope,
                    "messageGroup".into(),
                ),
                (
                    QueueAttributeName::FifoThroughputLimit,
                    "perMessageGroupId".into(),
                ),
            ]);
        }
        let url = create_or_update(&client, name, attributes).await?;
        Ok(SqsQueue {
            client,
            name: kind.to_owned(),
            url,
            dlq_url,
            fifo,
        })
    }

    /// The adapter for existing queues `name` and `name-dlq` (see `ensure` to create them).
    pub async fn connect(client: aws_sdk_sqs::Client, kind: &str, name: &str) -> Result<SqsQueue> {
        let url_of = |queue: String| {
            let client = client.clone();
            async move {
                client
                    .get_queue_url()
                    .queue_name(&queue)
                    .send()
                    .await
                    .map_err(|e| queue_error(&format!("find queue {queue}"), e))
                    .map(|o| o.queue_url.unwrap_or_default())
            }
        };
        let url = url_of(name.to_owned()).await?;
        let dlq_url = url_of(dead_letter_name(name)).await?;
        Ok(SqsQueue {
            client,
            name: kind.to_owned(),
            url,
            dlq_url,
            fifo: is_fifo(name),
        })
    }
}

/// Creates queue `name` with `attributes`, or, when it exists with other attributes (a rerun
/// of `aws-init` after a setting changed), sets them on it; returns its URL.
async fn create_or_update(
    client: &aws_sdk_sqs::Client,
    name: &str,
    attributes: HashMap<QueueAttributeName, String>,
) -> Result<String> {
    let created = client
        .create_queue()
        .queue_name(name)
        .set_attributes(Some(attributes.clone()))
        .send()
        .await;
    match created {
        Ok(out) => Ok(out.queue_url.unwrap_or_default()),
        Err(e)
            if e.as_service_error().is_some_and(|s| {
                s.is_queue_name_exists() || s.meta().code() == Some("QueueAlreadyExists")
            }) =>
        {
            let url = client
                .get_queue_url()
                .queue_name(name)
                .send()
                .await
                .map_err(|e| queue_error(&format!("find queue {name}"), e))?
                .queue_url
                .unwrap_or_default();
            // Whether a queue is FIFO is fixed when it is made.
            let mut attributes = attributes;
            attributes.remove(&QueueAttributeName::FifoQueue);
            client
                .set_queue_attributes()
                .queue_url(&url)
                .set_attributes(Some(attributes))
                .send()
                .await
                .map_err(|e| queue_error(&format!("update queue {name}"), e))?;
            Ok(url)
        }
        Err(e) => Err(queue_error(&format!("create queue {name}"), e)),
    }
}
