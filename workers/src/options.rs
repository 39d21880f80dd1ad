//! What the consume loop reads: plain values, durations as [`Duration`]. The binary builds them
//! from its flags (`characterbot::cli`), so this crate never sees how they were given.

use std::time::Duration;

use crate::settlement::Limits;

/// The options of one worker's consume loop.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// How long a received message stays hidden from other consumers (at least 1 s is used);
    /// the loop extends it while a job runs.
    pub visibility_timeout: Duration,
    /// Longest wait of one receive (long poll).
    pub receive_wait: Duration,
    /// Attempts of one job before it is dead-lettered and its request failed.
    pub max_receives: u32,
    /// First back-off before a failed job is retried from the queue; it doubles per delivery.
    pub retry_base: Duration,
    /// Longest back-off between deliveries.
    pub retry_max: Duration,
    /// Quick in-process retries of a transient model error before the job goes back.
    pub inprocess_retries: usize,
    /// Longest one attempt may run before it counts as a transient failure (at least 1 s).
    pub job_timeout: Duration,
    /// On shutdown, how long in-flight jobs may run before they are cancelled and released.
    pub shutdown_grace: Duration,
}

impl WorkerOptions {
    /// The visibility timeout in use: a zero one would hand a message to every consumer at once.
    pub fn visibility(&self) -> Duration {
        self.visibility_timeout.max(Duration::from_secs(1))
    }
}

impl From<&WorkerOptions> for Limits {
    fn from(o: &WorkerOptions) -> Self {
        Limits {
            max_attempts: o.max_receives,
            retry_base: o.retry_base,
            retry_max: o.retry_max,
        }
    }
}
