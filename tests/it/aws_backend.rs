//! `CHARACTERBOT_BACKEND=aws` by configuration alone: `characterbot aws-init` creates the table
//! and queues, then `characterbot api`, `worker persona` and `worker chat` run as separate
//! processes on SQS, DynamoDB (records and events) and Cognito — all on the moto server of
//! `scripts/test`, reached through the standard `AWS_ENDPOINT_URL`, with chat answered by Bedrock
//! Nova through the real SDK against a local fake of its streaming wire format. The flow goes
//! through HTTP, with the event stream fed by workers in other processes.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{self, read_sse, Proc, Remote};
use reqwest::StatusCode;
use serde_json::json;
use wiremock::matchers::{header_regex, method, path_regex};
use wiremock::{Mock, MockServer};

const REPLY: [&str; 4] = ["Fly, ", "you ", "fools", "!"];

#[tokio::test]
async fn the_product_runs_on_sqs_dynamodb_and_cognito_as_separate_processes() {
    let endpoint = std::env::var("CHARACTERBOT_TEST_AWS_ENDPOINT").expect("run with scripts/test");
    let common::CognitoPool {
        pool_id, client_id, ..
    } = common::cognito_pool(false).await;
    let bedrock = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path_regex(
            r"^/model/amazon\.nova-micro-v1(:|%3A)0/invoke-with-response-stream$",
        ))
        .and(header_regex(
            "authorization",
            "^AWS4-HMAC-SHA256 .*/bedrock/aws4_request",
        ))
        .respond_with(common::nova_stream(&REPLY, 50, 4))
        .expect(1)
        .mount(&bedrock)
        .await;

    let run = uuid::Uuid::new_v4().simple().to_string();
    let port = common::free_port();
    let env: Vec<(&str, String)> = vec![
        ("CHARACTERBOT_BACKEND", "aws".into()),
        ("AWS_ENDPOINT_URL", endpoint.clone()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("CHARACTERBOT_AWS_TABLE", format!("cb-{run}")),
        ("CHARACTERBOT_AWS_PERSONA_QUEUE", format!("persona-{run}")),
        ("CHARACTERBOT_AWS_CHAT_QUEUE", format!("chat-{run}.fifo")),
        ("CHARACTERBOT_COGNITO_USER_POOL_ID", pool_id.clone()),
        ("CHARACTERBOT_COGNITO_CLIENT_ID", client_id.clone()),
        (
            "CHARACTERBOT_JWKS_URL",
            format!("{endpoint}/{pool_id}/.well-known/jwks.json"),
        ),
        ("CHARACTERBOT_LISTEN", format!("127.0.0.1:{port}")),
        ("CHARACTERBOT_PERSONA_MODEL", "offline".into()),
        // Chat on Bedrock through the real SDK, answered by a local fake of its wire format
        // (moto's own Bedrock answers `{}`).
        ("CHARACTERBOT_CHAT_MODEL", "bedrock".into()),
        ("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", bedrock.uri()),
        ("CHARACTERBOT_OFFLINE_DELAY_MS", "300".into()),
        ("CHARACTERBOT_RECEIVE_WAIT_SECS", "2".into()),
        ("RUST_LOG", "warn".into()),
    ];
    let command = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_characterbot"));
        c.args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env_remove("AWS_PROFILE");
        c.stdout(Stdio::null()).stderr(Stdio::null());
        c
    };
    let init = tokio::task::spawn_blocking({
        let mut c = command(&["aws-init"]);
        move || c.status().unwrap()
    })
    .await
    .unwrap();
    assert!(init.success(), "aws-init");

    let _api = Proc(command(&["api"]).spawn().unwrap());
    let _persona = Proc(command(&["worker", "persona"]).spawn().unwrap());
    let _chat = Proc(command(&["worker", "chat"]).spawn().unwrap());
    let mut client = Remote::connect(format!("http://127.0.0.1:{port}")).await;

    let creds = json!({ "email": "ada@example.com", "password": "Correct-Horse-9!" });
    let (status, _) = client.post_public("/v1/auth/signup", creds.clone()).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = client.post_public("/v1/auth/signin", creds.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "not confirmed yet");
    let (status, _) = client
        .post_public(
            "/v1/auth/confirm",
            json!({ "email": "ada@example.com", "code": "123456" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    client.sign_in(&creds).await; // a Cognito access token
    let unauth = client
        .http
        .get(format!("{}/v1/personas", client.base))
        .bearer_auth("forged.token.here")
        .send()
        .await
        .unwrap();
    assert_eq!(unauth.status(), StatusCode::UNAUTHORIZED);

    let sse = client.events().await;
    let accepted = client
        .post("/v1/personas", json!({ "prompt": "Gandalf" }))
        .await;
    let persona_request = accepted["request_id"].as_str().unwrap().to_owned();
    let done = client.finished(&persona_request).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"]["persona"]["name"], "Gandalf");
    let conv = client
        .post(
            "/v1/conversations",
            json!({ "persona_id": done["result"]["persona"]["persona_id"] }),
        )
        .await;
    let conv_id = conv["conversation_id"].as_str().unwrap().to_owned();
    let messages = format!("/v1/conversations/{conv_id}/messages");
    let msg = client
        .post(&messages, json!({ "text": "Shall we go?" }))
        .await;
    let chat_request = msg["request_id"].as_str().unwrap().to_owned();
    let reply = client.finished(&chat_request).await;
    assert_eq!(reply["status"], "succeeded", "{reply}");
    assert_eq!(reply["model"], "amazon.nova-micro-v1:0");
    assert_eq!(reply["result"]["message"]["text"], REPLY.concat());
    assert_eq!(
        reply["usage"],
        json!({ "input_tokens": 50, "output_tokens": 4 })
    );

    // Pushed across processes through DynamoDB: the persona's and the reply's changes, and the
    // reply's fragments, in order.
    let events = read_sse(sse, Duration::from_secs(20), |name, data| {
        name == "request.updated"
            && data["request_id"] == chat_request.as_str()
            && data["status"] == "succeeded"
    })
    .await;
    let persona_states: Vec<_> = events
        .iter()
        .filter(|(n, d)| n == "request.updated" && d["request_id"] == persona_request.as_str())
        .map(|(_, d)| d["status"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(persona_states, ["running", "succeeded"]);
    let streamed: String = events
        .iter()
        .filter(|(n, d)| n == "message.delta" && d["request_id"] == chat_request.as_str())
        .map(|(_, d)| d["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        streamed,
        reply["result"]["message"]["text"].as_str().unwrap()
    );
    let history = client.get(&messages).await;
    assert_eq!(
        history["items"].as_array().unwrap().len(),
        3,
        "the greeting, the message, its reply"
    );
}
