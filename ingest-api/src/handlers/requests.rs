//! The poll endpoint of asynchronous jobs, with optional long polling.

use std::time::Duration;

use axum::extract::State;
use futures::StreamExt;
use serde::Deserialize;
use shared::domain::RequestRecord;
use shared::ids::RequestId;
use utoipa::IntoParams;

use crate::error::ApiError;
use crate::extract::{AppJson, AppPath, AppQuery, Caller};
use crate::AppState;

/// A long poll waits for its request's `request.updated` events and reads the record only
/// once, at the start; it reads it again only this often, a safety check for an event that
/// went astray (on AWS, an announcement lost with a worker that died just after committing).
const RECHECK: Duration = Duration::from_secs(5);

#[derive(Debug, Deserialize, IntoParams)]
pub struct WaitQuery {
    /// Seconds to wait for the request to finish before answering (0 to 20).
    pub wait: Option<u64>,
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
    let mut record = read().await?;
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
                        continue;
                    }
                }
            }
        }
        record = read().await?;
    }
    Ok(AppJson(record))
}
