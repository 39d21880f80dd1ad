//! The API → worker contract: what a queued job says, and how it travels.
//!
//! The API [`Job::encode`]s a job into a queue message; a worker [`Job::decode`]s it from a
//! delivery. Both halves use this one type, and the message attribute names are private to this
//! module, so a renamed field breaks the build instead of a deployment where API and workers
//! run different versions.
//!
//! The body carries the ids, and the request as it was accepted: a job's first delivery runs
//! from that copy instead of reading the store (on AWS, a read per job saved), while a
//! redelivered or re-sent one reads the current state (its copy is dropped on decoding, see
//! [`Job::accepted`]); the worker's writes are conditional on the version, so a stale copy can
//! only waste work, never overwrite. The trace context, and on AWS the outbox item that holds
//! the job until a worker has it, travel as message attributes (SQS message attributes on
//! AWS), never in the body.

use serde::{Deserialize, Serialize};

use crate::domain::{RequestKind, RequestRecord};
use crate::ids::{ConversationId, MessageId, RequestId};
use crate::queue::{Attributes, Delivery, Outgoing};
use crate::Result;

/// Attribute names on the queue message.
const REQUEST_ID: &str = "request_id";
const HTTP_REQUEST_ID: &str = "http_request_id";
const TRACE_ID: &str = "trace_id";
const OUTBOX: &str = "outbox";
const RESENT: &str = "resent";

/// One job: the request a worker is to run, and the call that queued it.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub request_id: RequestId,
    pub user_id: String,
    pub kind: RequestKind,
    pub trace: TraceContext,
    /// The request as accepted (queued, version 1). After decoding, only on a first delivery
    /// of the first send: then it stands for the stored record until a write says otherwise.
    pub accepted: Option<RequestRecord>,
}

/// Ties a job to the HTTP call that queued it, for the worker's logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    /// The `x-request-id` of the HTTP call that queued the job.
    pub http_request_id: Option<String>,
    /// The distributed trace the call belonged to (from `X-Amzn-Trace-Id` or `traceparent`, or
    /// made up by the API).
    pub trace_id: Option<String>,
}

/// The message body, as it is on the wire (and as messages already queued have it).
#[derive(Serialize, Deserialize)]
struct Body {
    request_id: RequestId,
    user_id: String,
    kind: RequestKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    accepted: Option<RequestRecord>,
}

impl Job {
    /// The queue message of this job.
    pub fn encode(&self) -> Outgoing {
        let body = Body {
            request_id: self.request_id.clone(),
            user_id: self.user_id.clone(),
            kind: self.kind,
            accepted: self.accepted.clone(),
        };
        // Strings, enums and a record of them: serialising them cannot fail.
        let body = serde_json::to_string(&body).unwrap_or_default();
        let mut message = Outgoing::new(body).with(REQUEST_ID, &self.request_id);
        if let Some(id) = &self.trace.http_request_id {
            message = message.with(HTTP_REQUEST_ID, id);
        }
        if let Some(id) = &self.trace.trace_id {
            message = message.with(TRACE_ID, id);
        }
        message
    }

    /// The job a delivery carries; the parse error when its body is not a job (a message to
    /// dead-letter: no retry will make it one). Not an [`Error::Invalid`](crate::Error::Invalid): that is a client's
    /// mistake, answered with a 400; this is the queue's, kept whole for the dead letter.
    pub fn decode(delivery: &Delivery) -> Result<Job, serde_json::Error> {
        let body: Body = serde_json::from_str(&delivery.body)?;
        let attribute = |name| delivery.attributes.get(name).cloned();
        Ok(Job {
            request_id: body.request_id,
            user_id: body.user_id,
            kind: body.kind,
            trace: TraceContext {
                http_request_id: attribute(HTTP_REQUEST_ID),
                trace_id: attribute(TRACE_ID),
            },
            // A redelivery or a re-send may find the request moved on: it reads it.
            accepted: body
                .accepted
                .filter(|_| delivery.receive_count <= 1 && attribute(RESENT).is_none()),
        })
    }
}

/// Names the outbox item that holds a job until a worker has it (AWS accept): the worker's
/// start or settlement deletes it in the same transaction.
pub fn with_outbox(message: Outgoing, key: &str) -> Outgoing {
    message.with(OUTBOX, key)
}

/// The outbox item a delivered job names, if any.
pub fn outbox_of(delivery: &Delivery) -> Option<&str> {
    delivery.attributes.get(OUTBOX).map(String::as_str)
}

/// Marks a job sent again (by the outbox sweep): its copy of the request may be stale.
pub fn mark_resent(attributes: &mut Attributes) {
    attributes.insert(RESENT.into(), "1".into());
}

/// The attribute that names a job of another kind than a request's (its value is the kind).
const JOB_KIND: &str = "job";

/// A conversation's memory to bring up to date: the messages after `after` and before `until`
/// are to be folded into its summary. Queued by a chat job that saw turns fall out of the
/// model's context; a job of its own kind, on the chat queue, with no request behind it (its
/// user asked for nothing): retried and dead-lettered like the others. It is idempotent by
/// `after`: it runs only while the memory still covers exactly up to `after`, so a duplicate,
/// or a job overtaken by another fold or by its user's edit, does nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryJob {
    pub user_id: String,
    pub conversation_id: ConversationId,
    /// The last message the summary covered when the job was queued (none: nothing yet).
    pub after: Option<MessageId>,
    /// The first message not to fold (the oldest the model still sees in full, or later).
    pub until: MessageId,
    /// How many messages that is (at most; read back from `until`).
    #[serde(default = "fold_read")]
    pub messages: usize,
    /// Who the user talks to: how the summary names the persona's turns.
    pub persona_name: String,
}

/// A job queued before it said how many messages to read reads as many as a fold reads at most.
fn fold_read() -> usize {
    64
}

#[derive(Serialize, Deserialize)]
struct MemoryBody {
    memory: MemoryJob,
}

impl MemoryJob {
    const KIND: &'static str = "memory";

    /// Its queue message: in a group of its own per conversation, so that folds of one
    /// conversation run one at a time without holding back its chat turns. The body names
    /// both ends, so SQS's content-based deduplication drops a twin sent within five minutes.
    pub fn encode(&self) -> Outgoing {
        let body = MemoryBody {
            memory: self.clone(),
        };
        // Ids and strings: serialising them cannot fail.
        Outgoing::new(serde_json::to_string(&body).unwrap_or_default())
            .with(JOB_KIND, Self::KIND)
            .in_group(format!("{}/memory", self.conversation_id))
    }

    /// The memory job a delivery carries; `None` when it carries another kind of job.
    pub fn decode(delivery: &Delivery) -> Option<Result<MemoryJob, serde_json::Error>> {
        if delivery.attributes.get(JOB_KIND).map(String::as_str) != Some(Self::KIND) {
            return None;
        }
        Some(serde_json::from_str::<MemoryBody>(&delivery.body).map(|b| b.memory))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(message: Outgoing) -> Delivery {
        Delivery {
            message_id: "m1".into(),
            receipt: "r1".into(),
            body: message.body,
            attributes: message.attributes,
            receive_count: 1,
            group: None,
        }
    }

    #[test]
    fn a_memory_job_comes_out_of_the_queue_as_it_went_in_in_its_conversations_group() {
        let job = MemoryJob {
            user_id: "alice".into(),
            conversation_id: "conv_1".into(),
            after: Some("msg_3".into()),
            until: "msg_9".into(),
            messages: 6,
            persona_name: "Sherlock Holmes".into(),
        };
        let message = job.encode();
        assert_eq!(message.group.as_deref(), Some("conv_1/memory"));
        assert_eq!(
            MemoryJob::decode(&delivered(message)).unwrap().unwrap(),
            job
        );
    }

    #[test]
    fn a_job_comes_out_of_the_queue_as_it_went_in() {
        let job = Job {
            request_id: "req_1".into(),
            user_id: "alice".into(),
            kind: RequestKind::Chat,
            trace: TraceContext {
                http_request_id: Some("h-1".into()),
                trace_id: Some("t-1".into()),
            },
            accepted: None,
        };
        assert_eq!(Job::decode(&delivered(job.encode())).unwrap(), job);
        assert!(MemoryJob::decode(&delivered(job.encode())).is_none());
        let untraced = Job {
            trace: TraceContext::default(),
            ..job
        };
        assert_eq!(
            Job::decode(&delivered(untraced.encode())).unwrap(),
            untraced
        );
    }

    #[test]
    fn the_body_keeps_the_wire_format_of_messages_already_queued() {
        let old = r#"{"request_id":"req_1","user_id":"alice","kind":"persona"}"#;
        let job = Job::decode(&delivered(Outgoing::new(old))).unwrap();
        assert_eq!(
            (job.request_id.as_str(), job.kind),
            ("req_1", RequestKind::Persona)
        );
        let encoded: serde_json::Value = serde_json::from_str(&job.encode().body).unwrap();
        assert_eq!(
            encoded,
            serde_json::from_str::<serde_json::Value>(old).unwrap()
        );
    }

    #[test]
    fn the_accepted_copy_serves_only_a_first_delivery_of_the_first_send() {
        let record = RequestRecord::new(
            RequestKind::Persona,
            crate::domain::RequestInput::Persona { prompt: "p".into() },
            None,
        );
        let job = Job {
            request_id: record.request_id.clone(),
            user_id: "alice".into(),
            kind: RequestKind::Persona,
            trace: TraceContext::default(),
            accepted: Some(record.clone()),
        };
        let first = delivered(job.encode());
        assert_eq!(Job::decode(&first).unwrap().accepted, Some(record));
        let again = Delivery {
            receive_count: 2,
            ..first.clone()
        };
        assert_eq!(Job::decode(&again).unwrap().accepted, None);
        let mut swept = job.encode();
        mark_resent(&mut swept.attributes);
        let swept = delivered(swept);
        assert_eq!(Job::decode(&swept).unwrap().accepted, None);
        let boxed = delivered(with_outbox(job.encode(), "OUTBOX#persona#1\n0001#req"));
        assert_eq!(outbox_of(&boxed), Some("OUTBOX#persona#1\n0001#req"));
        assert_eq!(outbox_of(&first), None);
    }

    #[test]
    fn a_body_that_is_not_a_job_fails_with_the_parse_error() {
        let e = Job::decode(&delivered(Outgoing::new("poison"))).expect_err("not a job");
        assert_eq!(e.classify(), serde_json::error::Category::Syntax);
        let wrong = r#"{"request_id":"req_1","user_id":"alice","kind":"nope"}"#;
        let e = Job::decode(&delivered(Outgoing::new(wrong))).expect_err("not a kind");
        assert_eq!(e.classify(), serde_json::error::Category::Data);
    }
}
