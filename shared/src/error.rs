//! The crate's one error type. Its main job besides carrying a message is the split that every
//! retry decision hangs on: [`Error::is_transient`] says whether trying again may help.

use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not found")]
    NotFound,
    /// A write lost a race or broke a uniqueness rule (e.g. e-mail already registered).
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The account exists but is not confirmed yet.
    #[error("{0}")]
    NotConfirmed(String),
    /// The account's password was reset by an administrator (or by Cognito after a leak): it
    /// signs in again only after a new password is set.
    #[error("{0}")]
    PasswordResetRequired(String),
    #[error("storage error: {0}")]
    Storage(String),
    #[error("queue error: {0}")]
    Queue(String),
    #[error("configuration error: {0}")]
    Config(String),
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
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Whether the same operation may succeed if tried again later.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::ModelTransient { .. }
                | Error::Storage(_)
                | Error::Queue(_)
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
            Error::Invalid(_) => "invalid".into(),
            Error::Unauthorized(_) => "unauthorized".into(),
            Error::NotConfirmed(_) => "user_not_confirmed".into(),
            Error::PasswordResetRequired(_) => "password_reset_required".into(),
            Error::Busy { .. } => "busy".into(),
            Error::Throttled { .. } => "too_many_attempts".into(),
            _ => "internal".into(),
        }
    }
}

impl From<deadpool_sqlite::rusqlite::Error> for Error {
    fn from(e: deadpool_sqlite::rusqlite::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Internal(format!("json: {e}"))
    }
}
