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
    u64::try_from(shared::time::now_secs()).unwrap_or_default()
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

    fn load(file: &Path) -> anyhow::Result<Session> {
        let text = std::fs::read_to_string(file)
            .map_err(|_| anyhow::anyhow!("not signed in: run `characterbot login --email ...`"))?;
        serde_json::from_str(&text).with_context(|| format!("reading {}", file.display()))
    }

    /// This session with new tokens, saved. Sent once, never retried: a refresh token is good
    /// for one use, and a retry after a lost answer would present a used one (which ends the
    /// session).
    async fn refreshed(self, file: &Path) -> anyhow::Result<Session> {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()?;
        let res = http
            .post(format!(
                "{}/v1/auth/refresh",
                self.url.trim_end_matches('/')
            ))
            .json(&json!({ "refresh_token": self.refresh_token }))
            .send()
            .await?;
        if !res.status().is_success() {
            bail!(
                "the session has ended ({}): run `characterbot login`",
                res.status()
            );
        }
        let tokens: Tokens = res.json().await?;
        let session = Session::from_tokens(&self.url, &self.email, tokens);
        session.save(file)?;
        Ok(session)
    }

    /// The stored session, refreshed if its access token is about to expire; its connection
    /// renews the token again when it expires during a long run.
    pub async fn resume(args: &ClientArgs) -> anyhow::Result<Api> {
        let file = session_file(args)?;
        let mut session = Session::load(&file)?;
        // The session's tokens go only to the server that issued them.
        if let Some(url) = &args.url {
            if url.trim_end_matches('/') != session.url.trim_end_matches('/') {
                bail!(
                    "signed in to {}, not {url}: run `characterbot login --url {url}` first",
                    session.url
                );
            }
        }
        if session.expires_at <= now() + REFRESH_AHEAD_SECS {
            session = session.refreshed(&file).await?;
        }
        Ok(Api::with_token(&session.url, &session.access_token)?.renewed_from(file))
    }
}

/// A new access token after `stale` was refused: the one in the session file if another call
/// or process renewed it meanwhile, else a refresh.
pub async fn renew(file: &Path, stale: &str) -> anyhow::Result<String> {
    // One renewal at a time in this process: calls refused together wait for the first, and
    // then find its token in the file.
    static RENEWING: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();
    let _one = RENEWING.get_or_init(Default::default).lock().await;
    let session = Session::load(file)?;
    if session.access_token != stale {
        return Ok(session.access_token);
    }
    Ok(session.refreshed(file).await?.access_token)
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
