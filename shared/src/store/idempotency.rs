//! The idempotency port: `Idempotency-Key` claims and the answer stored for each. The store
//! keeps the answer as the API hands it over ([`StoredAnswer`]) and never reads it: what the
//! answer means (an HTTP status and body) is the API's business.

use std::time::Duration;

use async_trait::async_trait;

use crate::Result;

/// A claim of an idempotency key for one request.
#[derive(Debug, Clone, Copy)]
pub struct KeyClaim<'a> {
    pub user_id: &'a str,
    pub key: &'a str,
    /// What identifies the request: the same key with another fingerprint is a mismatch.
    pub fingerprint: &'a str,
    /// A claim older than this is considered abandoned (its handler died) and may be taken
    /// over.
    pub lock: Duration,
    /// How long the key, and then its answer, is kept.
    pub ttl: Duration,
}

impl KeyClaim<'_> {
    pub(crate) fn lock_ms(&self) -> i64 {
        millis(self.lock)
    }

    pub(crate) fn ttl_ms(&self) -> i64 {
        millis(self.ttl)
    }
}

/// Whole milliseconds, saturating: the stores count time in `i64` ms.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The answer recorded for a key, replayed to a repeated request as it was stored: a code and
/// a body the store does not interpret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub code: u16,
    pub body: String,
}

/// What an `Idempotency-Key` lookup found.
#[derive(Debug, Clone, PartialEq)]
pub enum IdempotencyBegin {
    /// First use (or an abandoned claim taken over): the caller handles the request and then
    /// completes or releases the key. `first_ms` is when the key was first claimed, the same
    /// on a takeover, so ids derived from it come out the same on a retry. `claim` names this
    /// claim (the time it was taken, in ms; a takeover is always later): completing or
    /// releasing the key takes it, so a handler whose claim was taken over changes nothing.
    Started { first_ms: i64, claim: i64 },
    /// Already answered: replay this.
    Replay(StoredAnswer),
    /// The first request with this key is still being handled.
    InFlight,
    /// The key was used with a different request.
    Mismatch,
}

#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims an idempotency key for a request.
    async fn idempotency_begin(&self, claim: KeyClaim<'_>) -> Result<IdempotencyBegin>;
    /// Stores the answer to replay for the key, if `claim` still holds it.
    async fn idempotency_complete(
        &self,
        user_id: &str,
        key: &str,
        claim: i64,
        answer: &StoredAnswer,
    ) -> Result<()>;
    /// Forgets a claim whose request failed without an answer worth replaying, if `claim`
    /// still holds the key.
    async fn idempotency_release(&self, user_id: &str, key: &str, claim: i64) -> Result<()>;
}
