//! Prometheus metrics. One registry per process, shared by the API and the workers it runs, and
//! rendered at `GET /metrics`. Queue depths are not counters kept here: they are read from the
//! queue at scrape time, so they are right even when other processes do the work.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub kind: String,
    /// `succeeded`, `failed`, `retried`, `dead_lettered`, `duplicate`, `released`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub kind: String,
    pub model: String,
    /// `input` or `output`.
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub kind: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub queue: String,
    /// `visible`, `in_flight` or `dead`.
    pub state: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: Family<RouteLabels, Histogram>,
    pub jobs: Family<JobLabels, Counter>,
    pub job_duration: Family<KindLabels, Histogram>,
    pub model_tokens: Family<TokenLabels, Counter>,
    /// Duration of the attempt that succeeded, model calls included.
    pub model_latency: Family<ModelLabels, Histogram>,
    /// Set from the queues themselves just before each scrape.
    pub queue_messages: Family<QueueLabels, Gauge>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("characterbot");
        let http_requests = Family::<HttpLabels, Counter>::default();
        let http_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        let jobs = Family::<JobLabels, Counter>::default();
        let job_duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 18))
        });
        let model_tokens = Family::<TokenLabels, Counter>::default();
        let model_latency = Family::<ModelLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 18))
        });
        registry.register(
            "model_request_duration_seconds",
            "Duration of successful job attempts (model calls and storage), by model",
            model_latency.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests answered",
            http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route group",
            http_duration.clone(),
        );
        registry.register("jobs", "Queue jobs handled, by outcome", jobs.clone());
        registry.register(
            "job_duration_seconds",
            "Time from receive to outcome of one delivery",
            job_duration.clone(),
        );
        registry.register("model_tokens", "Model tokens used", model_tokens.clone());
        let queue_messages = Family::<QueueLabels, Gauge>::default();
        registry.register(
            "queue_messages",
            "Messages per queue and state",
            queue_messages.clone(),
        );
        Arc::new(Metrics {
            registry,
            http_requests,
            http_duration,
            jobs,
            job_duration,
            model_tokens,
            model_latency,
            queue_messages,
        })
    }

    pub fn job(&self, kind: &str, outcome: &str) {
        self.jobs
            .get_or_create(&JobLabels {
                kind: kind.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
