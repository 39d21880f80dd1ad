//! The SNS topic every committed event is announced on, and the subscriptions of the API
//! instances' inboxes to it.

use aws_sdk_sns::types::PublishBatchRequestEntry;
use aws_sdk_sns::Client;
use serde::{Deserialize, Serialize};

use super::super::Published;
use crate::error::Report;
use crate::{Error, Result};

/// SNS's limit on one message, and on all the messages of one `PublishBatch` together.
const MAX_PAYLOAD: usize = 256 * 1024;
/// SNS's limit on the messages of one `PublishBatch`.
const MAX_BATCH: usize = 10;

/// What an announcement carries: a user's stored events, whole, so an inbox needs no read to
/// pass them on. The events of one write (a settlement's last fragment and its
/// `request.updated`) travel in one message: one delivery to each inbox, not one per event.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Announcement {
    pub user_id: String,
    #[serde(default)]
    pub events: Vec<Announced>,
    /// One event, flat beside `user_id`: how a single event is sent, the form instances
    /// before grouped announcements read (see `encode`).
    #[serde(default, flatten, skip_serializing)]
    pub single: Option<Announced>,
}

/// A single event's announcement, as every version reads it.
#[derive(Serialize)]
struct Flat<'a> {
    user_id: &'a str,
    #[serde(flatten)]
    event: &'a Announced,
}

/// An announcement as sent: one event in the flat form every version reads; several in
/// `events`, which instances before this version drop (so a rolling deploy updates the API,
/// the readers, before the workers; dropped news reaches streams as a gap at the user's next
/// event or on reconnect, and long polls on their re-read).
fn encode(a: &Announcement) -> String {
    match a.events.as_slice() {
        [one] => serde_json::to_string(&Flat {
            user_id: &a.user_id,
            event: one,
        }),
        _ => serde_json::to_string(a),
    }
    .unwrap_or_default()
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Announced {
    pub id: u64,
    pub name: String,
    pub data: String,
}

impl Announcement {
    /// The events announced, in order.
    pub(super) fn into_published(self) -> impl Iterator<Item = Published> {
        let user_id = self.user_id;
        self.single
            .into_iter()
            .chain(self.events)
            .filter_map(move |a| Published::from_stored(a.id, user_id.clone(), &a.name, a.data))
    }
}

#[derive(Clone)]
pub struct Topic {
    client: Client,
    arn: String,
}

impl Topic {
    /// The topic named by `name_or_arn`. An ARN (what the template passes) is taken as it is;
    /// a bare name (local set-ups, `aws-init`) is looked up with `CreateTopic`, which returns
    /// the existing topic of that name (SNS has no other call from name to ARN).
    pub async fn resolve_topic(client: Client, name_or_arn: &str) -> Result<Topic> {
        if name_or_arn.starts_with("arn:") {
            return Ok(Topic {
                client,
                arn: name_or_arn.to_owned(),
            });
        }
        let out = client
            .create_topic()
            .name(name_or_arn)
            .send()
            .await
            .map_err(|e| Error::queue("find the events topic", e))?;
        let arn = out
            .topic_arn
            .ok_or_else(|| Error::internal_msg("CreateTopic answered no ARN"))?;
        Ok(Topic { client, arn })
    }

    pub fn arn(&self) -> &str {
        &self.arn
    }

    /// Publishes `events`: one message per run of one user's events (as many as fit in a
    /// message), in batches of what SNS takes at once. Failures are logged: the events are
    /// stored already (see the module of the bus).
    pub async fn announce(&self, events: &[Published]) {
        let mut batch: Vec<PublishBatchRequestEntry> = Vec::new();
        let mut size = 0;
        for message in announcements(events) {
            if batch.len() == MAX_BATCH || size + message.len() > MAX_PAYLOAD {
                self.publish_entries(std::mem::take(&mut batch)).await;
                size = 0;
            }
            size += message.len();
            match PublishBatchRequestEntry::builder()
                .id(batch.len().to_string())
                .message(message)
                .build()
            {
                Ok(entry) => batch.push(entry),
                Err(err) => tracing::warn!(error = %err, "could not build an announcement"),
            }
        }
        self.publish_entries(batch).await;
    }

    /// Publishes one batch; entries SNS reports failed are sent once more (the SDK already
    /// retries a failed call as a whole).
    async fn publish_entries(&self, entries: Vec<PublishBatchRequestEntry>) {
        let mut entries = entries;
        for last_try in [false, true] {
            if entries.is_empty() {
                return;
            }
            let sent = self
                .client
                .publish_batch()
                .topic_arn(&self.arn)
                .set_publish_batch_request_entries(Some(entries.clone()))
                .send()
                .await;
            let out = match sent {
                Ok(out) => out,
                Err(e) => {
                    let e = Error::queue("announce events", e);
                    tracing::warn!(error = %Report(&e), "events were not announced");
                    return;
                }
            };
            let failed: Vec<String> = out.failed().iter().map(|f| f.id().to_owned()).collect();
            if failed.is_empty() {
                return;
            }
            if last_try {
                tracing::warn!(failed = failed.len(), "some events were not announced");
                return;
            }
            entries.retain(|e| failed.iter().any(|id| id == e.id()));
        }
    }

    /// Subscribes an inbox queue, its messages as published (no SNS envelope). Returns the
    /// subscription's ARN.
    pub async fn subscribe_inbox(&self, queue_arn: &str) -> Result<String> {
        let out = self
            .client
            .subscribe()
            .topic_arn(&self.arn)
            .protocol("sqs")
            .endpoint(queue_arn)
            .attributes("RawMessageDelivery", "true")
            .return_subscription_arn(true)
            .send()
            .await
            .map_err(|e| Error::queue("subscribe the inbox", e))?;
        out.subscription_arn
            .ok_or_else(|| Error::internal_msg("Subscribe answered no ARN"))
    }

    pub async fn unsubscribe_inbox(&self, subscription_arn: &str) -> Result<()> {
        self.client
            .unsubscribe()
            .subscription_arn(subscription_arn)
            .send()
            .await
            .map_err(|e| Error::queue("unsubscribe an inbox", e))?;
        Ok(())
    }

    /// Every SQS subscription of the topic: (subscription ARN, queue ARN).
    pub async fn inbox_subscriptions(&self) -> Result<Vec<(String, String)>> {
        let mut found = Vec::new();
        let mut next = None;
        loop {
            let out = self
                .client
                .list_subscriptions_by_topic()
                .topic_arn(&self.arn)
                .set_next_token(next)
                .send()
                .await
                .map_err(|e| Error::queue("list the topic's subscriptions", e))?;
            for sub in out.subscriptions() {
                if let (Some("sqs"), Some(arn), Some(endpoint)) =
                    (sub.protocol(), sub.subscription_arn(), sub.endpoint())
                {
                    found.push((arn.to_owned(), endpoint.to_owned()));
                }
            }
            next = out.next_token;
            if next.is_none() {
                return Ok(found);
            }
        }
    }
}

/// The messages that announce `events`: consecutive events of one user share a message while
/// it stays under SNS's limit. An event too big to announce alone is left out (streams read it
/// from the table as a gap at the user's next event; long polls on their re-read).
fn announcements(events: &[Published]) -> Vec<String> {
    let mut messages = Vec::new();
    let mut open: Option<Announcement> = None;
    for e in events {
        let event = Announced {
            id: e.id,
            name: e.event.name().to_owned(),
            data: e.data.clone(),
        };
        if let Some(a) = open.as_mut().filter(|a| a.user_id == e.user_id) {
            a.events.push(event);
            if encode(a).len() <= MAX_PAYLOAD {
                continue;
            }
            // Too big together: close the message without it, and start another.
            let event = a.events.pop();
            messages.extend(open.take().map(|a| encode(&a)));
            open = Some(Announcement {
                user_id: e.user_id.clone(),
                events: event.into_iter().collect(),
                single: None,
            });
        } else {
            messages.extend(open.take().map(|a| encode(&a)));
            open = Some(Announcement {
                user_id: e.user_id.clone(),
                events: vec![event],
                single: None,
            });
        }
        if open.as_ref().is_some_and(|a| encode(a).len() > MAX_PAYLOAD) {
            tracing::warn!(id = e.id, "event too large to announce");
            open = None;
        }
    }
    messages.extend(open.map(|a| encode(&a)));
    messages
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Event;
    use crate::ids::RequestId;

    fn published(user: &str, id: u64, text: &str) -> Published {
        let event = Event::delta(&RequestId::from("r1".to_owned()), text);
        let data = event.to_parts().unwrap().1;
        Published {
            id,
            user_id: user.into(),
            event,
            data,
        }
    }

    fn read(message: &str) -> Vec<(String, u64)> {
        serde_json::from_str::<Announcement>(message)
            .unwrap()
            .into_published()
            .map(|p| (p.user_id, p.id))
            .collect()
    }

    #[test]
    fn one_message_per_run_of_a_users_events() {
        let events = [
            published("a", 1, "x"),
            published("a", 2, "y"),
            published("b", 7, "z"),
            published("a", 3, "w"),
        ];
        let messages = announcements(&events);
        assert_eq!(messages.len(), 3);
        assert_eq!(read(&messages[0]), [("a".into(), 1), ("a".into(), 2)]);
        assert_eq!(read(&messages[1]), [("b".into(), 7)]);
        assert_eq!(read(&messages[2]), [("a".into(), 3)]);
    }

    #[test]
    fn a_message_stays_under_the_limit_and_a_giant_is_left_out() {
        let big = "x".repeat(MAX_PAYLOAD / 2);
        let events = [
            published("a", 1, &big),
            published("a", 2, &big),
            published("a", 3, &"y".repeat(MAX_PAYLOAD + 1)),
            published("a", 4, "small"),
        ];
        let messages = announcements(&events);
        assert!(messages.iter().all(|m| m.len() <= MAX_PAYLOAD));
        let ids: Vec<Vec<u64>> = messages
            .iter()
            .map(|m| read(m).into_iter().map(|(_, id)| id).collect())
            .collect();
        assert_eq!(ids, [vec![1], vec![2], vec![4]]);
    }

    #[test]
    fn one_event_is_sent_in_the_form_older_instances_read() {
        let messages = announcements(&[published("a", 4, "x")]);
        let flat: serde_json::Value = serde_json::from_str(&messages[0]).unwrap();
        assert_eq!(flat["id"], 4);
        assert_eq!(flat["name"], "message.delta");
        assert!(flat.get("events").is_none(), "{flat}");
    }

    #[test]
    fn an_announcement_of_one_event_from_an_older_instance_is_read() {
        let old = r#"{"user_id":"a","id":5,"name":"message.delta","data":"{\"request_id\":\"r1\",\"text\":\"hi\"}"}"#;
        assert_eq!(read(old), [("a".into(), 5)]);
    }
}
