//! Conversations with a persona, and their messages. Posting a message stores it at once and
//! queues the chat job that will answer it.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use shared::atomic::{Accept, UserMessage};
use shared::domain::{
    Conversation, Memory, Message, RequestInput, RequestKind, RequestRecord, RequestStatus, Role,
    TITLE_MAX_CHARS,
};
use shared::ids::{ConversationId, MessageId, PersonaId, RequestId};
use shared::store::{Edit, Turn};
use utoipa::{IntoParams, ToSchema};

use super::{accept, check_text, job_for, ListResponse, PageQuery};
use crate::error::ApiError;
use crate::extract::{AppJson, AppPath, AppQuery, Caller, Claim, Trace};
use crate::AppState;

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateConversation {
    #[schema(value_type = String)]
    pub persona_id: PersonaId,
    /// Which of the persona's greetings opens the conversation: 0 (the default) is its
    /// `greeting`, 1 the first of its `alternate_greetings`, and so on.
    #[serde(default, deserialize_with = "super::whole_number")]
    #[schema(minimum = 0, maximum = 4_294_967_295_u64)]
    pub greeting_index: usize,
    /// Its title; otherwise the opening words of the first message become it.
    #[schema(max_length = 80)]
    pub title: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RenameConversation {
    #[schema(min_length = 1, max_length = 80)]
    pub title: String,
}

/// `?limit=&next_token=&persona_id=` of the conversation list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConversationQuery {
    /// 1 to 100; 20 when absent.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<usize>,
    /// The `next_token` of the previous page.
    pub next_token: Option<String>,
    /// Only the conversations with this persona.
    pub persona_id: Option<String>,
}

/// A title as given: trimmed, not empty, not too long.
fn check_title(title: &str) -> Result<String, ApiError> {
    check_text(
        title,
        "title",
        TITLE_MAX_CHARS,
        "empty_title",
        "title_too_long",
    )
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct PostMessage {
    pub text: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MessageAccepted {
    #[schema(value_type = String)]
    pub request_id: RequestId,
    pub status: RequestStatus,
    /// The id of the stored user message.
    #[schema(value_type = String)]
    pub message_id: MessageId,
}

#[utoipa::path(post, path = "/v1/conversations", tag = "conversations", request_body = CreateConversation,
    responses((status = 201, body = Conversation, description = "It begins with the persona's greeting"),
        (status = 400, description = "`empty_title`, `title_too_long`"),
        (status = 404, description = "persona not found"),
        (status = 422, description = "no greeting at `greeting_index` (`bad_greeting_index`)")),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<CreateConversation>,
) -> Result<(StatusCode, AppJson<Conversation>), ApiError> {
    let title = body.title.as_deref().map(check_title).transpose()?;
    let persona = state
        .ports
        .store
        .get_persona(caller.id(), &body.persona_id)
        .await?
        .ok_or(ApiError::NotFound("persona"))?;
    let greeting =
        persona
            .greeting_at(body.greeting_index)
            .ok_or_else(|| ApiError::Unprocessable {
                code: "bad_greeting_index",
                message: format!(
                    "`greeting_index` is {}; this persona has greetings 0 to {}",
                    body.greeting_index,
                    persona.alternate_greetings.len()
                ),
            })?;
    // The persona's first line, as the conversation's first message.
    let greeting = Message::new(MessageId::new(), Role::Assistant, greeting.to_owned(), None);
    let conversation = Conversation {
        conversation_id: ConversationId::new(),
        persona_id: persona.persona_id.clone(),
        persona_name: persona.name.clone(),
        title,
        last_message_at: None,
        preview: None,
        created_at: greeting.created_at.clone(),
    }
    .begun_with(&greeting);
    // The persona as it is now stays with the conversation (see `ConversationStore`).
    state
        .ports
        .store
        .create_conversation(caller.id(), &conversation, &persona, &greeting)
        .await
        .map_err(ApiError::not_found_as("persona"))?;
    Ok((StatusCode::CREATED, AppJson(conversation)))
}

#[utoipa::path(get, path = "/v1/conversations", tag = "conversations", params(ConversationQuery),
    responses((status = 200, body = ListResponse<Conversation>, description = "Latest activity first")),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    AppQuery(q): AppQuery<ConversationQuery>,
) -> Result<AppJson<ListResponse<Conversation>>, ApiError> {
    let paging = PageQuery {
        limit: q.limit,
        next_token: q.next_token,
    };
    let persona_id = q.persona_id.map(PersonaId::from);
    let page = state
        .ports
        .store
        .list_conversations(
            caller.id(),
            persona_id.as_ref(),
            paging.limit()?,
            paging.next_token.as_deref(),
        )
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
    AppPath(id): AppPath<ConversationId>,
) -> Result<AppJson<Conversation>, ApiError> {
    state
        .ports
        .store
        .get_conversation(caller.id(), &id)
        .await?
        .map(AppJson)
        .ok_or(ApiError::NotFound("conversation"))
}

#[utoipa::path(patch, path = "/v1/conversations/{id}", tag = "conversations", params(("id" = String, Path)),
    request_body = RenameConversation,
    responses((status = 200, body = Conversation), (status = 400), (status = 404)), security(("bearer" = [])))]
pub async fn rename(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<ConversationId>,
    AppJson(body): AppJson<RenameConversation>,
) -> Result<AppJson<Conversation>, ApiError> {
    let title = check_title(&body.title)?;
    state
        .ports
        .store
        .rename_conversation(caller.id(), &id, &title)
        .await
        .map(AppJson)
        .map_err(ApiError::not_found_as("conversation"))
}

#[utoipa::path(delete, path = "/v1/conversations/{id}", tag = "conversations", params(("id" = String, Path)),
    responses((status = 204, description = "Deleted, with its messages"), (status = 404)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<ConversationId>,
) -> Result<StatusCode, ApiError> {
    state
        .ports
        .store
        .delete_conversation(caller.id(), &id)
        .await
        .map_err(ApiError::not_found_as("conversation"))?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/conversations/{id}/messages", tag = "conversations",
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe")),
    request_body = PostMessage,
    responses((status = 202, body = MessageAccepted), (status = 400), (status = 404)), security(("bearer" = [])))]
pub async fn post_message(
    State(state): State<AppState>,
    caller: Caller,
    claim: Claim,
    trace: Trace,
    AppPath(id): AppPath<ConversationId>,
    AppJson(body): AppJson<PostMessage>,
) -> Result<Response, ApiError> {
    let text = check_text(
        &body.text,
        "text",
        state.options.max_message_chars,
        "empty_message",
        "message_too_long",
    )?;
    let ids = claim.ids(caller.id());
    let request_id: RequestId = ids.id("request");
    let message = Message {
        reply_id: Some(request_id.reply_id()),
        ..Message::new(
            ids.id("message"),
            Role::User,
            text.clone(),
            Some(request_id.clone()),
        )
    };
    let request = RequestRecord::with_id(
        request_id,
        RequestKind::Chat,
        RequestInput::Chat {
            conversation_id: id.clone(),
            message_id: message.message_id.clone(),
            text,
            reply_to: None,
        },
        None,
    );
    let answer = MessageAccepted {
        request_id: request.request_id.clone(),
        status: RequestStatus::Queued,
        message_id: message.message_id.clone(),
    };
    // The conversation's ownership is checked inside the accept, with the write: no read of
    // its own on the hot path.
    let work = Accept {
        user_id: caller.id().to_owned(),
        kind: RequestKind::Chat,
        jobs: vec![job_for(caller.id(), &request, &trace)],
        requests: vec![request],
        batch: None,
        message: Some(UserMessage {
            conversation_id: id,
            message,
        }),
        answer: None,
    };
    accept(&state, &claim, work, &answer)
        .await
        .map_err(|e| match e {
            ApiError::NotFound(_) => ApiError::NotFound("conversation"),
            other => other,
        })
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct Rewind {
    /// The last message to keep: every later one is dropped.
    #[schema(value_type = String)]
    pub message_id: MessageId,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct EditMessage {
    pub text: String,
    /// Answer the edited message again (the default); `false` leaves it unanswered.
    #[serde(default = "yes")]
    pub regenerate: bool,
}

fn yes() -> bool {
    true
}

/// Cancels the requests of turns dropped or edited (their replies are not stored anyway: this
/// stops their model calls). Best effort: one that finished meanwhile is left as it is.
async fn cancel_all(state: &AppState, user_id: &str, requests: Vec<RequestId>) {
    for request_id in requests {
        if let Err(e) = state.ports.atomic.cancel(user_id, &request_id).await {
            tracing::warn!(error = %shared::error::Report(&e), %request_id, "could not cancel a dropped turn's request");
        }
    }
}

/// The store's refusals of a rewind or an edit, as the API's.
fn rewind_error(e: shared::Error) -> ApiError {
    match e {
        shared::Error::Invalid(message) => ApiError::Unprocessable {
            code: "not_a_user_message",
            message,
        },
        other => ApiError::not_found_as("message")(other),
    }
}

#[utoipa::path(post, path = "/v1/conversations/{id}/rewind", tag = "conversations",
    params(("id" = String, Path)), request_body = Rewind,
    responses((status = 200, body = Conversation, description = "Every message after `message_id` dropped; jobs of the dropped turns cancelled"),
        (status = 404, description = "no such message in the conversation")),
    security(("bearer" = [])))]
pub async fn rewind(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<ConversationId>,
    AppJson(body): AppJson<Rewind>,
) -> Result<AppJson<Conversation>, ApiError> {
    let store = &state.ports.store;
    let (_, dropped) = store
        .rewind(caller.id(), &id, &body.message_id, None)
        .await
        .map_err(rewind_error)?;
    cancel_all(&state, caller.id(), dropped).await;
    forget_rewound(&state, caller.id(), &id, &body.message_id, false).await;
    store
        .get_conversation(caller.id(), &id)
        .await?
        .map(AppJson)
        .ok_or(ApiError::NotFound("conversation"))
}

#[utoipa::path(patch, path = "/v1/conversations/{id}/messages/{message_id}", tag = "conversations",
    params(("id" = String, Path), ("message_id" = String, Path, description = "A user message"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe")),
    request_body = EditMessage,
    responses((status = 202, body = MessageAccepted, description = "Edited, the later turns dropped, and answered again"),
        (status = 200, body = Message, description = "Edited and the later turns dropped (`regenerate: false`)"),
        (status = 400, description = "`empty_message`, `message_too_long`"),
        (status = 404, description = "no such message"),
        (status = 409, description = "`persona_deleted`"),
        (status = 422, description = "`not_a_user_message`")),
    security(("bearer" = [])))]
pub async fn edit(
    State(state): State<AppState>,
    caller: Caller,
    claim: Claim,
    trace: Trace,
    AppPath((id, message_id)): AppPath<(ConversationId, MessageId)>,
    AppJson(body): AppJson<EditMessage>,
) -> Result<Response, ApiError> {
    let text = check_text(
        &body.text,
        "text",
        state.options.max_message_chars,
        "empty_message",
        "message_too_long",
    )?;
    let request_id: RequestId = claim.ids(caller.id()).id("request");
    let edit = Edit {
        text: text.clone(),
        request_id: body.regenerate.then(|| request_id.clone()),
        reply_id: request_id.reply_id(),
    };
    let store = &state.ports.store;
    let (edited, dropped) = store
        .rewind(caller.id(), &id, &message_id, Some(&edit))
        .await
        .map_err(rewind_error)?;
    cancel_all(&state, caller.id(), dropped).await;
    forget_rewound(&state, caller.id(), &id, &message_id, true).await;
    if !body.regenerate {
        return Ok(AppJson(edited).into_response());
    }
    let request = RequestRecord::with_id(
        request_id.clone(),
        RequestKind::Chat,
        RequestInput::Chat {
            conversation_id: id.clone(),
            message_id: message_id.clone(),
            text,
            reply_to: None,
        },
        None,
    );
    let answer = MessageAccepted {
        request_id,
        status: RequestStatus::Queued,
        message_id,
    };
    let work = Accept {
        user_id: caller.id().to_owned(),
        kind: RequestKind::Chat,
        jobs: vec![job_for(caller.id(), &request, &trace)],
        requests: vec![request],
        batch: None,
        message: None,
        answer: None,
    };
    accept(&state, &claim, work, &answer).await
}

#[utoipa::path(get, path = "/v1/conversations/{id}/memory", tag = "conversations", params(("id" = String, Path)),
    responses((status = 200, body = Memory), (status = 404)), security(("bearer" = [])))]
pub async fn get_memory(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<ConversationId>,
) -> Result<AppJson<Memory>, ApiError> {
    state
        .ports
        .store
        .get_memory(caller.id(), &id)
        .await
        .map(AppJson)
        .map_err(ApiError::not_found_as("conversation"))
}

#[utoipa::path(put, path = "/v1/conversations/{id}/memory", tag = "conversations", params(("id" = String, Path)),
    request_body = Memory,
    responses((status = 200, body = Memory, description = "Kept; the model is given it from the next message on"),
        (status = 400, description = "`invalid_memory` (too long, too many pinned facts)"), (status = 404)),
    security(("bearer" = [])))]
pub async fn put_memory(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<ConversationId>,
    AppJson(body): AppJson<Memory>,
) -> Result<AppJson<Memory>, ApiError> {
    let mut memory = body
        .checked()
        .map_err(|message| ApiError::bad_request("invalid_memory", message))?;
    let store = &state.ports.store;
    // Where the summary ends is the memory job's to say, not the client's.
    memory.summarized_through = store
        .get_memory(caller.id(), &id)
        .await
        .map_err(ApiError::not_found_as("conversation"))?
        .summarized_through;
    store
        .put_memory(caller.id(), &id, &memory)
        .await
        .map(AppJson)
        .map_err(ApiError::not_found_as("conversation"))
}

/// Most messages read a page at a time when a rewind looks for the end of the summary.
const REWIND_PAGE: usize = 500;

/// After a rewind to `kept` (or an edit of it): a summary that covers a dropped turn, or the
/// edited message, would tell the model of what no longer happened. It is cleared, to be
/// folded again from the turns that remain; the pinned facts stay. Otherwise it is written
/// again as it is, so that a fold under way (which read the turns before the rewind) finds
/// the memory changed and writes nothing. Conditional on the memory as read: a fold that
/// lands meanwhile is read again. The rewind is done by then: a failure here is logged, and
/// the memory mended by the user's next rewind or `PUT`.
async fn forget_rewound(
    state: &AppState,
    user_id: &str,
    id: &ConversationId,
    kept: &MessageId,
    edited: bool,
) {
    let store = &state.ports.store;
    for _ in 0..3 {
        let memory = match store.get_memory(user_id, id).await {
            Ok(m) => m,
            Err(e) => {
                return tracing::warn!(error = %shared::error::Report(&e), "could not read the memory after a rewind")
            }
        };
        let Some(through) = &memory.summarized_through else {
            return;
        };
        let kept_whole = if edited && through == kept {
            Ok(false)
        } else {
            still_there(state, id, through).await
        };
        let next = match kept_whole {
            Ok(true) => memory.clone(),
            Ok(false) => Memory {
                summary: String::new(),
                summarized_through: None,
                ..memory.clone()
            },
            Err(e) => {
                return tracing::warn!(error = %shared::error::Report(&e), "could not check the memory after a rewind")
            }
        };
        match store.replace_memory(user_id, id, &memory, &next).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                return tracing::warn!(error = %shared::error::Report(&e), "could not write the memory after a rewind")
            }
        }
    }
    tracing::warn!("the memory kept changing during a rewind; left as it is");
}

/// Whether the conversation still has message `message_id`.
async fn still_there(
    state: &AppState,
    id: &ConversationId,
    message_id: &MessageId,
) -> shared::Result<bool> {
    let mut token = None;
    loop {
        let page = state
            .ports
            .store
            .page_messages(id, REWIND_PAGE, token.as_deref())
            .await?;
        if page.items.iter().any(|m| &m.message_id == message_id) {
            return Ok(true);
        }
        match page.next_token {
            Some(next) => token = Some(next),
            None => return Ok(false),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct SelectVersion {
    /// One of the reply's `variants`.
    pub variant_id: String,
}

/// The turn of reply `reply_id` in the user's conversation, with the store's refusals as the
/// API's.
async fn reply_turn(
    state: &AppState,
    user_id: &str,
    conversation_id: &ConversationId,
    reply_id: &MessageId,
) -> Result<Turn, ApiError> {
    state
        .ports
        .store
        .reply_turn(user_id, conversation_id, reply_id)
        .await
        .map_err(ApiError::not_found_as("reply"))
}

#[utoipa::path(post, path = "/v1/conversations/{id}/messages/{message_id}/regenerate", tag = "conversations",
    params(("id" = String, Path), ("message_id" = String, Path, description = "The reply (stored, or a failed one's stand-in)"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe")),
    responses((status = 202, body = MessageAccepted, description = "A new version of the reply is queued; `message_id` is the reply's"),
        (status = 404, description = "no such reply"),
        (status = 409, description = "`reply_in_progress` (a version is being written: wait, or cancel it), `persona_deleted`")),
    security(("bearer" = [])))]
pub async fn regenerate(
    State(state): State<AppState>,
    caller: Caller,
    claim: Claim,
    trace: Trace,
    AppPath((id, reply_id)): AppPath<(ConversationId, MessageId)>,
) -> Result<Response, ApiError> {
    let turn = reply_turn(&state, caller.id(), &id, &reply_id).await?;
    let latest = match &turn.asked.request_id {
        Some(r) => state.ports.store.get_request(caller.id(), r).await?,
        None => None,
    };
    if latest.is_some_and(|r| !r.status.is_final()) {
        return Err(ApiError::Conflict {
            code: "reply_in_progress",
            message: "a version of this reply is being written; wait for it, or cancel it".into(),
        });
    }
    let ids = claim.ids(caller.id());
    let request = RequestRecord::with_id(
        ids.id("request"),
        RequestKind::Chat,
        RequestInput::Chat {
            conversation_id: id.clone(),
            message_id: turn.asked.message_id.clone(),
            text: turn.asked.text.clone(),
            reply_to: Some(reply_id.clone()),
        },
        None,
    );
    let request_id = request.request_id.clone();
    let answer = MessageAccepted {
        request_id: request_id.clone(),
        status: RequestStatus::Queued,
        message_id: reply_id,
    };
    let work = Accept {
        user_id: caller.id().to_owned(),
        kind: RequestKind::Chat,
        jobs: vec![job_for(caller.id(), &request, &trace)],
        requests: vec![request],
        batch: None,
        message: None,
        answer: None,
    };
    // The turn names its new request first: the settlement stores a reply only for the
    // request its turn names (an edit or rewind may have moved on), and listings show this
    // one's state on the reply. Should the accept then fail, the turn names a request that
    // does not exist: listings show the reply as it is, and a retry may regenerate again.
    state
        .ports
        .store
        .answer_with(&id, &turn, &request_id)
        .await
        .map_err(|e| match e {
            shared::Error::Conflict(_) => ApiError::Conflict {
                code: "reply_in_progress",
                message: "the reply was regenerated or edited meanwhile".into(),
            },
            other => other.into(),
        })?;
    accept(&state, &claim, work, &answer).await
}

#[utoipa::path(put, path = "/v1/conversations/{id}/messages/{message_id}/selected", tag = "conversations",
    params(("id" = String, Path), ("message_id" = String, Path, description = "The reply")),
    request_body = SelectVersion,
    responses((status = 200, body = Message, description = "The reply, showing the version selected; the model sees it from now on"),
        (status = 404, description = "no such reply, or no such version of it")),
    security(("bearer" = [])))]
pub async fn select(
    State(state): State<AppState>,
    caller: Caller,
    AppPath((id, reply_id)): AppPath<(ConversationId, MessageId)>,
    AppJson(body): AppJson<SelectVersion>,
) -> Result<AppJson<Message>, ApiError> {
    state
        .ports
        .store
        .select_version(caller.id(), &id, &reply_id, &body.variant_id)
        .await
        .map(AppJson)
        .map_err(ApiError::not_found_as("reply or version"))
}

#[utoipa::path(get, path = "/v1/conversations/{id}/messages", tag = "conversations",
    params(("id" = String, Path), PageQuery),
    responses((status = 200, body = ListResponse<Message>), (status = 404)), security(("bearer" = [])))]
pub async fn list_messages(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath<ConversationId>,
    AppQuery(q): AppQuery<PageQuery>,
) -> Result<AppJson<ListResponse<Message>>, ApiError> {
    let page = state
        .ports
        .store
        .list_messages(caller.id(), &id, q.limit()?, q.next_token.as_deref())
        .await
        .map_err(ApiError::not_found_as("conversation"))?;
    let page =
        shared::store::with_replies_in_flight(state.ports.store.as_ref(), caller.id(), &id, page)
            .await?;
    Ok(AppJson(ListResponse {
        items: page.items,
        next_token: page.next_token,
    }))
}
