//! The embedded identity provider: what Cognito does on AWS, on one machine.
//!
//! - An RS256 key pair lives in `<data dir>/keys/jwt-signing.pem` (created on first start,
//!   mode 0600; see `keys.rs`). Its public half is served as a JWKS, and tokens are checked by the same
//!   [`JwksVerifier`](super::JwksVerifier) that checks Cognito tokens.
//! - Users and their argon2 password hashes live in the embedded database.
//! - Tokens carry Cognito's claims (`iss`, `sub`, `token_use`, `client_id`/`aud`, `exp`, `iat`,
//!   header `kid`); refresh tokens are opaque random strings stored as SHA-256 hashes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use deadpool_sqlite::rusqlite::{params, OptionalExtension};
use sha2::{Digest, Sha256};

use super::hashing::{Lane, PasswordHashing};
use super::{Claims, IdentityProvider, Tokens};
use crate::sqlite::Db;
use crate::time::{now_ms, now_rfc3339, now_secs};
use crate::{Error, Result};

mod keys;

pub use keys::{KeyDirJwks, SigningKey};

pub const MIN_PASSWORD_CHARS: usize = 8;
pub const MAX_PASSWORD_CHARS: usize = 256;

/// What the embedded issuer signs and how it hashes; the binary builds it from its flags.
#[derive(Debug, Clone)]
pub struct LocalIssuerOptions {
    /// `iss` of the tokens it signs.
    pub issuer: String,
    /// App client id put in `client_id` (access tokens) and `aud` (ID tokens).
    pub client_id: String,
    /// Lifetime of access and ID tokens (whole seconds count).
    pub access_token_ttl: Duration,
    /// Lifetime of a session's refresh token, from its sign-in.
    pub refresh_token_ttl: Duration,
    /// Threads hashing passwords; 0 = one per core.
    pub hash_threads: usize,
    /// Live sessions one user may have; signing in once more ends the oldest.
    pub max_sessions_per_user: usize,
}

/// Sign-up, sign-in and refresh against the embedded database.
pub struct LocalIssuer {
    db: Db,
    key: Arc<SigningKey>,
    options: LocalIssuerOptions,
    /// Every argon2 hash runs here: a few threads, a short queue (see `super::hashing`).
    hashing: PasswordHashing,
    /// Verified against when the e-mail is unknown, so that a wrong e-mail takes as long as a
    /// wrong password and sign-in does not reveal who has an account.
    dummy_hash: String,
}

fn refresh_hash(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()))
}

/// The shape [`validate_email`] checks, as the OpenAPI document states it: one `@`, something
/// before it, a domain with a dot that neither begins nor ends it, no blank (space, tab, CR,
/// LF: the characters every regular-expression engine agrees are blanks). At most
/// [`EMAIL_MAX_CHARS`] characters.
pub const EMAIL_PATTERN: &str =
    "^[^@ \t\r\n]+@[^@ \t\r\n.][^@ \t\r\n]*\\.[^@ \t\r\n]*[^@ \t\r\n.]$";
pub const EMAIL_MAX_CHARS: usize = 254;

/// A minimal shape check ([`EMAIL_PATTERN`]); the address is not verified (no mail is sent on
/// the embedded side).
pub fn validate_email(email: &str) -> Result<()> {
    let blank = |c: char| matches!(c, '@' | ' ' | '\t' | '\r' | '\n');
    let ok = email.chars().count() <= EMAIL_MAX_CHARS
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !local.contains(blank)
                && !domain.contains(blank)
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid("email is not a valid address".into()))
    }
}

pub fn validate_password(password: &str) -> Result<()> {
    let n = password.chars().count();
    if !(MIN_PASSWORD_CHARS..=MAX_PASSWORD_CHARS).contains(&n) {
        return Err(Error::Invalid(format!(
            "password must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters"
        )));
    }
    Ok(())
}

impl LocalIssuer {
    /// Blocks for one hash (the dummy one): call it at start-up.
    pub fn new(db: Db, key: Arc<SigningKey>, options: LocalIssuerOptions) -> Result<Self> {
        let hashing = match options.hash_threads {
            0 => PasswordHashing::per_core()?,
            n => PasswordHashing::new(n, n * 4)?,
        };
        let dummy_hash = super::hashing::hash_now("not-a-real-password")?;
        Ok(LocalIssuer {
            db,
            key,
            options,
            hashing,
            dummy_hash,
        })
    }

    fn tokens_for(&self, user_id: &str, email: &str, refresh_token: String) -> Result<Tokens> {
        let now = now_secs();
        let ttl = self.options.access_token_ttl.as_secs();
        let base = Claims {
            sub: user_id.to_owned(),
            iss: self.options.issuer.clone(),
            token_use: "access".into(),
            exp: now + ttl as i64,
            iat: now,
            client_id: Some(self.options.client_id.clone()),
            aud: None,
            email: None,
            jti: Some(uuid::Uuid::new_v4().to_string()),
        };
        let id_claims = Claims {
            token_use: "id".into(),
            client_id: None,
            aud: Some(self.options.client_id.clone()),
            email: Some(email.to_owned()),
            jti: Some(uuid::Uuid::new_v4().to_string()),
            ..base.clone()
        };
        Ok(Tokens {
            access_token: self.key.sign(&base)?,
            id_token: self.key.sign(&id_claims)?,
            refresh_token,
            expires_in: ttl,
            token_type: "Bearer".into(),
        })
    }
}

#[async_trait]
impl IdentityProvider for LocalIssuer {
    async fn sign_up(&self, email: &str, password: &str) -> Result<String> {
        validate_email(email)?;
        validate_password(password)?;
        let hash = self.hashing.hash(password.to_owned()).await?;
        let user_id = uuid::Uuid::new_v4().to_string();
        let (id, email) = (user_id.clone(), email.to_lowercase());
        self.db
            .write(move |tx| {
                let inserted = tx.execute(
                    "INSERT OR IGNORE INTO users (user_id, email, password_hash, created_at)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![id, email, hash, now_rfc3339()],
                )?;
                if inserted == 0 {
                    return Err(Error::Conflict(
                        "an account with this email already exists".into(),
                    ));
                }
                Ok(())
            })
            .await?;
        Ok(user_id)
    }

    async fn sign_in(&self, email: &str, password: &str) -> Result<Tokens> {
        let email = email.to_lowercase();
        let lookup = email.clone();
        let row = self
            .db
            .call(move |c| {
                Ok(c.query_row(
                    "SELECT user_id, password_hash FROM users WHERE email = ?1",
                    [lookup],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
                )
                .optional()?)
            })
            .await?;
        let (user_id, hash, lane) = match row {
            Some((id, hash)) => (Some(id), hash, Lane::Account),
            None => (None, self.dummy_hash.clone(), Lane::Anyone),
        };
        let ok = self.hashing.verify(lane, hash, password.to_owned()).await?;
        let Some(user_id) = user_id.filter(|_| ok) else {
            return Err(Error::Unauthorized("incorrect email or password".into()));
        };
        let refresh = new_refresh_token();
        let (hash, uid) = (refresh_hash(&refresh), user_id.clone());
        // A session lasts this long from its sign-in, however often it is refreshed.
        let expires = now_ms() + self.options.refresh_token_ttl.as_millis() as i64;
        let max_sessions = self.options.max_sessions_per_user.max(1) as i64;
        self.db
            .write(move |tx| {
                tx.execute(
                    "INSERT INTO refresh_tokens (token_hash, user_id, expires_ms, family, created_ms)
                     VALUES (?1, ?2, ?3, ?1, ?4)",
                    params![hash, uid, expires, now_ms()],
                )?;
                tx.execute("DELETE FROM refresh_tokens WHERE expires_ms < ?1", [now_ms()])?;
                // Past the cap, the sessions signed in longest ago end.
                tx.execute(
                    "DELETE FROM refresh_tokens WHERE user_id = ?1 AND family NOT IN (
                         SELECT family FROM refresh_tokens WHERE user_id = ?1
                         GROUP BY family ORDER BY MIN(created_ms) DESC LIMIT ?2)",
                    params![uid, max_sessions],
                )?;
                Ok(())
            })
            .await?;
        self.tokens_for(&user_id, &email, refresh)
    }

    /// Rotates: the token is used up and the next one of its session comes back. A token
    /// used a second time means it was copied (by an attacker, or the client kept an old one):
    /// the whole session ends, for whoever holds its newest token too.
    async fn refresh(&self, refresh_token: &str) -> Result<Tokens> {
        let hash = refresh_hash(refresh_token);
        let next = new_refresh_token();
        let next_hash = refresh_hash(&next);
        let outcome = self
            .db
            .write(move |tx| {
                let row = tx
                    .query_row(
                        "SELECT t.user_id, u.email, t.family, t.used_ms, t.expires_ms
                         FROM refresh_tokens t JOIN users u ON u.user_id = t.user_id
                         WHERE t.token_hash = ?1",
                        [&hash],
                        |r| {
                            Ok((
                                r.get::<_, String>(0)?,
                                r.get::<_, String>(1)?,
                                r.get::<_, String>(2)?,
                                r.get::<_, Option<i64>>(3)?,
                                r.get::<_, i64>(4)?,
                            ))
                        },
                    )
                    .optional()?;
                let Some((user_id, email, family, used, expires)) = row else {
                    return Ok(Rotation::Invalid);
                };
                if expires <= now_ms() {
                    return Ok(Rotation::Invalid);
                }
                if used.is_some() {
                    // Committed, not rolled back: the session ends even though this call fails.
                    tx.execute("DELETE FROM refresh_tokens WHERE family = ?1", [&family])?;
                    return Ok(Rotation::Reused { user_id });
                }
                tx.execute(
                    "UPDATE refresh_tokens SET used_ms = ?2 WHERE token_hash = ?1",
                    params![hash, now_ms()],
                )?;
                tx.execute(
                    "INSERT INTO refresh_tokens (token_hash, user_id, expires_ms, family, created_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![next_hash, user_id, expires, family, now_ms()],
                )?;
                Ok(Rotation::Next { user_id, email })
            })
            .await?;
        match outcome {
            Rotation::Next { user_id, email } => self.tokens_for(&user_id, &email, next),
            Rotation::Reused { user_id } => {
                tracing::warn!(%user_id, "a used refresh token came back; its session is ended");
                Err(Error::Unauthorized(
                    "refresh token was already used; sign in again".into(),
                ))
            }
            Rotation::Invalid => Err(Error::Unauthorized(
                "refresh token is invalid or expired".into(),
            )),
        }
    }

    async fn sign_out(&self, refresh_token: &str) -> Result<()> {
        let hash = refresh_hash(refresh_token);
        self.db
            .write(move |tx| {
                tx.execute(
                    "DELETE FROM refresh_tokens WHERE family =
                         (SELECT family FROM refresh_tokens WHERE token_hash = ?1)",
                    [hash],
                )?;
                Ok(())
            })
            .await
    }

    async fn sign_out_everywhere(&self, user_id: &str, _access_token: &str) -> Result<()> {
        let user_id = user_id.to_owned();
        self.db
            .write(move |tx| {
                tx.execute("DELETE FROM refresh_tokens WHERE user_id = ?1", [user_id])?;
                Ok(())
            })
            .await
    }
}

/// What a refresh found.
enum Rotation {
    Next { user_id: String, email: String },
    Reused { user_id: String },
    Invalid,
}

fn new_refresh_token() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}
