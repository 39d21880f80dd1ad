//! The token flags: what the embedded issuer signs ([`LocalIssuerOptions`]) and what the JWKS
//! verifier of either backend tolerates.

use std::time::Duration;

use clap::Args;
use shared::auth::local::LocalIssuerOptions;

#[derive(Debug, Clone, Args)]
pub struct AuthSettings {
    /// `iss` of the tokens the local issuer signs and the verifier accepts.
    #[arg(
        long,
        env = "CHARACTERBOT_AUTH_ISSUER",
        default_value = "characterbot-local"
    )]
    pub issuer: String,
    /// App client id put in `client_id` (access tokens) and `aud` (ID tokens), and required.
    #[arg(
        long,
        env = "CHARACTERBOT_AUTH_CLIENT_ID",
        default_value = "characterbot-app"
    )]
    pub client_id: String,
    /// Lifetime of access and ID tokens, in seconds.
    #[arg(
        long,
        env = "CHARACTERBOT_ACCESS_TOKEN_TTL_SECS",
        default_value_t = 3600
    )]
    pub access_token_ttl_secs: u64,
    /// Lifetime of refresh tokens, in days.
    #[arg(
        long,
        env = "CHARACTERBOT_REFRESH_TOKEN_TTL_DAYS",
        default_value_t = 30
    )]
    pub refresh_token_ttl_days: u64,
    /// Clock skew tolerated on `exp`, in seconds.
    #[arg(long, env = "CHARACTERBOT_AUTH_LEEWAY_SECS", default_value_t = 30)]
    pub leeway_secs: u64,
    /// Threads hashing passwords (argon2, ~19 MiB each); 0 = one per core. Four hashes per
    /// thread may wait; beyond that sign-in and sign-up answer `503` with `Retry-After`.
    #[arg(long, env = "CHARACTERBOT_AUTH_HASH_THREADS", default_value_t = 0)]
    pub auth_hash_threads: usize,
    /// Sessions (sign-ins with a live refresh token) one user may have at once on the
    /// embedded issuer; signing in once more ends the oldest.
    #[arg(long, env = "CHARACTERBOT_MAX_SESSIONS_PER_USER", default_value_t = 10)]
    pub max_sessions_per_user: usize,
    /// Shortest pause between two JWKS fetches caused by unknown key ids, in seconds.
    #[arg(
        long,
        env = "CHARACTERBOT_JWKS_REFETCH_COOLDOWN_SECS",
        default_value_t = 30
    )]
    pub jwks_refetch_cooldown_secs: u64,
}

impl AuthSettings {
    /// Clock skew the verifier tolerates on `exp`.
    pub fn leeway(&self) -> Duration {
        Duration::from_secs(self.leeway_secs)
    }

    /// Shortest pause between two key-set fetches for unknown key ids.
    pub fn jwks_refetch_cooldown(&self) -> Duration {
        Duration::from_secs(self.jwks_refetch_cooldown_secs)
    }
}

impl From<&AuthSettings> for LocalIssuerOptions {
    fn from(a: &AuthSettings) -> Self {
        LocalIssuerOptions {
            issuer: a.issuer.clone(),
            client_id: a.client_id.clone(),
            access_token_ttl: Duration::from_secs(a.access_token_ttl_secs),
            refresh_token_ttl: Duration::from_secs(a.refresh_token_ttl_days.saturating_mul(86_400)),
            hash_threads: a.auth_hash_threads,
            max_sessions_per_user: a.max_sessions_per_user,
        }
    }
}
