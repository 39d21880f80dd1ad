//! Cognito on the moto server of `scripts/test`, through the real AWS SDK: sign-up, confirm,
//! sign-in, refresh, Cognito's errors mapped to ours, and the pool's tokens checked by the same
//! JWKS verifier that checks the embedded issuer's, with keys fetched over HTTP.

mod common;

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_cognitoidentityprovider::types::ExplicitAuthFlowsType;
use shared::auth::cognito::{issuer, CognitoIdentity, HttpJwks};
use shared::auth::{IdentityProvider, JwksVerifier, TokenVerifier};
use shared::Error;

#[tokio::test]
async fn cognito_accounts_and_pool_tokens_work_end_to_end() {
    let sdk = common::aws_test_sdk_config();
    let endpoint = std::env::var("CHARACTERBOT_TEST_AWS_ENDPOINT").unwrap();
    let idp = aws_sdk_cognitoidentityprovider::Client::new(&sdk);
    let pool = idp
        .create_user_pool()
        .pool_name(format!("pool-{}", uuid::Uuid::new_v4().simple()))
        .send()
        .await
        .unwrap();
    let pool_id = pool.user_pool().and_then(|p| p.id()).unwrap().to_owned();
    let app = idp
        .create_user_pool_client()
        .user_pool_id(&pool_id)
        .client_name("mobile")
        .explicit_auth_flows(ExplicitAuthFlowsType::AllowUserPasswordAuth)
        .explicit_auth_flows(ExplicitAuthFlowsType::AllowRefreshTokenAuth)
        .send()
        .await
        .unwrap();
    let client_id = app
        .user_pool_client()
        .and_then(|c| c.client_id())
        .unwrap()
        .to_owned();
    let identity = CognitoIdentity::new(idp.clone(), &client_id, None);

    let sub = identity
        .sign_up("ada@example.com", "Correct-Horse-9!")
        .await
        .unwrap();
    assert!(matches!(
        identity
            .sign_up("ada@example.com", "Correct-Horse-9!")
            .await,
        Err(Error::Conflict(_))
    ));
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
    assert_eq!(tokens.token_type, "Bearer");
    assert!(matches!(
        identity
            .sign_in("ada@example.com", "wrong-Password-1")
            .await,
        Err(Error::Unauthorized(_))
    ));
    assert!(matches!(
        identity
            .sign_in("nobody@example.com", "Correct-Horse-9!")
            .await,
        Err(Error::Unauthorized(_))
    ));

    // The pool's keys, fetched over HTTP from `{issuer path}/.well-known/jwks.json`.
    let verifier = JwksVerifier::new(
        issuer("us-east-1", &pool_id),
        &client_id,
        Duration::from_secs(30),
        Duration::from_secs(30),
        Arc::new(HttpJwks::new(format!("{endpoint}/{pool_id}/.well-known/jwks.json")).unwrap()),
    );
    assert_eq!(
        verifier.verify(&tokens.access_token).await.unwrap().user_id,
        sub
    );
    assert!(
        verifier.verify(&tokens.id_token).await.is_err(),
        "an ID token is not an access token"
    );
    let id_claims = verifier
        .verify_claims(&tokens.id_token, "id")
        .await
        .unwrap();
    assert_eq!(id_claims.aud.as_deref(), Some(client_id.as_str()));

    // Another app client's tokens are refused.
    let other = JwksVerifier::new(
        issuer("us-east-1", &pool_id),
        "another-client",
        Duration::from_secs(30),
        Duration::from_secs(30),
        Arc::new(HttpJwks::new(format!("{endpoint}/{pool_id}/.well-known/jwks.json")).unwrap()),
    );
    assert!(matches!(
        other.verify(&tokens.access_token).await,
        Err(Error::Unauthorized(_))
    ));

    let refreshed = identity.refresh(&tokens.refresh_token).await.unwrap();
    assert_eq!(
        verifier
            .verify(&refreshed.access_token)
            .await
            .unwrap()
            .user_id,
        sub
    );
    assert!(matches!(
        identity.refresh("not-a-refresh-token").await,
        Err(Error::Unauthorized(_))
    ));
}

#[tokio::test]
async fn the_secret_hash_is_sent_for_app_clients_with_a_secret() {
    let sdk = common::aws_test_sdk_config();
    let idp = aws_sdk_cognitoidentityprovider::Client::new(&sdk);
    let pool = idp
        .create_user_pool()
        .pool_name(format!("pool-{}", uuid::Uuid::new_v4().simple()))
        .send()
        .await
        .unwrap();
    let pool_id = pool.user_pool().and_then(|p| p.id()).unwrap().to_owned();
    let app = idp
        .create_user_pool_client()
        .user_pool_id(&pool_id)
        .client_name("server")
        .generate_secret(true)
        .explicit_auth_flows(ExplicitAuthFlowsType::AllowUserPasswordAuth)
        .send()
        .await
        .unwrap();
    let c = app.user_pool_client().unwrap();
    let identity = CognitoIdentity::new(
        idp.clone(),
        c.client_id().unwrap(),
        c.client_secret().map(str::to_owned),
    );
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
