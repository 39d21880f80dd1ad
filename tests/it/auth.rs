//! Authentication refusals: every forged, expired or misdirected token is a 401 and changes
//! nothing. Tokens are forged here with the server's own key where that makes the attack real.

use crate::common::TestApp;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};
use shared::domain::RequestKind;

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

fn sign(key_pem: &[u8], kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_rsa_pem(key_pem).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn forged_expired_and_misdirected_tokens_are_refused_and_change_nothing() {
    let app = TestApp::builder().without_workers().start().await;
    let alice = app.user("alice").await;
    let key_pem = std::fs::read(app.dir.path().join("keys/jwt-signing.pem")).unwrap();
    let (_, jwks) = app.get(None, "/.well-known/jwks.json").await;
    let kid = jwks["keys"][0]["kid"].as_str().unwrap().to_owned();
    let now = shared::time::now_secs();
    let good = json!({
        "sub": alice.user_id, "iss": "characterbot-local", "token_use": "access",
        "client_id": "characterbot-app", "iat": now, "exp": now + 600,
    });
    let with = |patch: Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    // Sanity: a token forged from the good claims with the real key is accepted, so each
    // refusal below is caused by the one thing it changes.
    let (status, _) = app
        .get(Some(&sign(&key_pem, &kid, &good)), "/v1/personas")
        .await;
    assert_eq!(status, StatusCode::OK);

    let other_key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    let other_pem =
        rsa::pkcs8::EncodePrivateKey::to_pkcs8_pem(&other_key, rsa::pkcs8::LineEnding::LF).unwrap();
    let valid = alice.token.clone();
    let parts: Vec<&str> = valid.split('.').collect();
    let mut tampered_claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    tampered_claims["sub"] = json!("someone-else");
    let public_pem = {
        use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
        let private =
            rsa::RsaPrivateKey::from_pkcs8_pem(std::str::from_utf8(&key_pem).unwrap()).unwrap();
        private
            .to_public_key()
            .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
            .unwrap()
    };
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some(kid.clone());

    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        ("malformed", Some("not-a-jwt".into())),
        (
            "expired",
            Some(sign(
                &key_pem,
                &kid,
                &with(json!({ "iat": now - 7200, "exp": now - 3600 })),
            )),
        ),
        (
            "wrong issuer",
            Some(sign(
                &key_pem,
                &kid,
                &with(json!({ "iss": "https://evil.example" })),
            )),
        ),
        (
            "wrong token_use (ID token)",
            Some(alice.tokens["id_token"].as_str().unwrap().to_owned()),
        ),
        (
            "other app client",
            Some(sign(
                &key_pem,
                &kid,
                &with(json!({ "client_id": "other-app" })),
            )),
        ),
        (
            "no exp",
            Some(sign(&key_pem, &kid, &{
                let mut c = good.clone();
                c.as_object_mut().unwrap().remove("exp");
                c
            })),
        ),
        (
            "alg none",
            Some(format!(
                "{}.{}.",
                b64(&json!({ "alg": "none", "kid": kid })),
                b64(&good)
            )),
        ),
        (
            "HS256 keyed with the public key",
            Some(
                jsonwebtoken::encode(
                    &hs_header,
                    &good,
                    &EncodingKey::from_secret(public_pem.as_bytes()),
                )
                .unwrap(),
            ),
        ),
        (
            "unknown kid, other key",
            Some(sign(other_pem.as_bytes(), "not-our-kid", &good)),
        ),
        (
            "our kid, other key",
            Some(sign(other_pem.as_bytes(), &kid, &good)),
        ),
        (
            "tampered payload",
            Some(format!(
                "{}.{}.{}",
                parts[0],
                b64(&tampered_claims),
                parts[2]
            )),
        ),
    ];
    for (what, token) in cases {
        let mut req = app
            .http
            .post(app.url("/v1/personas"))
            .json(&json!({ "prompt": "Yoda" }));
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        let (status, body) = app.send(req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized", "{what}");
        assert!(
            !body["error"]["message"].as_str().unwrap().is_empty(),
            "{what}"
        );
    }
    // Nothing was queued or stored for anyone.
    assert_eq!(app.queue_total(RequestKind::Persona).await, 0);
    let (_, list) = app.get(Some(&alice.token), "/v1/personas").await;
    assert_eq!(list["items"], json!([]));
    // The browser form of the token works only on the event stream.
    let (status, _) = app
        .get(None, &format!("/v1/personas?access_token={}", alice.token))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn sign_up_and_sign_in_refuse_bad_credentials() {
    let app = TestApp::builder().without_workers().start().await;
    app.user("carol").await;
    let (status, body) = app
        .post(
            None,
            "/v1/auth/signup",
            json!({ "email": "carol@example.com", "password": "another password" }),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("email_taken"))
    );
    let (status, body) = app
        .post(
            None,
            "/v1/auth/signin",
            json!({ "email": "carol@example.com", "password": "wrong password" }),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    let (status, _) = app
        .post(
            None,
            "/v1/auth/signin",
            json!({ "email": "nobody@example.com", "password": "wrong password" }),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    for (email, password) in [
        ("not-an-email", "long enough pw"),
        ("dave@example.com", "short"),
    ] {
        let (status, body) = app
            .post(
                None,
                "/v1/auth/signup",
                json!({ "email": email, "password": password }),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{email}: {body}");
        assert_eq!(body["error"]["code"], "invalid_credentials_format");
    }
}
