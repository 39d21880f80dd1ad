//! # shared — the domain of CharacterBot and the ports both halves plug into
//!
//! The ingest API and the workers never depend on each other; everything they agree on lives
//! here: what a persona, a conversation or a request *is*, and the small traits through which
//! they reach the outside world. Each trait has its adapters as sibling modules, so a reader
//! finds the SQLite queue next to the queue trait and the SQS one beside it.
//!
//! Layout:
//! - [`domain`]   records the product is about (users, personas, conversations, messages,
//!   requests, batches).
//! - [`ids`]      every id as its own type (`PersonaId`, `RequestId`, …), its prefix and the ids
//!   derived from it (the persona of a request, the reply it writes).
//! - [`job`]      the API → worker contract: a job, encoded into a queue message by the API
//!   and decoded from a delivery by a worker.
//! - [`error`]    the one error type of this crate, with the transient/permanent split that
//!   drives retries; failures of a dependency keep it as their `source`.
//! - [`queue`]    the `Queue` port (SQS semantics): `queue::sqlite` (embedded), `queue::sqs`.
//! - [`store`]    the `Store` port, one narrow trait per kind of record (`PersonaStore`,
//!   `ConversationStore`, `RequestStore`, `IdempotencyStore`) joined into `Store`; each adapter
//!   a folder with a file per trait: `store::sqlite` (embedded), `store::dynamodb`.
//! - [`atomic`]   the `Atomic` port: accepting a request and settling a job, each one unit of
//!   work across store, queue and events: `atomic::sqlite` (one transaction), `atomic::aws`
//!   (a folder: `accept`, `settle`, the outbox sweep in its `mod.rs`).
//! - [`events`]   the `EventBus` port, request changes and stream deltas pushed to clients:
//!   `events::sqlite` (embedded), `events::aws` (DynamoDB for replay, SNS for news, an SQS
//!   inbox per API instance); both hand what reaches a process to `events::fanout`.
//! - [`auth`]     the `TokenVerifier` and `IdentityProvider` ports, the one JWKS verifier,
//!   `auth::local` (the embedded issuer: sign-up, sign-in, refresh, RS256 keys) and
//!   `auth::cognito`.
//! - [`models`]   the `PersonaModel` and `ChatModel` ports: `models::offline`,
//!   `models::openai`, `models::bedrock`.
//! - [`ports`]    every port of one backend, the models included, in one struct built once at
//!   start-up.
//! - [`metrics`]  the Prometheus registry shared by API and workers; [`emf`] writes the same
//!   metrics in CloudWatch Embedded Metric Format.
//! - [`sqlite`]   the connection pool and schema behind every embedded adapter.
//! - [`private_fs`] the data dir `0700` and its database files `0600`.
//! - [`time`]     timestamps, one format everywhere.
//! - [`memo`]     what a process remembers to save a read or a repeated send: bounded hints.

// Functions stay short enough to read at once (clippy.toml sets the limit).
#![warn(clippy::too_many_lines)]

pub mod atomic;
pub mod auth;
pub mod domain;
pub mod emf;
pub mod error;
pub mod events;
pub mod ids;
pub mod job;
pub mod memo;
pub mod metrics;
pub mod models;
pub mod ports;
pub mod private_fs;
pub mod queue;
pub mod sqlite;
pub mod store;
pub mod time;

pub use error::{Error, Result};
