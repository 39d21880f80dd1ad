//! Batches as OpenAI's Batch API users expect them (issue #13): items named by `custom_id`,
//! batches listed newest first with a `status`, every result in one call, cancel as a whole.
//! Through HTTP, on both backends.

use crate::common::{TestApp, User};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn submit(app: &TestApp, user: &User, body: Value) -> Value {
    let (status, accepted) = app
        .post(Some(&user.token), "/v1/personas/batch", body)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    accepted
}

async fn batch_lifecycle(app: TestApp) {
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let items: Vec<Value> = ["Yoda", "Gandalf", "a shy robot chef"]
        .iter()
        .enumerate()
        .map(|(i, p)| json!({ "custom_id": format!("row-{i}"), "prompt": p }))
        .collect();
    let first = submit(&app, &alice, json!({ "prompts": ["Marie Curie"] })).await;
    let second = submit(&app, &alice, json!({ "items": items })).await;
    let second_id = second["batch_id"].as_str().unwrap();
    for id in second["request_ids"].as_array().unwrap() {
        app.finished(&alice, id.as_str().unwrap()).await;
    }

    // Every result in one call, in the batch's order, each with its custom_id.
    let (status, results) = app
        .get(
            Some(&alice.token),
            &format!("/v1/batches/{second_id}/results"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{results}");
    assert_eq!(results["status"], "completed");
    assert_eq!(results["next_token"], Value::Null);
    let got: Vec<(&str, &str, &str)> = results["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["custom_id"].as_str().unwrap(),
                r["status"].as_str().unwrap(),
                r["persona"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("row-0", "succeeded", "Yoda"),
            ("row-1", "succeeded", "Gandalf"),
            ("row-2", "succeeded", "Imogen the Shy Robot Chef")
        ]
    );
    // Paged when asked: two pages hold the same items.
    let (_, page) = app
        .get(
            Some(&alice.token),
            &format!("/v1/batches/{second_id}/results?limit=2"),
        )
        .await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let token = page["next_token"].as_str().unwrap();
    let (_, rest) = app
        .get(
            Some(&alice.token),
            &format!("/v1/batches/{second_id}/results?limit=2&next_token={token}"),
        )
        .await;
    assert_eq!(rest["items"][0]["custom_id"], "row-2");
    assert_eq!(rest["items"][0]["index"], 2);
    assert_eq!(rest["next_token"], Value::Null);

    // The batch: counts, status, when it finished; listed newest first.
    let (_, batch) = app
        .get(Some(&alice.token), &format!("/v1/batches/{second_id}"))
        .await;
    assert_eq!(
        (&batch["status"], &batch["succeeded"], &batch["pending"]),
        (&json!("completed"), &json!(3), &json!(0)),
        "{batch}"
    );
    assert!(batch["finished_at"].as_str().unwrap() >= batch["created_at"].as_str().unwrap());
    let (status, listed) = app.get(Some(&alice.token), "/v1/batches").await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let order: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["batch_id"].as_str().unwrap())
        .collect();
    assert_eq!(order, [second_id, first["batch_id"].as_str().unwrap()]);

    // Another user's batch is not there for them.
    let (status, _) = app
        .get(
            Some(&bob.token),
            &format!("/v1/batches/{second_id}/results"),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, theirs) = app.get(Some(&bob.token), "/v1/batches").await;
    assert_eq!(theirs["items"], json!([]));
    let (status, _) = app
        .post(
            Some(&bob.token),
            &format!("/v1/batches/{second_id}/cancel"),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn batches_carry_custom_ids_are_listed_and_answer_every_result_in_one_call() {
    batch_lifecycle(TestApp::start().await).await;
}

#[tokio::test]
async fn batches_carry_custom_ids_are_listed_and_answer_every_result_in_one_call_on_aws() {
    batch_lifecycle(TestApp::builder().on_aws().start().await).await;
}

async fn cancel_queued(app: TestApp) {
    let alice = app.user("alice").await;
    let accepted = submit(&app, &alice, json!({ "prompts": ["Yoda", "Gandalf"] })).await;
    let id = accepted["batch_id"].as_str().unwrap();
    let (status, batch) = app
        .post(
            Some(&alice.token),
            &format!("/v1/batches/{id}/cancel"),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{batch}");
    assert_eq!(
        (&batch["status"], &batch["cancelled"], &batch["pending"]),
        (&json!("cancelled"), &json!(2), &json!(0)),
        "{batch}"
    );
    assert!(batch["cancelled_at"].is_string());
    let (_, results) = app
        .get(Some(&alice.token), &format!("/v1/batches/{id}/results"))
        .await;
    for item in results["items"].as_array().unwrap() {
        assert_eq!(item["status"], "cancelled", "{item}");
        assert!(item.get("custom_id").is_none(), "given as prompts");
    }
    // Again: nothing changes.
    let (status, again) = app
        .post(
            Some(&alice.token),
            &format!("/v1/batches/{id}/cancel"),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["cancelled_at"], batch["cancelled_at"]);
}

#[tokio::test]
async fn cancelling_a_batch_cancels_its_queued_items() {
    cancel_queued(TestApp::builder().without_workers().start().await).await;
}

#[tokio::test]
async fn cancelling_a_batch_cancels_its_queued_items_on_aws() {
    cancel_queued(TestApp::builder().without_workers().on_aws().start().await).await;
}

#[tokio::test]
async fn bad_batches_are_refused_and_queue_nothing() {
    let app = TestApp::builder().without_workers().start().await;
    let alice = app.user("alice").await;
    let long_id = "x".repeat(65);
    for (body, code) in [
        (json!({}), "invalid_batch"),
        (
            json!({ "prompts": ["a"], "items": [{ "custom_id": "1", "prompt": "b" }] }),
            "invalid_batch",
        ),
        (json!({ "items": [] }), "empty_batch"),
        (
            json!({ "items": [{ "custom_id": long_id, "prompt": "a" }] }),
            "invalid_custom_id",
        ),
        (
            json!({ "items": [{ "custom_id": "", "prompt": "a" }] }),
            "invalid_custom_id",
        ),
        (
            json!({ "items": [{ "custom_id": "1", "prompt": "  " }] }),
            "empty_prompt",
        ),
    ] {
        let (status, answer) = app
            .post(Some(&alice.token), "/v1/personas/batch", body.clone())
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
    }
    let twice = json!({ "items": [{ "custom_id": "1", "prompt": "a" }, { "custom_id": "1", "prompt": "b" }] });
    let (status, answer) = app
        .post(Some(&alice.token), "/v1/personas/batch", twice)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["code"], "duplicate_custom_id");
    let (_, listed) = app.get(Some(&alice.token), "/v1/batches").await;
    assert_eq!(listed["items"], json!([]), "nothing was created");

    let accepted = submit(&app, &alice, json!({ "prompts": ["Yoda"] })).await;
    let id = accepted["batch_id"].as_str().unwrap();
    for (query, code) in [
        ("limit=0", "invalid_limit"),
        ("limit=1001", "invalid_limit"),
        ("next_token=nope", "invalid_next_token"),
    ] {
        let (status, answer) = app
            .get(
                Some(&alice.token),
                &format!("/v1/batches/{id}/results?{query}"),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{query}: {answer}");
    }
}
