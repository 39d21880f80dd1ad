//! The store on Amazon DynamoDB: one table, keys `pk`/`sk` (strings), every query of the API
//! served by a key lookup or a key-range query — no Scan.
//!
//! | item | pk | sk | notes |
//! |---|---|---|---|
//! | persona | `USER#{user}` | `PERSONA#{persona_id}` | ids are time-ordered: query backwards = newest first |
//! | conversation | `USER#{user}` | `CONV#{conversation_id}` | |
//! | batch | `USER#{user}` | `BATCH#{batch_id}` | counts read from its requests |
//! | idempotency key | `USER#{user}` | `IDEM#{key}` | TTL |
//! | turn counter | `CONV#{conversation_id}` | `META` | atomic `ADD turns 1` |
//! | message | `CONV#{conversation_id}` | `MSG#{turn:012}#{sub}` | user message sub 0, its reply sub 1 |
//! | message index | `CONV#{conversation_id}` | `MID#{message_id}` | message id → turn |
//! | request | `REQ#{request_id}` | `REQ` | owner, status, version; TTL once finished |
//!
//! Records are stored as a JSON `body` attribute beside the few attributes conditions read.
//! Effects are conditional writes: a persona or a reply is written only if absent, and a request
//! changes only from the version that was read (optimistic concurrency), so redeliveries and
//! racing workers cannot write twice or move a state backwards.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{
    AttributeValue, KeysAndAttributes, Put, PutRequest, ReturnValue, TransactWriteItem,
    WriteRequest,
};
use aws_sdk_dynamodb::Client;

use super::{token, IdempotencyBegin, Store, Transition};
use crate::domain::{Batch, Conversation, Message, Page, Persona, RequestRecord, RequestStatus};
use crate::time::{now_ms, now_secs};
use crate::{Error, Result};

pub(crate) type Item = HashMap<String, AttributeValue>;

/// How long finished requests are kept before DynamoDB's TTL removes them.
const FINISHED_REQUEST_TTL_SECS: i64 = 30 * 86_400;

pub struct DynamoStore {
    pub(crate) client: Client,
    pub(crate) table: String,
}

pub(crate) fn storage(op: &str, e: impl std::error::Error) -> Error {
    Error::Storage(format!(
        "dynamodb {op}: {}",
        aws_sdk_dynamodb::error::DisplayErrorContext(e)
    ))
}

pub(crate) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

pub(crate) fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

pub(crate) fn get_s<'a>(item: &'a Item, k: &str) -> Option<&'a str> {
    item.get(k).and_then(|v| v.as_s().ok()).map(String::as_str)
}

pub(crate) fn get_n(item: &Item, k: &str) -> Option<i64> {
    item.get(k)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
}

pub(crate) fn body<T: serde::de::DeserializeOwned>(item: &Item) -> Result<T> {
    let raw = get_s(item, "body").ok_or_else(|| Error::Storage("item without body".into()))?;
    serde_json::from_str(raw).map_err(|e| Error::Storage(format!("corrupt record: {e}")))
}

pub(crate) fn key(pk: impl Into<String>, sk: impl Into<String>) -> Item {
    HashMap::from([("pk".to_string(), s(pk)), ("sk".to_string(), s(sk))])
}

pub(crate) fn user_pk(user: &str) -> String {
    format!("USER#{user}")
}

pub(crate) fn msg_sk(turn: i64, sub: i64) -> String {
    format!("MSG#{turn:012}#{sub}")
}

pub(crate) fn is_conditional_failure<E: aws_sdk_dynamodb::error::ProvideErrorMetadata>(
    e: &aws_sdk_dynamodb::error::SdkError<E>,
) -> bool {
    e.as_service_error()
        .and_then(|s| s.code())
        .is_some_and(|c| {
            c == "ConditionalCheckFailedException" || c == "TransactionCanceledException"
        })
}

/// A page token: the last key, bound to the partition it pages through, so a token made for one
/// user's listing cannot page through another's.
fn encode_token(last: Option<&Item>) -> Option<String> {
    let last = last?;
    let raw = serde_json::json!({ "pk": get_s(last, "pk")?, "sk": get_s(last, "sk")? });
    Some(token::encode(&raw.to_string()))
}

fn decode_token(t: Option<&str>, pk: &str) -> Result<Option<Item>> {
    let Some(t) = t else { return Ok(None) };
    let bad = || Error::Invalid("next_token is not valid".into());
    let raw: serde_json::Value =
        serde_json::from_str(&token::decode(t).ok_or_else(bad)?).map_err(|_| bad())?;
    let (tpk, tsk) = (
        raw["pk"].as_str().ok_or_else(bad)?,
        raw["sk"].as_str().ok_or_else(bad)?,
    );
    if tpk != pk {
        return Err(bad());
    }
    Ok(Some(key(tpk, tsk)))
}

impl DynamoStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        DynamoStore {
            client,
            table: table.into(),
        }
    }

    /// Creates the table (on-demand, TTL on `expires_at`) unless it exists; for first-time
    /// setups and emulators.
    /// Creates the table if it does not exist, waits until it is `ACTIVE`, and makes sure its
    /// TTL is on (a rerun mends a table whose TTL was never turned on).
    pub async fn ensure_table(client: &Client, table: &str) -> Result<()> {
        let exists = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .is_ok();
        if !exists {
            return Self::create_table(client, table).await;
        }
        Self::wait_active(client, table).await?;
        Self::ensure_ttl(client, table).await
    }

    /// Waits until the table is `ACTIVE` (a new table is `CREATING` for a while, and refuses
    /// `UpdateTimeToLive` until then).
    async fn wait_active(client: &Client, table: &str) -> Result<()> {
        use aws_sdk_dynamodb::client::Waiters;
        client
            .wait_until_table_exists()
            .table_name(table)
            .wait(std::time::Duration::from_secs(300))
            .await
            .map_err(|e| storage("wait for the table to be ACTIVE", e))?;
        Ok(())
    }

    /// Turns TTL on `expires_at` on unless it is on (or being turned on) already.
    async fn ensure_ttl(client: &Client, table: &str) -> Result<()> {
        use aws_sdk_dynamodb::types::{TimeToLiveSpecification, TimeToLiveStatus};
        let status = client
            .describe_time_to_live()
            .table_name(table)
            .send()
            .await
            .map_err(|e| storage("read TTL", e))?
            .time_to_live_description
            .and_then(|d| d.time_to_live_status);
        if matches!(
            status,
            Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
        ) {
            return Ok(());
        }
        client
            .update_time_to_live()
            .table_name(table)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .attribute_name("expires_at")
                    .enabled(true)
                    .build()
                    .map_err(|e| Error::Config(e.to_string()))?,
            )
            .send()
            .await
            .map_err(|e| storage("enable TTL", e))?;
        Ok(())
    }

    /// Creates the table (on-demand), waits until it is `ACTIVE`, and turns TTL on
    /// `expires_at` on.
    pub async fn create_table(client: &Client, table: &str) -> Result<()> {
        use aws_sdk_dynamodb::types::{
            AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
        };
        let attr = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(|e| Error::Config(e.to_string()))
        };
        let schema = |name: &str, kt: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kt)
                .build()
                .map_err(|e| Error::Config(e.to_string()))
        };
        client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attr("pk")?)
            .attribute_definitions(attr("sk")?)
            .key_schema(schema("pk", KeyType::Hash)?)
            .key_schema(schema("sk", KeyType::Range)?)
            .send()
            .await
            .map_err(|e| storage("create table", e))?;
        Self::wait_active(client, table).await?;
        Self::ensure_ttl(client, table).await
    }

    pub(crate) async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>> {
        Ok(self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(pk, sk)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| storage("get", e))?
            .item)
    }

    /// Puts an item unless one with its key exists; returns whether it was written.
    pub(crate) async fn put_new(&self, item: Item) -> Result<bool> {
        match self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conditional_failure(&e) => Ok(false),
            Err(e) => Err(storage("put", e)),
        }
    }

    /// One page of a key-range query.
    async fn page<T: serde::de::DeserializeOwned>(
        &self,
        pk: &str,
        prefix: &str,
        forward: bool,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<T>> {
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
            .expression_attribute_values(":pk", s(pk))
            .expression_attribute_values(":prefix", s(prefix))
            .scan_index_forward(forward)
            .limit(limit as i32)
            .set_exclusive_start_key(decode_token(next_token, pk)?)
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| storage("query", e))?;
        let items = out.items.unwrap_or_default();
        Ok(Page {
            next_token: encode_token(out.last_evaluated_key.as_ref()),
            items: items.iter().map(body).collect::<Result<Vec<T>>>()?,
        })
    }

    pub(crate) fn request_item(user_id: &str, r: &RequestRecord, version: i64) -> Result<Item> {
        let mut item = key(format!("REQ#{}", r.request_id), "REQ");
        item.insert("user_id".into(), s(user_id));
        item.insert("status".into(), s(r.status.as_str()));
        item.insert("version".into(), n(version));
        item.insert("body".into(), s(serde_json::to_string(r)?));
        if r.status.is_final() {
            item.insert(
                "expires_at".into(),
                n(now_secs() + FINISHED_REQUEST_TTL_SECS),
            );
        }
        Ok(item)
    }

    /// Takes the next turn number of the conversation whose partition is `conv_pk` (an atomic
    /// counter; a number taken by a write that then fails is skipped, which only leaves a gap
    /// in the sort keys).
    pub(crate) async fn next_turn(&self, conv_pk: &str) -> Result<i64> {
        let turns = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(conv_pk, "META")))
            .update_expression("ADD turns :one")
            .expression_attribute_values(":one", n(1))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await
            .map_err(|e| storage("count turn", e))?;
        turns
            .attributes
            .as_ref()
            .and_then(|a| get_n(a, "turns"))
            .ok_or_else(|| Error::Storage("turn counter missing".into()))
    }

    async fn turn_of(&self, conversation_id: &str, message_id: &str) -> Result<Option<i64>> {
        Ok(self
            .get(
                &format!("CONV#{conversation_id}"),
                &format!("MID#{message_id}"),
            )
            .await?
            .and_then(|i| get_n(&i, "turn")))
    }
}

#[async_trait]
impl Store for DynamoStore {
    async fn put_persona(&self, user_id: &str, persona: &Persona) -> Result<()> {
        let mut item = key(user_pk(user_id), format!("PERSONA#{}", persona.persona_id));
        item.insert("body".into(), s(serde_json::to_string(persona)?));
        self.put_new(item).await.map(|_| ())
    }

    async fn get_persona(&self, user_id: &str, persona_id: &str) -> Result<Option<Persona>> {
        self.get(&user_pk(user_id), &format!("PERSONA#{persona_id}"))
            .await?
            .as_ref()
            .map(body)
            .transpose()
    }

    async fn list_personas(
        &self,
        user_id: &str,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Persona>> {
        self.page(&user_pk(user_id), "PERSONA#", false, limit, next_token)
            .await
    }

    async fn delete_persona(&self, user_id: &str, persona_id: &str) -> Result<bool> {
        let out = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key(user_pk(user_id), format!("PERSONA#{persona_id}"))))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| storage("delete", e))?;
        Ok(out.attributes.is_some_and(|a| !a.is_empty()))
    }

    async fn create_conversation(&self, user_id: &str, conversation: &Conversation) -> Result<()> {
        let mut item = key(
            user_pk(user_id),
            format!("CONV#{}", conversation.conversation_id),
        );
        item.insert("body".into(), s(serde_json::to_string(conversation)?));
        if self.put_new(item).await? {
            Ok(())
        } else {
            Err(Error::Conflict("conversation exists".into()))
        }
    }

    async fn get_conversation(
        &self,
        user_id: &str,
        conversation_id: &str,
    ) -> Result<Option<Conversation>> {
        self.get(&user_pk(user_id), &format!("CONV#{conversation_id}"))
            .await?
            .as_ref()
            .map(body)
            .transpose()
    }

    async fn list_conversations(
        &self,
        user_id: &str,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Conversation>> {
        self.page(&user_pk(user_id), "CONV#", false, limit, next_token)
            .await
    }

    async fn add_user_message(
        &self,
        user_id: &str,
        conversation_id: &str,
        message: &Message,
        request: &RequestRecord,
    ) -> Result<()> {
        let conv_pk = format!("CONV#{conversation_id}");
        let turn = self.next_turn(&conv_pk).await?;
        let mut msg = key(&conv_pk, msg_sk(turn, 0));
        msg.insert("body".into(), s(serde_json::to_string(message)?));
        let mut index = key(&conv_pk, format!("MID#{}", message.message_id));
        index.insert("turn".into(), n(turn));
        let put = |item: Item| -> Result<TransactWriteItem> {
            Ok(TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(&self.table)
                        .set_item(Some(item))
                        .condition_expression("attribute_not_exists(pk)")
                        .build()
                        .map_err(|e| Error::Storage(e.to_string()))?,
                )
                .build())
        };
        self.client
            .transact_write_items()
            .transact_items(put(msg)?)
            .transact_items(put(index)?)
            .transact_items(put(Self::request_item(user_id, request, 1)?)?)
            .send()
            .await
            .map_err(|e| storage("add message", e))?;
        Ok(())
    }

    async fn put_reply(
        &self,
        conversation_id: &str,
        reply_to: &str,
        reply: &Message,
    ) -> Result<Message> {
        let turn = self
            .turn_of(conversation_id, reply_to)
            .await?
            .ok_or(Error::NotFound)?;
        let (pk, sk) = (format!("CONV#{conversation_id}"), msg_sk(turn, 1));
        let mut item = key(&pk, &sk);
        item.insert("body".into(), s(serde_json::to_string(reply)?));
        if self.put_new(item).await? {
            return Ok(reply.clone());
        }
        // A twin delivery wrote first: its reply stands.
        self.get(&pk, &sk)
            .await?
            .as_ref()
            .map(body)
            .transpose()?
            .ok_or(Error::NotFound)
    }

    async fn get_reply(&self, conversation_id: &str, reply_to: &str) -> Result<Option<Message>> {
        let Some(turn) = self.turn_of(conversation_id, reply_to).await? else {
            return Ok(None);
        };
        self.get(&format!("CONV#{conversation_id}"), &msg_sk(turn, 1))
            .await?
            .as_ref()
            .map(body)
            .transpose()
    }

    async fn list_messages(
        &self,
        user_id: &str,
        conversation_id: &str,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Message>> {
        if self
            .get_conversation(user_id, conversation_id)
            .await?
            .is_none()
        {
            return Err(Error::NotFound);
        }
        self.page(
            &format!("CONV#{conversation_id}"),
            "MSG#",
            true,
            limit,
            next_token,
        )
        .await
    }

    async fn history_before(
        &self,
        conversation_id: &str,
        message_id: &str,
        limit: usize,
    ) -> Result<Vec<Message>> {
        let Some(turn) = self.turn_of(conversation_id, message_id).await? else {
            return Ok(Vec::new());
        };
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk AND sk BETWEEN :lo AND :hi")
            .expression_attribute_values(":pk", s(format!("CONV#{conversation_id}")))
            .expression_attribute_values(":lo", s("MSG#"))
            // Sorts before every sub of `turn`: "MSG#{turn}#" < "MSG#{turn}#0".
            .expression_attribute_values(":hi", s(format!("MSG#{turn:012}#")))
            .scan_index_forward(false)
            .limit(limit as i32)
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| storage("query history", e))?;
        let mut messages = out
            .items
            .unwrap_or_default()
            .iter()
            .map(body)
            .collect::<Result<Vec<Message>>>()?;
        messages.reverse();
        Ok(messages)
    }

    async fn create_requests(
        &self,
        user_id: &str,
        requests: &[RequestRecord],
        batch: Option<&Batch>,
    ) -> Result<()> {
        // Requests first, then the batch that names them: a crash in between leaves requests no
        // queue message points to and no client was told of (no 202 was sent).
        for chunk in requests.chunks(25) {
            let mut writes = chunk
                .iter()
                .map(|r| {
                    Ok(WriteRequest::builder()
                        .put_request(
                            PutRequest::builder()
                                .set_item(Some(Self::request_item(user_id, r, 1)?))
                                .build()
                                .map_err(|e| Error::Storage(e.to_string()))?,
                        )
                        .build())
                })
                .collect::<Result<Vec<_>>>()?;
            for _ in 0..5 {
                let out = self
                    .client
                    .batch_write_item()
                    .request_items(&self.table, writes.clone())
                    .send()
                    .await
                    .map_err(|e| storage("write requests", e))?;
                writes = out
                    .unprocessed_items
                    .and_then(|mut u| u.remove(&self.table))
                    .unwrap_or_default();
                if writes.is_empty() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            if !writes.is_empty() {
                return Err(Error::Storage(
                    "dynamodb throttled the request writes".into(),
                ));
            }
        }
        if let Some(b) = batch {
            let mut item = key(user_pk(user_id), format!("BATCH#{}", b.batch_id));
            item.insert("body".into(), s(serde_json::to_string(b)?));
            self.put_new(item).await?;
        }
        Ok(())
    }

    async fn get_request(&self, user_id: &str, request_id: &str) -> Result<Option<RequestRecord>> {
        match self.get(&format!("REQ#{request_id}"), "REQ").await? {
            Some(item) if get_s(&item, "user_id") == Some(user_id) => body(&item).map(Some),
            _ => Ok(None),
        }
    }

    async fn transition(
        &self,
        request_id: &str,
        transition: Transition,
    ) -> Result<(RequestRecord, bool)> {
        // Optimistic concurrency: write only over the version read; on a lost race, read again.
        for _ in 0..10 {
            let item = self
                .get(&format!("REQ#{request_id}"), "REQ")
                .await?
                .ok_or(Error::NotFound)?;
            let (user, version) = (
                get_s(&item, "user_id").unwrap_or_default().to_owned(),
                get_n(&item, "version").unwrap_or(0),
            );
            let mut record: RequestRecord = body(&item)?;
            if !transition.clone().apply(&mut record) {
                return Ok((record, false));
            }
            let written = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(Self::request_item(&user, &record, version + 1)?))
                .condition_expression("version = :v")
                .expression_attribute_values(":v", n(version))
                .send()
                .await;
            match written {
                Ok(_) => return Ok((record, true)),
                Err(e) if is_conditional_failure(&e) => continue,
                Err(e) => return Err(storage("update request", e)),
            }
        }
        Err(Error::Storage(
            "request kept changing under the update".into(),
        ))
    }

    async fn get_batch(&self, user_id: &str, batch_id: &str) -> Result<Option<Batch>> {
        let Some(item) = self
            .get(&user_pk(user_id), &format!("BATCH#{batch_id}"))
            .await?
        else {
            return Ok(None);
        };
        let mut batch: Batch = body(&item)?;
        let (mut succeeded, mut failed, mut pending) = (0, 0, 0);
        for chunk in batch.request_ids.chunks(100) {
            let mut keys: Vec<Item> = chunk
                .iter()
                .map(|id| key(format!("REQ#{id}"), "REQ"))
                .collect();
            while !keys.is_empty() {
                let out = self
                    .client
                    .batch_get_item()
                    .request_items(
                        &self.table,
                        KeysAndAttributes::builder()
                            .set_keys(Some(keys))
                            .projection_expression("#s")
                            .expression_attribute_names("#s", "status")
                            .consistent_read(true)
                            .build()
                            .map_err(|e| Error::Storage(e.to_string()))?,
                    )
                    .send()
                    .await
                    .map_err(|e| storage("read batch", e))?;
                for item in out
                    .responses
                    .and_then(|mut r| r.remove(&self.table))
                    .unwrap_or_default()
                {
                    match get_s(&item, "status").and_then(RequestStatus::parse) {
                        Some(RequestStatus::Succeeded) => succeeded += 1,
                        Some(RequestStatus::Failed) => failed += 1,
                        _ => pending += 1,
                    }
                }
                keys = out
                    .unprocessed_keys
                    .and_then(|mut u| u.remove(&self.table))
                    .map(|k| k.keys)
                    .unwrap_or_default();
            }
        }
        batch.succeeded = succeeded;
        batch.failed = failed;
        batch.pending = pending;
        Ok(Some(batch))
    }

    async fn idempotency_begin(
        &self,
        user_id: &str,
        key_: &str,
        fingerprint: &str,
        lock_ms: i64,
        ttl_ms: i64,
    ) -> Result<IdempotencyBegin> {
        let (pk, sk) = (user_pk(user_id), format!("IDEM#{key_}"));
        for _ in 0..3 {
            let now = now_ms();
            let existing = self
                .get(&pk, &sk)
                .await?
                .filter(|i| get_n(i, "expires_ms").unwrap_or(0) > now);
            let condition = match &existing {
                Some(item) => {
                    if get_s(item, "fingerprint") != Some(fingerprint) {
                        return Ok(IdempotencyBegin::Mismatch);
                    }
                    if let Some(status) = get_n(item, "status_code") {
                        return Ok(IdempotencyBegin::Replay {
                            status: status as u16,
                            body: get_s(item, "response_body").unwrap_or_default().to_owned(),
                        });
                    }
                    let locked = get_n(item, "locked_ms").unwrap_or(0);
                    if locked + lock_ms > now {
                        return Ok(IdempotencyBegin::InFlight);
                    }
                    // An abandoned claim: take it over (with its first time, so ids derived
                    // from the key come out the same), unless someone else just did.
                    Some((
                        locked,
                        get_n(item, "first_ms").filter(|f| *f > 0).unwrap_or(now),
                    ))
                }
                None => None,
            };
            let first_ms = condition.map_or(now, |(_, first)| first);
            let mut item = key(&pk, &sk);
            item.insert("fingerprint".into(), s(fingerprint));
            item.insert("locked_ms".into(), n(now));
            item.insert("first_ms".into(), n(first_ms));
            item.insert("expires_ms".into(), n(now + ttl_ms));
            item.insert("expires_at".into(), n((now + ttl_ms) / 1000));
            let mut put = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item));
            put = match condition {
                Some((locked, _)) => put
                    .condition_expression(
                        "locked_ms = :locked AND attribute_not_exists(status_code)",
                    )
                    .expression_attribute_values(":locked", n(locked)),
                None => put
                    .condition_expression("attribute_not_exists(pk) OR expires_ms < :now")
                    .expression_attribute_values(":now", n(now)),
            };
            match put.send().await {
                Ok(_) => {
                    return Ok(IdempotencyBegin::Started {
                        first_ms,
                        claim: now,
                    })
                }
                Err(e) if is_conditional_failure(&e) => continue,
                Err(e) => return Err(storage("claim idempotency key", e)),
            }
        }
        Ok(IdempotencyBegin::InFlight)
    }

    async fn idempotency_complete(
        &self,
        user_id: &str,
        key_: &str,
        claim: i64,
        status: u16,
        body_: &str,
    ) -> Result<()> {
        // Only over this handler's own claim: without the condition, a handler whose claim was
        // taken over would overwrite the new claim's answer, or (the item gone) create one with
        // no fingerprint and no expiry that would answer `409` for good.
        match self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(user_pk(user_id), format!("IDEM#{key_}"))))
            .update_expression("SET status_code = :s, response_body = :b")
            .condition_expression("locked_ms = :c")
            .expression_attribute_values(":s", n(status))
            .expression_attribute_values(":b", s(body_))
            .expression_attribute_values(":c", n(claim))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conditional_failure(&e) => {
                tracing::warn!("an idempotency claim was taken over; its answer is not stored");
                Ok(())
            }
            Err(e) => Err(storage("complete idempotency key", e)),
        }
    }

    async fn idempotency_release(&self, user_id: &str, key_: &str, claim: i64) -> Result<()> {
        match self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key(user_pk(user_id), format!("IDEM#{key_}"))))
            .condition_expression("attribute_not_exists(status_code) AND locked_ms = :c")
            .expression_attribute_values(":c", n(claim))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conditional_failure(&e) => Ok(()),
            Err(e) => Err(storage("release idempotency key", e)),
        }
    }

    async fn ping(&self) -> Result<()> {
        self.client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map_err(|e| storage("describe table", e))?;
        Ok(())
    }
}
