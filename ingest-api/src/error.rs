//! The API's one error type. Every failure a client can see is a variant here, and
//! [`IntoResponse`] turns it into the documented shape:
//! `{"error": {"code": "snake_case_code", "message": "human text"}}` with the right status.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use shared::error::BoxError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: malformed or invalid input.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("{0}")]
    Unauthorized(String),
    /// 403: authenticated but not allowed yet (an unconfirmed account).
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    /// 404: absent, or somebody else's (the two are indistinguishable on purpose).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// 405: the path has no such method (the `Allow` header lists those it has).
    #[error("this path does not take that method")]
    MethodNotAllowed,
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// 410: a position (a sync cursor) older than what is kept.
    #[error("{message}")]
    Gone { code: &'static str, message: String },
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 408: the body stopped arriving.
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: well-formed but not acceptable.
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    #[error("too many requests; retry in {} s", .retry_after.as_secs().max(1))]
    RateLimited { retry_after: Duration },
    /// 429: the user holds as many event streams and long polls as allowed.
    #[error("too many open event streams and long polls (at most {0}); close one first")]
    TooManyStreams(usize),
    /// 429: too many failed sign-ins or refreshes from this account or address.
    #[error("too many failed attempts; retry in {} s", .retry_after.as_secs().max(1))]
    TooManyAttempts { retry_after: Duration },
    /// 503: the server is at its bound for this work (password hashing); nothing was done.
    #[error("{message}")]
    Busy {
        message: String,
        retry_after: Duration,
    },
    /// 503: a dependency (store, queue) is unavailable; safe to retry. The client is told
    /// only that; the failure is the source, for the log.
    #[error("the service is temporarily unavailable; retry shortly")]
    Unavailable(#[source] BoxError),
    /// 500: the client is told nothing more; the failure is the source, for the log.
    #[error("internal error")]
    Internal(#[source] BoxError),
}

/// Put into the response of a request refused before its handler could look at it (a body
/// that is not JSON, too large, too slow; a malformed path or query): not an answer to
/// remember under an `Idempotency-Key`, since the client will fix the request and retry.
#[derive(Debug, Clone, Copy)]
pub struct Refused;

impl ApiError {
    /// Whether this error is such a refusal (see [`Refused`]).
    fn is_refusal(&self) -> bool {
        match self {
            ApiError::PayloadTooLarge(_)
            | ApiError::UnsupportedMediaType(_)
            | ApiError::RequestTimeout => true,
            ApiError::BadRequest { code, .. } => matches!(
                *code,
                "malformed_json" | "invalid_body" | "invalid_query" | "invalid_path"
            ),
            _ => false,
        }
    }

    /// The store's errors as the API's, with its `NotFound` naming `what` was not found.
    pub fn not_found_as(what: &'static str) -> impl Fn(shared::Error) -> ApiError {
        move |e| match e {
            shared::Error::NotFound => ApiError::NotFound(what),
            other => other.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden { code, .. } => (StatusCode::FORBIDDEN, code),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Conflict { code, .. } => (StatusCode::CONFLICT, code),
            ApiError::Gone { code, .. } => (StatusCode::GONE, code),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::Unprocessable { code, .. } => (StatusCode::UNPROCESSABLE_ENTITY, code),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::TooManyStreams(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_streams"),
            ApiError::TooManyAttempts { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_attempts")
            }
            ApiError::Busy { .. } => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

/// What a `5xx` answer left out for the client: the failure, with its sources, for the log
/// (see `IntoResponse` below). Formatted only where it is logged.
#[derive(Debug, Clone)]
pub struct ServerErrorDetail(pub Arc<dyn std::error::Error + Send + Sync>);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        // `Display` is the client's message: a 5xx's says nothing of its source.
        let body =
            Json(serde_json::json!({ "error": { "code": code, "message": self.to_string() } }));
        let mut response = (status, body).into_response();
        if self.is_refusal() {
            response.extensions_mut().insert(Refused);
        }
        if let ApiError::RateLimited { retry_after }
        | ApiError::TooManyAttempts { retry_after }
        | ApiError::Busy { retry_after, .. } = &self
        {
            // Rounded up: a client that waits what it is told is not refused again.
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        // The detail of a server-side failure is for operators, not clients: it rides on the
        // response for `middleware::log_server_errors`, which logs it inside the request's span.
        if let ApiError::Internal(source) | ApiError::Unavailable(source) = self {
            response
                .extensions_mut()
                .insert(ServerErrorDetail(Arc::from(source)));
        }
        response
    }
}

impl From<shared::Error> for ApiError {
    fn from(e: shared::Error) -> Self {
        use shared::Error as E;
        match e {
            E::NotFound => ApiError::NotFound("resource"),
            E::Conflict(message) => ApiError::Conflict {
                code: "conflict",
                message,
            },
            E::PersonaDeleted => ApiError::Conflict {
                code: "persona_deleted",
                message: "the conversation's persona was deleted: the conversation can be read, \
                          but takes no new messages"
                    .into(),
            },
            E::Invalid(message) => ApiError::BadRequest {
                code: "invalid_request",
                message,
            },
            E::Expired(message) => ApiError::Gone {
                code: "cursor_expired",
                message,
            },
            E::Unauthorized(message) => ApiError::Unauthorized(message),
            E::NotConfirmed(message) => ApiError::Forbidden {
                code: "user_not_confirmed",
                message,
            },
            E::PasswordResetRequired(message) => ApiError::Forbidden {
                code: "password_reset_required",
                message,
            },
            // Kept whole as the source: the log shows its chain, the client none of it.
            e @ (E::Storage { .. } | E::Queue { .. }) => ApiError::Unavailable(Box::new(e)),
            E::Busy {
                message,
                retry_after,
            } => ApiError::Busy {
                message,
                retry_after,
            },
            E::Throttled { retry_after } => ApiError::TooManyAttempts { retry_after },
            other => ApiError::Internal(Box::new(other)),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::JsonSyntaxError(e) => ApiError::bad_request(
                "malformed_json",
                format!("request body is not valid JSON: {}", e.body_text()),
            ),
            JsonRejection::JsonDataError(e) => ApiError::bad_request("invalid_body", e.body_text()),
            JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType(
                "send the body as JSON with `Content-Type: application/json`".into(),
            ),
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::PayloadTooLarge("request body is too large".into())
            }
            JsonRejection::BytesRejection(e) if timed_out(&e) => ApiError::RequestTimeout,
            other => ApiError::bad_request("invalid_body", other.body_text()),
        }
    }
}

/// Whether reading the body failed because it stopped arriving (the body-read timeout).
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(e) = source {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        source = e.source();
    }
    false
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::bad_request("invalid_query", r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::bad_request("invalid_path", r.body_text())
    }
}

#[cfg(test)]
mod tests {
    use shared::error::Report;

    use super::*;

    /// Status and body a domain error becomes.
    async fn answer(e: shared::Error) -> (StatusCode, serde_json::Value) {
        let response = ApiError::from(e).into_response();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        (status, serde_json::from_slice(&body).expect("json body"))
    }

    #[tokio::test]
    async fn a_server_error_tells_the_client_nothing_and_leaves_the_detail_for_the_log() {
        let response = ApiError::Internal("disk on fire at /var/db".into()).into_response();
        assert_eq!(
            response
                .extensions()
                .get::<ServerErrorDetail>()
                .map(|d| d.0.to_string())
                .as_deref(),
            Some("disk on fire at /var/db")
        );
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        assert!(!String::from_utf8_lossy(&body).contains("disk"));
        let refused = ApiError::bad_request("empty_prompt", "empty").into_response();
        assert!(refused.extensions().get::<ServerErrorDetail>().is_none());
    }

    #[test]
    fn the_logged_detail_of_a_storage_failure_carries_its_source() {
        let e = shared::Error::storage(
            "dynamodb get",
            std::io::Error::other("connection reset by peer"),
        );
        let response = ApiError::from(e).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let detail = response
            .extensions()
            .get::<ServerErrorDetail>()
            .map(|d| Arc::clone(&d.0))
            .expect("a detail");
        assert_eq!(
            Report(&*detail).to_string(),
            "storage error: dynamodb get: connection reset by peer"
        );
        let source = std::error::Error::source(&*detail).expect("the storage error's source");
        assert!(source.downcast_ref::<std::io::Error>().is_some());
    }

    #[tokio::test]
    async fn server_errors_answer_the_same_bodies_whatever_their_source() {
        let cause = || std::io::Error::other("disk on fire at /var/db");
        let (status, body) = answer(shared::Error::queue("sqs send", cause())).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            serde_json::json!({ "error": { "code": "unavailable",
                "message": "the service is temporarily unavailable; retry shortly" } })
        );
        let (status, body) = answer(shared::Error::config("http client", cause())).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            body,
            serde_json::json!({ "error": { "code": "internal", "message": "internal error" } })
        );
    }

    #[tokio::test]
    async fn a_required_password_reset_is_a_403_with_its_own_code() {
        let (status, body) = answer(shared::Error::PasswordResetRequired(
            "set a new password".into(),
        ))
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(body["error"]["code"], "password_reset_required");
        assert_eq!(body["error"]["message"], "set a new password");
    }
}
