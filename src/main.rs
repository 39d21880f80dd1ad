//! The `characterbot` binary: parses the command line, sets up logging and signals, and runs
//! what was asked. Everything else lives in the library crates.

// Functions stay short enough to read at once (clippy.toml sets the limit).
#![warn(clippy::too_many_lines)]

/// mimalloc, tuned: why, in `characterbot::allocator`.
#[global_allocator]
static GLOBAL: characterbot::allocator::Allocator = characterbot::allocator::Allocator {};
characterbot::tune_before_main!();

use characterbot::cli::{LogFormat, Settings};
use clap::{Parser, Subcommand, ValueEnum};
use shared::domain::RequestKind;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "characterbot",
    version,
    about = "Asynchronous persona-chat backend"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// API and both workers in one process (the quick start).
    Serve {
        #[command(flatten)]
        settings: Settings,
    },
    /// The HTTP API alone.
    Api {
        #[command(flatten)]
        settings: Settings,
    },
    /// One kind of worker alone.
    Worker {
        #[arg(value_enum)]
        kind: WorkerKind,
        #[command(flatten)]
        settings: Settings,
    },
    /// Create the DynamoDB table and SQS queues (with dead-letter queues) where missing.
    AwsInit {
        #[command(flatten)]
        settings: Settings,
    },
    /// Client: create many personas from a file of prompts, with a progress bar.
    Batch(characterbot::cli::BatchArgs),
    /// Client: sign in and keep the session for the other client commands.
    Login(characterbot::cli::LoginArgs),
    /// Client: end the stored session.
    Logout(characterbot::cli::ClientArgs),
    /// Client: create, list and show personas.
    Persona(characterbot::cli::PersonaArgs),
    /// Client: chat with a persona in the terminal, replies streamed.
    Chat(characterbot::cli::ChatArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum WorkerKind {
    Persona,
    Chat,
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tower_http=info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

/// Cancels `token` on SIGINT or SIGTERM.
fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        token.cancel();
    });
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run_command())
}

async fn run_command() -> anyhow::Result<()> {
    let (role, settings) = match Cli::parse().command {
        Command::Serve { settings } => (characterbot::Role::Serve, settings),
        Command::Api { settings } => (characterbot::Role::Api, settings),
        Command::Worker { kind, settings } => {
            let kind = match kind {
                WorkerKind::Persona => RequestKind::Persona,
                WorkerKind::Chat => RequestKind::Chat,
            };
            (characterbot::Role::Worker(kind), settings)
        }
        Command::Batch(args) => return characterbot::client::run(args).await,
        Command::Login(args) => return characterbot::client::session::login(args).await,
        Command::Logout(args) => return characterbot::client::session::logout(args).await,
        Command::Persona(args) => return characterbot::client::terminal::persona(args).await,
        Command::Chat(args) => return characterbot::client::terminal::chat(args).await,
        Command::AwsInit { settings } => {
            init_logging(settings.log_format);
            return characterbot::aws_init(&settings).await;
        }
    };
    init_logging(settings.log_format);
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    characterbot::run(role, settings, shutdown).await
}
