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
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Args)]
pub struct BatchArgs {
    /// Base URL of the API.
    #[arg(
        long,
        env = "CHARACTERBOT_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// Access token; when absent, signs in with --email and --password.
    #[arg(long, env = "CHARACTERBOT_TOKEN")]
    pub token: Option<String>,
    #[arg(long, env = "CHARACTERBOT_EMAIL")]
    pub email: Option<String>,
    #[arg(long, env = "CHARACTERBOT_PASSWORD")]
    pub password: Option<String>,
    /// File of prompts, one per line ("-" or absent: standard input).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Where to write the results as JSON lines (absent: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Prompts per submitted batch (at most the server's CHARACTERBOT_MAX_BATCH).
    #[arg(long, default_value_t = 100)]
    pub chunk: usize,
}

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

async fn json_of(res: reqwest::Response) -> anyhow::Result<Value> {
    let status = res.status();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("server answered {status}: {body}");
    }
    Ok(body)
}

pub async fn run(args: BatchArgs) -> anyhow::Result<()> {
    let prompts = read_prompts(args.file.as_ref())?;
    if prompts.is_empty() {
        bail!("no prompts given");
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let base = args.url.trim_end_matches('/').to_owned();
    let token = match (&args.token, &args.email, &args.password) {
        (Some(t), _, _) => t.clone(),
        (None, Some(email), Some(password)) => {
            let tokens = json_of(
                http.post(format!("{base}/v1/auth/signin"))
                    .json(&json!({ "email": email, "password": password }))
                    .send()
                    .await?,
            )
            .await
            .context("signing in")?;
            tokens["access_token"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        }
        _ => bail!("give --token, or --email and --password"),
    };

    // Each chunk carries an Idempotency-Key derived from its content and this run, so a POST
    // retried after a network error cannot queue the same prompts twice.
    let run_id = uuid::Uuid::new_v4();
    let mut batches = Vec::new();
    for chunk in prompts.chunks(args.chunk.max(1)) {
        let key = format!(
            "{:x}",
            Sha256::digest(format!("{run_id}:{}", chunk.join("\n")))
        );
        let body = json!({ "prompts": chunk });
        let mut last_error = None;
        let mut accepted = None;
        for attempt in 0..3u64 {
            let sent = http
                .post(format!("{base}/v1/personas/batch"))
                .bearer_auth(&token)
                .header("Idempotency-Key", &key)
                .json(&body)
                .send()
                .await;
            match sent {
                Ok(res) if res.status().is_server_error() => {
                    last_error = Some(anyhow::anyhow!("server answered {}", res.status()))
                }
                Ok(res) => {
                    accepted = Some(json_of(res).await.context("submitting a batch")?);
                    break;
                }
                Err(e) => last_error = Some(e.into()),
            }
            tokio::time::sleep(Duration::from_millis(500 * (attempt + 1))).await;
        }
        let accepted = match accepted {
            Some(a) => a,
            None => return Err(last_error.unwrap_or_else(|| anyhow::anyhow!("batch not accepted"))),
        };
        batches.push((chunk.to_vec(), accepted));
    }

    let bar = ProgressBar::new(prompts.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    loop {
        let (mut done, mut failed) = (0u64, 0u64);
        for (_, accepted) in &batches {
            let id = accepted["batch_id"].as_str().unwrap_or_default();
            let counts = json_of(
                http.get(format!("{base}/v1/batches/{id}"))
                    .bearer_auth(&token)
                    .send()
                    .await?,
            )
            .await?;
            done +=
                counts["succeeded"].as_u64().unwrap_or(0) + counts["failed"].as_u64().unwrap_or(0);
            failed += counts["failed"].as_u64().unwrap_or(0);
        }
        bar.set_position(done);
        bar.set_message(format!("{failed} failed"));
        if done >= prompts.len() as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bar.finish();

    let mut out: Box<dyn Write> = match &args.out {
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => Box::new(std::io::stdout().lock()),
    };
    let mut failures = 0;
    for (chunk, accepted) in &batches {
        let ids = accepted["request_ids"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for (prompt, id) in chunk.iter().zip(ids) {
            let id = id.as_str().unwrap_or_default();
            let r = json_of(
                http.get(format!("{base}/v1/requests/{id}"))
                    .bearer_auth(&token)
                    .send()
                    .await?,
            )
            .await?;
            if r["status"] != "succeeded" {
                failures += 1;
            }
            let line = json!({
                "prompt": prompt,
                "request_id": id,
                "status": r["status"],
                "persona": r["result"]["persona"],
                "error": r["error"],
            });
            writeln!(out, "{line}")?;
        }
    }
    out.flush()?;
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
