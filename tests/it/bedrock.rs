//! Amazon Bedrock (Nova) as the chat provider, driven through the real
//! `aws-sdk-bedrockruntime` client (SigV4 signing, JSON and event-stream protocols) against a
//! local server that speaks Bedrock's wire format. No test leaves the machine.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{self, read_sse, Sequence, TestApp, User};
use aws_sdk_bedrockruntime::config::{BehaviorVersion, Credentials, Region};
use characterbot::Models;
use serde_json::{json, Value};
use shared::models::bedrock::{BedrockChatModel, BedrockOptions, DEFAULT_MODEL};
use shared::models::offline::OfflinePersonaModel;
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

const INVOKE: &str = r"^/model/[^/]+/invoke$";
const STREAM: &str = r"^/model/[^/]+/invoke-with-response-stream$";

fn bedrock(server: &MockServer, stream: bool) -> Models {
    let config = aws_sdk_bedrockruntime::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "AKIDTESTKEY",
            "test-secret",
            None,
            None,
            "test",
        ))
        .endpoint_url(server.uri());
    let opts = BedrockOptions {
        model_id: DEFAULT_MODEL.into(),
        max_tokens: 300,
        temperature: 0.7,
        top_p: 0.9,
        stream,
        timeout: Duration::from_secs(10),
    };
    Models {
        persona: Arc::new(OfflinePersonaModel::default()),
        chat: Arc::new(BedrockChatModel::with_config(config, opts)),
    }
}

fn nova_reply(text: &str, stop: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({
        "output": { "message": { "role": "assistant", "content": [{ "text": text }] } },
        "stopReason": stop,
        "usage": { "inputTokens": 42, "outputTokens": 9, "totalTokens": 51 }
    }))
}

fn aws_error(status: u16, code: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .insert_header("x-amzn-errortype", code)
        .set_body_json(json!({ "message": message }))
}

async fn chat_app(
    server: &MockServer,
    stream: bool,
    extra: &[(&str, &str)],
) -> (TestApp, User, String) {
    let mut b = TestApp::builder()
        .models(bedrock(server, stream))
        .arg("--retry-base-ms", "10")
        .arg("--retry-max-ms", "50");
    for (k, v) in extra {
        b = b.arg(k, v);
    }
    let app = b.start().await;
    let user = app.user("nova").await;
    let conv = app.conversation(&user, "Yoda").await;
    (app, user, conv)
}

async fn say(app: &TestApp, user: &User, conv: &str, text: &str) -> Value {
    let accepted = app.say(user, conv, text).await;
    app.finished(user, accepted["request_id"].as_str().unwrap())
        .await
}

#[tokio::test]
async fn the_nova_request_is_signed_and_shaped_and_the_reply_stored() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path_regex(INVOKE))
        .respond_with(nova_reply("Patience, you must have.", "end_turn"))
        .mount(&server)
        .await;
    let (app, user, conv) = chat_app(&server, false, &[]).await;
    let first = say(&app, &user, &conv, "How do I learn?").await;
    assert_eq!(first["status"], "succeeded", "{first}");
    assert_eq!(first["model"], DEFAULT_MODEL);
    assert_eq!(
        first["usage"],
        json!({ "input_tokens": 42, "output_tokens": 9 })
    );
    assert_eq!(
        first["result"]["message"]["text"],
        "Patience, you must have."
    );
    assert!(
        first["latency_ms"].as_u64().is_some(),
        "latency recorded on the request"
    );
    say(&app, &user, &conv, "And then?").await;
    let metrics = app.adapters.metrics.render();
    assert!(
        metrics.contains(r#"characterbot_model_request_duration_seconds_count{kind="chat",model="amazon.nova-micro-v1:0"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"characterbot_model_tokens_total{kind="chat",model="amazon.nova-micro-v1:0",direction="output"} 18"#));

    let greeting = app.all_messages(&user, &conv).await[0]["text"].clone();
    let sent = server.received_requests().await.unwrap();
    let last = sent.last().unwrap();
    assert!(
        last.url.path().contains("amazon.nova-micro-v1"),
        "{}",
        last.url
    );
    let auth = last.headers.get("authorization").unwrap().to_str().unwrap();
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDTESTKEY/"),
        "{auth}"
    );
    assert!(
        auth.contains("/us-east-1/bedrock/aws4_request"),
        "signed for bedrock: {auth}"
    );
    assert!(auth.contains("SignedHeaders=") && auth.contains("Signature="));
    assert!(last.headers.get("x-amz-date").is_some());
    let body: Value = last.body_json().unwrap();
    assert_eq!(body["schemaVersion"], "messages-v1");
    let system = body["system"][0]["text"].as_str().unwrap();
    assert!(
        system.starts_with("You are Yoda."),
        "persona as system prompt: {system}"
    );
    assert_eq!(
        body["messages"],
        json!([
            // The greeting, after a turn that opens the conversation (Nova wants the user first).
            { "role": "user", "content": [{ "text": "(The conversation begins.)" }] },
            { "role": "assistant", "content": [{ "text": greeting }] },
            { "role": "user", "content": [{ "text": "How do I learn?" }] },
            { "role": "assistant", "content": [{ "text": "Patience, you must have." }] },
            { "role": "user", "content": [{ "text": "And then?" }] },
        ]),
        "the persona is not pasted into a user turn; roles alternate"
    );
    assert_eq!(
        body["inferenceConfig"],
        json!({ "maxTokens": 300, "temperature": 0.7_f32, "topP": 0.9_f32 })
    );
}

#[tokio::test]
async fn throttling_is_retried_and_then_succeeds() {
    let server = MockServer::start().await;
    let calls = Arc::new(Mutex::new(Vec::new()));
    Mock::given(method("POST"))
        .and(path_regex(INVOKE))
        .respond_with(Sequence {
            n: 1,
            first: aws_error(
                429,
                "ThrottlingException",
                "Too many requests, please wait before trying again.",
            ),
            then: nova_reply("Hmm. Now I answer.", "end_turn"),
            calls: calls.clone(),
        })
        .mount(&server)
        .await;
    let (app, user, conv) = chat_app(&server, false, &[]).await;
    let done = say(&app, &user, &conv, "Hello?").await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"]["message"]["text"], "Hmm. Now I answer.");
    assert_eq!(
        calls.lock().unwrap().len(),
        2,
        "one throttled call (the SDK's own retries are off), one retry"
    );
}

#[tokio::test]
async fn a_validation_error_fails_at_once_and_a_filtered_reply_is_not_stored() {
    let server = MockServer::start().await;
    let calls = Arc::new(Mutex::new(Vec::new()));
    let invalid = aws_error(400, "ValidationException", "Malformed input request");
    Mock::given(method("POST"))
        .and(path_regex(INVOKE))
        .respond_with(Sequence {
            n: 1,
            first: invalid.clone(),
            then: nova_reply("blocked text", "content_filtered"),
            calls: calls.clone(),
        })
        .mount(&server)
        .await;
    let (app, user, conv) = chat_app(&server, false, &[]).await;
    let done = say(&app, &user, &conv, "First").await;
    assert_eq!(
        (done["status"].as_str(), done["attempts"].as_u64()),
        (Some("failed"), Some(1))
    );
    assert_eq!(done["error"]["code"], "provider_rejected");
    assert!(done["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Malformed input request"));
    assert_eq!(calls.lock().unwrap().len(), 1);

    let filtered = say(&app, &user, &conv, "Second").await;
    assert_eq!(filtered["status"], "failed");
    assert_eq!(filtered["error"]["code"], "content_filtered");
    let history = app.messages(&user, &conv).await;
    assert!(
        history
            .iter()
            .all(|m| m["role"] == "user" || (m["status"] == "failed" && m["text"] == "")),
        "no reply stored, each failure shown as such: {history:?}"
    );
}

#[tokio::test]
async fn a_streamed_reply_reaches_the_event_stream_in_order_and_is_stored_once() {
    let server = MockServer::start().await;
    let pieces = [
        "Patience",
        ", young ",
        "one",
        ". Much ",
        "to learn",
        ", you still have.",
    ];
    Mock::given(method("POST"))
        .and(path_regex(STREAM))
        .respond_with(common::nova_stream(&pieces, 30, 12))
        .expect(1)
        .mount(&server)
        .await;
    let (app, user, conv) = chat_app(&server, true, &[]).await;
    let sse = app
        .http
        .get(app.url("/v1/events"))
        .bearer_auth(&user.token)
        .send()
        .await
        .unwrap();
    let (_, accepted) = app
        .post(
            Some(&user.token),
            &format!("/v1/conversations/{conv}/messages"),
            json!({ "text": "Teach me" }),
        )
        .await;
    let request_id = accepted["request_id"].as_str().unwrap().to_owned();
    let events = read_sse(sse, Duration::from_secs(20), |name, data| {
        name == "request.updated"
            && data["request_id"] == request_id.as_str()
            && data["status"] == "succeeded"
    })
    .await;
    let streamed: String = events
        .iter()
        .filter(|(n, d)| n == "message.delta" && d["request_id"] == request_id.as_str())
        .map(|(_, d)| d["text"].as_str().unwrap())
        .collect();
    let full = pieces.concat();
    assert_eq!(streamed, full, "deltas in order");
    let (_, done) = events.last().unwrap();
    assert_eq!(done["result"]["message"]["text"], full.as_str());
    assert_eq!(
        done["usage"],
        json!({ "input_tokens": 30, "output_tokens": 12 })
    );
    let history = app.messages(&user, &conv).await;
    assert_eq!(history.len(), 2, "the reply is stored once");
    assert_eq!(history[1]["text"], full.as_str());
    // The poll endpoint is unchanged by streaming.
    let polled = app.finished(&user, &request_id).await;
    assert_eq!(polled["result"]["message"]["text"], full.as_str());
}

#[tokio::test]
async fn nova_writes_the_summary_of_turns_that_fell_out_of_the_context() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path_regex(INVOKE))
        .and(wiremock::matchers::body_string_contains(
            crate::openai::SUMMARY_ASK,
        ))
        .respond_with(nova_reply(
            "The apprentice asked about the Force.",
            "end_turn",
        ))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path_regex(INVOKE))
        .respond_with(nova_reply("Hmm.", "end_turn"))
        .mount(&server)
        .await;
    let (app, user, conv) = chat_app(&server, false, &[("--history-messages", "2")]).await;
    for text in ["What is the Force?", "And the dark side?", "And the Jedi?"] {
        say(&app, &user, &conv, text).await;
    }
    let memory = crate::conversations::memory_until(&app, &user, &conv, |m| {
        m["summary"] == "The apprentice asked about the Force."
    })
    .await;
    assert!(memory["summarized_through"].is_string());
    let asks: Vec<Value> = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
        .filter(|b| {
            b["system"][0]["text"]
                .as_str()
                .unwrap_or("")
                .contains(crate::openai::SUMMARY_ASK)
        })
        .collect();
    let transcript = asks[0]["messages"][0]["content"][0]["text"]
        .as_str()
        .unwrap();
    assert!(
        transcript.contains("User: What is the Force?"),
        "{transcript}"
    );
}
