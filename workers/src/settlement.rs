//! What becomes of a delivery once its attempt is over, decided without side effects.
//!
//! The consume loop runs a job and hands how it ended to [`decide`]; the answer is one of five
//! settlements, which `Consumer` then applies in one step (`shared::atomic`). Keeping the
//! decision pure makes the retry policy a table that unit tests read row by row:
//!
//! | how the attempt ended                                  | settlement                  |
//! |--------------------------------------------------------|-----------------------------|
//! | the job succeeded                                      | `Succeed`                   |
//! | permanent error                                        | `Fail`                      |
//! | transient error, attempts left                         | `Retry` after a back-off    |
//! | transient error, last attempt                          | `DeadLetter` (gave up)      |
//! | started more than `max_attempts` times, never settled  | `DeadLetter` (not run)      |
//! | shutdown before the job finished                       | `Release`                   |
//! | its user cancelled it                                  | `Stop` (keeps what it wrote) |
//!
//! Attempts are counted by the request (each start adds one; a release takes it back), not by
//! the queue's receive count: deploys and restarts never use up a job's attempts.

use std::time::Duration;

use shared::domain::{ErrorBody, RequestResult};
use shared::error::Report;
use shared::Error;

use crate::consumer::JobOutput;

/// How an attempt ended.
#[derive(Debug)]
pub enum Outcome {
    /// Earlier attempts were started and never settled (their workers died) and the limit is
    /// reached: the job was not run again.
    Exhausted,
    /// Boxed: a persona is large next to the other variants.
    Succeeded(Box<JobOutput>),
    Failed(Error),
    /// Shutdown interrupted the attempt.
    Interrupted,
    /// Its user cancelled it; what it had written, if it keeps any.
    Cancelled(Option<Box<RequestResult>>),
}

/// The retry policy, from the worker's options.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_attempts: u32,
    /// Back-off before the second attempt; it doubles with each attempt up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
}

/// What to do with the request and its message.
#[derive(Debug, PartialEq)]
pub enum Settlement {
    /// Store the result; delete the message.
    Succeed(Box<JobOutput>),
    /// Queue the request again; the message comes back after `delay`.
    Retry { delay: Duration, error: ErrorBody },
    /// Fail the request; delete the message.
    Fail { error: ErrorBody },
    /// Fail the request; move the message to the dead-letter queue.
    DeadLetter { error: ErrorBody },
    /// Queue the request again without counting the attempt; the message comes back at once.
    Release,
    /// End the request `cancelled`, keeping what the job wrote; delete the message.
    Stop(Option<Box<RequestResult>>),
}

/// Decides the settlement of an attempt. `attempts` counts this one; `jitter`, in `[0, 1)`, is
/// the share of the back-off cap to wait (full jitter), drawn by the caller so that the
/// decision stays a function of its inputs.
pub fn decide(outcome: Outcome, attempts: u32, limits: &Limits, jitter: f64) -> Settlement {
    match outcome {
        Outcome::Succeeded(out) => Settlement::Succeed(out),
        Outcome::Interrupted => Settlement::Release,
        Outcome::Cancelled(result) => Settlement::Stop(result),
        Outcome::Exhausted => Settlement::DeadLetter {
            error: ErrorBody {
                code: "max_attempts_exceeded".into(),
                message: format!(
                    "the job was started {} times without finishing; giving up",
                    limits.max_attempts
                ),
            },
        },
        Outcome::Failed(e) if !e.is_transient() => Settlement::Fail {
            error: error_body(&e, Report(&e).to_string()),
        },
        Outcome::Failed(e) if attempts >= limits.max_attempts => Settlement::DeadLetter {
            error: error_body(
                &e,
                format!("gave up after {attempts} attempts: {}", Report(&e)),
            ),
        },
        Outcome::Failed(e) => Settlement::Retry {
            delay: backoff(attempts, &e, limits, jitter),
            error: error_body(&e, Report(&e).to_string()),
        },
    }
}

fn error_body(e: &Error, message: String) -> ErrorBody {
    ErrorBody {
        code: e.code(),
        message,
    }
}

/// How long a failed job waits in the queue: exponential in the attempts so far, capped, with
/// full jitter, and never shorter than the provider's `Retry-After`.
fn backoff(attempts: u32, error: &Error, limits: &Limits, jitter: f64) -> Duration {
    let doublings = attempts.saturating_sub(1).min(30) as i32;
    let cap = limits
        .retry_base
        .mul_f64(2f64.powi(doublings))
        .min(limits.retry_max);
    let delay = cap.mul_f64(jitter.clamp(0.0, 1.0));
    match error {
        Error::ModelTransient {
            retry_after: Some(after),
            ..
        } => delay.max(*after),
        _ => delay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::domain::{Message, RequestResult, Role, Usage};

    const LIMITS: Limits = Limits {
        max_attempts: 3,
        retry_base: Duration::from_millis(1000),
        retry_max: Duration::from_millis(6000),
    };

    fn transient(retry_after: Option<Duration>) -> Error {
        Error::ModelTransient {
            message: "overloaded".into(),
            retry_after,
        }
    }

    fn output() -> JobOutput {
        JobOutput {
            result: RequestResult::Message(Message {
                model: Some("offline".into()),
                created_at: "2026-11-26T00:00:00Z".into(),
                ..Message::new(
                    "msg_1_reply".into(),
                    Role::Assistant,
                    "Elementary.".into(),
                    None,
                )
            }),
            usage: Usage::default(),
            model: "offline".into(),
            last_fragment: None,
        }
    }

    #[test]
    fn a_success_is_stored() {
        assert_eq!(
            decide(Outcome::Succeeded(Box::new(output())), 1, &LIMITS, 0.5),
            Settlement::Succeed(Box::new(output()))
        );
    }

    #[test]
    fn a_permanent_error_fails_at_once_whatever_the_attempt() {
        let e = Error::ModelPermanent {
            code: "content_filtered".into(),
            message: "refused".into(),
        };
        assert_eq!(
            decide(Outcome::Failed(e), 1, &LIMITS, 0.5),
            Settlement::Fail {
                error: ErrorBody {
                    code: "content_filtered".into(),
                    message: "refused".into()
                }
            }
        );
    }

    #[test]
    fn a_transient_error_with_attempts_left_is_retried_after_a_growing_capped_jittered_delay() {
        let delay = |attempts, jitter| match decide(
            Outcome::Failed(transient(None)),
            attempts,
            &LIMITS,
            jitter,
        ) {
            Settlement::Retry { delay, error } => {
                assert_eq!(error.code, "model_unavailable");
                delay
            }
            other => panic!("not a retry: {other:?}"),
        };
        // Cap: base × 2^(attempts − 1), at most retry_max; the jitter picks a share of it.
        assert_eq!(delay(1, 0.5), Duration::from_millis(500));
        assert_eq!(delay(2, 0.5), Duration::from_millis(1000));
        assert_eq!(delay(2, 0.0), Duration::ZERO);
        let big = Limits {
            max_attempts: 10,
            ..LIMITS
        };
        match decide(Outcome::Failed(transient(None)), 8, &big, 1.0) {
            Settlement::Retry { delay, .. } => assert_eq!(delay, Duration::from_millis(6000)),
            other => panic!("not a retry: {other:?}"),
        }
    }

    #[test]
    fn a_retry_after_is_a_floor_for_the_delay() {
        let after = Duration::from_secs(30);
        match decide(Outcome::Failed(transient(Some(after))), 1, &LIMITS, 0.5) {
            Settlement::Retry { delay, .. } => assert_eq!(delay, after),
            other => panic!("not a retry: {other:?}"),
        }
    }

    #[test]
    fn the_last_transient_failure_dead_letters_with_the_reason() {
        match decide(Outcome::Failed(transient(None)), 3, &LIMITS, 0.5) {
            Settlement::DeadLetter { error } => {
                assert_eq!(error.code, "model_unavailable");
                assert!(error.message.starts_with("gave up after 3 attempts"));
            }
            other => panic!("not dead-lettered: {other:?}"),
        }
    }

    #[test]
    fn a_job_whose_workers_kept_dying_is_dead_lettered_unrun() {
        match decide(Outcome::Exhausted, 4, &LIMITS, 0.5) {
            Settlement::DeadLetter { error } => assert_eq!(error.code, "max_attempts_exceeded"),
            other => panic!("not dead-lettered: {other:?}"),
        }
    }

    #[test]
    fn an_interrupted_attempt_is_released() {
        assert_eq!(
            decide(Outcome::Interrupted, 3, &LIMITS, 0.5),
            Settlement::Release
        );
    }
}
