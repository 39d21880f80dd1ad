//! The `Store` port: where personas, conversations, messages, requests, batches and
//! idempotency keys live.
//!
//! Every read takes the owner's user id, and a record of another user reads as absent: the API
//! cannot leak what it cannot fetch. Every write a redelivered job could repeat is idempotent:
//! a persona is keyed by its request, a reply by the user message it answers, and request
//! states only move forward.

pub mod dynamodb;
pub mod sqlite;

use async_trait::async_trait;

use crate::domain::{
    Batch, Conversation, ErrorBody, Message, Page, Persona, RequestRecord, RequestResult, Usage,
};
use crate::Result;

/// A state change of a request. Changes that would move a finished request are refused.
#[derive(Debug, Clone)]
pub enum Transition {
    /// A worker starts the job: one more attempt. Counted by the store, not from the queue's
    /// receive count, so a delivery handed back unstarted (or interrupted) costs no attempt.
    Start,
    /// The attempt failed transiently; the job will be tried again.
    Retry {
        error: ErrorBody,
    },
    /// The worker stopped (shutdown) before the attempt finished and handed the message back:
    /// queued again, and the attempt is not counted, so deploys never use up a job's attempts.
    Release {
        error: ErrorBody,
    },
    Succeed {
        /// Boxed: a persona is large next to the other variants.
        result: Box<RequestResult>,
        usage: Usage,
        model: String,
        latency_ms: u64,
    },
    Fail {
        error: ErrorBody,
    },
}

/// See [`Store::chat_context`].
#[derive(Debug, Clone)]
pub struct ChatContext {
    pub conversation: Conversation,
    pub persona: Option<Persona>,
    /// Oldest first.
    pub history: Vec<Message>,
}

/// What an `Idempotency-Key` lookup found.
#[derive(Debug, Clone, PartialEq)]
pub enum IdempotencyBegin {
    /// First use (or an abandoned claim taken over): the caller handles the request and then
    /// completes or releases the key. `first_ms` is when the key was first claimed, the same
    /// on a takeover, so ids derived from it come out the same on a retry. `claim` names this
    /// claim (the time it was taken, in ms; a takeover is always later): completing or
    /// releasing the key takes it, so a handler whose claim was taken over changes nothing.
    Started { first_ms: i64, claim: i64 },
    /// Already answered: replay this status and body.
    Replay { status: u16, body: String },
    /// The first request with this key is still being handled.
    InFlight,
    /// The key was used with a different request.
    Mismatch,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a persona once; a second put with the same id keeps the first.
    async fn put_persona(&self, user_id: &str, persona: &Persona) -> Result<()>;
    async fn get_persona(&self, user_id: &str, persona_id: &str) -> Result<Option<Persona>>;
    /// Newest first.
    async fn list_personas(
        &self,
        user_id: &str,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Persona>>;
    /// Returns whether something was deleted.
    async fn delete_persona(&self, user_id: &str, persona_id: &str) -> Result<bool>;

    async fn create_conversation(&self, user_id: &str, conversation: &Conversation) -> Result<()>;
    async fn get_conversation(
        &self,
        user_id: &str,
        conversation_id: &str,
    ) -> Result<Option<Conversation>>;
    /// Newest first.
    async fn list_conversations(
        &self,
        user_id: &str,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Conversation>>;

    /// Appends a user message to a conversation and records the chat request that will answer
    /// it, in one step.
    async fn add_user_message(
        &self,
        user_id: &str,
        conversation_id: &str,
        message: &Message,
        request: &RequestRecord,
    ) -> Result<()>;
    /// Stores the reply to user message `reply_to` unless one exists; returns the stored reply
    /// (the earlier one, on a redelivery).
    async fn put_reply(
        &self,
        conversation_id: &str,
        reply_to: &str,
        reply: &Message,
    ) -> Result<Message>;
    async fn get_reply(&self, conversation_id: &str, reply_to: &str) -> Result<Option<Message>>;
    /// A conversation's messages, oldest first.
    async fn list_messages(
        &self,
        user_id: &str,
        conversation_id: &str,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Message>>;
    /// Up to `limit` messages that precede `message_id` (excluded), oldest first.
    async fn history_before(
        &self,
        conversation_id: &str,
        message_id: &str,
        limit: usize,
    ) -> Result<Vec<Message>>;

    /// What a chat job reads before calling the model: the user's conversation (absent: `None`
    /// and nothing else), its persona (`None` if deleted) and up to `history_limit` messages
    /// before `message_id`. One round trip where the backend can; this default makes three.
    async fn chat_context(
        &self,
        user_id: &str,
        conversation_id: &str,
        message_id: &str,
        history_limit: usize,
    ) -> Result<Option<ChatContext>> {
        let Some(conversation) = self.get_conversation(user_id, conversation_id).await? else {
            return Ok(None);
        };
        let persona = self.get_persona(user_id, &conversation.persona_id).await?;
        let history = self
            .history_before(conversation_id, message_id, history_limit)
            .await?;
        Ok(Some(ChatContext {
            conversation,
            persona,
            history,
        }))
    }

    /// Records new requests, and their batch when there is one, in one step.
    async fn create_requests(
        &self,
        user_id: &str,
        requests: &[RequestRecord],
        batch: Option<&Batch>,
    ) -> Result<()>;
    async fn get_request(&self, user_id: &str, request_id: &str) -> Result<Option<RequestRecord>>;
    /// Applies a transition. Returns the record and whether the transition was applied (false
    /// when the request had already finished).
    async fn transition(
        &self,
        request_id: &str,
        transition: Transition,
    ) -> Result<(RequestRecord, bool)>;
    /// A batch with its counts as of now.
    async fn get_batch(&self, user_id: &str, batch_id: &str) -> Result<Option<Batch>>;

    /// Claims an idempotency key for a request whose fingerprint is given. A claim older than
    /// `lock_ms` is considered abandoned (its handler died) and may be taken over.
    async fn idempotency_begin(
        &self,
        user_id: &str,
        key: &str,
        fingerprint: &str,
        lock_ms: i64,
        ttl_ms: i64,
    ) -> Result<IdempotencyBegin>;
    /// Stores the answer to replay for the key, if `claim` still holds it.
    async fn idempotency_complete(
        &self,
        user_id: &str,
        key: &str,
        claim: i64,
        status: u16,
        body: &str,
    ) -> Result<()>;
    /// Forgets a claim whose request failed without an answer worth replaying, if `claim`
    /// still holds the key.
    async fn idempotency_release(&self, user_id: &str, key: &str, claim: i64) -> Result<()>;

    /// Cheap round trip for readiness checks.
    async fn ping(&self) -> Result<()>;
}

impl Transition {
    /// Applies the transition to a record in memory; false (and no change) when the record has
    /// already finished. Every store adapter runs this inside its own atomic update, so the
    /// forward-only rule is written once.
    pub fn apply(self, record: &mut RequestRecord) -> bool {
        use crate::domain::RequestStatus;
        if record.status.is_final() {
            return false;
        }
        match self {
            Transition::Start => {
                record.status = RequestStatus::Running;
                record.attempts += 1;
            }
            Transition::Retry { error } => {
                record.status = RequestStatus::Queued;
                record.error = Some(error);
            }
            Transition::Release { error } => {
                record.status = RequestStatus::Queued;
                record.attempts = record.attempts.saturating_sub(1);
                record.error = Some(error);
            }
            Transition::Succeed {
                result,
                usage,
                model,
                latency_ms,
            } => {
                record.status = RequestStatus::Succeeded;
                record.result = Some(*result);
                record.usage = Some(usage);
                record.model = Some(model);
                record.latency_ms = Some(latency_ms);
                record.error = None;
            }
            Transition::Fail { error } => {
                record.status = RequestStatus::Failed;
                record.error = Some(error);
            }
        }
        record.updated_at = crate::time::now_rfc3339();
        true
    }
}

/// Opaque pagination tokens: clients must not build or parse them.
pub mod token {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    pub fn encode(raw: &str) -> String {
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// `None` for a token that was not made by [`encode`].
    pub fn decode(token: &str) -> Option<String> {
        let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
        String::from_utf8(bytes).ok()
    }
}
