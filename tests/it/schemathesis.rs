//! schemathesis, the API fuzzer mobile teams would run, against the API as served (issue #13):
//! every check, every phase (the stateful one follows the document's links from the records
//! it creates to the operations that read them), a fixed seed; any finding fails the test.
//! Its settings and why: `tests/schemathesis/schemathesis.toml`.

use std::process::Command;

use crate::common::TestApp;

/// Cases per operation and phase: enough to reach every rule of every operation (each run
/// found the same findings as runs of 20 and 50 before they were mended), few enough to take a
/// few minutes on a debug build.
const EXAMPLES: &str = "10";

#[tokio::test]
async fn schemathesis_finds_nothing_to_report() {
    let exe = std::env::var("CHARACTERBOT_TEST_SCHEMATHESIS").expect(
        "CHARACTERBOT_TEST_SCHEMATHESIS is not set: run the tests with `scripts/test`, which installs it",
    );
    // The per-user rate limit off: the fuzzer sends thousands of requests as one user.
    let app = TestApp::builder()
        .arg("--rate-limit-per-minute", "0")
        .start()
        .await;
    let user = app.user("fuzz").await;
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/schemathesis/schemathesis.toml"
    );
    let (schema, auth) = (
        format!("{}/openapi.json", app.base),
        format!("Authorization: Bearer {}", user.token),
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new(exe)
            .args(["--config-file", config, "run", &schema, "-H", &auth])
            .args([
                "--checks",
                "all",
                "-n",
                EXAMPLES,
                "--seed",
                "1",
                "--no-color",
            ])
            .env("NO_COLOR", "1")
            .output()
            .expect("run schemathesis")
    })
    .await
    .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found something:\n{text}"
    );
    // It ran: every operation, cases generated and passed (a run that reaches nothing fails
    // no check).
    for phase in ["Coverage", "Fuzzing", "Stateful"] {
        assert!(text.contains(&format!("✅ {phase}")), "{phase}:\n{text}");
    }
    assert!(
        text.contains(" passed") && !text.contains("Failures:"),
        "{text}"
    );
}
