//! The one place that chooses adapters: [`open_ports`] builds the queue, store, event bus, auth
//! and models (`crate::models`) of the configured backend, from the parsed settings, into one
//! `shared::ports::Ports`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use shared::atomic::aws::AwsAtomic;
use shared::atomic::sqlite::SqliteAtomic;
use shared::auth::cognito::{CognitoIdentity, HttpJwks};
use shared::auth::local::{KeyDirJwks, LocalIssuer, SigningKey};
use shared::auth::{JwksSource, JwksVerifier};
use shared::events::aws::{AwsEventBus, InboxOptions, Topic};
use shared::events::SqliteEventBus;
use shared::metrics::Metrics;
pub use shared::ports::Ports;
use shared::queue::sqlite::SqliteQueue;
use shared::queue::sqs::SqsQueue;
use shared::queue::Queue;
use shared::sqlite::Db;
use shared::store::dynamodb::DynamoStore;
use shared::store::sqlite::SqliteStore;

use crate::cli::{AuthSettings, Backend, Settings};
use crate::models::open_models;

/// The SDK clients of the AWS backend, each with deadlines on its calls.
pub struct AwsClients {
    pub sqs: aws_sdk_sqs::Client,
    pub sns: aws_sdk_sns::Client,
    pub dynamo: aws_sdk_dynamodb::Client,
    pub cognito: aws_sdk_cognitoidentityprovider::Client,
}

impl AwsClients {
    pub fn new(sdk: &aws_config::SdkConfig, settings: &Settings) -> AwsClients {
        // Every call has a deadline, so a hung connection cannot hold a worker slot or an API
        // request: an attempt gets `aws_attempt_timeout_secs` (SQS's long-poll receive that
        // much more than its wait), the call with its retries `aws_operation_timeout_secs`.
        let attempt = settings.aws.attempt_timeout();
        let operation = settings.aws.operation_timeout();
        let timeouts = |attempt: Duration, operation: Duration| {
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3).min(attempt))
                .operation_attempt_timeout(attempt)
                .operation_timeout(operation.max(attempt))
                .build()
        };
        let receive_wait = settings.worker.receive_wait();
        let sqs = aws_sdk_sqs::Client::from_conf(
            aws_sdk_sqs::config::Builder::from(sdk)
                .timeout_config(timeouts(attempt + receive_wait, operation + receive_wait))
                .build(),
        );
        let dynamo = aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::config::Builder::from(sdk)
                .timeout_config(timeouts(attempt, operation))
                .build(),
        );
        let sns = aws_sdk_sns::Client::from_conf(
            aws_sdk_sns::config::Builder::from(sdk)
                .timeout_config(timeouts(attempt, operation))
                .build(),
        );
        let cognito = aws_sdk_cognitoidentityprovider::Client::from_conf(
            aws_sdk_cognitoidentityprovider::config::Builder::from(sdk)
                .timeout_config(timeouts(attempt, operation))
                .build(),
        );
        AwsClients {
            sqs,
            sns,
            dynamo,
            cognito,
        }
    }
}

/// Builds the ports of the configured backend.
pub async fn open_ports(settings: &Settings) -> anyhow::Result<Ports> {
    match settings.backend {
        Backend::Embedded => embedded(settings).await,
        Backend::Aws => aws(settings).await,
    }
}

/// The one JWKS verifier, of either backend's tokens.
fn verifier(
    issuer: String,
    client_id: String,
    auth: &AuthSettings,
    keys: Arc<dyn JwksSource>,
) -> JwksVerifier {
    JwksVerifier::new(
        issuer,
        client_id,
        auth.leeway(),
        auth.jwks_refetch_cooldown(),
        keys,
    )
}

/// The Cognito side of the AWS backend: the app client's id and the verifier of its tokens.
fn cognito_verifier(region: &str, settings: &Settings) -> anyhow::Result<(String, JwksVerifier)> {
    let a = &settings.aws;
    let pool = a
        .cognito_user_pool_id
        .clone()
        .context("the aws backend needs CHARACTERBOT_COGNITO_USER_POOL_ID")?;
    let client_id = a
        .cognito_client_id
        .clone()
        .context("the aws backend needs CHARACTERBOT_COGNITO_CLIENT_ID")?;
    let issuer = shared::auth::cognito::issuer(region, &pool);
    let jwks_url = a
        .jwks_url
        .clone()
        .unwrap_or_else(|| format!("{issuer}/.well-known/jwks.json"));
    let keys = Arc::new(HttpJwks::new(jwks_url)?);
    let verifier = verifier(issuer, client_id.clone(), &settings.auth, keys);
    Ok((client_id, verifier))
}

/// SQS, DynamoDB (records and events) and Cognito. Region, credentials and endpoint
/// overrides (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_<SERVICE>`) come from the standard AWS
/// configuration chain; the queues and table must exist (`characterbot aws-init`).
async fn aws(settings: &Settings) -> anyhow::Result<Ports> {
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let region = sdk
        .region()
        .map(ToString::to_string)
        .context("the aws backend needs a region (AWS_REGION)")?;
    let (client_id, verifier) = cognito_verifier(&region, settings)?;
    let a = &settings.aws;
    let AwsClients {
        sqs,
        sns,
        dynamo,
        cognito,
    } = AwsClients::new(&sdk, settings);
    let store = Arc::new(DynamoStore::new(dynamo.clone(), &a.table));
    let persona_queue: Arc<dyn Queue> =
        Arc::new(SqsQueue::connect(sqs.clone(), "persona", &a.persona_queue).await?);
    let chat_queue: Arc<dyn Queue> =
        Arc::new(SqsQueue::connect(sqs.clone(), "chat", &a.chat_queue).await?);
    let topic = Topic::resolve_topic(sns, &a.events_topic).await?;
    let inbox = InboxOptions {
        prefix: a.inbox_prefix.clone(),
        stale_after: Duration::from_secs(a.inbox_stale_secs),
        wait: settings.worker.receive_wait(),
    };
    let events = Arc::new(AwsEventBus::new(dynamo, &a.table, topic, sqs, inbox));
    let identity = CognitoIdentity::new(cognito, client_id, a.cognito_client_secret.clone())
        .with_refresh_call(a.cognito_refresh.into());
    Ok(Ports {
        atomic: Arc::new(AwsAtomic::new(
            store.clone(),
            persona_queue.clone(),
            chat_queue.clone(),
            events.clone(),
            a.outbox_sweep_after(),
        )),
        store,
        persona_queue,
        chat_queue,
        events,
        verifier: Arc::new(verifier),
        identity: Arc::new(identity),
        jwks: None,
        metrics: Metrics::new(),
        models: open_models(settings).await?,
    })
}

/// SQLite queue, store and events in the data dir, and the local issuer with its key there.
async fn embedded(settings: &Settings) -> anyhow::Result<Ports> {
    let db = Db::open_with(&settings.data_dir, settings.sqlite_sync.into()).await?;
    let key_dir = settings.data_dir.join("keys");
    let dir = key_dir.clone();
    let key = tokio::task::spawn_blocking(move || SigningKey::load_or_create(&dir)).await??;
    let auth = &settings.auth;
    let keys = Arc::new(KeyDirJwks { dir: key_dir });
    let verifier = verifier(auth.issuer.clone(), auth.client_id.clone(), auth, keys);
    let jwks = key.jwks().clone();
    let identity = LocalIssuer::new(db.clone(), Arc::new(key), auth.into())?;
    let persona_queue = Arc::new(SqliteQueue::new(db.clone(), "persona"));
    let chat_queue = Arc::new(SqliteQueue::new(db.clone(), "chat"));
    let events = SqliteEventBus::start(db.clone()).await?;
    Ok(Ports {
        store: Arc::new(SqliteStore::new(db.clone())),
        atomic: Arc::new(SqliteAtomic::new(
            db,
            persona_queue.clone(),
            chat_queue.clone(),
            events.clone(),
        )),
        persona_queue,
        chat_queue,
        events,
        verifier: Arc::new(verifier),
        identity: Arc::new(identity),
        jwks: Some(jwks),
        metrics: Metrics::new(),
        models: open_models(settings).await?,
    })
}
