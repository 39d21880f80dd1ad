//! Catch-up (`GET /v1/sync`, issue #12): a client that was away gets every record of its user
//! that changed since its cursor, deletions as tombstones, a page at a time; cursors are its
//! user's alone. On both backends.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::{TestApp, User};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The records a sync reports, by (kind, id): the latest of each.
type Seen = HashMap<(String, String), Value>;

/// Syncs from `since` until no more changes wait, `limit` a page; returns what it saw, the
/// cursor to come back with, and how many pages it took.
async fn sync_all(
    app: &TestApp,
    user: &User,
    since: Option<&str>,
    limit: usize,
) -> (Seen, String, usize) {
    let mut seen = Seen::new();
    let mut cursor = since.map(str::to_owned);
    for pages in 1..=200 {
        let path = match &cursor {
            Some(c) => format!("/v1/sync?limit={limit}&since={c}"),
            None => format!("/v1/sync?limit={limit}"),
        };
        let (status, page) = app.get(Some(&user.token), &path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let changes = page["changes"].as_array().unwrap();
        assert!(changes.len() <= limit);
        for change in changes {
            let key = (
                change["kind"].as_str().unwrap().to_owned(),
                change["id"].as_str().unwrap().to_owned(),
            );
            seen.insert(key, change.clone());
        }
        cursor = Some(page["cursor"].as_str().unwrap().to_owned());
        if page["has_more"] == false {
            return (seen, cursor.unwrap_or_default(), pages);
        }
    }
    panic!("the feed never ended");
}

fn record<'a>(seen: &'a Seen, kind: &str, id: &str) -> &'a Value {
    seen.get(&(kind.to_owned(), id.to_owned()))
        .unwrap_or_else(|| panic!("no {kind} {id} in {:?}", seen.keys()))
}

fn ids(seen: &Seen, kind: &str, deleted: bool) -> Vec<String> {
    let mut ids: Vec<String> = seen
        .iter()
        .filter(|((k, _), c)| k == kind && c["deleted"] == deleted)
        .map(|((_, id), _)| id.clone())
        .collect();
    ids.sort();
    ids
}

async fn a_client_that_was_away_catches_up_with_changes_and_deletions(app: TestApp, aws: bool) {
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let conv = app.conversation(&alice, "Sherlock Holmes").await;
    let other = app
        .conversation(&alice, "a grumpy pirate who loves cats")
        .await;
    for text in ["Who did it?", "And why?"] {
        let accepted = app.say(&alice, &conv, text).await;
        app.finished(&alice, accepted["request_id"].as_str().unwrap())
            .await;
    }
    let messages = app.all_messages(&alice, &conv).await;
    assert_eq!(messages.len(), 5);

    // From the beginning: everything, each record as it is now; pages of 3 make the same.
    let (all, _, _) = sync_all(&app, &alice, None, 500).await;
    let (paged, _, pages) = sync_all(&app, &alice, None, 3).await;
    assert!(pages > 3, "{pages}");
    assert_eq!(
        paged.keys().collect::<std::collections::BTreeSet<_>>(),
        all.keys().collect()
    );
    assert_eq!(ids(&all, "persona", false).len(), 2);
    assert_eq!(ids(&all, "conversation", false).len(), 2);
    // Two persona requests and two chat turns, each as it ended.
    assert_eq!(ids(&all, "request", false).len(), 4);
    assert!(all
        .values()
        .filter(|c| c["kind"] == "request")
        .all(|c| c["record"]["status"] == "succeeded"));
    for message in &messages {
        let id = message["message_id"].as_str().unwrap();
        let change = record(&all, "message", id);
        assert_eq!(change["conversation_id"], conv.as_str());
        assert_eq!(change["record"]["text"], message["text"]);
    }
    // A reply comes with its versions, as the listing shows it.
    let reply = record(&all, "message", messages[2]["message_id"].as_str().unwrap());
    assert_eq!(
        reply["record"]["variants"].as_array().map(Vec::len),
        Some(1)
    );

    // Bob sees his own records and none of Alice's, and cannot use Alice's cursor.
    let bobs_persona = app.persona(&bob, "Yoda").await;
    let (bobs, _, _) = sync_all(&app, &bob, None, 100).await;
    assert_eq!(
        ids(&bobs, "persona", false),
        [bobs_persona["persona_id"].as_str().unwrap()]
    );
    assert!(bobs.keys().all(|key| !all.contains_key(key)), "{bobs:?}");
    if aws {
        // Changes of the last few seconds are given again (the index is eventually
        // consistent): let them age, so the cursor below passes all of them.
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
    let (_, away, _) = sync_all(&app, &alice, None, 500).await;
    let (status, err) = app
        .get(Some(&bob.token), &format!("/v1/sync?since={away}"))
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_cursor"))
    );
    let (status, _) = app
        .get(Some(&alice.token), "/v1/sync?since=bm90LWEtY3Vyc29y")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // A cursor from further back than deletions are kept: on DynamoDB (tombstones live 30
    // days) the client is told to start over; the embedded store keeps its tombstones, so
    // its oldest cursor still holds.
    let raw = shared::store::token::decode(&away).unwrap();
    let (tag, _) = raw.split_once('.').unwrap();
    let (now, month_ago) = (
        shared::time::now_ms(),
        shared::time::now_ms() - 31 * 86_400_000,
    );
    let old = if aws {
        format!("{tag}.{month_ago:013}~{month_ago:013}")
    } else {
        format!("{tag}.1")
    };
    let (status, body) = app
        .get(
            Some(&alice.token),
            &format!("/v1/sync?since={}", shared::store::token::encode(&old)),
        )
        .await;
    if aws {
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::GONE, Some("cursor_expired")),
            "{body}"
        );
        // A quiet account: nothing changed for a month, but the client synced yesterday (its
        // cursor's horizon): not expired, and the cursor it gets back is as fresh.
        let day_ago = now - 86_400_000;
        let quiet = shared::store::token::encode(&format!("{tag}.{month_ago:013}~{day_ago:013}"));
        let (status, body) = app
            .get(Some(&alice.token), &format!("/v1/sync?since={quiet}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let again = body["cursor"].as_str().unwrap();
        let raw = shared::store::token::decode(again).unwrap();
        let horizon: i64 = raw.rsplit_once('~').unwrap().1.parse().unwrap();
        assert!(now - horizon < 60_000, "{raw}");
        let (status, body) = app
            .get(Some(&alice.token), &format!("/v1/sync?since={again}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    } else {
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(!body["changes"].as_array().unwrap().is_empty(), "{body}");
    }

    // While the client is away: a rename, a rewind of the last turn, a deleted conversation
    // and its persona.
    let (status, _) = app
        .send(
            app.http
                .patch(app.url(&format!("/v1/conversations/{conv}")))
                .bearer_auth(&alice.token)
                .json(&json!({ "title": "The case" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app
        .post(
            Some(&alice.token),
            &format!("/v1/conversations/{conv}/rewind"),
            json!({ "message_id": messages[2]["message_id"] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, gone) = app
        .get(Some(&alice.token), &format!("/v1/conversations/{other}"))
        .await;
    let (status, _) = app
        .delete(Some(&alice.token), &format!("/v1/conversations/{other}"))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let persona = gone["persona_id"].as_str().unwrap();
    let (status, _) = app
        .delete(Some(&alice.token), &format!("/v1/personas/{persona}"))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // And the first reply regenerated: it comes back with both versions.
    let first_reply = messages[2]["message_id"].as_str().unwrap();
    let (status, again) = app
        .post(
            Some(&alice.token),
            &format!("/v1/conversations/{conv}/messages/{first_reply}/regenerate"),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    app.finished(&alice, again["request_id"].as_str().unwrap())
        .await;

    let (back, cursor, _) = sync_all(&app, &alice, Some(&away), 500).await;
    assert_eq!(
        record(&back, "conversation", &conv)["record"]["title"],
        "The case"
    );
    assert_eq!(ids(&back, "conversation", true), [other.as_str()]);
    assert_eq!(ids(&back, "persona", true), [persona.to_owned()]);
    let mut dropped: Vec<String> = messages[3..]
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_owned())
        .collect();
    dropped.sort();
    assert_eq!(ids(&back, "message", true), dropped);
    assert!(back
        .values()
        .all(|c| c["deleted"] == true || c["record"].is_object()));
    let regenerated = record(&back, "message", first_reply);
    assert_eq!(
        regenerated["record"]["variants"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(
        record(&back, "request", again["request_id"].as_str().unwrap())["record"]["status"],
        "succeeded"
    );
    // Only what changed: the greeting and the other persona are not sent again (the first
    // user message is: it names the regeneration now).
    for message in &messages[..1] {
        assert!(!back.contains_key(&(
            "message".into(),
            message["message_id"].as_str().unwrap().into()
        )));
    }
    assert!(ids(&back, "persona", false).is_empty(), "{back:?}");
    if !aws {
        // Nothing since (a change of the memory alone is not one of the records): an empty
        // page, the same place.
        let (status, _) = app
            .send(
                app.http
                    .put(app.url(&format!("/v1/conversations/{conv}/memory")))
                    .bearer_auth(&alice.token)
                    .json(&json!({ "pinned": ["Alice likes tea"] })),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let (none, same, _) = sync_all(&app, &alice, Some(&cursor), 500).await;
        assert!(none.is_empty(), "{none:?}");
        assert_eq!(same, cursor);
    }
}

#[tokio::test]
async fn a_client_that_was_away_catches_up_with_changes_and_deletions_on_the_embedded_default() {
    a_client_that_was_away_catches_up_with_changes_and_deletions(TestApp::start().await, false)
        .await;
}

#[tokio::test]
async fn a_client_that_was_away_catches_up_with_changes_and_deletions_on_aws() {
    a_client_that_was_away_catches_up_with_changes_and_deletions(
        TestApp::builder().on_aws().start().await,
        true,
    )
    .await;
}

#[tokio::test]
async fn records_written_before_the_feed_join_it_at_the_next_aws_init() {
    let app = TestApp::builder().on_aws().start().await;
    let alice = app.user("alice").await;
    let persona = app.persona(&alice, "Sherlock Holmes").await;
    let id = persona["persona_id"].as_str().unwrap();
    // As a record of an older release had it: no change keys.
    let table = &app.settings.aws.table;
    let dynamo = aws_sdk_dynamodb::Client::new(&crate::common::aws_test_sdk_config());
    let key = |v: String| aws_sdk_dynamodb::types::AttributeValue::S(v);
    dynamo
        .update_item()
        .table_name(table)
        .key("pk", key(format!("USER#{}", alice.user_id)))
        .key("sk", key(format!("PERSONA#{id}")))
        .update_expression("REMOVE sync_user, sync_at")
        .send()
        .await
        .unwrap();
    let (before, _, _) = sync_all(&app, &alice, None, 500).await;
    assert!(!before.contains_key(&("persona".into(), id.into())));

    characterbot::aws_init(&app.settings)
        .await
        .expect("aws-init");
    let (after, _, _) = sync_all(&app, &alice, None, 500).await;
    assert_eq!(
        record(&after, "persona", id)["record"]["name"],
        persona["name"]
    );
    assert_eq!(after.len(), before.len() + 1);
}
