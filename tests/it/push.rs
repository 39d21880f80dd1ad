//! Push on the AWS backend across processes (issue #11): two `characterbot api` processes and a
//! persona worker on moto. A worker's events reach the streams held by either API through the
//! SNS topic and each API's own inbox queue, with no DynamoDB read per open stream (the APIs'
//! calls go through a counting proxy); an API killed with SIGKILL leaves its inbox behind, and
//! the other removes it; an API stopped with SIGTERM removes its own.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{self, read_sse, Proc, Remote};
use reqwest::StatusCode;
use serde_json::json;

/// A reverse proxy in front of moto that counts the calls through it, by operation and the
/// DynamoDB partitions they name.
#[derive(Clone, Default)]
struct Counts(Arc<Mutex<Vec<(String, String)>>>);

impl Counts {
    /// Calls of `op` (`DynamoDB_20120810.Query`, ...) whose request names `text`.
    fn of(&self, op: &str, text: &str) -> usize {
        let calls = self.0.lock().unwrap();
        calls
            .iter()
            .filter(|(o, body)| o.ends_with(op) && body.contains(text))
            .count()
    }

    fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
}

async fn counting_proxy(upstream: String) -> (String, Counts) {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, Method, Uri};
    let counts = Counts::default();
    let http = reqwest::Client::new();
    let seen = counts.clone();
    let forward = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
        let (http, seen, upstream) = (http.clone(), seen.clone(), upstream.clone());
        async move {
            let op = headers
                .get("x-amz-target")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("query-protocol")
                .to_owned();
            seen.0
                .lock()
                .unwrap()
                .push((op, String::from_utf8_lossy(&body).into_owned()));
            let mut req = http.request(method, format!("{upstream}{uri}"));
            for (name, value) in &headers {
                if name != "host" && name != "content-length" {
                    req = req.header(name, value);
                }
            }
            let res = req.body(body).send().await.unwrap();
            let status = res.status();
            let headers = res.headers().clone();
            let body = res.bytes().await.unwrap_or_default();
            let mut out = axum::response::Response::new(axum::body::Body::from(body));
            *out.status_mut() = status;
            for (name, value) in &headers {
                if name != "content-length" && name != "transfer-encoding" {
                    out.headers_mut().insert(name, value.clone());
                }
            }
            out
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(forward);
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), counts)
}

fn spawn(env: &[(String, String)], port: u16, args: &[&str]) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_characterbot"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env_remove("AWS_PROFILE")
        .env("CHARACTERBOT_LISTEN", format!("127.0.0.1:{port}"))
        .env("CHARACTERBOT_PERSONA_MODEL", "offline")
        .env("CHARACTERBOT_CHAT_MODEL", "offline")
        .env("CHARACTERBOT_OFFLINE_DELAY_MS", "300")
        .env("CHARACTERBOT_RECEIVE_WAIT_SECS", "1")
        // Inboxes are tagged alive every second; one quiet for 3 s is stale (and removed when
        // two sweeps in a row find it so).
        .env("CHARACTERBOT_AWS_INBOX_STALE_SECS", "3")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn characterbot");
    Proc(child)
}

fn signal(p: &Proc, signal: &str) {
    let sent = Command::new("kill")
        .args([signal, &p.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
}

/// The inbox queues of the run (`inbox-{run}-...`) and the topic's subscriptions.
async fn inboxes(run: &str) -> (usize, usize) {
    let sdk = common::aws_test_sdk_config();
    let queues = aws_sdk_sqs::Client::new(&sdk)
        .list_queues()
        .queue_name_prefix(format!("inbox-{run}-"))
        .send()
        .await
        .unwrap()
        .queue_urls()
        .len();
    let sns = aws_sdk_sns::Client::new(&sdk);
    let topic = sns
        .create_topic()
        .name(format!("events-{run}"))
        .send()
        .await
        .unwrap()
        .topic_arn
        .unwrap();
    let subscriptions = sns
        .list_subscriptions_by_topic()
        .topic_arn(topic)
        .send()
        .await
        .unwrap()
        .subscriptions()
        .len();
    (queues, subscriptions)
}

/// Waits (bounded) until the run has `want` inboxes and as many subscriptions.
async fn until_inboxes(run: &str, want: usize) -> (usize, usize) {
    let mut seen = (usize::MAX, usize::MAX);
    for _ in 0..60 {
        seen = inboxes(run).await;
        if seen == (want, want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    seen
}

/// Reads a stream until `request_id` succeeded; the statuses it saw for it.
async fn statuses(sse: reqwest::Response, request_id: &str) -> Vec<String> {
    read_sse(sse, Duration::from_secs(30), |name, data| {
        name == "request.updated"
            && data["request_id"] == request_id
            && data["status"] == "succeeded"
    })
    .await
    .into_iter()
    .filter(|(name, data)| name == "request.updated" && data["request_id"] == request_id)
    .map(|(_, data)| data["status"].as_str().unwrap_or_default().to_owned())
    .collect()
}

#[tokio::test]
async fn a_workers_events_reach_streams_on_two_api_processes_without_polling_per_stream() {
    let pool = common::cognito_pool(false).await;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let direct = common::aws_process_env(&common::moto_endpoint(), &run, &pool);
    common::aws_init_process(&direct);
    // The APIs' calls go through the counting proxy; the worker's straight to moto.
    let (proxy, counts) = counting_proxy(common::moto_endpoint()).await;
    let counted = common::aws_process_env(&proxy, &run, &pool);
    let (port_a, port_b) = (common::free_port(), common::free_port());
    let api_a = spawn(&counted, port_a, &["api"]);
    let mut api_b = spawn(&counted, port_b, &["api"]);
    let _worker = spawn(&direct, common::free_port(), &["worker", "persona"]);
    let mut a = Remote::connect(format!("http://127.0.0.1:{port_a}")).await;
    let mut b = Remote::connect(format!("http://127.0.0.1:{port_b}")).await;
    assert_eq!(until_inboxes(&run, 2).await, (2, 2), "an inbox per API");

    let creds = json!({ "email": "push@example.com", "password": "Correct-Horse-9!" });
    let (status, _) = a.post_public("/v1/auth/signup", creds.clone()).await;
    assert_eq!(status, StatusCode::CREATED);
    let confirm = json!({ "email": "push@example.com", "code": "123456" });
    assert_eq!(
        a.post_public("/v1/auth/confirm", confirm).await.0,
        StatusCode::OK
    );
    a.sign_in(&creds).await;
    b.sign_in(&creds).await;

    // Streams on both APIs, then quiet: no API reads the user's events while nothing happens.
    let (sse_a, sse_b) = (a.events().await, b.events().await);
    // The proxy does see the APIs' calls: opening a stream reads where the user's ids stand.
    assert!(
        counts.of("GetItem", "EVS#") >= 2,
        "the proxy counts the APIs' calls"
    );
    counts.clear();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(counts.of("Query", "EVS#"), 0, "idle streams read nothing");
    assert_eq!(counts.of("GetItem", "EVS#"), 0, "idle streams read nothing");

    let accepted = a
        .post("/v1/personas", json!({ "prompt": "Ada Lovelace" }))
        .await;
    let id = accepted["request_id"].as_str().unwrap().to_owned();
    let (seen_a, seen_b) = tokio::join!(statuses(sse_a, &id), statuses(sse_b, &id));
    for seen in [&seen_a, &seen_b] {
        assert_eq!(
            seen.last().map(String::as_str),
            Some("succeeded"),
            "{seen:?}"
        );
        assert!(seen.contains(&"running".to_owned()), "{seen:?}");
    }
    assert_eq!(
        counts.of("Query", "EVS#"),
        0,
        "the events came through the inboxes, not by reading the table"
    );

    // A long poll on the API that accepted the request reads nothing: it knows the request
    // from its own accept and waits for its update from the inbox. On the other API, the
    // update that passed through its inbox answers it, or one read does.
    counts.clear();
    let accepted = a
        .post("/v1/personas", json!({ "prompt": "Alan Turing" }))
        .await;
    let id = accepted["request_id"].as_str().unwrap().to_owned();
    let done = a.get(&format!("/v1/requests/{id}?wait=20")).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        counts.of("GetItem", &format!("REQ#{id}")),
        0,
        "no read of the request"
    );
    let elsewhere = b.get(&format!("/v1/requests/{id}?wait=20")).await;
    assert_eq!(elsewhere, done);
    assert!(counts.of("GetItem", &format!("REQ#{id}")) <= 1);

    // An API killed outright leaves its inbox; the other one's clean-up removes it.
    signal(&api_a, "-KILL");
    assert_eq!(
        until_inboxes(&run, 1).await,
        (1, 1),
        "the dead API's inbox is gone"
    );
    // The survivor still relays.
    let sse_b = b.events().await;
    let accepted = b
        .post("/v1/personas", json!({ "prompt": "Grace Hopper" }))
        .await;
    let id = accepted["request_id"].as_str().unwrap().to_owned();
    assert_eq!(
        statuses(sse_b, &id).await.last().map(String::as_str),
        Some("succeeded")
    );

    // Stopped cleanly, an API removes its own.
    signal(&api_b, "-TERM");
    for _ in 0..200 {
        if api_b.0.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(inboxes(&run).await, (0, 0), "nothing left behind");
}

/// Reads a stream until it has seen `want` of its user's requests succeed; every event as
/// `(id, request_id, status)` (`status` empty for a delta).
async fn read_until_done(res: reqwest::Response, want: usize) -> Vec<(u64, String, String)> {
    let mut done = 0;
    let events = common::read_sse_with_ids(res, Duration::from_secs(60), |_, data| {
        done += usize::from(data["status"] == "succeeded");
        done == want
    })
    .await;
    events
        .into_iter()
        .map(|(id, _, data)| {
            let status = data["status"].as_str().unwrap_or_default().to_owned();
            let request = data["request_id"].as_str().unwrap().to_owned();
            (id.expect("an id on every event"), request, status)
        })
        .collect()
}

/// Two users with several streams each, on one API: every stream gets all of its user's
/// events and none of the other's, each once, in id order.
async fn each_of_many_streams_gets_its_users_events_once_in_order(app: common::TestApp) {
    const STREAMS: usize = 4;
    const REQUESTS: usize = 3;
    let (ann, bob) = (app.user("ann").await, app.user("bob").await);
    let mut readers = Vec::new();
    for user in [&ann, &bob] {
        for _ in 0..STREAMS {
            let res = app
                .http
                .get(app.url("/v1/events"))
                .bearer_auth(&user.token)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            readers.push((
                user.user_id.clone(),
                tokio::spawn(read_until_done(res, REQUESTS)),
            ));
        }
    }
    let mut mine: std::collections::HashMap<String, Vec<String>> = Default::default();
    for user in [&ann, &bob] {
        for i in 0..REQUESTS {
            let accepted = app.persona_request(user, &format!("Persona {i}")).await;
            mine.entry(user.user_id.clone())
                .or_default()
                .push(accepted["request_id"].as_str().unwrap().to_owned());
        }
    }
    for (user, reader) in readers {
        let seen = reader.await.unwrap();
        let ids: Vec<u64> = seen.iter().map(|e| e.0).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "in order, once: {ids:?}"
        );
        for (_, request, _) in &seen {
            assert!(
                mine[&user].contains(request),
                "another user's event: {request}"
            );
        }
        for request in &mine[&user] {
            let statuses: Vec<&str> = seen
                .iter()
                .filter(|e| &e.1 == request)
                .map(|e| e.2.as_str())
                .collect();
            // An instant job is never marked running (see `workers::start`).
            assert_eq!(statuses, ["succeeded"], "{request}");
        }
    }
}

async fn embedded_app() -> common::TestApp {
    common::TestApp::start().await
}

async fn aws_app() -> common::TestApp {
    common::TestApp::builder().on_aws().start().await
}

contract!(
    embedded_push => embedded_app,
    aws_push => aws_app;
    each_of_many_streams_gets_its_users_events_once_in_order,
);
