//! The crate's one error type. Its main job besides carrying a message is the split that every
//! retry decision hangs on: [`Error::is_transient`] says whether trying again may help.
//!
//! Failures of a dependency (SQLite, DynamoDB, SQS, JSON) keep the dependency's own error as
//! their [`source`](std::error::Error::source) beside a short context of what was being done:
//! the `Display` text names the context, and [`Report`] writes the whole chain for a log line.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The source of a failure of a dependency, whatever its type (the AWS SDK's errors are generic
/// over the operation, so no one `#[from]` could take them all).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not found")]
    NotFound,
    /// A write lost a race or broke a uniqueness rule (e.g. e-mail already registered).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The conversation's persona was deleted: the conversation stays readable, and takes no
    /// new messages.
    #[error("the conversation's persona was deleted")]
    PersonaDeleted,
    /// The job's user cancelled it: it stops, and its request ends `cancelled`.
    #[error("the request was cancelled")]
    Cancelled,
    #[error("invalid: {0}")]
    Invalid(String),
    /// A position in a feed older than the feed keeps (a sync cursor past the tombstones'
    /// retention): what changed since cannot be told whole.
    #[error("expired: {0}")]
    Expired(String),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The account exists but is not confirmed yet.
    #[error("{0}")]
    NotConfirmed(String),
    /// The account's password was reset by an administrator (or by Cognito after a leak): it
    /// signs in again only after a new password is set.
    #[error("{0}")]
    PasswordResetRequired(String),
    #[error("storage error: {context}")]
    Storage {
        context: Cow<'static, str>,
        #[source]
        source: Option<BoxError>,
    },
    #[error("queue error: {context}")]
    Queue {
        context: Cow<'static, str>,
        #[source]
        source: Option<BoxError>,
    },
    #[error("configuration error: {context}")]
    Config {
        context: Cow<'static, str>,
        #[source]
        source: Option<BoxError>,
    },
    /// A model call that may succeed later: throttling, time-outs, 5xx, a model warming up.
    #[error("model temporarily unavailable: {message}")]
    ModelTransient {
        message: String,
        retry_after: Option<Duration>,
    },
    /// A model call that will fail the same way every time: refusals, invalid input, bad
    /// credentials. `code` is the machine-readable code shown to the client.
    #[error("{message}")]
    ModelPermanent { code: String, message: String },
    /// The server is at its bound for this kind of work (e.g. password hashing): nothing was
    /// done; the caller may try again after `retry_after`.
    #[error("{message}")]
    Busy {
        message: String,
        retry_after: Duration,
    },
    /// Too many failed attempts (sign-in, refresh) from this account or address: refused
    /// without being tried until `retry_after` has passed.
    #[error("too many failed attempts; retry in {} s", .retry_after.as_secs().max(1))]
    Throttled { retry_after: Duration },
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
    #[error("internal error: {context}")]
    Internal {
        context: Cow<'static, str>,
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// Whether the same operation may succeed if tried again later.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::ModelTransient { .. }
                | Error::Storage { .. }
                | Error::Queue { .. }
                | Error::Io(_)
                | Error::Busy { .. }
        )
    }

    /// The machine-readable code a client sees when this error ends a request.
    pub fn code(&self) -> String {
        match self {
            Error::ModelPermanent { code, .. } => code.clone(),
            Error::ModelTransient { .. } => "model_unavailable".into(),
            Error::NotFound => "not_found".into(),
            Error::Conflict(_) => "conflict".into(),
            Error::PersonaDeleted => "persona_deleted".into(),
            Error::Cancelled => "cancelled".into(),
            Error::Invalid(_) => "invalid".into(),
            Error::Expired(_) => "expired".into(),
            Error::Unauthorized(_) => "unauthorized".into(),
            Error::NotConfirmed(_) => "user_not_confirmed".into(),
            Error::PasswordResetRequired(_) => "password_reset_required".into(),
            Error::Busy { .. } => "busy".into(),
            Error::Throttled { .. } => "too_many_attempts".into(),
            _ => "internal".into(),
        }
    }
}

impl Error {
    /// A storage failure caused by `source` while doing `context`.
    pub fn storage(context: impl Into<Cow<'static, str>>, source: impl Into<BoxError>) -> Self {
        Error::Storage {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// A storage failure found by this code (nothing underneath failed).
    pub fn storage_msg(context: impl Into<Cow<'static, str>>) -> Self {
        Error::Storage {
            context: context.into(),
            source: None,
        }
    }

    /// A queue failure caused by `source` while doing `context`.
    pub fn queue(context: impl Into<Cow<'static, str>>, source: impl Into<BoxError>) -> Self {
        Error::Queue {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// A queue failure found by this code.
    pub fn queue_msg(context: impl Into<Cow<'static, str>>) -> Self {
        Error::Queue {
            context: context.into(),
            source: None,
        }
    }

    /// A setting (or a file it names) that cannot be used, as `source` found.
    pub fn config(context: impl Into<Cow<'static, str>>, source: impl Into<BoxError>) -> Self {
        Error::Config {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// A setting that is missing or out of range, as this code found.
    pub fn config_msg(context: impl Into<Cow<'static, str>>) -> Self {
        Error::Config {
            context: context.into(),
            source: None,
        }
    }

    /// A bug or an impossible state, caused by `source`.
    pub fn internal(context: impl Into<Cow<'static, str>>, source: impl Into<BoxError>) -> Self {
        Error::Internal {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// A bug or an impossible state found by this code.
    pub fn internal_msg(context: impl Into<Cow<'static, str>>) -> Self {
        Error::Internal {
            context: context.into(),
            source: None,
        }
    }
}

impl From<deadpool_sqlite::rusqlite::Error> for Error {
    fn from(e: deadpool_sqlite::rusqlite::Error) -> Self {
        Error::storage("sqlite", e)
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::internal("json", e)
    }
}

/// One error that several failures share (e.g. the writer's failed commit fails every write in
/// it). It reads as the error itself, `Display` and `source` both, so a [`Report`] shows it once;
/// a caller that wants the original downcasts to `SharedError<E>` and reads `.0`.
#[derive(Debug)]
pub struct SharedError<E>(pub Arc<E>);

// By hand: a derived `Clone` would ask `E: Clone`, and sharing is what the `Arc` is for.
impl<E> Clone for SharedError<E> {
    fn clone(&self) -> Self {
        SharedError(Arc::clone(&self.0))
    }
}

impl<E: std::error::Error> std::fmt::Display for SharedError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&*self.0, f)
    }
}

impl<E: std::error::Error> std::error::Error for SharedError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// An error and every source under it, `outer: inner: innermost`, for logs and for the
/// messages of failed requests: `Display` of an error alone names only its own context.
pub struct Report<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn a_sqlite_error_stays_reachable_as_the_source() {
        let e = Error::from(deadpool_sqlite::rusqlite::Error::InvalidQuery);
        let source = e.source().expect("a source");
        assert!(source
            .downcast_ref::<deadpool_sqlite::rusqlite::Error>()
            .is_some());
        assert!(e.is_transient());
        assert_eq!(e.code(), "internal");
        assert!(Report(&e)
            .to_string()
            .starts_with("storage error: sqlite: "));
    }

    #[test]
    fn a_json_error_stays_reachable_as_the_source() {
        let json = serde_json::from_str::<u8>("x").expect_err("not a number");
        let e = Error::from(json);
        let source = e.source().expect("a source");
        assert!(source.downcast_ref::<serde_json::Error>().is_some());
        assert!(!e.is_transient());
        assert_eq!(e.to_string(), "internal error: json");
        assert!(Report(&e).to_string().len() > "internal error: json".len());
    }

    #[test]
    fn a_config_error_keeps_what_it_wraps_as_the_source() {
        let e = Error::config(
            "signing key",
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not PEM"),
        );
        assert_eq!(e.to_string(), "configuration error: signing key");
        let source = e.source().expect("a source");
        assert!(source.downcast_ref::<std::io::Error>().is_some());
        assert_eq!(
            Report(&e).to_string(),
            "configuration error: signing key: not PEM"
        );
        assert!(Error::config_msg("no region").source().is_none());
        assert_eq!(e.code(), "internal");
        assert!(!e.is_transient());
    }

    #[test]
    fn a_shared_error_reads_as_the_error_it_shares() {
        let inner = Error::storage("sqlite", std::io::Error::other("disk I/O error"));
        let shared = SharedError(Arc::new(inner));
        let e = Error::storage("sqlite write failed", shared.clone());
        // Once in the chain, not twice: `Display` and `source` are the shared error's own.
        assert_eq!(
            Report(&e).to_string(),
            "storage error: sqlite write failed: storage error: sqlite: disk I/O error"
        );
        assert!(e
            .source()
            .and_then(|s| s.downcast_ref::<SharedError<Error>>())
            .is_some());
        assert_eq!(shared.to_string(), "storage error: sqlite");
    }

    #[test]
    fn a_message_alone_has_no_source() {
        let e = Error::queue_msg("receipt is no longer valid");
        assert!(e.source().is_none());
        assert!(e.is_transient());
        assert_eq!(
            Report(&e).to_string(),
            "queue error: receipt is no longer valid"
        );
    }
}
