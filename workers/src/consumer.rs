//! The consume loop, written once for both kinds of job.
//!
//! For each delivery: keep the message hidden with a heartbeat from the moment it is received,
//! mark the request running (or drop the message if the request already finished: a
//! duplicate, however often it was delivered), retry transient
//! failures a few times in-process (exponential back-off, full jitter, `Retry-After` honoured),
//! and then settle the delivery exactly one way, in one step (`shared::atomic`: the request's
//! state, its result record, the event and the message together):
//!
//! | outcome                           | request   | message                               |
//! |-----------------------------------|-----------|---------------------------------------|
//! | success                           | succeeded | deleted                               |
//! | permanent error                   | failed    | deleted                               |
//! | transient error, attempts left    | queued    | hidden for a growing, jittered delay  |
//! | transient error, last attempt     | failed    | dead-lettered                         |
//! | started more than `max_receives` times (earlier workers died) | failed | dead-lettered |
//! | shutdown before the job finished  | queued    | made visible again at once            |
//!
//! Attempts are counted by the request (each start adds one; a shutdown's hand-back takes its
//! attempt back), not by the queue's receive count: deploys and restarts never use up a job's
//! attempts. SQS's own redrive policy still counts every receive; it is set above
//! `max_receives` (infra/template.yaml) as a backstop for messages no worker can even read.
//!
//! A job computes; it stores nothing itself. Its result is stored by the settlement, keyed by
//! the request (a persona) or by the user message it answers (a reply), so a delivery settled
//! twice still leaves exactly one result.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use shared::atomic::{Ack, Atomic, Settle, Started};
use shared::config::WorkerSettings;
use shared::domain::{ErrorBody, JobMessage, RequestKind, RequestRecord, RequestResult, Usage};
use shared::metrics::{KindLabels, Metrics, ModelLabels, TokenLabels};
use shared::queue::{attr, Delivery, Queue};
use shared::store::Transition;
use shared::{Error, Result};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

/// Most messages taken in one receive (SQS allows 10).
const RECEIVE_BATCH: usize = 10;
/// Longest in-process pause between two tries; a longer `Retry-After` sends the job back to
/// the queue instead of holding a worker slot.
const INPROCESS_MAX_DELAY: Duration = Duration::from_secs(5);

/// Who a job runs for and which delivery it is.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub user_id: String,
    pub attempt: u32,
}

/// What a finished job leaves on its request.
#[derive(Debug, Clone)]
pub struct JobOutput {
    pub result: RequestResult,
    pub usage: Usage,
    pub model: String,
    /// The end of a streamed reply not pushed yet: the settlement publishes it.
    pub last_fragment: Option<String>,
}

#[async_trait]
pub trait Job: Send + Sync + 'static {
    fn kind(&self) -> RequestKind;
    /// Does the work of one request; must be idempotent.
    async fn run(&self, request: &RequestRecord, ctx: &JobContext) -> Result<JobOutput>;
}

pub struct Consumer {
    pub job: Arc<dyn Job>,
    pub queue: Arc<dyn Queue>,
    /// Starts and settles jobs, each in one step.
    pub atomic: Arc<dyn Atomic>,
    pub metrics: Arc<Metrics>,
    pub settings: WorkerSettings,
    pub concurrency: usize,
}

/// How often a worker sweeps its queue's outbox for jobs an accept left unsent.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Every worker process sweeps (no leader: a job sent twice is harmless, since jobs are
/// idempotent); see `shared::atomic::aws`.
async fn sweep_outbox(atomic: Arc<dyn Atomic>, kind: RequestKind, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
        match atomic.sweep(kind).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(%kind, accepts = n, "sent jobs left in the outbox"),
            Err(e) => tracing::warn!(%kind, error = %e, "outbox sweep failed"),
        }
    }
}

/// How an attempt ended: `None` when shutdown interrupted it.
type Outcome = Option<Result<JobOutput>>;

impl Consumer {
    /// Consumes until `shutdown` is cancelled, then lets in-flight jobs finish for the grace
    /// period, cancels the rest and hands their messages back.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let kind = self.job.kind();
        tracing::info!(%kind, concurrency = self.concurrency, "worker started");
        let permits = Arc::new(Semaphore::new(self.concurrency.max(1)));
        let hard_stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let sweeper = AbortOnDropHandle::new(tokio::spawn(sweep_outbox(
            self.atomic.clone(),
            kind,
            shutdown.clone(),
        )));
        loop {
            while tasks.try_join_next().is_some() {}
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let mut slots = vec![first];
            while slots.len() < RECEIVE_BATCH {
                match permits.clone().try_acquire_owned() {
                    Ok(p) => slots.push(p),
                    Err(_) => break,
                }
            }
            let vis = self.settings.visibility_timeout();
            let wait = Duration::from_secs(self.settings.receive_wait_secs);
            let receive = self.queue.receive(slots.len(), vis, wait);
            tokio::pin!(receive);
            let received = tokio::select! {
                r = &mut receive => r,
                _ = shutdown.cancelled() => {
                    // A receive in flight can still be handed messages (the server does not see
                    // a client go away): take them and hand them straight back, rather than leave
                    // them hidden for a visibility timeout.
                    if let Ok(late) = receive.await {
                        for d in late {
                            let _ = self.queue.change_visibility(&d.receipt, Duration::ZERO).await;
                        }
                    }
                    break;
                }
            };
            let deliveries = match received {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(%kind, error = %e, "receive failed; retrying shortly");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            for delivery in deliveries {
                let Some(permit) = slots.pop() else { break };
                let this = self.clone();
                let cancel = hard_stop.child_token();
                tasks.spawn(async move {
                    this.handle(delivery, cancel).await;
                    drop(permit);
                });
            }
        }
        let grace = Duration::from_secs(self.settings.shutdown_grace_secs);
        tracing::info!(%kind, in_flight = tasks.len(), ?grace, "worker stopping");
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, drain).await.is_err() {
            hard_stop.cancel();
            while tasks.join_next().await.is_some() {}
        }
        drop(sweeper);
        tracing::info!(%kind, "worker stopped");
    }

    /// Handles one delivery; never fails (every error is logged and settled).
    pub async fn handle(&self, delivery: Delivery, cancel: CancellationToken) {
        let kind = self.job.kind();
        let started = Instant::now();
        let msg: JobMessage = match serde_json::from_str(&delivery.body) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(%kind, error = %e, "queue message is not a job; dead-lettering it");
                let reason = crate::Error::BadMessage(e.to_string()).to_string();
                if let Err(e) = self.queue.dead_letter(&delivery, &reason).await {
                    tracing::error!(error = %e, "could not dead-letter a malformed message");
                }
                self.metrics.job(kind.as_str(), "dead_lettered");
                return;
            }
        };
        let attribute = |name| delivery.attributes.get(name).map(String::as_str);
        let span = tracing::info_span!(
            "job",
            %kind,
            request_id = %msg.request_id,
            delivery = delivery.receive_count,
            trace_id = attribute(attr::TRACE_ID),
            http_request_id = attribute(attr::HTTP_REQUEST_ID),
        );
        let result = self
            .process(&delivery, &msg, cancel)
            .instrument(span.clone())
            .await;
        if let Err(e) = result {
            // The settlement itself failed (store or queue unavailable): the message comes
            // back after its visibility timeout and is handled again.
            span.in_scope(|| tracing::warn!(error = %e, "could not settle the delivery; it will be redelivered"));
        }
        self.metrics
            .job_duration
            .get_or_create(&KindLabels {
                kind: kind.as_str().into(),
            })
            .observe(started.elapsed().as_secs_f64());
    }

    async fn process(
        &self,
        delivery: &Delivery,
        msg: &JobMessage,
        cancel: CancellationToken,
    ) -> Result<()> {
        let kind = self.job.kind().as_str();
        let max = self.settings.max_receives;
        // Hidden from the moment it is received, not only once the job runs: the store calls
        // before it may be slow too. The same heartbeat runs on beside the job below.
        let hidden = self.keep_hidden(&delivery.receipt);
        tokio::pin!(hidden);
        // The request's state first: a finished request whose message came back (its delete
        // was lost) is a duplicate to drop, never a job to dead-letter.
        let started = tokio::select! {
            started = self.atomic.start(&msg.user_id, &msg.request_id) => started?,
            never = &mut hidden => match never {},
        };
        // Attempts are counted by the request, not by the queue's receive count: a delivery
        // handed back on shutdown, or before it started, costs the job nothing.
        let record = match started {
            Started::Running(record) if record.attempts > max => {
                // Earlier deliveries never settled: their workers died mid-job.
                let error = ErrorBody {
                    code: "max_attempts_exceeded".into(),
                    message: format!(
                        "the job was started {max} times without finishing; giving up"
                    ),
                };
                return self.give_up(delivery, msg, error).await;
            }
            Started::Running(record) => record,
            Started::Finished(record) => {
                tracing::info!(
                    status = record.status.as_str(),
                    "request already finished; duplicate delivery dropped"
                );
                self.metrics.job(kind, "duplicate");
                return self.queue.delete(&delivery.receipt).await;
            }
            Started::Missing => {
                tracing::warn!("request no longer exists; dropping the message");
                return self.queue.delete(&delivery.receipt).await;
            }
        };

        let ctx = JobContext {
            user_id: msg.user_id.clone(),
            attempt: record.attempts,
        };
        let budget = Duration::from_secs(self.settings.job_timeout_secs.max(1));
        let attempt_started = Instant::now();
        let outcome: Outcome = tokio::select! {
            _ = cancel.cancelled() => None,
            r = tokio::time::timeout(budget, self.run_with_retries(&record, &ctx)) => Some(
                r.unwrap_or_else(|_| Err(Error::ModelTransient {
                    message: format!("the job did not finish within {}s", budget.as_secs()),
                    retry_after: None,
                }))
            ),
            never = &mut hidden => match never {},
        };

        // Each outcome settles in one step: the request's state, its result record, the event
        // and what becomes of the message (see `shared::atomic`).
        let mut last_fragment = None;
        let (transition, ack, result) = match outcome {
            Some(Ok(mut out)) => {
                last_fragment = out.last_fragment.take();
                let latency = attempt_started.elapsed();
                self.count_tokens(&out);
                self.metrics
                    .model_latency
                    .get_or_create(&ModelLabels {
                        kind: kind.into(),
                        model: out.model.clone(),
                    })
                    .observe(latency.as_secs_f64());
                let transition = Transition::Succeed {
                    result: Box::new(out.result),
                    usage: out.usage,
                    model: out.model,
                    latency_ms: latency.as_millis() as u64,
                };
                (transition, Ack::Delete, "succeeded")
            }
            Some(Err(e)) if e.is_transient() && record.attempts < max => {
                let delay = self.queue_backoff(record.attempts, &e);
                tracing::warn!(error = %e, retry_in = ?delay, "transient failure; the job goes back to the queue");
                let error = ErrorBody {
                    code: e.code(),
                    message: e.to_string(),
                };
                (Transition::Retry { error }, Ack::Retry { delay }, "retried")
            }
            Some(Err(e)) if e.is_transient() => {
                let error = ErrorBody {
                    code: e.code(),
                    message: format!("gave up after {} attempts: {e}", record.attempts),
                };
                return self.give_up(delivery, msg, error).await;
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "permanent failure; request failed");
                let error = ErrorBody {
                    code: e.code(),
                    message: e.to_string(),
                };
                (Transition::Fail { error }, Ack::Delete, "failed")
            }
            None => {
                tracing::info!("shutting down; message handed back to the queue");
                let error = ErrorBody {
                    code: "interrupted".into(),
                    message: "the worker stopped before the job finished; it will run again".into(),
                };
                let ack = Ack::Retry {
                    delay: Duration::ZERO,
                };
                (Transition::Release { error }, ack, "released")
            }
        };
        self.settle(delivery, msg, transition, ack, last_fragment)
            .await?;
        self.metrics.job(kind, result);
        if result == "succeeded" {
            tracing::info!("request succeeded");
        }
        Ok(())
    }

    async fn settle(
        &self,
        delivery: &Delivery,
        msg: &JobMessage,
        transition: Transition,
        ack: Ack,
        last_fragment: Option<String>,
    ) -> Result<()> {
        let settle = Settle {
            kind: self.job.kind(),
            user_id: msg.user_id.clone(),
            request_id: msg.request_id.clone(),
            transition,
            ack,
            last_fragment,
        };
        self.atomic.settle(delivery, settle).await.map(|_| ())
    }

    /// Fails the request for good and moves its message to the dead-letter queue.
    async fn give_up(&self, delivery: &Delivery, msg: &JobMessage, error: ErrorBody) -> Result<()> {
        tracing::error!(code = %error.code, reason = %error.message, "dead-lettering the job");
        let reason = error.message.clone();
        let ack = Ack::DeadLetter { reason };
        self.settle(delivery, msg, Transition::Fail { error }, ack, None)
            .await?;
        self.metrics.job(self.job.kind().as_str(), "dead_lettered");
        Ok(())
    }

    async fn run_with_retries(
        &self,
        record: &RequestRecord,
        ctx: &JobContext,
    ) -> Result<JobOutput> {
        let attempt = || self.job.run(record, ctx);
        attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(INPROCESS_MAX_DELAY)
                    .with_max_times(self.settings.inprocess_retries),
            )
            .when(Error::is_transient)
            .adjust(|e, delay| {
                // Full jitter (backon's own jitter only adds to the delay), and a provider's
                // Retry-After is a floor; if it is longer than we hold a slot for, stop and
                // let the queue wait instead.
                let jittered = delay?.mul_f64(rand::random::<f64>());
                let retry_after: Option<Duration> = match e {
                    Error::ModelTransient { retry_after, .. } => *retry_after,
                    _ => None,
                };
                match retry_after {
                    Some(after) if after > INPROCESS_MAX_DELAY => None,
                    Some(after) => Some(jittered.max(after)),
                    None => Some(jittered),
                }
            })
            .notify(|e, delay| tracing::warn!(error = %e, retry_in = ?delay, "transient failure; retrying in-process"))
            .await
    }

    /// How long a failed job waits in the queue before its next delivery: exponential in the
    /// attempt count, capped, with full jitter, and never shorter than a `Retry-After`.
    fn queue_backoff(&self, attempts: u32, error: &Error) -> Duration {
        let base = self.settings.retry_base_ms as f64;
        let cap = (base * 2f64.powi(attempts.saturating_sub(1).min(30) as i32))
            .min(self.settings.retry_max_ms as f64);
        let delay = Duration::from_millis((cap * rand::random::<f64>()) as u64);
        match error {
            Error::ModelTransient {
                retry_after: Some(after),
                ..
            } => delay.max(*after),
            _ => delay,
        }
    }

    /// Keeps the message hidden while the job runs, so a long job is not handed to a second
    /// worker. Never ends: it runs beside the job in the job's own task, so when the job ends,
    /// or its task is killed, the heartbeat goes with it and cannot hide the message forever.
    async fn keep_hidden(&self, receipt: &str) -> std::convert::Infallible {
        let vis = self.settings.visibility_timeout();
        loop {
            tokio::time::sleep(vis / 3).await;
            if let Err(e) = self.queue.change_visibility(receipt, vis).await {
                tracing::warn!(error = %e, "visibility heartbeat failed");
            }
        }
    }

    fn count_tokens(&self, out: &JobOutput) {
        let kind = self.job.kind().as_str();
        for (direction, n) in [
            ("input", out.usage.input_tokens),
            ("output", out.usage.output_tokens),
        ] {
            self.metrics
                .model_tokens
                .get_or_create(&TokenLabels {
                    kind: kind.into(),
                    model: out.model.clone(),
                    direction: direction.into(),
                })
                .inc_by(n);
        }
    }
}
