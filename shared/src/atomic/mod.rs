//! The `Atomic` port: the two moments where the store and the queue must change together.
//!
//! - **Accept** (API): the request records, the user message of a chat turn, the idempotency
//!   key's final answer and the jobs on the queue are recorded together or not at all. A `202`
//!   is answered only after that, so an accepted request can never be stored without its job
//!   (an orphan nobody answers) nor queued without its record.
//! - **Settle** (workers): the request's new state, its result record (persona or reply), the
//!   `request.updated` event (after the reply's last `message.delta`, if one was left) and what happens to the queue message (delete, retry later, hand
//!   back, dead-letter) are one step, so a worker killed half-way leaves either the old state
//!   with the message still on the queue, or the new state with the message gone.
//!
//! Adapters: [`sqlite`] (one SQLite transaction: the embedded queue, store and events share
//! the database) and [`aws`] (DynamoDB `TransactWriteItems` with an outbox item, then SQS; a
//! sweep in every worker process sends what a dead sender left in the outbox).

pub mod aws;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;

use crate::domain::{Batch, Message, RequestKind, RequestRecord};
use crate::ids::{ConversationId, RequestId};
use crate::queue::{Delivery, Outgoing};
use crate::store::{StoredAnswer, Transition};
use crate::Result;

/// Everything one accepted API call records.
#[derive(Debug, Clone)]
pub struct Accept {
    pub user_id: String,
    pub kind: RequestKind,
    /// The requests, each queued as the job at the same index of `jobs`.
    pub requests: Vec<RequestRecord>,
    pub jobs: Vec<Outgoing>,
    pub batch: Option<Batch>,
    /// The user's message of a chat turn, appended to its conversation. The conversation must
    /// be the user's: otherwise nothing is recorded and the accept fails with `NotFound`.
    pub message: Option<UserMessage>,
    /// The answer to replay for the call's `Idempotency-Key`, recorded with everything else.
    pub answer: Option<Answer>,
}

#[derive(Debug, Clone)]
pub struct UserMessage {
    pub conversation_id: ConversationId,
    pub message: Message,
}

/// The final answer of an idempotent call.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub key: String,
    pub fingerprint: String,
    /// Kept as given, replayed as given: the store does not interpret it.
    pub stored: StoredAnswer,
    /// How long the answer is kept.
    pub ttl: Duration,
}

/// How an accept ended.
#[derive(Debug, Clone, PartialEq)]
pub enum AcceptOutcome {
    /// Everything was recorded and queued.
    Recorded,
    /// An earlier call with the same key already recorded its answer (it won a race, or the
    /// client retried after a crash): nothing new was stored; replay this.
    Replay(StoredAnswer),
}

/// What becomes of a delivered message when its job settles.
#[derive(Debug, Clone)]
pub enum Ack {
    /// Done: delete it.
    Delete,
    /// Deliver it again after `delay` (a retry with back-off, or `ZERO` to hand it back now).
    Retry { delay: Duration },
    /// Move it to the dead-letter queue with this reason.
    DeadLetter { reason: String },
}

/// The end of one delivery's work.
#[derive(Debug, Clone)]
pub struct Settle {
    /// The kind of job, and so the queue the delivery came from.
    pub kind: RequestKind,
    pub user_id: String,
    pub request_id: RequestId,
    /// A `Succeed` transition (and a `Stopped` one with a partial reply) stores its result as
    /// a record too: the persona, or the reply to the request's user message. A twin delivery that settled first keeps its record, and
    /// the request then carries that one.
    pub transition: Transition,
    pub ack: Ack,
    /// The end of a streamed reply that was not pushed yet when the job finished (all of it,
    /// for a reply that came at once): published as the request's `message.delta` in the
    /// same step, just before its `request.updated`, instead of in a write of its own.
    pub last_fragment: Option<String>,
    /// `None` when this attempt's start was written ([`Atomic::start`]). A job that finishes
    /// quickly never writes one (which saves a write, an announcement and every instance's
    /// receive of it): then `Some(n)`, the attempts the request had when the job read it, and
    /// the settlement counts this attempt itself, the request going through `running` inside
    /// the same write, unseen. Unless the attempts moved past `n` meanwhile: a start this
    /// attempt lost track of (written, but its caller went away first) counted it already.
    pub unstarted: Option<u32>,
}

/// What `look` found.
#[derive(Debug, Clone)]
pub enum Found {
    /// Queued or running: a job to run.
    Pending(RequestRecord),
    /// The request had already finished: the delivery is a duplicate.
    Finished(RequestRecord),
    /// There is no such request of the user.
    Missing,
}

/// What `start` found.
#[derive(Debug, Clone)]
pub enum Started {
    /// The request is now running (its `attempts` counts this one); push was told.
    Running(RequestRecord),
    /// The request had already finished: the delivery is a duplicate.
    Finished(RequestRecord),
    /// There is no such request.
    Missing,
}

#[async_trait]
pub trait Atomic: Send + Sync + 'static {
    /// Records and queues everything in `accept`, or nothing.
    async fn accept(&self, accept: Accept) -> Result<AcceptOutcome>;

    /// Reads a request before its job runs; tells a duplicate delivery apart. Writes nothing:
    /// a job is started ([`start`](Atomic::start)) only once it runs long enough for anyone
    /// to see it running. `accepted` is the job's copy of the request as accepted (a first
    /// delivery's: see `crate::job::Job::accepted`): an adapter whose reads cost a call may
    /// take it instead of reading, its writes being conditional on the version anyway.
    async fn look(
        &self,
        user_id: &str,
        request_id: &RequestId,
        accepted: Option<&RequestRecord>,
    ) -> Result<Found>;

    /// Marks a request running, one attempt more, and publishes the change, in one step; tells
    /// a duplicate delivery apart.
    async fn start(&self, user_id: &str, request_id: &RequestId) -> Result<Started>;

    /// [`start`](Atomic::start) for the job of `delivery`. On AWS the start also deletes the
    /// outbox item the job names (see `crate::job::with_outbox`), in the same transaction: the
    /// worker has the job, so the outbox sweep must not send it again.
    async fn start_delivery(
        &self,
        delivery: &Delivery,
        user_id: &str,
        request_id: &RequestId,
    ) -> Result<Started> {
        let _ = delivery;
        self.start(user_id, request_id).await
    }

    /// Cancels a request for its user and publishes the change, in one step: a queued one
    /// ends `cancelled` (its job, when delivered, does not run), a running one is marked for
    /// its worker to stop (`cancel_requested`). A finished one is returned as it is; `None`
    /// when there is no such request of the user.
    async fn cancel(&self, user_id: &str, request_id: &RequestId) -> Result<Option<RequestRecord>>;

    /// Applies `settle` to the request and to `delivery`'s message in one step (on AWS: the
    /// records in one transaction, then the queue). Returns the request as it now stands, or
    /// `None` when it no longer exists (the message is acknowledged all the same).
    async fn settle(&self, delivery: &Delivery, settle: Settle) -> Result<Option<RequestRecord>>;

    /// Sends the jobs of accepts whose sender died between recording and sending them; the
    /// number of accepts it finished. Run periodically by every worker process of `kind`.
    /// Nothing to do where the accept is a single transaction with the queue (embedded).
    async fn sweep(&self, _kind: RequestKind) -> Result<usize> {
        Ok(0)
    }
}
