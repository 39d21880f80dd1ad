//! The conversations port: conversations and their messages, a user message and its reply
//! paired by turn. A conversation keeps a snapshot of its persona (as it began, replaced when
//! the persona is edited): the model answers from it, and it outlives the persona (a deleted
//! persona's conversations stay readable and refuse new messages: `Error::PersonaDeleted`). The rule that a conversation's messages are read only by its owner is
//! written here once ([`ConversationStore::list_messages`]), not in every adapter.

use async_trait::async_trait;

use super::{PersonaStore, RequestStore};
use crate::domain::{
    Conversation, Memory, Message, MessageStatus, Page, Persona, RequestInput, RequestRecord,
    RequestResult, RequestStatus, Role,
};
use crate::ids::{ConversationId, MessageId, PersonaId, RequestId};
use crate::{Error, Result};

/// A turn found by its reply's id (see [`ConversationStore::reply_turn`]).
#[derive(Debug, Clone)]
pub struct Turn {
    pub turn: i64,
    /// The user message.
    pub asked: Message,
    /// Its reply, if stored.
    pub reply: Option<Message>,
}

/// A user message's new text (see [`ConversationStore::rewind`]).
#[derive(Debug, Clone)]
pub struct Edit {
    pub text: String,
    /// The request that will answer it (none: it stays unanswered).
    pub request_id: Option<RequestId>,
    /// The id its new reply will have.
    pub reply_id: MessageId,
}

impl Edit {
    /// Changes user message `message` as this edit says; `Invalid` for a reply.
    pub fn apply(&self, message: &mut Message) -> Result<()> {
        if message.role != Role::User {
            return Err(Error::Invalid("only a user message can be edited".into()));
        }
        message.text.clone_from(&self.text);
        message.request_id.clone_from(&self.request_id);
        message.reply_id = Some(self.reply_id.clone());
        Ok(())
    }

    /// What a rewind to user message `kept` does to it: its reply is dropped, so it stays
    /// unanswered (no request; its reply id kept, so a reply of the old request is refused).
    pub fn unanswered(kept: &Message) -> Self {
        Edit {
            text: kept.text.clone(),
            request_id: None,
            reply_id: kept
                .reply_id
                .clone()
                .or_else(|| kept.request_id.as_ref().map(RequestId::reply_id))
                .unwrap_or_else(MessageId::new),
        }
    }
}

/// See [`ConversationStore::chat_context`].
#[derive(Debug, Clone)]
pub struct ChatContext {
    pub conversation: Conversation,
    pub persona: Option<Persona>,
    /// Oldest first.
    pub history: Vec<Message>,
    /// The conversation's pinned facts and summary.
    pub memory: Memory,
    /// The request whose cancel marked the turn (see `Atomic::cancel`): a job of that request
    /// is not to run. Set where a job's first delivery does not read its request (AWS); the
    /// embedded worker reads the request itself before it runs.
    pub cancelled: Option<RequestId>,
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

    /// The turn whose reply is `reply_id` (stored, or still to come): its user message, and
    /// the reply if stored. `NotFound` unless the conversation is the user's and has such a
    /// reply (a greeting answers no user message: not one); `PersonaDeleted` when the
    /// conversation's persona is gone.
    async fn reply_turn(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        reply_id: &MessageId,
    ) -> Result<Turn>;
    /// Makes `request_id` the request that answers the turn's user message (a regeneration),
    /// on condition that it still names the one it named when `turn` was read (another
    /// regeneration or an edit meanwhile: `Conflict`). Listings show its state on the reply,
    /// and the settlement stores a reply only for the request its turn names.
    async fn answer_with(
        &self,
        conversation_id: &ConversationId,
        turn: &Turn,
        request_id: &RequestId,
    ) -> Result<()>;
    /// Shows version `variant_id` of a reply, and gives it to the model from now on; returns
    /// the reply. `NotFound` when the user has no such reply, or it no such version.
    async fn select_version(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        reply_id: &MessageId,
        variant_id: &str,
    ) -> Result<Message>;

    /// Drops every message after `after`: a user message's reply and the later turns, or the
    /// turns after a reply (or after the greeting). With `edit`, `after` is a user message,
    /// changed first (its text, the request answering it and its reply's id). Returns the
    /// message kept (as edited), and the requests of the turns dropped or edited, for the
    /// caller to cancel (their replies are not stored: see the settlements). `NotFound` unless the user's conversation has that
    /// message; `Invalid` for an edit of a reply; `PersonaDeleted` for an edit to be answered
    /// in a conversation whose persona is gone.
    async fn rewind(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        after: &MessageId,
        edit: Option<&Edit>,
    ) -> Result<(Message, Vec<RequestId>)>;

    /// The conversation's memory (empty until written); `NotFound` unless it is the user's.
    async fn get_memory(&self, user_id: &str, conversation_id: &ConversationId) -> Result<Memory>;
    /// Replaces the conversation's memory; returns it as stored.
    async fn put_memory(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        memory: &Memory,
    ) -> Result<Memory>;
    /// Replaces the conversation's memory on condition that it is still as `read` (its
    /// `updated_at`): `false`, and nothing written, when it changed meanwhile (its user edited
    /// it, or another fold ran). `NotFound` unless the conversation is the user's.
    async fn replace_memory(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        read: &Memory,
        memory: &Memory,
    ) -> Result<bool>;

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
        cancelled: None,
        memory: store.get_memory(user_id, conversation_id).await?,
    }))
}

/// A page of messages as a client shows it. Each user message's latest request (its first, or
/// the regeneration since) is checked against its reply: a reply not stored yet is shown by a
/// stand-in under the id it will have, and a stored reply whose newest version is still being
/// written carries that request's state; either way `pending`, `streaming`, `failed` (with the
/// error) or `cancelled`. Replies are stored only when written, so the write path pays nothing
/// for this; a listing pays one request read per turn still open (the one in flight, and
/// failed ones). Every reply is shown with its versions (`variants`, `selected`).
pub async fn with_replies_in_flight<S>(
    store: &S,
    user_id: &str,
    conversation_id: &ConversationId,
    page: Page<Message>,
) -> Result<Page<Message>>
where
    S: ConversationStore + RequestStore + ?Sized,
{
    let mut items = page.items;
    let last = items.len().saturating_sub(1);
    // (the user message's place, its latest request, whether its reply follows it here)
    let mut open = Vec::new();
    for (i, message) in items.iter().enumerate() {
        let (Role::User, Some(request_id)) = (message.role, &message.request_id) else {
            continue;
        };
        match items.get(i + 1) {
            Some(next) if next.role == Role::Assistant => {
                if !next.has_version_of(request_id) {
                    open.push((i, request_id.clone(), true));
                }
            }
            // The page ends on it: its reply, if stored, opens the next page.
            None if i == last && page.next_token.is_some() => {
                let reply = store
                    .get_reply(conversation_id, &message.message_id)
                    .await?;
                if reply.is_none() {
                    open.push((i, request_id.clone(), false));
                }
            }
            _ => open.push((i, request_id.clone(), false)),
        }
    }
    let requests =
        futures::future::try_join_all(open.iter().map(|(_, id, _)| store.get_request(user_id, id)))
            .await?;
    // From the end, so that each stand-in goes in where its place still is.
    for ((i, _, follows), request) in open.into_iter().zip(requests).rev() {
        let Some(request) = request else { continue };
        if follows {
            in_flight(&mut items[i + 1], request);
        } else if let Some(stand_in) = stand_in(request, &items[i]) {
            items.insert(i + 1, stand_in);
        }
    }
    Ok(Page {
        items: items.into_iter().map(Message::shown).collect(),
        next_token: page.next_token,
    })
}

/// A request's state as a message's.
fn message_status(status: RequestStatus) -> Option<MessageStatus> {
    Some(match status {
        RequestStatus::Queued => MessageStatus::Pending,
        RequestStatus::Running => MessageStatus::Streaming,
        RequestStatus::Failed => MessageStatus::Failed,
        RequestStatus::Cancelled => MessageStatus::Cancelled,
        RequestStatus::Succeeded => return None,
    })
}

/// A stored reply whose newest version `request` is writing: the reply as the request left it
/// if it finished since the page was read, else with the request's state.
fn in_flight(reply: &mut Message, request: RequestRecord) {
    if let Some(RequestResult::Message(done)) = request.result {
        if done.message_id == reply.message_id {
            *reply = done;
        }
        return;
    }
    if let Some(status) = message_status(request.status) {
        reply.status = status;
        reply.error = request.error.filter(|_| status == MessageStatus::Failed);
    }
}

/// The reply a chat request is writing for user message `asked`, as it stands; `None` for a
/// request that is not a chat turn's.
fn stand_in(request: RequestRecord, asked: &Message) -> Option<Message> {
    // Finished since the page was read: the reply itself.
    if let Some(RequestResult::Message(reply)) = request.result {
        return Some(reply);
    }
    let status = message_status(request.status)?;
    Some(Message {
        message_id: asked
            .reply_id
            .clone()
            .or_else(|| match &request.input {
                RequestInput::Chat { reply_to, .. } => reply_to.clone(),
                RequestInput::Persona { .. } => None,
            })
            .unwrap_or_else(|| request.request_id.reply_id()),
        role: Role::Assistant,
        text: String::new(),
        model: request.model,
        status,
        request_id: Some(request.request_id),
        // A retried request keeps its last attempt's error; only a failure is shown with one.
        error: request.error.filter(|_| status == MessageStatus::Failed),
        reply_id: None,
        variants: Vec::new(),
        selected: None,
        created_at: request.created_at,
    })
}
