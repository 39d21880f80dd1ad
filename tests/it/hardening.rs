//! What an attacker without an account can do to the API, bounded: password guessing is locked
//! out per account and per address, and a flood of sign-ins waits for a few hashing threads or
//! is turned away with `503`, never piling up memory.

use std::time::Duration;

use crate::common::{self, TestApp};
use reqwest::StatusCode;
use serde_json::json;

/// A sign-in's status, error code and `Retry-After` (seconds).
async fn sign_in(app: &TestApp, email: &str, password: &str) -> (StatusCode, String, Option<u64>) {
    let res = app
        .http
        .post(app.url("/v1/auth/signin"))
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .expect("sent");
    let status = res.status();
    let retry_after = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let body: serde_json::Value = res.json().await.unwrap_or_default();
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (status, code, retry_after)
}

#[tokio::test]
async fn password_guessing_locks_the_account_out_then_lets_its_owner_back_in() {
    let app = TestApp::builder().without_workers().start().await;
    let carol = app.user("carol").await;
    // Five failures are free; the sixth starts a lockout of one second.
    for i in 0..6 {
        let (status, code, _) = sign_in(&app, &carol.email, "wrong password").await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::UNAUTHORIZED, "unauthorized"),
            "try {i}"
        );
    }
    let (status, code, retry_after) = sign_in(&app, &carol.email, "wrong password").await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "too_many_attempts")
    );
    let wait = retry_after.expect("Retry-After");
    assert!((1..=2).contains(&wait), "{wait}");
    // Locked out means not tried: even the right password waits.
    let (status, _, _) = sign_in(&app, &carol.email, common::PASSWORD).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // Another account from the same address is not locked out.
    let dave = app.user("dave").await;
    let (status, _, _) = sign_in(&app, &dave.email, common::PASSWORD).await;
    assert_eq!(status, StatusCode::OK);

    tokio::time::sleep(Duration::from_secs(wait)).await;
    let (status, _, _) = sign_in(&app, &carol.email, common::PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "after the wait the owner gets in");
    // And the success cleared the count: a typo is a plain 401 again.
    let (status, _, _) = sign_in(&app, &carol.email, "wrong password").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn guessing_across_accounts_locks_the_address_out() {
    let app = TestApp::builder()
        .without_workers()
        .arg("--auth-failures-per-address", "3")
        .start()
        .await;
    let erin = app.user("erin").await;
    for i in 0..4 {
        let (status, _, _) = sign_in(&app, &format!("guess{i}@example.com"), "password1").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, code, retry_after) = sign_in(&app, "guess9@example.com", "password1").await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "too_many_attempts")
    );
    assert!(retry_after.is_some());
    // The address is locked, whoever it tries.
    let (status, _, _) = sign_in(&app, &erin.email, common::PASSWORD).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn a_refresh_token_guessed_at_is_locked_out() {
    let app = TestApp::builder().without_workers().start().await;
    for i in 0..6 {
        let (status, _) = app
            .post(
                None,
                "/v1/auth/refresh",
                json!({ "refresh_token": "guessed" }),
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "try {i}");
    }
    let (status, body) = app
        .post(
            None,
            "/v1/auth/refresh",
            json!({ "refresh_token": "guessed" }),
        )
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
}

#[tokio::test]
async fn a_flood_of_sign_ins_is_bounded_by_the_hashing_threads() {
    // No lockouts here, so that every attempt reaches the password check.
    let app = TestApp::builder()
        .without_workers()
        .arg("--auth-failures-per-account", "0")
        .arg("--auth-failures-per-address", "0")
        .arg("--auth-hash-threads", "1")
        .start()
        .await;
    let frank = app.user("frank").await;
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..40 {
        let (http, url) = (app.http.clone(), app.url("/v1/auth/signin"));
        flood.spawn(async move {
            let res = http
                .post(url)
                .json(
                    &json!({ "email": format!("nobody{i}@example.com"), "password": "password1" }),
                )
                .send()
                .await
                .expect("sent");
            (res.status(), res.headers().contains_key("retry-after"))
        });
    }
    let (mut refused, mut busy) = (0, 0);
    while let Some(r) = flood.join_next().await {
        match r.unwrap() {
            (StatusCode::UNAUTHORIZED, _) => refused += 1,
            (StatusCode::SERVICE_UNAVAILABLE, true) => busy += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    // One thread and a queue of four: most of the burst is turned away at once.
    assert!(refused >= 1 && busy >= 30, "401: {refused}, 503: {busy}");
    let (status, _, _) = sign_in(&app, &frank.email, common::PASSWORD).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the owner signs in once the flood is over"
    );
}

#[tokio::test]
async fn data_files_are_readable_by_the_service_alone() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let db = shared::sqlite::Db::open(&data).await.unwrap();
    db.write(|c| {
        c.execute_batch("CREATE TABLE probe (x); INSERT INTO probe VALUES (1);")?;
        Ok(())
    })
    .await
    .unwrap();
    shared::auth::local::SigningKey::load_or_create(&data.join("keys")).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "the data dir");
    assert_eq!(mode(&data.join("keys")), 0o700, "the keys dir");
    for file in [
        "characterbot.db",
        "characterbot.db-wal",
        "characterbot.db-shm",
    ] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
}

#[tokio::test]
async fn a_request_id_that_is_not_a_plain_id_is_replaced() {
    let app = TestApp::builder().without_workers().start().await;
    let id_of = |value: &str| {
        let req = app
            .http
            .get(app.url("/healthz"))
            .header("x-request-id", value);
        async move {
            let res = req.send().await.unwrap();
            res.headers()["x-request-id"].to_str().unwrap().to_owned()
        }
    };
    assert_eq!(
        id_of("mobile-7f3a.2_b").await,
        "mobile-7f3a.2_b",
        "a plain id is kept"
    );
    for forged in ["a b", "user=admin level=error", &"x".repeat(65), "id\tx"] {
        let got = id_of(forged).await;
        assert_ne!(got, forged);
        assert!(!got.is_empty() && got.len() <= 64, "{got}");
    }
}

#[tokio::test]
async fn unknown_methods_share_one_metric_label_and_responses_are_hardened() {
    let app = TestApp::builder().without_workers().start().await;
    for i in 0..20 {
        let method = reqwest::Method::from_bytes(format!("PROBE{i}").as_bytes()).unwrap();
        app.http
            .request(method, app.url("/v1/personas"))
            .send()
            .await
            .unwrap();
    }
    let res = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
    let metrics = res.text().await.unwrap();
    assert!(!metrics.contains("PROBE"), "attacker text became labels");
    assert!(metrics.contains("method=\"other\""), "{metrics}");

    // Token answers are not to be cached; a refused token's answer names no library detail.
    let user = app.user("gina").await;
    let res = app
        .http
        .post(app.url("/v1/auth/signin"))
        .json(&json!({ "email": user.email, "password": common::PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let alg_none = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.";
    let (status, body) = app.get(Some(alg_none), "/v1/personas").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let message = body["error"]["message"].as_str().unwrap();
    assert_eq!(message, "malformed token", "{body}");
}

/// Reads until the server closes the connection; what it sent, or `None` if it kept the
/// connection open for `patience`.
async fn read_until_closed(
    stream: &mut tokio::net::TcpStream,
    patience: Duration,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(patience, read).await.ok()?;
    Some(String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test]
async fn slow_and_idle_clients_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::builder()
        .without_workers()
        .arg("--header-read-timeout-secs", "1")
        .arg("--body-read-timeout-secs", "1")
        .start()
        .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let patience = Duration::from_secs(5);

    // Connected, sends nothing.
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    assert!(
        read_until_closed(&mut idle, patience).await.is_some(),
        "an idle connection stayed open"
    );

    // Half its headers, then silence.
    let mut half = tokio::net::TcpStream::connect(&addr).await.unwrap();
    half.write_all(b"POST /v1/auth/signin HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut half, patience).await.is_some(),
        "half-sent headers held the connection"
    );

    // One request answered, then kept alive with nothing more.
    let mut kept = tokio::net::TcpStream::connect(&addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answered = read_until_closed(&mut kept, patience)
        .await
        .expect("a kept-alive idle connection stayed open");
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");

    // Headers promise a body that never comes.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(
        b"POST /v1/auth/signin HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"email\":",
    )
    .await
    .unwrap();
    let answered = read_until_closed(&mut slow, patience)
        .await
        .expect("a never-arriving body held the connection");
    assert!(answered.starts_with("HTTP/1.1 408"), "{answered}");
    assert!(answered.contains("request_timeout"), "{answered}");
}

#[tokio::test]
async fn a_refusal_of_the_requests_form_does_not_use_up_its_idempotency_key() {
    let app = TestApp::builder().without_workers().start().await;
    let user = app.user("hana").await;
    let post = |content_type: &'static str, body: &'static str| {
        app.http
            .post(app.url("/v1/personas"))
            .bearer_auth(&user.token)
            .header("idempotency-key", "order-1")
            .header("content-type", content_type)
            .body(body)
    };
    let (status, _) = app.send(post("text/plain", "Sherlock Holmes")).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (status, _) = app.send(post("application/json", "{\"prompt\": ")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Fixed, with the same key: accepted, and from then on replayed.
    let fixed = "{\"prompt\": \"Sherlock Holmes\"}";
    let (status, first) = app.send(post("application/json", fixed)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let (status, again) = app.send(post("application/json", fixed)).await;
    assert_eq!((status, again), (StatusCode::ACCEPTED, first));
}

#[tokio::test]
async fn a_user_holds_a_bounded_number_of_streams_and_a_stream_ends_in_time() {
    let app = TestApp::builder()
        .without_workers()
        .arg("--max-streams-per-user", "3")
        .arg("--stream-max-secs", "2")
        .start()
        .await;
    let ivy = app.user("ivy").await;
    let open = || {
        app.http
            .get(app.url("/v1/events"))
            .bearer_auth(&ivy.token)
            .send()
    };
    let mut streams = Vec::new();
    for _ in 0..3 {
        let res = open().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        streams.push(res);
    }
    let res = open().await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_streams");
    // A long poll counts too.
    let (status, _) = app.get(Some(&ivy.token), "/v1/requests/req_x?wait=1").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // Another user is not affected.
    let jon = app.user("jon").await;
    let res = app
        .http
        .get(app.url("/v1/events"))
        .bearer_auth(&jon.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    // Closing one gives its slot back.
    drop(streams.pop());
    let mut reopened = None;
    for _ in 0..50 {
        let res = open().await.unwrap();
        if res.status() == StatusCode::OK {
            reopened = Some(res);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reopened = reopened.expect("the slot came back");

    // Every stream ends cleanly after its lifetime (2 s here), and its slot comes back.
    let ended = tokio::time::timeout(Duration::from_secs(10), reopened.bytes()).await;
    assert!(
        matches!(ended, Ok(Ok(_))),
        "the stream did not end: {ended:?}"
    );
    drop(streams);
    let mut back = false;
    for _ in 0..50 {
        if open().await.unwrap().status() == StatusCode::OK {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back);
}

#[tokio::test]
async fn connections_past_the_limit_are_closed_at_once() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::builder()
        .without_workers()
        .arg("--max-connections", "2")
        .start()
        .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        // Half a request: the connection is open and counted, and not yet timed out.
        c.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        held.push(c);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
    extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut extra, Duration::from_secs(5))
        .await
        .expect("the extra connection was held open");
    assert!(answer.is_empty(), "it was served: {answer}");
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let res = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "served again once others closed"
    );
}

#[tokio::test]
async fn metrics_can_live_on_an_address_of_their_own() {
    let app = TestApp::builder()
        .without_workers()
        .arg("--metrics-listen", "127.0.0.1:0")
        .start()
        .await;
    let (status, _) = app.get(None, "/metrics").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not on the public listener");
    let state = characterbot::api_state(
        &app.adapters,
        &app.settings,
        tokio_util::sync::CancellationToken::new(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(ingest_api::serve_metrics(listener, state));
    let res = app
        .http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let text = res.text().await.unwrap();
    assert!(text.contains("# TYPE"), "{text}");
}

#[tokio::test]
async fn a_client_that_sends_its_whole_large_body_first_reads_a_413() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::builder().without_workers().start().await;
    let user = app.user("kim").await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let body = vec![b'x'; 5 * 1024 * 1024];
    let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/personas HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        user.token,
        body.len()
    );
    c.write_all(head.as_bytes()).await.unwrap();
    c.write_all(&body).await.expect("the whole body is taken");
    let answer = read_until_closed(&mut c, Duration::from_secs(10))
        .await
        .expect("answered and closed");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
}

/// A refresh's status and, on success, the new tokens.
async fn refresh(app: &TestApp, token: &str) -> (StatusCode, serde_json::Value) {
    app.post(None, "/v1/auth/refresh", json!({ "refresh_token": token }))
        .await
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_reused_one_ends_its_session() {
    let app = TestApp::builder().without_workers().start().await;
    let lee = app.user("lee").await;
    let first = lee.tokens["refresh_token"].as_str().unwrap().to_owned();
    let (status, next) = refresh(&app, &first).await;
    assert_eq!(status, StatusCode::OK);
    let second = next["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(second, first, "a refresh hands out a new refresh token");
    let (status, next) = refresh(&app, &second).await;
    assert_eq!(status, StatusCode::OK);
    let third = next["refresh_token"].as_str().unwrap().to_owned();

    // The first token comes back (copied by someone): refused, and the session is over for
    // the holder of its newest token too.
    let (status, body) = refresh(&app, &first).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _) = refresh(&app, &third).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Signing in starts a new session.
    let again = app
        .post(
            None,
            "/v1/auth/signin",
            json!({ "email": lee.email, "password": common::PASSWORD }),
        )
        .await;
    assert_eq!(again.0, StatusCode::OK);
}

#[tokio::test]
async fn signing_out_ends_the_session_and_sessions_are_capped() {
    let app = TestApp::builder()
        .without_workers()
        .arg("--max-sessions-per-user", "2")
        .start()
        .await;
    let max = app.user("max").await;
    let sign_in = || async {
        let (status, tokens) = app
            .post(
                None,
                "/v1/auth/signin",
                json!({ "email": max.email, "password": common::PASSWORD }),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        tokens["refresh_token"].as_str().unwrap().to_owned()
    };
    // `user()` signed in once; two more sign-ins: the first session is the one that ends.
    let oldest = max.tokens["refresh_token"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let middle = sign_in().await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let newest = sign_in().await;
    assert_eq!(refresh(&app, &oldest).await.0, StatusCode::UNAUTHORIZED);
    let (status, next) = refresh(&app, &middle).await;
    assert_eq!(status, StatusCode::OK);
    let middle = next["refresh_token"].as_str().unwrap().to_owned();

    // Signing out ends that session only, and says nothing about unknown tokens.
    let (status, _) = app
        .post(None, "/v1/auth/signout", json!({ "refresh_token": middle }))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(refresh(&app, &middle).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(refresh(&app, &newest).await.0, StatusCode::OK);
    let (status, _) = app
        .post(
            None,
            "/v1/auth/signout",
            json!({ "refresh_token": "unknown" }),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn an_aws_call_to_a_server_that_never_answers_ends_at_its_deadline() {
    // Accepts connections and reads, never answers: a hung endpoint.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", hung.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = hung.accept().await {
            held.push(conn);
        }
    });
    let sdk = common::sdk_config_at(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let settings = common::settings(
        dir.path(),
        &[
            "--aws-attempt-timeout-secs",
            "1",
            "--aws-operation-timeout-secs",
            "2",
            "--receive-wait-secs",
            "1",
        ],
    );
    let clients = characterbot::AwsClients::new(&sdk, &settings);
    // Each call ends by itself, with an error, at its deadline (2 s; SQS's 1 s more for its
    // receive wait): the outer bound only keeps a regression from hanging the test run.
    let bound = Duration::from_secs(30);
    let dynamo = tokio::time::timeout(bound, clients.dynamo.list_tables().send()).await;
    assert!(matches!(dynamo, Ok(Err(_))), "DynamoDB call hung");
    let cognito = clients.cognito.list_user_pools().max_results(1).send();
    let cognito = tokio::time::timeout(bound, cognito).await;
    assert!(matches!(cognito, Ok(Err(_))), "Cognito call hung");
    let sqs = tokio::time::timeout(bound, clients.sqs.list_queues().send()).await;
    assert!(matches!(sqs, Ok(Err(_))), "SQS call hung");
}

/// A fake of SQS's JSON protocol: finds queues, and answers `SendMessageBatch` with the entries
/// `fail` picks (given the call's number and the entry's body) as failed, `SenderFault` as it says.
struct FakeSqs {
    url: String,
    fail: fn(usize, &str) -> Option<bool>,
    calls: std::sync::atomic::AtomicUsize,
    sent: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl wiremock::Respond for FakeSqs {
    fn respond(&self, request: &wiremock::Request) -> wiremock::ResponseTemplate {
        let target = request.headers["x-amz-target"].to_str().unwrap_or_default();
        let req: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        let answer = if target.ends_with("GetQueueUrl") {
            let name = req["QueueName"].as_str().unwrap_or_default();
            json!({ "QueueUrl": format!("{}/queue/{name}", self.url) })
        } else {
            let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (mut ok, mut failed) = (Vec::new(), Vec::new());
            for e in req["Entries"].as_array().unwrap() {
                let id = e["Id"].as_str().unwrap();
                let text = e["MessageBody"].as_str().unwrap();
                match (self.fail)(call, text) {
                    Some(sender_fault) => failed.push(json!({
                        "Id": id, "SenderFault": sender_fault,
                        "Code": "InternalError", "Message": "try again"
                    })),
                    None => {
                        self.sent.lock().unwrap().push(text.to_owned());
                        ok.push(json!({ "Id": id, "MessageId": format!("m-{text}"), "MD5OfMessageBody": "x" }));
                    }
                }
            }
            json!({ "Successful": ok, "Failed": failed })
        };
        wiremock::ResponseTemplate::new(200)
            .insert_header("content-type", "application/x-amz-json-1.0")
            .set_body_string(answer.to_string())
    }
}

async fn fake_sqs(
    fail: fn(usize, &str) -> Option<bool>,
) -> (
    wiremock::MockServer,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let server = wiremock::MockServer::start().await;
    let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(FakeSqs {
            url: server.uri(),
            fail,
            calls: Default::default(),
            sent: sent.clone(),
        })
        .mount(&server)
        .await;
    (server, sent)
}

async fn sqs_queue_at(endpoint: &str) -> shared::queue::sqs::SqsQueue {
    let sdk = common::sdk_config_at(endpoint);
    shared::queue::sqs::SqsQueue::connect(aws_sdk_sqs::Client::new(&sdk), "persona", "jobs")
        .await
        .unwrap()
}

#[tokio::test]
async fn entries_sqs_failed_on_its_side_are_sent_again_and_later_chunks_are_not_dropped() {
    use shared::queue::Queue;
    // The first two calls fail every odd message on SQS's side.
    let (endpoint, sent) =
        fake_sqs(|call, body| (call < 2 && body.parse::<u32>().unwrap() % 2 == 1).then_some(false))
            .await;
    let queue = sqs_queue_at(&endpoint.uri()).await;
    let messages: Vec<shared::queue::Outgoing> = (0..25).map(|i| i.to_string().into()).collect();
    queue.send(&messages).await.unwrap();
    let mut got: Vec<u32> = sent
        .lock()
        .unwrap()
        .iter()
        .map(|b| b.parse().unwrap())
        .collect();
    got.sort_unstable();
    assert_eq!(got, (0..25).collect::<Vec<_>>(), "every message sent, once");

    // An entry refused as the sender's fault fails the send, but the other chunks still go.
    let (server, sent) = fake_sqs(|_, body| (body == "3").then_some(true)).await;
    let queue = sqs_queue_at(&server.uri()).await;
    assert!(queue.send(&messages).await.is_err());
    let got = sent.lock().unwrap().len();
    assert_eq!(got, 24, "all but the refused one were sent");
}

#[tokio::test]
async fn aws_init_can_be_rerun_and_mends_what_it_finds() {
    use aws_sdk_sqs::types::QueueAttributeName;
    let sdk = common::aws_test_sdk_config();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    let name = format!("rerun-{run}");
    shared::queue::sqs::SqsQueue::ensure(sqs.clone(), "persona", &name, 3)
        .await
        .unwrap();
    // A rerun after `max_receives` changed: the queue is updated, not an error.
    shared::queue::sqs::SqsQueue::ensure(sqs.clone(), "persona", &name, 7)
        .await
        .expect("a rerun with other attributes");
    let url = sqs
        .get_queue_url()
        .queue_name(&name)
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let redrive = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::RedrivePolicy)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()
        .remove(&QueueAttributeName::RedrivePolicy)
        .unwrap();
    let redrive: serde_json::Value = serde_json::from_str(&redrive).unwrap();
    assert_eq!(
        redrive["maxReceiveCount"].to_string().trim_matches('"'),
        "7"
    );

    // A table made without TTL (by hand, say) gets it on a rerun.
    let dynamo = aws_sdk_dynamodb::Client::new(&sdk);
    let table = format!("rerun-{run}");
    shared::store::dynamodb::DynamoStore::create_table(&dynamo, &table)
        .await
        .unwrap();
    dynamo
        .update_time_to_live()
        .table_name(&table)
        .time_to_live_specification(
            aws_sdk_dynamodb::types::TimeToLiveSpecification::builder()
                .attribute_name("expires_at")
                .enabled(false)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    shared::store::dynamodb::DynamoStore::ensure_table(&dynamo, &table)
        .await
        .unwrap();
    let ttl = dynamo
        .describe_time_to_live()
        .table_name(&table)
        .send()
        .await
        .unwrap()
        .time_to_live_description
        .and_then(|d| d.time_to_live_status);
    assert_eq!(
        ttl,
        Some(aws_sdk_dynamodb::types::TimeToLiveStatus::Enabled)
    );
}
