//! The HTTP API's flags, and the [`ingest_api::ApiOptions`] they become.

use std::time::Duration;

use clap::Args;
use ingest_api::ApiOptions;

#[derive(Debug, Clone, Args)]
pub struct ApiSettings {
    /// Address the HTTP API listens on.
    #[arg(long, env = "CHARACTERBOT_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Largest accepted request body, in bytes (larger → 413).
    #[arg(long, env = "CHARACTERBOT_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Longest persona prompt, in characters.
    #[arg(long, env = "CHARACTERBOT_MAX_PROMPT_CHARS", default_value_t = 500)]
    pub max_prompt_chars: usize,
    /// Longest chat message, in characters.
    #[arg(long, env = "CHARACTERBOT_MAX_MESSAGE_CHARS", default_value_t = 4000)]
    pub max_message_chars: usize,
    /// Most prompts in one batch.
    #[arg(long, env = "CHARACTERBOT_MAX_BATCH", default_value_t = 100)]
    pub max_batch: usize,
    /// Requests per minute one user may make to `/v1` (429 past it); 0 turns the limit off.
    #[arg(
        long,
        env = "CHARACTERBOT_RATE_LIMIT_PER_MINUTE",
        default_value_t = 600
    )]
    pub rate_limit_per_minute: u32,
    /// Longest long-poll wait on `GET /v1/requests/{id}?wait=`, in seconds.
    #[arg(long, env = "CHARACTERBOT_MAX_WAIT_SECS", default_value_t = 20)]
    pub max_wait_secs: u64,
    /// How long a request with an `Idempotency-Key` holds the key while it is handled, in
    /// seconds: a retry within it gets `409 idempotency_key_in_use`; after it (the first
    /// handler died) the retry takes the key over and derives the same ids. Accepting a
    /// request records the key's answer in the same step, so this only matters for a crash.
    #[arg(long, env = "CHARACTERBOT_IDEMPOTENCY_LOCK_SECS", default_value_t = 5)]
    pub idempotency_lock_secs: u64,
    /// How long an `Idempotency-Key` answer is kept, in hours.
    #[arg(long, env = "CHARACTERBOT_IDEMPOTENCY_TTL_HOURS", default_value_t = 24)]
    pub idempotency_ttl_hours: u64,
    /// Failed sign-ins (or refreshes) of one account that are free; each further one locks
    /// the account out for twice as long as the last (1 s … 15 min, `429`); 0 = no lockout.
    #[arg(
        long,
        env = "CHARACTERBOT_AUTH_FAILURES_PER_ACCOUNT",
        default_value_t = 5
    )]
    pub auth_failures_per_account: u32,
    /// The same, counted per client address across accounts.
    #[arg(
        long,
        env = "CHARACTERBOT_AUTH_FAILURES_PER_ADDRESS",
        default_value_t = 20
    )]
    pub auth_failures_per_address: u32,
    /// Take the client's address from the last entry of `X-Forwarded-For` (behind a load
    /// balancer that appends it, such as the ALB); otherwise the peer address is used.
    #[arg(
        long,
        env = "CHARACTERBOT_TRUST_FORWARDED_FOR",
        default_value_t = false
    )]
    pub trust_forwarded_for: bool,
    /// Longest wait for a request's headers, in seconds, counted from when the server starts
    /// waiting for them: on a new connection, and on a kept-alive one between requests (so it
    /// is also the idle timeout). The connection is closed past it.
    #[arg(
        long,
        env = "CHARACTERBOT_HEADER_READ_TIMEOUT_SECS",
        default_value_t = 10
    )]
    pub header_read_timeout_secs: u64,
    /// Longest wait for the next piece of a request body, in seconds (`408` past it).
    #[arg(
        long,
        env = "CHARACTERBOT_BODY_READ_TIMEOUT_SECS",
        default_value_t = 10
    )]
    pub body_read_timeout_secs: u64,
    /// Event streams and long polls one user may hold open at once (`429` past it).
    #[arg(long, env = "CHARACTERBOT_MAX_STREAMS_PER_USER", default_value_t = 10)]
    pub max_streams_per_user: usize,
    /// Longest life of an event stream, in seconds; it then ends cleanly and the client
    /// reconnects with `Last-Event-ID` (EventSource does so by itself).
    #[arg(long, env = "CHARACTERBOT_STREAM_MAX_SECS", default_value_t = 900)]
    pub stream_max_secs: u64,
    /// Open connections the API accepts at once; past it new connections are closed at once.
    #[arg(long, env = "CHARACTERBOT_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Serve `/metrics` on this address only (e.g. `127.0.0.1:9090`, or a port the load
    /// balancer does not route), instead of on the API's own.
    #[arg(long, env = "CHARACTERBOT_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
}

impl From<&ApiSettings> for ApiOptions {
    fn from(a: &ApiSettings) -> Self {
        ApiOptions {
            max_body_bytes: a.max_body_bytes,
            max_prompt_chars: a.max_prompt_chars,
            max_message_chars: a.max_message_chars,
            max_batch: a.max_batch,
            rate_limit_per_minute: a.rate_limit_per_minute,
            max_wait: Duration::from_secs(a.max_wait_secs),
            idempotency_lock: Duration::from_secs(a.idempotency_lock_secs),
            idempotency_ttl: Duration::from_secs(a.idempotency_ttl_hours.saturating_mul(3600)),
            auth_failures_per_account: a.auth_failures_per_account,
            auth_failures_per_address: a.auth_failures_per_address,
            trust_forwarded_for: a.trust_forwarded_for,
            header_read_timeout: Duration::from_secs(a.header_read_timeout_secs),
            body_read_timeout: Duration::from_secs(a.body_read_timeout_secs),
            max_streams_per_user: a.max_streams_per_user,
            stream_max: Duration::from_secs(a.stream_max_secs),
            max_connections: a.max_connections,
            metrics_on_own_listener: a.metrics_listen.is_some(),
        }
    }
}
