//! The terminal client (issue #13): `login` keeps a session (0600), `persona create/list/show`,
//! `chat` through piped standard input with its commands, a refresh of an expired access
//! token, `batch` on the session, `logout`.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::common::{self, TestApp};
use serde_json::Value;

/// Runs `characterbot args...` with `config` as its config dir and `stdin` piped in.
async fn client(config: &Path, args: &[&str], stdin: &str) -> Output {
    let (config, args, stdin) = (
        config.to_owned(),
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        stdin.to_owned(),
    );
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_characterbot"))
            .args(&args)
            .env("CHARACTERBOT_CONFIG_DIR", &config)
            .env_remove("CHARACTERBOT_URL")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the client");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn session(config: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(config.join("session.json")).unwrap()).unwrap()
}

#[tokio::test]
async fn a_user_logs_in_makes_a_persona_chats_and_logs_out_from_the_terminal() {
    let app = TestApp::start().await;
    let user = app.user("terminal").await;
    let config = app.dir.path().join("config");
    // The password from standard input, as a person would type it.
    let out = client(
        &config,
        &["login", "--url", &app.base, "--email", &user.email],
        &format!("{}\n", common::PASSWORD),
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(config.join("session.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "tokens readable by their user only");
    }

    let out = client(&config, &["persona", "create", "Yoda"], "").await;
    assert!(out.status.success(), "{out:?}");
    let made = text(&out);
    assert!(made.starts_with("Yoda (per_"), "{made}");
    let id = made.split(['(', ')']).nth(1).unwrap().to_owned();
    let listed = text(&client(&config, &["persona", "list"], "").await);
    assert_eq!(listed.trim(), format!("{id}  Yoda"));
    let shown = text(&client(&config, &["persona", "show", &id], "").await);
    assert!(shown.contains("greeting: "), "{shown}");

    // A chat through a pipe: a message, its history, a regenerated reply, then quit.
    let out = client(
        &config,
        &["chat", &id],
        "Hello there, who are you?\n/history\n/regenerate\n/quit\n",
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let chat = text(&out);
    let lines: Vec<&str> = chat.lines().collect();
    assert!(lines[0].starts_with("Yoda: "), "the greeting first: {chat}");
    let replies = lines
        .iter()
        .filter(|l| l.starts_with("Yoda: ") && l.len() > "Yoda: ".len() + 5)
        .count();
    // Greeting, reply, the reply again in the history, the greeting in the history, the
    // regenerated reply.
    assert!(replies >= 5, "{chat}");
    assert!(chat.contains("you: Hello there, who are you?"), "{chat}");

    // An access token about to expire is refreshed, and the new tokens kept.
    let mut kept = session(&config);
    let old_refresh = kept["refresh_token"].clone();
    kept["expires_at"] = 0.into();
    std::fs::write(config.join("session.json"), kept.to_string()).unwrap();
    let out = client(&config, &["persona", "list"], "").await;
    assert!(out.status.success(), "{out:?}");
    assert_ne!(
        session(&config)["refresh_token"],
        old_refresh,
        "rotated and saved"
    );

    // An access token the server refuses mid-run (expired early, say) is renewed from the
    // session, and the call made again.
    let mut kept = session(&config);
    kept["access_token"] = "not-a-token".into();
    std::fs::write(config.join("session.json"), kept.to_string()).unwrap();
    let out = client(&config, &["persona", "list"], "").await;
    assert!(out.status.success(), "{out:?}");
    assert_ne!(session(&config)["access_token"], "not-a-token");

    // `batch` with no credentials uses the session.
    let prompts = app.dir.path().join("few.txt");
    std::fs::write(&prompts, "Marie Curie\n").unwrap();
    let out = client(&config, &["batch", "--file", prompts.to_str().unwrap()], "").await;
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out).contains("\"Marie Curie\""), "{}", text(&out));

    let last_refresh = session(&config)["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = client(&config, &["logout"], "").await;
    assert!(out.status.success(), "{out:?}");
    assert!(!config.join("session.json").exists());
    let out = client(&config, &["persona", "list"], "").await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not signed in"));
    // The refresh token was ended on the server too.
    let (status, _) = app
        .post(
            None,
            "/v1/auth/refresh",
            serde_json::json!({ "refresh_token": last_refresh }),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::UNAUTHORIZED);
}

/// A chat model that writes its first words and then never finishes (until its call is
/// dropped by a cancel).
struct Stalls;

const FIRST_WORDS: &str = "Once upon a time; ";

#[async_trait::async_trait]
impl shared::models::ChatModel for Stalls {
    fn model(&self) -> &str {
        "stalls"
    }
    async fn reply(
        &self,
        _: &shared::models::ChatRequest,
        tx: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    ) -> shared::Result<shared::models::ModelOutput<String>> {
        // The sender kept: the reply is still being written.
        if let Some(tx) = &tx {
            let _ = tx.send(FIRST_WORDS.to_owned());
        }
        std::future::pending().await
    }
}

#[tokio::test]
async fn a_reply_streaming_in_the_terminal_is_cancelled_with_a_command() {
    let app = TestApp::builder().without_workers().start().await;
    app.start_worker(
        shared::domain::RequestKind::Persona,
        &app.adapters.models.clone(),
    );
    app.start_worker(
        shared::domain::RequestKind::Chat,
        &common::with_chat(std::sync::Arc::new(Stalls)),
    );
    let user = app.user("canceller").await;
    let config = app.dir.path().join("config");
    let login = [
        "login",
        "--url",
        &app.base,
        "--email",
        &user.email,
        "--password",
        common::PASSWORD,
    ];
    assert!(client(&config, &login, "").await.status.success());
    let made = text(&client(&config, &["persona", "create", "Yoda"], "").await);
    let id = made.split(['(', ')']).nth(1).unwrap().to_owned();

    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_characterbot"))
            .args(["chat", &id])
            .env("CHARACTERBOT_CONFIG_DIR", &config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let reader = {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                while let Ok(n @ 1..) = std::io::Read::read(&mut stdout, &mut buf) {
                    seen.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            })
        };
        stdin.write_all(b"Tell me a story\n").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !seen.lock().unwrap().contains(FIRST_WORDS) {
            assert!(
                std::time::Instant::now() < deadline,
                "{}",
                seen.lock().unwrap()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        stdin.write_all(b"/cancel\n/quit\n").unwrap();
        drop(stdin);
        let status = child.wait().unwrap();
        reader.join().unwrap();
        let out = seen.lock().unwrap().clone();
        (status, out)
    })
    .await
    .unwrap();
    assert!(out.0.success());
    // What was written of it, then how it ended, on one line.
    let line = out
        .1
        .lines()
        .find(|l| l.contains(FIRST_WORDS))
        .unwrap_or_default();
    assert!(
        line.starts_with(&format!("Yoda: {FIRST_WORDS}")) && line.ends_with("[cancelled]"),
        "{}",
        out.1
    );
}
