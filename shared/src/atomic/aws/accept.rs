//! Accept on AWS: one `TransactWriteItems` of everything the client is told about plus the
//! outbox item holding the jobs, then the jobs sent and the outbox item cleared (see the
//! module above for why an outbox).

use aws_sdk_dynamodb::types::{TransactWriteItem, Update};

use super::{outbox_pk, AwsAtomic, Cancelled, Outbox, OutboxJob, OUTBOX_SHARDS};
use crate::atomic::{Accept, AcceptOutcome, Answer};
use crate::error::Report;
use crate::job;
use crate::store::dynamodb::{
    before_try, key, n, put_if_absent, s, storage, stored_answer, user_pk, DynamoStore, LastTurn,
    TurnItems, TURN_TRIES,
};
use crate::time::now_ms;
use crate::{Error, Result};

/// DynamoDB takes at most this many items in one transaction.
const MAX_TRANSACTION_ITEMS: usize = 100;

/// Where an accept's transaction holds what can refuse it.
#[derive(Default)]
struct Checks {
    /// The turn a chat message takes (its checks sit at `TurnItems`' indices).
    turn: Option<i64>,
    /// The idempotency key's answer.
    answer: Option<usize>,
    /// This process's turn to append to the conversation, held until the transaction ended.
    _append: Option<tokio::sync::OwnedMutexGuard<()>>,
}

/// An outbox item to write with the accept, and where it goes.
struct OutboxItem {
    pk: String,
    sk: String,
    outbox: Outbox,
}

impl AwsAtomic {
    pub(super) async fn accept_records(&self, a: Accept) -> Result<AcceptOutcome> {
        let now = now_ms();
        let outbox = self.outbox_item(&a, now)?;
        // A chat turn's number is the conversation's last turn as this process last saw it,
        // checked by the transaction: when another accept took it first, build again.
        let mut from = LastTurn::Remembered;
        for attempt in 0..TURN_TRIES {
            before_try(attempt).await;
            let (items, mut at) = self.accept_items(&a, &outbox, now, from).await?;
            let outcome = self.transact(items, "accept").await?;
            // The next append to the conversation need not wait for the send or a replay.
            at._append = None;
            let Some(cancelled) = outcome else {
                if let (Some(m), Some(turn)) = (&a.message, at.turn) {
                    self.store
                        .took_turn(&m.conversation_id, &m.message.message_id, turn);
                }
                // Accepted: the outbox guarantees the jobs from here on, so a failed send is
                // not the client's problem.
                let OutboxItem { pk, sk, outbox } = outbox;
                // A batch's item is cleared here once sent; a single job's stays until its
                // worker starts or settles it (and deletes it in that transaction): one call
                // fewer per accept.
                let clear = a.batch.is_some();
                if let Err(e) = self.dispatch(a.kind, &pk, &sk, outbox, clear).await {
                    tracing::warn!(error = %Report(&e), "jobs not sent yet; the outbox sweep will send them");
                }
                return Ok(AcceptOutcome::Recorded);
            };
            let retry = at
                .turn
                .and_then(|_| TurnItems::retry_from(&cancelled))
                .filter(|_| {
                    !cancelled.failed(at.answer) && !cancelled.failed(Some(TurnItems::OWNER_AT))
                });
            match retry {
                Some(next) => from = next,
                None => {
                    return self
                        .refused(
                            &a,
                            &cancelled,
                            at.turn.map(|_| TurnItems::OWNER_AT),
                            at.answer,
                        )
                        .await
                }
            }
        }
        Err(Error::Conflict(
            "the conversation's turns kept moving; try again".into(),
        ))
    }

    /// The items of an accept's transaction, and where its conditional ones sit.
    async fn accept_items(
        &self,
        a: &Accept,
        outbox: &OutboxItem,
        now: i64,
        from: LastTurn,
    ) -> Result<(Vec<TransactWriteItem>, Checks)> {
        let table = self.store.table.as_str();
        let mut items = Vec::new();
        let mut at = Checks::default();
        if let Some(m) = &a.message {
            // First, so that `TurnItems`' indices hold in the whole transaction.
            let turn = self
                .store
                .user_message_items(&a.user_id, &m.conversation_id, &m.message, from)
                .await?;
            at.turn = Some(turn.turn);
            at._append = Some(turn._append);
            items.extend(turn.items);
        }
        // A batch's requests are written through the outbox (see the module's comment).
        if a.batch.is_none() {
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
        let mut item = key(&outbox.pk, &outbox.sk);
        item.insert("body".into(), s(serde_json::to_string(&outbox.outbox)?));
        items.push(put_if_absent(table, item)?);
        if let Some(x) = &a.answer {
            at.answer = Some(items.len());
            items.push(self.answer_item(&a.user_id, x, now)?);
        }
        if items.len() > MAX_TRANSACTION_ITEMS {
            return Err(Error::Invalid(
                "too much for one DynamoDB transaction (100 items)".into(),
            ));
        }
        Ok((items, at))
    }

    /// The outbox item of an accept: its jobs and, for a batch, its request records; due for a
    /// sweep `sweep_after` from now, in a partition chosen by its first request.
    fn outbox_item(&self, a: &Accept, now: i64) -> Result<OutboxItem> {
        let first = a
            .requests
            .first()
            .map(|r| r.request_id.clone())
            .ok_or_else(|| Error::internal_msg("an accept without requests"))?;
        let shard = first.bytes().map(u64::from).sum::<u64>() % OUTBOX_SHARDS;
        let due = now + self.sweep_after.as_millis() as i64;
        let (pk, sk) = (outbox_pk(a.kind, shard), format!("{due:015}#{first}"));
        let outbox = Outbox {
            user_id: a.user_id.clone(),
            jobs: a
                .jobs
                .iter()
                .map(|j| {
                    // A single job names its item, for its worker to delete (see above).
                    let j = match &a.batch {
                        None => job::with_outbox(j.clone(), &format!("{pk}\n{sk}")),
                        Some(_) => j.clone(),
                    };
                    OutboxJob {
                        body: j.body,
                        attributes: j.attributes,
                        group: j.group,
                    }
                })
                .collect(),
            requests: if a.batch.is_some() {
                a.requests.clone()
            } else {
                Vec::new()
            },
        };
        Ok(OutboxItem { pk, sk, outbox })
    }

    /// The key's answer, recorded unless another call recorded one first; a key never claimed
    /// (or whose claim expired) gets its times here.
    fn answer_item(&self, user_id: &str, x: &Answer, now: i64) -> Result<TransactWriteItem> {
        let expires = now + x.ttl.as_millis() as i64;
        Ok(TransactWriteItem::builder()
            .update(
                Update::builder()
                    .table_name(&self.store.table)
                    .set_key(Some(key(user_pk(user_id), format!("IDEM#{}", x.key))))
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
            .build())
    }

    /// What a cancelled accept means: the key's answer stands already (replay it), the
    /// conversation is not the caller's, or the records collided.
    async fn refused(
        &self,
        a: &Accept,
        cancelled: &Cancelled,
        owner_check: Option<usize>,
        answer_at: Option<usize>,
    ) -> Result<AcceptOutcome> {
        if cancelled.failed(answer_at) {
            // Another call with the same key recorded its answer first: replay it.
            let x = a
                .answer
                .as_ref()
                .map(|x| x.key.as_str())
                .unwrap_or_default();
            let answer = self
                .store
                .get(&user_pk(&a.user_id), &format!("IDEM#{x}"))
                .await?
                .as_ref()
                .and_then(stored_answer)
                .ok_or_else(|| Error::storage_msg("idempotency answer vanished"))?;
            return Ok(AcceptOutcome::Replay(answer));
        }
        if cancelled.failed(owner_check) {
            return Err(Error::NotFound);
        }
        Err(Error::Conflict(format!(
            "the accept collided with existing records: {:?}",
            cancelled.0
        )))
    }
}
