//! Middleware of the `/v1` routes, applied in this order:
//!
//! 1. [`authenticate`]: verifies the bearer token (or `?access_token=` for browsers'
//!    `EventSource`, which cannot set headers), applies the per-user rate limit, and puts the
//!    caller into the request for the [`Caller`](crate::extract::Caller) extractor.
//! 2. [`idempotency`]: replays the stored answer of a repeated `Idempotency-Key`.
//!
//! And on every route, [`track`] counts requests and latency for `/metrics`, and
//! [`log_server_errors`] logs the detail of `5xx` answers.

use std::time::{Duration, Instant};

use axum::body::{to_bytes, Body};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use sha2::{Digest, Sha256};
use shared::auth::AuthUser;
use shared::error::Report;
use shared::metrics::{HttpLabels, RouteLabels};
use shared::store::{IdempotencyBegin, KeyClaim, StoredAnswer};

use crate::error::{ApiError, Refused, ServerErrorDetail};
use crate::token_cache::TokenCache;
use crate::AppState;

const MAX_KEY_LEN: usize = 255;

/// A claimed `Idempotency-Key`, put into the request for the handler: accepting handlers record
/// the key's answer in the same step as the work (see `shared::atomic`) and derive their ids
/// from it.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    pub key: String,
    pub fingerprint: String,
    pub first_ms: i64,
    pub ttl: Duration,
}

/// Put into a response by a handler that recorded the key's answer itself.
#[derive(Debug, Clone, Copy)]
pub struct AnswerRecorded;

/// What the store keeps as a key's answer: the response's status code and body. The store
/// does not read them; [`replay`] turns them back into a response.
pub fn stored_answer(status: StatusCode, body: String) -> StoredAnswer {
    StoredAnswer {
        code: status.as_u16(),
        body,
    }
}

/// The stored answer to a repeated key.
pub fn replay(answer: StoredAnswer) -> Response {
    let status = StatusCode::from_u16(answer.code).unwrap_or(StatusCode::OK);
    let mut response = (status, answer.body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

fn bearer(req: &Request) -> Option<String> {
    if let Some(value) = req.headers().get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned());
    }
    if req.uri().path() == "/v1/events" {
        let query = req.uri().query()?;
        return query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == "access_token").then(|| v.to_owned())
        });
    }
    None
}

pub async fn authenticate(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let token = bearer(&req).ok_or_else(|| {
        ApiError::Unauthorized("missing `Authorization: Bearer <access token>` header".into())
    })?;
    let key = TokenCache::key(&token);
    let cached = state.tokens.get(&key);
    let fresh = cached.is_none();
    let user: AuthUser = match cached {
        Some(user) => user,
        None => state
            .ports
            .verifier
            .verify(&token)
            .await
            .map_err(|e| match e {
                shared::Error::Unauthorized(reason) => ApiError::Unauthorized(reason),
                other => ApiError::from(other),
            })?,
    };
    if let Some(limiter) = &state.limiter {
        if let Err(not_until) = limiter.check_key(&user.user_id) {
            let retry_after = not_until.wait_time_from(DefaultClock::default().now());
            return Err(ApiError::RateLimited { retry_after });
        }
    }
    // Remembered only once admitted: see `crate::token_cache`.
    if fresh {
        state.tokens.put(key, user.clone());
    }
    req.extensions_mut().insert(user);
    Ok(next.run(req).await)
}

/// Printable ASCII, spaces included, as the IETF draft's key (a structured-field string) is.
fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_LEN && key.bytes().all(|b| (b' '..=b'~').contains(&b))
}

/// Idempotency keys, as Stripe and the IETF draft define them: scoped to the user; the first
/// answer (2xx or 4xx) is stored and replayed for a repeat with the same body; the same key
/// with another method, path or body is a 422; a repeat while the first is still being handled
/// is a 409. A 5xx answer is not stored, nor a refusal of the request's form (`413`, `415`, `408`,
/// a body or query that does not parse), so the client may retry with the same key.
pub async fn idempotency(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(key) = requested_key(&req)? else {
        return Ok(next.run(req).await);
    };
    let user = req
        .extensions()
        .get::<AuthUser>()
        .cloned()
        .ok_or_else(|| ApiError::Unauthorized("authentication required".into()))?;
    let (parts, body) = req.into_parts();
    let bytes = to_bytes(body, state.options.max_body_bytes)
        .await
        .map_err(|_| ApiError::PayloadTooLarge("request body is too large".into()))?;
    let fingerprint = fingerprint(&parts.method, parts.uri.path(), &bytes);
    let claim = KeyClaim {
        user_id: &user.user_id,
        key: &key,
        fingerprint: &fingerprint,
        lock: state.options.idempotency_lock,
        ttl: state.options.idempotency_ttl,
    };

    match state.ports.store.idempotency_begin(claim).await? {
        IdempotencyBegin::Replay(answer) => Ok(replay(answer)),
        IdempotencyBegin::InFlight => Err(ApiError::Conflict {
            code: "idempotency_key_in_use",
            message: "a request with this Idempotency-Key is still being handled".into(),
        }),
        IdempotencyBegin::Mismatch => Err(ApiError::Unprocessable {
            code: "idempotency_key_reused",
            message: "this Idempotency-Key was used for a different request".into(),
        }),
        IdempotencyBegin::Started { first_ms, claim } => {
            let mut req = Request::from_parts(parts, Body::from(bytes));
            req.extensions_mut().insert(IdempotencyClaim {
                key: key.clone(),
                fingerprint,
                first_ms,
                ttl: state.options.idempotency_ttl,
            });
            let response = next.run(req).await;
            settle_key(&state, &user.user_id, &key, claim, response).await
        }
    }
}

/// The `Idempotency-Key` of a `POST` or `PATCH` (an edit queues a new answer), if it has
/// one; a malformed key is a `400`.
fn requested_key(req: &Request) -> Result<Option<String>, ApiError> {
    if req.method() != Method::POST && req.method() != Method::PATCH {
        return Ok(None);
    }
    // An empty key is no key (some HTTP clients send a header they were given no value for).
    let Some(key) = req
        .headers()
        .get("idempotency-key")
        .filter(|k| !k.is_empty())
    else {
        return Ok(None);
    };
    let key = key.to_str().ok().filter(|k| valid_key(k)).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_idempotency_key",
            format!("Idempotency-Key must be 1 to {MAX_KEY_LEN} printable ASCII characters"),
        )
    })?;
    Ok(Some(key.to_owned()))
}

/// What a key is checked against on a repeat: the method, the path and the body.
fn fingerprint(method: &Method, path: &str, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(method.as_str());
    hasher.update(b" ");
    hasher.update(path);
    hasher.update(b"\n");
    hasher.update(body);
    format!("{:x}", hasher.finalize())
}

/// Records `response` as the key's answer, or releases the key when it is no answer to keep.
async fn settle_key(
    state: &AppState,
    user_id: &str,
    key: &str,
    claim: i64,
    response: Response,
) -> Result<Response, ApiError> {
    let status = response.status();
    let store = &state.ports.store;
    // Neither a failure nor a refusal of the request's form is the key's answer: the client
    // may retry (or fix the body and retry) with the same key.
    if status.is_server_error() || response.extensions().get::<Refused>().is_some() {
        store.idempotency_release(user_id, key, claim).await?;
        return Ok(response);
    }
    if response.extensions().get::<AnswerRecorded>().is_some() {
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let bytes = to_bytes(body, usize::MAX).await.map_err(|e| {
        ApiError::Internal(shared::Error::internal("buffering a response", e).into())
    })?;
    let answer = stored_answer(status, String::from_utf8_lossy(&bytes).into_owned());
    store
        .idempotency_complete(user_id, key, claim, &answer)
        .await?;
    Ok(Response::from_parts(parts, Body::from(bytes)))
}

/// Most of an oversized body read and thrown away before answering `413` (see below).
const DRAIN_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Longest time spent throwing it away.
const DRAIN_MAX_TIME: Duration = Duration::from_secs(10);

/// Refuses a body whose `Content-Length` is over the limit with `413`, after reading it (up
/// to 16 MiB, for at most 10 s). Most mobile HTTP stacks write the whole body before they
/// read the answer; a server that answers and closes while the body is still arriving makes
/// the kernel reset the connection, and such a client sees a reset instead of the `413`.
/// Bigger bodies, and bodies that do not announce their length, are cut short as before.
pub async fn refuse_large_bodies(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let limit = state.options.max_body_bytes as u64;
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let Some(length) = length.filter(|n| *n > limit) else {
        return next.run(req).await;
    };
    if length <= DRAIN_MAX_BYTES {
        let mut body = req.into_body().into_data_stream();
        let drain = async { while let Some(Ok(_)) = futures::StreamExt::next(&mut body).await {} };
        let _ = tokio::time::timeout(DRAIN_MAX_TIME, drain).await;
    }
    ApiError::PayloadTooLarge(format!("request body is too large (at most {limit} bytes)"))
        .into_response()
}

/// Counts every response by method, route template and status, and times it.
/// Logs what a `5xx` answer left out for the client (an error's detail): here, in the
/// request's span, rather than as a side effect of turning an error into a response.
pub async fn log_server_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    if let Some(ServerErrorDetail(source)) = response.extensions().get() {
        // The whole chain, formatted here only: a 5xx is rare, its log line worth the cost.
        let detail = Report(&**source);
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(%detail, "dependency unavailable");
        } else {
            tracing::error!(%detail, status = response.status().as_u16(), "internal error");
        }
    }
    response
}

pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    // A label from a fixed set: a client can send any method name, and each new label value
    // is a new series (and, through EMF, a new billed CloudWatch metric).
    let method = match *req.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
    .to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(req).await;
    state
        .ports
        .metrics
        .http_requests
        .get_or_create(&HttpLabels {
            method,
            route: route.clone(),
            status: response.status().as_u16(),
        })
        .inc();
    // Streams (SSE) and long polls would skew the latency histogram.
    if route != "/v1/events" && route != "/v1/requests/{id}" {
        state
            .ports
            .metrics
            .http_duration
            .get_or_create(&RouteLabels { route })
            .observe(started.elapsed().as_secs_f64());
    }
    response
}

/// Keeps a keyed rate limiter from growing without bound.
pub fn spawn_limiter_housekeeping(state: &AppState) {
    if let Some(limiter) = state.limiter.clone() {
        let shutdown = state.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => limiter.retain_recent(),
                }
            }
        });
    }
}
