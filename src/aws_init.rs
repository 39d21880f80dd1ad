//! `characterbot aws-init`: creates the table (with TTL) and the queues with their dead-letter
//! queues and redrive policy, where they do not exist yet. For first-time setups and emulators;
//! `infra/` is the way for production.

use shared::queue::sqs::SqsQueue;
use shared::store::dynamodb::DynamoStore;

use crate::cli::Settings;

/// Creates what the AWS backend of `settings` needs, where missing.
pub async fn aws_init(settings: &Settings) -> anyhow::Result<()> {
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let a = &settings.aws;
    DynamoStore::ensure_table(&aws_sdk_dynamodb::Client::new(&sdk), &a.table).await?;
    // The queue's own redrive is a backstop well past the consume loop's dead-lettering.
    let redrive = shared::queue::redrive_after(settings.worker.max_receives);
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    for (kind, name) in [("persona", &a.persona_queue), ("chat", &a.chat_queue)] {
        SqsQueue::ensure(sqs.clone(), kind, name, redrive).await?;
        tracing::info!(queue = %name, "queue ready");
    }
    tracing::info!(table = %a.table, "table ready");
    let topic = aws_sdk_sns::Client::new(&sdk)
        .create_topic()
        .name(a.events_topic_name())
        .send()
        .await?;
    tracing::info!(topic = ?topic.topic_arn, "events topic ready");
    Ok(())
}
