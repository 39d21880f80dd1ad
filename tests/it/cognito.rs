//! What only Cognito does, on the moto server of `scripts/test`: accounts that must be confirmed,
//! and app clients with a secret; and refresh-token rotation, on a fake of the one call moto
//! lacks (`GetTokensFromRefreshToken`). What both issuers do (accounts, tokens, the verifier) is the
//! contract in `verifier_contract.rs`.

use crate::common;
use shared::auth::cognito::CognitoIdentity;
use shared::auth::IdentityProvider;
use shared::Error;

#[tokio::test]
async fn an_unconfirmed_account_cannot_sign_in_until_confirmed() {
    let pool = common::cognito_pool(false).await;
    let identity = CognitoIdentity::new(pool.idp, &pool.client_id, None);
    identity
        .sign_up("ada@example.com", "Correct-Horse-9!")
        .await
        .unwrap();
    assert!(matches!(
        identity
            .sign_in("ada@example.com", "Correct-Horse-9!")
            .await,
        Err(Error::NotConfirmed(_))
    ));
    identity.confirm("ada@example.com", "123456").await.unwrap();
    let tokens = identity
        .sign_in("ada@example.com", "Correct-Horse-9!")
        .await
        .unwrap();
    assert!(!tokens.access_token.is_empty());
}

#[tokio::test]
async fn the_secret_hash_is_sent_for_app_clients_with_a_secret() {
    let pool = common::cognito_pool(true).await;
    assert!(pool.client_secret.is_some());
    let identity = CognitoIdentity::new(pool.idp, &pool.client_id, pool.client_secret);
    identity
        .sign_up("grace@example.com", "Correct-Horse-9!")
        .await
        .unwrap();
    identity
        .confirm("grace@example.com", "123456")
        .await
        .unwrap();
    let tokens = identity
        .sign_in("grace@example.com", "Correct-Horse-9!")
        .await
        .unwrap();
    assert!(!tokens.access_token.is_empty());
}

/// Cognito's `GetTokensFromRefreshToken` (awsJson1.1 on the wire), faked: moto does not have
/// it. With `rotate`, as the template sets the app client up (grace period 0), each refresh
/// token works once and is replaced by a new one, and a used one is refused the way Cognito
/// refuses it; without, the same refresh token keeps working and none comes back.
struct FakeCognito {
    rotate: bool,
    valid: std::sync::Mutex<std::collections::HashSet<String>>,
    issued: std::sync::atomic::AtomicUsize,
    requests: std::sync::Mutex<Vec<serde_json::Value>>,
}

impl FakeCognito {
    fn answer(&self, request: &wiremock::Request) -> wiremock::ResponseTemplate {
        let json = |status: u16, body: serde_json::Value| {
            wiremock::ResponseTemplate::new(status)
                .insert_header("content-type", "application/x-amz-json-1.1")
                .set_body_string(body.to_string())
        };
        let target = request
            .headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if target != "AWSCognitoIdentityProviderService.GetTokensFromRefreshToken" {
            return json(
                400,
                serde_json::json!({ "__type": "UnknownOperationException", "message": target }),
            );
        }
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        self.requests.lock().unwrap().push(body.clone());
        let token = body["RefreshToken"].as_str().unwrap_or_default().to_owned();
        let mut valid = self.valid.lock().unwrap();
        if !valid.contains(&token) {
            return json(
                400,
                serde_json::json!({ "__type": "NotAuthorizedException", "message": "Invalid Refresh Token" }),
            );
        }
        let n = 1 + self
            .issued
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut result = serde_json::json!({
            "AccessToken": format!("access-{n}"),
            "IdToken": format!("id-{n}"),
            "ExpiresIn": 3600,
            "TokenType": "Bearer",
        });
        if self.rotate {
            valid.remove(&token);
            let next = format!("refresh-{n}");
            valid.insert(next.clone());
            result["RefreshToken"] = next.into();
        }
        json(200, serde_json::json!({ "AuthenticationResult": result }))
    }
}

async fn fake_cognito(rotate: bool) -> (wiremock::MockServer, std::sync::Arc<FakeCognito>) {
    let fake = std::sync::Arc::new(FakeCognito {
        rotate,
        valid: std::sync::Mutex::new(["refresh-0".to_owned()].into()),
        issued: Default::default(),
        requests: Default::default(),
    });
    let server = wiremock::MockServer::start().await;
    let answering = fake.clone();
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(move |request: &wiremock::Request| answering.answer(request))
        .mount(&server)
        .await;
    (server, fake)
}

fn identity_at(server: &wiremock::MockServer, secret: Option<&str>) -> CognitoIdentity {
    let sdk = common::sdk_config_at(&server.uri());
    CognitoIdentity::new(
        aws_sdk_cognitoidentityprovider::Client::new(&sdk),
        "the-app-client",
        secret.map(str::to_owned),
    )
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_used_one_is_refused() {
    let (server, fake) = fake_cognito(true).await;
    // With a client secret: GetTokensFromRefreshToken takes it as is (no SECRET_HASH, which
    // would need the user's `sub`), so confidential app clients can refresh too.
    let identity = identity_at(&server, Some("s3cret"));
    let first = identity.refresh("refresh-0").await.unwrap();
    assert_eq!(
        (first.access_token.as_str(), first.refresh_token.as_str()),
        ("access-1", "refresh-1")
    );
    assert!(matches!(
        identity.refresh("refresh-0").await,
        Err(Error::Unauthorized(_))
    ));
    let second = identity.refresh(&first.refresh_token).await.unwrap();
    assert_eq!(second.refresh_token, "refresh-2");
    let sent = fake.requests.lock().unwrap().clone();
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[0]["ClientId"], "the-app-client");
    assert_eq!(sent[0]["ClientSecret"], "s3cret");
}

#[tokio::test]
async fn without_rotation_the_session_keeps_its_refresh_token() {
    let (server, _fake) = fake_cognito(false).await;
    let identity = identity_at(&server, None);
    for _ in 0..2 {
        let tokens = identity.refresh("refresh-0").await.unwrap();
        assert_eq!(tokens.refresh_token, "refresh-0");
    }
}
