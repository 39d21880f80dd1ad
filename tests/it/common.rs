//! The test harness: a whole CharacterBot (API and workers, embedded backend, offline models
//! unless a test brings its own) on a loopback port and a fresh data dir, driven through HTTP.

use std::path::Path;
use std::time::Duration;

use characterbot::cli::{Backend, Settings};
use characterbot::{api_state, consumer, open_ports, Models, Ports};
use clap::Parser;
use reqwest::StatusCode;
use serde_json::{json, Value};
use shared::domain::RequestKind;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    settings: Settings,
}

/// Settings as the binary would parse them from these flags.
pub fn settings(dir: &Path, extra: &[&str]) -> Settings {
    let mut args = vec![
        "characterbot".to_string(),
        "--data-dir".into(),
        dir.display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    // Never a real provider, whatever the developer's environment holds, unless a test asks.
    for flag in ["--persona-model", "--chat-model"] {
        if !extra.contains(&flag) {
            args.extend([flag.to_string(), "offline".into()]);
        }
    }
    // Short long polls, so that stopping a worker at the end of a test is quick on SQS too.
    if !extra.contains(&"--receive-wait-secs") {
        args.extend(["--receive-wait-secs".to_string(), "2".into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Args::try_parse_from(args)
        .expect("test settings parse")
        .settings
}

pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub adapters: Ports,
    pub settings: Settings,
    pub shutdown: CancellationToken,
    pub dir: tempfile::TempDir,
}

pub struct Builder {
    extra: Vec<String>,
    models: Option<Models>,
    workers: bool,
    aws: bool,
}

/// The password of every user that [`TestApp::user`] makes (it meets Cognito's default policy).
pub const PASSWORD: &str = "Correct-Horse-Battery-9";

/// A signed-in user.
#[derive(Clone, Debug)]
pub struct User {
    pub user_id: String,
    pub email: String,
    pub token: String,
    pub tokens: Value,
}

impl Builder {
    pub fn arg(mut self, flag: &str, value: &str) -> Self {
        self.extra.push(flag.into());
        self.extra.push(value.into());
        self
    }

    pub fn models(mut self, models: Models) -> Self {
        self.models = Some(models);
        self
    }

    /// The AWS backend, built as the product builds it (`--backend aws`, `aws-init`, then
    /// `open_ports`): SQS, DynamoDB and Cognito on the moto server of `scripts/test`, with
    /// fresh queues, table and user pool for this app.
    pub fn on_aws(mut self) -> Self {
        self.aws = true;
        self
    }

    /// No workers: requests stay queued (to count what was enqueued).
    pub fn without_workers(mut self) -> Self {
        self.workers = false;
        self
    }

    pub async fn start(self) -> TestApp {
        // `CHARACTERBOT_TEST_LOG=debug scripts/test ...` shows the product's logs.
        if let Ok(filter) = std::env::var("CHARACTERBOT_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut extra = self.extra;
        if self.aws {
            extra.extend(aws_backend_args().await);
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let settings = settings(dir.path(), &extra);
        if self.aws {
            characterbot::aws_init(&settings).await.expect("aws-init");
        }
        let adapters = open_ports(&settings).await.expect("adapters");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let shutdown = CancellationToken::new();
        let state = api_state(&adapters, &settings, shutdown.clone());
        tokio::spawn(async move {
            let _ = ingest_api::serve(listener, state).await;
        });
        let app = TestApp {
            base,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
            adapters,
            settings,
            shutdown,
            dir,
        };
        if self.workers {
            let models = match self.models {
                Some(m) => m,
                None => app.adapters.models.clone(),
            };
            for kind in RequestKind::ALL {
                app.start_worker(kind, &models);
            }
        }
        app
    }
}

impl TestApp {
    pub fn builder() -> Builder {
        Builder {
            extra: Vec::new(),
            models: None,
            workers: true,
            aws: false,
        }
    }

    pub async fn start() -> TestApp {
        Self::builder().start().await
    }

    /// Starts one more worker of `kind`; aborting the handle kills it mid-job, like `kill -9`
    /// (nothing is settled, its messages reappear after the visibility timeout).
    pub fn start_worker(&self, kind: RequestKind, models: &Models) -> JoinHandle<()> {
        self.start_worker_until(kind, models, self.shutdown.clone())
    }

    /// Starts a worker that shuts down gracefully when `stop` is cancelled.
    pub fn start_worker_until(
        &self,
        kind: RequestKind,
        models: &Models,
        stop: CancellationToken,
    ) -> JoinHandle<()> {
        // The ports as built, with the models this worker is given.
        let mut ports = self.adapters.clone();
        ports.models = models.clone();
        let c = consumer(kind, &ports, &self.settings);
        tokio::spawn(c.run(stop))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A new account, signed in through the API: on the AWS backend it is a Cognito account,
    /// confirmed first as a client would (moto takes any code).
    pub async fn user(&self, name: &str) -> User {
        let email = format!("{name}@example.com");
        let credentials = json!({ "email": email, "password": PASSWORD });
        let (status, body) = self
            .post(None, "/v1/auth/signup", credentials.clone())
            .await;
        assert_eq!(status, StatusCode::CREATED, "signup: {body}");
        let user_id = body["user_id"].as_str().expect("user_id").to_owned();
        if self.settings.backend == Backend::Aws {
            let (status, body) = self
                .post(
                    None,
                    "/v1/auth/confirm",
                    json!({ "email": email, "code": "123456" }),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "confirm: {body}");
        }
        let (status, tokens) = self.post(None, "/v1/auth/signin", credentials).await;
        assert_eq!(status, StatusCode::OK, "signin: {tokens}");
        User {
            user_id,
            email,
            token: tokens["access_token"]
                .as_str()
                .expect("access_token")
                .to_owned(),
            tokens,
        }
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let res = req.send().await.expect("request sent");
        let status = res.status();
        let text = res.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, body)
    }

    fn authed(&self, req: reqwest::RequestBuilder, token: Option<&str>) -> reqwest::RequestBuilder {
        match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    pub async fn post(&self, token: Option<&str>, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(
            self.authed(self.http.post(self.url(path)), token)
                .json(&body),
        )
        .await
    }

    pub async fn get(&self, token: Option<&str>, path: &str) -> (StatusCode, Value) {
        self.send(self.authed(self.http.get(self.url(path)), token))
            .await
    }

    pub async fn delete(&self, token: Option<&str>, path: &str) -> (StatusCode, Value) {
        self.send(self.authed(self.http.delete(self.url(path)), token))
            .await
    }

    /// Long-polls a request until it has finished (bounded: 60 s).
    pub async fn finished(&self, user: &User, request_id: &str) -> Value {
        for _ in 0..30 {
            let (status, body) = self
                .get(
                    Some(&user.token),
                    &format!("/v1/requests/{request_id}?wait=2"),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            if matches!(
                body["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return body;
            }
        }
        panic!("request {request_id} did not finish");
    }

    /// Waits (10 s at most) until the request is seen running: a job's start is written only
    /// once it has run a moment (`workers::start`), so a test that kills a worker mid-job
    /// waits for this first.
    pub async fn running(&self, user: &User, request_id: &str) -> Value {
        for _ in 0..200 {
            let (status, body) = self
                .get(Some(&user.token), &format!("/v1/requests/{request_id}"))
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            if body["status"] == "running" {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("request {request_id} was never seen running");
    }

    /// Asks for a persona through the API; the request once finished, whatever its outcome.
    pub async fn persona_request(&self, user: &User, prompt: &str) -> Value {
        let (status, body) = self
            .post(
                Some(&user.token),
                "/v1/personas",
                json!({ "prompt": prompt }),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        self.finished(user, body["request_id"].as_str().unwrap())
            .await
    }

    /// Creates a persona through the API and waits for it.
    pub async fn persona(&self, user: &User, prompt: &str) -> Value {
        let done = self.persona_request(user, prompt).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        done["result"]["persona"].clone()
    }

    /// Creates a conversation with a new persona.
    pub async fn conversation(&self, user: &User, prompt: &str) -> String {
        let persona = self.persona(user, prompt).await;
        let (status, conv) = self
            .post(
                Some(&user.token),
                "/v1/conversations",
                json!({ "persona_id": persona["persona_id"] }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{conv}");
        conv["conversation_id"].as_str().unwrap().to_owned()
    }

    /// Posts a message to a conversation: its `202` answer (`request_id`, `message_id`).
    pub async fn say(&self, user: &User, conversation_id: &str, text: &str) -> Value {
        let (status, body) = self
            .post(
                Some(&user.token),
                &format!("/v1/conversations/{conversation_id}/messages"),
                json!({ "text": text }),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body
    }

    /// A conversation's turns: its messages after the persona's greeting (checked to be
    /// there, first).
    pub async fn messages(&self, user: &User, conversation_id: &str) -> Vec<Value> {
        let mut all = self.all_messages(user, conversation_id).await;
        assert!(
            all.first()
                .is_some_and(|g| g["role"] == "assistant" && g.get("request_id").is_none()),
            "a conversation begins with its greeting: {all:?}"
        );
        all.remove(0);
        all
    }

    /// Every message of a conversation, its greeting first (up to 100).
    pub async fn all_messages(&self, user: &User, conversation_id: &str) -> Vec<Value> {
        let (status, body) = self
            .get(
                Some(&user.token),
                &format!("/v1/conversations/{conversation_id}/messages?limit=100"),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["items"].as_array().unwrap().clone()
    }

    pub async fn queue_total(&self, kind: RequestKind) -> u64 {
        let s = self.adapters.queue(kind).stats().await.unwrap();
        s.visible + s.in_flight + s.dead
    }
}

/// Reads server-sent events from a response until `until` says stop or the time runs out.
pub async fn read_sse(
    res: reqwest::Response,
    limit: Duration,
    until: impl FnMut(&str, &Value) -> bool,
) -> Vec<(String, Value)> {
    read_sse_with_ids(res, limit, until)
        .await
        .into_iter()
        .map(|(_, name, data)| (name, data))
        .collect()
}

/// [`read_sse`], each event with its `id:`.
pub async fn read_sse_with_ids(
    res: reqwest::Response,
    limit: Duration,
    mut until: impl FnMut(&str, &Value) -> bool,
) -> Vec<(Option<u64>, String, Value)> {
    use futures::StreamExt;
    let mut stream = res.bytes_stream();
    let mut buf = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let chunk = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(c))) => c,
            _ => return events,
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut id, mut name, mut data) = (None, String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if name.is_empty() {
                continue; // comment or keep-alive
            }
            let value: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
            let stop = until(&name, &value);
            events.push((id, name, value));
            if stop {
                return events;
            }
        }
    }
}

/// A fake provider's answers: `first` for the first `n` calls, `then` afterwards; records when
/// each call arrived.
pub struct Sequence {
    pub n: usize,
    pub first: wiremock::ResponseTemplate,
    pub then: wiremock::ResponseTemplate,
    pub calls: std::sync::Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
}

impl wiremock::Respond for Sequence {
    fn respond(&self, _: &wiremock::Request) -> wiremock::ResponseTemplate {
        let mut calls = self.calls.lock().unwrap();
        calls.push(std::time::Instant::now());
        if calls.len() <= self.n {
            self.first.clone()
        } else {
            self.then.clone()
        }
    }
}

/// The moto server that `scripts/test` starts. Panics with instructions when the tests were not
/// started that way.
pub fn moto_endpoint() -> String {
    std::env::var("CHARACTERBOT_TEST_AWS_ENDPOINT").expect(
        "CHARACTERBOT_TEST_AWS_ENDPOINT is not set: run the tests with `scripts/test`, which starts the moto server",
    )
}

/// Points this process's standard AWS configuration chain at moto: `AWS_ENDPOINT_URL`, a region
/// and test credentials, as a deployment's environment points it at AWS. The product takes its
/// endpoint, region and credentials from nothing else (`open_ports`, `aws_init`), so the
/// harness sets them here: once per test binary, to the same values for every test, before the
/// first app on the AWS backend reads them (std's environment lock orders these writes against
/// every read through `std::env`, the SDK's and `Command`'s included). Processes that tests
/// start inherit them; each test that starts `characterbot` names its models, so `auto` never
/// picks Bedrock because of these credentials.
fn point_aws_environment_at_moto() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        for (name, value) in [
            ("AWS_ENDPOINT_URL", moto_endpoint()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ] {
            std::env::set_var(name, value);
        }
    });
}

/// The settings of the AWS backend on moto, as an operator gives them: this app's own table and
/// queues (so that tests stay apart), a fresh Cognito user pool and app client, the pool's keys
/// from moto, and `REFRESH_TOKEN_AUTH` for renewals (moto lacks `GetTokensFromRefreshToken`).
async fn aws_backend_args() -> Vec<String> {
    point_aws_environment_at_moto();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let pool = cognito_pool(false).await;
    let jwks_url = format!("{}/{}/.well-known/jwks.json", moto_endpoint(), pool.pool_id);
    [
        ("--backend", "aws".to_string()),
        ("--table", format!("characterbot-{run}")),
        ("--persona-queue", format!("persona-{run}")),
        ("--chat-queue", format!("chat-{run}.fifo")),
        // A topic and inbox names of its own: inbox clean-up never meets another test's.
        ("--events-topic", format!("events-{run}")),
        ("--inbox-prefix", format!("inbox-{run}-")),
        ("--cognito-user-pool-id", pool.pool_id),
        ("--cognito-client-id", pool.client_id),
        ("--jwks-url", jwks_url),
        ("--cognito-refresh", "initiate-auth".into()),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_string(), value])
    .collect()
}

/// The environment of a `characterbot` process on the AWS backend on moto (at `endpoint`: moto
/// itself, or a proxy in front of it), with resources named after `run` and the Cognito pool.
pub fn aws_process_env(endpoint: &str, run: &str, pool: &CognitoPool) -> Vec<(String, String)> {
    let moto = moto_endpoint();
    [
        ("CHARACTERBOT_BACKEND", "aws".to_string()),
        ("AWS_ENDPOINT_URL", endpoint.to_owned()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("CHARACTERBOT_AWS_TABLE", format!("drill-{run}")),
        ("CHARACTERBOT_AWS_PERSONA_QUEUE", format!("persona-{run}")),
        ("CHARACTERBOT_AWS_CHAT_QUEUE", format!("chat-{run}.fifo")),
        ("CHARACTERBOT_AWS_EVENTS_TOPIC", format!("events-{run}")),
        ("CHARACTERBOT_AWS_INBOX_PREFIX", format!("inbox-{run}-")),
        ("CHARACTERBOT_COGNITO_USER_POOL_ID", pool.pool_id.clone()),
        ("CHARACTERBOT_COGNITO_CLIENT_ID", pool.client_id.clone()),
        (
            "CHARACTERBOT_JWKS_URL",
            format!("{moto}/{}/.well-known/jwks.json", pool.pool_id),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Runs `characterbot aws-init` in `env` (see [`aws_process_env`]), as an operator would.
pub fn aws_init_process(env: &[(String, String)]) {
    let init = std::process::Command::new(env!("CARGO_BIN_EXE_characterbot"))
        .arg("aws-init")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env_remove("AWS_PROFILE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("spawn characterbot aws-init");
    assert!(init.success(), "aws-init");
}

/// An AWS event bus on moto, on `table`, announcing on a topic of its own (`topic` names it:
/// buses of one test share it) with inboxes named `inbox-{topic}-...`.
pub async fn aws_event_bus(
    table: &str,
    topic: &str,
    stale_after: Duration,
) -> std::sync::Arc<shared::events::aws::AwsEventBus> {
    aws_event_bus_waiting(table, topic, stale_after, Duration::from_secs(20)).await
}

/// [`aws_event_bus`] whose inbox's receives wait at most `wait`.
pub async fn aws_event_bus_waiting(
    table: &str,
    topic: &str,
    stale_after: Duration,
    wait: Duration,
) -> std::sync::Arc<shared::events::aws::AwsEventBus> {
    use shared::events::aws::{AwsEventBus, InboxOptions, Topic};
    let sdk = aws_test_sdk_config();
    let topic = Topic::resolve_topic(aws_sdk_sns::Client::new(&sdk), topic)
        .await
        .expect("events topic");
    let inbox = InboxOptions {
        prefix: format!(
            "inbox-{}-",
            topic.arn().rsplit(':').next().unwrap_or_default()
        ),
        stale_after,
        wait,
    };
    std::sync::Arc::new(AwsEventBus::new(
        aws_sdk_dynamodb::Client::new(&sdk),
        table,
        topic,
        aws_sdk_sqs::Client::new(&sdk),
        inbox,
    ))
}

/// AWS SDK configuration for the moto server that `scripts/test` starts: its endpoint, a fixed
/// region and fake credentials. Panics with instructions when the tests were not started that way.
pub fn aws_test_sdk_config() -> aws_config::SdkConfig {
    sdk_config_at(&moto_endpoint())
}

/// An SDK configuration with test credentials that sends every call to `endpoint` (moto, a
/// fake, or a server that never answers).
pub fn sdk_config_at(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::SharedCredentialsProvider::new(
            aws_sdk_sqs::config::Credentials::new("testing", "testing", None, None, "test"),
        ))
        .endpoint_url(endpoint)
        .build()
}

pub async fn aws_test_config() -> aws_sdk_sqs::Config {
    aws_sdk_sqs::Config::from(&aws_test_sdk_config())
}

/// A chat model that tells when a call starts and then never answers (a worker stuck in a
/// provider call, to be killed or shut down).
pub struct Hangs(pub std::sync::Arc<tokio::sync::Notify>);

#[async_trait::async_trait]
impl shared::models::ChatModel for Hangs {
    fn model(&self) -> &str {
        "hangs"
    }

    async fn reply(
        &self,
        _: &shared::models::ChatRequest,
        _: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    ) -> shared::Result<shared::models::ModelOutput<String>> {
        self.0.notify_one();
        std::future::pending().await
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `GET {base}/readyz` answers 200 (bounded: 20 s).
pub async fn wait_ready(http: &reqwest::Client, base: &str) {
    for _ in 0..200 {
        if http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{base} did not become ready");
}

/// One event-stream frame carrying a Nova stream chunk, as Bedrock sends it.
fn nova_frame(chunk: Value) -> Vec<u8> {
    use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
    use base64::Engine;
    let payload =
        json!({ "bytes": base64::engine::general_purpose::STANDARD.encode(chunk.to_string()) });
    let message = Message::new(payload.to_string().into_bytes())
        .add_header(Header::new(
            ":message-type",
            HeaderValue::String("event".into()),
        ))
        .add_header(Header::new(
            ":event-type",
            HeaderValue::String("chunk".into()),
        ))
        .add_header(Header::new(
            ":content-type",
            HeaderValue::String("application/json".into()),
        ));
    let mut out = Vec::new();
    aws_smithy_eventstream::frame::write_message_to(&message, &mut out).unwrap();
    out
}

/// Bedrock's answer to `invoke-with-response-stream` for Nova: the reply in `pieces`, then the
/// stop reason and the token usage, as event-stream frames.
pub fn nova_stream(
    pieces: &[&str],
    input_tokens: u32,
    output_tokens: u32,
) -> wiremock::ResponseTemplate {
    let mut body = nova_frame(json!({ "messageStart": { "role": "assistant" } }));
    for p in pieces {
        body.extend(nova_frame(
            json!({ "contentBlockDelta": { "delta": { "text": p }, "contentBlockIndex": 0 } }),
        ));
    }
    body.extend(nova_frame(
        json!({ "contentBlockStop": { "contentBlockIndex": 0 } }),
    ));
    body.extend(nova_frame(
        json!({ "messageStop": { "stopReason": "end_turn" } }),
    ));
    body.extend(nova_frame(json!({ "metadata": { "usage": {
        "inputTokens": input_tokens, "outputTokens": output_tokens } } })));
    wiremock::ResponseTemplate::new(200)
        .insert_header("content-type", "application/vnd.amazon.eventstream")
        .set_body_bytes(body)
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh Cognito user pool on the moto server, with an app client that allows
/// `USER_PASSWORD_AUTH` and `REFRESH_TOKEN_AUTH` (and has a secret if asked).
pub struct CognitoPool {
    pub idp: aws_sdk_cognitoidentityprovider::Client,
    pub pool_id: String,
    pub client_id: String,
    pub client_secret: Option<String>,
}

pub async fn cognito_pool(with_secret: bool) -> CognitoPool {
    use aws_sdk_cognitoidentityprovider::types::ExplicitAuthFlowsType;
    let idp = aws_sdk_cognitoidentityprovider::Client::new(&aws_test_sdk_config());
    let pool_id = idp
        .create_user_pool()
        .pool_name(format!("pool-{}", uuid::Uuid::new_v4().simple()))
        .send()
        .await
        .unwrap()
        .user_pool
        .and_then(|p| p.id)
        .unwrap();
    let client = idp
        .create_user_pool_client()
        .user_pool_id(&pool_id)
        .client_name("mobile")
        .generate_secret(with_secret)
        .explicit_auth_flows(ExplicitAuthFlowsType::AllowUserPasswordAuth)
        .explicit_auth_flows(ExplicitAuthFlowsType::AllowRefreshTokenAuth)
        .send()
        .await
        .unwrap()
        .user_pool_client
        .unwrap();
    CognitoPool {
        idp,
        pool_id,
        client_id: client.client_id.unwrap(),
        client_secret: client.client_secret,
    }
}

/// A client of a CharacterBot running in other processes, reached only over HTTP.
pub struct Remote {
    pub http: reqwest::Client,
    pub base: String,
    /// The access token of the signed-in user; empty until `sign_in`.
    pub token: String,
}

impl Remote {
    /// Waits until the API at `base` is ready.
    pub async fn connect(base: String) -> Remote {
        let http = reqwest::Client::new();
        wait_ready(&http, &base).await;
        Remote {
            http,
            base,
            token: String::new(),
        }
    }

    /// `POST` without a token; the status and the body.
    pub async fn post_public(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let res = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = res.status();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// Signs in and keeps the access token for the calls that follow.
    pub async fn sign_in(&mut self, creds: &Value) {
        let (status, tokens) = self.post_public("/v1/auth/signin", creds.clone()).await;
        assert_eq!(status, StatusCode::OK, "{tokens}");
        self.token = tokens["access_token"]
            .as_str()
            .expect("an access token")
            .to_owned();
    }

    /// Sends `req` with the user's token; the JSON body of the answer.
    async fn call(&self, req: reqwest::RequestBuilder) -> Value {
        req.bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        self.call(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    pub async fn get(&self, path: &str) -> Value {
        self.call(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    /// Long-polls a request until it succeeded or failed (bounded: 100 s).
    pub async fn finished(&self, request_id: &str) -> Value {
        for _ in 0..20 {
            let r = self.get(&format!("/v1/requests/{request_id}?wait=5")).await;
            if r["status"] == "succeeded" || r["status"] == "failed" {
                return r;
            }
        }
        panic!("request {request_id} did not finish");
    }

    /// Opens the event stream (token in the header).
    pub async fn events(&self) -> reqwest::Response {
        let res = self
            .http
            .get(format!("{}/v1/events", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        res
    }
}

/// A claim of an idempotency key as the contract tests write it, times in milliseconds.
pub fn key_claim<'a>(
    user_id: &'a str,
    key: &'a str,
    fingerprint: &'a str,
    lock_ms: u64,
    ttl_ms: u64,
) -> shared::store::KeyClaim<'a> {
    shared::store::KeyClaim {
        user_id,
        key,
        fingerprint,
        lock: Duration::from_millis(lock_ms),
        ttl: Duration::from_millis(ttl_ms),
    }
}

/// A stored idempotency answer.
pub fn stored(code: u16, body: &str) -> shared::store::StoredAnswer {
    shared::store::StoredAnswer {
        code,
        body: body.into(),
    }
}

/// The offline persona engine with `chat` as the chat model.
pub fn with_chat(chat: std::sync::Arc<dyn shared::models::ChatModel>) -> Models {
    Models {
        persona: std::sync::Arc::new(shared::models::offline::OfflinePersonaModel::default()),
        chat,
    }
}
