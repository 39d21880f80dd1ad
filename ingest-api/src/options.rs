//! What the API reads: plain values, durations as [`Duration`]. The binary builds them from its
//! flags (`characterbot::cli`), so this crate never sees how they were given.

use std::time::Duration;

/// The limits and timeouts of the HTTP API.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// Largest accepted request body, in bytes (larger → `413`).
    pub max_body_bytes: usize,
    /// Longest persona prompt, in characters.
    pub max_prompt_chars: usize,
    /// Longest chat message, in characters.
    pub max_message_chars: usize,
    /// Most prompts in one batch.
    pub max_batch: usize,
    /// Requests per minute one user may make to `/v1` (`429` past it); 0 = no limit.
    pub rate_limit_per_minute: u32,
    /// Longest long-poll wait on `GET /v1/requests/{id}?wait=`.
    pub max_wait: Duration,
    /// How long a request with an `Idempotency-Key` holds the key while it is handled.
    pub idempotency_lock: Duration,
    /// How long an `Idempotency-Key` answer is kept.
    pub idempotency_ttl: Duration,
    /// Free failed sign-ins of one account before lockouts begin; 0 = no lockout.
    pub auth_failures_per_account: u32,
    /// The same, per client address across accounts.
    pub auth_failures_per_address: u32,
    /// Take the client's address from the last entry of `X-Forwarded-For`.
    pub trust_forwarded_for: bool,
    /// Longest wait for a request's headers, also the idle timeout (at least 1 s is used).
    pub header_read_timeout: Duration,
    /// Longest wait for the next piece of a request body (`408` past it; at least 1 s).
    pub body_read_timeout: Duration,
    /// Event streams and long polls one user may hold open at once.
    pub max_streams_per_user: usize,
    /// Longest life of an event stream (at least 1 s).
    pub stream_max: Duration,
    /// Open connections accepted at once.
    pub max_connections: usize,
    /// `/metrics` has a listener of its own, so the API's listener answers it `404`.
    pub metrics_on_own_listener: bool,
}
