//! The requests port: requests, the batches that group them, and the moves of a request's
//! state. The forward-only rule is [`Transition::apply`], written once here and run by every
//! adapter inside its own atomic update.

use async_trait::async_trait;

use crate::domain::{Batch, ErrorBody, Page, RequestRecord, RequestResult, Usage};
use crate::ids::{BatchId, RequestId};
use crate::Result;

/// A state change of a request. Changes that would move a finished request are refused.
#[derive(Debug, Clone)]
pub enum Transition {
    /// A worker starts the job: one more attempt. Counted by the store, not from the queue's
    /// receive count, so a delivery handed back unstarted (or interrupted) costs no attempt.
    Start,
    /// The attempt failed transiently; the job will be tried again.
    Retry {
        error: ErrorBody,
    },
    /// The worker stopped (shutdown) before the attempt finished and handed the message back:
    /// queued again, and the attempt is not counted, so deploys never use up a job's attempts.
    Release {
        error: ErrorBody,
    },
    Succeed {
        /// Boxed: a persona is large next to the other variants.
        result: Box<RequestResult>,
        usage: Usage,
        model: String,
        latency_ms: u64,
    },
    Fail {
        error: ErrorBody,
    },
    /// Its user cancels it: a queued request ends `cancelled` at once; a running one is
    /// marked (`cancel_requested`) for its worker, which stops it (`Stopped`).
    Cancel,
    /// A worker stopped a job whose cancel was asked: `cancelled`, with what it had written
    /// so far (a chat reply's beginning), if anything.
    Stopped {
        result: Option<Box<RequestResult>>,
    },
}

#[async_trait]
pub trait RequestStore: Send + Sync + 'static {
    /// Records new requests, and their batch when there is one, in one step.
    async fn create_requests(
        &self,
        user_id: &str,
        requests: &[RequestRecord],
        batch: Option<&Batch>,
    ) -> Result<()>;
    async fn get_request(
        &self,
        user_id: &str,
        request_id: &RequestId,
    ) -> Result<Option<RequestRecord>>;
    /// Applies a transition. Returns the record and whether the transition was applied (false
    /// when the request had already finished).
    async fn transition(
        &self,
        request_id: &RequestId,
        transition: Transition,
    ) -> Result<(RequestRecord, bool)>;
    /// A batch with its counts as of now.
    async fn get_batch(&self, user_id: &str, batch_id: &BatchId) -> Result<Option<Batch>>;
    /// The user's batches, newest first, each counted as [`RequestStore::get_batch`] does.
    async fn list_batches(
        &self,
        user_id: &str,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Batch>>;
    /// The user's requests of these ids, in the order given (those not found left out).
    async fn batch_requests(
        &self,
        user_id: &str,
        request_ids: &[RequestId],
    ) -> Result<Vec<RequestRecord>>;
    /// Records that the user cancelled the batch (its first cancel's time is kept); false
    /// when the user has no such batch. Its requests are cancelled one by one by the caller.
    async fn mark_batch_cancelled(&self, user_id: &str, batch_id: &BatchId) -> Result<bool>;
}

impl Transition {
    /// This settlement, for a reply whose turn was edited or rewound away while the job ran
    /// (its request was cancelled then): no reply to store, and the request ends `cancelled`.
    pub fn superseded(self) -> Self {
        match self {
            Transition::Succeed { .. } | Transition::Stopped { .. } => {
                Transition::Stopped { result: None }
            }
            other => other,
        }
    }

    /// This settlement, for a reply whose conversation was deleted while the job ran: no
    /// reply to store, and a success becomes a failure (`conversation_not_found`).
    pub fn without_conversation(self) -> Self {
        match self {
            Transition::Succeed { .. } => Transition::Fail {
                error: ErrorBody {
                    code: "conversation_not_found".into(),
                    message: "the conversation was deleted while its reply was being written"
                        .into(),
                },
            },
            Transition::Stopped { .. } => Transition::Stopped { result: None },
            other => other,
        }
    }

    /// The result a transition stores as a record of its own (the persona, the reply).
    pub fn result_mut(&mut self) -> Option<&mut RequestResult> {
        match self {
            Transition::Succeed { result, .. } => Some(result),
            Transition::Stopped {
                result: Some(result),
            } => Some(result),
            _ => None,
        }
    }

    /// Applies the transition to a record in memory; false (and no change) when the record has
    /// already finished. Every store adapter runs this inside its own atomic update, so the
    /// forward-only rule is written once.
    pub fn apply(self, record: &mut RequestRecord) -> bool {
        use crate::domain::RequestStatus;
        if record.status.is_final() {
            return false;
        }
        match self {
            Transition::Start => {
                record.status = RequestStatus::Running;
                record.attempts += 1;
            }
            Transition::Retry { error } => {
                record.status = RequestStatus::Queued;
                record.error = Some(error);
            }
            Transition::Release { error } => {
                record.status = RequestStatus::Queued;
                record.attempts = record.attempts.saturating_sub(1);
                record.error = Some(error);
            }
            Transition::Succeed {
                result,
                usage,
                model,
                latency_ms,
            } => {
                record.status = RequestStatus::Succeeded;
                record.result = Some(*result);
                record.usage = Some(usage);
                record.model = Some(model);
                record.latency_ms = Some(latency_ms);
                record.error = None;
            }
            Transition::Fail { error } => {
                record.status = RequestStatus::Failed;
                record.error = Some(error);
            }
            Transition::Cancel if record.status == RequestStatus::Running => {
                record.cancel_requested = true;
            }
            Transition::Cancel => record.status = RequestStatus::Cancelled,
            Transition::Stopped { result } => {
                record.status = RequestStatus::Cancelled;
                record.result = result.map(|r| *r);
            }
        }
        record.updated_at = crate::time::now_rfc3339();
        true
    }
}
