//! The accounts and token-verification contract, run against each issuer: the embedded local
//! issuer (keys read from its key file) and a Cognito user pool on the moto server of
//! `scripts/test` (keys fetched over HTTP from `/{pool}/.well-known/jwks.json`). The verifier is
//! the same `JwksVerifier` in both; what differs is who signs and where the keys come from.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common;
use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use shared::auth::cognito::{issuer, CognitoIdentity, HttpJwks, RefreshCall};
use shared::auth::local::{KeyDirJwks, LocalIssuer, SigningKey};
use shared::auth::{IdentityProvider, JwksSource, JwksVerifier, TokenVerifier};
use shared::sqlite::Db;
use shared::Error;

const PASSWORD: &str = "Correct-Horse-9!";

/// Counts the key fetches of the source it wraps.
struct Counting {
    inner: Arc<dyn JwksSource>,
    fetches: AtomicUsize,
}

#[async_trait]
impl JwksSource for Counting {
    async fn fetch(&self) -> shared::Result<JwkSet> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        self.inner.fetch().await
    }
}

/// An issuer, and how to build verifiers of its tokens.
struct Subject {
    identity: Arc<dyn IdentityProvider>,
    source: Arc<dyn JwksSource>,
    issuer: String,
    client_id: String,
    _dir: Option<tempfile::TempDir>,
}

impl Subject {
    fn verifier_for(&self, issuer: &str, client_id: &str, cooldown: Duration) -> JwksVerifier {
        JwksVerifier::new(
            issuer,
            client_id,
            Duration::from_secs(30),
            cooldown,
            self.source.clone(),
        )
    }

    fn verifier(&self) -> JwksVerifier {
        self.verifier_for(&self.issuer, &self.client_id, Duration::from_secs(30))
    }

    /// A new confirmed account, signed in: its id and its tokens.
    async fn account(&self) -> (String, shared::auth::Tokens) {
        let email = format!("{}@example.com", uuid::Uuid::new_v4().simple());
        let id = self.identity.sign_up(&email, PASSWORD).await.unwrap();
        self.identity.confirm(&email, "123456").await.unwrap();
        let tokens = self.identity.sign_in(&email, PASSWORD).await.unwrap();
        (id, tokens)
    }
}

async fn local() -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).await.unwrap();
    let key = SigningKey::load_or_create(dir.path()).unwrap();
    let auth = common::settings(dir.path(), &[]).auth;
    Subject {
        identity: Arc::new(LocalIssuer::new(db, Arc::new(key), (&auth).into()).unwrap()),
        source: Arc::new(KeyDirJwks {
            dir: dir.path().to_owned(),
        }),
        issuer: auth.issuer,
        client_id: auth.client_id,
        _dir: Some(dir),
    }
}

async fn cognito() -> Subject {
    let endpoint = std::env::var("CHARACTERBOT_TEST_AWS_ENDPOINT").unwrap();
    let pool = common::cognito_pool(false).await;
    let jwks_url = format!("{endpoint}/{}/.well-known/jwks.json", pool.pool_id);
    Subject {
        // moto lacks GetTokensFromRefreshToken; rotation is tested on a fake in tests/it/cognito.rs.
        identity: Arc::new(
            CognitoIdentity::new(pool.idp, &pool.client_id, None)
                .with_refresh_call(RefreshCall::InitiateAuth),
        ),
        source: Arc::new(HttpJwks::new(jwks_url).unwrap()),
        issuer: issuer("us-east-1", &pool.pool_id),
        client_id: pool.client_id,
        _dir: None,
    }
}

/// `token` with its header or payload JSON changed by `edit`; the signature is kept.
fn altered(token: &str, part: usize, edit: impl Fn(&mut serde_json::Value)) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut json: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[part]).unwrap()).unwrap();
    edit(&mut json);
    parts[part] = URL_SAFE_NO_PAD.encode(json.to_string());
    parts.join(".")
}

fn refused(result: shared::Result<shared::auth::AuthUser>) -> bool {
    matches!(result, Err(Error::Unauthorized(_)))
}

async fn accounts_sign_up_confirm_sign_in_and_refresh(s: Subject) {
    let email = format!("{}@example.com", uuid::Uuid::new_v4().simple());
    let id = s.identity.sign_up(&email, PASSWORD).await.unwrap();
    assert!(matches!(
        s.identity.sign_up(&email, PASSWORD).await,
        Err(Error::Conflict(_))
    ));
    s.identity.confirm(&email, "123456").await.unwrap();
    let tokens = s.identity.sign_in(&email, PASSWORD).await.unwrap();
    assert_eq!(tokens.token_type, "Bearer");
    assert!(tokens.expires_in > 0);
    let verifier = s.verifier();
    assert_eq!(
        verifier.verify(&tokens.access_token).await.unwrap().user_id,
        id
    );
    let refreshed = s.identity.refresh(&tokens.refresh_token).await.unwrap();
    assert_eq!(
        verifier
            .verify(&refreshed.access_token)
            .await
            .unwrap()
            .user_id,
        id
    );
    for (who, password) in [
        (email.as_str(), "wrong-Password-1"),
        ("nobody@example.com", PASSWORD),
    ] {
        assert!(
            matches!(
                s.identity.sign_in(who, password).await,
                Err(Error::Unauthorized(_))
            ),
            "{who}"
        );
    }
    assert!(matches!(
        s.identity.refresh("not-a-refresh-token").await,
        Err(Error::Unauthorized(_))
    ));
}

async fn only_access_tokens_of_this_issuer_and_app_client_pass(s: Subject) {
    let (id, tokens) = s.account().await;
    let verifier = s.verifier();
    assert!(
        refused(verifier.verify(&tokens.id_token).await),
        "an ID token is not an access token"
    );
    let id_claims = verifier
        .verify_claims(&tokens.id_token, "id")
        .await
        .unwrap();
    assert_eq!(id_claims.sub, id);
    assert_eq!(id_claims.aud.as_deref(), Some(s.client_id.as_str()));
    let other_client = s.verifier_for(&s.issuer, "another-client", Duration::from_secs(30));
    assert!(refused(other_client.verify(&tokens.access_token).await));
    let other_issuer = s.verifier_for(
        "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_other",
        &s.client_id,
        Duration::from_secs(30),
    );
    assert!(refused(other_issuer.verify(&tokens.access_token).await));
}

async fn altered_and_malformed_tokens_are_refused(s: Subject) {
    let (_, tokens) = s.account().await;
    let verifier = s.verifier();
    let token = tokens.access_token.as_str();
    let someone_else = altered(token, 1, |c| c["sub"] = "someone-else".into());
    let longer = altered(token, 1, |c| {
        c["exp"] = (c["exp"].as_i64().unwrap() + 86_400).into()
    });
    let unsigned = altered(token, 0, |h| h["alg"] = "none".into());
    let hmac = altered(token, 0, |h| h["alg"] = "HS256".into());
    let mut bad_signature = token.to_owned();
    let last = bad_signature.pop().unwrap();
    bad_signature.push(if last == 'A' { 'B' } else { 'A' });
    let no_signature = format!("{}.", token.rsplit_once('.').unwrap().0);
    for (what, t) in [
        ("another sub", someone_else.as_str()),
        ("a later expiry", longer.as_str()),
        ("alg none", unsigned.as_str()),
        ("alg HS256", hmac.as_str()),
        ("a changed signature", bad_signature.as_str()),
        ("no signature", no_signature.as_str()),
        ("garbage", "a.b.c"),
        ("empty", ""),
    ] {
        assert!(refused(verifier.verify(t).await), "{what}");
    }
    assert!(
        verifier.verify(token).await.is_ok(),
        "the original still passes"
    );
}

async fn unknown_key_ids_refetch_the_keys_at_most_once_per_cooldown(s: Subject) {
    let (id, tokens) = s.account().await;
    let counting = Arc::new(Counting {
        inner: s.source.clone(),
        fetches: AtomicUsize::new(0),
    });
    let verifier = Arc::new(JwksVerifier::new(
        s.issuer.as_str(),
        s.client_id.as_str(),
        Duration::from_secs(30),
        Duration::from_millis(500),
        counting.clone(),
    ));
    assert_eq!(
        verifier.verify(&tokens.access_token).await.unwrap().user_id,
        id
    );
    assert_eq!(
        counting.fetches.load(Ordering::SeqCst),
        1,
        "keys fetched once"
    );
    let rotated = altered(&tokens.access_token, 0, |h| h["kid"] = "rotated-key".into());
    let flood: Vec<_> = (0..20)
        .map(|_| {
            let (v, t) = (verifier.clone(), rotated.clone());
            tokio::spawn(async move { v.verify(&t).await })
        })
        .collect();
    for t in flood {
        assert!(refused(t.await.unwrap()));
    }
    assert_eq!(
        counting.fetches.load(Ordering::SeqCst),
        1,
        "within the cooldown an unknown kid fetches nothing"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(refused(verifier.verify(&rotated).await));
    assert_eq!(
        counting.fetches.load(Ordering::SeqCst),
        2,
        "after the cooldown it refetches once"
    );
    // The refetched set still holds the real key: a fresh token passes without another fetch.
    let refreshed = s.identity.refresh(&tokens.refresh_token).await.unwrap();
    assert!(verifier.verify(&refreshed.access_token).await.is_ok());
    assert_eq!(counting.fetches.load(Ordering::SeqCst), 2);
}

async fn signing_out_everywhere_ends_every_session(s: Subject) {
    let email = format!("{}@example.com", uuid::Uuid::new_v4().simple());
    let id = s.identity.sign_up(&email, PASSWORD).await.unwrap();
    s.identity.confirm(&email, "123456").await.unwrap();
    let phone = s.identity.sign_in(&email, PASSWORD).await.unwrap();
    let laptop = s.identity.sign_in(&email, PASSWORD).await.unwrap();
    // Both sessions work (a refresh hands back the session's current refresh token).
    let phone = s.identity.refresh(&phone.refresh_token).await.unwrap();
    let laptop = s.identity.refresh(&laptop.refresh_token).await.unwrap();
    s.identity
        .sign_out_everywhere(&id, &phone.access_token)
        .await
        .unwrap();
    for token in [phone.refresh_token, laptop.refresh_token] {
        assert!(
            matches!(
                s.identity.refresh(&token).await,
                Err(Error::Unauthorized(_))
            ),
            "a session outlived the sign-out"
        );
    }
}

contract!(
    local_issuer => local,
    cognito_pool => cognito;
    accounts_sign_up_confirm_sign_in_and_refresh,
    only_access_tokens_of_this_issuer_and_app_client_pass,
    altered_and_malformed_tokens_are_refused,
    unknown_key_ids_refetch_the_keys_at_most_once_per_cooldown,
    signing_out_everywhere_ends_every_session,
);
