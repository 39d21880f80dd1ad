//! Accept, start and settle on the AWS backend, composed from the store, queue and event-bus
//! ports in the order that loses nothing a client was told about.
//!
//! Accept: the records (conversation ownership checked), then `SendMessage`, then the
//! idempotency key's answer; the `202` is sent only after all three. If the send fails, the
//! requests are marked failed and the client gets a 5xx it may retry with the same key.
//!
//! Not yet one unit of work: a process killed between the records and the send leaves a
//! request with no job (issue #8 asks for DynamoDB `TransactWriteItems` with an "enqueue
//! pending" marker and a sweeper that re-sends; that replaces this adapter's accept).
//! Settle writes the result record, then the request, then acknowledges the message; every
//! step is idempotent, so a worker killed between them is redelivered and converges.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Accept, AcceptOutcome, Ack, Atomic, Settle, Started};
use crate::domain::{ErrorBody, RequestInput, RequestKind, RequestRecord, RequestResult};
use crate::events::EventBus;
use crate::queue::{Delivery, Queue};
use crate::store::{Store, Transition};
use crate::{Error, Result};

pub struct AwsAtomic {
    pub store: Arc<dyn Store>,
    pub persona_queue: Arc<dyn Queue>,
    pub chat_queue: Arc<dyn Queue>,
    pub events: Arc<dyn EventBus>,
}

impl AwsAtomic {
    fn queue(&self, kind: RequestKind) -> &Arc<dyn Queue> {
        match kind {
            RequestKind::Persona => &self.persona_queue,
            RequestKind::Chat => &self.chat_queue,
        }
    }

    async fn publish(&self, user_id: &str, record: &RequestRecord) {
        match serde_json::to_value(record) {
            Ok(data) => {
                if let Err(e) = self.events.publish(user_id, "request.updated", data).await {
                    tracing::warn!(error = %e, "could not push a request update");
                }
            }
            Err(e) => tracing::error!(error = %e, "request is not serializable"),
        }
    }

    async fn store_result(
        &self,
        user_id: &str,
        record: &RequestRecord,
        result: RequestResult,
    ) -> Result<RequestResult> {
        Ok(match (result, &record.input) {
            (RequestResult::Persona(p), _) => {
                self.store.put_persona(user_id, &p).await?;
                // Read back: if a twin delivery stored first, its persona is the one that stands.
                let stored = self.store.get_persona(user_id, &p.persona_id).await?;
                RequestResult::Persona(stored.unwrap_or(p))
            }
            (
                RequestResult::Message(m),
                RequestInput::Chat {
                    conversation_id,
                    message_id,
                    ..
                },
            ) => RequestResult::Message(
                self.store
                    .put_reply(conversation_id, message_id, &m)
                    .await?,
            ),
            (RequestResult::Message(_), RequestInput::Persona { .. }) => {
                return Err(Error::Internal("a reply for a persona request".into()))
            }
        })
    }
}

#[async_trait]
impl Atomic for AwsAtomic {
    async fn accept(&self, a: Accept) -> Result<AcceptOutcome> {
        match &a.message {
            Some(m) => {
                let request = a
                    .requests
                    .first()
                    .ok_or_else(|| Error::Internal("a chat message needs its request".into()))?;
                if self
                    .store
                    .get_conversation(&a.user_id, &m.conversation_id)
                    .await?
                    .is_none()
                {
                    return Err(Error::NotFound);
                }
                self.store
                    .add_user_message(&a.user_id, &m.conversation_id, &m.message, request)
                    .await?;
            }
            None => {
                self.store
                    .create_requests(&a.user_id, &a.requests, a.batch.as_ref())
                    .await?
            }
        }
        let queue = self.queue(a.kind);
        // SQS takes at most 10 messages per call.
        for (jobs, requests) in a.jobs.chunks(10).zip(a.requests.chunks(10)) {
            if let Err(e) = queue.send(jobs).await {
                for r in requests {
                    let error = ErrorBody {
                        code: "enqueue_failed".into(),
                        message: "the request could not be queued; send it again".into(),
                    };
                    let _ = self
                        .store
                        .transition(&r.request_id, Transition::Fail { error })
                        .await;
                }
                return Err(e);
            }
        }
        if let Some(x) = &a.answer {
            self.store
                .idempotency_complete(&a.user_id, &x.key, x.status, &x.body)
                .await?;
        }
        Ok(AcceptOutcome::Recorded)
    }

    async fn start(&self, user_id: &str, request_id: &str, attempt: u32) -> Result<Started> {
        let Some(record) = self.store.get_request(user_id, request_id).await? else {
            return Ok(Started::Missing);
        };
        if record.status.is_final() {
            return Ok(Started::Finished(record));
        }
        let (record, _) = self
            .store
            .transition(request_id, Transition::Start { attempt })
            .await?;
        self.publish(user_id, &record).await;
        Ok(Started::Running(record))
    }

    async fn settle(&self, delivery: &Delivery, settle: Settle) -> Result<Option<RequestRecord>> {
        let Settle {
            kind,
            user_id,
            request_id,
            transition,
            ack,
        } = settle;
        let record = match self.store.get_request(&user_id, &request_id).await? {
            Some(record) if record.status.is_final() => Some(record),
            Some(record) => {
                let transition = match transition {
                    Transition::Succeed {
                        result,
                        usage,
                        model,
                        latency_ms,
                    } => Transition::Succeed {
                        result: Box::new(self.store_result(&user_id, &record, *result).await?),
                        usage,
                        model,
                        latency_ms,
                    },
                    other => other,
                };
                let (record, applied) = self.store.transition(&request_id, transition).await?;
                if applied {
                    self.publish(&user_id, &record).await;
                }
                Some(record)
            }
            None => None,
        };
        let queue = self.queue(kind);
        match ack {
            Ack::Delete => queue.delete(&delivery.receipt).await?,
            Ack::Retry { delay } => queue.change_visibility(&delivery.receipt, delay).await?,
            Ack::DeadLetter { reason } => queue.dead_letter(delivery, &reason).await?,
        }
        Ok(record)
    }
}
