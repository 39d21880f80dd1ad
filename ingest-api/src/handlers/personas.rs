//! Personas: created asynchronously from a prompt (one or a batch), then listed, read, edited,
//! deleted.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use shared::atomic::Accept;
use shared::domain::{
    Batch, Persona, PersonaEdit, RequestInput, RequestKind, RequestRecord, RequestStatus,
};
use shared::ids::{BatchId, PersonaId, RequestId};
use utoipa::ToSchema;

use super::{accept, check_text, job_for, Accepted, ListResponse, PageQuery};
use crate::error::ApiError;
use crate::extract::{AppJson, AppPath, AppQuery, Caller, Claim, Trace};
use crate::AppState;

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreatePersona {
    /// A famous character ("Sherlock Holmes") or a description ("a grumpy pirate who loves cats").
    pub prompt: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateBatch {
    /// 1 to `CHARACTERBOT_MAX_BATCH` prompts.
    pub prompts: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchAccepted {
    #[schema(value_type = String)]
    pub batch_id: BatchId,
    /// One per prompt, in the order given.
    #[schema(value_type = Vec<String>)]
    pub request_ids: Vec<RequestId>,
}

fn check_prompt(state: &AppState, prompt: &str) -> Result<String, ApiError> {
    check_text(
        prompt,
        "prompt",
        state.options.max_prompt_chars,
        "empty_prompt",
        "prompt_too_long",
    )
}

#[utoipa::path(post, path = "/v1/personas", tag = "personas", request_body = CreatePersona,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe")),
    responses((status = 202, body = Accepted), (status = 400), (status = 401), (status = 413)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    claim: Claim,
    trace: Trace,
    AppJson(body): AppJson<CreatePersona>,
) -> Result<Response, ApiError> {
    let prompt = check_prompt(&state, &body.prompt)?;
    let request = RequestRecord::with_id(
        claim.ids(caller.id()).id("request"),
        RequestKind::Persona,
        RequestInput::Persona { prompt },
        None,
    );
    let answer = Accepted {
        request_id: request.request_id.clone(),
        status: RequestStatus::Queued,
    };
    let work = Accept {
        user_id: caller.id().to_owned(),
        kind: RequestKind::Persona,
        jobs: vec![job_for(caller.id(), &request, &trace)],
        requests: vec![request],
        batch: None,
        message: None,
        answer: None,
    };
    accept(&state, &claim, work, &answer).await
}

#[utoipa::path(post, path = "/v1/personas/batch", tag = "personas", request_body = CreateBatch,
    responses((status = 202, body = BatchAccepted), (status = 400), (status = 401), (status = 413)),
    security(("bearer" = [])))]
pub async fn create_batch(
    State(state): State<AppState>,
    caller: Caller,
    claim: Claim,
    trace: Trace,
    AppJson(body): AppJson<CreateBatch>,
) -> Result<Response, ApiError> {
    let prompts = checked_prompts(&state, &body.prompts)?;
    let ids = claim.ids(caller.id());
    let batch_id: BatchId = ids.id("batch");
    let requests: Vec<RequestRecord> = prompts
        .into_iter()
        .enumerate()
        .map(|(i, prompt)| {
            RequestRecord::with_id(
                ids.id(&format!("request/{i}")),
                RequestKind::Persona,
                RequestInput::Persona { prompt },
                Some(batch_id.clone()),
            )
        })
        .collect();
    let request_ids: Vec<RequestId> = requests.iter().map(|r| r.request_id.clone()).collect();
    let batch = Batch {
        batch_id: batch_id.clone(),
        total: requests.len() as u32,
        succeeded: 0,
        failed: 0,
        cancelled: 0,
        pending: requests.len() as u32,
        request_ids: request_ids.clone(),
        created_at: shared::time::now_rfc3339(),
    };
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

#[utoipa::path(get, path = "/v1/personas", tag = "personas", params(PageQuery),
    responses((status = 200, body = ListResponse<Persona>), (status = 401)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    AppQuery(q): AppQuery<PageQuery>,
) -> Result<AppJson<ListResponse<Persona>>, ApiError> {
    let page = state
        .ports
        .store
        .list_personas(caller.id(), q.limit()?, q.next_token.as_deref())
        .await?;
    Ok(AppJson(ListResponse {
        items: page.items,
        next_token: page.next_token,
    }))
}

#[utoipa::path(get, path = "/v1/personas/{id}", tag = "personas", params(("id" = String, Path)),
    responses((status = 200, body = Persona), (status = 404)), security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<PersonaId>,
) -> Result<AppJson<Persona>, ApiError> {
    state
        .ports
        .store
        .get_persona(caller.id(), &id)
        .await?
        .map(AppJson)
        .ok_or(ApiError::NotFound("persona"))
}

#[utoipa::path(patch, path = "/v1/personas/{id}", tag = "personas", params(("id" = String, Path)),
    request_body = PersonaEdit,
    responses((status = 200, body = Persona, description = "Edited; its conversations answer from it from their next message"),
        (status = 400, description = "an empty or too long field, nothing to change (`invalid_persona`)"),
        (status = 404)),
    security(("bearer" = [])))]
pub async fn edit(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<PersonaId>,
    AppJson(body): AppJson<PersonaEdit>,
) -> Result<AppJson<Persona>, ApiError> {
    let edit = body
        .checked()
        .map_err(|message| ApiError::bad_request("invalid_persona", message))?;
    state
        .ports
        .store
        .edit_persona(caller.id(), &id, &edit)
        .await
        .map(AppJson)
        .map_err(ApiError::not_found_as("persona"))
}

#[utoipa::path(delete, path = "/v1/personas/{id}", tag = "personas", params(("id" = String, Path)),
    responses((status = 204), (status = 404)), security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<PersonaId>,
) -> Result<StatusCode, ApiError> {
    if state.ports.store.delete_persona(caller.id(), &id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("persona"))
    }
}

#[utoipa::path(get, path = "/v1/batches/{id}", tag = "personas", params(("id" = String, Path)),
    responses((status = 200, body = Batch), (status = 404)), security(("bearer" = [])))]
pub async fn get_batch(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<BatchId>,
) -> Result<AppJson<Batch>, ApiError> {
    state
        .ports
        .store
        .get_batch(caller.id(), &id)
        .await?
        .map(AppJson)
        .ok_or(ApiError::NotFound("batch"))
}

/// The prompts of a batch, each checked as a single one would be; an error names the first
/// bad prompt by its index.
fn checked_prompts(state: &AppState, prompts: &[String]) -> Result<Vec<String>, ApiError> {
    let max = state.options.max_batch;
    if prompts.is_empty() {
        return Err(ApiError::bad_request(
            "empty_batch",
            "`prompts` must hold at least one prompt",
        ));
    }
    if prompts.len() > max {
        return Err(ApiError::bad_request(
            "too_many_prompts",
            format!("a batch holds at most {max} prompts; got {}", prompts.len()),
        ));
    }
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            check_prompt(state, p).map_err(|e| match e {
                ApiError::BadRequest { code, message } => ApiError::BadRequest {
                    code,
                    message: format!("prompts[{i}]: {message}"),
                },
                other => other,
            })
        })
        .collect()
}
