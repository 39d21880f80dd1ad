//! The flags of the terminal client's commands (`login`, `logout`, `persona`, `chat`): the
//! client itself is `crate::client`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

/// Where the client keeps its session, and which server it talks to.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Base URL of the API (`login` stores it in the session; the other commands use the
    /// session's unless this is given).
    #[arg(long, env = "CHARACTERBOT_URL")]
    pub url: Option<String>,
    /// Where the session (tokens) is kept, mode 0600: `$XDG_CONFIG_HOME/characterbot`, else
    /// `~/.config/characterbot`.
    #[arg(long, env = "CHARACTERBOT_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct LoginArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long, env = "CHARACTERBOT_EMAIL")]
    pub email: String,
    /// The password; absent: read from standard input (without echo on a terminal).
    #[arg(long, env = "CHARACTERBOT_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct PersonaArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: PersonaCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum PersonaCommand {
    /// Make a persona from a name or a description, and wait for it.
    Create {
        /// "Ada Lovelace", or "a grumpy pirate who loves cats".
        prompt: String,
    },
    /// The personas of the signed-in user, newest first.
    List,
    /// One persona, whole.
    Show { persona_id: String },
}

#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Chat with this persona (a new conversation).
    #[arg(conflicts_with = "new")]
    pub persona_id: Option<String>,
    /// Make a persona from this prompt first, then chat with it.
    #[arg(long)]
    pub new: Option<String>,
}
