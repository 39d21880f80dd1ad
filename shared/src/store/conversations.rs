//! The conversations port: conversations and their messages, a user message and its reply
//! paired by turn. A conversation keeps a snapshot of its persona as it was when the
//! conversation began: the model answers from it, and it outlives the persona (a deleted
//! persona's conversations stay readable and refuse new messages: `Error::PersonaDeleted`). The rule that a conversation's messages are read only by its owner is
//! written here once ([`ConversationStore::list_messages`]), not in every adapter.

use async_trait::async_trait;

use super::PersonaStore;
use crate::domain::{Conversation, Message, Page, Persona, RequestRecord};
use crate::ids::{ConversationId, MessageId};
use crate::{Error, Result};

/// See [`ConversationStore::chat_context`].
#[derive(Debug, Clone)]
pub struct ChatContext {
    pub conversation: Conversation,
    pub persona: Option<Persona>,
    /// Oldest first.
    pub history: Vec<Message>,
}

#[async_trait]
pub trait ConversationStore: Send + Sync + 'static {
    /// Records a new conversation with `persona`'s snapshot; `NotFound` when the persona is
    /// not (or no longer) the user's.
    async fn create_conversation(
        &self,
        user_id: &str,
        conversation: &Conversation,
        persona: &Persona,
    ) -> Result<()>;
    async fn get_conversation(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
    ) -> Result<Option<Conversation>>;
    /// Newest first.
    async fn list_conversations(
        &self,
        user_id: &str,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Conversation>>;

    /// Appends a user message to a conversation and records the chat request that will answer
    /// it, in one step; `NotFound` (and nothing stored) when the conversation is not the
    /// user's, `PersonaDeleted` when its persona is gone.
    async fn add_user_message(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        message: &Message,
        request: &RequestRecord,
    ) -> Result<()>;
    /// Stores the reply to user message `reply_to` unless one exists; returns the stored reply
    /// (the earlier one, on a redelivery).
    async fn put_reply(
        &self,
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
    }))
}
