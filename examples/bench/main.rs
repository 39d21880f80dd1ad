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
use characterbot::{api_state, consumer, open_ports, Ports};
use clap::Parser;
use serde_json::{json, Value};
use shared::domain::RequestKind;
use tokio_util::sync::CancellationToken;

mod measure;
use measure::*;

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
        consumer(RequestKind::Persona, &b.adapters, &b.settings).run(b.shutdown.clone()),
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
    let chat_worker =
        tokio::spawn(consumer(RequestKind::Chat, &b.adapters, &b.settings).run(b.shutdown.clone()));
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

/// The API on a loopback port (no workers yet) and a signed-in user.
async fn start(settings: Settings, clients: usize) -> anyhow::Result<Bench> {
    let adapters = open_ports(&settings).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    tokio::spawn(ingest_api::serve(
        listener,
        api_state(&adapters, &settings, shutdown.clone()),
    ));
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
        settings,
        shutdown,
    })
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
