//! The poll endpoint of asynchronous jobs, with optional long polling, and their cancel.

use std::time::Duration;

use axum::extract::State;
use futures::StreamExt;
use serde::Deserialize;
use shared::domain::{RequestRecord, RequestStatus};
use shared::ids::RequestId;
use utoipa::IntoParams;

use crate::error::ApiError;
use crate::extract::{AppJson, AppPath, AppQuery, Caller};
use crate::AppState;

/// A long poll waits for its request's `request.updated` events. It starts from what this
/// process last knew of the request (its own accept, or an update that passed through) or
/// else one read; it reads again only this often, a safety check for an event that went
/// astray (on AWS, an announcement lost with a worker that died just after committing), and
/// once at the end if nothing since its start confirmed the state it answers.
const RECHECK: Duration = Duration::from_secs(5);

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Seconds to wait for the request to finish before answering (0 to 20).
    pub wait: Option<u64>,
}

#[utoipa::path(post, path = "/v1/requests/{id}/cancel", tag = "requests", params(("id" = String, Path)),
    responses(
        (status = 200, body = RequestRecord, description = "Queued: now `cancelled` (its job will not run). \
            Running: `cancel_requested`; its worker stops it within about a second and it ends `cancelled`, \
            a chat reply keeping what was written of it. Cancelled already: as it is."),
        (status = 404),
        (status = 409, description = "it had finished (`request_finished`)")),
    security(("bearer" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<RequestId>,
) -> Result<AppJson<RequestRecord>, ApiError> {
    let record = state
        .ports
        .atomic
        .cancel(caller.id(), &id)
        .await?
        .ok_or(ApiError::NotFound("request"))?;
    match record.status {
        RequestStatus::Succeeded | RequestStatus::Failed => Err(ApiError::Conflict {
            code: "request_finished",
            message: format!(
                "the request had {} already; there is nothing to cancel",
                record.status.as_str()
            ),
        }),
        _ => Ok(AppJson(record)),
    }
}

#[utoipa::path(get, path = "/v1/requests/{id}", tag = "requests", params(("id" = String, Path), WaitQuery),
    responses((status = 200, body = RequestRecord), (status = 404)), security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<RequestId>,
    AppQuery(q): AppQuery<WaitQuery>,
) -> Result<AppJson<RequestRecord>, ApiError> {
    let wait = Duration::from_secs(q.wait.unwrap_or(0)).min(state.options.max_wait);
    let read = || async {
        state
            .ports
            .store
            .get_request(caller.id(), &id)
            .await?
            .ok_or(ApiError::NotFound("request"))
    };
    if wait.is_zero() {
        return Ok(AppJson(read().await?));
    }
    let max = state.options.max_streams_per_user;
    let _slot = state
        .slots
        .take(caller.id(), max)
        .ok_or(ApiError::TooManyStreams(max))?;
    // Watch first, then read, so a change between the two is not missed.
    let mut events = state.ports.events.watch_request(caller.id(), &id).await?;
    let deadline = tokio::time::Instant::now() + wait;
    // Whether `record` is confirmed: read, or from an update since the watch began.
    let (mut record, mut confirmed) = match state.ports.events.known_request(caller.id(), &id) {
        Some(known) if known.status.is_final() => return Ok(AppJson(known)),
        Some(known) => (known, false),
        None => (read().await?, true),
    };
    while !record.status.is_final() {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break;
        }
        let nap = RECHECK.min(deadline - now);
        tokio::select! {
            _ = state.shutdown.cancelled() => break,
            _ = tokio::time::sleep(nap) => {}
            event = events.next() => {
                let Some(event) = event else { break };
                // An update carries the whole record, as committed: no need to read it back.
                if let shared::events::Event::RequestUpdated(updated) = &event.event {
                    if updated.request_id == id {
                        record = (**updated).clone();
                        confirmed = true;
                        continue;
                    }
                }
            }
        }
        record = read().await?;
        confirmed = true;
    }
    if !confirmed {
        record = read().await?;
    }
    Ok(AppJson(record))
}
