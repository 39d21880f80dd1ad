//! The store on Amazon DynamoDB: one table, keys `pk`/`sk` (strings), every query of the API
//! served by a key lookup or a key-range query — no Scan.
//!
//! | item | pk | sk | notes |
//! |---|---|---|---|
//! | persona | `USER#{user}` | `PERSONA#{persona_id}` | ids are time-ordered: query backwards = newest first |
//! | conversation | `USER#{user}` | `CONV#{conversation_id}` | |
//! | batch | `USER#{user}` | `BATCH#{batch_id}` | counts read from its requests |
//! | idempotency key | `USER#{user}` | `IDEM#{key}` | TTL |
//! | turn counter | `CONV#{conversation_id}` | `META` | `SET turns` on condition of the last turn |
//! | message | `CONV#{conversation_id}` | `MSG#{turn:012}#{sub}` | user message sub 0, its reply sub 1 |
//! | message index | `CONV#{conversation_id}` | `MID#{message_id}` | message id → turn |
//! | request | `REQ#{request_id}` | `REQ` | owner, status, version; TTL once finished |
//! | tombstone | `USER#{user}` | `GONE#{kind}#{id}` | a deleted record, for the change feed; TTL 30 days |
//!
//! Records are stored as a JSON `body` attribute beside the few attributes conditions read.
//! Record items (persona, conversation, message, request) and tombstones also carry
//! `sync_user` and `sync_at` from their latest change: the keys of the sparse index `by_change`,
//! the user's change feed (see `sync`). No other item carries them.
//! Effects are conditional writes: a persona or a reply is written only if absent, and a request
//! changes only from the version that was read (optimistic concurrency), so redeliveries and
//! racing workers cannot write twice or move a state backwards.

use std::collections::HashMap;

mod conversations;
mod idempotency;
mod personas;
mod requests;
mod sync;

pub(crate) use conversations::{before_try, LastTurn, TurnItems, TURN_TRIES};
pub(crate) use idempotency::stored_answer;
pub(crate) use sync::{mark_changed, sync_stamp, tombstone, ChangeValues, CHANGE_SET};

use async_trait::async_trait;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem};
use aws_sdk_dynamodb::Client;

use super::{token, Ping};
use crate::domain::Page;
use crate::ids::{ConversationId, MessageId};
use crate::memo::{KeyedLocks, Memo};
use crate::{Error, Result};

pub(crate) type Item = HashMap<String, AttributeValue>;

pub struct DynamoStore {
    pub(crate) client: Client,
    pub(crate) table: String,
    /// Turns of user messages this process has looked up (a worker needs a message's turn for
    /// its history, then for its reply): a message's turn never changes once written. Dropped
    /// whole past [`TURNS_KEPT`].
    pub(crate) turns: Memo<MessageId, i64>,
    /// The last turn this process saw taken per conversation: the next append's guess, checked
    /// by its transaction's condition (a stale guess costs a read and a second try).
    pub(crate) heads: Memo<ConversationId, (i64, std::time::Instant)>,
    /// One append at a time per conversation in this process, so its own appends never
    /// collide on the counter (see `KeyedLocks`).
    pub(crate) appends: KeyedLocks<ConversationId>,
}

/// Most message turns a store remembers.
const TURNS_KEPT: usize = 10_000;

/// The index that lists a user's conversations by their latest message: `pk` (the user's
/// partition) and `last_message_at`, which only conversation items carry (a sparse index).
/// The same in `infra/template.yaml`.
pub(crate) const ACTIVITY_INDEX: &str = "by_activity";

/// A global index of the table: its name, its keys (string attributes) and whether it
/// projects every attribute (or only the keys).
struct IndexSpec {
    name: &'static str,
    hash: &'static str,
    range: &'static str,
    all: bool,
}

/// The table's global indexes, made with it or added to it by `aws-init`, in this order. The
/// activity index projects every attribute (conversation items are small, and a listing then
/// reads nothing else); the change feed reads its records from the table (by key, consistent).
const INDEXES: [IndexSpec; 2] = [
    IndexSpec {
        name: ACTIVITY_INDEX,
        hash: "pk",
        range: "last_message_at",
        all: true,
    },
    IndexSpec {
        name: sync::CHANGE_INDEX,
        hash: "sync_user",
        range: "sync_at",
        all: false,
    },
];

fn key_schema(
    name: &str,
    kt: aws_sdk_dynamodb::types::KeyType,
) -> Result<aws_sdk_dynamodb::types::KeySchemaElement> {
    aws_sdk_dynamodb::types::KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kt)
        .build()
        .map_err(|e| Error::config("key schema", e))
}

/// The definitions of the table's keys and of these indexes' keys (all strings), each once.
fn key_attributes<'a>(
    indexes: impl IntoIterator<Item = &'a IndexSpec>,
) -> Result<Vec<aws_sdk_dynamodb::types::AttributeDefinition>> {
    use aws_sdk_dynamodb::types::{AttributeDefinition, ScalarAttributeType};
    let mut names = vec!["pk", "sk"];
    for index in indexes {
        for name in [index.hash, index.range] {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
        .into_iter()
        .map(|name| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(|e| Error::config("attribute definition", e))
        })
        .collect()
}

impl IndexSpec {
    /// The index's key schema and projection.
    fn parts(
        &self,
    ) -> Result<(
        Vec<aws_sdk_dynamodb::types::KeySchemaElement>,
        aws_sdk_dynamodb::types::Projection,
    )> {
        use aws_sdk_dynamodb::types::{KeyType, Projection, ProjectionType};
        let projection = if self.all {
            ProjectionType::All
        } else {
            ProjectionType::KeysOnly
        };
        Ok((
            vec![
                key_schema(self.hash, KeyType::Hash)?,
                key_schema(self.range, KeyType::Range)?,
            ],
            Projection::builder().projection_type(projection).build(),
        ))
    }

    /// The index as a new table declares it.
    fn declared(&self) -> Result<aws_sdk_dynamodb::types::GlobalSecondaryIndex> {
        let (key_schema, projection) = self.parts()?;
        aws_sdk_dynamodb::types::GlobalSecondaryIndex::builder()
            .index_name(self.name)
            .set_key_schema(Some(key_schema))
            .projection(projection)
            .build()
            .map_err(|e| Error::config(format!("index {}", self.name), e))
    }

    /// The index as added to a table made before it.
    fn added(&self) -> Result<aws_sdk_dynamodb::types::GlobalSecondaryIndexUpdate> {
        use aws_sdk_dynamodb::types::{
            CreateGlobalSecondaryIndexAction, GlobalSecondaryIndexUpdate,
        };
        let (key_schema, projection) = self.parts()?;
        let create = CreateGlobalSecondaryIndexAction::builder()
            .index_name(self.name)
            .set_key_schema(Some(key_schema))
            .projection(projection)
            .build()
            .map_err(|e| Error::config(format!("index {}", self.name), e))?;
        Ok(GlobalSecondaryIndexUpdate::builder().create(create).build())
    }
}

pub(crate) fn storage(op: &str, e: impl Into<crate::error::BoxError>) -> Error {
    Error::storage(format!("dynamodb {op}"), e)
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
    let raw = get_s(item, "body").ok_or_else(|| Error::storage_msg("item without body"))?;
    serde_json::from_str(raw).map_err(|e| Error::storage("corrupt record", e))
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

/// A transaction's put of an item that must not exist yet.
pub(crate) fn put_if_absent(table: &str, item: Item) -> Result<TransactWriteItem> {
    Ok(TransactWriteItem::builder()
        .put(
            Put::builder()
                .table_name(table)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(pk)")
                .build()
                .map_err(|e| storage("build a put", e))?,
        )
        .build())
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
            turns: Memo::new(TURNS_KEPT),
            heads: Memo::new(TURNS_KEPT),
            appends: KeyedLocks::new(TURNS_KEPT),
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
        // One at a time: DynamoDB adds one index per table update.
        for index in &INDEXES {
            Self::ensure_index(client, table, index).await?;
        }
        Self::backfill_activity(client, table).await?;
        sync::backfill_changes(client, table).await?;
        Self::ensure_ttl(client, table).await
    }

    /// Gives conversations made before the activity index the attributes it and the persona
    /// filter read (`last_message_at`, from when they were made; `persona_id`), so they are
    /// listed again. One scan of the table per `aws-init`, writing only what lacks them: a
    /// rerun after a failure half-way finishes the job.
    async fn backfill_activity(client: &Client, table: &str) -> Result<()> {
        let mut start = None;
        loop {
            let out = client
                .scan()
                .table_name(table)
                .filter_expression(
                    "begins_with(pk, :user) AND begins_with(sk, :conv) \
                     AND attribute_not_exists(last_message_at)",
                )
                .expression_attribute_values(":user", s("USER#"))
                .expression_attribute_values(":conv", s("CONV#"))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| storage("scan for conversations to backfill", e))?;
            for item in out.items.unwrap_or_default() {
                let Ok(old) = body::<crate::domain::Conversation>(&item) else {
                    continue;
                };
                let (Some(pk), Some(sk)) = (get_s(&item, "pk"), get_s(&item, "sk")) else {
                    continue;
                };
                let written = client
                    .update_item()
                    .table_name(table)
                    .set_key(Some(key(pk, sk)))
                    .update_expression("SET last_message_at = :at, persona_id = :persona")
                    .condition_expression(
                        "attribute_exists(pk) AND attribute_not_exists(last_message_at)",
                    )
                    .expression_attribute_values(":at", s(&old.created_at))
                    .expression_attribute_values(":persona", s(old.persona_id.as_str()))
                    .send()
                    .await;
                match written {
                    Ok(_) => {}
                    Err(e) if is_conditional_failure(&e) => {}
                    Err(e) => return Err(storage("backfill a conversation", e)),
                }
            }
            start = out.last_evaluated_key;
            if start.is_none() {
                return Ok(());
            }
        }
    }

    /// Adds an index to a table made before it, and waits until it is built (DynamoDB fills
    /// a new index from the table's items; it answers queries only once `ACTIVE`). Items
    /// written before the change index are given its keys by `sync::backfill_changes`.
    async fn ensure_index(client: &Client, table: &str, index: &IndexSpec) -> Result<()> {
        use aws_sdk_dynamodb::types::IndexStatus;
        let status = || async {
            let described = client
                .describe_table()
                .table_name(table)
                .send()
                .await
                .map_err(|e| storage("describe table", e))?;
            Ok::<_, Error>(
                described
                    .table
                    .and_then(|t| t.global_secondary_indexes)
                    .unwrap_or_default()
                    .into_iter()
                    .find(|i| i.index_name() == Some(index.name))
                    .map(|i| i.index_status().cloned()),
            )
        };
        if status().await?.is_none() {
            client
                .update_table()
                .table_name(table)
                .set_attribute_definitions(Some(key_attributes([index])?))
                .global_secondary_index_updates(index.added()?)
                .send()
                .await
                .map_err(|e| storage(&format!("add the index {}", index.name), e))?;
        }
        for _ in 0..1800 {
            match status().await? {
                Some(Some(IndexStatus::Active)) | Some(None) => return Ok(()),
                _ => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
            }
        }
        Err(Error::storage_msg(format!(
            "the index {} was not built within 30 minutes; run aws-init again",
            index.name
        )))
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
                    .map_err(|e| Error::config("TTL specification", e))?,
            )
            .send()
            .await
            .map_err(|e| storage("enable TTL", e))?;
        Ok(())
    }

    /// Creates the table (on-demand), waits until it is `ACTIVE`, and turns TTL on
    /// `expires_at` on.
    pub async fn create_table(client: &Client, table: &str) -> Result<()> {
        use aws_sdk_dynamodb::types::{BillingMode, KeyType};
        client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .set_attribute_definitions(Some(key_attributes(&INDEXES)?))
            .key_schema(key_schema("pk", KeyType::Hash)?)
            .key_schema(key_schema("sk", KeyType::Range)?)
            .set_global_secondary_indexes(Some(
                INDEXES
                    .iter()
                    .map(IndexSpec::declared)
                    .collect::<Result<Vec<_>>>()?,
            ))
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

    /// Deletes the items of these keys, 25 to a batch.
    pub(crate) async fn delete_keys(&self, keys: &[Item]) -> Result<()> {
        use aws_sdk_dynamodb::types::{DeleteRequest, WriteRequest};
        for chunk in keys.chunks(25) {
            let deletes = chunk
                .iter()
                .map(|k| {
                    let delete = DeleteRequest::builder()
                        .set_key(Some(k.clone()))
                        .build()
                        .map_err(|e| storage("build a delete", e))?;
                    Ok(WriteRequest::builder().delete_request(delete).build())
                })
                .collect::<Result<Vec<_>>>()?;
            self.batch_write(deletes).await?;
        }
        Ok(())
    }

    /// Writes up to 25 puts or deletes in one batch, sending again what DynamoDB left
    /// unprocessed (it does under throttling) a few times before giving up.
    pub(crate) async fn batch_write(
        &self,
        mut writes: Vec<aws_sdk_dynamodb::types::WriteRequest>,
    ) -> Result<()> {
        for _ in 0..5 {
            let out = self
                .client
                .batch_write_item()
                .request_items(&self.table, writes)
                .send()
                .await
                .map_err(|e| storage("batch write", e))?;
            writes = out
                .unprocessed_items
                .and_then(|mut u| u.remove(&self.table))
                .unwrap_or_default();
            if writes.is_empty() {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Err(Error::storage_msg("dynamodb throttled a batch write"))
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
        let page = self
            .page_items(pk, prefix, forward, limit, next_token)
            .await?;
        Ok(Page {
            next_token: page.next_token,
            items: page.items.iter().map(body).collect::<Result<Vec<T>>>()?,
        })
    }

    /// [`DynamoStore::page`] of the items themselves.
    async fn page_items(
        &self,
        pk: &str,
        prefix: &str,
        forward: bool,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Item>> {
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
        Ok(Page {
            next_token: encode_token(out.last_evaluated_key.as_ref()),
            items: out.items.unwrap_or_default(),
        })
    }
}

#[async_trait]
impl Ping for DynamoStore {
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

/// Why a transaction was cancelled: a reason code per item, in order, and the item as it stood
/// where one was asked for (`ReturnValuesOnConditionCheckFailure`) and its condition failed.
pub(crate) struct Cancelled(pub(crate) Vec<Option<String>>, pub(crate) Vec<Option<Item>>);

impl Cancelled {
    /// The reasons of a cancelled transaction; any other error is returned as one.
    pub(crate) fn of(
        e: aws_sdk_dynamodb::error::SdkError<TransactWriteItemsError>,
        op: &str,
    ) -> Result<Cancelled> {
        match e.as_service_error() {
            Some(TransactWriteItemsError::TransactionCanceledException(c)) => Ok(Cancelled(
                c.cancellation_reasons()
                    .iter()
                    .map(|r| r.code().map(str::to_owned))
                    .collect(),
                c.cancellation_reasons()
                    .iter()
                    .map(|r| r.item().cloned())
                    .collect(),
            )),
            _ => Err(storage(op, e)),
        }
    }

    /// Whether another transaction on the same items was under way (DynamoDB cancels rather
    /// than waits): worth trying again.
    pub(crate) fn conflicted(&self) -> bool {
        self.0
            .iter()
            .any(|code| code.as_deref() == Some("TransactionConflict"))
    }

    /// A cancellation no caller expected, as an error.
    pub(crate) fn into_error(self, op: &str) -> Error {
        Error::storage_msg(format!("{op}: cancelled: {:?}", self.0))
    }

    /// Whether the item at `at` failed its condition.
    pub(crate) fn failed(&self, at: Option<usize>) -> bool {
        at.and_then(|i| self.0.get(i).cloned().flatten())
            .is_some_and(|code| code == "ConditionalCheckFailed")
    }
}
