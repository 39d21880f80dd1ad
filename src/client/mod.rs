//! `characterbot batch`: the batch client. Reads prompts ([`input`]: one a line, or JSON lines
//! with a `custom_id`), submits them as batches, follows them on the event stream with a
//! progress bar (polling as a fallback, at a pace the default rate limit allows), fetches each
//! batch's results in one call, and writes one JSON line per input line, keyed by its
//! `custom_id` (or line number), in input order. Exits non-zero when any prompt failed.
//!
//! Rerunning the same input creates nothing twice: each submission's `Idempotency-Key` is
//! derived from its items alone, so a rerun (after a crash, a `Ctrl-C`, a network failure)
//! gets the batches of the first run back and only waits for and writes their results.
//!
//! It speaks plain HTTP for now (local use, or behind a TLS-terminating proxy): the project
//! keeps a single TLS stack, which arrives with the AWS SDK.
//!
//! Layout: [`http`] the calls and their retries, [`events`] the event stream, [`input`] the
//! batch input's lines, [`session`] `login`/`logout` and the kept tokens, [`terminal`] the
//! `persona` and `chat` commands.

pub mod events;
pub mod http;
pub mod input;
pub mod session;
pub mod terminal;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use ingest_api::handlers::batches::{BatchAccepted, BatchResult, BatchResults};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use shared::domain::{Batch, RequestStatus};
use shared::ids::{BatchId, RequestId};

use crate::cli::BatchArgs;
use http::{typed, Api, Failed};
use input::{BadLine, Item};

fn read_input(file: Option<&PathBuf>) -> anyhow::Result<String> {
    let mut text = String::new();
    match file {
        Some(p) if p.as_os_str() != "-" => {
            std::fs::File::open(p)
                .with_context(|| format!("opening {}", p.display()))?
                .read_to_string(&mut text)?;
        }
        _ => {
            std::io::stdin().lock().read_to_string(&mut text)?;
        }
    }
    Ok(text)
}

/// The `Idempotency-Key` of a submission: its items and nothing else, so the same input
/// submits under the same keys however often it is run.
fn key_of(items: &[Item]) -> String {
    let mut digest = Sha256::new();
    digest.update(b"characterbot-batch-v1\n");
    for item in items {
        digest.update(item.custom_id.as_bytes());
        digest.update(b"\t");
        digest.update(item.prompt.as_bytes());
        digest.update(b"\n");
    }
    format!("{:x}", digest.finalize())
}

/// The index named by an `items[i]: ...` refusal of the API, if it names one.
fn refused_item(e: &Failed) -> Option<usize> {
    let Failed::Refused { status, .. } = e else {
        return None;
    };
    if *status != reqwest::StatusCode::BAD_REQUEST {
        return None;
    }
    let rest = e.message()?.strip_prefix("items[")?;
    rest[..rest.find(']')?].parse().ok()
}

/// A submitted batch and the items it holds.
struct Submitted {
    accepted: BatchAccepted,
    items: Vec<Item>,
}

/// Submits one chunk. An item the API refuses (a prompt over the server's length limit) is
/// reported in `bad` and the rest submitted without it.
async fn submit(
    api: &Api,
    mut items: Vec<Item>,
    bad: &mut Vec<BadLine>,
) -> anyhow::Result<Option<Submitted>> {
    while !items.is_empty() {
        let body = json!({
            "items": items
                .iter()
                .map(|i| json!({ "custom_id": i.custom_id, "prompt": i.prompt }))
                .collect::<Vec<_>>()
        });
        match api.post("/v1/personas/batch", &key_of(&items), &body).await {
            Ok(accepted) => {
                return Ok(Some(Submitted {
                    accepted: typed(accepted)?,
                    items,
                }))
            }
            Err(e) => match refused_item(&e).filter(|&i| i < items.len()) {
                Some(i) => {
                    let item = items.remove(i);
                    bad.push(BadLine {
                        line: item.line,
                        custom_id: Some(item.custom_id),
                        error: e.message().unwrap_or_default().to_owned(),
                    });
                }
                None => return Err(e).context("submitting a batch"),
            },
        }
    }
    Ok(None)
}

/// How often batches are polled: seldom while the event stream reports, more often when it
/// does not. Either way one listing call per round, well inside the default rate limit.
const POLL_WITH_STREAM: Duration = Duration::from_secs(10);
const POLL_WITHOUT_STREAM: Duration = Duration::from_secs(2);

/// Waits until every batch is finished, showing progress.
async fn follow(api: &Api, batches: &[Submitted]) -> anyhow::Result<()> {
    let total: usize = batches.iter().map(|b| b.items.len()).sum();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let ours: HashSet<RequestId> = batches
        .iter()
        .flat_map(|b| b.accepted.request_ids.iter().cloned())
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let up = Arc::new(AtomicBool::new(false));
    tokio::spawn(events::follow(api.clone(), tx, up.clone()));
    let mut streamed: HashMap<RequestId, RequestStatus> = HashMap::new();
    let mut polled: HashMap<BatchId, Batch> = HashMap::new();
    loop {
        poll(api, batches, &mut polled).await?;
        let (done, failed) = progress(&polled, &streamed);
        bar.set_position(done as u64);
        bar.set_message(format!("{failed} failed"));
        if polled.values().all(|b| b.pending == 0) && polled.len() == batches.len() {
            break;
        }
        let every = if up.load(Ordering::Relaxed) {
            POLL_WITH_STREAM
        } else {
            POLL_WITHOUT_STREAM
        };
        let until = tokio::time::Instant::now() + every;
        while let Ok(Some(event)) = tokio::time::timeout_at(until, rx.recv()).await {
            let Some(record) = events::finished_record(&event) else {
                continue;
            };
            if ours.contains(&record.request_id) {
                streamed.insert(record.request_id, record.status);
                let (done, failed) = progress(&polled, &streamed);
                bar.set_position(done as u64);
                bar.set_message(format!("{failed} failed"));
                if done == total {
                    break;
                }
            }
        }
    }
    bar.finish();
    Ok(())
}

/// Finished and failed prompts, the larger of what polls and the stream have seen.
fn progress(
    polled: &HashMap<BatchId, Batch>,
    streamed: &HashMap<RequestId, RequestStatus>,
) -> (usize, usize) {
    let by_poll = polled
        .values()
        .map(|b| (b.total - b.pending) as usize)
        .sum::<usize>();
    let failed_by_poll = polled.values().map(|b| b.failed as usize).sum::<usize>();
    let failed_by_stream = streamed
        .values()
        .filter(|s| **s == RequestStatus::Failed)
        .count();
    (
        by_poll.max(streamed.len()),
        failed_by_poll.max(failed_by_stream),
    )
}

/// Brings `polled` up to date: one listing of the newest batches, and a read of each of ours
/// still unfinished that the listing did not hold (a few per round).
async fn poll(
    api: &Api,
    batches: &[Submitted],
    polled: &mut HashMap<BatchId, Batch>,
) -> anyhow::Result<()> {
    // As many as this run submitted (the newest, usually ours): each listed batch is counted by
    // the server, so the listing stays no bigger than needed.
    let limit = batches.len().clamp(1, 100);
    let listed: shared::domain::Page<Batch> =
        api.get(&format!("/v1/batches?limit={limit}")).await?;
    let mut seen = HashSet::new();
    for batch in listed.items {
        seen.insert(batch.batch_id.clone());
        polled.insert(batch.batch_id.clone(), batch);
    }
    let unlisted = batches
        .iter()
        .map(|b| &b.accepted.batch_id)
        .filter(|id| !seen.contains(*id) && polled.get(*id).is_none_or(|b| b.pending > 0))
        .take(5)
        .cloned()
        .collect::<Vec<_>>();
    for id in unlisted {
        let batch: Batch = api.get(&format!("/v1/batches/{id}")).await?;
        polled.insert(id, batch);
    }
    polled.retain(|id, _| batches.iter().any(|b| &b.accepted.batch_id == id));
    Ok(())
}

/// Every result of one batch (one call unless it holds more than a page).
async fn results_of(api: &Api, batch_id: &BatchId) -> anyhow::Result<Vec<BatchResult>> {
    let mut out = Vec::new();
    let mut path = format!("/v1/batches/{batch_id}/results");
    loop {
        let page: BatchResults = api.get(&path).await?;
        out.extend(page.items);
        match page.next_token {
            Some(t) => path = format!("/v1/batches/{batch_id}/results?next_token={t}"),
            None => return Ok(out),
        }
    }
}

/// One output line per input item and bad line, in input order; returns how many failed.
async fn write_results(
    api: &Api,
    submitted: &[Submitted],
    bad: &[BadLine],
    out: &mut dyn Write,
) -> anyhow::Result<usize> {
    let mut lines: Vec<(usize, Value)> = Vec::new();
    for batch in submitted {
        let results: HashMap<usize, BatchResult> = results_of(api, &batch.accepted.batch_id)
            .await?
            .into_iter()
            .map(|r| (r.index, r))
            .collect();
        for (index, item) in batch.items.iter().enumerate() {
            let line = match results.get(&index) {
                Some(r) => json!({
                    "custom_id": item.custom_id,
                    "line": item.line,
                    "prompt": item.prompt,
                    "request_id": r.request_id,
                    "status": r.status,
                    "persona": r.persona,
                    "error": r.error,
                }),
                // Its request is gone from the store (kept 30 days on AWS).
                None => json!({
                    "custom_id": item.custom_id,
                    "line": item.line,
                    "prompt": item.prompt,
                    "status": "failed",
                    "persona": null,
                    "error": { "code": "result_not_found", "message": "the server no longer holds this result" },
                }),
            };
            lines.push((item.line, line));
        }
    }
    for b in bad {
        lines.push((
            b.line,
            json!({
                "custom_id": b.custom_id,
                "line": b.line,
                "status": "failed",
                "persona": null,
                "error": { "code": "invalid_input", "message": b.error },
            }),
        ));
    }
    lines.sort_by_key(|(line, _)| *line);
    let mut failures = 0;
    for (_, line) in &lines {
        if line["status"] != "succeeded" {
            failures += 1;
        }
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(failures)
}

pub async fn run(args: BatchArgs) -> anyhow::Result<()> {
    let (items, mut bad) = input::parse(&read_input(args.file.as_ref())?);
    if items.is_empty() && bad.is_empty() {
        bail!("no prompts given");
    }
    let mut out: Box<dyn Write> = match &args.out {
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => Box::new(std::io::stdout().lock()),
    };
    // No credentials given: the session `characterbot login` kept.
    let api = if args.token.is_none() && args.email.is_none() {
        session::Session::resume(&crate::cli::ClientArgs {
            url: None,
            config_dir: args.config_dir.clone(),
        })
        .await?
    } else {
        Api::connect(
            &args.url,
            args.token.as_deref(),
            args.email.as_deref(),
            args.password.as_deref(),
        )
        .await?
    };
    let mut submitted = Vec::new();
    for chunk in items.chunks(args.chunk.max(1)) {
        submitted.extend(submit(&api, chunk.to_vec(), &mut bad).await?);
    }
    follow(&api, &submitted).await?;
    let failures = write_results(&api, &submitted, &bad, &mut out).await?;
    // Items the API refused at submission are among the bad lines, not the submitted.
    let total = submitted.iter().map(|s| s.items.len()).sum::<usize>() + bad.len();
    eprintln!(
        "{total} prompts: {} succeeded, {failures} failed",
        total - failures
    );
    if failures > 0 {
        bail!("{failures} of {total} prompts failed");
    }
    Ok(())
}
