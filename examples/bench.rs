//! The CharacterBot benchmark: the whole product in this process (embedded backend, offline
//! engine, loopback HTTP), measured from the outside the way a client sees it.
//!
//! `cargo run --release --example bench -- [--requests N] [--clients C] [--backlog B]
//! [--chats K] [--chat-clients M]`
//!
//! Prints a Markdown report (copied into docs/benchmarks.md): ingest latency and throughput of
//! `POST /v1/personas` from in-process clients, how fast the persona worker drains a backlog,
//! chat round trips through a long poll (alone and with many conversations at once), the cost
//! of one token verification, and the process's peak memory. The external-load comparison with
//! the reference stack is `scripts/bench-ingest`.

/// The same allocator as the `characterbot` binary, so the figures are the product's.
#[global_allocator]
static GLOBAL: characterbot::allocator::Allocator = characterbot::allocator::Allocator {};
characterbot::tune_before_main!();

use std::sync::Arc;
use std::time::{Duration, Instant};

use characterbot::cli::Settings;
use characterbot::{api_state, consumer, open_ports, Models, Ports};
use clap::Parser;
use serde_json::{json, Value};
use shared::auth::local::KeyDirJwks;
use shared::auth::JwksVerifier;
use shared::domain::RequestKind;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// Persona requests in the ingest run.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Persona jobs waiting when the persona worker starts (the ingest run's requests, topped
    /// up through the batch endpoint).
    #[arg(long, default_value_t = 20_000)]
    backlog: usize,
    /// Chat round trips of one client alone.
    #[arg(long, default_value_t = 200)]
    solo_chats: usize,
    /// Chat round trips (message → long poll → reply), one after another per conversation.
    #[arg(long, default_value_t = 6400)]
    chats: usize,
    /// Conversations chatting at once.
    #[arg(long, default_value_t = 64)]
    chat_clients: usize,
    #[command(flatten)]
    settings: Settings,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// `total` chat round trips (post → long poll → reply) spread over `clients` conversations run
/// concurrently; returns the sorted latencies and the wall time.
async fn chat_round_trips(
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

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run_bench())
}

/// The product running in this process, and a signed-in client of it.
struct Bench {
    http: reqwest::Client,
    base: String,
    token: Arc<String>,
    adapters: Ports,
    models: Models,
    settings: Settings,
    shutdown: CancellationToken,
}

/// What the report prints.
struct Figures {
    ingest: Vec<Duration>,
    ingest_wall: Duration,
    backlog: usize,
    drain_wall: Duration,
    solo: Vec<Duration>,
    chats: Vec<Duration>,
    chat_clients: usize,
    chat_wall: Duration,
    verify_rsa: Duration,
    verify_cached: Duration,
}

async fn run_bench() -> anyhow::Result<()> {
    let mut args = Args::parse();
    let dir = tempfile::tempdir()?;
    args.settings.data_dir = dir.path().to_path_buf();
    args.settings.api.rate_limit_per_minute = 0;
    // One user plays every client here: each of its conversations long-polls at once.
    args.settings.api.max_streams_per_user = args
        .settings
        .api
        .max_streams_per_user
        .max(args.chat_clients + args.clients);
    let b = start(args.settings.clone(), args.clients).await?;

    // 1. Ingest: POST /v1/personas with no worker running, so only the API is measured.
    let (ingest, ingest_wall) = ingest(&b, &args).await?;

    // 2. Drain: top the backlog up through the batch endpoint, then start the persona worker
    // and time until the queue is empty.
    let backlog = top_up(&b, ingest.len(), args.backlog).await?;
    let drain_start = Instant::now();
    let persona_worker = tokio::spawn(
        consumer(RequestKind::Persona, &b.adapters, &b.models, &b.settings).run(b.shutdown.clone()),
    );
    loop {
        let s = b.adapters.persona_queue.stats().await?;
        if s.visible + s.in_flight == 0 {
            break;
        }
        // Not too often: counting a queue of thousands is itself work for the database.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain_wall = drain_start.elapsed();

    // 3. Chat round trips: message → long poll until the reply is stored.
    let chat_worker = tokio::spawn(
        consumer(RequestKind::Chat, &b.adapters, &b.models, &b.settings).run(b.shutdown.clone()),
    );
    let persona_id = one_persona(&b).await?;
    let (http, base, token) = (&b.http, &b.base, &b.token);
    let (solo, _) = chat_round_trips(http, base, token, &persona_id, 1, args.solo_chats).await?;
    let chat_clients = args.chat_clients.min(args.chats).max(1);
    let (chats, chat_wall) =
        chat_round_trips(http, base, token, &persona_id, chat_clients, args.chats).await?;

    // 4. Token verification: the RS256 check itself, and a request's cost with the cache.
    let (verify_rsa, verify_cached) = verify_costs(&b).await?;

    // Let the workers stop before the runtime goes, so none is cut off inside a database call.
    b.shutdown.cancel();
    let _ = tokio::join!(persona_worker, chat_worker);
    let figures = Figures {
        ingest,
        ingest_wall,
        backlog,
        drain_wall,
        solo,
        chats,
        chat_clients,
        chat_wall,
        verify_rsa,
        verify_cached,
    };
    report(&b.settings, args.clients, &figures);
    Ok(())
}

/// The API on a loopback port (no workers yet), the models, and a signed-in user.
async fn start(settings: Settings, clients: usize) -> anyhow::Result<Bench> {
    let adapters = open_ports(&settings).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    tokio::spawn(ingest_api::serve(
        listener,
        api_state(&adapters, &settings, shutdown.clone()),
    ));
    let models = Models::from_settings(&settings).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let creds = json!({ "email": "bench@example.com", "password": "benchmark password" });
    http.post(format!("{base}/v1/auth/signup"))
        .json(&creds)
        .send()
        .await?
        .error_for_status()?;
    let tokens: Value = http
        .post(format!("{base}/v1/auth/signin"))
        .json(&creds)
        .send()
        .await?
        .json()
        .await?;
    let token = Arc::new(
        tokens["access_token"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    );
    Ok(Bench {
        http,
        base,
        token,
        adapters,
        models,
        settings,
        shutdown,
    })
}

/// `args.requests` persona requests from `args.clients` clients; the sorted latencies and the
/// wall time.
async fn ingest(b: &Bench, args: &Args) -> anyhow::Result<(Vec<Duration>, Duration)> {
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
async fn top_up(b: &Bench, mut backlog: usize, target: usize) -> anyhow::Result<usize> {
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
async fn one_persona(b: &Bench) -> anyhow::Result<Value> {
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
async fn verify_costs(b: &Bench) -> anyhow::Result<(Duration, Duration)> {
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

/// The Markdown report.
fn report(settings: &Settings, clients: usize, f: &Figures) {
    let w = &settings.worker;
    println!(
        "SQLite sync: {:?}; persona concurrency {}, chat concurrency {}\n",
        settings.sqlite_sync, w.persona_concurrency, w.chat_concurrency
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| ingest: `POST /v1/personas` → 202, {} requests, {} clients | {:.0} req/s |",
        f.ingest.len(),
        clients,
        f.ingest.len() as f64 / f.ingest_wall.as_secs_f64()
    );
    println!(
        "| ingest latency p50 / p95 / p99 | {} / {} / {} |",
        ms(percentile(&f.ingest, 0.5)),
        ms(percentile(&f.ingest, 0.95)),
        ms(percentile(&f.ingest, 0.99))
    );
    println!(
        "| persona worker drain (backlog of {} jobs, concurrency {}) | {:.0} jobs/s |",
        f.backlog,
        w.persona_concurrency,
        f.backlog as f64 / f.drain_wall.as_secs_f64()
    );
    println!(
        "| chat round trip (post → long poll → reply), one client, {} chats, p50 / p99 | {} / {} |",
        f.solo.len(),
        ms(percentile(&f.solo, 0.5)),
        ms(percentile(&f.solo, 0.99))
    );
    println!(
        "| chat round trips: {} chats, {} conversations, chat concurrency {} | {:.0} replies/s |",
        f.chats.len(),
        f.chat_clients,
        w.chat_concurrency,
        f.chats.len() as f64 / f.chat_wall.as_secs_f64()
    );
    println!(
        "| chat round trip under that load, p50 / p95 / p99 | {} / {} / {} |",
        ms(percentile(&f.chats, 0.5)),
        ms(percentile(&f.chats, 0.95)),
        ms(percentile(&f.chats, 0.99))
    );
    println!(
        "| access-token check: RS256 signature and claims (key cached) | {:.1} µs |",
        f.verify_rsa.as_secs_f64() * 1e6
    );
    println!(
        "| access-token check of a token already seen (verified-token cache) | {:.1} µs |",
        f.verify_cached.as_secs_f64() * 1e6
    );
    if let Some(mib) = peak_rss_mib() {
        println!("| peak resident memory of the whole process (API + workers + bench clients) | {mib:.0} MiB |");
    }
}
