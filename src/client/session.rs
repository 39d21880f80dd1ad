//! The terminal client's session: `characterbot login` signs in and keeps the tokens in the
//! user's config dir (`session.json`, mode 0600, in a 0700 dir); the other commands read them,
//! refresh the access token when it is about to expire (saving the new tokens: the embedded
//! issuer rotates refresh tokens), and `logout` ends the session on the server and deletes the
//! file.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::json;
use shared::auth::Tokens;

use super::http::{call, typed, Api};
use crate::cli::{ClientArgs, LoginArgs};

const DEFAULT_URL: &str = "http://127.0.0.1:8080";
/// An access token this close to its end is refreshed before use.
const REFRESH_AHEAD_SECS: u64 = 60;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub url: String,
    pub email: String,
    pub access_token: String,
    pub refresh_token: String,
    /// When the access token expires, in Unix seconds.
    pub expires_at: u64,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The config dir: the flag, else `$XDG_CONFIG_HOME/characterbot`, else
/// `$HOME/.config/characterbot`.
fn config_dir(args: &ClientArgs) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &args.config_dir {
        return Ok(dir.clone());
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").context("no HOME to keep the session in")?)
            .join(".config"),
    };
    Ok(base.join("characterbot"))
}

fn session_file(args: &ClientArgs) -> anyhow::Result<PathBuf> {
    Ok(config_dir(args)?.join("session.json"))
}

impl Session {
    fn from_tokens(url: &str, email: &str, tokens: Tokens) -> Session {
        Session {
            url: url.to_owned(),
            email: email.to_owned(),
            access_token: tokens.access_token,
            refresh_token: tokens.refresh_token,
            expires_at: now() + tokens.expires_in,
        }
    }

    fn save(&self, file: &Path) -> anyhow::Result<()> {
        if let Some(dir) = file.parent() {
            shared::private_fs::private_dir(dir)?;
        }
        // Made 0600 before the tokens are written into it.
        shared::private_fs::private_file(file)?;
        std::fs::write(file, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", file.display()))
    }

    /// The stored session, refreshed if its access token is about to expire.
    pub async fn resume(args: &ClientArgs) -> anyhow::Result<Api> {
        let file = session_file(args)?;
        let text = std::fs::read_to_string(&file)
            .map_err(|_| anyhow::anyhow!("not signed in: run `characterbot login --email ...`"))?;
        let mut session: Session =
            serde_json::from_str(&text).with_context(|| format!("reading {}", file.display()))?;
        if let Some(url) = &args.url {
            session.url.clone_from(url);
        }
        let api = Api::with_token(&session.url, &session.access_token)?;
        if session.expires_at > now() + REFRESH_AHEAD_SECS {
            return Ok(api);
        }
        let refreshed = call(|| {
            api.http
                .post(api.url("/v1/auth/refresh"))
                .json(&json!({ "refresh_token": session.refresh_token }))
        })
        .await
        .map_err(|e| anyhow::anyhow!("the session has ended ({e}): run `characterbot login`"))?;
        let tokens: Tokens = typed(refreshed)?;
        let session = Session::from_tokens(&session.url, &session.email, tokens);
        session.save(&file)?;
        Api::with_token(&session.url, &session.access_token)
    }
}

/// Reads the password from standard input: one line, not echoed when it is a terminal.
fn read_password() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    if tty {
        eprint!("Password: ");
        std::io::stderr().flush()?;
        // `stty` by hand: no password-prompt crate is in the project's set, and this is the
        // whole of what one would do here on Unix.
        let _ = std::process::Command::new("stty").arg("-echo").status();
    }
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if tty {
        let _ = std::process::Command::new("stty").arg("echo").status();
        eprintln!();
    }
    read?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

pub async fn login(args: LoginArgs) -> anyhow::Result<()> {
    let url = args
        .client
        .url
        .clone()
        .unwrap_or_else(|| DEFAULT_URL.into());
    let password = match args.password {
        Some(p) => p,
        None => read_password()?,
    };
    let api = Api::with_token(&url, "")?;
    let answer = call(|| {
        api.http
            .post(api.url("/v1/auth/signin"))
            .json(&json!({ "email": args.email, "password": password }))
    })
    .await;
    let tokens: Tokens = match answer {
        Ok(body) => typed(body)?,
        Err(e) => bail!("sign-in refused: {}", e.message().unwrap_or(&e.to_string())),
    };
    let file = session_file(&args.client)?;
    Session::from_tokens(&url, &args.email, tokens).save(&file)?;
    eprintln!(
        "signed in as {} ({url}); session kept in {}",
        args.email,
        file.display()
    );
    Ok(())
}

pub async fn logout(args: ClientArgs) -> anyhow::Result<()> {
    let file = session_file(&args)?;
    let Ok(text) = std::fs::read_to_string(&file) else {
        eprintln!("not signed in");
        return Ok(());
    };
    let session: Session = serde_json::from_str(&text)?;
    let api = Api::with_token(&session.url, &session.access_token)?;
    // The file goes whatever the server says: a session it no longer knows is over anyway.
    let ended = call(|| {
        api.http
            .post(api.url("/v1/auth/signout"))
            .json(&json!({ "refresh_token": session.refresh_token }))
    })
    .await;
    std::fs::remove_file(&file)?;
    match ended {
        Ok(_) => eprintln!("signed out"),
        Err(e) => eprintln!("signed out here; the server answered: {e}"),
    }
    Ok(())
}
