//! The API as the terminal clients call it: each call tried again on `429`, `503`, other server
//! errors and network errors (`backon`, exponential with jitter, a `Retry-After` honoured), any
//! other refusal given back with the server's error.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use backon::{ExponentialBuilder, Retryable};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use shared::auth::Tokens;

/// Most retries of one call: enough to wait out a minute of the server's per-user rate limit.
const MAX_RETRIES: usize = 60;

/// Why a call did not answer.
#[derive(Debug)]
pub enum Failed {
    /// `429`, a server error or a key still in use, still so after every retry.
    Later {
        status: reqwest::StatusCode,
        body: Value,
        retry_after: Option<Duration>,
    },
    /// Any other refusal: trying again will not help.
    Refused {
        status: reqwest::StatusCode,
        body: Value,
    },
    Network(reqwest::Error),
}

impl Failed {
    /// The `error.message` of a refusal, if the server gave one.
    pub fn message(&self) -> Option<&str> {
        match self {
            Failed::Refused { body, .. } | Failed::Later { body, .. } => {
                body["error"]["message"].as_str()
            }
            Failed::Network(_) => None,
        }
    }

    /// The `error` object of a refusal (`{code, message}`), or one describing the failure.
    pub fn error_body(&self) -> Value {
        match self {
            Failed::Refused { body, .. } | Failed::Later { body, .. }
                if body["error"].is_object() =>
            {
                body["error"].clone()
            }
            other => json!({ "code": "client_error", "message": other.to_string() }),
        }
    }
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failed::Later { status, body, .. } | Failed::Refused { status, body } => {
                write!(f, "server answered {status}: {body}")
            }
            Failed::Network(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Failed {}

/// One try: the JSON body of a success, or why not.
async fn try_once(request: reqwest::RequestBuilder) -> Result<Value, Failed> {
    let res = request.send().await.map_err(Failed::Network)?;
    let status = res.status();
    let retry_after = res
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body: Value = res.json().await.unwrap_or(Value::Null);
    // The same call, tried before and still being handled (a reply lost to a timeout): its
    // answer comes once it is done.
    let in_flight = status == reqwest::StatusCode::CONFLICT
        && body["error"]["code"] == "idempotency_key_in_use";
    if status.is_success() {
        Ok(body)
    } else if status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
        || in_flight
    {
        Err(Failed::Later {
            status,
            body,
            retry_after,
        })
    } else {
        Err(Failed::Refused { status, body })
    }
}

/// Sends the request `make` builds and returns its JSON body, trying again as the module says.
/// Safe to repeat: every call here is a read, or a POST carrying an `Idempotency-Key`.
pub async fn call(make: impl Fn() -> reqwest::RequestBuilder) -> Result<Value, Failed> {
    (|| try_once(make()))
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(250))
                .with_max_delay(Duration::from_secs(2))
                .with_jitter()
                .with_max_times(MAX_RETRIES),
        )
        .when(|e| !matches!(e, Failed::Refused { .. }))
        // `None` once the tries are used up: stop, whatever the server asked.
        .adjust(|e, delay| match (e, delay) {
            (_, None) => None,
            (
                Failed::Later {
                    retry_after: Some(after),
                    ..
                },
                Some(_),
            ) => Some(*after),
            (_, delay) => delay,
        })
        .await
}

pub fn typed<T: DeserializeOwned>(body: Value) -> anyhow::Result<T> {
    serde_json::from_value(body).context("the server's answer has an unexpected shape")
}

/// One signed-in user's connection to the API. On a session kept by `login`, an access token
/// that expires during a long run (a chat left open, a big batch) is renewed from the session
/// and the call made again.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    token: Arc<RwLock<String>>,
    /// The session file the token came from, if any.
    session: Option<PathBuf>,
}

impl Api {
    /// A connection that sends `token`.
    pub fn with_token(url: &str, token: &str) -> anyhow::Result<Api> {
        Ok(Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?,
            base: url.trim_end_matches('/').to_owned(),
            token: Arc::new(RwLock::new(token.to_owned())),
            session: None,
        })
    }

    /// This connection, renewing its token from `session` when it expires.
    pub fn renewed_from(mut self, session: PathBuf) -> Api {
        self.session = Some(session);
        self
    }

    /// The access token to send now.
    pub fn token(&self) -> String {
        self.token.read().map(|t| t.clone()).unwrap_or_default()
    }

    /// Renews the token after a `401`; false when there is no session to renew it from.
    async fn renew(&self, failed: &Failed) -> anyhow::Result<bool> {
        let (Some(file), Failed::Refused { status, .. }) = (&self.session, failed) else {
            return Ok(false);
        };
        if *status != reqwest::StatusCode::UNAUTHORIZED {
            return Ok(false);
        }
        let fresh = super::session::renew(file, &self.token()).await?;
        if let Ok(mut token) = self.token.write() {
            *token = fresh;
        }
        Ok(true)
    }

    /// Uses the token given, or signs in with the email and password given.
    pub async fn connect(
        url: &str,
        token: Option<&str>,
        email: Option<&str>,
        password: Option<&str>,
    ) -> anyhow::Result<Api> {
        let api = Api::with_token(url, token.unwrap_or_default())?;
        let token = match (token, email, password) {
            (Some(_), _, _) => return Ok(api),
            (None, Some(email), Some(password)) => {
                let tokens: Tokens = typed(
                    call(|| {
                        api.http
                            .post(api.url("/v1/auth/signin"))
                            .json(&json!({ "email": email, "password": password }))
                    })
                    .await
                    .context("signing in")?,
                )?;
                tokens.access_token
            }
            _ => anyhow::bail!("give --token, or --email and --password"),
        };
        Api::with_token(url, &token)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let url = self.url(path);
        let once = || call(|| self.http.get(&url).bearer_auth(self.token()));
        match once().await {
            Err(e) if self.renew(&e).await? => typed(once().await?),
            answer => typed(answer?),
        }
    }

    /// A POST made safe to repeat by its `Idempotency-Key`.
    pub async fn post(&self, path: &str, key: &str, body: &Value) -> Result<Value, Failed> {
        let url = self.url(path);
        let once = || {
            call(|| {
                self.http
                    .post(&url)
                    .bearer_auth(self.token())
                    .header("Idempotency-Key", key)
                    .json(body)
            })
        };
        match once().await {
            Err(e) if self.renew(&e).await.unwrap_or(false) => once().await,
            answer => answer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A server that answers `429` (with `Retry-After`) `refusals` times, then `200`.
    async fn limited(refusals: usize) -> (wiremock::MockServer, Arc<AtomicUsize>) {
        let server = wiremock::MockServer::start().await;
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        wiremock::Mock::given(wiremock::matchers::path("/v1/thing"))
            .respond_with(move |_: &wiremock::Request| {
                if counted.fetch_add(1, Ordering::SeqCst) < refusals {
                    wiremock::ResponseTemplate::new(429)
                        .insert_header("retry-after", "1")
                        .set_body_json(json!({ "error": { "code": "rate_limited" } }))
                } else {
                    wiremock::ResponseTemplate::new(200).set_body_json(json!({ "ok": true }))
                }
            })
            .mount(&server)
            .await;
        (server, calls)
    }

    #[tokio::test]
    async fn a_rate_limited_call_waits_as_told_and_then_succeeds() {
        let (server, calls) = limited(2).await;
        let http = reqwest::Client::new();
        let started = std::time::Instant::now();
        let body = call(|| http.get(format!("{}/v1/thing", server.uri())))
            .await
            .unwrap();
        assert_eq!(body, json!({ "ok": true }));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "Retry-After honoured"
        );
    }

    #[tokio::test]
    async fn a_refusal_fails_at_once_with_the_servers_answer() {
        let http = reqwest::Client::new();
        let server = wiremock::MockServer::start().await;
        let e = call(|| http.get(format!("{}/v1/nothing", server.uri())))
            .await
            .unwrap_err();
        assert!(e.to_string().starts_with("server answered 404"), "{e}");
        assert_eq!(server.received_requests().await.unwrap().len(), 1);
    }
}
