//! # characterbot — the one binary, and the only place where adapters are chosen
//!
//! `main.rs` parses the command line; this library builds the adapters named by the settings
//! once, at start-up, and hands them to the API and the workers, which know only the traits.
//! The integration tests use the same functions, so they run exactly what ships.
//!
//! Layout:
//! - [`open_ports`] the queue, store, event bus and auth of a backend (`shared::ports::Ports`),
//!   chosen from the settings: the one place that chooses adapters.
//! - [`Models`]    the persona and chat models, built by [`Models::from_settings`].
//! - [`api_state`], [`consumer`]: the API state and a worker's consume loop from those.
//! - [`run`]       runs `serve`, `api` or one `worker` until the shutdown token is cancelled.
//! - [`client`]    `characterbot batch`, the batch client with a progress bar.
//! - [`allocator`] the process's allocator (mimalloc) and its tuning.

pub mod allocator;
pub mod client;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ingest_api::{AppState, Shared};
use shared::atomic::aws::AwsAtomic;
use shared::atomic::sqlite::SqliteAtomic;
use shared::auth::cognito::RefreshCall;
use shared::auth::local::{KeyDirJwks, LocalIssuer, SigningKey};
use shared::auth::JwksVerifier;
use shared::config::{Backend, ChatModelChoice, CognitoRefresh, PersonaModelChoice, Settings};
use shared::domain::RequestKind;
use shared::emf::EmfWriter;
use shared::events::dynamodb::DynamoEventBus;
use shared::events::{EventBus, SqliteEventBus};
use shared::metrics::Metrics;
use shared::models::bedrock::{BedrockChatModel, BedrockOptions};
use shared::models::offline::{OfflineChatModel, OfflinePersonaModel};
use shared::models::openai::{OpenAiChatModel, OpenAiOptions, OpenAiPersonaModel};
use shared::models::{ChatModel, PersonaModel};
pub use shared::ports::Ports;
use shared::queue::sqlite::SqliteQueue;
use shared::queue::sqs::SqsQueue;
use shared::queue::Queue;
use shared::sqlite::Db;
use shared::store::dynamodb::DynamoStore;
use shared::store::sqlite::SqliteStore;
use shared::store::Store;
use tokio_util::sync::CancellationToken;
use workers::chat::ChatJob;
use workers::persona::PersonaJob;
use workers::{Consumer, Job};

/// The SDK clients of the AWS backend, each with deadlines on its calls.
pub struct AwsClients {
    pub sqs: aws_sdk_sqs::Client,
    pub dynamo: aws_sdk_dynamodb::Client,
    pub cognito: aws_sdk_cognitoidentityprovider::Client,
}

impl AwsClients {
    pub fn new(sdk: &aws_config::SdkConfig, settings: &Settings) -> AwsClients {
        let a = &settings.aws;
        // Every call has a deadline, so a hung connection cannot hold a worker slot or an API
        // request: an attempt gets `aws_attempt_timeout_secs` (SQS's long-poll receive that
        // much more than its wait), the call with its retries `aws_operation_timeout_secs`.
        let attempt = Duration::from_secs(a.aws_attempt_timeout_secs.max(1));
        let operation = Duration::from_secs(a.aws_operation_timeout_secs.max(1));
        let timeouts = |attempt: Duration, operation: Duration| {
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3).min(attempt))
                .operation_attempt_timeout(attempt)
                .operation_timeout(operation.max(attempt))
                .build()
        };
        let receive_wait = Duration::from_secs(settings.worker.receive_wait_secs.min(20));
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
        let cognito = aws_sdk_cognitoidentityprovider::Client::from_conf(
            aws_sdk_cognitoidentityprovider::config::Builder::from(sdk)
                .timeout_config(timeouts(attempt, operation))
                .build(),
        );
        AwsClients {
            sqs,
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

/// SQS, DynamoDB (records and events) and Cognito. Region, credentials and endpoint
/// overrides (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_<SERVICE>`) come from the standard AWS
/// configuration chain; the queues and table must exist (`characterbot aws-init`).
async fn aws(settings: &Settings) -> anyhow::Result<Ports> {
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let region = sdk
        .region()
        .map(ToString::to_string)
        .context("the aws backend needs a region (AWS_REGION)")?;
    let a = &settings.aws;
    let pool = a
        .cognito_user_pool_id
        .clone()
        .context("the aws backend needs CHARACTERBOT_COGNITO_USER_POOL_ID")?;
    let client_id = a
        .cognito_client_id
        .clone()
        .context("the aws backend needs CHARACTERBOT_COGNITO_CLIENT_ID")?;
    let issuer = shared::auth::cognito::issuer(&region, &pool);
    let jwks_url = a
        .jwks_url
        .clone()
        .unwrap_or_else(|| format!("{issuer}/.well-known/jwks.json"));
    let auth = &settings.auth;
    let verifier = JwksVerifier::new(
        issuer,
        client_id.clone(),
        Duration::from_secs(auth.leeway_secs),
        Duration::from_secs(auth.jwks_refetch_cooldown_secs),
        Arc::new(shared::auth::cognito::HttpJwks::new(jwks_url)?),
    );
    let AwsClients {
        sqs,
        dynamo,
        cognito,
    } = AwsClients::new(&sdk, settings);
    let dynamo_store = Arc::new(DynamoStore::new(dynamo.clone(), &a.table));
    let store: Arc<dyn Store> = dynamo_store.clone();
    let persona_queue: Arc<dyn Queue> =
        Arc::new(SqsQueue::connect(sqs.clone(), "persona", &a.persona_queue).await?);
    let chat_queue: Arc<dyn Queue> = Arc::new(SqsQueue::connect(sqs, "chat", &a.chat_queue).await?);
    let dynamo_events = Arc::new(DynamoEventBus::new(dynamo, &a.table));
    let events: Arc<dyn EventBus> = dynamo_events.clone();
    Ok(Ports {
        atomic: Arc::new(AwsAtomic {
            store: dynamo_store,
            persona_queue: persona_queue.clone(),
            chat_queue: chat_queue.clone(),
            events: dynamo_events,
            sweep_after: Duration::from_secs(a.outbox_sweep_after_secs),
        }),
        store,
        persona_queue,
        chat_queue,
        events,
        verifier: Arc::new(verifier),
        identity: Arc::new(
            shared::auth::cognito::CognitoIdentity::new(
                cognito,
                client_id,
                a.cognito_client_secret.clone(),
            )
            .with_refresh_call(match a.cognito_refresh {
                CognitoRefresh::GetTokens => RefreshCall::GetTokensFromRefreshToken,
                CognitoRefresh::InitiateAuth => RefreshCall::InitiateAuth,
            }),
        ),
        jwks: None,
        metrics: Metrics::new(),
    })
}

async fn embedded(settings: &Settings) -> anyhow::Result<Ports> {
    let db = Db::open_with(&settings.data_dir, settings.sqlite_sync).await?;
    let key_dir = settings.data_dir.join("keys");
    let dir = key_dir.clone();
    let key = tokio::task::spawn_blocking(move || SigningKey::load_or_create(&dir)).await??;
    let auth = &settings.auth;
    let verifier = JwksVerifier::new(
        auth.issuer.clone(),
        auth.client_id.clone(),
        Duration::from_secs(auth.leeway_secs),
        Duration::from_secs(auth.jwks_refetch_cooldown_secs),
        Arc::new(KeyDirJwks { dir: key_dir }),
    );
    let jwks = key.jwks().clone();
    let identity = LocalIssuer::new(db.clone(), Arc::new(key), auth.clone())?;
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
    })
}

/// Whether AWS credentials are configured in the environment (keys, a profile, a web identity,
/// or a container role); the `auto` chat model then picks Bedrock. Read here, where the binary
/// chooses its adapters, so that no library reads the process environment.
fn aws_credentials_in_environment() -> bool {
    [
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
}

/// The two models.
#[derive(Clone)]
pub struct Models {
    pub persona: Arc<dyn PersonaModel>,
    pub chat: Arc<dyn ChatModel>,
}

impl Models {
    /// The models the settings name; `auto` picks a provider whose credentials are present and
    /// the offline engine otherwise, and the choice is logged.
    pub async fn from_settings(settings: &Settings) -> anyhow::Result<Models> {
        let m = &settings.models;
        let delay = Duration::from_millis(m.offline_delay_ms);
        let openai = |model: &str| -> anyhow::Result<OpenAiOptions> {
            let key = m
                .openai_key()
                .context("the openai model needs OPENAI_API_KEY (or --openai-api-key)")?;
            Ok(OpenAiOptions {
                api_key: key.to_owned(),
                base_url: m.openai_base_url.clone(),
                organization: m.openai_org_id.clone(),
                model: model.to_owned(),
                timeout: Duration::from_secs(m.model_timeout_secs.max(1)),
                max_output_tokens: m.max_output_tokens,
            })
        };
        let use_openai =
            |explicit: bool, auto: bool| explicit || (auto && m.openai_key().is_some());
        let persona: Arc<dyn PersonaModel> = if use_openai(
            m.persona_model == PersonaModelChoice::Openai,
            m.persona_model == PersonaModelChoice::Auto,
        ) {
            Arc::new(OpenAiPersonaModel::new(openai(&m.openai_persona_model)?)?)
        } else {
            Arc::new(OfflinePersonaModel { delay })
        };
        let bedrock = m.chat_model == ChatModelChoice::Bedrock
            || (m.chat_model == ChatModelChoice::Auto && aws_credentials_in_environment());
        let chat: Arc<dyn ChatModel> = if bedrock {
            let opts = BedrockOptions {
                model_id: m.bedrock_model_id.clone(),
                max_tokens: m.max_output_tokens,
                temperature: m.temperature,
                top_p: m.top_p,
                stream: m.bedrock_stream,
                timeout: Duration::from_secs(m.model_timeout_secs.max(1)),
            };
            Arc::new(BedrockChatModel::from_environment(opts).await)
        } else if use_openai(
            m.chat_model == ChatModelChoice::Openai,
            m.chat_model == ChatModelChoice::Auto,
        ) {
            Arc::new(OpenAiChatModel::new(openai(&m.openai_chat_model)?)?)
        } else {
            Arc::new(OfflineChatModel { delay })
        };
        let provider = |model: &str| {
            if model == shared::models::offline::MODEL {
                "offline engine (deterministic, built in, no provider called)".to_string()
            } else if bedrock && model == m.bedrock_model_id {
                "Amazon Bedrock".to_string()
            } else {
                format!("OpenAI-compatible API at {}", m.openai_base_url)
            }
        };
        tracing::info!(
            persona_model = persona.model(),
            persona_provider = %provider(persona.model()),
            chat_model = chat.model(),
            chat_provider = %provider(chat.model()),
            "models in use"
        );
        Ok(Models { persona, chat })
    }
}

pub fn api_state(adapters: &Ports, settings: &Settings, shutdown: CancellationToken) -> AppState {
    AppState::new(Shared {
        ports: adapters.clone(),
        settings: settings.api.clone(),
        limiter: Shared::limiter_for(&settings.api),
        throttle: Shared::throttle_for(&settings.api),
        tokens: Default::default(),
        slots: Default::default(),
        shutdown,
    })
}

/// The consume loop of one kind of worker.
pub fn consumer(
    kind: RequestKind,
    adapters: &Ports,
    models: &Models,
    settings: &Settings,
) -> Arc<Consumer> {
    let w = &settings.worker;
    let (job, concurrency): (Arc<dyn Job>, usize) = match kind {
        RequestKind::Persona => (
            Arc::new(PersonaJob {
                model: models.persona.clone(),
            }),
            w.persona_concurrency,
        ),
        RequestKind::Chat => (
            Arc::new(ChatJob {
                store: adapters.store.clone(),
                model: models.chat.clone(),
                events: adapters.events.clone(),
                history_messages: w.history_messages,
                history_chars: w.history_chars,
            }),
            w.chat_concurrency,
        ),
    };
    Arc::new(Consumer {
        job,
        queue: adapters.queue(kind).clone(),
        atomic: adapters.atomic.clone(),
        metrics: adapters.metrics.clone(),
        settings: w.clone(),
        concurrency,
    })
}

/// `characterbot aws-init`: creates the table (with TTL) and the queues with their dead-letter
/// queues and redrive policy, where they do not exist yet. For first-time setups and emulators;
/// `infra/` is the way for production.
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
    Ok(())
}

/// What one process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// API and both workers.
    Serve,
    Api,
    Worker(RequestKind),
}

/// Runs `role` until `shutdown` is cancelled, then drains and returns.
pub async fn run(
    role: Role,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let adapters = open_ports(&settings).await?;
    let kinds: &[RequestKind] = match role {
        Role::Serve => &RequestKind::ALL,
        Role::Api => &[],
        Role::Worker(RequestKind::Persona) => &[RequestKind::Persona],
        Role::Worker(RequestKind::Chat) => &[RequestKind::Chat],
    };
    let mut tasks = tokio::task::JoinSet::new();
    if !kinds.is_empty() {
        let models = Models::from_settings(&settings).await?;
        for &kind in kinds {
            let c = consumer(kind, &adapters, &models, &settings);
            let token = shutdown.clone();
            tasks.spawn(async move {
                c.run(token).await;
                Ok::<(), anyhow::Error>(())
            });
        }
    }
    // Stopped only after everything else has, so the last flush counts the drained jobs too.
    let emf_stop = CancellationToken::new();
    let emf = (settings.metrics_emf_interval_secs > 0).then(|| {
        tokio::spawn(write_emf(
            EmfWriter::new(settings.metrics_emf_namespace.clone()),
            adapters.metrics.clone(),
            Duration::from_secs(settings.metrics_emf_interval_secs),
            emf_stop.clone(),
        ))
    });
    if matches!(role, Role::Serve | Role::Api) {
        let listener = tokio::net::TcpListener::bind(&settings.api.listen).await?;
        let state = api_state(&adapters, &settings, shutdown.clone());
        if let Some(addr) = &settings.api.metrics_listen {
            let metrics = tokio::net::TcpListener::bind(addr).await?;
            let state = state.clone();
            tasks.spawn(async move { Ok(ingest_api::serve_metrics(metrics, state).await?) });
        }
        tasks.spawn(async move { Ok(ingest_api::serve(listener, state).await?) });
    }
    let mut outcome = Ok(());
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done.map_err(anyhow::Error::from).and_then(|r| r) {
            // One part failed: stop the others, and report the first failure.
            shutdown.cancel();
            if outcome.is_ok() {
                outcome = Err(e);
            }
        }
    }
    emf_stop.cancel();
    if let Some(task) = emf {
        let _ = task.await;
    }
    outcome
}

/// Writes the metrics to stdout in CloudWatch Embedded Metric Format every `every`, and once
/// more at shutdown so the last interval is not lost.
async fn write_emf(
    mut emf: EmfWriter,
    metrics: Arc<Metrics>,
    every: Duration,
    shutdown: CancellationToken,
) {
    use std::io::Write;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = shutdown.cancelled() => true,
        };
        let docs = emf.flush(&metrics, shared::time::now_ms());
        // One line per document, written whole under the lock so log lines cannot interleave.
        let mut out = std::io::stdout().lock();
        for doc in docs {
            if let Err(e) = writeln!(out, "{doc}") {
                tracing::warn!(error = %e, "could not write EMF metrics");
            }
        }
        let _ = out.flush();
        drop(out);
        if last {
            return;
        }
    }
}
