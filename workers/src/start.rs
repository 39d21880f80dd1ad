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
