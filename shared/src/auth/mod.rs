//! Authentication: who is calling.
//!
//! Two ports. [`TokenVerifier`] checks a bearer token and names the user; [`IdentityProvider`]
//! signs users up and in. The one verifier, [`JwksVerifier`], checks RS256 tokens shaped like
//! Amazon Cognito's against a JSON Web Key Set, whether the keys come from the embedded issuer
//! ([`local`]) or from a Cognito user pool: the code that guards every request is the same in
//! both worlds.

pub mod cognito;
pub mod hashing;
pub mod local;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, RwLock};
use utoipa::ToSchema;

use crate::{Error, Result};

/// The claims CharacterBot reads, named as Cognito names them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    pub sub: String,
    pub iss: String,
    /// `access` or `id`.
    pub token_use: String,
    pub exp: i64,
    pub iat: i64,
    /// The app client, on access tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The app client, on ID tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

/// The caller of a request, once its token has been verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthUser {
    pub user_id: String,
    /// When the token expires (its `exp`, seconds since the epoch).
    pub expires_at: i64,
}

/// Tokens handed out at sign-in, shaped like Cognito's `AuthenticationResult`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Tokens {
    pub access_token: String,
    pub id_token: String,
    pub refresh_token: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// Always `Bearer`.
    pub token_type: String,
}

#[async_trait]
pub trait TokenVerifier: Send + Sync + 'static {
    /// Verifies an access token.
    async fn verify(&self, token: &str) -> Result<AuthUser>;
}

#[async_trait]
pub trait IdentityProvider: Send + Sync + 'static {
    /// Registers a user; returns the new user id. An e-mail already in use is a conflict.
    async fn sign_up(&self, email: &str, password: &str) -> Result<String>;
    /// Confirms a new account with the code sent to its e-mail. Accounts of the embedded issuer
    /// need no confirmation, so by default there is nothing to do.
    async fn confirm(&self, _email: &str, _code: &str) -> Result<()> {
        Ok(())
    }
    async fn sign_in(&self, email: &str, password: &str) -> Result<Tokens>;
    async fn refresh(&self, refresh_token: &str) -> Result<Tokens>;
    /// Ends the session of `refresh_token`: it, and every token refreshed from it, stops
    /// working. An unknown token is not an error (the session is over either way).
    async fn sign_out(&self, refresh_token: &str) -> Result<()>;
    /// Ends every session of the user whose access token this is.
    async fn sign_out_everywhere(&self, user_id: &str, access_token: &str) -> Result<()>;
}

/// Where a verifier gets its keys: the embedded issuer's key file, or a Cognito pool's JWKS URL.
#[async_trait]
pub trait JwksSource: Send + Sync + 'static {
    async fn fetch(&self) -> Result<JwkSet>;
}

/// Verifies Cognito-style RS256 tokens against a key set.
///
/// Keys are cached by `kid`. A token with an unknown `kid` triggers one refetch (keys rotate),
/// shared by all requests waiting on it and at most once per cooldown, so a flood of random
/// `kid`s cannot turn into a flood of fetches.
pub struct JwksVerifier {
    issuer: String,
    client_id: String,
    leeway: Duration,
    cooldown: Duration,
    source: Arc<dyn JwksSource>,
    keys: RwLock<HashMap<String, Arc<DecodingKey>>>,
    last_fetch: Mutex<Option<Instant>>,
}

fn unauthorized(reason: impl Into<String>) -> Error {
    Error::Unauthorized(reason.into())
}

impl JwksVerifier {
    pub fn new(
        issuer: impl Into<String>,
        client_id: impl Into<String>,
        leeway: Duration,
        cooldown: Duration,
        source: Arc<dyn JwksSource>,
    ) -> Self {
        JwksVerifier {
            issuer: issuer.into(),
            client_id: client_id.into(),
            leeway,
            cooldown,
            source,
            keys: RwLock::new(HashMap::new()),
            last_fetch: Mutex::new(None),
        }
    }

    async fn key(&self, kid: &str) -> Result<Arc<DecodingKey>> {
        if let Some(k) = self.keys.read().await.get(kid) {
            return Ok(k.clone());
        }
        // Single flight: whoever holds this lock fetches; the others then find the key cached.
        let mut last = self.last_fetch.lock().await;
        if let Some(k) = self.keys.read().await.get(kid) {
            return Ok(k.clone());
        }
        if last.is_some_and(|t| t.elapsed() < self.cooldown) {
            return Err(unauthorized("token signed with an unknown key"));
        }
        *last = Some(Instant::now());
        let set = self.source.fetch().await?;
        let mut fresh = HashMap::new();
        for jwk in &set.keys {
            let (Some(id), Ok(key)) = (jwk.common.key_id.clone(), DecodingKey::from_jwk(jwk))
            else {
                continue;
            };
            fresh.insert(id, Arc::new(key));
        }
        let found = fresh.get(kid).cloned();
        *self.keys.write().await = fresh;
        found.ok_or_else(|| unauthorized("token signed with an unknown key"))
    }

    /// Verifies signature, issuer, expiry and app client, and that the token is of `token_use`.
    pub async fn verify_claims(&self, token: &str, token_use: &str) -> Result<Claims> {
        // The library's own text ("unknown variant `none`", "InvalidSignature") goes to the
        // log, not to the client: it helps an attacker more than a user.
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            tracing::debug!(error = %e, "malformed token");
            unauthorized("malformed token")
        })?;
        // Pinned: a token may not choose its own algorithm (`none`, or HS256 keyed with our
        // public key).
        if header.alg != Algorithm::RS256 {
            return Err(unauthorized("token algorithm must be RS256"));
        }
        let kid = header
            .kid
            .ok_or_else(|| unauthorized("token has no key id"))?;
        let key = self.key(&kid).await?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[&self.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = self.leeway.as_secs();
        // The app client is checked below: Cognito access tokens carry it in `client_id`,
        // not `aud`.
        validation.validate_aud = false;
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|e| {
                tracing::debug!(error = %e, "token refused");
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                        unauthorized("token has expired")
                    }
                    _ => unauthorized("invalid token"),
                }
            })?
            .claims;
        if claims.token_use != token_use {
            return Err(unauthorized(format!("expected an {token_use} token")));
        }
        let client = match token_use {
            "access" => claims.client_id.as_deref(),
            _ => claims.aud.as_deref(),
        };
        if client != Some(self.client_id.as_str()) {
            return Err(unauthorized("token was issued to another app client"));
        }
        Ok(claims)
    }
}

#[async_trait]
impl TokenVerifier for JwksVerifier {
    /// Checks the signature every time: verified tokens are remembered by the API, which knows
    /// whether their requests were admitted (`ingest_api::token_cache`).
    async fn verify(&self, token: &str) -> Result<AuthUser> {
        let claims = self.verify_claims(token, "access").await?;
        Ok(AuthUser {
            user_id: claims.sub,
            expires_at: claims.exp,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::local::SigningKey;
    use super::*;

    /// A key source that counts its fetches and can be given new keys (rotation).
    struct Counting {
        fetches: AtomicUsize,
        set: std::sync::Mutex<serde_json::Value>,
    }

    #[async_trait]
    impl JwksSource for Counting {
        async fn fetch(&self) -> Result<JwkSet> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            let set = self
                .set
                .lock()
                .map_err(|_| Error::internal_msg("poisoned"))?
                .clone();
            Ok(serde_json::from_value(set)?)
        }
    }

    fn claims(token_use: &str) -> Claims {
        let now = crate::time::now_secs();
        Claims {
            sub: "u1".into(),
            iss: "iss".into(),
            token_use: token_use.into(),
            exp: now + 60,
            iat: now,
            client_id: (token_use == "access").then(|| "app".into()),
            aud: (token_use == "id").then(|| "app".into()),
            email: None,
            jti: None,
        }
    }

    #[tokio::test]
    async fn unknown_kids_refetch_once_single_flight_with_cooldown_and_rotation_works() {
        let dir1 = tempfile::tempdir().unwrap();
        let dir2 = tempfile::tempdir().unwrap();
        let old = SigningKey::load_or_create(dir1.path()).unwrap();
        let new = SigningKey::load_or_create(dir2.path()).unwrap();
        let source = Arc::new(Counting {
            fetches: AtomicUsize::new(0),
            set: std::sync::Mutex::new(old.jwks().clone()),
        });
        let verifier = Arc::new(JwksVerifier::new(
            "iss",
            "app",
            Duration::ZERO,
            Duration::from_millis(300),
            source.clone(),
        ));
        assert_eq!(
            verifier
                .verify(&old.sign(&claims("access")).unwrap())
                .await
                .unwrap()
                .user_id,
            "u1"
        );
        assert_eq!(source.fetches.load(Ordering::SeqCst), 1);

        // A flood of tokens with an unknown kid: one fetch at most, shared by all.
        let forged = new.sign(&claims("access")).unwrap();
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (v, t) = (verifier.clone(), forged.clone());
            tasks.push(tokio::spawn(async move { v.verify(&t).await }));
        }
        for t in tasks {
            assert!(matches!(t.await.unwrap(), Err(Error::Unauthorized(_))));
        }
        assert_eq!(
            source.fetches.load(Ordering::SeqCst),
            1,
            "cooldown holds back refetches"
        );

        // The pool rotates to the new key; after the cooldown its tokens are accepted.
        *source.set.lock().unwrap() = new.jwks().clone();
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(verifier.verify(&forged).await.is_ok());
        assert_eq!(source.fetches.load(Ordering::SeqCst), 2);

        // ID tokens carry the client in `aud` and are refused where access tokens are expected.
        let id = new.sign(&claims("id")).unwrap();
        assert!(verifier.verify(&id).await.is_err());
        assert_eq!(
            verifier
                .verify_claims(&id, "id")
                .await
                .unwrap()
                .aud
                .as_deref(),
            Some("app")
        );
    }
}
