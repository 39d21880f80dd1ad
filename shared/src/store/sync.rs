//! The sync port: every record of a user that changed after a position in the user's change
//! feed, oldest change first, a record at most once per page (as it is now), deletions as
//! tombstones. A record may come again on a later page or sync (changed again since, or, on
//! DynamoDB, changed in the last few seconds): clients apply changes by id. A client that was away catches up from its last position in one call, however
//! long ago that was (the event stream keeps only a few minutes).
//!
//! Each backend keeps the feed beside the records, written with them:
//! - SQLite: a `sync_log` table that triggers on the four record tables append to (a row per
//!   change, keyed by the user and a per-user sequence; a page reads a bounded run of rows);
//! - DynamoDB: the records carry `sync_user`/`sync_at` attributes, indexed by the sparse
//!   global index `by_change`, and a deletion writes a tombstone item (kept 30 days: a
//!   position given out longer ago than that is refused with `Error::Expired`, and the client
//!   starts over).
//!
//! A position is the backend's own (a sequence number, a time); the API binds it to its user
//! and makes it opaque ([`crate::store::token`]). A conversation's derived fields (`title`
//! when not given, `last_message_at`, `preview`) follow from its messages, which the feed
//! carries: the conversation itself is listed when it is made, renamed, edited or deleted.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ids::ConversationId;
use crate::Result;

/// Which kind of record changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Persona,
    Conversation,
    Message,
    Request,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Persona => "persona",
            ChangeKind::Conversation => "conversation",
            ChangeKind::Message => "message",
            ChangeKind::Request => "request",
        }
    }

    pub fn parse(s: &str) -> Option<ChangeKind> {
        Some(match s {
            "persona" => ChangeKind::Persona,
            "conversation" => ChangeKind::Conversation,
            "message" => ChangeKind::Message,
            "request" => ChangeKind::Request,
            _ => return None,
        })
    }
}

/// One changed record, as it is now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Change {
    pub kind: ChangeKind,
    /// The record's id (`persona_id`, `conversation_id`, `message_id` or `request_id`).
    pub id: String,
    /// A message's conversation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub conversation_id: Option<ConversationId>,
    /// A tombstone: the record was deleted (a deleted conversation's messages go with it).
    pub deleted: bool,
    /// The record as the API shows it elsewhere (a reply with its `variants`); absent for a
    /// tombstone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub record: Option<serde_json::Value>,
}

/// A page of the feed.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangePage {
    pub changes: Vec<Change>,
    /// Where the next call resumes (the backend's position); `None` when it stays where it
    /// was asked from (nothing new).
    pub position: Option<String>,
    /// More changes wait after this page.
    pub has_more: bool,
}

#[async_trait]
pub trait SyncStore: Send + Sync + 'static {
    /// Up to `limit` changes of `user_id`'s records after `position` (from the beginning when
    /// `None`). `Invalid` for a position this backend did not make.
    async fn changes(
        &self,
        user_id: &str,
        position: Option<&str>,
        limit: usize,
    ) -> Result<ChangePage>;
}
