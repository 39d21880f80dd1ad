//! Settle on AWS: one transaction for the records — the result record (only if absent), the
//! request over the version read (optimistic concurrency) and its events — retried over a
//! request that moved meanwhile, with a twin delivery's result taken when it stands already.

use aws_sdk_dynamodb::types::{ConditionCheck, Delete, Put, TransactWriteItem};

use super::AwsAtomic;
use crate::domain::{Activity, Message, RequestInput, RequestRecord, RequestResult};
use crate::events::aws::Sequenced;
use crate::events::Event;
use crate::ids::{ConversationId, MessageId, RequestId};
use crate::store::dynamodb::{
    body, get_n, get_s, key, mark_changed, msg_sk, n, put_if_absent, s, storage, user_pk,
    Cancelled, DynamoStore, Item,
};
use crate::store::Transition;
use crate::{Error, Result};

/// A result record to write: put if absent, or (`over`) in place of the body it was read
/// with.
struct Effect {
    item: Item,
    over: Option<String>,
}

impl Effect {
    /// The write of one try, marked as a change of the user's made now (a settlement's tries
    /// may be seconds apart, and the change feed trusts a stamp to be close to its write).
    fn write(&self, table: &str, user_id: &str) -> Result<TransactWriteItem> {
        let mut item = self.item.clone();
        mark_changed(&mut item, user_id);
        let Some(over) = &self.over else {
            return put_if_absent(table, item);
        };
        let put = Put::builder()
            .table_name(table)
            .set_item(Some(item))
            .condition_expression("body = :over")
            .expression_attribute_values(":over", s(over))
            .build()
            .map_err(|e| storage("build a transaction item", e))?;
        Ok(TransactWriteItem::builder().put(put).build())
    }
}

/// What a settlement writes besides the request, mended between tries.
struct Writes {
    transition: Transition,
    /// The result record to write; `None` once a twin's stands.
    pending: Option<Effect>,
    /// A reply's conversation update; `None` once the conversation is found gone or moved on.
    activity: Option<TransactWriteItem>,
    /// A reply's check that its turn still asks for it (see [`AwsAtomic::guard_of`]).
    guard: Option<TransactWriteItem>,
}

/// The transaction of one settlement attempt, with where its conditional items sit.
struct SettleItems {
    items: Vec<TransactWriteItem>,
    /// The result record's put, when there is one.
    effect_at: Option<usize>,
    /// The update of a reply's conversation (its latest activity), when there is one.
    activity_at: Option<usize>,
    /// The check that the reply's turn still asks for it.
    guard_at: Option<usize>,
    /// The request's put over the version read.
    request_at: usize,
    /// The user's event counter's put over the id it had.
    counter_at: usize,
}

impl SettleItems {
    fn add_activity(&mut self, w: &Writes) {
        self.activity_at = w.activity.as_ref().map(|_| self.items.len());
        self.items.extend(w.activity.clone());
        self.guard_at = w.guard.as_ref().map(|_| self.items.len());
        self.items.extend(w.guard.clone());
    }
}

/// What one write of a request's state carries besides the transition.
#[derive(Default, Clone, Copy)]
pub(super) struct Extras<'a> {
    /// The end of a streamed reply not pushed yet (see `Settle::last_fragment`).
    pub last_fragment: Option<&'a str>,
    /// See `Settle::unstarted`.
    pub unstarted: Option<u32>,
    /// The outbox item of the job (`pk` and `sk`, a newline apart), deleted in the same
    /// transaction: the worker has the job (see `crate::job::with_outbox`).
    pub outbox: Option<&'a str>,
}

/// The events a write of `record` publishes: the reply's last fragment, then the update that
/// ends it.
fn settle_events(record: &RequestRecord, last_fragment: Option<&str>) -> Vec<Event> {
    last_fragment
        .map(|text| Event::delta(&record.request_id, text))
        .into_iter()
        .chain([Event::updated(record)])
        .collect()
}

/// Whether a settlement's conversation update was what refused it: `Some(true)` when the
/// conversation is gone (deleted meanwhile), `Some(false)` when a later message moved it
/// already (the update returned the item as it stands).
fn refused_activity(cancelled: &Cancelled, at: Option<usize>) -> Option<bool> {
    let at = at.filter(|&i| cancelled.failed(Some(i)))?;
    let stands = cancelled.1.get(at).cloned().flatten();
    Some(stands.is_none_or(|item| item.is_empty()))
}

/// Applies `transition` to `record`, counting first an attempt that was never started (see
/// `Settle::unstarted`); false when the record had finished.
fn advance(record: &mut RequestRecord, transition: &Transition, unstarted: Option<u32>) -> bool {
    if unstarted == Some(record.attempts) {
        Transition::Start.apply(record);
    }
    transition.clone().apply(record)
}

impl AwsAtomic {
    /// The records of a settlement in one transaction: the result record (persona or reply,
    /// only if absent), the request over the version read, and its `request.updated` event.
    /// A start is written the same way (no result). `None`: no such request of the user;
    /// otherwise the record as it now stands (unchanged if it had finished already).
    /// A twin's result that stands already is taken instead; a request that moved meanwhile
    /// is read again.
    pub(super) async fn write_transition(
        &self,
        user_id: &str,
        request_id: &RequestId,
        transition: Transition,
        extras: Extras<'_>,
    ) -> Result<Option<RequestRecord>> {
        let mut w = Writes {
            transition,
            pending: None,
            activity: None,
            guard: None,
        };
        let mut first = true;
        // Tries lost to another process writing the user's events count apart: they say
        // nothing about the request.
        let (mut moved, mut collided) = (0, 0);
        while moved < 10 && collided < 50 {
            let Some((version, mut record)) = self.current(user_id, request_id).await? else {
                return Ok(None);
            };
            if record.status.is_final() {
                return Ok(Some(record));
            }
            if std::mem::take(&mut first) {
                (w.pending, w.activity) = self.effects(user_id, &record, &mut w.transition).await?;
                w.guard = self.guard_of(&record, &w.transition).await?;
            }
            if !advance(&mut record, &w.transition, extras.unstarted) {
                return Ok(Some(record));
            }
            let events = settle_events(&record, extras.last_fragment);
            let seq = self.events.sequenced(user_id, &events).await?;
            let mut tx = self.settle_items(user_id, &record, version, w.pending.as_ref(), &seq)?;
            tx.add_activity(&w);
            tx.items
                .extend(extras.outbox.and_then(|k| self.outbox_delete(k)));
            let Some(cancelled) = self.transact(tx.items, "settle").await? else {
                self.events.committed(seq).await;
                self.remember(user_id, &record, version + 1);
                return Ok(Some(record));
            };
            let counter_moved = cancelled.failed(Some(tx.counter_at)) || cancelled.conflicted();
            if counter_moved {
                // Another process wrote the user's events meanwhile: take the next ids.
                self.events.moved(seq, collided).await;
            } else {
                drop(seq);
            }
            let refused = (tx.activity_at, tx.effect_at, tx.guard_at);
            let redone = self.redo(user_id, &record, &mut w, &cancelled, refused);
            if !redone.await? {
                if counter_moved {
                    collided += 1;
                    continue;
                }
                if !cancelled.failed(Some(tx.request_at)) {
                    return Err(Error::storage_msg(format!(
                        "settle cancelled: {:?}",
                        cancelled.0
                    )));
                }
            }
            moved += 1;
            // Either way, read the request again and write over its new version.
        }
        Err(Error::storage_msg(
            "request kept changing under the settlement",
        ))
    }

    /// Mends the writes after a refusal by their own items (at `activity_at`, `effect_at`):
    /// the conversation gone (no reply to store) or moved on (leave its activity), the
    /// regenerated reply changed since it was read, or a twin's result that stands. False
    /// when neither refused.
    async fn redo(
        &self,
        user_id: &str,
        record: &RequestRecord,
        w: &mut Writes,
        cancelled: &Cancelled,
        (activity_at, effect_at, guard_at): (Option<usize>, Option<usize>, Option<usize>),
    ) -> Result<bool> {
        if let Some(gone) = refused_activity(cancelled, activity_at) {
            w.activity = None;
            if gone {
                (w.pending, w.guard) = (None, None);
                w.transition = w.transition.clone().without_conversation();
            }
        } else if cancelled.failed(guard_at) {
            // The turn was edited or rewound away: its request was cancelled.
            (w.pending, w.activity, w.guard) = (None, None, None);
            w.transition = w.transition.clone().superseded();
        } else if cancelled.failed(effect_at) {
            (w.pending, w.activity) = self
                .after_refused_effect(
                    user_id,
                    record,
                    w.pending.take(),
                    w.activity.take(),
                    &mut w.transition,
                )
                .await?;
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    /// The request's version and record: as this process last wrote it (a start, then its
    /// settlement, save a read; a stale one fails the write's condition and is read again), or
    /// as stored. `None` when there is no such request of the user.
    pub(super) async fn current(
        &self,
        user_id: &str,
        request_id: &RequestId,
    ) -> Result<Option<(i64, RequestRecord)>> {
        let known = self.known.take(request_id);
        if let Some((owner, version, record)) = known {
            if owner == user_id {
                return Ok(Some((version, record)));
            }
        }
        let Some(item) = self.store.get(&format!("REQ#{request_id}"), "REQ").await? else {
            return Ok(None);
        };
        if get_s(&item, "user_id") != Some(user_id) {
            return Ok(None);
        }
        let version = get_n(&item, "version").unwrap_or(0);
        Ok(Some((version, body(&item)?)))
    }

    /// Keeps what this process wrote of a request that has more to come.
    pub(super) fn remember(&self, user_id: &str, record: &RequestRecord, version: i64) {
        if record.status.is_final() {
            return;
        }
        let entry = (user_id.to_owned(), version, record.clone());
        self.known.insert(record.request_id.clone(), entry);
    }

    /// The delete of the outbox item named `pk\nsk`; `None` for a name that is not one.
    fn outbox_delete(&self, name: &str) -> Option<TransactWriteItem> {
        let (pk, sk) = name.split_once('\n')?;
        let delete = Delete::builder()
            .table_name(&self.store.table)
            .set_key(Some(key(pk, sk)))
            .build()
            .ok()?;
        Some(TransactWriteItem::builder().delete(delete).build())
    }

    /// One attempt's transaction: the result record if absent, the request over `version`,
    /// then its events (the last reply fragment, then `request.updated`) as the user's next
    /// ids.
    fn settle_items(
        &self,
        user_id: &str,
        record: &RequestRecord,
        version: i64,
        pending: Option<&Effect>,
        events: &Sequenced,
    ) -> Result<SettleItems> {
        let table = self.store.table.as_str();
        let mut items = Vec::new();
        let effect_at = pending.map(|_| items.len());
        if let Some(effect) = pending {
            items.push(effect.write(table, user_id)?);
        }
        let request_at = items.len();
        items.push(
            TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(table)
                        .set_item(Some(DynamoStore::request_item(
                            user_id,
                            record,
                            version + 1,
                        )?))
                        .condition_expression("version = :v")
                        .expression_attribute_values(":v", n(version))
                        .build()
                        .map_err(|e| storage("build a transaction item", e))?,
                )
                .build(),
        );
        let counter_at = items.len();
        items.extend(events.items.iter().cloned());
        Ok(SettleItems {
            items,
            effect_at,
            activity_at: None,
            guard_at: None,
            request_at,
            counter_at,
        })
    }

    /// What a transition writes besides the request: its result record, and for a reply the
    /// update of its conversation's latest activity.
    async fn effects(
        &self,
        user_id: &str,
        record: &RequestRecord,
        transition: &mut Transition,
    ) -> Result<(Option<Effect>, Option<TransactWriteItem>)> {
        let Some(result) = transition.result_mut() else {
            return Ok((None, None));
        };
        match self.result_item(user_id, record, result).await {
            Ok(effect) => Ok((effect, self.activity_of(user_id, record, result)?)),
            // The turn is gone (rewound away, its index with it): nothing to store.
            Err(Error::NotFound) => {
                *transition = transition.clone().superseded();
                Ok((None, None))
            }
            Err(e) => Err(e),
        }
    }

    /// A reply's check that the user message it answers is there and names its request (an
    /// edit points the message at a new request; a rewind deletes it): a reply of a request
    /// that was superseded is not stored. A message stored before messages named their
    /// request passes; one edited to stay unanswered (no request, a reply id) does not. `None` for what stores no reply.
    async fn guard_of(
        &self,
        record: &RequestRecord,
        transition: &Transition,
    ) -> Result<Option<TransactWriteItem>> {
        let (
            Transition::Succeed { .. } | Transition::Stopped { result: Some(_) },
            RequestInput::Chat {
                conversation_id,
                message_id,
                ..
            },
        ) = (transition, &record.input)
        else {
            return Ok(None);
        };
        let Some(turn) = self.store.turn_of(conversation_id, message_id).await? else {
            return Ok(None);
        };
        let check = ConditionCheck::builder()
            .table_name(&self.store.table)
            .set_key(Some(key(
                format!("CONV#{conversation_id}"),
                msg_sk(turn, 0),
            )))
            .condition_expression(
                "attribute_exists(pk) AND (contains(body, :request) \
                 OR (NOT contains(body, :field) AND NOT contains(body, :reply)))",
            )
            .expression_attribute_values(":request", s(format!("\"{}\"", record.request_id)))
            .expression_attribute_values(":field", s("\"request_id\""))
            .expression_attribute_values(":reply", s("\"reply_id\""))
            .build()
            .map_err(|e| storage("build a transaction item", e))?;
        Ok(Some(
            TransactWriteItem::builder().condition_check(check).build(),
        ))
    }

    /// The update that makes a reply its conversation's latest activity; `None` for a persona.
    fn activity_of(
        &self,
        user_id: &str,
        record: &RequestRecord,
        result: &RequestResult,
    ) -> Result<Option<TransactWriteItem>> {
        match (result, &record.input) {
            (
                RequestResult::Message(reply),
                RequestInput::Chat {
                    conversation_id, ..
                },
            ) => self
                .store
                .activity_item(user_id, conversation_id, &Activity::of(reply), true)
                .map(Some),
            _ => Ok(None),
        }
    }

    /// What to write after the result's write was refused: a regeneration's reply changed
    /// since it was read (another version, a selection), so merge into it as it stands now;
    /// or a twin delivery stored its result first, and that one stands.
    async fn after_refused_effect(
        &self,
        user_id: &str,
        record: &RequestRecord,
        pending: Option<Effect>,
        activity: Option<TransactWriteItem>,
        transition: &mut Transition,
    ) -> Result<(Option<Effect>, Option<TransactWriteItem>)> {
        match pending {
            Some(Effect { over: Some(_), .. }) => self.effects(user_id, record, transition).await,
            effect => {
                self.take_twin_result(effect, transition).await?;
                Ok((None, activity))
            }
        }
    }

    /// A regeneration's write: its version merged into the reply as stored (read now), over
    /// it; `None` (and `result` the stored reply) when the reply has the version already.
    async fn version_item(
        &self,
        conversation_id: &ConversationId,
        message_id: &MessageId,
        result: &mut RequestResult,
    ) -> Result<Option<Effect>> {
        let RequestResult::Message(ours) = &*result else {
            return Err(Error::internal_msg("a persona for a chat request"));
        };
        let turn = self
            .store
            .turn_of(conversation_id, message_id)
            .await?
            .ok_or(Error::NotFound)?;
        let (pk, sk) = (format!("CONV#{conversation_id}"), msg_sk(turn, 1));
        let stored = self.store.get(&pk, &sk).await?;
        let over = stored
            .as_ref()
            .and_then(|i| get_s(i, "body"))
            .map(str::to_owned);
        let stored: Option<Message> = stored.as_ref().map(body).transpose()?;
        let merged = Message::merge_reply(stored.clone(), ours.clone());
        let unchanged = stored.as_ref() == Some(&merged);
        let mut item = key(pk, sk);
        item.insert("body".into(), s(serde_json::to_string(&merged)?));
        *result = RequestResult::Message(merged);
        Ok((!unchanged).then_some(Effect { item, over }))
    }

    /// Makes a `Succeed` carry the result a twin delivery stored first, in place of its own.
    async fn take_twin_result(
        &self,
        effect: Option<Effect>,
        transition: &mut Transition,
    ) -> Result<()> {
        let effect = effect.map(|e| e.item).unwrap_or_default();
        let (pk, sk) = (
            get_s(&effect, "pk").unwrap_or_default().to_owned(),
            get_s(&effect, "sk").unwrap_or_default().to_owned(),
        );
        let stored = self
            .store
            .get(&pk, &sk)
            .await?
            .ok_or_else(|| Error::storage_msg("a result vanished"))?;
        if let Some(result) = transition.result_mut() {
            *result = match result {
                RequestResult::Persona(_) => RequestResult::Persona(body(&stored)?),
                RequestResult::Message(_) => RequestResult::Message(body(&stored)?),
            };
        }
        Ok(())
    }

    /// The write of a job's result: the persona, or the reply in the turn of the user message
    /// it answers. A regeneration's version is merged into the reply as stored (read now) and
    /// written over it on condition that it did not change meanwhile; `None` (and `result`
    /// the stored reply) when the reply has this version already (a twin delivery's).
    async fn result_item(
        &self,
        user_id: &str,
        record: &RequestRecord,
        result: &mut RequestResult,
    ) -> Result<Option<Effect>> {
        if let RequestInput::Chat {
            conversation_id,
            message_id,
            reply_to: Some(_),
            ..
        } = &record.input
        {
            return self.version_item(conversation_id, message_id, result).await;
        }
        let item = match (&*result, &record.input) {
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
                    .turn_of(conversation_id, message_id)
                    .await?
                    .ok_or(Error::NotFound)?;
                let mut item = key(&conv_pk, msg_sk(turn, 1));
                item.insert("body".into(), s(serde_json::to_string(m)?));
                item
            }
            (RequestResult::Message(_), RequestInput::Persona { .. }) => {
                return Err(Error::internal_msg("a reply for a persona request"))
            }
        };
        Ok(Some(Effect { item, over: None }))
    }
}
