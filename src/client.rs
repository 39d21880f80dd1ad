//! `characterbot batch`: the batch client. Reads prompts (one per line), submits them as
//! batches, shows progress with a bar while the workers run, and writes one JSON line per
//! prompt with its persona or its error.
//!
//! It speaks plain HTTP for now (local use, or behind a TLS-terminating proxy): the project
//! keeps a single TLS stack, which arrives with the AWS SDK.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use backon::{ExponentialBuilder, Retryable};
use indicatif::{ProgressBar, ProgressStyle};
use ingest_api::handlers::batches::BatchAccepted;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use shared::auth::Tokens;
use shared::domain::{Batch, RequestRecord, RequestResult, RequestStatus};

use crate::cli::BatchArgs;

fn read_prompts(file: Option<&PathBuf>) -> anyhow::Result<Vec<String>> {
    let reader: Box<dyn BufRead> = match file {
        Some(p) if p.as_os_str() != "-" => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?,
        )),
        _ => Box::new(std::io::stdin().lock()),
    };
    let mut prompts = Vec::new();
    for line in reader.lines() {
        let line = line?;
        if !line.trim().is_empty() {
            prompts.push(line.trim().to_owned());
        }
    }
    Ok(prompts)
}

/// Most retries of one call: enough to wait out a minute of the server's per-user rate limit.
const MAX_RETRIES: usize = 60;

/// Why one try of a call did not answer.
#[derive(Debug)]
enum Failed {
    /// `429` or a server error: try again, after `retry_after` when the server said.
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
    if status.is_success() {
        Ok(body)
    } else if status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        Err(Failed::Later {
            status,
            body,
            retry_after,
        })
    } else {
        Err(Failed::Refused { status, body })
    }
}

/// Sends the request `make` builds and returns its JSON body. `429`, server errors and network
/// errors are tried again (`backon`, exponential with jitter, a `Retry-After` honoured); any
/// other refusal fails at once with the server's body. Safe to repeat: every call here is a
/// read, or a POST carrying an `Idempotency-Key`.
async fn call(make: impl Fn() -> reqwest::RequestBuilder) -> anyhow::Result<Value> {
    let body = (|| try_once(make()))
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
        .await?;
    Ok(body)
}

/// The API as the batch client uses it: one signed-in user.
struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    /// Uses the token given, or signs in with the email and password given.
    async fn connect(args: &BatchArgs) -> anyhow::Result<Api> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        let base = args.url.trim_end_matches('/').to_owned();
        let token = match (&args.token, &args.email, &args.password) {
            (Some(t), _, _) => t.clone(),
            (None, Some(email), Some(password)) => {
                let tokens: Tokens = typed(
                    call(|| {
                        http.post(format!("{base}/v1/auth/signin"))
                            .json(&json!({ "email": email, "password": password }))
                    })
                    .await
                    .context("signing in")?,
                )?;
                tokens.access_token
            }
            _ => bail!("give --token, or --email and --password"),
        };
        Ok(Api { http, base, token })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        typed(call(|| self.http.get(&url).bearer_auth(&self.token)).await?)
    }

    /// Submits one chunk. Its `Idempotency-Key` is derived from its content and this run, so
    /// a POST retried after a network error cannot queue the same prompts twice.
    async fn submit(&self, run_id: uuid::Uuid, chunk: &[String]) -> anyhow::Result<BatchAccepted> {
        let key = format!(
            "{:x}",
            Sha256::digest(format!("{run_id}:{}", chunk.join("\n")))
        );
        let body = json!({ "prompts": chunk });
        let url = format!("{}/v1/personas/batch", self.base);
        let accepted = call(|| {
            self.http
                .post(&url)
                .bearer_auth(&self.token)
                .header("Idempotency-Key", &key)
                .json(&body)
        })
        .await
        .context("submitting a batch")?;
        typed(accepted)
    }
}

fn typed<T: DeserializeOwned>(body: Value) -> anyhow::Result<T> {
    serde_json::from_value(body).context("the server's answer has an unexpected shape")
}

/// Shows the batches' progress until none is pending. A finished batch is not asked again, so
/// polling stays well inside the per-user rate limit however many batches there are.
async fn follow(api: &Api, batches: &[BatchAccepted], total: usize) -> anyhow::Result<()> {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut latest: Vec<Option<Batch>> = vec![None; batches.len()];
    loop {
        for (accepted, latest) in batches.iter().zip(latest.iter_mut()) {
            if latest.as_ref().is_some_and(|b| b.pending == 0) {
                continue;
            }
            *latest = Some(
                api.get(&format!("/v1/batches/{}", accepted.batch_id))
                    .await?,
            );
        }
        let counts = latest.iter().flatten();
        let failed: u32 = counts.clone().map(|b| b.failed).sum();
        let done: u32 = counts.map(|b| b.succeeded + b.failed).sum();
        bar.set_position(u64::from(done));
        bar.set_message(format!("{failed} failed"));
        if latest.iter().flatten().all(|b| b.pending == 0) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    bar.finish();
    Ok(())
}

/// Writes one JSON line per prompt; returns how many failed.
async fn write_results(
    api: &Api,
    submitted: &[(&[String], BatchAccepted)],
    out: &mut dyn Write,
) -> anyhow::Result<usize> {
    let mut failures = 0;
    for (chunk, accepted) in submitted {
        for (prompt, id) in chunk.iter().zip(&accepted.request_ids) {
            let r: RequestRecord = api.get(&format!("/v1/requests/{id}")).await?;
            if r.status != RequestStatus::Succeeded {
                failures += 1;
            }
            let persona = match &r.result {
                Some(RequestResult::Persona(p)) => serde_json::to_value(p)?,
                _ => Value::Null,
            };
            let line = json!({
                "prompt": prompt,
                "request_id": id,
                "status": r.status,
                "persona": persona,
                "error": r.error,
            });
            writeln!(out, "{line}")?;
        }
    }
    out.flush()?;
    Ok(failures)
}

pub async fn run(args: BatchArgs) -> anyhow::Result<()> {
    let prompts = read_prompts(args.file.as_ref())?;
    if prompts.is_empty() {
        bail!("no prompts given");
    }
    let api = Api::connect(&args).await?;
    let run_id = uuid::Uuid::new_v4();
    let mut submitted = Vec::new();
    for chunk in prompts.chunks(args.chunk.max(1)) {
        submitted.push((chunk, api.submit(run_id, chunk).await?));
    }
    let batches: Vec<BatchAccepted> = submitted.iter().map(|(_, b)| b.clone()).collect();
    follow(&api, &batches, prompts.len()).await?;

    let mut out: Box<dyn Write> = match &args.out {
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => Box::new(std::io::stdout().lock()),
    };
    let failures = write_results(&api, &submitted, &mut out).await?;
    eprintln!(
        "{} prompts: {} succeeded, {failures} failed",
        prompts.len(),
        prompts.len() - failures
    );
    if failures > 0 {
        bail!("{failures} prompts failed");
    }
    Ok(())
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
