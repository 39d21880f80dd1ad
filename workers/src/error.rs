//! The crate's one error type. Job failures are `shared::Error`s (they carry the
//! transient/permanent split); this names what only a consumer can get wrong.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("queue message is not a job: {0}")]
    BadMessage(String),
}
