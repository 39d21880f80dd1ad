//! The flags of `characterbot batch`, the batch client (`crate::client`).

use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct BatchArgs {
    /// Base URL of the API.
    #[arg(
        long,
        env = "CHARACTERBOT_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// Where `characterbot login` kept the session, used when neither --token nor --email is
    /// given (see `characterbot login --help`).
    #[arg(long, env = "CHARACTERBOT_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
    /// Access token; when absent, signs in with --email and --password (or uses the session).
    #[arg(long, env = "CHARACTERBOT_TOKEN")]
    pub token: Option<String>,
    #[arg(long, env = "CHARACTERBOT_EMAIL")]
    pub email: Option<String>,
    #[arg(long, env = "CHARACTERBOT_PASSWORD")]
    pub password: Option<String>,
    /// File of prompts: one a line, or JSON lines `{"custom_id": "...", "prompt": "..."}`
    /// ("-" or absent: standard input). Results are keyed by `custom_id`, else line number.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Where to write the results as JSON lines (absent: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Prompts per submitted batch (at most the server's CHARACTERBOT_MAX_BATCH).
    #[arg(long, default_value_t = 100)]
    pub chunk: usize,
}
