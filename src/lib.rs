//! # characterbot — the one binary, and the only place where adapters are chosen
//!
//! `main.rs` parses the command line with [`cli`], the only `clap` in the house; this library
//! builds the adapters named by the settings once, at start-up, turns the flags into each
//! library's plain options, and hands both to the API and the workers, which know only the
//! traits and their options. The integration tests use the same functions, so they run exactly
//! what ships.
//!
//! Layout:
//! - [`cli`]       every flag and its environment variable (`Settings` and one struct per
//!   group), and their conversions into `ingest_api::ApiOptions`, `workers::WorkerOptions`,
//!   `shared::auth::local::LocalIssuerOptions` and the model options.
//! - [`ports`]     [`open_ports`]: the queue, store, event bus, auth and models of a backend
//!   (`shared::ports::Ports`), chosen from the settings: the one place that chooses adapters;
//!   [`AwsClients`], the AWS SDK clients with deadlines.
//! - [`models`]    the persona and chat models the settings name ([`models::open_models`]),
//!   part of the ports.
//! - [`run`](mod@run) [`api_state`], [`consumer`]: the API state and a worker's consume loop from
//!   those; [`run()`] runs `serve`, `api` or one `worker` until the shutdown token is cancelled.
//! - [`aws_init`](mod@aws_init) `characterbot aws-init`: the table and queues of the AWS backend.
//! - [`client`]    `characterbot batch`, the batch client with a progress bar.
//! - [`allocator`] the process's allocator (mimalloc) and its tuning.

// Functions stay short enough to read at once (clippy.toml sets the limit).
#![warn(clippy::too_many_lines)]

pub mod allocator;
pub mod aws_init;
pub mod cli;
pub mod client;
pub mod models;
pub mod ports;
pub mod run;

pub use aws_init::aws_init;
pub use ports::{open_ports, AwsClients, Ports};
pub use run::{api_state, consumer, run, Role};
pub use shared::models::Models;
