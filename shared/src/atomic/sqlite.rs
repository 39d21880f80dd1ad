//! Accept, start and settle as single SQLite writes: the embedded queue, store and event log
//! live in one database, so one transaction covers them all, and the group-commit writer
//! ([`crate::sqlite::Db::write`]) commits many of them with one fsync.

use std::sync::Arc;

use async_trait::async_trait;
use deadpool_sqlite::rusqlite::{params, Connection, OptionalExtension};

use super::{Accept, AcceptOutcome, Ack, Atomic, Found, Settle, Started};
use crate::domain::{RequestInput, RequestKind, RequestRecord, RequestResult};
use crate::events::sqlite::{insert_event_in as publish_in, SqliteEventBus};
use crate::events::Event;
use crate::ids::RequestId;
use crate::queue::sqlite::{
    change_visibility_in, dead_letter_in, delete_in, enqueue_in, SqliteQueue,
};
use crate::queue::{Delivery, Queue};
use crate::sqlite::Db;
use crate::store::sqlite::{
    append_user_message, idempotency_answer_in, insert_batch, insert_request, put_persona_in,
    put_reply_in, record_idempotency_answer, reply_wanted, transition_in,
};
use crate::store::Transition;
use crate::{Error, Result};

pub struct SqliteAtomic {
    db: Db,
    persona_queue: Arc<SqliteQueue>,
    chat_queue: Arc<SqliteQueue>,
    events: Arc<SqliteEventBus>,
}

impl SqliteAtomic {
    pub fn new(
        db: Db,
        persona_queue: Arc<SqliteQueue>,
        chat_queue: Arc<SqliteQueue>,
        events: Arc<SqliteEventBus>,
    ) -> Self {
        SqliteAtomic {
            db,
            persona_queue,
            chat_queue,
            events,
        }
    }

    fn queue(&self, kind: RequestKind) -> &Arc<SqliteQueue> {
        match kind {
            RequestKind::Persona => &self.persona_queue,
            RequestKind::Chat => &self.chat_queue,
        }
    }
}

/// The user's request, or `None` (another user's reads as absent).
fn owned_request(
    c: &Connection,
    user_id: &str,
    request_id: &RequestId,
) -> Result<Option<RequestRecord>> {
    c.prepare_cached("SELECT body FROM requests WHERE request_id = ?1 AND user_id = ?2")?
        .query_row(params![request_id, user_id], |r| r.get::<_, String>(0))
        .optional()?
        .map(|b| serde_json::from_str(&b).map_err(|e| Error::storage("corrupt request", e)))
        .transpose()
}

fn publish_update(c: &Connection, user_id: &str, record: &RequestRecord) -> Result<()> {
    publish_in(c, user_id, &Event::updated(record))
}

/// What became of a job's result.
enum Stored {
    /// Stored; the one that stands (a twin's, if it stored first).
    Stands(Box<RequestResult>),
    /// A reply whose turn was edited or rewound away: not stored.
    Superseded,
    /// A reply whose conversation was deleted: not stored.
    Gone,
}

/// Stores a job's result as its own record (the persona, or the reply to the request's user
/// message, if still wanted).
fn store_result(
    c: &Connection,
    user_id: &str,
    record: &RequestRecord,
    result: RequestResult,
) -> Result<Stored> {
    Ok(match (result, &record.input) {
        (RequestResult::Persona(p), _) => Stored::Stands(Box::new(RequestResult::Persona(
            put_persona_in(c, user_id, &p)?,
        ))),
        (
            RequestResult::Message(m),
            RequestInput::Chat {
                conversation_id,
                message_id,
                ..
            },
        ) => match reply_wanted(c, user_id, conversation_id, message_id, &record.request_id)? {
            None => Stored::Gone,
            Some(false) => Stored::Superseded,
            Some(true) => match put_reply_in(c, conversation_id, message_id, &m) {
                Ok(reply) => Stored::Stands(Box::new(RequestResult::Message(reply))),
                Err(Error::NotFound) => Stored::Gone,
                Err(e) => return Err(e),
            },
        },
        (RequestResult::Message(_), RequestInput::Persona { .. }) => {
            return Err(Error::internal_msg("a reply for a persona request"))
        }
    })
}

fn ack_in(c: &Connection, delivery: &Delivery, ack: &Ack) -> Result<()> {
    match ack {
        Ack::Delete => delete_in(c, &delivery.receipt),
        Ack::Retry { delay } => change_visibility_in(c, &delivery.receipt, *delay).map(|_| ()),
        Ack::DeadLetter { reason } => dead_letter_in(c, delivery, reason),
    }
}

#[async_trait]
impl Atomic for SqliteAtomic {
    async fn accept(&self, a: Accept) -> Result<AcceptOutcome> {
        let queue = self.queue(a.kind).clone();
        let name = queue.name().to_owned();
        let out = self
            .db
            .write(move |c| {
                if let Some(answer) = &a.answer {
                    if let Some(stored) = idempotency_answer_in(c, &a.user_id, &answer.key)? {
                        return Ok(AcceptOutcome::Replay(stored));
                    }
                }
                if let Some(m) = &a.message {
                    append_user_message(c, &a.user_id, &m.conversation_id, &m.message)?;
                }
                if let Some(b) = &a.batch {
                    insert_batch(c, &a.user_id, b)?;
                }
                for r in &a.requests {
                    insert_request(c, &a.user_id, r)?;
                }
                enqueue_in(c, &name, &a.jobs)?;
                if let Some(x) = &a.answer {
                    record_idempotency_answer(
                        c,
                        &a.user_id,
                        &x.key,
                        &x.fingerprint,
                        &x.stored,
                        x.ttl.as_millis() as i64,
                    )?;
                }
                Ok(AcceptOutcome::Recorded)
            })
            .await?;
        if out == AcceptOutcome::Recorded {
            queue.wake();
        }
        Ok(out)
    }

    async fn look(
        &self,
        user_id: &str,
        request_id: &RequestId,
        _accepted: Option<&RequestRecord>,
    ) -> Result<Found> {
        // A read by key: on the calling thread (see `Db::read_here`).
        self.db.read_here(|c| {
            Ok(match owned_request(c, user_id, request_id)? {
                None => Found::Missing,
                Some(record) if record.status.is_final() => Found::Finished(record),
                Some(record) => Found::Pending(record),
            })
        })
    }

    async fn start(&self, user_id: &str, request_id: &RequestId) -> Result<Started> {
        let (user_id, id) = (user_id.to_owned(), request_id.to_owned());
        let started = self
            .db
            .write_relaxed(move |c| {
                let Some(record) = owned_request(c, &user_id, &id)? else {
                    return Ok(Started::Missing);
                };
                if record.status.is_final() {
                    return Ok(Started::Finished(record));
                }
                let (record, _) = transition_in(c, &id, Transition::Start)?;
                publish_update(c, &user_id, &record)?;
                Ok(Started::Running(record))
            })
            .await?;
        if matches!(started, Started::Running(_)) {
            self.events.wake();
        }
        Ok(started)
    }

    async fn cancel(&self, user_id: &str, request_id: &RequestId) -> Result<Option<RequestRecord>> {
        let (user_id, id) = (user_id.to_owned(), request_id.to_owned());
        let record = self
            .db
            .write(move |c| {
                let Some(record) = owned_request(c, &user_id, &id)? else {
                    return Ok(None);
                };
                if record.status.is_final() {
                    return Ok(Some(record));
                }
                let (record, _) = transition_in(c, &id, Transition::Cancel)?;
                publish_update(c, &user_id, &record)?;
                Ok(Some(record))
            })
            .await?;
        self.events.wake();
        Ok(record)
    }

    async fn settle(&self, delivery: &Delivery, settle: Settle) -> Result<Option<RequestRecord>> {
        let delivery_ = delivery.clone();
        let (kind, ack) = (settle.kind, settle.ack.clone());
        let record = self
            .db
            .write_relaxed(move |c| {
                let Settle {
                    kind: _,
                    user_id,
                    request_id,
                    transition,
                    ack,
                    last_fragment,
                    unstarted,
                } = settle;
                let record = match owned_request(c, &user_id, &request_id)? {
                    Some(record) if record.status.is_final() => Some(record),
                    Some(mut record) => {
                        if unstarted == Some(record.attempts) {
                            // The attempt was never started: count it here (see `Settle`).
                            record = transition_in(c, &request_id, Transition::Start)?.0;
                        }
                        let mut transition = transition;
                        let stored = transition
                            .result_mut()
                            .map(|result| store_result(c, &user_id, &record, result.clone()));
                        match stored.transpose()? {
                            Some(Stored::Stands(stands)) => {
                                if let Some(result) = transition.result_mut() {
                                    *result = *stands;
                                }
                            }
                            Some(Stored::Superseded) => transition = transition.superseded(),
                            Some(Stored::Gone) => transition = transition.without_conversation(),
                            None => {}
                        }
                        let (record, applied) = transition_in(c, &request_id, transition)?;
                        if applied {
                            if let Some(text) = &last_fragment {
                                publish_in(c, &user_id, &Event::delta(&request_id, text))?;
                            }
                            publish_update(c, &user_id, &record)?;
                        }
                        Some(record)
                    }
                    None => None,
                };
                ack_in(c, &delivery_, &ack)?;
                Ok(record)
            })
            .await?;
        self.events.wake();
        // Handed back now: it may be taken again; gone: the next message of its group may be.
        let next = match ack {
            Ack::Retry { delay } => delay.is_zero(),
            Ack::Delete | Ack::DeadLetter { .. } => delivery.group.is_some(),
        };
        if next {
            self.queue(kind).wake();
        }
        Ok(record)
    }
}
