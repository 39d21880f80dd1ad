//! Finding and creating the queues: `connect` at start-up, `ensure` for `characterbot
//! aws-init` (a queue and its dead-letter queue with their redrive policy, encrypted at rest).
//! Apart from the adapter's calls so that those read as the port's semantics only.

use std::collections::HashMap;

use aws_sdk_sqs::types::QueueAttributeName;

use super::{queue_error, SqsQueue};
use crate::Result;

impl SqsQueue {
    /// Creates (or finds) the queue `name` and its dead-letter queue `name-dlq`, with a redrive
    /// policy of `redrive_after` receives, and returns the adapter.
    pub async fn ensure(
        client: aws_sdk_sqs::Client,
        kind: &str,
        name: &str,
        redrive_after: u32,
    ) -> Result<SqsQueue> {
        let dlq_url = create_or_update(
            &client,
            &format!("{name}-dlq"),
            HashMap::from([
                (QueueAttributeName::MessageRetentionPeriod, "1209600".into()),
                (QueueAttributeName::SqsManagedSseEnabled, "true".into()),
            ]),
        )
        .await?;
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
        let url = create_or_update(
            &client,
            name,
            HashMap::from([
                (QueueAttributeName::RedrivePolicy, redrive.to_string()),
                (QueueAttributeName::SqsManagedSseEnabled, "true".into()),
            ]),
        )
        .await?;
        Ok(SqsQueue {
            client,
            name: kind.to_owned(),
            url,
            dlq_url,
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
        let dlq_url = url_of(format!("{name}-dlq")).await?;
        Ok(SqsQueue {
            client,
            name: kind.to_owned(),
            url,
            dlq_url,
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
