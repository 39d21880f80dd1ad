//! What only Cognito does, on the moto server of `scripts/test`: accounts that must be confirmed,
//! and app clients with a secret. What both issuers do (accounts, tokens, the verifier) is the
//! contract in `verifier_contract.rs`.

mod common;

use aws_sdk_cognitoidentityprovider::types::ExplicitAuthFlowsType;
use shared::auth::cognito::CognitoIdentity;
use shared::auth::IdentityProvider;
use shared::Error;

#[tokio::test]
async fn an_unconfirmed_account_cannot_sign_in_until_confirmed() {
    let idp = aws_sdk_cognitoidentityprovider::Client::new(&common::aws_test_sdk_config());
    let pool_id = idp
        .create_user_pool()
        .pool_name(format!("pool-{}", uuid::Uuid::new_v4().simple()))
        .send()
        .await
        .unwrap()
        .user_pool
        .and_then(|p| p.id)
        .unwrap();
    let client_id = idp
        .create_user_pool_client()
        .user_pool_id(&pool_id)
        .client_name("mobile")
        .explicit_auth_flows(ExplicitAuthFlowsType::AllowUserPasswordAuth)
        .send()
        .await
        .unwrap()
        .user_pool_client
        .and_then(|c| c.client_id)
        .unwrap();
    let identity = CognitoIdentity::new(idp, &client_id, None);
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
