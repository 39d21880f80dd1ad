//! The workers' flags, and the [`workers::WorkerOptions`] of the consume loop they become
//! (concurrency and history go to the consumer and the chat job, built in `crate::run`).

use std::time::Duration;

use clap::Args;
use workers::WorkerOptions;

#[derive(Debug, Clone, Args)]
pub struct WorkerSettings {
    /// Persona jobs one worker process runs at once. Jobs mostly wait on the model, and a
    /// worker receives and settles them in groups, so this can be high.
    #[arg(long, env = "CHARACTERBOT_PERSONA_CONCURRENCY", default_value_t = 32)]
    pub persona_concurrency: usize,
    /// Chat jobs one worker process runs at once.
    #[arg(long, env = "CHARACTERBOT_CHAT_CONCURRENCY", default_value_t = 32)]
    pub chat_concurrency: usize,
    /// How long a received message stays hidden from other consumers, in seconds. A worker
    /// extends it while a job runs; a dead worker's message reappears after it.
    #[arg(
        long,
        env = "CHARACTERBOT_VISIBILITY_TIMEOUT_SECS",
        default_value_t = 30
    )]
    pub visibility_timeout_secs: u64,
    /// Longest wait of one receive (long poll), in seconds; at most 20 (SQS's limit). Shutdown
    /// lets the receive in flight finish, so this also bounds how long a stop waits for it.
    /// The embedded queue caps its own wait at 1 s: an empty receive costs nothing there.
    #[arg(
        long,
        env = "CHARACTERBOT_RECEIVE_WAIT_SECS",
        default_value_t = 20,
        value_parser = clap::value_parser!(u64).range(0..=20)
    )]
    pub receive_wait_secs: u64,
    /// Attempts (starts) of one job before it is dead-lettered and its request failed; a
    /// shutdown's hand-back is not an attempt.
    #[arg(long, env = "CHARACTERBOT_MAX_RECEIVES", default_value_t = 5)]
    pub max_receives: u32,
    /// First back-off before a failed job is retried from the queue, in milliseconds; it
    /// doubles with each delivery, with full jitter.
    #[arg(long, env = "CHARACTERBOT_RETRY_BASE_MS", default_value_t = 1000)]
    pub retry_base_ms: u64,
    /// Longest back-off between deliveries, in milliseconds.
    #[arg(long, env = "CHARACTERBOT_RETRY_MAX_MS", default_value_t = 60_000)]
    pub retry_max_ms: u64,
    /// Quick in-process retries of a transient model error before the job goes back to the queue.
    #[arg(long, env = "CHARACTERBOT_INPROCESS_RETRIES", default_value_t = 2)]
    pub inprocess_retries: usize,
    /// Longest a single job attempt may run before it counts as a transient failure, in seconds.
    #[arg(long, env = "CHARACTERBOT_JOB_TIMEOUT_SECS", default_value_t = 120)]
    pub job_timeout_secs: u64,
    /// Most past messages sent to the chat model as context.
    #[arg(long, env = "CHARACTERBOT_HISTORY_MESSAGES", default_value_t = 20)]
    pub history_messages: usize,
    /// The chat model's input budget, in its tokens (counted by its tokenizer where known,
    /// else estimated): the system prompt (persona, pinned facts, summary), the message, and
    /// as many recent turns as fit.
    #[arg(long, env = "CHARACTERBOT_CONTEXT_TOKENS", default_value_t = 3_000)]
    pub context_tokens: usize,
    /// On shutdown, how long in-flight jobs may run before they are cancelled and released.
    #[arg(long, env = "CHARACTERBOT_SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    pub shutdown_grace_secs: u64,
}

impl WorkerSettings {
    /// The receive's long-poll wait, never past SQS's 20 s (the parser checks it too; the AWS
    /// clients' deadlines add it to each receive's).
    pub fn receive_wait(&self) -> Duration {
        Duration::from_secs(self.receive_wait_secs.min(20))
    }
}

impl From<&WorkerSettings> for WorkerOptions {
    fn from(w: &WorkerSettings) -> Self {
        WorkerOptions {
            visibility_timeout: Duration::from_secs(w.visibility_timeout_secs),
            receive_wait: w.receive_wait(),
            max_receives: w.max_receives,
            retry_base: Duration::from_millis(w.retry_base_ms),
            retry_max: Duration::from_millis(w.retry_max_ms),
            inprocess_retries: w.inprocess_retries,
            job_timeout: Duration::from_secs(w.job_timeout_secs),
            shutdown_grace: Duration::from_secs(w.shutdown_grace_secs),
        }
    }
}
