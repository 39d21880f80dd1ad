//! The API → worker contract: what a queued job says, and how it travels.
//!
//! The API [`Job::encode`]s a job into a queue message; a worker [`Job::decode`]s it from a
//! delivery. Both halves use this one type, and the message attribute names are private to this
//! module, so a renamed field breaks the build instead of a deployment where API and workers
//! run different versions.
//!
//! The body carries ids only: payloads live in the store, so a message is tiny and a
//! redelivered one reads the current state instead of a stale copy. The trace context travels
//! as message attributes (SQS message attributes on AWS), never in the body.

use serde::{Deserialize, Serialize};

use crate::domain::RequestKind;
use crate::ids::RequestId;
use crate::queue::{Delivery, Outgoing};
use crate::Result;

/// Attribute names on the queue message.
const REQUEST_ID: &str = "request_id";
const HTTP_REQUEST_ID: &str = "http_request_id";
const TRACE_ID: &str = "trace_id";

/// One job: the request a worker is to run, and the call that queued it.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub request_id: RequestId,
    pub user_id: String,
    pub kind: RequestKind,
    pub trace: TraceContext,
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
}

impl Job {
    /// The queue message of this job.
    pub fn encode(&self) -> Outgoing {
        let body = Body {
            request_id: self.request_id.clone(),
            user_id: self.user_id.clone(),
            kind: self.kind,
        };
        // Three strings and an enum: serialising them cannot fail.
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
        })
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
        }
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
        };
        assert_eq!(Job::decode(&delivered(job.encode())).unwrap(), job);
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
    fn a_body_that_is_not_a_job_fails_with_the_parse_error() {
        let e = Job::decode(&delivered(Outgoing::new("poison"))).expect_err("not a job");
        assert_eq!(e.classify(), serde_json::error::Category::Syntax);
        let wrong = r#"{"request_id":"req_1","user_id":"alice","kind":"nope"}"#;
        let e = Job::decode(&delivered(Outgoing::new(wrong))).expect_err("not a kind");
        assert_eq!(e.classify(), serde_json::error::Category::Data);
    }
}
