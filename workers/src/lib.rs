//! # workers — the persona and chat workers
//!
//! A worker takes jobs off a queue and turns each into one durable effect: a stored persona or
//! a stored reply. Nothing here knows HTTP; everything arrives through the ports of `shared`.
//!
//! Layout:
//! - [`consumer`]  the consume loop shared by both kinds: concurrency, visibility heartbeat,
//!   in-process retries, graceful shutdown; it applies what [`settlement`] decides.
//! - [`options`]   [`WorkerOptions`], the plain options of the consume loop.
//! - [`settle`]    applies a settlement: the request's transition, the message's fate and the
//!   reply's end in one step (`shared::atomic`), then logs and counts it.
//! - [`start`]     when a job is marked running: after a quarter second, or at its first
//!   reply fragment; a quicker job's settlement counts its attempt instead.
//! - [`settlement`] how an attempt settles (succeed, retry after a back-off, fail,
//!   dead-letter, release): a pure decision and its table.
//! - [`persona`]   the persona job: prompt → validated persona record.
//! - [`chat`]      the chat job: persona + bounded history + message → one reply.
//! - [`memory`]    the memory job: folds the turns a chat's context dropped into its summary.
//! - [`error`]     this crate's error type.

// Functions stay short enough to read at once (clippy.toml sets the limit).
#![warn(clippy::too_many_lines)]

pub mod chat;
pub mod consumer;
pub mod error;
pub mod memory;
pub mod options;
pub mod persona;
pub mod settle;
pub mod settlement;
pub mod start;

pub use consumer::{Consumer, Job, JobContext, JobOutput};
pub use error::Error;
pub use options::WorkerOptions;
