//! The crash drill of issue #8: chat messages from many conversations, each client retrying a
//! failed send with the same `Idempotency-Key`, while `characterbot serve` is killed with
//! SIGKILL several times and restarted — on the embedded backend (same data dir) and on the AWS
//! backend (SQS, DynamoDB and Cognito on the moto server of `scripts/test`). Accepting a message
//! is one step (records, job and the key's answer together; on AWS the job through a DynamoDB
//! outbox that a sweep sends if the sender died), so afterwards:
//! - every accepted turn has exactly one user message and exactly one reply (no orphan, no twin);
//! - no key is stuck: every send was eventually answered `202`;
//! - a retry with a key returns the first answer (same request and message ids).

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{self, Proc};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::Mutex;

/// How big a drill is.
struct Size {
    conversations: usize,
    messages_per_conversation: usize,
    kills: usize,
}

/// `characterbot serve` with `env`, on `port`.
fn serve(env: &[(String, String)], port: u16) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_characterbot"))
        .arg("serve")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env_remove("AWS_PROFILE")
        .env("CHARACTERBOT_LISTEN", format!("127.0.0.1:{port}"))
        .env("CHARACTERBOT_RATE_LIMIT_PER_MINUTE", "0")
        .env("CHARACTERBOT_OFFLINE_DELAY_MS", "20")
        // Jobs a killed process held come back quickly.
        .env("CHARACTERBOT_VISIBILITY_TIMEOUT_SECS", "2")
        // What the drill checks is loss and duplication, not the attempt limit: with a 2 s
        // visibility on a loaded machine (a CI run), a heartbeat late past it hands a job to a
        // second worker, and each such start counts an attempt, as each kill does.
        .env("CHARACTERBOT_MAX_RECEIVES", "20")
        .env("CHARACTERBOT_IDEMPOTENCY_LOCK_SECS", "2")
        .env("CHARACTERBOT_OUTBOX_SWEEP_AFTER_SECS", "1")
        .env("CHARACTERBOT_RECEIVE_WAIT_SECS", "1")
        .env("CHARACTERBOT_PERSONA_MODEL", "offline")
        .env("CHARACTERBOT_CHAT_MODEL", "offline")
        .env("RUST_LOG", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn characterbot");
    Proc(child)
}

/// What a client learned from its send: the request and message ids of the `202`.
#[derive(Debug, Clone, PartialEq)]
struct Sent {
    key: String,
    request_id: String,
    message_id: String,
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    /// Sends that had to be tried again (server down, 5xx, key in use).
    retries: AtomicUsize,
    /// Sends answered `202` so far.
    accepted: AtomicUsize,
}

impl Client {
    async fn post(
        &self,
        path: &str,
        body: &Value,
        key: Option<&str>,
    ) -> reqwest::Result<(StatusCode, Value)> {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body);
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        let res = req.send().await?;
        let status = res.status();
        Ok((status, res.json().await.unwrap_or(Value::Null)))
    }

    async fn get(&self, path: &str) -> reqwest::Result<Value> {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?
            .json()
            .await
    }

    /// Sends one message, retrying with the same key through refused connections, `5xx` and
    /// `409 idempotency_key_in_use` (the first attempt died holding the key), for up to 60 s.
    async fn send(&self, conv: &str, text: &str, key: &str) -> Sent {
        let path = format!("/v1/conversations/{conv}/messages");
        let body = json!({ "text": text });
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            match self.post(&path, &body, Some(key)).await {
                Ok((StatusCode::ACCEPTED, b)) => {
                    self.accepted.fetch_add(1, Ordering::Relaxed);
                    return Sent {
                        key: key.to_owned(),
                        request_id: b["request_id"].as_str().unwrap().to_owned(),
                        message_id: b["message_id"].as_str().unwrap().to_owned(),
                    };
                }
                Ok((status, b)) => assert!(
                    status.is_server_error() || status == StatusCode::CONFLICT,
                    "unexpected answer {status}: {b}"
                ),
                Err(_) => {} // the server is down: retry
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            assert!(
                Instant::now() < give_up,
                "a send with key {key} was never accepted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Waits for the restarted server. Generous: on AWS it reconnects to moto and checks its
/// queues and table first, on a CI machine busy with other tests (the fuzzer, the browser);
/// the drill checks losses and duplicates, not start-up time (10 s was once too short there).
async fn wait_up(http: &reqwest::Client, base: &str) {
    for _ in 0..2400 {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status() == StatusCode::OK {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("characterbot did not come up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_serve_mid_load_loses_no_turn_and_stores_none_twice() {
    let dir = tempfile::tempdir().unwrap();
    let env = vec![(
        "CHARACTERBOT_DATA_DIR".to_string(),
        dir.path().display().to_string(),
    )];
    let drill = Drill::start(env, |http, base| async move {
        let creds = json!({ "email": "drill@example.com", "password": "a long password" });
        let status = post_public(&http, &base, "/v1/auth/signup", &creds).await;
        assert_eq!(status, StatusCode::CREATED);
        sign_in(&http, &base, &creds).await
    })
    .await;
    let size = Size {
        conversations: 8,
        messages_per_conversation: 50,
        kills: 3,
    };
    drill.run(size).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_serve_on_aws_mid_load_loses_no_turn_and_stores_none_twice() {
    let pool = common::cognito_pool(false).await;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let env = common::aws_process_env(&common::moto_endpoint(), &run, &pool);
    common::aws_init_process(&env);
    let drill = Drill::start(env, |http, base| async move {
        let creds = json!({ "email": "drill@example.com", "password": "Correct-Horse-9!" });
        let status = post_public(&http, &base, "/v1/auth/signup", &creds).await;
        assert_eq!(status, StatusCode::CREATED);
        let confirm = json!({ "email": "drill@example.com", "code": "123456" });
        let status = post_public(&http, &base, "/v1/auth/confirm", &confirm).await;
        assert_eq!(status, StatusCode::OK);
        sign_in(&http, &base, &creds).await
    })
    .await;
    // Smaller: every step is a round trip to the emulator.
    let size = Size {
        conversations: 4,
        messages_per_conversation: 15,
        kills: 2,
    };
    drill.run(size).await;
}

/// `POST` without a token; the status.
async fn post_public(http: &reqwest::Client, base: &str, path: &str, body: &Value) -> StatusCode {
    http.post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap()
        .status()
}

async fn sign_in(http: &reqwest::Client, base: &str, creds: &Value) -> String {
    let tokens: Value = http
        .post(format!("{base}/v1/auth/signin"))
        .json(creds)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    tokens["access_token"].as_str().unwrap().to_owned()
}

/// A `characterbot serve` that the drill kills and restarts, and a signed-in client of it.
struct Drill {
    env: Vec<(String, String)>,
    port: u16,
    server: Arc<Mutex<Proc>>,
    client: Arc<Client>,
}

impl Drill {
    /// Starts the server and signs a user in with `sign_up_and_in` (which returns the token).
    async fn start<F, Fut>(env: Vec<(String, String)>, sign_up_and_in: F) -> Drill
    where
        F: FnOnce(reqwest::Client, String) -> Fut,
        Fut: std::future::Future<Output = String>,
    {
        let port = common::free_port();
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let server = Arc::new(Mutex::new(serve(&env, port)));
        wait_up(&http, &base).await;
        let token = sign_up_and_in(http.clone(), base.clone()).await;
        let client = Arc::new(Client {
            http,
            base,
            token,
            retries: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
        });
        Drill {
            env,
            port,
            server,
            client,
        }
    }

    async fn run(self, size: Size) {
        let Drill {
            env,
            port,
            server,
            client,
        } = self;
        let (http, base) = (client.http.clone(), client.base.clone());
        let (_, accepted) = client
            .post(
                "/v1/personas",
                &json!({ "prompt": "Sherlock Holmes" }),
                None,
            )
            .await
            .unwrap();
        let request_id = accepted["request_id"].as_str().unwrap();
        let persona = client
            .get(&format!("/v1/requests/{request_id}?wait=20"))
            .await
            .unwrap();
        let persona_id = persona["result"]["persona"]["persona_id"].clone();
        let mut conversations = Vec::new();
        for _ in 0..size.conversations {
            let (status, conv) = client
                .post(
                    "/v1/conversations",
                    &json!({ "persona_id": persona_id }),
                    None,
                )
                .await
                .unwrap();
            assert_eq!(status, StatusCode::CREATED, "{conv}");
            conversations.push(conv["conversation_id"].as_str().unwrap().to_owned());
        }

        // The load: each conversation sends its messages one after another.
        let mut senders = tokio::task::JoinSet::new();
        for conv in conversations.clone() {
            let client = client.clone();
            let per_conversation = size.messages_per_conversation;
            senders.spawn(async move {
                let mut sent = Vec::new();
                for i in 0..per_conversation {
                    let key = uuid::Uuid::new_v4().to_string();
                    sent.push(client.send(&conv, &format!("Question {i}?"), &key).await);
                }
                (conv, sent)
            });
        }
        // The crashes: SIGKILL, then a restart on the same data dir, a few times mid-load (after
        // a quarter, half and three quarters of the messages were accepted).
        let killer = {
            let (server, env, http, base, client) = (
                server.clone(),
                env.clone(),
                http.clone(),
                base.clone(),
                client.clone(),
            );
            let (kills, total) = (
                size.kills,
                size.conversations * size.messages_per_conversation,
            );
            tokio::spawn(async move {
                for k in 1..=kills {
                    while client.accepted.load(Ordering::Relaxed) < total * k / (kills + 1) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    let mut s = server.lock().await;
                    let _ = s.0.kill();
                    let _ = s.0.wait();
                    *s = serve(&env, port);
                    drop(s);
                    wait_up(&http, &base).await;
                }
            })
        };
        let mut sent: HashMap<String, Vec<Sent>> = HashMap::new();
        while let Some(done) = senders.join_next().await {
            let (conv, s) = done.unwrap();
            sent.insert(conv, s);
        }
        killer.await.unwrap();
        assert!(
            client.retries.load(Ordering::Relaxed) > 0,
            "the kills hit the load: some sends had to be retried"
        );

        // Every accepted turn is answered: its request succeeds.
        for turns in sent.values() {
            for s in turns {
                let mut record = Value::Null;
                for _ in 0..20 {
                    record = client
                        .get(&format!("/v1/requests/{}?wait=5", s.request_id))
                        .await
                        .unwrap();
                    if record["status"] == "succeeded" || record["status"] == "failed" {
                        break;
                    }
                }
                assert_eq!(record["status"], "succeeded", "an orphan? {record}");
            }
        }
        // Exactly one user message and one reply per accepted turn, in order, nothing else.
        for (conv, turns) in &sent {
            let mut items = Vec::new();
            let mut next: Option<String> = None;
            loop {
                let page = match &next {
                    Some(t) => client
                        .get(&format!(
                            "/v1/conversations/{conv}/messages?limit=100&next_token={t}"
                        ))
                        .await
                        .unwrap(),
                    None => client
                        .get(&format!("/v1/conversations/{conv}/messages?limit=100"))
                        .await
                        .unwrap(),
                };
                items.extend(page["items"].as_array().unwrap().iter().cloned());
                match page["next_token"].as_str() {
                    Some(t) => next = Some(t.to_owned()),
                    None => break,
                }
            }
            assert_eq!(items[0]["role"], "assistant", "the greeting");
            items.remove(0);
            assert_eq!(
                items.len(),
                2 * turns.len(),
                "one message and one reply per turn"
            );
            let user_ids: Vec<&str> = items
                .iter()
                .filter(|m| m["role"] == "user")
                .map(|m| m["message_id"].as_str().unwrap())
                .collect();
            let expected: Vec<&str> = turns.iter().map(|s| s.message_id.as_str()).collect();
            assert_eq!(user_ids, expected, "each accepted message once, in order");
            let roles: HashSet<(usize, &str)> = items
                .iter()
                .enumerate()
                .map(|(i, m)| (i % 2, m["role"].as_str().unwrap()))
                .collect();
            assert_eq!(
                roles,
                HashSet::from([(0, "user"), (1, "assistant")]),
                "each message followed by its reply"
            );
        }
        // A retry with the same key returns the first answer.
        for turns in sent.values() {
            for s in turns.iter().step_by(10) {
                let conv = sent
                    .iter()
                    .find(|(_, t)| t.contains(s))
                    .map(|(c, _)| c.clone())
                    .unwrap();
                let again = client
                    .send(
                        &conv,
                        &format!("Question {}?", turns.iter().position(|t| t == s).unwrap()),
                        &s.key,
                    )
                    .await;
                assert_eq!(&again, s, "the replayed answer is the first one");
            }
        }
    }
}
