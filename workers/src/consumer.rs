//! The consume loop, written once for both kinds of job.
//!
//! For each delivery: keep the message hidden with a heartbeat from the moment it is received,
//! read the request (and drop the message if it already finished: a duplicate, however often
//! it was delivered), run the job (marked running once it has run a moment: [`crate::start`]) with a few in-process retries of
//! transient failures (exponential back-off, full jitter, `Retry-After` honoured), and then
//! settle the delivery exactly one way, in one step (`shared::atomic`: the request's state, its
//! result record, the event and the message together). Which way is decided by
//! [`crate::settlement::decide`], a pure function with its table and tests; this loop only
//! receives, heartbeats, runs and applies.
//!
//! A job computes; it stores nothing itself. Its result is stored by the settlement, keyed by
//! the request (a persona) or by the user message it answers (a reply), so a delivery settled
//! twice still leaves exactly one result.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use shared::atomic::{Atomic, Found};
use shared::domain::{RequestKind, RequestRecord, RequestResult, RequestStatus, Usage};
use shared::job::{Job as QueuedJob, MemoryJob};
use shared::metrics::{KindLabels, Metrics};
use shared::queue::{Delivery, Queue};

use crate::memory::Summarizer;
use crate::options::WorkerOptions;
use crate::settlement::{decide, Limits, Outcome, Settlement};
use crate::start::StartGate;
use shared::error::Report;
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
    /// Marks the request running; a job that pushes progress calls it first, so that no
    /// fragment reaches a client before the request is seen running.
    pub start: Arc<StartGate>,
    /// What the job has written so far (a reply's fragments, as they arrive): kept when its
    /// user cancels it midway (see [`Job::stopped`]).
    pub written: Arc<std::sync::Mutex<String>>,
}

/// What a finished job leaves on its request.
#[derive(Debug, Clone, PartialEq)]
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
    /// Does the work of one request; must be idempotent. `Error::Cancelled` stops it as its
    /// user asked.
    async fn run(&self, request: &RequestRecord, ctx: &JobContext) -> Result<JobOutput>;
    /// What a job stopped by its user leaves, from what it had `written`: nothing, unless
    /// a job says otherwise (a chat reply keeps its beginning).
    fn stopped(&self, request: &RequestRecord, written: String) -> Option<RequestResult> {
        let _ = (request, written);
        None
    }
}

/// How often a running job checks whether its user asked to cancel it; a job done sooner
/// never checks (and costs no read for it).
const CANCEL_POLL: Duration = Duration::from_secs(1);

pub struct Consumer {
    pub job: Arc<dyn Job>,
    pub queue: Arc<dyn Queue>,
    /// Starts and settles jobs, each in one step.
    pub atomic: Arc<dyn Atomic>,
    pub metrics: Arc<Metrics>,
    pub options: WorkerOptions,
    pub concurrency: usize,
    /// Runs the memory jobs that share this queue (the chat queue's).
    pub memory: Option<Arc<Summarizer>>,
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
            Err(e) => tracing::warn!(%kind, error = %Report(&e), "outbox sweep failed"),
        }
    }
}

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
            let Some(received) = self.receive_until(slots.len(), &shutdown).await else {
                break;
            };
            let deliveries = match received {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(%kind, error = %Report(&e), "receive failed; retrying shortly");
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
        let grace = self.options.shutdown_grace;
        tracing::info!(%kind, in_flight = tasks.len(), ?grace, "worker stopping");
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, drain).await.is_err() {
            hard_stop.cancel();
            while tasks.join_next().await.is_some() {}
        }
        drop(sweeper);
        tracing::info!(%kind, "worker stopped");
    }

    /// One receive of up to `n` messages; `None` when shutdown came first.
    async fn receive_until(
        &self,
        n: usize,
        shutdown: &CancellationToken,
    ) -> Option<Result<Vec<Delivery>>> {
        let (vis, wait) = (self.options.visibility(), self.options.receive_wait);
        let receive = self.queue.receive(n, vis, wait);
        tokio::pin!(receive);
        tokio::select! {
            r = &mut receive => Some(r),
            _ = shutdown.cancelled() => {
                // A receive in flight can still be handed messages (the server does not see
                // a client go away): take them and hand them straight back, rather than leave
                // them hidden for a visibility timeout.
                if let Ok(late) = receive.await {
                    for d in late {
                        let _ = self.queue.change_visibility(&d.receipt, Duration::ZERO).await;
                    }
                }
                None
            }
        }
    }

    /// Handles one delivery; never fails (every error is logged and settled).
    pub async fn handle(&self, delivery: Delivery, cancel: CancellationToken) {
        let kind = self.job.kind();
        let started = Instant::now();
        if let Some(job) = MemoryJob::decode(&delivery) {
            return self.handle_memory(delivery, job, cancel).await;
        }
        let msg = match QueuedJob::decode(&delivery) {
            Ok(m) => m,
            Err(e) => {
                let reason = Report(&crate::Error::BadMessage(e)).to_string();
                tracing::error!(%kind, error = %reason, "queue message is not a job; dead-lettering it");
                if let Err(e) = self.queue.dead_letter(&delivery, &reason).await {
                    tracing::error!(error = %Report(&e), "could not dead-letter a malformed message");
                }
                self.metrics.job(kind.as_str(), "dead_lettered");
                return;
            }
        };
        let span = tracing::info_span!(
            "job",
            %kind,
            request_id = %msg.request_id,
            delivery = delivery.receive_count,
            trace_id = msg.trace.trace_id.as_deref(),
            http_request_id = msg.trace.http_request_id.as_deref(),
        );
        let result = self
            .process(&delivery, &msg, cancel)
            .instrument(span.clone())
            .await;
        if let Err(e) = result {
            // The settlement itself failed (store or queue unavailable): the message comes
            // back after its visibility timeout and is handled again.
            span.in_scope(|| tracing::warn!(error = %Report(&e), "could not settle the delivery; it will be redelivered"));
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
        msg: &QueuedJob,
        cancel: CancellationToken,
    ) -> Result<()> {
        let limits = Limits::from(&self.options);
        // Hidden from the moment it is received, not only once the job runs: the store calls
        // before it may be slow too. The same heartbeat runs on beside the job below.
        let hidden = self.keep_hidden(&delivery.receipt);
        tokio::pin!(hidden);
        // The request's state first: a finished request whose message came back (its delete
        // was lost) is a duplicate to drop, never a job to dead-letter.
        let found = tokio::select! {
            found = self.atomic.look(&msg.user_id, &msg.request_id, msg.accepted.as_ref()) => found?,
            never = &mut hidden => match never {},
        };
        let Some(record) = self.pending(delivery, found).await? else {
            return Ok(());
        };
        // This attempt counts, started or not (see `crate::start`).
        let attempts = record.attempts + 1;
        let start = self.start_gate(delivery, msg).await;
        let attempt_started = Instant::now();
        let ctx = JobContext {
            user_id: msg.user_id.clone(),
            attempt: attempts,
            start: start.clone(),
            written: Arc::default(),
        };
        let outcome = if start.is_superseded() {
            None
        } else if record.cancel_requested {
            // Its worker died after the cancel was asked: not run again.
            Some(Outcome::Cancelled(None))
        } else if attempts > limits.max_attempts {
            // Earlier attempts never settled: their workers died mid-job.
            Some(Outcome::Exhausted)
        } else {
            let budget = self.options.job_timeout.max(Duration::from_secs(1));
            tokio::select! {
                _ = cancel.cancelled() => Some(Outcome::Interrupted),
                r = tokio::time::timeout(budget, self.run_with_retries(&record, &ctx)) => Some(match r {
                    Ok(Ok(out)) => Outcome::Succeeded(Box::new(out)),
                    Ok(Err(Error::Cancelled)) => Outcome::Cancelled(None),
                    Ok(Err(e)) => Outcome::Failed(e),
                    Err(_) => Outcome::Failed(Error::ModelTransient {
                        message: format!("the job did not finish within {}s", budget.as_secs()),
                        retry_after: None,
                    }),
                }),
                () = self.cancel_asked(msg) => Some(Outcome::Cancelled(self.stopped(&record, &ctx))),
                () = start.superseded() => None,
                never = start.after_a_while() => match never {},
                never = &mut hidden => match never {},
            }
        };
        let Some(outcome) = outcome else {
            return self.superseded(delivery).await;
        };
        let settlement = decide(outcome, attempts, &limits, rand::random::<f64>());
        let unstarted = (!start.written().await).then_some(record.attempts);
        self.apply(
            delivery,
            msg,
            settlement,
            attempt_started.elapsed(),
            unstarted,
        )
        .await
    }

    /// The request to run, or `None` when the delivery was a duplicate or names no request
    /// (then its message is deleted).
    async fn pending(&self, delivery: &Delivery, found: Found) -> Result<Option<RequestRecord>> {
        match found {
            Found::Pending(record) => return Ok(Some(record)),
            Found::Finished(record) => {
                tracing::info!(
                    status = record.status.as_str(),
                    "request already finished; duplicate delivery dropped"
                );
                self.metrics.job(self.job.kind().as_str(), "duplicate");
            }
            Found::Missing => tracing::warn!("request no longer exists; dropping the message"),
        }
        self.queue.delete(&delivery.receipt).await?;
        Ok(None)
    }

    /// What marks this delivery's request running. A delivery that is not the message's first
    /// (an earlier one never settled: its worker may have died before its start was due)
    /// counts its attempt at once, before the job runs (see `crate::start`).
    async fn start_gate(&self, delivery: &Delivery, msg: &QueuedJob) -> Arc<StartGate> {
        let start = StartGate::new(self.atomic.clone(), delivery, &msg.user_id, &msg.request_id);
        if delivery.receive_count > 1 {
            start.ensure().await;
        }
        Arc::new(start)
    }

    /// Resolves once the job's user asked to cancel it (`Atomic::cancel`): checked every
    /// [`CANCEL_POLL`] while the job runs, from across processes (the request's record says).
    async fn cancel_asked(&self, msg: &QueuedJob) {
        loop {
            tokio::time::sleep(CANCEL_POLL).await;
            match self.atomic.look(&msg.user_id, &msg.request_id, None).await {
                Ok(Found::Pending(r)) if r.cancel_requested => return,
                Ok(Found::Finished(r)) if r.status == RequestStatus::Cancelled => return,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %Report(&e), "could not check for a cancel"),
            }
        }
    }

    /// What a job stopped midway leaves (see [`Job::stopped`]).
    fn stopped(&self, record: &RequestRecord, ctx: &JobContext) -> Option<Box<RequestResult>> {
        let written = std::mem::take(&mut *ctx.written.lock().unwrap_or_else(|e| e.into_inner()));
        self.job.stopped(record, written).map(Box::new)
    }

    /// Drops a delivery whose start found its request finished by a twin delivery, or gone.
    async fn superseded(&self, delivery: &Delivery) -> Result<()> {
        tracing::info!("the request finished elsewhere, or is gone; delivery dropped");
        self.metrics.job(self.job.kind().as_str(), "duplicate");
        self.queue.delete(&delivery.receipt).await
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
                    .with_max_times(self.options.inprocess_retries),
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
            .notify(|e, delay| tracing::warn!(error = %Report(e), retry_in = ?delay, "transient failure; retrying in-process"))
            .await
    }

    /// Handles a memory job: run, then deleted; retried from the queue after a back-off on a
    /// transient failure, dead-lettered on a permanent one or when its attempts are used up
    /// (counted by the queue: there is no request to count them). A conversation whose fold
    /// failed still answers, from the summary it has.
    async fn handle_memory(
        &self,
        delivery: Delivery,
        job: std::result::Result<MemoryJob, serde_json::Error>,
        cancel: CancellationToken,
    ) {
        let span = tracing::info_span!("memory", delivery = delivery.receive_count);
        let budget = self.options.job_timeout.max(Duration::from_secs(1));
        let done = async {
            let job = job.map_err(|e| Error::Invalid(format!("not a memory job: {e}")))?;
            let Some(summarizer) = &self.memory else {
                return Err(Error::Invalid("this worker runs no memory jobs".into()));
            };
            tokio::select! {
                r = tokio::time::timeout(budget, summarizer.run(&job)) => r.unwrap_or_else(|_| Err(Error::ModelTransient {
                    message: format!("the fold did not finish within {}s", budget.as_secs()),
                    retry_after: None,
                })),
                never = self.keep_hidden(&delivery.receipt) => match never {},
            }
        };
        let done = tokio::select! {
            r = done.instrument(span.clone()) => r,
            // Shutdown's grace is over: handed back for another worker.
            () = cancel.cancelled() => {
                let _ = self.queue.change_visibility(&delivery.receipt, Duration::ZERO).await;
                return;
            }
        };
        let failed = match done {
            Ok(()) => None,
            Err(e) => Some(Outcome::Failed(e)),
        };
        let limits = Limits::from(&self.options);
        let attempts = delivery.receive_count;
        let (settled, outcome) = match failed.map(|o| decide(o, attempts, &limits, rand::random()))
        {
            None => (self.queue.delete(&delivery.receipt).await, "succeeded"),
            Some(Settlement::Retry { delay, error }) => {
                span.in_scope(|| tracing::warn!(code = %error.code, error = %error.message, retry_in = ?delay, "memory fold failed; retrying"));
                (
                    self.queue.change_visibility(&delivery.receipt, delay).await,
                    "retried",
                )
            }
            Some(Settlement::Fail { error } | Settlement::DeadLetter { error }) => {
                span.in_scope(|| tracing::error!(code = %error.code, error = %error.message, "memory fold dead-lettered"));
                (
                    self.queue.dead_letter(&delivery, &error.message).await,
                    "dead_lettered",
                )
            }
            Some(_) => (Ok(()), "released"),
        };
        self.metrics.job("memory", outcome);
        if let Err(e) = settled {
            span.in_scope(|| tracing::warn!(error = %Report(&e), "could not settle a memory fold; it will be redelivered"));
        }
    }

    /// Keeps the message hidden while the job runs, so a long job is not handed to a second
    /// worker. Never ends: it runs beside the job in the job's own task, so when the job ends,
    /// or its task is killed, the heartbeat goes with it and cannot hide the message forever.
    async fn keep_hidden(&self, receipt: &str) -> std::convert::Infallible {
        let vis = self.options.visibility();
        loop {
            tokio::time::sleep(vis / 3).await;
            if let Err(e) = self.queue.change_visibility(receipt, vis).await {
                tracing::warn!(error = %Report(&e), "visibility heartbeat failed");
            }
        }
    }
}
