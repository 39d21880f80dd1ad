//! When a job is seen running.
//!
//! A request goes `queued → running → final`, but `running` is written only once someone could
//! see it: when the job has run for [`START_AFTER`], or just before it pushes its first reply
//! fragment, whichever comes first. A job that finishes sooner (most offline and cached work)
//! never writes a start: its settlement counts the attempt and goes from `queued` to the final
//! state in one write. On AWS that saves, per job, a transaction, an SNS announcement and each
//! API instance's receive of it. Attempts stay counted by the request: by the start when one
//! is written, by the settlement otherwise (see `shared::atomic::Settle::unstarted`). A worker
//! killed within [`START_AFTER`] of taking a job leaves no trace of that attempt, so a delivery
//! that is not the message's first (an earlier one never settled) writes its start before the
//! job runs: a job that kills its worker at once is counted from its second delivery on, and
//! dead-lettered once its attempts are used up, as before.
//!
//! A start that finds the request finished (a twin delivery settled it) or gone stops the job:
//! its message is dropped as a duplicate, and nothing more of it is pushed.

use std::sync::Arc;
use std::time::Duration;

use shared::atomic::{Atomic, Started};
use shared::error::Report;
use shared::ids::RequestId;
use shared::queue::Delivery;
use tokio_util::sync::CancellationToken;

/// How long a job runs before its start is written: under a person's notice, over what an
/// instant answer takes.
pub const START_AFTER: Duration = Duration::from_millis(250);

/// Writes one job's start at most once, whichever of its callers comes first.
pub struct StartGate {
    atomic: Arc<dyn Atomic>,
    delivery: Delivery,
    user_id: String,
    request_id: RequestId,
    written: tokio::sync::Mutex<bool>,
    superseded: CancellationToken,
}

impl std::fmt::Debug for StartGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartGate")
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

impl StartGate {
    pub fn new(
        atomic: Arc<dyn Atomic>,
        delivery: &Delivery,
        user_id: &str,
        request_id: &RequestId,
    ) -> Self {
        StartGate {
            atomic,
            delivery: delivery.clone(),
            user_id: user_id.to_owned(),
            request_id: request_id.clone(),
            written: tokio::sync::Mutex::new(false),
            superseded: CancellationToken::new(),
        }
    }

    /// Marks the request running (and announces it) unless that was done; waits for a start
    /// in flight. A failure is logged and tried again by the next caller; the settlement
    /// counts the attempt if no start was written.
    pub async fn ensure(&self) {
        let mut written = self.written.lock().await;
        if *written || self.superseded.is_cancelled() {
            return;
        }
        let started = self
            .atomic
            .start_delivery(&self.delivery, &self.user_id, &self.request_id);
        match started.await {
            Ok(Started::Running(_)) => *written = true,
            Ok(Started::Finished(_) | Started::Missing) => self.superseded.cancel(),
            Err(e) => tracing::warn!(error = %Report(&e), "could not mark the request running"),
        }
    }

    /// Writes the start once the job has run [`START_AFTER`]; never returns, so that it can
    /// run beside the job and end with it.
    pub async fn after_a_while(&self) -> std::convert::Infallible {
        tokio::time::sleep(START_AFTER).await;
        self.ensure().await;
        std::future::pending().await
    }

    /// Resolves once a start found the request finished elsewhere, or gone: the job is to stop.
    pub async fn superseded(&self) {
        self.superseded.cancelled().await;
    }

    pub fn is_superseded(&self) -> bool {
        self.superseded.is_cancelled()
    }

    /// Whether the start was written; waits for one in flight.
    pub async fn written(&self) -> bool {
        *self.written.lock().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use shared::atomic::{Accept, AcceptOutcome, Found, Settle};
    use shared::domain::{RequestInput, RequestKind, RequestRecord};
    use shared::Result;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers every start with `answer`, counting them.
    struct Starts {
        answer: fn(RequestRecord) -> Started,
        calls: AtomicUsize,
    }

    #[async_trait]
    impl Atomic for Starts {
        async fn accept(&self, _: Accept) -> Result<AcceptOutcome> {
            unreachable!("not used by the gate")
        }
        async fn look(&self, _: &str, _: &RequestId, _: Option<&RequestRecord>) -> Result<Found> {
            unreachable!("not used by the gate")
        }
        async fn start(&self, _: &str, _: &RequestId) -> Result<Started> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let record = RequestRecord::new(
                RequestKind::Chat,
                RequestInput::Persona { prompt: "p".into() },
                None,
            );
            Ok((self.answer)(record))
        }
        async fn cancel(&self, _: &str, _: &RequestId) -> Result<Option<RequestRecord>> {
            unreachable!("not used by the gate")
        }
        async fn settle(&self, _: &Delivery, _: Settle) -> Result<Option<RequestRecord>> {
            unreachable!("not used by the gate")
        }
    }

    fn gate(answer: fn(RequestRecord) -> Started) -> (StartGate, Arc<Starts>) {
        let atomic = Arc::new(Starts {
            answer,
            calls: AtomicUsize::new(0),
        });
        let delivery = Delivery {
            message_id: "m".into(),
            receipt: "r".into(),
            body: String::new(),
            attributes: Default::default(),
            receive_count: 1,
            group: None,
        };
        let gate = StartGate::new(atomic.clone(), &delivery, "alice", &"req_1".into());
        (gate, atomic)
    }

    #[tokio::test]
    async fn a_start_is_written_once_whoever_asks() {
        let (gate, atomic) = gate(Started::Running);
        gate.ensure().await;
        gate.ensure().await;
        assert!(gate.written().await);
        assert!(!gate.is_superseded());
        assert_eq!(atomic.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_start_that_finds_the_request_finished_stops_the_job() {
        let (gate, atomic) = gate(Started::Finished);
        gate.ensure().await;
        assert!(gate.is_superseded());
        assert!(!gate.written().await, "the settlement is not to count it");
        tokio::time::timeout(std::time::Duration::from_secs(1), gate.superseded())
            .await
            .expect("the job is told to stop");
        gate.ensure().await;
        assert_eq!(atomic.calls.load(Ordering::SeqCst), 1, "not tried again");
    }
}
