//! The `EventBus` port: how a worker's news reaches the API instance that holds a client's
//! event stream (`GET /v1/events`) or long poll, even when the two run in different processes.
//!
//! Events carry increasing ids, so a client that reconnects with `Last-Event-ID` is replayed
//! what it missed (events are kept for [`RETENTION_MS`]). Adapters: [`sqlite`] (one machine,
//! any number of processes) and [`aws`] (DynamoDB, SNS and an SQS inbox per API instance: any
//! number of hosts); both hand events to the streams of a process through [`fanout`].

pub mod aws;
pub mod fanout;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::domain::RequestRecord;
use crate::ids::RequestId;
use crate::Result;

pub use sqlite::SqliteEventBus;

/// How long events stay replayable.
pub const RETENTION_MS: i64 = 60 * 60 * 1000;

/// What a client is told, as one type: its SSE `event:` name and JSON `data:` come from
/// [`Event::to_parts`], and everything that reads stored events turns them back with
/// [`Event::from_parts`], so the name of an event and the shape of its data are written once.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `request.updated`: a request's record, each time it changes. Boxed: a record is large
    /// next to a delta.
    RequestUpdated(Box<RequestRecord>),
    /// `message.delta`: a piece of the reply a request is writing.
    MessageDelta(Delta),
}

/// The data of a `message.delta` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub request_id: RequestId,
    pub text: String,
}

const REQUEST_UPDATED: &str = "request.updated";
const MESSAGE_DELTA: &str = "message.delta";

impl Event {
    pub fn updated(record: &RequestRecord) -> Event {
        Event::RequestUpdated(Box::new(record.clone()))
    }

    pub fn delta(request_id: &RequestId, text: &str) -> Event {
        Event::MessageDelta(Delta {
            request_id: request_id.clone(),
            text: text.to_owned(),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Event::RequestUpdated(_) => REQUEST_UPDATED,
            Event::MessageDelta(_) => MESSAGE_DELTA,
        }
    }

    /// The event's name and its data as JSON text: how it is stored and sent.
    pub fn to_parts(&self) -> Result<(&'static str, String)> {
        let data = match self {
            Event::RequestUpdated(record) => serde_json::to_string(record)?,
            Event::MessageDelta(delta) => serde_json::to_string(delta)?,
        };
        Ok((self.name(), data))
    }

    /// The event stored as `name` and `data`; `None` for a name this version does not know
    /// (a newer writer's, during a rolling deploy) or data that does not parse.
    pub fn from_parts(name: &str, data: &str) -> Option<Event> {
        let event = match name {
            REQUEST_UPDATED => {
                serde_json::from_str(data).map(|r| Event::RequestUpdated(Box::new(r)))
            }
            MESSAGE_DELTA => serde_json::from_str(data).map(Event::MessageDelta),
            _ => return None,
        };
        event
            .inspect_err(|e| tracing::warn!(%name, error = %e, "stored event does not parse"))
            .ok()
    }

    /// The request the event is about.
    pub fn request_id(&self) -> &RequestId {
        match self {
            Event::RequestUpdated(record) => &record.request_id,
            Event::MessageDelta(delta) => &delta.request_id,
        }
    }
}

/// An event as subscribers get it: with its id and owner, and its data as the JSON text it was
/// stored as, so fanning it out to many streams serialises nothing again.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// Increasing id; the SSE `id:` field.
    pub id: u64,
    pub user_id: String,
    pub event: Event,
    pub data: String,
}

impl Published {
    /// A stored event, or `None` when this version cannot read it (see [`Event::from_parts`]).
    pub fn from_stored(id: u64, user_id: String, name: &str, data: String) -> Option<Published> {
        let event = Event::from_parts(name, &data)?;
        Some(Published {
            id,
            user_id,
            event,
            data,
        })
    }
}

#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    async fn publish(&self, user_id: &str, event: &Event) -> Result<()>;

    /// The user's events from now on, preceded by those after `after` when given. Shared
    /// (`Arc`): one event fans out to every stream of its user without a copy each.
    async fn subscribe(
        &self,
        user_id: &str,
        after: Option<u64>,
    ) -> Result<BoxStream<'static, Arc<Published>>>;

    /// Starts taking in, for the streams and long polls of this process, what other processes
    /// publish; the API calls it once as it starts. The task it returns ends after `shutdown`,
    /// having removed what it set up. (The SQLite bus's tailer runs from the start: nothing
    /// to do.)
    async fn listen(&self, shutdown: CancellationToken) -> Result<tokio::task::JoinHandle<()>> {
        let _ = shutdown;
        Ok(tokio::spawn(async {}))
    }

    /// Notes a request this process accepted, for [`known_request`](EventBus::known_request).
    fn note_accepted(&self, user_id: &str, record: &RequestRecord) {
        let _ = (user_id, record);
    }

    /// The latest state of the user's request this process knows of without a read (its
    /// recent updates, its own accepts): a final one may be answered as it is; a pending one
    /// only tells a long poll that the request is the user's and where to start waiting.
    fn known_request(&self, user_id: &str, request_id: &RequestId) -> Option<RequestRecord> {
        let _ = (user_id, request_id);
        None
    }

    /// The updates (`request.updated`) of one request of the user, from now on — what a long
    /// poll waits for; its other news (`message.delta`) is left out, so a waiter wakes only when
    /// the record changed. Events committed just before the call may or may not arrive, so a
    /// caller reads the request (or takes what `known_request` says) after subscribing. This default filters the user's stream; an
    /// adapter that can route by request does better.
    async fn watch_request(
        &self,
        user_id: &str,
        request_id: &RequestId,
    ) -> Result<BoxStream<'static, Arc<Published>>> {
        use futures::StreamExt;
        let id = request_id.to_owned();
        Ok(self
            .subscribe(user_id, None)
            .await?
            .filter(move |e| {
                let update = matches!(&e.event, Event::RequestUpdated(r) if r.request_id == id);
                futures::future::ready(update)
            })
            .boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_reads_back_as_it_was_stored() {
        let delta = Event::delta(&"req_1".into(), "Elementary");
        let (name, data) = delta.to_parts().unwrap();
        assert_eq!(name, "message.delta");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&data).unwrap(),
            serde_json::json!({ "request_id": "req_1", "text": "Elementary" })
        );
        assert_eq!(Event::from_parts(name, &data), Some(delta));
    }

    #[test]
    fn what_this_version_cannot_read_is_left_out() {
        assert_eq!(Event::from_parts("request.renamed", "{}"), None);
        assert_eq!(Event::from_parts("message.delta", "not json"), None);
        assert!(Published::from_stored(1, "alice".into(), "message.delta", "{}".into()).is_none());
    }
}
