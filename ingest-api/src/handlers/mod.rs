//! Handlers, one module per resource. Each is a short function of extractors that validates,
//! calls the store (or, to accept work, [`accept`]), and returns a body; errors are `ApiError`s.

pub mod auth;
pub mod batches;
pub mod conversations;
pub mod events;
pub mod ops;
pub mod pages;
pub mod personas;
pub mod requests;
pub mod sync;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use shared::atomic::{Accept, AcceptOutcome, Answer};
use shared::domain::{RequestInput, RequestKind, RequestRecord, RequestStatus};
use shared::ids::RequestId;
use shared::job::{Job, TraceContext};
use shared::queue::Outgoing;
use utoipa::{IntoParams, ToSchema};

use crate::error::ApiError;
use crate::extract::{Claim, Trace};
use crate::middleware::{replay, stored_answer, AnswerRecorded};
use crate::AppState;

/// What a text field must hold besides blanks, as the OpenAPI document's `pattern`. Blanks are
/// the four ASCII ones only: JSON Schema's regular expressions (ECMAScript's) and the test
/// generators' (Python's) disagree on which Unicode characters `\s` matches, and the document
/// must say exactly what the API accepts.
pub const NOT_BLANK: &str = "[^ \t\r\n]";

/// A blank of [`NOT_BLANK`]: trimmed from text fields, and all a rejected one holds.
pub fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// A JSON Schema `integer` as a count: JSON Schema counts `2.0` as an integer, so the API takes
/// it as 2 (serde alone refuses it).
pub fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    use serde::de::Error;
    let n = serde_json::Number::deserialize(d)?;
    n.as_u64()
        .or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && (0.0..=u32::MAX as f64).contains(f))
                .map(|f| f as u64)
        })
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| D::Error::custom("expected a whole number from 0"))
}

/// `?limit=&next_token=` of every listing.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// 1 to 100; 20 when absent.
    #[param(minimum = 1, maximum = 100)]
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
    #[schema(value_type = String)]
    pub request_id: RequestId,
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
    let trimmed = value.trim_matches(is_blank);
    if trimmed.is_empty() {
        return Err(ApiError::bad_request(
            empty_code,
            format!("`{field}` must not be empty"),
        ));
    }
    // As sent: the OpenAPI document's `maxLength` counts the same characters.
    let n = value.chars().count();
    if n > max {
        return Err(ApiError::bad_request(
            long_code,
            format!("`{field}` is {n} characters; the limit is {max}"),
        ));
    }
    Ok(trimmed.to_owned())
}

/// The queue message of a request's job, traced to this call.
pub fn job_for(user_id: &str, request: &RequestRecord, trace: &Trace) -> Outgoing {
    let job = Job {
        request_id: request.request_id.clone(),
        user_id: user_id.to_owned(),
        kind: request.kind,
        trace: TraceContext {
            http_request_id: Some(trace.http_request_id.clone()),
            trace_id: Some(trace.trace_id.clone()),
        },
        accepted: Some(request.clone()),
    }
    .encode();
    // A conversation's turns are answered one at a time, in the order accepted: each reply
    // sees the one before it (see `shared::queue`).
    match &request.input {
        RequestInput::Chat {
            conversation_id, ..
        } => job.in_group(conversation_id.as_str()),
        RequestInput::Persona { .. } => job,
    }
}

/// Accepts work in one step (records, jobs and the idempotency key's answer: see
/// `shared::atomic`) and answers `202` with `body`; or replays the answer of an earlier call
/// with the same key that got there first.
pub async fn accept<T: Serialize>(
    state: &AppState,
    claim: &Claim,
    mut accept: Accept,
    body: &T,
) -> Result<Response, ApiError> {
    let json = serde_json::to_string(body).map_err(|e| ApiError::Internal(Box::new(e)))?;
    accept.answer = claim.0.as_ref().map(|c| Answer {
        key: c.key.clone(),
        fingerprint: c.fingerprint.clone(),
        stored: stored_answer(StatusCode::ACCEPTED, json.clone()),
        ttl: c.ttl,
    });
    // A single request is noted for its long polls (see `EventBus::known_request`).
    let noted = match accept.requests.as_slice() {
        [one] => Some((accept.user_id.clone(), one.clone())),
        _ => None,
    };
    let (kind, ids): (RequestKind, Vec<RequestId>) = (
        accept.kind,
        accept
            .requests
            .iter()
            .map(|r| r.request_id.clone())
            .collect(),
    );
    match state.ports.atomic.accept(accept).await? {
        AcceptOutcome::Recorded => {
            if let Some((user_id, record)) = &noted {
                state.ports.events.note_accepted(user_id, record);
            }
            for request_id in ids {
                tracing::info!(%request_id, %kind, "request queued");
            }
            let mut response = (
                StatusCode::ACCEPTED,
                [(header::CONTENT_TYPE, "application/json")],
                json,
            )
                .into_response();
            if claim.0.is_some() {
                response.extensions_mut().insert(AnswerRecorded);
            }
            Ok(response)
        }
        AcceptOutcome::Replay(answer) => Ok(replay(answer)),
    }
}
