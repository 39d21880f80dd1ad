//! Sign-up, sign-in and token refresh. These are the only `/v1` routes without a bearer token.
//! Failed sign-ins and refreshes count against the account (or token) and the client's address
//! (`crate::throttle`); a locked-out caller gets `429` before any password is checked.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shared::auth::Tokens;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::extract::{AppJson, Caller, ClientAddr};
use crate::throttle::Key;
use crate::AppState;

#[derive(Debug, Deserialize, ToSchema)]
pub struct Credentials {
    pub email: String,
    /// 8 to 256 characters.
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SignedUp {
    pub user_id: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ConfirmRequest {
    pub email: String,
    /// The code Cognito sent by e-mail (the embedded issuer needs none: any code confirms).
    pub code: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Confirmed {
    pub confirmed: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

/// Token responses must not be cached by anything in between (RFC 6749 §5.1).
const NO_STORE: [(HeaderName, &str); 2] = [
    (header::CACHE_CONTROL, "no-store"),
    (header::PRAGMA, "no-cache"),
];

fn auth_error(e: shared::Error) -> ApiError {
    match e {
        shared::Error::Invalid(message) => ApiError::BadRequest {
            code: "invalid_credentials_format",
            message,
        },
        shared::Error::Conflict(message) => ApiError::Conflict {
            code: "email_taken",
            message,
        },
        other => other.into(),
    }
}

#[utoipa::path(post, path = "/v1/auth/signup", tag = "auth", request_body = Credentials,
    responses((status = 201, body = SignedUp), (status = 400), (status = 409), (status = 503, description = "too many sign-ups at once")))]
pub async fn sign_up(
    State(state): State<AppState>,
    AppJson(body): AppJson<Credentials>,
) -> Result<(StatusCode, AppJson<SignedUp>), ApiError> {
    let user_id = state
        .ports
        .identity
        .sign_up(body.email.trim(), &body.password)
        .await
        .map_err(auth_error)?;
    tracing::info!(%user_id, "user signed up");
    Ok((StatusCode::CREATED, AppJson(SignedUp { user_id })))
}

#[utoipa::path(post, path = "/v1/auth/confirm", tag = "auth", request_body = ConfirmRequest,
    responses((status = 200, body = Confirmed), (status = 400)))]
pub async fn confirm(
    State(state): State<AppState>,
    AppJson(body): AppJson<ConfirmRequest>,
) -> Result<AppJson<Confirmed>, ApiError> {
    state
        .ports
        .identity
        .confirm(body.email.trim(), body.code.trim())
        .await
        .map_err(auth_error)?;
    Ok(AppJson(Confirmed { confirmed: true }))
}

#[utoipa::path(post, path = "/v1/auth/signin", tag = "auth", request_body = Credentials,
    responses((status = 200, body = Tokens), (status = 401), (status = 429, description = "too many failed attempts"), (status = 503, description = "too many sign-ins at once")))]
pub async fn sign_in(
    State(state): State<AppState>,
    ClientAddr(addr): ClientAddr,
    AppJson(body): AppJson<Credentials>,
) -> Result<([(HeaderName, &'static str); 2], AppJson<Tokens>), ApiError> {
    let email = body.email.trim();
    let keys = throttle_keys(Key::Account(email.to_lowercase()), addr);
    let tokens = throttled(
        &state,
        &keys,
        state.ports.identity.sign_in(email, &body.password),
    )
    .await?;
    Ok((NO_STORE, AppJson(tokens)))
}

/// The keys a sign-in or refresh counts against: the account first, then the address.
fn throttle_keys(account: Key, addr: Option<std::net::IpAddr>) -> Vec<Key> {
    std::iter::once(account)
        .chain(addr.map(Key::Address))
        .collect()
}

/// Runs `attempt` unless one of `keys` is locked out; counts its failure, or clears the
/// account's count on success.
async fn throttled<T>(
    state: &AppState,
    keys: &[Key],
    attempt: impl std::future::Future<Output = shared::Result<T>>,
) -> Result<T, ApiError> {
    state
        .throttle
        .check(keys)
        .map_err(|retry_after| ApiError::TooManyAttempts { retry_after })?;
    match attempt.await {
        Ok(out) => {
            state.throttle.succeeded(&keys[0]);
            Ok(out)
        }
        Err(e @ shared::Error::Unauthorized(_)) => {
            state.throttle.failed(keys);
            Err(auth_error(e))
        }
        Err(e) => Err(auth_error(e)),
    }
}

#[utoipa::path(post, path = "/v1/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses((status = 200, body = Tokens), (status = 401), (status = 429, description = "too many failed attempts"), (status = 503, description = "too many sign-ins at once")))]
pub async fn refresh(
    State(state): State<AppState>,
    ClientAddr(addr): ClientAddr,
    AppJson(body): AppJson<RefreshRequest>,
) -> Result<([(HeaderName, &'static str); 2], AppJson<Tokens>), ApiError> {
    // Counted by the token's hash: the token itself is a secret, and this map is memory.
    let token = Sha256::digest(body.refresh_token.as_bytes());
    let keys = throttle_keys(Key::Account(format!("refresh:{token:x}")), addr);
    let refresh = state.ports.identity.refresh(&body.refresh_token);
    Ok((NO_STORE, AppJson(throttled(&state, &keys, refresh).await?)))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct SignOutRequest {
    pub refresh_token: String,
}

/// Ends one session: its refresh token, and every token refreshed from it, stop working.
/// Access tokens already issued stay valid until they expire (at most
/// `CHARACTERBOT_ACCESS_TOKEN_TTL_SECS`): they are checked by signature, not looked up.
#[utoipa::path(post, path = "/v1/auth/signout", tag = "auth", request_body = SignOutRequest,
    responses((status = 204, description = "the session is over (also for an unknown token)")))]
pub async fn sign_out(
    State(state): State<AppState>,
    AppJson(body): AppJson<SignOutRequest>,
) -> Result<StatusCode, ApiError> {
    state
        .ports
        .identity
        .sign_out(&body.refresh_token)
        .await
        .map_err(auth_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Ends every session of the caller (on Cognito, `GlobalSignOut`).
#[utoipa::path(post, path = "/v1/auth/signout/all", tag = "auth",
    responses((status = 204, description = "every session of the caller is over")),
    security(("bearer" = [])))]
pub async fn sign_out_everywhere(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .map(|(_, token)| token.trim())
        .unwrap_or_default();
    state
        .ports
        .identity
        .sign_out_everywhere(caller.id(), token)
        .await
        .map_err(auth_error)?;
    tracing::info!(user_id = caller.id(), "signed out everywhere");
    Ok(StatusCode::NO_CONTENT)
}
