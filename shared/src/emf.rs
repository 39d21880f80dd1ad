//! The same metrics as `GET /metrics`, written to stdout in CloudWatch Embedded Metric Format, so
//! that on AWS they appear in CloudWatch from the log stream alone, with no agent to scrape.
//!
//! Written by hand: `prometheus-client` has no EMF exporter and no API to walk a registry's
//! values, and the crates that write EMF serve the `metrics` facade instead. Moving to that
//! facade was weighed (issue #10) and left, for three reasons read from the crates' sources:
//!
//! - `metrics_cloudwatch_embedded` (0.10) keeps at most 100 unflushed values per histogram
//!   (`MAX_HISTOGRAM_VALUES`) and logs an error for every value past that; our job histogram
//!   sees ~3,000 values a second at the benchmarked rate, so a one-minute flush would drop
//!   nearly all of them. It is made for Lambda, flushed after every invocation.
//! - It, like the facade's macros, records into one process-global recorder. A registry per
//!   [`Metrics`] keeps each app's figures its own: the integration tests run dozens of apps in
//!   one process and assert exact counts at each app's `/metrics`.
//! - AWS Labs' `metrique` writes one EMF document per unit of work (aggregation is a separate,
//!   0.1 crate) and has no Prometheus exposition, so `/metrics` would need a second library.
//!
//! So each flush reads the registry in its own text format (a stable, documented format) and
//! turns it into one JSON document per label set:
//!
//! - counters become the increase since the previous flush (unit `Count`); unchanged ones are
//!   left out;
//! - histograms become `<name>_count` and `<name>_sum` increases (mean = sum / count);
//! - gauges are left out: the only one is queue depth, which SQS publishes to CloudWatch itself.
//!
//! Labels become dimensions.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Map, Value};

use crate::metrics::Metrics;

type Labels = BTreeMap<String, String>;

/// Remembers the last values it saw, so each flush reports increases.
pub struct EmfWriter {
    namespace: String,
    last: HashMap<(String, Labels), f64>,
}

/// One sample line of the text format: `name{k="v",...} value`.
fn parse_sample(line: &str) -> Option<(String, Labels, f64)> {
    let (name, rest) = match line.find('{') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => {
            let (name, value) = line.split_once(' ')?;
            return Some((name.to_owned(), Labels::new(), value.trim().parse().ok()?));
        }
    };
    let mut labels = Labels::new();
    let mut chars = rest.char_indices();
    let mut key = String::new();
    let close = loop {
        let (i, c) = chars.next()?;
        match c {
            '}' => break i,
            ',' | ' ' => {}
            '=' => {
                if chars.next()?.1 != '"' {
                    return None;
                }
                let mut value = String::new();
                loop {
                    match chars.next()?.1 {
                        '"' => break,
                        '\\' => match chars.next()?.1 {
                            'n' => value.push('\n'),
                            other => value.push(other),
                        },
                        other => value.push(other),
                    }
                }
                labels.insert(std::mem::take(&mut key), value);
            }
            other => key.push(other),
        }
    };
    let value = rest[close + 1..].split_whitespace().next()?.parse().ok()?;
    Some((name.to_owned(), labels, value))
}

impl EmfWriter {
    pub fn new(namespace: impl Into<String>) -> EmfWriter {
        EmfWriter {
            namespace: namespace.into(),
            last: HashMap::new(),
        }
    }

    /// The EMF documents for what changed since the last call, one per label set.
    pub fn flush(&mut self, metrics: &Metrics, timestamp_ms: i64) -> Vec<Value> {
        let text = metrics.render();
        let mut types: HashMap<String, String> = HashMap::new();
        // label set → metric name → (value, unit)
        let mut groups: BTreeMap<Labels, BTreeMap<String, (f64, &'static str)>> = BTreeMap::new();
        for line in text.lines() {
            if let Some(decl) = line.strip_prefix("# TYPE ") {
                if let Some((family, kind)) = decl.split_once(' ') {
                    types.insert(family.to_owned(), kind.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let Some((name, labels, value)) = parse_sample(line) else {
                continue;
            };
            let family_of = |suffix: &str| {
                name.strip_suffix(suffix)
                    .filter(|f| types.contains_key(*f))
                    .map(str::to_owned)
            };
            let unit = if let Some(f) = family_of("_total") {
                if types[&f] != "counter" {
                    continue;
                }
                "Count"
            } else if let Some(f) = family_of("_count") {
                if types[&f] != "histogram" {
                    continue;
                }
                "Count"
            } else if let Some(f) = family_of("_sum") {
                if types[&f] != "histogram" {
                    continue;
                }
                if f.ends_with("_seconds") {
                    "Seconds"
                } else {
                    "None"
                }
            } else {
                // Buckets, gauges, anything else.
                continue;
            };
            let previous = self
                .last
                .insert((name.clone(), labels.clone()), value)
                .unwrap_or(0.0);
            let increase = value - previous;
            if increase > 0.0 {
                groups
                    .entry(labels)
                    .or_default()
                    .insert(name, (increase, unit));
            }
        }
        groups
            .into_iter()
            .map(|(labels, values)| self.document(timestamp_ms, labels, values))
            .collect()
    }

    fn document(
        &self,
        timestamp_ms: i64,
        labels: Labels,
        values: BTreeMap<String, (f64, &'static str)>,
    ) -> Value {
        let mut doc = Map::new();
        let definitions: Vec<Value> = values
            .keys()
            .map(|name| json!({ "Name": name, "Unit": values[name].1 }))
            .collect();
        let dimensions: Vec<&String> = labels.keys().collect();
        doc.insert(
            "_aws".into(),
            json!({
                "Timestamp": timestamp_ms,
                "CloudWatchMetrics": [{
                    "Namespace": self.namespace,
                    "Dimensions": [dimensions],
                    "Metrics": definitions,
                }],
            }),
        );
        for (k, v) in &labels {
            doc.insert(k.clone(), Value::String(v.clone()));
        }
        for (name, (value, _)) in values {
            doc.insert(name, json!(value));
        }
        Value::Object(doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{HttpLabels, KindLabels};

    fn find<'a>(docs: &'a [Value], metric: &str) -> Option<&'a Value> {
        docs.iter().find(|d| d.get(metric).is_some())
    }

    #[test]
    fn counters_and_histograms_are_written_as_increases_with_labels_as_dimensions() {
        let metrics = Metrics::new();
        let mut emf = EmfWriter::new("CharacterBot");
        for _ in 0..3 {
            metrics.job("chat", "succeeded");
        }
        metrics
            .job_duration
            .get_or_create(&KindLabels {
                kind: "chat".into(),
            })
            .observe(0.25);
        let docs = emf.flush(&metrics, 1_700_000_000_000);

        let jobs = find(&docs, "characterbot_jobs_total").expect("jobs counter");
        assert_eq!(jobs["characterbot_jobs_total"], 3.0);
        assert_eq!(jobs["kind"], "chat");
        assert_eq!(jobs["outcome"], "succeeded");
        let meta = &jobs["_aws"];
        assert_eq!(meta["Timestamp"], 1_700_000_000_000i64);
        let directive = &meta["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "CharacterBot");
        assert_eq!(directive["Dimensions"], json!([["kind", "outcome"]]));
        assert_eq!(
            directive["Metrics"],
            json!([{ "Name": "characterbot_jobs_total", "Unit": "Count" }])
        );

        let duration = find(&docs, "characterbot_job_duration_seconds_sum").expect("histogram");
        assert_eq!(duration["characterbot_job_duration_seconds_sum"], 0.25);
        assert_eq!(duration["characterbot_job_duration_seconds_count"], 1.0);
        assert!(
            docs.iter()
                .all(|d| d.as_object().unwrap().keys().all(|k| !k.contains("bucket"))),
            "no buckets"
        );

        // Only what changed, by how much.
        metrics.job("chat", "succeeded");
        metrics.job("chat", "succeeded");
        metrics
            .http_requests
            .get_or_create(&HttpLabels {
                method: "GET".into(),
                route: "/v1/requests/{id}".into(),
                status: 200,
            })
            .inc();
        let docs = emf.flush(&metrics, 1_700_000_060_000);
        assert_eq!(
            find(&docs, "characterbot_jobs_total").unwrap()["characterbot_jobs_total"],
            2.0
        );
        let http = find(&docs, "characterbot_http_requests_total").unwrap();
        assert_eq!(http["route"], "/v1/requests/{id}");
        assert_eq!(http["status"], "200");
        assert!(find(&docs, "characterbot_job_duration_seconds_sum").is_none());
        assert!(emf.flush(&metrics, 1_700_000_120_000).is_empty());
    }

    #[test]
    fn label_values_with_quotes_and_escapes_are_read_back() {
        let (name, labels, value) =
            parse_sample(r#"m_total{a="x\"y",b="back\\slash",c="line\nbreak"} 7"#).unwrap();
        assert_eq!(name, "m_total");
        assert_eq!(labels["a"], "x\"y");
        assert_eq!(labels["b"], "back\\slash");
        assert_eq!(labels["c"], "line\nbreak");
        assert_eq!(value, 7.0);
        assert_eq!(
            parse_sample("plain 1.5").unwrap(),
            ("plain".into(), Labels::new(), 1.5)
        );
        assert!(parse_sample("broken{a=1} 2").is_none());
    }
}
