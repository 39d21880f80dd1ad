//! Amazon Cognito: the identity provider on AWS (`SignUp`, `ConfirmSignUp`, `InitiateAuth`
//! with `USER_PASSWORD_AUTH`, `GetTokensFromRefreshToken`, `RevokeToken`, `GlobalSignOut`), and
//! [`HttpJwks`], the key source that lets the one [`JwksVerifier`](super::JwksVerifier) check
//! the pool's tokens.
//!
//! Refresh tokens rotate: the template turns rotation on for the app client, so each refresh
//! hands back a new refresh token and Cognito invalidates the old one (after a grace period for
//! client retries), and reusing it then fails. Rotation can only be completed with
//! `GetTokensFromRefreshToken`; [`RefreshCall::InitiateAuth`] is for app clients without
//! rotation on emulators that lack the newer call (moto).
//!
//! Cognito's errors become ours: `UsernameExistsException` → conflict,
//! `UserNotConfirmedException` → not confirmed (403), `NotAuthorizedException` and
//! `UserNotFoundException` → unauthorized (the same message, so sign-in does not reveal who has
//! an account), `PasswordResetRequiredException` → password reset required (403, with what to
//! do instead), bad passwords, parameters and codes → invalid.

use async_trait::async_trait;
use aws_sdk_cognitoidentityprovider::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_cognitoidentityprovider::types::{
    AttributeType, AuthFlowType, AuthenticationResultType,
};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use jsonwebtoken::jwk::JwkSet;
use sha2::Sha256;

use super::local::validate_email;
use super::{IdentityProvider, JwksSource, Tokens};
use crate::{Error, Result};

/// The issuer of a user pool's tokens.
pub fn issuer(region: &str, user_pool_id: &str) -> String {
    format!("https://cognito-idp.{region}.amazonaws.com/{user_pool_id}")
}

/// Fetches a JSON Web Key Set over HTTP (a Cognito pool's `{issuer}/.well-known/jwks.json`).
pub struct HttpJwks {
    url: String,
    http: reqwest::Client,
}

impl HttpJwks {
    pub fn new(url: impl Into<String>) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| Error::config("http client", e))?;
        Ok(HttpJwks {
            url: url.into(),
            http,
        })
    }
}

#[async_trait]
impl JwksSource for HttpJwks {
    async fn fetch(&self) -> Result<JwkSet> {
        let unavailable =
            |e: reqwest::Error| Error::storage(format!("fetching the JWKS at {}", self.url), e);
        self.http
            .get(&self.url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(unavailable)?
            .json::<JwkSet>()
            .await
            .map_err(unavailable)
    }
}

pub struct CognitoIdentity {
    client: aws_sdk_cognitoidentityprovider::Client,
    client_id: String,
    client_secret: Option<String>,
    refresh_call: RefreshCall,
}

/// Which Cognito call renews a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RefreshCall {
    /// `GetTokensFromRefreshToken`: works with rotation on or off, and is the only call that
    /// completes a rotation.
    #[default]
    GetTokensFromRefreshToken,
    /// `InitiateAuth` with `REFRESH_TOKEN_AUTH`: refused by app clients with rotation on; for
    /// emulators without the newer call.
    InitiateAuth,
}

fn map_error<E, R>(e: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let Some(service) = e.as_service_error() else {
        return Error::storage("cognito unavailable", e);
    };
    let message = service.message().unwrap_or("no message").to_owned();
    // Owned, so that `e` can become the source of a server-side failure below.
    let code = service.code().unwrap_or_default().to_owned();
    match code.as_str() {
        "UsernameExistsException" | "AliasExistsException" => {
            Error::Conflict("an account with this email already exists".into())
        }
        "UserNotConfirmedException" => {
            Error::NotConfirmed("confirm the account with the code sent by email first".into())
        }
        "NotAuthorizedException" | "UserNotFoundException" => {
            Error::Unauthorized("incorrect email, password or token".into())
        }
        // An administrator reset the password (or Cognito did, after a leak): the old one no
        // longer signs in, whether or not it is right. The client's to fix, not ours: a 403
        // that says how, where it used to fall through to a 500.
        "PasswordResetRequiredException" => Error::PasswordResetRequired(
            "a password reset is required: set a new password with the code Cognito sends \
             (ForgotPassword), then sign in"
                .into(),
        ),
        "InvalidPasswordException" | "InvalidParameterException" => Error::Invalid(message),
        "CodeMismatchException" | "ExpiredCodeException" => {
            Error::Invalid("the confirmation code is wrong or has expired".into())
        }
        "TooManyRequestsException"
        | "LimitExceededException"
        | "TooManyFailedAttemptsException" => Error::storage("cognito is throttling", e),
        code => Error::internal(format!("cognito {code}"), e),
    }
}

fn tokens(
    result: Option<&AuthenticationResultType>,
    refresh_fallback: Option<&str>,
) -> Result<Tokens> {
    let r = result
        .ok_or_else(|| Error::Unauthorized("cognito asked for a further challenge".into()))?;
    let need = |v: Option<&str>, what: &str| {
        v.map(str::to_owned)
            .ok_or_else(|| Error::internal_msg(format!("cognito returned no {what}")))
    };
    Ok(Tokens {
        access_token: need(r.access_token(), "access token")?,
        id_token: need(r.id_token(), "ID token")?,
        // Without refresh-token rotation, a refresh returns no new refresh token.
        refresh_token: need(r.refresh_token().or(refresh_fallback), "refresh token")?,
        expires_in: r.expires_in().max(0) as u64,
        token_type: "Bearer".into(),
    })
}

impl CognitoIdentity {
    pub fn new(
        client: aws_sdk_cognitoidentityprovider::Client,
        client_id: impl Into<String>,
        client_secret: Option<String>,
    ) -> Self {
        CognitoIdentity {
            client,
            client_id: client_id.into(),
            client_secret,
            refresh_call: RefreshCall::default(),
        }
    }

    /// Renews sessions with `call` instead of the default.
    pub fn with_refresh_call(mut self, call: RefreshCall) -> Self {
        self.refresh_call = call;
        self
    }

    /// `SECRET_HASH`: Base64(HMAC-SHA256(client secret, username + client id)), required by
    /// app clients that have a secret.
    fn secret_hash(&self, username: &str) -> Result<Option<String>> {
        let Some(secret) = &self.client_secret else {
            return Ok(None);
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
            .map_err(|e| Error::config("client secret as an HMAC key", e))?;
        mac.update(username.as_bytes());
        mac.update(self.client_id.as_bytes());
        Ok(Some(STANDARD.encode(mac.finalize().into_bytes())))
    }
}

#[async_trait]
impl IdentityProvider for CognitoIdentity {
    async fn sign_up(&self, email: &str, password: &str) -> Result<String> {
        validate_email(email)?;
        let email_attr = AttributeType::builder()
            .name("email")
            .value(email)
            .build()
            .map_err(|e| Error::internal("building a Cognito attribute", e))?;
        let out = self
            .client
            .sign_up()
            .client_id(&self.client_id)
            .username(email)
            .password(password)
            .user_attributes(email_attr)
            .set_secret_hash(self.secret_hash(email)?)
            .send()
            .await
            .map_err(map_error)?;
        Ok(out.user_sub().to_owned())
    }

    async fn confirm(&self, email: &str, code: &str) -> Result<()> {
        self.client
            .confirm_sign_up()
            .client_id(&self.client_id)
            .username(email)
            .confirmation_code(code)
            .set_secret_hash(self.secret_hash(email)?)
            .send()
            .await
            .map_err(map_error)?;
        Ok(())
    }

    async fn sign_in(&self, email: &str, password: &str) -> Result<Tokens> {
        let mut req = self
            .client
            .initiate_auth()
            .client_id(&self.client_id)
            .auth_flow(AuthFlowType::UserPasswordAuth)
            .auth_parameters("USERNAME", email)
            .auth_parameters("PASSWORD", password);
        if let Some(hash) = self.secret_hash(email)? {
            req = req.auth_parameters("SECRET_HASH", hash);
        }
        let out = req.send().await.map_err(map_error)?;
        tokens(out.authentication_result(), None)
    }

    async fn refresh(&self, refresh_token: &str) -> Result<Tokens> {
        if self.refresh_call == RefreshCall::InitiateAuth {
            // App clients with a secret would need SECRET_HASH of the user's `sub` here, which
            // a refresh token does not reveal: this call is for public app clients only.
            let out = self
                .client
                .initiate_auth()
                .client_id(&self.client_id)
                .auth_flow(AuthFlowType::RefreshTokenAuth)
                .auth_parameters("REFRESH_TOKEN", refresh_token)
                .send()
                .await
                .map_err(map_error)?;
            return tokens(out.authentication_result(), Some(refresh_token));
        }
        let out = self
            .client
            .get_tokens_from_refresh_token()
            .client_id(&self.client_id)
            .refresh_token(refresh_token)
            .set_client_secret(self.client_secret.clone())
            .send()
            .await
            .map_err(map_error)?;
        // With rotation on, the answer carries the new refresh token; with it off, none, and
        // the session's token stays the one it was.
        tokens(out.authentication_result(), Some(refresh_token))
    }

    async fn sign_out(&self, refresh_token: &str) -> Result<()> {
        // Revokes the refresh token and the access tokens issued from it (the app client must
        // have token revocation on, Cognito's default for new clients).
        let mut req = self
            .client
            .revoke_token()
            .client_id(&self.client_id)
            .token(refresh_token);
        if let Some(secret) = &self.client_secret {
            req = req.client_secret(secret);
        }
        req.send().await.map_err(map_error)?;
        Ok(())
    }

    async fn sign_out_everywhere(&self, _user_id: &str, access_token: &str) -> Result<()> {
        self.client
            .global_sign_out()
            .access_token(access_token)
            .send()
            .await
            .map_err(map_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_cognitoidentityprovider::error::ErrorMetadata;
    use aws_sdk_cognitoidentityprovider::operation::initiate_auth::InitiateAuthError;

    /// What `map_error` makes of a Cognito error with this code, as a sign-in gets it.
    fn from_cognito(code: &str) -> Error {
        let meta = ErrorMetadata::builder()
            .code(code)
            .message("from cognito")
            .build();
        map_error(SdkError::service_error(
            InitiateAuthError::generic(meta),
            (),
        ))
    }

    #[test]
    fn a_required_password_reset_is_the_clients_to_fix_not_a_server_error() {
        let e = from_cognito("PasswordResetRequiredException");
        assert!(
            matches!(&e, Error::PasswordResetRequired(m) if m.contains("password reset")),
            "{e:?}"
        );
        assert_eq!(e.code(), "password_reset_required");
        assert!(!e.is_transient());
    }

    #[test]
    fn sign_in_errors_keep_their_meaning() {
        assert!(matches!(
            from_cognito("NotAuthorizedException"),
            Error::Unauthorized(_)
        ));
        assert!(matches!(
            from_cognito("UserNotConfirmedException"),
            Error::NotConfirmed(_)
        ));
        assert!(matches!(
            from_cognito("TooManyRequestsException"),
            Error::Storage { .. }
        ));
        // Cognito's own error stays the source of a server-side failure: its message is in
        // the chain that gets logged.
        for code in ["TooManyRequestsException", "SomethingNewException"] {
            let e = from_cognito(code);
            assert!(std::error::Error::source(&e).is_some(), "{code}");
            assert!(crate::error::Report(&e)
                .to_string()
                .contains("from cognito"));
        }
        // What the mapping does not know stays a server error, with Cognito's code for the log.
        assert!(
            matches!(from_cognito("SomethingNewException"), Error::Internal { context, .. } if context.contains("SomethingNewException"))
        );
    }
}
