//! Request and trace ids travel with each job as message attributes, on both queues: the
//! worker's logs of a job can be joined to the HTTP call that queued it.

use std::time::Duration;

use crate::common::TestApp;
use serde_json::json;

const TRACE_HEADER: &str = "Root=1-67891233-abcdef012345678912345678;Sampled=1";

async fn a_job_carries_its_request_and_trace_ids(app: TestApp) {
    let alice = app.user("alice").await;
    let res = app
        .http
        .post(app.url("/v1/personas"))
        .bearer_auth(&alice.token)
        .header("x-amzn-trace-id", TRACE_HEADER)
        .json(&json!({ "prompt": "Sherlock Holmes" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let http_request_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let accepted: serde_json::Value = res.json().await.unwrap();

    let queue = &app.adapters.persona_queue;
    let mut got = Vec::new();
    for _ in 0..10 {
        got = queue
            .receive(1, Duration::from_secs(30), Duration::from_secs(1))
            .await
            .unwrap();
        if !got.is_empty() {
            break;
        }
    }
    assert_eq!(got.len(), 1, "the job was queued");
    // The attribute names on the wire (`shared::job` keeps them private).
    let attributes = &got[0].attributes;
    assert_eq!(
        attributes.get("request_id").map(String::as_str),
        accepted["request_id"].as_str()
    );
    assert_eq!(attributes.get("http_request_id"), Some(&http_request_id));
    assert_eq!(
        attributes.get("trace_id").map(String::as_str),
        Some("1-67891233-abcdef012345678912345678")
    );
}

#[tokio::test]
async fn embedded_jobs_carry_request_and_trace_ids() {
    a_job_carries_its_request_and_trace_ids(TestApp::builder().without_workers().start().await)
        .await;
}

#[tokio::test]
async fn sqs_jobs_carry_request_and_trace_ids() {
    a_job_carries_its_request_and_trace_ids(
        TestApp::builder().on_aws().without_workers().start().await,
    )
    .await;
}
