//! The OpenAI persona agent and chat provider, driven through the real `async-openai` client
//! against a local server that speaks the Chat Completions wire format. No test leaves the
//! machine.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{Sequence, TestApp};
use serde_json::{json, Value};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn completion(content: Value, finish_reason: &str) -> Value {
    json!({
        "id": "chatcmpl-test", "object": "chat.completion", "created": 1_700_000_000,
        "model": "gpt-4o-mini",
        "choices": [{ "index": 0, "message": content, "finish_reason": finish_reason }],
        "usage": { "prompt_tokens": 120, "completion_tokens": 80, "total_tokens": 200 }
    })
}

fn persona_json() -> String {
    json!({
        "name": "Captain Whiskers",
        "description": "A grumpy pirate captain who sails with a crew of cats.",
        "personality": "Gruff, proud, secretly tender with his cats.",
        "speaking_style": "Salty pirate slang with many a grumble.",
        "greeting": "Arr, state yer business, and mind the cats.",
        "source": "original"
    })
    .to_string()
}

fn ok_persona() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(completion(
        json!({ "role": "assistant", "content": persona_json(), "refusal": null }),
        "stop",
    ))
}

async fn server_answering(
    first: ResponseTemplate,
    n: usize,
    then: ResponseTemplate,
) -> (MockServer, Arc<Mutex<Vec<Instant>>>) {
    let server = MockServer::start().await;
    let calls = Arc::new(Mutex::new(Vec::new()));
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(Sequence {
            n,
            first,
            then,
            calls: calls.clone(),
        })
        .mount(&server)
        .await;
    (server, calls)
}

async fn app_on(server: &MockServer, extra: &[(&str, &str)]) -> TestApp {
    let base = format!("{}/v1", server.uri());
    let mut b = TestApp::builder()
        .arg("--persona-model", "openai")
        .arg("--openai-api-key", "test-key")
        .arg("--openai-base-url", &base)
        .arg("--retry-base-ms", "10")
        .arg("--retry-max-ms", "50");
    for (k, v) in extra {
        b = b.arg(k, v);
    }
    b.start().await
}

#[tokio::test]
async fn a_structured_persona_is_requested_with_a_strict_schema_and_stored() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(header("authorization", "Bearer test-key"))
        .respond_with(ok_persona())
        .expect(1)
        .mount(&server)
        .await;
    let app = app_on(&server, &[]).await;
    let alice = app.user("alice").await;
    let done = app
        .persona_request(&alice, "a grumpy pirate who loves cats")
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["model"], "gpt-4o-mini");
    assert_eq!(
        done["usage"],
        json!({ "input_tokens": 120, "output_tokens": 80 })
    );
    let persona = &done["result"]["persona"];
    assert_eq!(persona["name"], "Captain Whiskers");
    assert_eq!(persona["source"], "original");
    assert_eq!(persona["model"], "gpt-4o-mini");

    let sent = server.received_requests().await.unwrap();
    let body: Value = sent[0].body_json().unwrap();
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["messages"][0]["role"], "system");
    assert_eq!(
        body["messages"][1],
        json!({ "role": "user", "content": "a grumpy pirate who loves cats" })
    );
    let format = &body["response_format"];
    assert_eq!(format["type"], "json_schema");
    assert_eq!(format["json_schema"]["strict"], true);
    let schema = &format["json_schema"]["schema"];
    assert_eq!(schema["type"], "object");
    assert_eq!(schema["additionalProperties"], false);
    let mut required: Vec<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    required.sort();
    assert_eq!(
        required,
        [
            "description",
            "greeting",
            "name",
            "personality",
            "source",
            "speaking_style"
        ]
    );
    assert!(
        schema.get("$schema").is_none(),
        "strict mode rejects unsupported keywords"
    );
    let metrics = app.adapters.metrics.render();
    assert!(metrics.contains(r#"characterbot_model_tokens_total{kind="persona",model="gpt-4o-mini",direction="input"} 120"#), "{metrics}");
}

#[tokio::test]
async fn a_refusal_fails_the_request_with_the_models_reason() {
    let refusal = ResponseTemplate::new(200).set_body_json(completion(
        json!({ "role": "assistant", "content": null, "refusal": "I can't help with that request." }),
        "stop",
    ));
    let (server, calls) = server_answering(refusal.clone(), usize::MAX, refusal).await;
    let app = app_on(&server, &[]).await;
    let alice = app.user("alice").await;
    let done = app.persona_request(&alice, "something unacceptable").await;
    assert_eq!(done["status"], "failed");
    assert_eq!(
        done["error"],
        json!({ "code": "persona_refused", "message": "I can't help with that request." })
    );
    assert_eq!(calls.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn output_that_does_not_match_the_schema_is_retried_once_then_fails() {
    let bad = ResponseTemplate::new(200).set_body_json(completion(
        json!({ "role": "assistant", "content": "{\"name\": \"Half a persona\"", "refusal": null }),
        "stop",
    ));
    let (server, calls) = server_answering(bad.clone(), usize::MAX, bad).await;
    let app = app_on(&server, &[]).await;
    let alice = app.user("alice").await;
    let done = app.persona_request(&alice, "a poet").await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["error"]["code"], "invalid_model_output");
    assert_eq!(
        calls.lock().unwrap().len(),
        2,
        "asked once more, then gave up"
    );
    // A truncated answer is its own failure.
    let cut = ResponseTemplate::new(200).set_body_json(completion(
        json!({ "role": "assistant", "content": "{\"name\": \"Cut", "refusal": null }),
        "length",
    ));
    let (server, _) = server_answering(cut.clone(), usize::MAX, cut).await;
    let app = app_on(&server, &[]).await;
    let bob = app.user("bob").await;
    let done = app.persona_request(&bob, "a poet").await;
    assert_eq!(done["error"]["code"], "model_output_truncated");
}

#[tokio::test]
async fn throttling_with_retry_after_is_waited_out_and_then_succeeds() {
    let throttled = ResponseTemplate::new(429)
        .insert_header("retry-after", "2")
        .set_body_json(json!({ "error": { "message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded" } }));
    let (server, calls) = server_answering(throttled, 1, ok_persona()).await;
    let app = app_on(&server, &[]).await;
    let alice = app.user("alice").await;
    let done = app.persona_request(&alice, "a grumpy pirate").await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        done["attempts"], 1,
        "retried in-process, not through the queue"
    );
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), 2);
    let waited = calls[1] - calls[0];
    assert!(
        waited >= Duration::from_secs(2),
        "Retry-After honoured: waited {waited:?}"
    );
}

#[tokio::test]
async fn server_errors_are_retried_then_dead_lettered() {
    let failing = ResponseTemplate::new(500)
        .set_body_json(json!({ "error": { "message": "The server had an error" } }));
    let (server, calls) = server_answering(failing.clone(), usize::MAX, failing).await;
    let app = app_on(
        &server,
        &[("--max-receives", "2"), ("--inprocess-retries", "1")],
    )
    .await;
    let alice = app.user("alice").await;
    let done = app.persona_request(&alice, "a knight").await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["attempts"], 2);
    assert_eq!(done["error"]["code"], "model_unavailable");
    assert!(done["error"]["message"]
        .as_str()
        .unwrap()
        .contains("The server had an error"));
    assert_eq!(
        calls.lock().unwrap().len(),
        4,
        "2 deliveries × (1 call + 1 in-process retry)"
    );
    for _ in 0..100 {
        if !app
            .adapters
            .persona_queue
            .dead_letters(10)
            .await
            .unwrap()
            .is_empty()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not dead-lettered");
}

#[tokio::test]
async fn a_rejected_key_fails_at_once() {
    let denied = ResponseTemplate::new(401).set_body_json(
        json!({ "error": { "message": "Incorrect API key provided", "code": "invalid_api_key" } }),
    );
    let (server, calls) = server_answering(denied.clone(), usize::MAX, denied).await;
    let app = app_on(&server, &[]).await;
    let alice = app.user("alice").await;
    let done = app.persona_request(&alice, "a knight").await;
    assert_eq!(
        (done["status"].as_str(), done["attempts"].as_u64()),
        (Some("failed"), Some(1))
    );
    assert_eq!(done["error"]["code"], "provider_auth_failed");
    assert!(done["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Incorrect API key"));
    assert_eq!(calls.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn openai_as_chat_provider_gets_the_persona_as_system_message_and_the_history() {
    let server = MockServer::start().await;
    // Persona calls carry a response_format; chat calls do not.
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(wiremock::matchers::body_partial_json(
            json!({ "response_format": { "type": "json_schema" } }),
        ))
        .respond_with(ok_persona())
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(
            json!({ "role": "assistant", "content": "Arr, the cats be fine.", "refusal": null }),
            "stop",
        )))
        .mount(&server)
        .await;
    let app = app_on(&server, &[("--chat-model", "openai")]).await;
    let alice = app.user("alice").await;
    let conv = app
        .conversation(&alice, "a grumpy pirate who loves cats")
        .await;
    for text in ["How are the cats?", "And the ship?"] {
        let (_, accepted) = app
            .post(
                Some(&alice.token),
                &format!("/v1/conversations/{conv}/messages"),
                json!({ "text": text }),
            )
            .await;
        let done = app
            .finished(&alice, accepted["request_id"].as_str().unwrap())
            .await;
        assert_eq!(done["result"]["message"]["text"], "Arr, the cats be fine.");
        assert_eq!(done["result"]["message"]["model"], "gpt-4o-mini");
    }
    let sent = server.received_requests().await.unwrap();
    let last: Value = sent.last().unwrap().body_json().unwrap();
    let messages = last["messages"].as_array().unwrap();
    assert_eq!(messages[0]["role"], "system");
    assert!(messages[0]["content"]
        .as_str()
        .unwrap()
        .contains("You are Captain Whiskers"));
    let turns: Vec<(&str, &str)> = messages[1..]
        .iter()
        .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(
        turns,
        [
            ("assistant", "Arr, state yer business, and mind the cats."),
            ("user", "How are the cats?"),
            ("assistant", "Arr, the cats be fine."),
            ("user", "And the ship?")
        ]
    );
    assert!(last.get("response_format").is_none());
}

/// Both providers' summaries, through their wire formats: what the memory job asks for.
pub(crate) const SUMMARY_ASK: &str = "running summary";

#[tokio::test]
async fn openai_writes_the_summary_of_turns_that_fell_out_of_the_context() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(wiremock::matchers::body_partial_json(
            json!({ "response_format": { "type": "json_schema" } }),
        ))
        .respond_with(ok_persona())
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(wiremock::matchers::body_string_contains(SUMMARY_ASK))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(
            json!({ "role": "assistant", "content": "The user asked after the cats and the ship.", "refusal": null }),
            "stop",
        )))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion(
            json!({ "role": "assistant", "content": "Arr.", "refusal": null }),
            "stop",
        )))
        .mount(&server)
        .await;
    let app = app_on(
        &server,
        &[("--chat-model", "openai"), ("--history-messages", "2")],
    )
    .await;
    let alice = app.user("alice").await;
    let conv = app
        .conversation(&alice, "a grumpy pirate who loves cats")
        .await;
    for text in ["How are the cats?", "And the ship?", "And the crew?"] {
        let accepted = app.say(&alice, &conv, text).await;
        app.finished(&alice, accepted["request_id"].as_str().unwrap())
            .await;
    }
    let memory = crate::conversations::memory_until(&app, &alice, &conv, |m| {
        m["summary"] == "The user asked after the cats and the ship."
    })
    .await;
    assert!(memory["summarized_through"].is_string());
    // Asked of the chat model, with the turns that dropped as a transcript.
    let asked: Vec<Value> = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter_map(|r| r.body_json::<Value>().ok())
        .filter(|b| {
            b["messages"][0]["content"]
                .as_str()
                .unwrap_or("")
                .contains(SUMMARY_ASK)
        })
        .collect();
    let ask = &asked[0];
    assert_eq!(ask["model"], "gpt-4o-mini");
    let transcript = ask["messages"][1]["content"].as_str().unwrap();
    assert!(
        transcript.contains("User: How are the cats?"),
        "{transcript}"
    );
}
