//! Sign-up, sign-in and token refresh. These are the only `/v1` routes without a bearer token.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use shared::auth::Tokens;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::extract::AppJson;
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
    responses((status = 201, body = SignedUp), (status = 400), (status = 409)))]
pub async fn sign_up(
    State(state): State<AppState>,
    AppJson(body): AppJson<Credentials>,
) -> Result<(StatusCode, AppJson<SignedUp>), ApiError> {
    let user_id = state
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
        .identity
        .confirm(body.email.trim(), body.code.trim())
        .await
        .map_err(auth_error)?;
    Ok(AppJson(Confirmed { confirmed: true }))
}

#[utoipa::path(post, path = "/v1/auth/signin", tag = "auth", request_body = Credentials,
    responses((status = 200, body = Tokens), (status = 401)))]
pub async fn sign_in(
    State(state): State<AppState>,
    AppJson(body): AppJson<Credentials>,
) -> Result<AppJson<Tokens>, ApiError> {
    let tokens = state
        .identity
        .sign_in(body.email.trim(), &body.password)
        .await
        .map_err(auth_error)?;
    Ok(AppJson(tokens))
}

#[utoipa::path(post, path = "/v1/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses((status = 200, body = Tokens), (status = 401)))]
pub async fn refresh(
    State(state): State<AppState>,
    AppJson(body): AppJson<RefreshRequest>,
) -> Result<AppJson<Tokens>, ApiError> {
    Ok(AppJson(
        state
            .identity
            .refresh(&body.refresh_token)
            .await
            .map_err(auth_error)?,
    ))
}
