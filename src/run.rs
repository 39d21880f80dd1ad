//! What one process runs: the API state and the consume loops built from the ports, models and
//! settings, and [`run`], which drives `serve`, `api` or one `worker` until shutdown.

use std::sync::Arc;
use std::time::Duration;

use ingest_api::{AppState, Shared};
use shared::domain::RequestKind;
use shared::emf::EmfWriter;
use shared::memo::Memo;
use shared::metrics::Metrics;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use workers::chat::ChatJob;
use workers::memory::Summarizer;
use workers::persona::PersonaJob;
use workers::{Consumer, Job};

use crate::cli::Settings;
use crate::ports::{open_ports, Ports};

/// The API's state: the ports, and the options built from the API's flags.
pub fn api_state(adapters: &Ports, settings: &Settings, shutdown: CancellationToken) -> AppState {
    let options = ingest_api::ApiOptions::from(&settings.api);
    AppState::new(Shared {
        ports: adapters.clone(),
        limiter: Shared::limiter_for(&options),
        throttle: Shared::throttle_for(&options),
        options,
        tokens: Default::default(),
        slots: Default::default(),
        shutdown,
    })
}

/// A conversation's summary may take up to this share of the context budget (a quarter).
const SUMMARY_SHARE: usize = 4;

/// The consume loop of one kind of worker.
pub fn consumer(kind: RequestKind, adapters: &Ports, settings: &Settings) -> Arc<Consumer> {
    let models = &adapters.models;
    let w = &settings.worker;
    let queue = adapters.queue(kind).clone();
    let (job, concurrency): (Arc<dyn Job>, usize) = match kind {
        RequestKind::Persona => (
            Arc::new(PersonaJob {
                model: models.persona.clone(),
            }),
            w.persona_concurrency,
        ),
        RequestKind::Chat => (
            Arc::new(ChatJob {
                store: adapters.store.clone(),
                model: models.chat.clone(),
                events: adapters.events.clone(),
                history_messages: w.history_messages,
                context_tokens: w.context_tokens,
                memory_queue: queue.clone(),
                queued_folds: Arc::new(Memo::new(10_000)),
            }),
            w.chat_concurrency,
        ),
    };
    // Memory jobs ride the chat queue (see `workers::memory`).
    let memory = (kind == RequestKind::Chat).then(|| {
        Arc::new(Summarizer {
            store: adapters.store.clone(),
            model: models.chat.clone(),
            summary_tokens: w.context_tokens / SUMMARY_SHARE,
        })
    });
    Arc::new(Consumer {
        job,
        queue,
        memory,
        atomic: adapters.atomic.clone(),
        metrics: adapters.metrics.clone(),
        options: w.into(),
        concurrency,
    })
}

/// What one process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// API and both workers.
    Serve,
    Api,
    Worker(RequestKind),
}

impl Role {
    /// The kinds of job this role consumes.
    fn kinds(self) -> &'static [RequestKind] {
        match self {
            Role::Serve => &RequestKind::ALL,
            Role::Api => &[],
            Role::Worker(RequestKind::Persona) => &[RequestKind::Persona],
            Role::Worker(RequestKind::Chat) => &[RequestKind::Chat],
        }
    }
}

type Tasks = JoinSet<anyhow::Result<()>>;

/// Runs `role` until `shutdown` is cancelled, then drains and returns.
pub async fn run(
    role: Role,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let adapters = open_ports(&settings).await?;
    let mut tasks = Tasks::new();
    for &kind in role.kinds() {
        let c = consumer(kind, &adapters, &settings);
        let token = shutdown.clone();
        tasks.spawn(async move {
            c.run(token).await;
            Ok(())
        });
    }
    // Stopped only after everything else has, so the last flush counts the drained jobs too.
    let emf_stop = CancellationToken::new();
    let emf = settings.metrics_emf_interval().map(|every| {
        tokio::spawn(write_emf(
            EmfWriter::new(settings.metrics_emf_namespace.clone()),
            adapters.metrics.clone(),
            every,
            emf_stop.clone(),
        ))
    });
    if matches!(role, Role::Serve | Role::Api) {
        spawn_api(&mut tasks, &adapters, &settings, &shutdown).await?;
    }
    let outcome = join_all(tasks, &shutdown).await;
    emf_stop.cancel();
    if let Some(task) = emf {
        let _ = task.await;
    }
    outcome
}

/// Binds the API's listener (and the metrics listener, if it has its own) and serves them.
async fn spawn_api(
    tasks: &mut Tasks,
    adapters: &Ports,
    settings: &Settings,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&settings.api.listen).await?;
    let state = api_state(adapters, settings, shutdown.clone());
    if let Some(addr) = &settings.api.metrics_listen {
        let metrics = tokio::net::TcpListener::bind(addr).await?;
        let state = state.clone();
        tasks.spawn(async move { Ok(ingest_api::serve_metrics(metrics, state).await?) });
    }
    tasks.spawn(async move { Ok(ingest_api::serve(listener, state).await?) });
    Ok(())
}

/// Waits for every part; the first failure stops the others and is the outcome.
async fn join_all(mut tasks: Tasks, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let mut outcome = Ok(());
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done.map_err(anyhow::Error::from).and_then(|r| r) {
            shutdown.cancel();
            if outcome.is_ok() {
                outcome = Err(e);
            }
        }
    }
    outcome
}

/// Writes the metrics to stdout in CloudWatch Embedded Metric Format every `every`, and once
/// more at shutdown so the last interval is not lost.
async fn write_emf(
    mut emf: EmfWriter,
    metrics: Arc<Metrics>,
    every: Duration,
    shutdown: CancellationToken,
) {
    use std::io::Write;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = shutdown.cancelled() => true,
        };
        let docs = emf.flush(&metrics, shared::time::now_ms());
        // One line per document, written whole under the lock so log lines cannot interleave.
        let mut out = std::io::stdout().lock();
        for doc in docs {
            if let Err(e) = writeln!(out, "{doc}") {
                tracing::warn!(error = %e, "could not write EMF metrics");
            }
        }
        let _ = out.flush();
        drop(out);
        if last {
            return;
        }
    }
}
