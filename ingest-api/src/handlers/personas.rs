//! Personas: created asynchronously from a prompt (one; many at once in `crate::handlers::batches`),
//! then listed, read, edited, deleted.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use shared::atomic::Accept;
use shared::domain::{
    Persona, PersonaEdit, RequestInput, RequestKind, RequestRecord, RequestStatus,
};
use shared::ids::PersonaId;
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

pub(super) fn check_prompt(state: &AppState, prompt: &str) -> Result<String, ApiError> {
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
