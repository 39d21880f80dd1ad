//! The `EventBus` port: how a worker's news reaches the API instance that holds a client's
//! event stream (`GET /v1/events`) or long poll, even when the two run in different processes.
//!
//! Events carry increasing ids, so a client that reconnects with `Last-Event-ID` is replayed
//! what it missed (events are kept for [`RETENTION_MS`]). Adapters: [`sqlite`] (one machine,
//! any number of processes) and [`dynamodb`] (any number of hosts).

pub mod dynamodb;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::Result;

pub use sqlite::SqliteEventBus;

/// How long events stay replayable.
pub const RETENTION_MS: i64 = 60 * 60 * 1000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// Increasing id; the SSE `id:` field.
    pub id: u64,
    pub user_id: String,
    /// `request.updated`, `message.delta`, …
    pub name: String,
    pub data: serde_json::Value,
}

#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    async fn publish(&self, user_id: &str, name: &str, data: serde_json::Value) -> Result<()>;

    /// The user's events from now on, preceded by those after `after` when given. Shared
    /// (`Arc`): one event fans out to every stream of its user without a copy each.
    async fn subscribe(
        &self,
        user_id: &str,
        after: Option<u64>,
    ) -> Result<BoxStream<'static, Arc<Event>>>;

    /// The updates (`request.updated`) of one request of the user, from now on — what a long
    /// poll waits for; its other news (`message.delta`) is left out, so a waiter wakes only when
    /// the record changed. Events committed just before the call may or may not arrive, so a
    /// caller reads the request after subscribing. This default filters the user's stream; an
    /// adapter that can route by request does better.
    async fn watch_request(
        &self,
        user_id: &str,
        request_id: &str,
    ) -> Result<BoxStream<'static, Arc<Event>>> {
        use futures::StreamExt;
        let id = request_id.to_owned();
        Ok(self
            .subscribe(user_id, None)
            .await?
            .filter(move |e| {
                let update = e.name == REQUEST_UPDATED && request_of(e) == Some(id.as_str());
                futures::future::ready(update)
            })
            .boxed())
    }
}

/// The event that carries a request's record each time it changes.
pub const REQUEST_UPDATED: &str = "request.updated";

/// The request an event is about, if it names one.
pub fn request_of(event: &Event) -> Option<&str> {
    event.data.get("request_id").and_then(|v| v.as_str())
}
