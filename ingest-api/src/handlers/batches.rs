//! Batches: many persona prompts in one call, as users of OpenAI's Batch API expect: each item
//! may carry the client's own `custom_id`; a batch is listed, followed by its counts and
//! `status`, read back whole in one call (`/results`), and cancelled as a whole.
//!
//! A batch is its requests (one per prompt, each queued and run like a single one) plus a
//! record naming them; counts and status are derived from the requests when read, so nothing
//! has to keep them in step.

use std::collections::{HashMap, HashSet};

use axum::extract::State;
use axum::response::Response;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use shared::atomic::Accept;
use shared::domain::{
    Batch, BatchStatus, ErrorBody, Persona, RequestInput, RequestKind, RequestRecord,
    RequestResult, RequestStatus,
};
use shared::ids::{BatchId, RequestId};
use shared::store::token;
use utoipa::{IntoParams, ToSchema};

use super::personas::check_prompt;
use super::{accept, job_for, ListResponse, PageQuery};
use crate::error::ApiError;
use crate::extract::{AppJson, AppPath, AppQuery, Caller, Claim, Trace};
use crate::AppState;

/// Longest `custom_id` (OpenAI's batch input allows 64 characters too).
pub const CUSTOM_ID_MAX_CHARS: usize = 64;

/// Most results in one page; a default-sized batch (100) comes back whole in one call.
pub const RESULTS_MAX_LIMIT: usize = 1000;

/// One item of a batch: a prompt with the client's name for it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchItem {
    /// 1 to 64 characters, unique within the batch; given back with the item's result.
    #[schema(min_length = 1, max_length = 64)]
    pub custom_id: String,
    /// As `prompt` of `POST /v1/personas`.
    #[schema(min_length = 1)]
    pub prompt: String,
}

/// `prompts` or `items`, not both.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateBatch {
    /// 1 to `CHARACTERBOT_MAX_BATCH` prompts (their results are named by position).
    #[serde(default)]
    pub prompts: Option<Vec<String>>,
    /// 1 to `CHARACTERBOT_MAX_BATCH` prompts with a `custom_id` each.
    #[serde(default)]
    pub items: Option<Vec<BatchItem>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchAccepted {
    #[schema(value_type = String)]
    pub batch_id: BatchId,
    /// One per prompt, in the order given.
    #[schema(value_type = Vec<String>)]
    pub request_ids: Vec<RequestId>,
}

#[utoipa::path(post, path = "/v1/personas/batch", tag = "batches", request_body = CreateBatch,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: the same key and body answer the same batch")),
    responses((status = 202, body = BatchAccepted), (status = 400), (status = 401), (status = 413),
        (status = 422, description = "a `custom_id` given twice (`duplicate_custom_id`)")),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    claim: Claim,
    trace: Trace,
    AppJson(body): AppJson<CreateBatch>,
) -> Result<Response, ApiError> {
    let items = checked_items(&state, body)?;
    let ids = claim.ids(caller.id());
    let batch_id: BatchId = ids.id("batch");
    let requests: Vec<RequestRecord> = items
        .into_iter()
        .enumerate()
        .map(|(i, (custom_id, prompt))| RequestRecord {
            custom_id,
            ..RequestRecord::with_id(
                ids.id(&format!("request/{i}")),
                RequestKind::Persona,
                RequestInput::Persona { prompt },
                Some(batch_id.clone()),
            )
        })
        .collect();
    let request_ids: Vec<RequestId> = requests.iter().map(|r| r.request_id.clone()).collect();
    let batch = Batch::new(batch_id.clone(), request_ids.clone());
    let jobs = requests
        .iter()
        .map(|r| job_for(caller.id(), r, &trace))
        .collect();
    let total = requests.len();
    let work = Accept {
        user_id: caller.id().to_owned(),
        kind: RequestKind::Persona,
        requests,
        jobs,
        batch: Some(batch),
        message: None,
        answer: None,
    };
    let answer = BatchAccepted {
        batch_id: batch_id.clone(),
        request_ids,
    };
    let response = accept(&state, &claim, work, &answer).await?;
    tracing::info!(%batch_id, total, "batch queued");
    Ok(response)
}

#[utoipa::path(get, path = "/v1/batches", tag = "batches", params(PageQuery),
    responses((status = 200, body = ListResponse<Batch>, description = "Newest first"), (status = 400), (status = 401)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    AppQuery(q): AppQuery<PageQuery>,
) -> Result<AppJson<ListResponse<Batch>>, ApiError> {
    let page = state
        .ports
        .store
        .list_batches(caller.id(), q.limit()?, q.next_token.as_deref())
        .await?;
    Ok(AppJson(ListResponse {
        items: page.items,
        next_token: page.next_token,
    }))
}

#[utoipa::path(get, path = "/v1/batches/{id}", tag = "batches", params(("id" = String, Path)),
    responses((status = 200, body = Batch), (status = 401), (status = 404)), security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<BatchId>,
) -> Result<AppJson<Batch>, ApiError> {
    read_batch(&state, &caller, &id).await.map(AppJson)
}

/// `?limit=&next_token=` of a batch's results.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ResultsQuery {
    /// 1 to 1000; 1000 when absent.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// The `next_token` of the previous page.
    pub next_token: Option<String>,
}

/// One item's outcome.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchResult {
    /// The item's `custom_id`; absent for a batch given as `prompts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_id: Option<String>,
    /// Its position in the batch, from 0.
    pub index: usize,
    #[schema(value_type = String)]
    pub request_id: RequestId,
    pub status: RequestStatus,
    /// The persona made, once `succeeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persona: Option<Persona>,
    /// Why it failed, once `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// A page of a batch's results, in the batch's order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchResults {
    #[schema(value_type = String)]
    pub batch_id: BatchId,
    pub status: BatchStatus,
    pub items: Vec<BatchResult>,
    pub next_token: Option<String>,
}

#[utoipa::path(get, path = "/v1/batches/{id}/results", tag = "batches",
    params(("id" = String, Path), ResultsQuery),
    responses((status = 200, body = BatchResults, description = "Every item with its status, persona or error, in the batch's order"),
        (status = 400), (status = 401), (status = 404)),
    security(("bearer" = [])))]
pub async fn results(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<BatchId>,
    AppQuery(q): AppQuery<ResultsQuery>,
) -> Result<AppJson<BatchResults>, ApiError> {
    let limit = match q.limit {
        None => RESULTS_MAX_LIMIT,
        Some(n @ 1..=RESULTS_MAX_LIMIT) => n,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_limit",
                format!("limit must be 1 to {RESULTS_MAX_LIMIT}"),
            ))
        }
    };
    let from = match q.next_token.as_deref() {
        None => 0,
        Some(t) => token::decode(t)
            .and_then(|s| s.strip_prefix("results:")?.parse::<usize>().ok())
            .ok_or_else(|| {
                ApiError::bad_request("invalid_next_token", "next_token is not valid")
            })?,
    };
    let batch = read_batch(&state, &caller, &id).await?;
    let ids = batch.request_ids.get(from..).unwrap_or_default();
    let ids = &ids[..ids.len().min(limit)];
    let records = state.ports.store.batch_requests(caller.id(), ids).await?;
    let mut found: HashMap<RequestId, RequestRecord> = records
        .into_iter()
        .map(|r| (r.request_id.clone(), r))
        .collect();
    let items = ids
        .iter()
        .enumerate()
        .filter_map(|(i, id)| found.remove(id).map(|r| result_of(from + i, r)))
        .collect();
    let end = from + ids.len();
    Ok(AppJson(BatchResults {
        batch_id: batch.batch_id,
        status: batch.status,
        items,
        next_token: (end < batch.request_ids.len())
            .then(|| token::encode(&format!("results:{end}"))),
    }))
}

fn result_of(index: usize, r: RequestRecord) -> BatchResult {
    BatchResult {
        index,
        custom_id: r.custom_id,
        request_id: r.request_id,
        status: r.status,
        persona: match r.result {
            Some(RequestResult::Persona(p)) => Some(p),
            _ => None,
        },
        error: r.error,
    }
}

#[utoipa::path(post, path = "/v1/batches/{id}/cancel", tag = "batches", params(("id" = String, Path)),
    responses((status = 200, body = Batch, description = "Its queued items are `cancelled` (they will not run); running ones stop within about a second; finished ones stay as they are. Cancelling again, or a batch already finished, changes nothing."),
        (status = 401), (status = 404)),
    security(("bearer" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<BatchId>,
) -> Result<AppJson<Batch>, ApiError> {
    let store = &state.ports.store;
    let batch = read_batch(&state, &caller, &id).await?;
    // Nothing left to cancel: the batch stays as it ended (`completed` is not rewritten).
    if batch.pending == 0 {
        return Ok(AppJson(batch));
    }
    if !store.mark_batch_cancelled(caller.id(), &id).await? {
        return Err(ApiError::NotFound("batch"));
    }
    let open: Vec<RequestId> = store
        .batch_requests(caller.id(), &batch.request_ids)
        .await?
        .into_iter()
        .filter(|r| !r.status.is_final())
        .map(|r| r.request_id)
        .collect();
    // A few at a time: each is its own conditional write (and, when running, a signal to its
    // worker), as `POST /v1/requests/{id}/cancel` does.
    let user_id = caller.id();
    futures::stream::iter(open)
        .map(|request_id| {
            let atomic = state.ports.atomic.clone();
            async move { atomic.cancel(user_id, &request_id).await }
        })
        .buffer_unordered(8)
        .try_collect::<Vec<_>>()
        .await?;
    tracing::info!(batch_id = %id, "batch cancelled");
    read_batch(&state, &caller, &id).await.map(AppJson)
}

async fn read_batch(state: &AppState, caller: &Caller, id: &BatchId) -> Result<Batch, ApiError> {
    state
        .ports
        .store
        .get_batch(caller.id(), id)
        .await?
        .ok_or(ApiError::NotFound("batch"))
}

/// The batch's items (custom id, prompt), each prompt checked as a single one would be; an
/// error names the first bad item by its index.
fn checked_items(
    state: &AppState,
    body: CreateBatch,
) -> Result<Vec<(Option<String>, String)>, ApiError> {
    let (field, items): (&str, Vec<(Option<String>, String)>) = match (body.prompts, body.items) {
        (Some(prompts), None) => ("prompts", prompts.into_iter().map(|p| (None, p)).collect()),
        (None, Some(items)) => (
            "items",
            items
                .into_iter()
                .map(|i| (Some(i.custom_id), i.prompt))
                .collect(),
        ),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_batch",
                "give `prompts` (a list of prompts) or `items` (a list of {custom_id, prompt}), one of the two",
            ))
        }
    };
    let max = state.options.max_batch;
    if items.is_empty() {
        return Err(ApiError::bad_request(
            "empty_batch",
            format!("`{field}` must hold at least one prompt"),
        ));
    }
    if items.len() > max {
        return Err(ApiError::bad_request(
            "too_many_prompts",
            format!("a batch holds at most {max} prompts; got {}", items.len()),
        ));
    }
    let mut seen = HashSet::new();
    items
        .into_iter()
        .enumerate()
        .map(|(i, (custom_id, prompt))| {
            let at = |e: ApiError| match e {
                ApiError::BadRequest { code, message } => ApiError::BadRequest {
                    code,
                    message: format!("{field}[{i}]: {message}"),
                },
                ApiError::Unprocessable { code, message } => ApiError::Unprocessable {
                    code,
                    message: format!("{field}[{i}]: {message}"),
                },
                other => other,
            };
            if let Some(id) = &custom_id {
                check_custom_id(id, &mut seen).map_err(at)?;
            }
            Ok((custom_id, check_prompt(state, &prompt).map_err(at)?))
        })
        .collect()
}

/// Why `id` cannot be a `custom_id`, if it cannot (the batch client checks its input with
/// this too, before sending).
pub fn custom_id_problem(id: &str) -> Option<String> {
    let chars = id.chars().count();
    (chars == 0 || chars > CUSTOM_ID_MAX_CHARS || id.chars().any(char::is_control)).then(|| {
        format!(
            "custom_id must be 1 to {CUSTOM_ID_MAX_CHARS} characters, without control characters"
        )
    })
}

fn check_custom_id(id: &str, seen: &mut HashSet<String>) -> Result<(), ApiError> {
    if let Some(problem) = custom_id_problem(id) {
        return Err(ApiError::bad_request("invalid_custom_id", problem));
    }
    // 422: each item fits the schema (which cannot say "unique by one field"); together they
    // cannot be processed.
    if !seen.insert(id.to_owned()) {
        return Err(ApiError::Unprocessable {
            code: "duplicate_custom_id",
            message: format!("custom_id {id:?} is given twice"),
        });
    }
    Ok(())
}
