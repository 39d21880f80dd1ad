//! Handlers, one module per resource. Each is a short function of extractors that validates,
//! calls the store or the queue, and returns a body; errors are `ApiError`s.

pub mod auth;
pub mod conversations;
pub mod events;
pub mod ops;
pub mod personas;
pub mod requests;

use serde::{Deserialize, Serialize};
use shared::domain::{JobMessage, RequestKind, RequestRecord, RequestStatus};
use shared::queue::{attr, Outgoing};
use shared::store::Transition;
use utoipa::{IntoParams, ToSchema};

use crate::error::ApiError;
use crate::extract::Trace;
use crate::AppState;

/// `?limit=&next_token=` of every listing.
#[derive(Debug, Deserialize, IntoParams)]
pub struct PageQuery {
    /// 1 to 100; 20 when absent.
    pub limit: Option<usize>,
    /// The `next_token` of the previous page.
    pub next_token: Option<String>,
}

impl PageQuery {
    pub fn limit(&self) -> Result<usize, ApiError> {
        match self.limit {
            None => Ok(20),
            Some(n @ 1..=100) => Ok(n),
            Some(_) => Err(ApiError::bad_request(
                "invalid_limit",
                "limit must be 1 to 100",
            )),
        }
    }
}

/// A page of records.
#[derive(Debug, Serialize, ToSchema)]
pub struct ListResponse<T> {
    pub items: Vec<T>,
    pub next_token: Option<String>,
}

/// `202 Accepted` for a queued job.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    pub request_id: String,
    pub status: RequestStatus,
}

/// Checks a free-text field: not blank, not longer than `max` characters. Returns it trimmed.
pub fn check_text(
    value: &str,
    field: &str,
    max: usize,
    empty_code: &'static str,
    long_code: &'static str,
) -> Result<String, ApiError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(ApiError::bad_request(
            empty_code,
            format!("`{field}` must not be empty"),
        ));
    }
    let n = trimmed.chars().count();
    if n > max {
        return Err(ApiError::bad_request(
            long_code,
            format!("`{field}` is {n} characters; the limit is {max}"),
        ));
    }
    Ok(trimmed.to_owned())
}

/// Puts the jobs of freshly stored requests on their queue, each with its request and trace ids
/// as message attributes. If the queue refuses, the requests are marked failed (the client gets
/// a 503 and may retry) so none waits forever.
pub async fn enqueue(
    state: &AppState,
    user_id: &str,
    kind: RequestKind,
    requests: &[RequestRecord],
    trace: &Trace,
) -> Result<(), ApiError> {
    let bodies = requests
        .iter()
        .map(|r| {
            let body = serde_json::to_string(&JobMessage {
                request_id: r.request_id.clone(),
                user_id: user_id.to_owned(),
                kind,
            })?;
            Ok(Outgoing::new(body)
                .with(attr::REQUEST_ID, &r.request_id)
                .with(attr::HTTP_REQUEST_ID, &trace.http_request_id)
                .with(attr::TRACE_ID, &trace.trace_id))
        })
        .collect::<Result<Vec<_>, serde_json::Error>>()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let queue = state.queue(kind);
    // Queues take at most 10 messages per call on SQS; chunk here so both backends behave alike.
    for (chunk, records) in bodies.chunks(10).zip(requests.chunks(10)) {
        if let Err(e) = queue.send(chunk).await {
            for r in records {
                let error = shared::domain::ErrorBody {
                    code: "enqueue_failed".into(),
                    message: "the request could not be queued; send it again".into(),
                };
                let _ = state
                    .store
                    .transition(&r.request_id, Transition::Fail { error })
                    .await;
            }
            return Err(ApiError::Unavailable(format!(
                "enqueue on {}: {e}",
                queue.name()
            )));
        }
    }
    for r in requests {
        tracing::info!(request_id = %r.request_id, %kind, "request queued");
    }
    Ok(())
}
