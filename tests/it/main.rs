//! Every integration test of CharacterBot, in one test binary: one module per suite, sharing
//! one harness (`common`) that builds the product only as the product builds itself (the
//! embedded adapters, or the AWS adapters against the moto server of `scripts/test`). One
//! binary links the product and the AWS SDKs once, not once per suite.
//!
//! A suite alone: `scripts/test --test it flow::` (cargo's name filter; test names are
//! `<module>::<test>`).

/// One port's contract, run against each of its adapters: for every `module => subject`, a
/// module with one test per case, each on a fresh subject from `subject()`. Defined here, before
/// the suites, so that every `*_contract` module can use it.
macro_rules! contract {
    ($($module:ident => $subject:ident),+ $(,)? ; $($case:ident),* $(,)?) => {
        contract!(@each [$($case),*] $($module $subject)+);
    };
    // The cases travel as one token tree, so each adapter's module can repeat all of them.
    (@each $cases:tt $($module:ident $subject:ident)+) => {
        $( contract!(@adapter $module $subject $cases); )+
    };
    (@adapter $module:ident $subject:ident [$($case:ident),*]) => {
        mod $module {
            $( #[tokio::test] async fn $case() { super::$case(super::$subject().await).await } )*
        }
    };
}

mod common;

mod atomic_contract;
mod auth;
mod aws_backend;
mod aws_pipeline;
mod bad_input;
mod batches;
mod bedrock;
mod browser;
mod cli;
mod cognito;
mod conversations;
mod crash_drill;
mod events_contract;
mod flow;
mod hardening;
mod idempotency;
mod infra;
mod isolation;
mod openai;
mod openapi;
mod processes;
mod push;
mod queue_contract;
mod reliability;
mod schemathesis;
mod store_contract;
mod sync;
mod terminal;
mod trace;
mod verifier_contract;
