//! Every setting of CharacterBot, as `clap` arguments with environment-variable fallbacks.
//! The README's configuration table lists exactly these. Each group is its own struct so that
//! a component receives only the part it reads.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// See [`AwsSettings::cognito_refresh`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CognitoRefresh {
    GetTokens,
    InitiateAuth,
}

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

#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Where the embedded backend keeps its database and signing keys.
    #[arg(
        long,
        env = "CHARACTERBOT_DATA_DIR",
        default_value = "./data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// Embedded backend: whether each commit waits for the disk. `full`: every accepted
    /// request is fsynced before its `202` (survives a power cut); `normal`: no fsync per
    /// commit (survives a crash of the process, may lose the last commits on power loss).
    #[arg(
        long,
        env = "CHARACTERBOT_SQLITE_SYNC",
        value_enum,
        default_value = "full",
        global = true
    )]
    pub sqlite_sync: crate::sqlite::Sync,
    /// Which backend the queue, store and auth use.
    #[arg(
        long,
        env = "CHARACTERBOT_BACKEND",
        value_enum,
        default_value = "embedded",
        global = true
    )]
    pub backend: Backend,
    /// Log line format.
    #[arg(
        long,
        env = "CHARACTERBOT_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// Every so many seconds, write the metrics to stdout in CloudWatch Embedded Metric Format
    /// (on AWS they then reach CloudWatch from the logs alone); 0 turns this off.
    #[arg(
        long,
        env = "CHARACTERBOT_METRICS_EMF_INTERVAL_SECS",
        default_value_t = 0,
        global = true
    )]
    pub metrics_emf_interval_secs: u64,
    /// CloudWatch namespace of the EMF metrics.
    #[arg(
        long,
        env = "CHARACTERBOT_METRICS_EMF_NAMESPACE",
        default_value = "CharacterBot",
        global = true
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

#[derive(Debug, Clone, Args)]
pub struct AwsSettings {
    /// DynamoDB table of records and events.
    #[arg(
        long,
        env = "CHARACTERBOT_AWS_TABLE",
        default_value = "characterbot",
        global = true
    )]
    pub table: String,
    /// SQS queue of persona jobs (its dead-letter queue is `<name>-dlq`).
    #[arg(
        long,
        env = "CHARACTERBOT_AWS_PERSONA_QUEUE",
        default_value = "characterbot-persona",
        global = true
    )]
    pub persona_queue: String,
    /// SQS queue of chat jobs (its dead-letter queue is `<name>-dlq`).
    #[arg(
        long,
        env = "CHARACTERBOT_AWS_CHAT_QUEUE",
        default_value = "characterbot-chat",
        global = true
    )]
    pub chat_queue: String,
    /// How long the jobs of an accept may wait in the outbox for the API process that
    /// recorded them before a worker's sweep sends them (the API died between its DynamoDB
    /// transaction and its SQS send), in seconds.
    #[arg(
        long,
        env = "CHARACTERBOT_OUTBOX_SWEEP_AFTER_SECS",
        default_value_t = 30,
        global = true
    )]
    pub outbox_sweep_after_secs: u64,
    /// Longest one attempt of an SQS, DynamoDB or Cognito call may take, in seconds (an SQS
    /// receive gets its long-poll wait on top).
    #[arg(
        long,
        env = "CHARACTERBOT_AWS_ATTEMPT_TIMEOUT_SECS",
        default_value_t = 5,
        global = true
    )]
    pub aws_attempt_timeout_secs: u64,
    /// Longest one call may take with its retries, in seconds.
    #[arg(
        long,
        env = "CHARACTERBOT_AWS_OPERATION_TIMEOUT_SECS",
        default_value_t = 15,
        global = true
    )]
    pub aws_operation_timeout_secs: u64,
    /// Cognito user pool id.
    #[arg(long, env = "CHARACTERBOT_COGNITO_USER_POOL_ID", global = true)]
    pub cognito_user_pool_id: Option<String>,
    /// Cognito app client id.
    #[arg(long, env = "CHARACTERBOT_COGNITO_CLIENT_ID", global = true)]
    pub cognito_client_id: Option<String>,
    /// Cognito app client secret, for app clients that have one.
    #[arg(
        long,
        env = "CHARACTERBOT_COGNITO_CLIENT_SECRET",
        hide_env_values = true,
        global = true
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
        default_value_t = CognitoRefresh::GetTokens,
        global = true
    )]
    pub cognito_refresh: CognitoRefresh,
    /// URL of the pool's key set; default `https://cognito-idp.{region}.amazonaws.com/{pool}/.well-known/jwks.json`.
    #[arg(long, env = "CHARACTERBOT_JWKS_URL", global = true)]
    pub jwks_url: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ApiSettings {
    /// Address the HTTP API listens on.
    #[arg(
        long,
        env = "CHARACTERBOT_LISTEN",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    pub listen: String,
    /// Largest accepted request body, in bytes (larger → 413).
    #[arg(long, env = "CHARACTERBOT_MAX_BODY_BYTES", default_value_t = 64 * 1024, global = true)]
    pub max_body_bytes: usize,
    /// Longest persona prompt, in characters.
    #[arg(
        long,
        env = "CHARACTERBOT_MAX_PROMPT_CHARS",
        default_value_t = 500,
        global = true
    )]
    pub max_prompt_chars: usize,
    /// Longest chat message, in characters.
    #[arg(
        long,
        env = "CHARACTERBOT_MAX_MESSAGE_CHARS",
        default_value_t = 4000,
        global = true
    )]
    pub max_message_chars: usize,
    /// Most prompts in one batch.
    #[arg(
        long,
        env = "CHARACTERBOT_MAX_BATCH",
        default_value_t = 100,
        global = true
    )]
    pub max_batch: usize,
    /// Requests per minute one user may make to `/v1` (429 past it); 0 turns the limit off.
    #[arg(
        long,
        env = "CHARACTERBOT_RATE_LIMIT_PER_MINUTE",
        default_value_t = 600,
        global = true
    )]
    pub rate_limit_per_minute: u32,
    /// Longest long-poll wait on `GET /v1/requests/{id}?wait=`, in seconds.
    #[arg(
        long,
        env = "CHARACTERBOT_MAX_WAIT_SECS",
        default_value_t = 20,
        global = true
    )]
    pub max_wait_secs: u64,
    /// How long a request with an `Idempotency-Key` holds the key while it is handled, in
    /// seconds: a retry within it gets `409 idempotency_key_in_use`; after it (the first
    /// handler died) the retry takes the key over and derives the same ids. Accepting a
    /// request records the key's answer in the same step, so this only matters for a crash.
    #[arg(
        long,
        env = "CHARACTERBOT_IDEMPOTENCY_LOCK_SECS",
        default_value_t = 5,
        global = true
    )]
    pub idempotency_lock_secs: u64,
    /// How long an `Idempotency-Key` answer is kept, in hours.
    #[arg(
        long,
        env = "CHARACTERBOT_IDEMPOTENCY_TTL_HOURS",
        default_value_t = 24,
        global = true
    )]
    pub idempotency_ttl_hours: u64,
    /// Failed sign-ins (or refreshes) of one account that are free; each further one locks
    /// the account out for twice as long as the last (1 s … 15 min, `429`); 0 = no lockout.
    #[arg(
        long,
        env = "CHARACTERBOT_AUTH_FAILURES_PER_ACCOUNT",
        default_value_t = 5,
        global = true
    )]
    pub auth_failures_per_account: u32,
    /// The same, counted per client address across accounts.
    #[arg(
        long,
        env = "CHARACTERBOT_AUTH_FAILURES_PER_ADDRESS",
        default_value_t = 20,
        global = true
    )]
    pub auth_failures_per_address: u32,
    /// Take the client's address from the last entry of `X-Forwarded-For` (behind a load
    /// balancer that appends it, such as the ALB); otherwise the peer address is used.
    #[arg(
        long,
        env = "CHARACTERBOT_TRUST_FORWARDED_FOR",
        default_value_t = false,
        global = true
    )]
    pub trust_forwarded_for: bool,
    /// Longest wait for a request's headers, in seconds, counted from when the server starts
    /// waiting for them: on a new connection, and on a kept-alive one between requests (so it
    /// is also the idle timeout). The connection is closed past it.
    #[arg(
        long,
        env = "CHARACTERBOT_HEADER_READ_TIMEOUT_SECS",
        default_value_t = 10,
        global = true
    )]
    pub header_read_timeout_secs: u64,
    /// Longest wait for the next piece of a request body, in seconds (`408` past it).
    #[arg(
        long,
        env = "CHARACTERBOT_BODY_READ_TIMEOUT_SECS",
        default_value_t = 10,
        global = true
    )]
    pub body_read_timeout_secs: u64,
    /// Event streams and long polls one user may hold open at once (`429` past it).
    #[arg(
        long,
        env = "CHARACTERBOT_MAX_STREAMS_PER_USER",
        default_value_t = 10,
        global = true
    )]
    pub max_streams_per_user: usize,
    /// Longest life of an event stream, in seconds; it then ends cleanly and the client
    /// reconnects with `Last-Event-ID` (EventSource does so by itself).
    #[arg(
        long,
        env = "CHARACTERBOT_STREAM_MAX_SECS",
        default_value_t = 900,
        global = true
    )]
    pub stream_max_secs: u64,
    /// Open connections the API accepts at once; past it new connections are closed at once.
    #[arg(
        long,
        env = "CHARACTERBOT_MAX_CONNECTIONS",
        default_value_t = 10_000,
        global = true
    )]
    pub max_connections: usize,
    /// Serve `/metrics` on this address only (e.g. `127.0.0.1:9090`, or a port the load
    /// balancer does not route), instead of on the API's own.
    #[arg(long, env = "CHARACTERBOT_METRICS_LISTEN", global = true)]
    pub metrics_listen: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct WorkerSettings {
    /// Persona jobs one worker process runs at once. Jobs mostly wait on the model, and a
    /// worker receives and settles them in groups, so this can be high.
    #[arg(
        long,
        env = "CHARACTERBOT_PERSONA_CONCURRENCY",
        default_value_t = 32,
        global = true
    )]
    pub persona_concurrency: usize,
    /// Chat jobs one worker process runs at once.
    #[arg(
        long,
        env = "CHARACTERBOT_CHAT_CONCURRENCY",
        default_value_t = 32,
        global = true
    )]
    pub chat_concurrency: usize,
    /// How long a received message stays hidden from other consumers, in seconds. A worker
    /// extends it while a job runs; a dead worker's message reappears after it.
    #[arg(
        long,
        env = "CHARACTERBOT_VISIBILITY_TIMEOUT_SECS",
        default_value_t = 30,
        global = true
    )]
    pub visibility_timeout_secs: u64,
    /// Longest wait of one receive (long poll), in seconds; at most 20 (SQS's limit). Shutdown
    /// lets the receive in flight finish, so this also bounds how long a stop waits for it.
    /// The embedded queue caps its own wait at 1 s: an empty receive costs nothing there.
    #[arg(
        long,
        env = "CHARACTERBOT_RECEIVE_WAIT_SECS",
        default_value_t = 20,
        value_parser = clap::value_parser!(u64).range(0..=20),
        global = true
    )]
    pub receive_wait_secs: u64,
    /// Attempts (starts) of one job before it is dead-lettered and its request failed; a
    /// shutdown's hand-back is not an attempt.
    #[arg(
        long,
        env = "CHARACTERBOT_MAX_RECEIVES",
        default_value_t = 5,
        global = true
    )]
    pub max_receives: u32,
    /// First back-off before a failed job is retried from the queue, in milliseconds; it
    /// doubles with each delivery, with full jitter.
    #[arg(
        long,
        env = "CHARACTERBOT_RETRY_BASE_MS",
        default_value_t = 1000,
        global = true
    )]
    pub retry_base_ms: u64,
    /// Longest back-off between deliveries, in milliseconds.
    #[arg(
        long,
        env = "CHARACTERBOT_RETRY_MAX_MS",
        default_value_t = 60_000,
        global = true
    )]
    pub retry_max_ms: u64,
    /// Quick in-process retries of a transient model error before the job goes back to the queue.
    #[arg(
        long,
        env = "CHARACTERBOT_INPROCESS_RETRIES",
        default_value_t = 2,
        global = true
    )]
    pub inprocess_retries: usize,
    /// Longest a single job attempt may run before it counts as a transient failure, in seconds.
    #[arg(
        long,
        env = "CHARACTERBOT_JOB_TIMEOUT_SECS",
        default_value_t = 120,
        global = true
    )]
    pub job_timeout_secs: u64,
    /// Most past messages sent to the chat model as context.
    #[arg(
        long,
        env = "CHARACTERBOT_HISTORY_MESSAGES",
        default_value_t = 20,
        global = true
    )]
    pub history_messages: usize,
    /// Most characters of past messages sent to the chat model as context.
    #[arg(
        long,
        env = "CHARACTERBOT_HISTORY_CHARS",
        default_value_t = 12_000,
        global = true
    )]
    pub history_chars: usize,
    /// On shutdown, how long in-flight jobs may run before they are cancelled and released.
    #[arg(
        long,
        env = "CHARACTERBOT_SHUTDOWN_GRACE_SECS",
        default_value_t = 20,
        global = true
    )]
    pub shutdown_grace_secs: u64,
}

impl WorkerSettings {
    pub fn visibility_timeout(&self) -> Duration {
        Duration::from_secs(self.visibility_timeout_secs.max(1))
    }
}

#[derive(Debug, Clone, Args)]
pub struct AuthSettings {
    /// `iss` of the tokens the local issuer signs and the verifier accepts.
    #[arg(
        long,
        env = "CHARACTERBOT_AUTH_ISSUER",
        default_value = "characterbot-local",
        global = true
    )]
    pub issuer: String,
    /// App client id put in `client_id` (access tokens) and `aud` (ID tokens), and required.
    #[arg(
        long,
        env = "CHARACTERBOT_AUTH_CLIENT_ID",
        default_value = "characterbot-app",
        global = true
    )]
    pub client_id: String,
    /// Lifetime of access and ID tokens, in seconds.
    #[arg(
        long,
        env = "CHARACTERBOT_ACCESS_TOKEN_TTL_SECS",
        default_value_t = 3600,
        global = true
    )]
    pub access_token_ttl_secs: u64,
    /// Lifetime of refresh tokens, in days.
    #[arg(
        long,
        env = "CHARACTERBOT_REFRESH_TOKEN_TTL_DAYS",
        default_value_t = 30,
        global = true
    )]
    pub refresh_token_ttl_days: u64,
    /// Clock skew tolerated on `exp`, in seconds.
    #[arg(
        long,
        env = "CHARACTERBOT_AUTH_LEEWAY_SECS",
        default_value_t = 30,
        global = true
    )]
    pub leeway_secs: u64,
    /// Threads hashing passwords (argon2, ~19 MiB each); 0 = one per core. Four hashes per
    /// thread may wait; beyond that sign-in and sign-up answer `503` with `Retry-After`.
    #[arg(
        long,
        env = "CHARACTERBOT_AUTH_HASH_THREADS",
        default_value_t = 0,
        global = true
    )]
    pub auth_hash_threads: usize,
    /// Sessions (sign-ins with a live refresh token) one user may have at once on the
    /// embedded issuer; signing in once more ends the oldest.
    #[arg(
        long,
        env = "CHARACTERBOT_MAX_SESSIONS_PER_USER",
        default_value_t = 10,
        global = true
    )]
    pub max_sessions_per_user: usize,
    /// Shortest pause between two JWKS fetches caused by unknown key ids, in seconds.
    #[arg(
        long,
        env = "CHARACTERBOT_JWKS_REFETCH_COOLDOWN_SECS",
        default_value_t = 30,
        global = true
    )]
    pub jwks_refetch_cooldown_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PersonaModelChoice {
    /// OpenAI when `OPENAI_API_KEY` is set, the offline engine otherwise.
    Auto,
    /// Deterministic offline engine (no key, no network).
    Offline,
    /// OpenAI structured outputs (or any OpenAI-compatible server at `OPENAI_BASE_URL`).
    Openai,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ChatModelChoice {
    /// Bedrock when AWS credentials are configured, else OpenAI when `OPENAI_API_KEY` is set,
    /// else the offline engine.
    Auto,
    /// Deterministic offline engine (no key, no network).
    Offline,
    /// Amazon Bedrock (Nova) through `invoke_model`.
    Bedrock,
    /// OpenAI Chat Completions (or any OpenAI-compatible server at `OPENAI_BASE_URL`).
    Openai,
}

#[derive(Debug, Clone, Args)]
pub struct ModelSettings {
    /// Engine that turns prompts into personas.
    #[arg(
        long,
        env = "CHARACTERBOT_PERSONA_MODEL",
        value_enum,
        default_value = "auto",
        global = true
    )]
    pub persona_model: PersonaModelChoice,
    /// Engine that answers chat messages.
    #[arg(
        long,
        env = "CHARACTERBOT_CHAT_MODEL",
        value_enum,
        default_value = "auto",
        global = true
    )]
    pub chat_model: ChatModelChoice,
    /// Artificial latency of the offline engine, in milliseconds (to try timeouts, kills and
    /// streaming by hand; 0 in normal use).
    #[arg(
        long,
        env = "CHARACTERBOT_OFFLINE_DELAY_MS",
        default_value_t = 0,
        global = true
    )]
    pub offline_delay_ms: u64,
    /// OpenAI API key; setting it makes `auto` choose OpenAI.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true, global = true)]
    pub openai_api_key: Option<String>,
    /// Base URL of the OpenAI API, or of any OpenAI-compatible server (llama.cpp, Ollama, vLLM).
    #[arg(
        long,
        env = "OPENAI_BASE_URL",
        default_value = "https://api.openai.com/v1",
        global = true
    )]
    pub openai_base_url: String,
    /// OpenAI organization id, if the key belongs to several.
    #[arg(long, env = "OPENAI_ORG_ID", global = true)]
    pub openai_org_id: Option<String>,
    /// Model of the persona agent on OpenAI.
    #[arg(
        long,
        env = "CHARACTERBOT_OPENAI_PERSONA_MODEL",
        default_value = "gpt-4o-mini",
        global = true
    )]
    pub openai_persona_model: String,
    /// Model of the chat on OpenAI.
    #[arg(
        long,
        env = "CHARACTERBOT_OPENAI_CHAT_MODEL",
        default_value = "gpt-4o-mini",
        global = true
    )]
    pub openai_chat_model: String,
    /// Bedrock model id of the chat.
    #[arg(
        long,
        env = "CHARACTERBOT_BEDROCK_MODEL_ID",
        default_value = "amazon.nova-micro-v1:0",
        global = true
    )]
    pub bedrock_model_id: String,
    /// Stream Bedrock replies (`invoke_model_with_response_stream`), pushing each fragment to
    /// the user's event stream as `message.delta`.
    #[arg(long, env = "CHARACTERBOT_BEDROCK_STREAM", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub bedrock_stream: bool,
    /// Sampling temperature of chat replies.
    #[arg(
        long,
        env = "CHARACTERBOT_TEMPERATURE",
        default_value_t = 0.7,
        global = true
    )]
    pub temperature: f32,
    /// Nucleus sampling (`topP`) of chat replies.
    #[arg(long, env = "CHARACTERBOT_TOP_P", default_value_t = 0.9, global = true)]
    pub top_p: f32,
    /// Time limit of one provider call, in seconds.
    #[arg(
        long,
        env = "CHARACTERBOT_MODEL_TIMEOUT_SECS",
        default_value_t = 60,
        global = true
    )]
    pub model_timeout_secs: u64,
    /// Most tokens a provider may write for one persona or reply.
    #[arg(
        long,
        env = "CHARACTERBOT_MAX_OUTPUT_TOKENS",
        default_value_t = 800,
        global = true
    )]
    pub max_output_tokens: u32,
}

impl ModelSettings {
    /// The OpenAI key, if one is configured (an empty value counts as none).
    pub fn openai_key(&self) -> Option<&str> {
        self.openai_api_key
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty())
    }
}
