//! Accept, start and settle on the AWS backend.
//!
//! **Accept** is a transactional outbox. One DynamoDB `TransactWriteItems` records everything
//! the client is told about — the request(s), the chat turn's user message (with a check that
//! the conversation is the caller's), the batch, the idempotency key's answer — together with an
//! *outbox* item holding the jobs to send. Then the jobs go to SQS. A batch's outbox item is
//! deleted right after; a single job's names itself on the job (a message attribute), and its
//! worker deletes it inside the transaction of the job's start or settlement, whichever comes
//! first: one call fewer per accept. A process that dies between the transaction and the send
//! leaves the outbox item behind; every worker process sweeps the outbox of its queue (`sweep`)
//! and sends what has waited longer than a setting (30 s), so the job still runs. Workers are
//! idempotent, so a job sent twice is harmless: the sweep also re-sends a job that is still
//! waiting in the queue after 30 s (a backlog), marked so that its worker reads the request
//! rather than trust the job's copy of it. The later of the two runs is dropped when it reads
//! (or starts) the request finished, or else its settlement finds the first's result and
//! stores nothing (an instant job's model call is then spent twice). One sweeper claims an
//! item before sending it, so several worker processes do not each send it.
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

mod accept;
mod settle;

use settle::Extras;

use std::sync::Arc;

use async_trait::async_trait;

use aws_sdk_dynamodb::types::TransactWriteItem;
use serde::{Deserialize, Serialize};

use super::{Accept, AcceptOutcome, Ack, Atomic, Found, Settle, Started};
use crate::domain::{RequestInput, RequestKind, RequestRecord};
use crate::events::aws::AwsEventBus;
use crate::ids::RequestId;
use crate::job;
use crate::memo::Memo;
use crate::queue::{Attributes, Delivery, Outgoing, Queue};
use crate::store::dynamodb::{
    get_s, is_conditional_failure, key, msg_sk, n, s, storage, Cancelled, DynamoStore, Item,
};
use crate::store::Transition;
use crate::time::now_ms;
use crate::Result;

/// Outbox partitions per queue: spreads the writes of busy accepts over several keys.
const OUTBOX_SHARDS: u64 = 8;
/// Outbox items one sweep takes from each partition.
const SWEEP_PAGE: i32 = 25;

pub struct AwsAtomic {
    pub store: Arc<DynamoStore>,
    pub persona_queue: Arc<dyn Queue>,
    pub chat_queue: Arc<dyn Queue>,
    /// Events are written inside the settlement's transaction, so this is the DynamoDB bus.
    pub events: Arc<AwsEventBus>,
    /// How long an outbox item waits for its sender before a sweep sends it.
    pub sweep_after: std::time::Duration,
    /// Requests this process started and has not settled yet, as it wrote them: (owner,
    /// version, record). Saves the settlement a read; see `settle::current`.
    known: Memo<RequestId, (String, i64, RequestRecord)>,
}

/// Most requests an `AwsAtomic` remembers (running jobs of the process: a handful per slot).
const KNOWN_KEPT: usize = 10_000;

impl AwsAtomic {
    pub fn new(
        store: Arc<DynamoStore>,
        persona_queue: Arc<dyn Queue>,
        chat_queue: Arc<dyn Queue>,
        events: Arc<AwsEventBus>,
        sweep_after: std::time::Duration,
    ) -> Self {
        AwsAtomic {
            store,
            persona_queue,
            chat_queue,
            events,
            sweep_after,
            known: Memo::new(KNOWN_KEPT),
        }
    }
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
    #[serde(default)]
    group: Option<String>,
}

fn outbox_pk(kind: RequestKind, shard: u64) -> String {
    format!("OUTBOX#{kind}#{shard}")
}

impl AwsAtomic {
    /// Marks a chat request's user message `cancelled`: the job's first delivery does not
    /// read the request (it carries it as accepted), but it reads its turn with the chat
    /// context, and so finds the mark at no cost of its own. Written before the request's
    /// cancel: a job that finds the mark stops as cancelled either way.
    async fn mark_turn_cancelled(&self, record: &RequestRecord) -> Result<()> {
        let RequestInput::Chat {
            conversation_id,
            message_id,
            ..
        } = &record.input
        else {
            return Ok(());
        };
        // No turn: the conversation is gone, and the job with it.
        let Some(turn) = self.store.turn_of(conversation_id, message_id).await? else {
            return Ok(());
        };
        let out = self
            .store
            .client
            .update_item()
            .table_name(&self.store.table)
            .set_key(Some(key(
                format!("CONV#{conversation_id}"),
                msg_sk(turn, 0),
            )))
            .update_expression("SET cancelled = :request")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":request", s(record.request_id.as_str()))
            .send()
            .await;
        match out {
            Ok(_) => Ok(()),
            Err(e) if is_conditional_failure(&e) => Ok(()),
            Err(e) => Err(storage("mark a turn cancelled", e)),
        }
    }

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
    /// the item if `clear` (else the worker of its single job does: see `accept`).
    async fn dispatch(
        &self,
        kind: RequestKind,
        pk: &str,
        sk: &str,
        outbox: Outbox,
        clear: bool,
    ) -> Result<()> {
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
                group: j.group,
            })
            .collect();
        // SQS takes at most 10 messages per call.
        for chunk in jobs.chunks(10) {
            self.queue(kind).send(chunk).await?;
        }
        if !clear {
            return Ok(());
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

    /// Claims a due outbox item for this sweeper, so that the sweepers of other worker
    /// processes leave it: false when another holds a fresh claim, or it is gone (its worker
    /// took the job). A claim goes stale after `sweep_after`, in case its sweeper died.
    async fn claim(&self, pk: &str, sk: &str) -> Result<bool> {
        let now = now_ms();
        let claimed = self
            .store
            .client
            .update_item()
            .table_name(&self.store.table)
            .set_key(Some(key(pk, sk)))
            .update_expression("SET claimed_ms = :now")
            .condition_expression(
                "attribute_exists(pk) AND (attribute_not_exists(claimed_ms) OR claimed_ms < :stale)",
            )
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(
                ":stale",
                n(now - self.sweep_after.as_millis() as i64),
            )
            .send()
            .await;
        match claimed {
            Ok(_) => Ok(true),
            Err(e) if is_conditional_failure(&e) => Ok(false),
            Err(e) => Err(storage("claim an outbox item", e)),
        }
    }

    fn queue(&self, kind: RequestKind) -> &Arc<dyn Queue> {
        match kind {
            RequestKind::Persona => &self.persona_queue,
            RequestKind::Chat => &self.chat_queue,
        }
    }
}

impl AwsAtomic {
    /// A start, written as a settlement is: the request over the version read and its
    /// `request.updated` in one transaction, with the delete of the delivery's outbox item.
    async fn write_start(
        &self,
        delivery: Option<&Delivery>,
        user_id: &str,
        request_id: &RequestId,
    ) -> Result<Started> {
        let extras = Extras {
            outbox: delivery.and_then(job::outbox_of),
            ..Extras::default()
        };
        let started = self
            .write_transition(user_id, request_id, Transition::Start, extras)
            .await?;
        Ok(match started {
            None => Started::Missing,
            // Only a finished request refuses to start: this delivery is a duplicate.
            Some(record) if record.status.is_final() => Started::Finished(record),
            Some(record) => Started::Running(record),
        })
    }
}

#[async_trait]
impl Atomic for AwsAtomic {
    async fn accept(&self, a: Accept) -> Result<AcceptOutcome> {
        self.accept_records(a).await
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
                if !self.claim(&pk, sk).await? {
                    continue;
                }
                let mut outbox: Outbox = serde_json::from_str(raw)?;
                tracing::warn!(outbox = %sk, jobs = outbox.jobs.len(), "sending jobs an accept left unsent, or their worker has not taken yet");
                // Marked: the first send may be waiting in the queue still, and its copy of
                // the request must not stand in for a read (see `crate::job`).
                for j in &mut outbox.jobs {
                    job::mark_resent(&mut j.attributes);
                }
                self.dispatch(kind, &pk, sk, outbox, true).await?;
                sent += 1;
            }
        }
        Ok(sent)
    }

    async fn look(
        &self,
        user_id: &str,
        request_id: &RequestId,
        accepted: Option<&RequestRecord>,
    ) -> Result<Found> {
        if let Some(record) = accepted.filter(|r| &r.request_id == request_id) {
            // A first delivery's copy: as written by the accept (version 1). The writes that
            // follow are conditional on that version, so a copy gone stale costs a read then.
            self.remember(user_id, record, 1);
            return Ok(Found::Pending(record.clone()));
        }
        let Some((version, record)) = self.current(user_id, request_id).await? else {
            return Ok(Found::Missing);
        };
        if record.status.is_final() {
            return Ok(Found::Finished(record));
        }
        // The start or settlement that follows writes over what was just read.
        self.remember(user_id, &record, version);
        Ok(Found::Pending(record))
    }

    async fn start(&self, user_id: &str, request_id: &RequestId) -> Result<Started> {
        // Written as a settlement is: the request over the version read and its
        // `request.updated` in one transaction (a read and a write, where a separate update and
        // event took four calls).
        self.write_start(None, user_id, request_id).await
    }

    async fn start_delivery(
        &self,
        delivery: &Delivery,
        user_id: &str,
        request_id: &RequestId,
    ) -> Result<Started> {
        self.write_start(Some(delivery), user_id, request_id).await
    }

    async fn cancel(&self, user_id: &str, request_id: &RequestId) -> Result<Option<RequestRecord>> {
        let Some((_, record)) = self.current(user_id, request_id).await? else {
            return Ok(None);
        };
        if record.status.is_final() {
            return Ok(Some(record));
        }
        self.mark_turn_cancelled(&record).await?;
        self.write_transition(user_id, request_id, Transition::Cancel, Extras::default())
            .await
    }

    async fn settle(&self, delivery: &Delivery, settle: Settle) -> Result<Option<RequestRecord>> {
        let Settle {
            kind,
            user_id,
            request_id,
            transition,
            ack,
            last_fragment,
            unstarted,
        } = settle;
        let record = self
            .write_transition(
                &user_id,
                &request_id,
                transition,
                Extras {
                    last_fragment: last_fragment.as_deref(),
                    unstarted,
                    outbox: job::outbox_of(delivery),
                },
            )
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
