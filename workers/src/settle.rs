//! Applying a settlement: what [`crate::settlement::decide`] chose becomes the request's
//! transition, what happens to the message, and the reply's unpushed end, all stored in one
//! step by `shared::atomic`; then it is logged and counted. Apart from the consume loop so
//! that the loop reads as receiving, heartbeats and retries only.

use std::time::Duration;

use shared::atomic::{Ack, Settle};
use shared::domain::ErrorBody;
use shared::job::Job as QueuedJob;
use shared::metrics::{ModelLabels, TokenLabels};
use shared::queue::Delivery;
use shared::store::Transition;
use shared::Result;

use crate::consumer::{Consumer, JobOutput};
use crate::settlement::Settlement;

impl Consumer {
    /// Applies a settlement in one step (the request's state, its result record, the event
    /// and what becomes of the message: see `shared::atomic`), then logs and counts it.
    pub(crate) async fn apply(
        &self,
        delivery: &Delivery,
        msg: &QueuedJob,
        settlement: Settlement,
        latency: Duration,
        unstarted: Option<u32>,
    ) -> Result<()> {
        let kind = self.job.kind();
        let (transition, ack, last_fragment, outcome) = self.parts(settlement, latency);
        let settle = Settle {
            kind,
            user_id: msg.user_id.clone(),
            request_id: msg.request_id.clone(),
            transition,
            ack,
            last_fragment,
            unstarted,
        };
        self.atomic.settle(delivery, settle).await?;
        self.metrics.job(kind.as_str(), outcome);
        if outcome == "succeeded" {
            tracing::info!("request succeeded");
        }
        Ok(())
    }

    /// A settlement as the request's transition, the message's ack, the reply's unpushed end
    /// and the outcome's metric label; logs the failures and observes the model call.
    fn parts(
        &self,
        settlement: Settlement,
        latency: Duration,
    ) -> (Transition, Ack, Option<String>, &'static str) {
        let mut last_fragment = None;
        let (transition, ack, outcome) = match settlement {
            Settlement::Succeed(out) => {
                let out = *out;
                last_fragment = out.last_fragment.clone();
                self.observe_model(&out, latency);
                let transition = Transition::Succeed {
                    result: Box::new(out.result),
                    usage: out.usage,
                    model: out.model,
                    latency_ms: latency.as_millis() as u64,
                };
                (transition, Ack::Delete, "succeeded")
            }
            Settlement::Retry { delay, error } => {
                tracing::warn!(error = %error.message, retry_in = ?delay, "transient failure; the job goes back to the queue");
                (Transition::Retry { error }, Ack::Retry { delay }, "retried")
            }
            Settlement::Fail { error } => {
                tracing::warn!(error = %error.message, "permanent failure; request failed");
                (Transition::Fail { error }, Ack::Delete, "failed")
            }
            Settlement::DeadLetter { error } => {
                tracing::error!(code = %error.code, reason = %error.message, "dead-lettering the job");
                let ack = Ack::DeadLetter {
                    reason: error.message.clone(),
                };
                (Transition::Fail { error }, ack, "dead_lettered")
            }
            Settlement::Stop(result) => {
                tracing::info!(kept = result.is_some(), "cancelled by its user; stopped");
                (Transition::Stopped { result }, Ack::Delete, "cancelled")
            }
            Settlement::Release => {
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
        (transition, ack, last_fragment, outcome)
    }

    /// The model call's latency and tokens, by kind and model.
    fn observe_model(&self, out: &JobOutput, latency: Duration) {
        let kind = self.job.kind().as_str();
        self.metrics
            .model_latency
            .get_or_create(&ModelLabels {
                kind: kind.into(),
                model: out.model.clone(),
            })
            .observe(latency.as_secs_f64());
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
