//! The AWS backend's flags: table, queues, call deadlines and the Cognito app client. Read by
//! the composition root (`crate::ports`, `crate::aws_init`), which hands the SDK clients and
//! plain values to the adapters.

use std::time::Duration;

use clap::{Args, ValueEnum};
use shared::auth::cognito::RefreshCall;

/// See [`AwsSettings::cognito_refresh`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CognitoRefresh {
    GetTokens,
    InitiateAuth,
}

impl From<CognitoRefresh> for RefreshCall {
    fn from(r: CognitoRefresh) -> Self {
        match r {
            CognitoRefresh::GetTokens => RefreshCall::GetTokensFromRefreshToken,
            CognitoRefresh::InitiateAuth => RefreshCall::InitiateAuth,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct AwsSettings {
    /// DynamoDB table of records and events.
    #[arg(long, env = "CHARACTERBOT_AWS_TABLE", default_value = "characterbot")]
    pub table: String,
    /// SQS queue of persona jobs (its dead-letter queue is `<name>-dlq`).
    #[arg(
        long,
        env = "CHARACTERBOT_AWS_PERSONA_QUEUE",
        default_value = "characterbot-persona"
    )]
    pub persona_queue: String,
    /// SQS queue of chat jobs: FIFO (a `.fifo` name), so that a conversation's turns are
    /// answered in order (its dead-letter queue is `<name>-dlq.fifo`).
    #[arg(
        long,
        env = "CHARACTERBOT_AWS_CHAT_QUEUE",
        default_value = "characterbot-chat.fifo"
    )]
    pub chat_queue: String,
    /// SNS topic that events are announced on, by name or ARN (the template passes the ARN;
    /// a name is looked up, and `aws-init` creates it).
    #[arg(
        long,
        env = "CHARACTERBOT_AWS_EVENTS_TOPIC",
        default_value = "characterbot-events"
    )]
    pub events_topic: String,
    /// Start of the name of each API instance's inbox: an SQS queue it makes at start,
    /// subscribed to the events topic, and deletes at stop. Nothing else's name may start so.
    #[arg(
        long,
        env = "CHARACTERBOT_AWS_INBOX_PREFIX",
        default_value = "characterbot-inbox-"
    )]
    pub inbox_prefix: String,
    /// An inbox its instance has not tagged alive for this long (the instance died without
    /// deleting it) is removed by the other instances, in seconds. Instances tag theirs every
    /// quarter of this.
    #[arg(long, env = "CHARACTERBOT_AWS_INBOX_STALE_SECS", default_value_t = 300)]
    pub inbox_stale_secs: u64,
    /// How long the jobs of an accept may wait in the outbox for the API process that
    /// recorded them before a worker's sweep sends them (the API died between its DynamoDB
    /// transaction and its SQS send), in seconds.
    #[arg(
        long,
        env = "CHARACTERBOT_OUTBOX_SWEEP_AFTER_SECS",
        default_value_t = 30
    )]
    pub outbox_sweep_after_secs: u64,
    /// Longest one attempt of an SQS, DynamoDB or Cognito call may take, in seconds (an SQS
    /// receive gets its long-poll wait on top).
    #[arg(
        long,
        env = "CHARACTERBOT_AWS_ATTEMPT_TIMEOUT_SECS",
        default_value_t = 5
    )]
    pub aws_attempt_timeout_secs: u64,
    /// Longest one call may take with its retries, in seconds.
    #[arg(
        long,
        env = "CHARACTERBOT_AWS_OPERATION_TIMEOUT_SECS",
        default_value_t = 15
    )]
    pub aws_operation_timeout_secs: u64,
    /// Cognito user pool id.
    #[arg(long, env = "CHARACTERBOT_COGNITO_USER_POOL_ID")]
    pub cognito_user_pool_id: Option<String>,
    /// Cognito app client id.
    #[arg(long, env = "CHARACTERBOT_COGNITO_CLIENT_ID")]
    pub cognito_client_id: Option<String>,
    /// Cognito app client secret, for app clients that have one.
    #[arg(
        long,
        env = "CHARACTERBOT_COGNITO_CLIENT_SECRET",
        hide_env_values = true
    )]
    pub cognito_client_secret: Option<String>,
    /// How sessions are renewed: `get-tokens` (`GetTokensFromRefreshToken`: rotates refresh
    /// tokens where the app client has rotation on, as the template sets it) or `initiate-auth`
    /// (`REFRESH_TOKEN_AUTH`: app clients without rotation, on emulators that lack the newer
    /// call, such as moto).
    #[arg(
        long,
        env = "CHARACTERBOT_COGNITO_REFRESH",
        value_enum,
        default_value_t = CognitoRefresh::GetTokens
    )]
    pub cognito_refresh: CognitoRefresh,
    /// URL of the pool's key set; default `https://cognito-idp.{region}.amazonaws.com/{pool}/.well-known/jwks.json`.
    #[arg(long, env = "CHARACTERBOT_JWKS_URL")]
    pub jwks_url: Option<String>,
}

impl AwsSettings {
    /// Longest one attempt of a call (at least 1 s).
    pub fn attempt_timeout(&self) -> Duration {
        Duration::from_secs(self.aws_attempt_timeout_secs.max(1))
    }

    /// Longest one call with its retries (at least 1 s).
    pub fn operation_timeout(&self) -> Duration {
        Duration::from_secs(self.aws_operation_timeout_secs.max(1))
    }

    /// The topic's name, whether the setting is a name or an ARN.
    pub fn events_topic_name(&self) -> &str {
        self.events_topic.rsplit(':').next().unwrap_or_default()
    }

    /// How long an accept's jobs wait in the outbox before a sweep sends them.
    pub fn outbox_sweep_after(&self) -> Duration {
        Duration::from_secs(self.outbox_sweep_after_secs)
    }
}
