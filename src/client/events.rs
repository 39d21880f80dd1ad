//! The user's event stream (`GET /v1/events`) as the terminal clients follow it: each event
//! passed on as it happens (`request.updated`, `message.delta`). The stream is read with
//! the `Authorization` header (no token in a URL) and resumed with `Last-Event-ID` whenever it
//! ends or breaks, so nothing is missed across reconnects.
//!
//! Written by hand over `reqwest`'s chunks: server-sent events are a line format of a few
//! rules, and the SSE client crates would bring a second HTTP stack.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use shared::domain::RequestRecord;
use tokio::sync::mpsc;

use super::http::Api;

/// One event of the stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

/// Splits off the complete events at the start of `buffer` (those ended by a blank line).
pub fn take_events(buffer: &mut String) -> Vec<SseEvent> {
    let mut out = Vec::new();
    // Normalised first: the format allows CRLF and CR line ends.
    if buffer.contains('\r') {
        *buffer = buffer.replace("\r\n", "\n").replace('\r', "\n");
    }
    while let Some(end) = buffer.find("\n\n") {
        let block: String = buffer.drain(..end + 2).collect();
        let mut event = SseEvent::default();
        for line in block.lines() {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => event.id = Some(value.to_owned()),
                "event" => event.event = value.to_owned(),
                "data" => {
                    if !event.data.is_empty() {
                        event.data.push('\n');
                    }
                    event.data.push_str(value);
                }
                // Comments (`: ...`) and `retry:` carry nothing for this client.
                _ => {}
            }
        }
        if !event.data.is_empty() || !event.event.is_empty() {
            out.push(event);
        }
    }
    out
}

/// Follows the user's stream until `events` is closed, sending each event on. `up` tells
/// whether the stream is connected now.
pub async fn follow(api: Api, events: mpsc::UnboundedSender<SseEvent>, up: Arc<AtomicBool>) {
    let finished = events;
    let mut last_id: Option<String> = None;
    while !finished.is_closed() {
        let mut request = api
            .http
            .get(api.url("/v1/events"))
            .bearer_auth(api.token())
            .header("accept", "text/event-stream")
            // The client's 60 s deadline would cut a healthy stream.
            .timeout(Duration::from_secs(24 * 3600));
        if let Some(id) = &last_id {
            request = request.header("last-event-id", id);
        }
        match request.send().await {
            Ok(mut res) if res.status().is_success() => {
                up.store(true, Ordering::Relaxed);
                let (mut buffer, mut bytes) = (String::new(), Vec::new());
                while let Ok(Some(chunk)) = res.chunk().await {
                    // A character may be split between chunks: decode what is whole.
                    bytes.extend_from_slice(&chunk);
                    let whole = match std::str::from_utf8(&bytes) {
                        Ok(_) => bytes.len(),
                        Err(e) if e.error_len().is_none() => e.valid_up_to(),
                        Err(_) => bytes.len(),
                    };
                    buffer.push_str(&String::from_utf8_lossy(&bytes[..whole]));
                    bytes.drain(..whole);
                    for event in take_events(&mut buffer) {
                        if event.id.is_some() {
                            last_id.clone_from(&event.id);
                        }
                        if finished.send(event).is_err() {
                            return;
                        }
                    }
                }
            }
            // Refused (too many streams, rate limit) or unreachable: polling carries on.
            _ => {}
        }
        up.store(false, Ordering::Relaxed);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            () = finished.closed() => return,
        }
    }
}

/// The request a `request.updated` event shows finished, if it is one.
pub fn finished_record(event: &SseEvent) -> Option<RequestRecord> {
    if event.event != "request.updated" {
        return None;
    }
    let value: Value = serde_json::from_str(&event.data).ok()?;
    let record: RequestRecord = serde_json::from_value(value).ok()?;
    record.status.is_final().then_some(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_split_at_blank_lines_and_partial_ones_wait() {
        let mut buffer = String::from(
            ": hello\nretry: 1000\n\nid: 7\nevent: request.updated\ndata: {\"a\":\n\
             data: 1}\n\nid: 8\r\nevent: message.delta\r\ndata: x\r\n\r\nid: 9\nevent: part",
        );
        let events = take_events(&mut buffer);
        assert_eq!(
            events,
            [
                SseEvent {
                    id: Some("7".into()),
                    event: "request.updated".into(),
                    data: "{\"a\":\n1}".into()
                },
                SseEvent {
                    id: Some("8".into()),
                    event: "message.delta".into(),
                    data: "x".into()
                },
            ]
        );
        assert_eq!(buffer, "id: 9\nevent: part", "kept for the next chunk");
    }
}
