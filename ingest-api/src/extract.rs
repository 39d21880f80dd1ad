//! Extractors, so that no handler parses headers or formats an error by hand.
//!
//! - [`AppJson`], [`AppQuery`], [`AppPath`]: axum's own, with rejections turned into
//!   [`ApiError`]s.
//! - [`Caller`]: the authenticated user, put in the request by the auth middleware.

use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use shared::auth::AuthUser;

use crate::error::ApiError;

#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct AppJson<T>(pub T);

impl<T: serde::Serialize> IntoResponse for AppJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct AppQuery<T>(pub T);

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct AppPath<T>(pub T);

/// The verified caller of a `/v1` request.
#[derive(Debug, Clone)]
pub struct Caller(pub AuthUser);

impl Caller {
    pub fn id(&self) -> &str {
        &self.0.user_id
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<AuthUser>()
            .cloned()
            .map(Caller)
            .ok_or_else(|| ApiError::Unauthorized("authentication required".into()))
    }
}
