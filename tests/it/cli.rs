//! `characterbot batch`, the batch client: prompts in (lines or JSON lines with a
//! `custom_id`), one JSON line per prompt out, against a server on its default settings.

use std::path::Path;
use std::process::{Command, ExitStatus};

use crate::common::{self, TestApp, User};
use serde_json::{json, Value};

/// Runs the client as a user would, on `input`; returns its exit status and output lines.
async fn batch(
    app: &TestApp,
    user: &User,
    input: &str,
    extra: &[&str],
) -> (ExitStatus, Vec<Value>) {
    let dir = app.dir.path();
    let file = dir.join("prompts.txt");
    std::fs::write(&file, input).unwrap();
    let out = dir.join("out.jsonl");
    let _ = std::fs::remove_file(&out);
    let mut args: Vec<String> = ["batch", "--url", &app.base, "--email", &user.email]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--password".into(), common::PASSWORD.into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let (file_arg, out_arg) = (file.clone(), out.clone());
    let status = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_characterbot"))
            .args(&args)
            .arg("--file")
            .arg(&file_arg)
            .arg("--out")
            .arg(&out_arg)
            .status()
            .expect("run the client")
    })
    .await
    .unwrap();
    (status, read_lines(&out))
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn count(app: &TestApp, user: &User, path: &str) -> usize {
    let mut total = 0;
    let mut next: Option<String> = None;
    loop {
        let page = match &next {
            Some(t) => format!("{path}?limit=100&next_token={t}"),
            None => format!("{path}?limit=100"),
        };
        let (_, list) = app.get(Some(&user.token), &page).await;
        total += list["items"].as_array().unwrap().len();
        match list["next_token"].as_str() {
            Some(t) => next = Some(t.to_owned()),
            None => return total,
        }
    }
}

#[tokio::test]
async fn the_batch_client_creates_every_persona_and_reports_each() {
    let app = TestApp::start().await;
    let user = app.user("batcher").await;
    // Chunks of 2 prompts: three batches, followed together.
    let (status, lines) = batch(
        &app,
        &user,
        "Yoda\n\n  a grumpy pirate who loves cats  \nMarie Curie\nGandalf\nCleopatra\n",
        &["--chunk", "2"],
    )
    .await;
    assert!(status.success());
    let names: Vec<&str> = lines
        .iter()
        .map(|l| l["persona"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 5, "blank lines are skipped");
    assert_eq!(names[0], "Yoda");
    assert!(names[1].ends_with("the Grumpy Pirate"));
    assert_eq!(&names[2..], ["Marie Curie", "Gandalf", "Cleopatra"]);
    assert!(lines.iter().all(|l| l["status"] == "succeeded"));
    assert_eq!(lines[1]["prompt"], "a grumpy pirate who loves cats");
    // Keyed by line number when the input names nothing.
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["1", "3", "4", "5", "6"]);
    assert_eq!(count(&app, &user, "/v1/personas").await, 5);
}

/// A thousand prompts on the server's default settings (rate limit included): every one
/// made, none twice when the same input is run again.
#[tokio::test]
async fn a_thousand_prompt_batch_completes_on_default_settings_and_a_rerun_creates_nothing() {
    let app = TestApp::start().await;
    let user = app.user("many").await;
    let input: String = (0..1000)
        .map(|i| format!("a character number {i}\n"))
        .collect();
    let (status, lines) = batch(&app, &user, &input, &[]).await;
    assert!(status.success());
    assert_eq!(lines.len(), 1000);
    assert!(
        lines.iter().all(|l| l["status"] == "succeeded"),
        "every prompt"
    );
    assert_eq!(lines[999]["prompt"], "a character number 999");
    assert_eq!(count(&app, &user, "/v1/personas").await, 1000);
    assert_eq!(count(&app, &user, "/v1/batches").await, 10);

    let (status, again) = batch(&app, &user, &input, &[]).await;
    assert!(status.success());
    assert_eq!(again.len(), 1000);
    assert_eq!(
        again[500]["request_id"], lines[500]["request_id"],
        "the same requests"
    );
    assert_eq!(
        count(&app, &user, "/v1/personas").await,
        1000,
        "nothing twice"
    );
    assert_eq!(count(&app, &user, "/v1/batches").await, 10);
}

#[tokio::test]
async fn twenty_prompts_with_one_bad_line_make_nineteen_and_report_the_twentieth() {
    let app = TestApp::start().await;
    let user = app.user("careful").await;
    let mut input: String = (0..19)
        .map(|i| {
            format!(
                "{}\n",
                json!({ "custom_id": format!("id-{i}"), "prompt": format!("hero {i}") })
            )
        })
        .collect();
    // Not JSON: reported by the client, never sent.
    input.insert_str(0, "{\"custom_id\": \"broken\", \n");
    let (status, lines) = batch(&app, &user, &input, &[]).await;
    assert!(!status.success(), "a failed prompt fails the run");
    assert_eq!(lines.len(), 20);
    let ok = lines.iter().filter(|l| l["status"] == "succeeded").count();
    assert_eq!(ok, 19);
    assert_eq!(
        (
            &lines[0]["line"],
            &lines[0]["status"],
            &lines[0]["error"]["code"]
        ),
        (&json!(1), &json!("failed"), &json!("invalid_input"))
    );
    assert_eq!(lines[5]["custom_id"], "id-4", "in input order");
    assert_eq!(count(&app, &user, "/v1/personas").await, 19);
}

#[tokio::test]
async fn a_prompt_the_server_refuses_is_reported_and_the_rest_of_its_batch_runs() {
    let app = TestApp::start().await;
    let user = app.user("long").await;
    // Over the server's prompt limit (500 characters): refused by the API, the rest sent.
    let input = format!(
        "Yoda\n{}\nGandalf\n",
        json!({ "custom_id": "long", "prompt": "x".repeat(600) })
    );
    let (status, lines) = batch(&app, &user, &input, &[]).await;
    assert!(!status.success());
    let got: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["custom_id"].as_str().unwrap(),
                l["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [("1", "succeeded"), ("long", "failed"), ("3", "succeeded")]
    );
    assert!(
        lines[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("500"),
        "{}",
        lines[1]
    );
    assert_eq!(count(&app, &user, "/v1/personas").await, 2);
}
