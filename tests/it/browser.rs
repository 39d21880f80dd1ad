//! The chat page in a real browser (issue #13): headless Chromium from Debian, driven by
//! playwright-core (`tests/browser/chat.js`, which says step by step what it checks: sign-up,
//! a persona, a conversation with its greeting, two streamed replies, a regeneration, a reply
//! cancelled in flight, a reload, the phone size, axe-core, the API reference). Screenshots
//! at desktop and phone sizes land in `target/tmp/browser`. `scripts/test` installs Chromium
//! and the two npm packages (pinned in `tests/browser/package.json`).

use std::process::Command;

use crate::common::TestApp;

#[tokio::test]
async fn the_chat_page_works_in_a_real_browser() {
    let modules = std::env::var("CHARACTERBOT_TEST_BROWSER_MODULES").expect(
        "CHARACTERBOT_TEST_BROWSER_MODULES is not set: run the tests with `scripts/test`, which installs Chromium and playwright-core",
    );
    // Replies written over 1.5 s: long enough to be seen streaming, and to be cancelled.
    let app = TestApp::builder()
        .arg("--offline-delay-ms", "1500")
        .start()
        .await;
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&shots).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/chat.js");
    let (base, dir) = (app.base.clone(), shots.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .arg(&base)
            .arg(&dir)
            .env("NODE_PATH", &modules)
            .output()
            .expect("run node")
    })
    .await
    .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the browser test failed:\n{text}");
    for shot in ["chat-desktop.png", "chat-phone.png", "docs-phone.png"] {
        assert!(
            shots.join(shot).metadata().unwrap().len() > 10_000,
            "{shot}"
        );
    }
}
