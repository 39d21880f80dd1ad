//! The `Store` port: where personas, conversations, messages, requests, batches and
//! idempotency keys live.
//!
//! Every read the API makes takes the owner's user id, and a record of another user reads as
//! absent: the API cannot leak what it cannot fetch. The reads only a worker makes (a
//! conversation's history, a reply) go by the conversation's id, which the worker has from a
//! request whose owner was checked when it was accepted. Accounts are not here: they belong to
//! the identity provider (`crate::auth`: the embedded issuer's own tables, or Cognito). Every write a redelivered job could repeat is idempotent:
//! a persona is keyed by its request, a reply by the user message it answers, and request
//! states only move forward.
//!
//! The port is one narrow trait per kind of record, each in its own file — [`PersonaStore`],
//! [`ConversationStore`] (conversations and messages), [`RequestStore`] (requests, batches,
//! transitions), [`IdempotencyStore`], [`SyncStore`] (the change feed) — so a caller names only what it uses. [`Store`] is all of
//! them together (and [`Ping`]), implemented for every type that implements the parts: the
//! start-up code builds one `Arc<dyn Store>` per backend. Each adapter is a folder with a file
//! per trait: [`sqlite`] (embedded) and [`dynamodb`].

pub mod conversations;
pub mod dynamodb;
pub mod idempotency;
pub mod personas;
pub mod requests;
pub mod sqlite;
pub mod sync;

use async_trait::async_trait;

pub use conversations::{
    chat_context_in_reads, with_replies_in_flight, ChatContext, ConversationStore, Edit, Turn,
};
pub use idempotency::{IdempotencyBegin, IdempotencyStore, KeyClaim, StoredAnswer};
pub use personas::PersonaStore;
pub use requests::{RequestStore, Transition};
pub use sync::{Change, ChangeKind, ChangePage, SyncStore};

use crate::Result;

/// Readiness: whether the backend answers at all.
#[async_trait]
pub trait Ping: Send + Sync + 'static {
    /// Cheap round trip for readiness checks.
    async fn ping(&self) -> Result<()>;
}

/// The whole store: every part of the port, for code that holds one handle to all of it.
pub trait Store:
    PersonaStore + ConversationStore + RequestStore + IdempotencyStore + SyncStore + Ping
{
}

impl<T> Store for T where
    T: PersonaStore + ConversationStore + RequestStore + IdempotencyStore + SyncStore + Ping
{
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
