//! Every integration test of CharacterBot, in one test binary: one module per suite, sharing
//! one harness (`common`) that builds the product only as the product builds itself (the
//! embedded adapters, or the AWS adapters against the moto server of `scripts/test`). One
//! binary links the product and the AWS SDKs once, not once per suite.
//!
//! A suite alone: `scripts/test --test it flow::` (cargo's name filter; test names are
//! `<module>::<test>`).

mod common;

mod atomic_contract;
mod auth;
mod aws_backend;
mod aws_pipeline;
mod bad_input;
mod bedrock;
mod cli;
mod cognito;
mod crash_drill;
mod events_contract;
mod flow;
mod hardening;
mod idempotency;
mod infra;
mod isolation;
mod openai;
mod processes;
mod queue_contract;
mod reliability;
mod store_contract;
mod trace;
mod verifier_contract;
