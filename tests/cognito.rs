//! What only Cognito does, on the moto server of `scripts/test`: accounts that must be confirmed,
//! and app clients with a secret. What both issuers do (accounts, tokens, the verifier) is the
//! contract in `verifier_contract.rs`.

mod common;

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
