//! The split deployment on one machine: `characterbot api`, `characterbot worker persona` and
//! `characterbot worker chat` as separate processes sharing a data dir. Events cross process
//! boundaries to the API's SSE stream; a chat worker killed with SIGKILL mid-job is replaced
//! and the message still gets exactly one reply; SIGTERM shuts every process down cleanly.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{self, read_sse, Proc, Remote};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn spawn(dir: &std::path::Path, port: u16, args: &[&str]) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_characterbot"))
        .args(args)
        .env("CHARACTERBOT_DATA_DIR", dir)
        .env("CHARACTERBOT_LISTEN", format!("127.0.0.1:{port}"))
        .env("CHARACTERBOT_OFFLINE_DELAY_MS", "1500")
        .env("CHARACTERBOT_VISIBILITY_TIMEOUT_SECS", "2")
        .env("RUST_LOG", "warn")
        .env("CHARACTERBOT_PERSONA_MODEL", "offline")
        .env("CHARACTERBOT_CHAT_MODEL", "offline")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn characterbot");
    Proc(child)
}

fn terminate(p: &mut Proc) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &p.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    for _ in 0..200 {
        if let Some(s) = p.0.try_wait().expect("wait") {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("process did not exit after SIGTERM");
}

#[tokio::test]
async fn api_and_workers_as_separate_processes_survive_a_killed_worker() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let mut api = spawn(dir.path(), port, &["api"]);
    let mut client = Remote::connect(format!("http://127.0.0.1:{port}")).await;
    let mut persona_worker = spawn(dir.path(), port, &["worker", "persona"]);
    let chat_worker = spawn(dir.path(), port, &["worker", "chat"]);

    let creds = json!({ "email": "pat@example.com", "password": "a long password" });
    let (status, _) = client.post_public("/v1/auth/signup", creds.clone()).await;
    assert_eq!(status, StatusCode::CREATED);
    client.sign_in(&creds).await;
    // The browser form of authentication on the event stream.
    let sse = client
        .http
        .get(format!(
            "{}/v1/events?access_token={}",
            client.base, client.token
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), StatusCode::OK);

    let accepted = client
        .post("/v1/personas", json!({ "prompt": "Yoda" }))
        .await;
    let persona = client
        .finished(accepted["request_id"].as_str().unwrap())
        .await;
    assert_eq!(persona["status"], "succeeded", "{persona}");
    let conv = client
        .post(
            "/v1/conversations",
            json!({ "persona_id": persona["result"]["persona"]["persona_id"] }),
        )
        .await;
    let conv_id = conv["conversation_id"].as_str().unwrap().to_owned();

    // A first message streams its reply, fragment by fragment, across processes.
    let messages = format!("/v1/conversations/{conv_id}/messages");
    let first = client.post(&messages, json!({ "text": "Teach me" })).await;
    let first_id = first["request_id"].as_str().unwrap().to_owned();
    let events = read_sse(sse, Duration::from_secs(30), |name, data| {
        name == "request.updated"
            && data["request_id"] == first_id.as_str()
            && data["status"] == "succeeded"
    })
    .await;
    let deltas: String = events
        .iter()
        .filter(|(n, d)| n == "message.delta" && d["request_id"] == first_id.as_str())
        .map(|(_, d)| d["text"].as_str().unwrap())
        .collect();
    let (last_name, last) = events.last().expect("events arrived");
    assert_eq!(last_name, "request.updated");
    assert_eq!(
        last["result"]["message"]["text"].as_str().unwrap(),
        deltas,
        "deltas add up to the stored reply, in order"
    );

    // A second message: the chat worker is killed while writing the reply.
    let second = client.post(&messages, json!({ "text": "Again" })).await;
    let second_id = second["request_id"].as_str().unwrap().to_owned();
    let mut running = false;
    for _ in 0..100 {
        let r = client.get(&format!("/v1/requests/{second_id}")).await;
        if r["status"] == "running" {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(running, "the job started");
    drop(chat_worker); // SIGKILL
    let mut replacement = spawn(dir.path(), port, &["worker", "chat"]);
    let done = client.finished(&second_id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 2);
    let history = client.get(&messages).await;
    let roles: Vec<&str> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        ["assistant", "user", "assistant", "user", "assistant"],
        "the greeting, then exactly one reply per message"
    );

    for p in [&mut replacement, &mut persona_worker, &mut api] {
        assert!(terminate(p).success(), "clean exit on SIGTERM");
    }
}

/// With `CHARACTERBOT_METRICS_EMF_INTERVAL_SECS`, the metrics reach stdout as CloudWatch
/// Embedded Metric Format lines: what the process counted, with its labels as dimensions, and a
/// last flush on shutdown.
#[tokio::test]
async fn metrics_are_written_to_stdout_in_embedded_metric_format() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_characterbot"))
        .arg("serve")
        .env("CHARACTERBOT_DATA_DIR", dir.path())
        .env("CHARACTERBOT_LISTEN", format!("127.0.0.1:{port}"))
        .env("CHARACTERBOT_PERSONA_MODEL", "offline")
        .env("CHARACTERBOT_CHAT_MODEL", "offline")
        .env("CHARACTERBOT_METRICS_EMF_INTERVAL_SECS", "3600")
        .env("CHARACTERBOT_METRICS_EMF_NAMESPACE", "CharacterBotTest")
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn characterbot");
    let mut serve = Proc(child);
    let http = reqwest::Client::new();
    common::wait_ready(&http, &base).await;
    for _ in 0..3 {
        let res = http
            .get(format!("{base}/v1/personas"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    }
    // The interval is an hour: what comes out is the flush on shutdown.
    assert!(terminate(&mut serve).success());
    let mut stdout = String::new();
    std::io::Read::read_to_string(serve.0.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let docs: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|d| d.get("_aws").is_some())
        .collect();
    let unauthorized = docs
        .iter()
        .find(|d| d["route"] == "/v1/personas" && d["status"] == "401")
        .unwrap_or_else(|| panic!("no EMF document for the 401s in {stdout}"));
    assert_eq!(unauthorized["characterbot_http_requests_total"], 3.0);
    let directive = &unauthorized["_aws"]["CloudWatchMetrics"][0];
    assert_eq!(directive["Namespace"], "CharacterBotTest");
    assert!(directive["Dimensions"][0]
        .as_array()
        .unwrap()
        .contains(&json!("route")));
}
