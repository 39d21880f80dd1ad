//! `GET /v1/events`: the user's server-sent event stream. Every change of one of the user's
//! requests arrives as `request.updated` (data: the request record), and text fragments of a
//! reply being written as `message.delta` (data: `{request_id, text}`). Each event has an id;
//! a client reconnecting with `Last-Event-ID` is sent what it missed. A user holds at most
//! `CHARACTERBOT_MAX_STREAMS_PER_USER` streams and long polls at once, and a stream ends after
//! `CHARACTERBOT_STREAM_MAX_SECS` (the client reconnects).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};

use crate::error::ApiError;
use crate::extract::Caller;
use crate::AppState;

/// How long a client waits before it reconnects (the SSE `retry:` field).
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

#[utoipa::path(get, path = "/v1/events", tag = "requests",
    params(("access_token" = Option<String>, Query, description = "For EventSource, which cannot send headers"),
           ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")),
    responses((status = 200, content_type = "text/event-stream", description = "request.updated and message.delta events")),
    security(("bearer" = [])))]
pub async fn stream(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let max = state.options.max_streams_per_user;
    let slot = state
        .slots
        .take(caller.id(), max)
        .ok_or(ApiError::TooManyStreams(max))?;
    let events = state.ports.events.subscribe(caller.id(), after).await?;
    // Ends on shutdown, or when the stream has lived its time: the client reconnects with
    // `Last-Event-ID` and misses nothing, and no connection is held forever.
    let shutdown = state.shutdown.clone().cancelled_owned();
    let lifetime = tokio::time::sleep(state.options.stream_max.max(Duration::from_secs(1)));
    let end = futures::future::select(Box::pin(shutdown), Box::pin(lifetime));
    let stream = events
        .map(move |e| {
            // The slot lives as long as the stream; dropping the stream gives it back.
            let _held = &slot;
            Ok(Event::default()
                .id(e.id.to_string())
                .event(e.event.name())
                .data(&e.data))
        })
        .take_until(end);
    // A first comment flushes the headers at once, so clients know they are subscribed; its
    // `retry:` tells `EventSource` to reconnect a second after the stream ends (it sends
    // `Last-Event-ID` by itself).
    let hello = futures::stream::once(async {
        Ok(Event::default()
            .comment("subscribed")
            .retry(RECONNECT_AFTER))
    });
    Ok(Sse::new(hello.chain(stream)).keep_alive(KeepAlive::default()))
}
