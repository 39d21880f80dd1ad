//! Every setting of CharacterBot, as `clap` arguments with environment-variable fallbacks: the
//! only place in the house that knows `clap`. The README's configuration table lists exactly
//! these. Each group is its own struct, in its own file, and turns into the plain options of the
//! library that reads it (`ingest_api::ApiOptions`, `workers::WorkerOptions`,
//! `shared::auth::local::LocalIssuerOptions`, the model options): the libraries never see how a
//! value was given, and a renamed flag breaks the build here, not a library.

mod api;
mod auth;
mod aws;
mod batch;
mod models;
mod terminal;
mod worker;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

pub use api::ApiSettings;
pub use auth::AuthSettings;
pub use aws::{AwsSettings, CognitoRefresh};
pub use batch::BatchArgs;
pub use models::{ChatModelChoice, ModelSettings, PersonaModelChoice};
pub use terminal::{ChatArgs, ClientArgs, LoginArgs, PersonaArgs, PersonaCommand};
pub use worker::WorkerSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// SQLite queue and store, local token issuer: one machine, no cloud.
    Embedded,
    /// SQS, DynamoDB and Cognito (region, credentials and endpoints from the standard AWS
    /// configuration chain).
    Aws,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (production).
    Json,
}

/// The flag's side of `shared::sqlite::Sync`, which knows nothing of `clap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SqliteSync {
    /// A commit holding a durable write is fsynced before its writers are answered.
    Full,
    /// No fsync per commit: survives a process crash, may lose the last commits on power loss.
    Normal,
}

impl From<SqliteSync> for shared::sqlite::Sync {
    fn from(s: SqliteSync) -> Self {
        match s {
            SqliteSync::Full => shared::sqlite::Sync::Full,
            SqliteSync::Normal => shared::sqlite::Sync::Normal,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Where the embedded backend keeps its database and signing keys.
    #[arg(long, env = "CHARACTERBOT_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Embedded backend: whether each commit waits for the disk. `full`: every accepted
    /// request is fsynced before its `202` (survives a power cut); `normal`: no fsync per
    /// commit (survives a crash of the process, may lose the last commits on power loss).
    #[arg(
        long,
        env = "CHARACTERBOT_SQLITE_SYNC",
        value_enum,
        default_value = "full"
    )]
    pub sqlite_sync: SqliteSync,
    /// Which backend the queue, store and auth use.
    #[arg(
        long,
        env = "CHARACTERBOT_BACKEND",
        value_enum,
        default_value = "embedded"
    )]
    pub backend: Backend,
    /// Log line format.
    #[arg(
        long,
        env = "CHARACTERBOT_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Every so many seconds, write the metrics to stdout in CloudWatch Embedded Metric Format
    /// (on AWS they then reach CloudWatch from the logs alone); 0 turns this off.
    #[arg(
        long,
        env = "CHARACTERBOT_METRICS_EMF_INTERVAL_SECS",
        default_value_t = 0
    )]
    pub metrics_emf_interval_secs: u64,
    /// CloudWatch namespace of the EMF metrics.
    #[arg(
        long,
        env = "CHARACTERBOT_METRICS_EMF_NAMESPACE",
        default_value = "CharacterBot"
    )]
    pub metrics_emf_namespace: String,
    #[command(flatten)]
    pub api: ApiSettings,
    #[command(flatten)]
    pub worker: WorkerSettings,
    #[command(flatten)]
    pub auth: AuthSettings,
    #[command(flatten)]
    pub models: ModelSettings,
    #[command(flatten)]
    pub aws: AwsSettings,
}

impl Settings {
    /// How often EMF metrics are written; `None` when they are off.
    pub fn metrics_emf_interval(&self) -> Option<Duration> {
        (self.metrics_emf_interval_secs > 0)
            .then(|| Duration::from_secs(self.metrics_emf_interval_secs))
    }
}
