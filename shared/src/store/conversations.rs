//! The conversations port: conversations and their messages, a user message and its reply
//! paired by turn. A conversation keeps a snapshot of its persona (as it began, replaced when
//! the persona is edited): the model answers from it, and it outlives the persona (a deleted
//! persona's conversations stay readable and refuse new messages: `Error::PersonaDeleted`). The rule that a conversation's messages are read only by its owner is
//! written here once ([`ConversationStore::list_messages`]), not in every adapter.

use async_trait::async_trait;

use super::{PersonaStore, RequestStore};
use crate::domain::{
    Conversation, Message, MessageStatus, Page, Persona, RequestRecord, RequestResult,
    RequestStatus, Role,
};
use crate::ids::{ConversationId, MessageId, PersonaId};
use crate::{Error, Result};

/// See [`ConversationStore::chat_context`].
#[derive(Debug, Clone)]
pub struct ChatContext {
    pub conversation: Conversation,
    pub persona: Option<Persona>,
    /// Oldest first.
    pub history: Vec<Message>,
    /// The turn was marked cancelled (see `Atomic::cancel`): the job is not to run. Set where
    /// a job's first delivery does not read its request (AWS); the embedded worker reads the
    /// request itself before it runs.
    pub cancelled: bool,
}

#[async_trait]
pub trait ConversationStore: Send + Sync + 'static {
    /// Records a new conversation with `persona`'s snapshot and its first message, the
    /// persona's `greeting` (turn 0: it precedes every user message); `NotFound` when the
    /// persona is not (or no longer) the user's.
    async fn create_conversation(
        &self,
        user_id: &str,
        conversation: &Conversation,
        persona: &Persona,
        greeting: &Message,
    ) -> Result<()>;
    async fn get_conversation(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
    ) -> Result<Option<Conversation>>;
    /// Latest activity first (`last_message_at`); only those with `persona_id` when given.
    async fn list_conversations(
        &self,
        user_id: &str,
        persona_id: Option<&PersonaId>,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Conversation>>;
    /// Gives a conversation its title; `NotFound` unless it is the user's.
    async fn rename_conversation(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        title: &str,
    ) -> Result<Conversation>;
    /// Deletes a conversation with its messages; `NotFound` unless it is the user's. Its jobs
    /// still queued then fail (`conversation_not_found`).
    async fn delete_conversation(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
    ) -> Result<()>;

    /// Appends a user message to a conversation (its latest activity: see
    /// [`Activity`](crate::domain::Activity)) and records the chat request that will answer
    /// it, in one step; `NotFound` (and nothing stored) when the conversation is not the
    /// user's, `PersonaDeleted` when its persona is gone.
    async fn add_user_message(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        message: &Message,
        request: &RequestRecord,
    ) -> Result<()>;
    /// Stores the reply to user message `reply_to` unless one exists (the conversation's
    /// latest activity); returns the stored reply (the earlier one, on a redelivery).
    async fn put_reply(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        reply_to: &MessageId,
        reply: &Message,
    ) -> Result<Message>;
    async fn get_reply(
        &self,
        conversation_id: &ConversationId,
        reply_to: &MessageId,
    ) -> Result<Option<Message>>;

    /// A conversation's messages, oldest first; `NotFound` unless the conversation is the
    /// user's. The ownership read costs nothing new: both backends keep messages under the
    /// conversation, not the user, so the check was always a read of its own.
    async fn list_messages(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Message>> {
        if self
            .get_conversation(user_id, conversation_id)
            .await?
            .is_none()
        {
            return Err(Error::NotFound);
        }
        self.page_messages(conversation_id, limit, next_token).await
    }
    /// A page of a conversation's messages, oldest first, whoever owns it: what
    /// [`list_messages`](ConversationStore::list_messages) reads once ownership is checked.
    async fn page_messages(
        &self,
        conversation_id: &ConversationId,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Message>>;
    /// Up to `limit` messages that precede `message_id` (excluded), oldest first.
    async fn history_before(
        &self,
        conversation_id: &ConversationId,
        message_id: &MessageId,
        limit: usize,
    ) -> Result<Vec<Message>>;

    /// What a chat job reads before calling the model: the user's conversation (absent: `None`
    /// and nothing else), its persona (the snapshot; the live persona for a conversation made
    /// before snapshots, `None` if that was deleted) and up to `history_limit` messages before
    /// `message_id`. One round trip where the backend can; [`chat_context_in_reads`] makes
    /// three.
    async fn chat_context(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        message_id: &MessageId,
        history_limit: usize,
    ) -> Result<Option<ChatContext>>;
}

/// [`ConversationStore::chat_context`] as three reads, for a backend that cannot do better.
pub async fn chat_context_in_reads<S>(
    store: &S,
    user_id: &str,
    conversation_id: &ConversationId,
    message_id: &MessageId,
    history_limit: usize,
) -> Result<Option<ChatContext>>
where
    S: ConversationStore + PersonaStore + ?Sized,
{
    let Some(conversation) = store.get_conversation(user_id, conversation_id).await? else {
        return Ok(None);
    };
    let persona = store.get_persona(user_id, &conversation.persona_id).await?;
    let history = store
        .history_before(conversation_id, message_id, history_limit)
        .await?;
    Ok(Some(ChatContext {
        conversation,
        persona,
        history,
        cancelled: false,
    }))
}

/// A page of messages as a client shows it: each user message whose reply is not stored yet is
/// followed by a stand-in for that reply, under the id the reply will have, with the state of
/// the request writing it (`pending`, `streaming`, `failed` with its error, or `cancelled`
/// before a word of it was written). Replies are
/// stored only when written, so the write path pays nothing for this; a listing pays one
/// request read per turn still unanswered (the one in flight, and failed ones).
pub async fn with_replies_in_flight<S>(
    store: &S,
    user_id: &str,
    conversation_id: &ConversationId,
    page: Page<Message>,
) -> Result<Page<Message>>
where
    S: ConversationStore + RequestStore + ?Sized,
{
    let last = page.items.len().saturating_sub(1);
    let mut unanswered = Vec::new();
    for (i, message) in page.items.iter().enumerate() {
        let (Role::User, Some(request_id)) = (message.role, &message.request_id) else {
            continue;
        };
        let answered = match page.items.get(i + 1) {
            Some(next) => next.role == Role::Assistant,
            // The page ends on it: its reply, if stored, opens the next page.
            None if i == last && page.next_token.is_some() => store
                .get_reply(conversation_id, &message.message_id)
                .await?
                .is_some(),
            None => false,
        };
        if !answered {
            unanswered.push((i, request_id.clone()));
        }
    }
    if unanswered.is_empty() {
        return Ok(page);
    }
    let requests = futures::future::try_join_all(
        unanswered
            .iter()
            .map(|(_, id)| store.get_request(user_id, id)),
    )
    .await?;
    let mut items = Vec::with_capacity(page.items.len() + unanswered.len());
    let mut stand_ins = unanswered.iter().zip(requests).peekable();
    for (i, message) in page.items.into_iter().enumerate() {
        items.push(message);
        if stand_ins.peek().is_some_and(|((at, _), _)| *at == i) {
            if let Some((_, Some(request))) = stand_ins.next() {
                items.extend(stand_in(request));
            }
        }
    }
    Ok(Page {
        items,
        next_token: page.next_token,
    })
}

/// The reply a chat request is writing, as it stands; `None` for a request that is not a
/// chat turn's.
fn stand_in(request: RequestRecord) -> Option<Message> {
    // Finished since the page was read: the reply itself.
    if let Some(RequestResult::Message(reply)) = request.result {
        return Some(reply);
    }
    let status = match request.status {
        RequestStatus::Queued => MessageStatus::Pending,
        RequestStatus::Running => MessageStatus::Streaming,
        RequestStatus::Failed => MessageStatus::Failed,
        RequestStatus::Cancelled => MessageStatus::Cancelled,
        RequestStatus::Succeeded => return None,
    };
    Some(Message {
        message_id: request.request_id.reply_id(),
        role: Role::Assistant,
        text: String::new(),
        model: request.model,
        status,
        request_id: Some(request.request_id),
        // A retried request keeps its last attempt's error; only a failure is shown with one.
        error: request.error.filter(|_| status == MessageStatus::Failed),
        created_at: request.created_at,
    })
}
