//! # workers — the persona and chat workers
//!
//! A worker takes jobs off a queue and turns each into one durable effect: a stored persona or
//! a stored reply. Nothing here knows HTTP; everything arrives through the ports of `shared`.
//!
//! Layout:
//! - [`consumer`]  the consume loop shared by both kinds: concurrency, visibility heartbeat,
//!   in-process retries, graceful shutdown; it applies what [`settlement`] decides.
//! - [`options`]   [`WorkerOptions`], the plain options of the consume loop.
//! - [`settlement`] how an attempt settles (succeed, retry after a back-off, fail,
//!   dead-letter, release): a pure decision and its table.
//! - [`persona`]   the persona job: prompt → validated persona record.
//! - [`chat`]      the chat job: persona + bounded history + message → one reply.
//! - [`error`]     this crate's error type.

pub mod chat;
pub mod consumer;
pub mod error;
pub mod options;
pub mod persona;
pub mod settlement;

pub use consumer::{Consumer, Job, JobContext, JobOutput};
pub use error::Error;
pub use options::WorkerOptions;
