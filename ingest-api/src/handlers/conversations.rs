//! Conversations with a persona, and their messages. Posting a message stores it at once and
//! queues the chat job that will answer it.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use shared::domain::{
    new_id, Conversation, Message, RequestInput, RequestKind, RequestRecord, RequestStatus, Role,
};
use utoipa::ToSchema;

use super::{check_text, enqueue, ListResponse, PageQuery};
use crate::error::ApiError;
use crate::extract::{AppJson, AppPath, AppQuery, Caller, Trace};
use crate::AppState;

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateConversation {
    pub persona_id: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct PostMessage {
    pub text: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MessageAccepted {
    pub request_id: String,
    pub status: RequestStatus,
    /// The id of the stored user message.
    pub message_id: String,
}

#[utoipa::path(post, path = "/v1/conversations", tag = "conversations", request_body = CreateConversation,
    responses((status = 201, body = Conversation), (status = 404, description = "persona not found")),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<CreateConversation>,
) -> Result<(StatusCode, AppJson<Conversation>), ApiError> {
    let persona = state
        .store
        .get_persona(caller.id(), &body.persona_id)
        .await?
        .ok_or(ApiError::NotFound("persona"))?;
    let conversation = Conversation {
        conversation_id: new_id("conv"),
        persona_id: persona.persona_id,
        persona_name: persona.name,
        created_at: shared::time::now_rfc3339(),
    };
    state
        .store
        .create_conversation(caller.id(), &conversation)
        .await?;
    Ok((StatusCode::CREATED, AppJson(conversation)))
}

#[utoipa::path(get, path = "/v1/conversations", tag = "conversations", params(PageQuery),
    responses((status = 200, body = ListResponse<Conversation>)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    AppQuery(q): AppQuery<PageQuery>,
) -> Result<AppJson<ListResponse<Conversation>>, ApiError> {
    let page = state
        .store
        .list_conversations(caller.id(), q.limit()?, q.next_token.as_deref())
        .await?;
    Ok(AppJson(ListResponse {
        items: page.items,
        next_token: page.next_token,
    }))
}

#[utoipa::path(get, path = "/v1/conversations/{id}", tag = "conversations", params(("id" = String, Path)),
    responses((status = 200, body = Conversation), (status = 404)), security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<String>,
) -> Result<AppJson<Conversation>, ApiError> {
    state
        .store
        .get_conversation(caller.id(), &id)
        .await?
        .map(AppJson)
        .ok_or(ApiError::NotFound("conversation"))
}

#[utoipa::path(post, path = "/v1/conversations/{id}/messages", tag = "conversations",
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe")),
    request_body = PostMessage,
    responses((status = 202, body = MessageAccepted), (status = 400), (status = 404)), security(("bearer" = [])))]
pub async fn post_message(
    State(state): State<AppState>,
    caller: Caller,
    trace: Trace,
    AppPath(id): AppPath<String>,
    AppJson(body): AppJson<PostMessage>,
) -> Result<(StatusCode, AppJson<MessageAccepted>), ApiError> {
    let text = check_text(
        &body.text,
        "text",
        state.settings.max_message_chars,
        "empty_message",
        "message_too_long",
    )?;
    if state
        .store
        .get_conversation(caller.id(), &id)
        .await?
        .is_none()
    {
        return Err(ApiError::NotFound("conversation"));
    }
    let message = Message {
        message_id: new_id("msg"),
        role: Role::User,
        text: text.clone(),
        model: None,
        created_at: shared::time::now_rfc3339(),
    };
    let request = RequestRecord::new(
        RequestKind::Chat,
        RequestInput::Chat {
            conversation_id: id.clone(),
            message_id: message.message_id.clone(),
            text,
        },
        None,
    );
    state
        .store
        .add_user_message(caller.id(), &id, &message, &request)
        .await?;
    enqueue(
        &state,
        caller.id(),
        RequestKind::Chat,
        std::slice::from_ref(&request),
        &trace,
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        AppJson(MessageAccepted {
            request_id: request.request_id,
            status: RequestStatus::Queued,
            message_id: message.message_id,
        }),
    ))
}

#[utoipa::path(get, path = "/v1/conversations/{id}/messages", tag = "conversations",
    params(("id" = String, Path), PageQuery),
    responses((status = 200, body = ListResponse<Message>), (status = 404)), security(("bearer" = [])))]
pub async fn list_messages(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<String>,
    AppQuery(q): AppQuery<PageQuery>,
) -> Result<AppJson<ListResponse<Message>>, ApiError> {
    let page = state
        .store
        .list_messages(caller.id(), &id, q.limit()?, q.next_token.as_deref())
        .await
        .map_err(|e| match e {
            shared::Error::NotFound => ApiError::NotFound("conversation"),
            other => other.into(),
        })?;
    Ok(AppJson(ListResponse {
        items: page.items,
        next_token: page.next_token,
    }))
}
