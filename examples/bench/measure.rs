//! The measurements of the benchmark, each one thing a client does, timed from the outside:
//! apart from the set-up and the report in `main.rs`, so each can be read on its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shared::auth::local::KeyDirJwks;
use shared::auth::JwksVerifier;

use crate::{Args, Bench};

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

pub(crate) fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// `total` chat round trips (post → long poll → reply) spread over `clients` conversations run
/// concurrently; returns the sorted latencies and the wall time.
pub(crate) async fn chat_round_trips(
    http: &reqwest::Client,
    base: &str,
    token: &Arc<String>,
    persona_id: &Value,
    clients: usize,
    total: usize,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let per_client = total.div_ceil(clients);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, base, token, persona_id) = (
            http.clone(),
            base.to_owned(),
            token.clone(),
            persona_id.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let conv: Value = http
                .post(format!("{base}/v1/conversations"))
                .bearer_auth(token.as_str())
                .json(&json!({ "persona_id": persona_id }))
                .send()
                .await?
                .json()
                .await?;
            let conv_id = conv["conversation_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let mut lat = Vec::new();
            for i in 0..per_client {
                let t = Instant::now();
                let acc: Value = http
                    .post(format!("{base}/v1/conversations/{conv_id}/messages"))
                    .bearer_auth(token.as_str())
                    .json(&json!({ "text": format!("Question number {i}?") }))
                    .send()
                    .await?
                    .json()
                    .await?;
                let r: Value = http
                    .get(format!(
                        "{base}/v1/requests/{}?wait=20",
                        acc["request_id"].as_str().unwrap_or_default()
                    ))
                    .bearer_auth(token.as_str())
                    .send()
                    .await?
                    .json()
                    .await?;
                anyhow::ensure!(r["status"] == "succeeded", "chat failed: {r}");
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let wall = start.elapsed();
    all.sort();
    Ok((all, wall))
}

/// `args.requests` persona requests from `args.clients` clients; the sorted latencies and the
/// wall time.
pub(crate) async fn ingest(b: &Bench, args: &Args) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let started = Instant::now();
    let per_client = args.requests.div_ceil(args.clients);
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        let (http, base, token) = (b.http.clone(), b.base.clone(), b.token.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let t = Instant::now();
                let res = http
                    .post(format!("{base}/v1/personas"))
                    .bearer_auth(token.as_str())
                    .json(&json!({ "prompt": format!("a cheerful pirate number {i}") }))
                    .send()
                    .await?;
                anyhow::ensure!(res.status() == 202, "unexpected status {}", res.status());
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut ingest = Vec::new();
    for t in tasks {
        ingest.extend(t.await??);
    }
    let wall = started.elapsed();
    ingest.sort();
    Ok((ingest, wall))
}

/// Queues batches until `target` persona jobs wait; how many do.
pub(crate) async fn top_up(b: &Bench, mut backlog: usize, target: usize) -> anyhow::Result<usize> {
    while backlog < target {
        let n = (target - backlog).min(b.settings.api.max_batch);
        let prompts: Vec<String> = (0..n).map(|i| format!("a quiet librarian {i}")).collect();
        let res = b
            .http
            .post(format!("{}/v1/personas/batch", b.base))
            .bearer_auth(b.token.as_str())
            .json(&json!({ "prompts": prompts }))
            .send()
            .await?;
        anyhow::ensure!(res.status() == 202, "batch: {}", res.status());
        backlog += n;
    }
    Ok(backlog)
}

/// A persona to chat with (the persona worker running): its id.
pub(crate) async fn one_persona(b: &Bench) -> anyhow::Result<Value> {
    let (http, base, token) = (&b.http, &b.base, b.token.as_str());
    let accepted: Value = http
        .post(format!("{base}/v1/personas"))
        .bearer_auth(token)
        .json(&json!({ "prompt": "Sherlock Holmes" }))
        .send()
        .await?
        .json()
        .await?;
    let done: Value = http
        .get(format!(
            "{base}/v1/requests/{}?wait=20",
            accepted["request_id"].as_str().unwrap_or_default()
        ))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?;
    Ok(done["result"]["persona"]["persona_id"].clone())
}

/// The mean cost of the RS256 check of the bench's token, and of a look-up in the API's cache
/// of verified tokens.
pub(crate) async fn verify_costs(b: &Bench) -> anyhow::Result<(Duration, Duration)> {
    let rounds = 500;
    let raw = JwksVerifier::new(
        b.settings.auth.issuer.clone(),
        b.settings.auth.client_id.clone(),
        Duration::from_secs(30),
        Duration::from_secs(30),
        Arc::new(KeyDirJwks {
            dir: b.settings.data_dir.join("keys"),
        }),
    );
    let t = Instant::now();
    for _ in 0..rounds {
        raw.verify_claims(b.token.as_str(), "access").await?;
    }
    let verify_rsa = t.elapsed() / rounds;
    // What the API does for a token it has seen: the cache's key (SHA-256) and an LRU lookup.
    let cache = ingest_api::token_cache::TokenCache::default();
    let user = b.adapters.verifier.verify(b.token.as_str()).await?;
    cache.put(ingest_api::token_cache::TokenCache::key(&b.token), user);
    let t = Instant::now();
    for _ in 0..rounds {
        let key = ingest_api::token_cache::TokenCache::key(&b.token);
        anyhow::ensure!(cache.get(&key).is_some(), "the token was not cached");
    }
    Ok((verify_rsa, t.elapsed() / rounds))
}
