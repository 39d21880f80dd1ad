//! Accept, start and settle on the AWS backend.
//!
//! **Accept** is a transactional outbox. One DynamoDB `TransactWriteItems` records everything
//! the client is told about — the request(s), the chat turn's user message (with a check that
//! the conversation is the caller's), the batch, the idempotency key's answer — together with an
//! *outbox* item holding the jobs to send. Then the jobs go to SQS and the outbox item is
//! deleted. A process that dies between the transaction and the send leaves the outbox item
//! behind; every worker process sweeps the outbox of its queue (`sweep`) and sends what has
//! waited longer than a setting (30 s), so the job still runs. Workers are idempotent, so a job
//! sent twice (the sweeper raced a slow sender) is harmless.
//!
//! Outbox items live in a few partitions per queue (`OUTBOX#{kind}#{shard}`) sorted by when
//! they are due, so a sweep is a handful of key-range queries, never a scan. A batch records its
//! request items through the outbox too (they would not fit in one transaction: DynamoDB takes
//! at most 100 items): its records ride in the outbox item and are written, each only if absent,
//! before its jobs are sent.
//!
//! **Settle** is one transaction for the records — the result record (only if absent), the
//! request over the version read (optimistic concurrency) and its `request.updated` event —
//! then the queue operation on the message. A worker killed in between leaves the request
//! finished and the message to be redelivered, found a duplicate and deleted.

use std::sync::Arc;

use async_trait::async_trait;

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{ConditionCheck, Put, TransactWriteItem, Update};
use serde::{Deserialize, Serialize};

use super::{Accept, AcceptOutcome, Ack, Atomic, Settle, Started};
use crate::domain::{RequestInput, RequestKind, RequestRecord, RequestResult};
use crate::events::dynamodb::DynamoEventBus;
use crate::events::{Event, EventBus};
use crate::queue::{Attributes, Delivery, Outgoing, Queue};
use crate::store::dynamodb::{
    get_n, get_s, key, msg_sk, n, put_if_absent, s, storage, stored_answer, user_pk, DynamoStore,
    Item,
};
use crate::store::{ConversationStore, RequestStore, Transition};
use crate::time::now_ms;
use crate::{Error, Result};

/// Outbox partitions per queue: spreads the writes of busy accepts over several keys.
const OUTBOX_SHARDS: u64 = 8;
/// Outbox items one sweep takes from each partition.
const SWEEP_PAGE: i32 = 25;

pub struct AwsAtomic {
    pub store: Arc<DynamoStore>,
    pub persona_queue: Arc<dyn Queue>,
    pub chat_queue: Arc<dyn Queue>,
    /// Events are written inside the settlement's transaction, so this is the DynamoDB bus.
    pub events: Arc<DynamoEventBus>,
    /// How long an outbox item waits for its sender before a sweep sends it.
    pub sweep_after: std::time::Duration,
}

/// What an outbox item holds: the jobs of one accept and, for a batch, the request records
/// still to write.
#[derive(Debug, Serialize, Deserialize)]
struct Outbox {
    user_id: String,
    jobs: Vec<OutboxJob>,
    #[serde(default)]
    requests: Vec<RequestRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
struct OutboxJob {
    body: String,
    attributes: Attributes,
}

/// Why a transaction was cancelled: a reason code per item, in order.
struct Cancelled(Vec<Option<String>>);

impl Cancelled {
    /// The reasons of a cancelled transaction; any other error is returned as one.
    fn of(
        e: aws_sdk_dynamodb::error::SdkError<TransactWriteItemsError>,
        op: &str,
    ) -> Result<Cancelled> {
        match e.as_service_error() {
            Some(TransactWriteItemsError::TransactionCanceledException(c)) => Ok(Cancelled(
                c.cancellation_reasons()
                    .iter()
                    .map(|r| r.code().map(str::to_owned))
                    .collect(),
            )),
            _ => Err(storage(op, e)),
        }
    }

    /// Whether the item at `at` failed its condition.
    fn failed(&self, at: Option<usize>) -> bool {
        at.and_then(|i| self.0.get(i).cloned().flatten())
            .is_some_and(|code| code == "ConditionalCheckFailed")
    }
}

fn outbox_pk(kind: RequestKind, shard: u64) -> String {
    format!("OUTBOX#{kind}#{shard}")
}

impl AwsAtomic {
    /// Runs a transaction: `None` when it committed, the reasons when DynamoDB cancelled it.
    async fn transact(&self, items: Vec<TransactWriteItem>, op: &str) -> Result<Option<Cancelled>> {
        match self
            .store
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await
        {
            Ok(_) => Ok(None),
            Err(e) => Cancelled::of(e, op).map(Some),
        }
    }

    /// Carries out an outbox item: writes a batch's request records (each only if absent, so a
    /// second run never resets a request a worker already moved), sends the jobs, and deletes
    /// the item.
    async fn dispatch(&self, kind: RequestKind, pk: &str, sk: &str, outbox: Outbox) -> Result<()> {
        let records = outbox
            .requests
            .iter()
            .map(|r| DynamoStore::request_item(&outbox.user_id, r, 1))
            .collect::<Result<Vec<Item>>>()?;
        for chunk in records.chunks(16) {
            let puts = chunk.iter().map(|item| self.store.put_new(item.clone()));
            for written in futures::future::join_all(puts).await {
                written?;
            }
        }
        let jobs: Vec<Outgoing> = outbox
            .jobs
            .into_iter()
            .map(|j| Outgoing {
                body: j.body,
                attributes: j.attributes,
            })
            .collect();
        // SQS takes at most 10 messages per call.
        for chunk in jobs.chunks(10) {
            self.queue(kind).send(chunk).await?;
        }
        self.store
            .client
            .delete_item()
            .table_name(&self.store.table)
            .set_key(Some(key(pk, sk)))
            .send()
            .await
            .map_err(|e| storage("clear outbox", e))?;
        Ok(())
    }

    fn queue(&self, kind: RequestKind) -> &Arc<dyn Queue> {
        match kind {
            RequestKind::Persona => &self.persona_queue,
            RequestKind::Chat => &self.chat_queue,
        }
    }

    async fn publish(&self, user_id: &str, record: &RequestRecord) {
        let event = Event::updated(record);
        if let Err(e) = self.events.publish(user_id, &event).await {
            tracing::warn!(error = %e, "could not push a request update");
        }
    }

    /// The records of a settlement in one transaction: the result record (persona or reply,
    /// only if absent), the request over the version read, and its `request.updated` event.
    /// A twin's result that stands already is taken instead; a request that moved meanwhile
    /// is read again.
    async fn settle_records(
        &self,
        user_id: &str,
        request_id: &str,
        transition: Transition,
        last_fragment: Option<&str>,
    ) -> Result<Option<RequestRecord>> {
        let table = self.store.table.as_str();
        let mut transition = transition;
        // The result record to write, and where it goes; `None` once a twin's stands.
        let mut pending: Option<Item> = None;
        let mut first = true;
        for _ in 0..10 {
            let Some(item) = self.store.get(&format!("REQ#{request_id}"), "REQ").await? else {
                return Ok(None);
            };
            if get_s(&item, "user_id") != Some(user_id) {
                return Ok(None);
            }
            let version = get_n(&item, "version").unwrap_or(0);
            let mut record: RequestRecord = crate::store::dynamodb::body(&item)?;
            if record.status.is_final() {
                return Ok(Some(record));
            }
            if first {
                first = false;
                if let Transition::Succeed { result, .. } = &transition {
                    pending = Some(self.result_item(user_id, &record, result).await?);
                }
            }
            if !transition.clone().apply(&mut record) {
                return Ok(Some(record));
            }
            let mut items = Vec::new();
            let effect_at = pending.as_ref().map(|_| items.len());
            if let Some(effect) = &pending {
                items.push(put_if_absent(table, effect.clone())?);
            }
            let request_at = items.len();
            items.push(
                TransactWriteItem::builder()
                    .put(
                        Put::builder()
                            .table_name(table)
                            .set_item(Some(DynamoStore::request_item(
                                user_id,
                                &record,
                                version + 1,
                            )?))
                            .condition_expression("version = :v")
                            .expression_attribute_values(":v", n(version))
                            .build()
                            .map_err(|e| storage("build a transaction item", e))?,
                    )
                    .build(),
            );
            // Event items take increasing ids as they are made: the delta sorts first.
            let mut events = Vec::new();
            if let Some(text) = last_fragment {
                let (name, data) = Event::delta(request_id, text).to_parts()?;
                events.push(self.events.event_item(user_id, name, &data));
            }
            let (name, data) = Event::updated(&record).to_parts()?;
            events.push(self.events.event_item(user_id, name, &data));
            for event in events {
                items.push(
                    TransactWriteItem::builder()
                        .put(
                            Put::builder()
                                .table_name(table)
                                .set_item(Some(event))
                                .build()
                                .map_err(|e| storage("build a transaction item", e))?,
                        )
                        .build(),
                );
            }
            let Some(cancelled) = self.transact(items, "settle").await? else {
                return Ok(Some(record));
            };
            if cancelled.failed(effect_at) {
                // A twin delivery stored its result first: that one stands.
                let effect = pending.take().unwrap_or_default();
                let (pk, sk) = (
                    get_s(&effect, "pk").unwrap_or_default().to_owned(),
                    get_s(&effect, "sk").unwrap_or_default().to_owned(),
                );
                let stored = self
                    .store
                    .get(&pk, &sk)
                    .await?
                    .ok_or_else(|| Error::storage_msg("a result vanished"))?;
                if let Transition::Succeed { result, .. } = &mut transition {
                    **result = match **result {
                        RequestResult::Persona(_) => {
                            RequestResult::Persona(crate::store::dynamodb::body(&stored)?)
                        }
                        RequestResult::Message(_) => {
                            RequestResult::Message(crate::store::dynamodb::body(&stored)?)
                        }
                    };
                }
            } else if !cancelled.failed(Some(request_at)) {
                return Err(Error::storage_msg(format!(
                    "settle cancelled: {:?}",
                    cancelled.0
                )));
            }
            // Either way, read the request again and write over its new version.
        }
        Err(Error::storage_msg(
            "request kept changing under the settlement",
        ))
    }

    /// The item a succeeded job's result is stored as: the persona, or the reply in the turn
    /// of the user message it answers.
    async fn result_item(
        &self,
        user_id: &str,
        record: &RequestRecord,
        result: &RequestResult,
    ) -> Result<Item> {
        Ok(match (result, &record.input) {
            (RequestResult::Persona(p), _) => {
                let mut item = key(user_pk(user_id), format!("PERSONA#{}", p.persona_id));
                item.insert("body".into(), s(serde_json::to_string(p)?));
                item
            }
            (
                RequestResult::Message(m),
                RequestInput::Chat {
                    conversation_id,
                    message_id,
                    ..
                },
            ) => {
                let conv_pk = format!("CONV#{conversation_id}");
                let turn = self
                    .store
                    .get(&conv_pk, &format!("MID#{message_id}"))
                    .await?
                    .and_then(|i| get_n(&i, "turn"))
                    .ok_or(Error::NotFound)?;
                let mut item = key(&conv_pk, msg_sk(turn, 1));
                item.insert("body".into(), s(serde_json::to_string(m)?));
                item
            }
            (RequestResult::Message(_), RequestInput::Persona { .. }) => {
                return Err(Error::internal_msg("a reply for a persona request"))
            }
        })
    }
}

#[async_trait]
impl Atomic for AwsAtomic {
    async fn accept(&self, a: Accept) -> Result<AcceptOutcome> {
        let table = self.store.table.as_str();
        let now = now_ms();
        let mut items = Vec::new();
        // Index in `items` of the conversation check and of the key's answer, to tell apart
        // why a transaction was cancelled.
        let (mut owner_check, mut answer_at) = (None, None);
        if let Some(m) = &a.message {
            // A cheap early "no" for another user's conversation (the transaction checks again),
            // before a turn number is taken.
            if self
                .store
                .get_conversation(&a.user_id, &m.conversation_id)
                .await?
                .is_none()
            {
                return Err(Error::NotFound);
            }
            let conv_pk = format!("CONV#{}", m.conversation_id);
            let turn = self.store.next_turn(&conv_pk).await?;
            owner_check = Some(items.len());
            items.push(
                TransactWriteItem::builder()
                    .condition_check(
                        ConditionCheck::builder()
                            .table_name(table)
                            .set_key(Some(key(
                                user_pk(&a.user_id),
                                format!("CONV#{}", m.conversation_id),
                            )))
                            .condition_expression("attribute_exists(pk)")
                            .build()
                            .map_err(|e| storage("build a transaction item", e))?,
                    )
                    .build(),
            );
            let mut msg = key(&conv_pk, msg_sk(turn, 0));
            msg.insert("body".into(), s(serde_json::to_string(&m.message)?));
            items.push(put_if_absent(table, msg)?);
            let mut index = key(&conv_pk, format!("MID#{}", m.message.message_id));
            index.insert("turn".into(), n(turn));
            items.push(put_if_absent(table, index)?);
        }
        // A batch's requests are written through the outbox (see the module's comment).
        let deferred = a.batch.is_some();
        if !deferred {
            for r in &a.requests {
                items.push(put_if_absent(
                    table,
                    DynamoStore::request_item(&a.user_id, r, 1)?,
                )?);
            }
        }
        if let Some(b) = &a.batch {
            let mut item = key(user_pk(&a.user_id), format!("BATCH#{}", b.batch_id));
            item.insert("body".into(), s(serde_json::to_string(b)?));
            items.push(put_if_absent(table, item)?);
        }
        let outbox = Outbox {
            user_id: a.user_id.clone(),
            jobs: a
                .jobs
                .iter()
                .map(|j| OutboxJob {
                    body: j.body.clone(),
                    attributes: j.attributes.clone(),
                })
                .collect(),
            requests: if deferred {
                a.requests.clone()
            } else {
                Vec::new()
            },
        };
        let first = a
            .requests
            .first()
            .map(|r| r.request_id.clone())
            .ok_or_else(|| Error::internal_msg("an accept without requests"))?;
        let shard = first.bytes().map(u64::from).sum::<u64>() % OUTBOX_SHARDS;
        let due = now + self.sweep_after.as_millis() as i64;
        let (box_pk, box_sk) = (outbox_pk(a.kind, shard), format!("{due:015}#{first}"));
        let mut item = key(&box_pk, &box_sk);
        item.insert("body".into(), s(serde_json::to_string(&outbox)?));
        items.push(put_if_absent(table, item)?);
        if let Some(x) = &a.answer {
            answer_at = Some(items.len());
            let expires = now + x.ttl_ms;
            items.push(
                TransactWriteItem::builder()
                    .update(
                        Update::builder()
                            .table_name(table)
                            .set_key(Some(key(user_pk(&a.user_id), format!("IDEM#{}", x.key))))
                            .update_expression(
                                "SET status_code = :status, response_body = :body, \
                                 fingerprint = :fp, locked_ms = if_not_exists(locked_ms, :now), \
                                 first_ms = if_not_exists(first_ms, :now), \
                                 expires_ms = if_not_exists(expires_ms, :exp), \
                                 expires_at = if_not_exists(expires_at, :exp_secs)",
                            )
                            .condition_expression("attribute_not_exists(status_code)")
                            .expression_attribute_values(":status", n(x.stored.code))
                            .expression_attribute_values(":body", s(&x.stored.body))
                            .expression_attribute_values(":fp", s(&x.fingerprint))
                            .expression_attribute_values(":now", n(now))
                            .expression_attribute_values(":exp", n(expires))
                            .expression_attribute_values(":exp_secs", n(expires / 1000))
                            .build()
                            .map_err(|e| storage("build a transaction item", e))?,
                    )
                    .build(),
            );
        }
        if items.len() > 100 {
            return Err(Error::Invalid(
                "too much for one DynamoDB transaction (100 items)".into(),
            ));
        }
        if let Some(cancelled) = self.transact(items, "accept").await? {
            if cancelled.failed(answer_at) {
                // Another call with the same key recorded its answer first: replay it.
                let x = a
                    .answer
                    .as_ref()
                    .map(|x| x.key.as_str())
                    .unwrap_or_default();
                let item = self
                    .store
                    .get(&user_pk(&a.user_id), &format!("IDEM#{x}"))
                    .await?
                    .as_ref()
                    .and_then(stored_answer)
                    .ok_or_else(|| Error::storage_msg("idempotency answer vanished"))?;
                return Ok(AcceptOutcome::Replay(item));
            }
            if cancelled.failed(owner_check) {
                return Err(Error::NotFound);
            }
            return Err(Error::Conflict(format!(
                "the accept collided with existing records: {:?}",
                cancelled.0
            )));
        }
        // Accepted: the outbox guarantees the jobs from here on, so a failed send is not the
        // client's problem.
        if let Err(e) = self.dispatch(a.kind, &box_pk, &box_sk, outbox).await {
            tracing::warn!(error = %e, "jobs not sent yet; the outbox sweep will send them");
        }
        Ok(AcceptOutcome::Recorded)
    }

    async fn sweep(&self, kind: RequestKind) -> Result<usize> {
        let due = format!("{:015}", now_ms());
        let mut sent = 0;
        for shard in 0..OUTBOX_SHARDS {
            let pk = outbox_pk(kind, shard);
            let out = self
                .store
                .client
                .query()
                .table_name(&self.store.table)
                .key_condition_expression("pk = :pk AND sk < :due")
                .expression_attribute_values(":pk", s(&pk))
                .expression_attribute_values(":due", s(&due))
                .limit(SWEEP_PAGE)
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| storage("sweep outbox", e))?;
            for item in out.items.unwrap_or_default() {
                let (Some(sk), Some(raw)) = (get_s(&item, "sk"), get_s(&item, "body")) else {
                    continue;
                };
                let outbox: Outbox = serde_json::from_str(raw)?;
                tracing::warn!(outbox = %sk, jobs = outbox.jobs.len(), "sending jobs an accept left unsent");
                self.dispatch(kind, &pk, sk, outbox).await?;
                sent += 1;
            }
        }
        Ok(sent)
    }

    async fn start(&self, user_id: &str, request_id: &str) -> Result<Started> {
        let Some(record) = self.store.get_request(user_id, request_id).await? else {
            return Ok(Started::Missing);
        };
        if record.status.is_final() {
            return Ok(Started::Finished(record));
        }
        let (record, _) = self.store.transition(request_id, Transition::Start).await?;
        self.publish(user_id, &record).await;
        Ok(Started::Running(record))
    }

    async fn settle(&self, delivery: &Delivery, settle: Settle) -> Result<Option<RequestRecord>> {
        let Settle {
            kind,
            user_id,
            request_id,
            transition,
            ack,
            last_fragment,
        } = settle;
        let record = self
            .settle_records(&user_id, &request_id, transition, last_fragment.as_deref())
            .await?;
        // Then the message: if this worker dies first, the redelivery finds the request
        // finished and only deletes it.
        let queue = self.queue(kind);
        match ack {
            Ack::Delete => queue.delete(&delivery.receipt).await?,
            Ack::Retry { delay } => queue.change_visibility(&delivery.receipt, delay).await?,
            Ack::DeadLetter { reason } => queue.dead_letter(delivery, &reason).await?,
        }
        Ok(record)
    }
}
