//! `characterbot batch`, the batch client: prompts in, one JSON line per prompt out.

use std::process::Command;

use crate::common::{self, TestApp};
use serde_json::Value;

#[tokio::test]
async fn the_batch_client_creates_every_persona_and_reports_each() {
    let app = TestApp::start().await;
    let user = app.user("batcher").await;
    let prompts = app.dir.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "Yoda\n\n  a grumpy pirate who loves cats  \nMarie Curie\nGandalf\nCleopatra\n",
    )
    .unwrap();
    let out = app.dir.path().join("out.jsonl");
    let (base, file, out_path) = (app.base.clone(), prompts.clone(), out.clone());
    // Chunks of 2 prompts: three batches, followed together.
    let status = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_characterbot"))
            .args([
                "batch",
                "--url",
                &base,
                "--email",
                "batcher@example.com",
                "--password",
                common::PASSWORD,
                "--chunk",
                "2",
            ])
            .arg("--file")
            .arg(&file)
            .arg("--out")
            .arg(&out_path)
            .status()
            .expect("run the client")
    })
    .await
    .unwrap();
    assert!(status.success());
    let lines: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
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
    let (_, list) = app.get(Some(&user.token), "/v1/personas?limit=100").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 5);
}
