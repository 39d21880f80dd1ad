//! The embedded store: SQLite tables whose rows hold each record as JSON beside the few columns
//! that queries filter or sort on (the same shape a DynamoDB item has, so the two adapters
//! read alike).

use async_trait::async_trait;
use deadpool_sqlite::rusqlite::{params, Connection, OptionalExtension};

use super::{token, ChatContext, IdempotencyBegin, Store, Transition};
use crate::domain::{Batch, Conversation, Message, Page, Persona, RequestRecord, RequestStatus};
use crate::sqlite::Db;
use crate::time::now_ms;
use crate::{Error, Result};

pub struct SqliteStore {
    db: Db,
}

impl SqliteStore {
    pub fn new(db: Db) -> Self {
        SqliteStore { db }
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    Ok(serde_json::to_string(v)?)
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| Error::Storage(format!("corrupt record: {e}")))
}

fn bad_token() -> Error {
    Error::Invalid("next_token is not valid".into())
}

/// One page of `(id, body)` rows of a table keyed by `(user_id, <id>)`, newest id first.
async fn page_by_id<T>(
    db: &Db,
    table: &'static str,
    id_col: &'static str,
    user_id: &str,
    limit: usize,
    next_token: Option<&str>,
) -> Result<Page<T>>
where
    T: serde::de::DeserializeOwned + Send + 'static,
{
    // Ids are time-ordered (UUIDv7), so "before this id" is "older than this record".
    let after = match next_token {
        Some(t) => token::decode(t).ok_or_else(bad_token)?,
        None => "\u{10FFFF}".to_string(),
    };
    let user_id = user_id.to_owned();
    db.call(move |c| {
        let sql = format!(
            "SELECT {id_col}, body FROM {table} WHERE user_id = ?1 AND {id_col} < ?2
             ORDER BY {id_col} DESC LIMIT ?3"
        );
        let mut stmt = c.prepare_cached(&sql)?;
        let rows = stmt
            .query_map(params![user_id, after, limit as i64 + 1], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let more = rows.len() > limit;
        let rows = &rows[..rows.len().min(limit)];
        let next_token = match rows.last() {
            Some((id, _)) if more => Some(token::encode(id)),
            _ => None,
        };
        let items = rows
            .iter()
            .map(|(_, body)| from_json(body))
            .collect::<Result<Vec<T>>>()?;
        Ok(Page { items, next_token })
    })
    .await
}

/// The record in the `body` column of the one row `sql` selects with two text parameters.
async fn one_body<T>(db: &Db, sql: &'static str, a: &str, b: &str) -> Result<Option<T>>
where
    T: serde::de::DeserializeOwned + Send + 'static,
{
    db.read_here(|c| {
        c.prepare_cached(sql)?
            .query_row(params![a, b], |r| r.get::<_, String>(0))
            .optional()?
            .map(|body| from_json(&body))
            .transpose()
    })
}

pub(crate) fn insert_request(c: &Connection, user_id: &str, r: &RequestRecord) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO requests (request_id, user_id, status, batch_id, body, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        r.request_id,
        user_id,
        r.status.as_str(),
        r.batch_id,
        to_json(r)?,
        now_ms()
    ])?;
    Ok(())
}

/// Up to `limit` messages before `message_id`, oldest first.
fn history_in(c: &Connection, conv: &str, msg: &str, limit: usize) -> Result<Vec<Message>> {
    let mut stmt = c.prepare_cached(
        "SELECT body FROM messages
         WHERE conversation_id = ?1
           AND turn < (SELECT turn FROM messages WHERE conversation_id = ?1 AND message_id = ?2)
         ORDER BY turn DESC, sub DESC LIMIT ?3",
    )?;
    let mut out = stmt
        .query_map(params![conv, msg, limit as i64], |r| r.get::<_, String>(0))?
        .map(|b| from_json(&b?))
        .collect::<Result<Vec<Message>>>()?;
    out.reverse();
    Ok(out)
}

/// The writes below run inside a caller's write (see [`crate::sqlite::Db::write`]), so the
/// store's own methods and the atomic accept/settle of [`crate::atomic::sqlite`] share them.
pub(crate) fn insert_batch(c: &Connection, user_id: &str, b: &Batch) -> Result<()> {
    c.execute(
        "INSERT INTO batches (batch_id, user_id, request_ids, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![b.batch_id, user_id, to_json(&b.request_ids)?, b.created_at],
    )?;
    Ok(())
}

/// Appends a user message as the conversation's next turn; `NotFound` when the conversation is
/// not the user's.
pub(crate) fn append_user_message(
    c: &Connection,
    user_id: &str,
    conversation_id: &str,
    message: &Message,
) -> Result<()> {
    let owned = c
        .prepare_cached("SELECT 1 FROM conversations WHERE user_id = ?1 AND conversation_id = ?2")?
        .exists(params![user_id, conversation_id])?;
    if !owned {
        return Err(Error::NotFound);
    }
    let turn: i64 = c
        .prepare_cached(
            "SELECT COALESCE(MAX(turn), 0) + 1 FROM messages WHERE conversation_id = ?1",
        )?
        .query_row([conversation_id], |r| r.get(0))?;
    c.prepare_cached(
        "INSERT INTO messages (conversation_id, turn, sub, message_id, body)
         VALUES (?1, ?2, 0, ?3, ?4)",
    )?
    .execute(params![
        conversation_id,
        turn,
        message.message_id,
        to_json(message)?
    ])?;
    Ok(())
}

/// Stores a persona unless one with its id exists; returns the one that stands.
pub(crate) fn put_persona_in(c: &Connection, user_id: &str, persona: &Persona) -> Result<Persona> {
    let inserted = c
        .prepare_cached(
            "INSERT OR IGNORE INTO personas (user_id, persona_id, body) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![user_id, persona.persona_id, to_json(persona)?])?;
    if inserted == 1 {
        return Ok(persona.clone());
    }
    let body: String = c
        .prepare_cached("SELECT body FROM personas WHERE user_id = ?1 AND persona_id = ?2")?
        .query_row(params![user_id, persona.persona_id], |r| r.get(0))?;
    from_json(&body)
}

/// Stores the reply to `reply_to` unless one exists; returns the one that stands.
pub(crate) fn put_reply_in(
    c: &Connection,
    conversation_id: &str,
    reply_to: &str,
    reply: &Message,
) -> Result<Message> {
    let turn: i64 = c
        .prepare_cached("SELECT turn FROM messages WHERE conversation_id = ?1 AND message_id = ?2")?
        .query_row(params![conversation_id, reply_to], |r| r.get(0))
        .optional()?
        .ok_or(Error::NotFound)?;
    let inserted = c
        .prepare_cached(
            "INSERT OR IGNORE INTO messages (conversation_id, turn, sub, message_id, body)
             VALUES (?1, ?2, 1, ?3, ?4)",
        )?
        .execute(params![
            conversation_id,
            turn,
            reply.message_id,
            to_json(reply)?
        ])?;
    if inserted == 1 {
        return Ok(reply.clone());
    }
    let stored: String = c
        .prepare_cached(
            "SELECT body FROM messages WHERE conversation_id = ?1 AND turn = ?2 AND sub = 1",
        )?
        .query_row(params![conversation_id, turn], |r| r.get(0))?;
    from_json(&stored)
}

/// The request with this id, whoever owns it, with its owner.
pub(crate) fn request_in(c: &Connection, request_id: &str) -> Result<Option<RequestRecord>> {
    c.prepare_cached("SELECT body FROM requests WHERE request_id = ?1")?
        .query_row([request_id], |r| r.get::<_, String>(0))
        .optional()?
        .map(|b| from_json(&b))
        .transpose()
}

/// Applies a transition; `NotFound` for an unknown request.
pub(crate) fn transition_in(
    c: &Connection,
    request_id: &str,
    transition: Transition,
) -> Result<(RequestRecord, bool)> {
    let mut record = request_in(c, request_id)?.ok_or(Error::NotFound)?;
    let applied = transition.apply(&mut record);
    if applied {
        c.prepare_cached(
            "UPDATE requests SET status = ?2, body = ?3, updated_ms = ?4 WHERE request_id = ?1",
        )?
        .execute(params![
            request_id,
            record.status.as_str(),
            to_json(&record)?,
            now_ms()
        ])?;
    }
    Ok((record, applied))
}

/// The final answer of an idempotency key, if it has one: `(status, body, fingerprint)`.
pub(crate) fn idempotency_answer_in(
    c: &Connection,
    user_id: &str,
    key: &str,
) -> Result<Option<(u16, String)>> {
    let row = c
        .prepare_cached(
            "SELECT status_code, response_body FROM idempotency_keys
             WHERE user_id = ?1 AND key = ?2 AND expires_ms > ?3 AND status_code IS NOT NULL",
        )?
        .query_row(params![user_id, key, now_ms()], |r| {
            Ok((r.get::<_, u16>(0)?, r.get::<_, Option<String>>(1)?))
        })
        .optional()?;
    Ok(row.map(|(status, body)| (status, body.unwrap_or_default())))
}

/// Records the answer to replay for a key (claimed or not), keeping its first-claim time.
pub(crate) fn record_idempotency_answer(
    c: &Connection,
    user_id: &str,
    key: &str,
    fingerprint: &str,
    status: u16,
    body: &str,
    ttl_ms: i64,
) -> Result<()> {
    let now = now_ms();
    c.prepare_cached(
        "INSERT INTO idempotency_keys
           (user_id, key, fingerprint, status_code, response_body, locked_ms, expires_ms, first_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?6)
         ON CONFLICT (user_id, key) DO UPDATE SET
           fingerprint = excluded.fingerprint, status_code = excluded.status_code,
           response_body = excluded.response_body",
    )?
    .execute(params![
        user_id,
        key,
        fingerprint,
        status,
        body,
        now,
        now + ttl_ms
    ])?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn put_persona(&self, user_id: &str, persona: &Persona) -> Result<()> {
        let (user_id, persona) = (user_id.to_owned(), persona.clone());
        self.db
            .write(move |c| put_persona_in(c, &user_id, &persona).map(|_| ()))
            .await
    }

    async fn get_persona(&self, user_id: &str, persona_id: &str) -> Result<Option<Persona>> {
        one_body(
            &self.db,
            "SELECT body FROM personas WHERE user_id = ?1 AND persona_id = ?2",
            user_id,
            persona_id,
        )
        .await
    }

    async fn list_personas(
        &self,
        user_id: &str,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Persona>> {
        page_by_id(
            &self.db,
            "personas",
            "persona_id",
            user_id,
            limit,
            next_token,
        )
        .await
    }

    async fn delete_persona(&self, user_id: &str, persona_id: &str) -> Result<bool> {
        let (user_id, id) = (user_id.to_owned(), persona_id.to_owned());
        self.db
            .write(move |tx| {
                Ok(tx.execute(
                    "DELETE FROM personas WHERE user_id = ?1 AND persona_id = ?2",
                    params![user_id, id],
                )? > 0)
            })
            .await
    }

    async fn create_conversation(&self, user_id: &str, conversation: &Conversation) -> Result<()> {
        let (user_id, id, body) = (
            user_id.to_owned(),
            conversation.conversation_id.clone(),
            to_json(conversation)?,
        );
        self.db
            .write(move |tx| {
                tx.execute(
                    "INSERT INTO conversations (user_id, conversation_id, body) VALUES (?1, ?2, ?3)",
                    params![user_id, id, body],
                )?;
                Ok(())
            })
            .await
    }

    async fn get_conversation(
        &self,
        user_id: &str,
        conversation_id: &str,
    ) -> Result<Option<Conversation>> {
        one_body(
            &self.db,
            "SELECT body FROM conversations WHERE user_id = ?1 AND conversation_id = ?2",
            user_id,
            conversation_id,
        )
        .await
    }

    async fn list_conversations(
        &self,
        user_id: &str,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Conversation>> {
        page_by_id(
            &self.db,
            "conversations",
            "conversation_id",
            user_id,
            limit,
            next_token,
        )
        .await
    }

    async fn add_user_message(
        &self,
        user_id: &str,
        conversation_id: &str,
        message: &Message,
        request: &RequestRecord,
    ) -> Result<()> {
        let (user_id, conv, message, request) = (
            user_id.to_owned(),
            conversation_id.to_owned(),
            message.clone(),
            request.clone(),
        );
        self.db
            .write(move |c| {
                append_user_message(c, &user_id, &conv, &message)?;
                insert_request(c, &user_id, &request)
            })
            .await
    }

    async fn put_reply(
        &self,
        conversation_id: &str,
        reply_to: &str,
        reply: &Message,
    ) -> Result<Message> {
        let (conv, reply_to, reply) = (
            conversation_id.to_owned(),
            reply_to.to_owned(),
            reply.clone(),
        );
        self.db
            .write(move |c| put_reply_in(c, &conv, &reply_to, &reply))
            .await
    }

    async fn get_reply(&self, conversation_id: &str, reply_to: &str) -> Result<Option<Message>> {
        let (conv, reply_to) = (conversation_id.to_owned(), reply_to.to_owned());
        self.db
            .call(move |c| {
                c.query_row(
                    "SELECT r.body FROM messages m JOIN messages r
                       ON r.conversation_id = m.conversation_id AND r.turn = m.turn AND r.sub = 1
                     WHERE m.conversation_id = ?1 AND m.message_id = ?2",
                    params![conv, reply_to],
                    |r| r.get::<_, String>(0),
                )
                .optional()?
                .map(|b| from_json(&b))
                .transpose()
            })
            .await
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
        let (after_turn, after_sub) = match next_token {
            Some(t) => {
                let raw = token::decode(t).ok_or_else(bad_token)?;
                let (turn, sub) = raw.split_once(':').ok_or_else(bad_token)?;
                (
                    turn.parse::<i64>().map_err(|_| bad_token())?,
                    sub.parse::<i64>().map_err(|_| bad_token())?,
                )
            }
            None => (-1, -1),
        };
        let conv = conversation_id.to_owned();
        self.db
            .call(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT turn, sub, body FROM messages
                     WHERE conversation_id = ?1 AND (turn > ?2 OR (turn = ?2 AND sub > ?3))
                     ORDER BY turn, sub LIMIT ?4",
                )?;
                let rows = stmt
                    .query_map(
                        params![conv, after_turn, after_sub, limit as i64 + 1],
                        |r| {
                            Ok((
                                r.get::<_, i64>(0)?,
                                r.get::<_, i64>(1)?,
                                r.get::<_, String>(2)?,
                            ))
                        },
                    )?
                    .collect::<Result<Vec<_>, _>>()?;
                let more = rows.len() > limit;
                let rows = &rows[..rows.len().min(limit)];
                let next_token = match rows.last() {
                    Some((turn, sub, _)) if more => Some(token::encode(&format!("{turn}:{sub}"))),
                    _ => None,
                };
                let items = rows
                    .iter()
                    .map(|(_, _, b)| from_json(b))
                    .collect::<Result<Vec<Message>>>()?;
                Ok(Page { items, next_token })
            })
            .await
    }

    async fn history_before(
        &self,
        conversation_id: &str,
        message_id: &str,
        limit: usize,
    ) -> Result<Vec<Message>> {
        let (conv, msg) = (conversation_id.to_owned(), message_id.to_owned());
        self.db
            .call(move |c| history_in(c, &conv, &msg, limit))
            .await
    }

    async fn chat_context(
        &self,
        user_id: &str,
        conversation_id: &str,
        message_id: &str,
        history_limit: usize,
    ) -> Result<Option<ChatContext>> {
        // On this thread (`Db::read_here`): nothing needs copying into a closure of its own.
        let (conv, msg) = (conversation_id, message_id);
        self.db.read_here(|c| {
            let conversation: Option<Conversation> = c
                .prepare_cached(
                    "SELECT body FROM conversations WHERE user_id = ?1 AND conversation_id = ?2",
                )?
                .query_row(params![user_id, conv], |r| r.get::<_, String>(0))
                .optional()?
                .map(|b| from_json(&b))
                .transpose()?;
            let Some(conversation) = conversation else {
                return Ok(None);
            };
            let persona: Option<Persona> = c
                .prepare_cached("SELECT body FROM personas WHERE user_id = ?1 AND persona_id = ?2")?
                .query_row(params![user_id, conversation.persona_id], |r| {
                    r.get::<_, String>(0)
                })
                .optional()?
                .map(|b| from_json(&b))
                .transpose()?;
            let history = history_in(c, conv, msg, history_limit)?;
            Ok(Some(ChatContext {
                conversation,
                persona,
                history,
            }))
        })
    }

    async fn create_requests(
        &self,
        user_id: &str,
        requests: &[RequestRecord],
        batch: Option<&Batch>,
    ) -> Result<()> {
        let (user_id, requests, batch) = (user_id.to_owned(), requests.to_vec(), batch.cloned());
        self.db
            .write(move |c| {
                if let Some(b) = &batch {
                    insert_batch(c, &user_id, b)?;
                }
                for r in &requests {
                    insert_request(c, &user_id, r)?;
                }
                Ok(())
            })
            .await
    }

    async fn get_request(&self, user_id: &str, request_id: &str) -> Result<Option<RequestRecord>> {
        one_body(
            &self.db,
            "SELECT body FROM requests WHERE user_id = ?1 AND request_id = ?2",
            user_id,
            request_id,
        )
        .await
    }

    async fn transition(
        &self,
        request_id: &str,
        transition: Transition,
    ) -> Result<(RequestRecord, bool)> {
        let id = request_id.to_owned();
        self.db
            .write(move |c| transition_in(c, &id, transition))
            .await
    }

    async fn get_batch(&self, user_id: &str, batch_id: &str) -> Result<Option<Batch>> {
        let (user_id, id) = (user_id.to_owned(), batch_id.to_owned());
        self.db
            .call(move |c| {
                let row = c
                    .query_row(
                        "SELECT request_ids, created_at FROM batches WHERE user_id = ?1 AND batch_id = ?2",
                        params![user_id, id],
                        |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
                    )
                    .optional()?;
                let Some((ids, created_at)) = row else {
                    return Ok(None);
                };
                let request_ids: Vec<String> = from_json(&ids)?;
                let mut stmt = c.prepare_cached(
                    "SELECT status, COUNT(*) FROM requests WHERE batch_id = ?1 GROUP BY status",
                )?;
                let (mut succeeded, mut failed, mut pending) = (0, 0, 0);
                for row in stmt.query_map([&id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)))? {
                    let (status, n) = row?;
                    match RequestStatus::parse(&status) {
                        Some(RequestStatus::Succeeded) => succeeded += n,
                        Some(RequestStatus::Failed) => failed += n,
                        _ => pending += n,
                    }
                }
                Ok(Some(Batch {
                    batch_id: id,
                    total: request_ids.len() as u32,
                    succeeded,
                    failed,
                    pending,
                    request_ids,
                    created_at,
                }))
            })
            .await
    }

    async fn idempotency_begin(
        &self,
        user_id: &str,
        key: &str,
        fingerprint: &str,
        lock_ms: i64,
        ttl_ms: i64,
    ) -> Result<IdempotencyBegin> {
        let (user_id, key, fp) = (user_id.to_owned(), key.to_owned(), fingerprint.to_owned());
        self.db
            .write(move |tx| {
                let now = now_ms();
                let row = tx
                    .query_row(
                        "SELECT fingerprint, status_code, response_body, locked_ms, first_ms
                         FROM idempotency_keys
                         WHERE user_id = ?1 AND key = ?2 AND expires_ms > ?3",
                        params![user_id, key, now],
                        |r| {
                            Ok((
                                r.get::<_, String>(0)?,
                                r.get::<_, Option<u16>>(1)?,
                                r.get::<_, Option<String>>(2)?,
                                r.get::<_, i64>(3)?,
                                r.get::<_, i64>(4)?,
                            ))
                        },
                    )
                    .optional()?;
                let first_ms = match row {
                    Some((stored, ..)) if stored != fp => return Ok(IdempotencyBegin::Mismatch),
                    Some((_, Some(status), body, ..)) => {
                        return Ok(IdempotencyBegin::Replay {
                            status,
                            body: body.unwrap_or_default(),
                        })
                    }
                    Some((_, None, _, locked, _)) if locked + lock_ms > now => {
                        return Ok(IdempotencyBegin::InFlight)
                    }
                    // An abandoned claim is taken over with its first time, so the ids
                    // derived from the key come out the same.
                    Some((_, None, _, _, first)) if first > 0 => first,
                    _ => now,
                };
                tx.execute(
                    "INSERT OR REPLACE INTO idempotency_keys
                       (user_id, key, fingerprint, status_code, response_body, locked_ms, expires_ms, first_ms)
                     VALUES (?1, ?2, ?3, NULL, NULL, ?4, ?5, ?6)",
                    params![user_id, key, fp, now, now + ttl_ms, first_ms],
                )?;
                Ok(IdempotencyBegin::Started {
                    first_ms,
                    claim: now,
                })
            })
            .await
    }

    async fn idempotency_complete(
        &self,
        user_id: &str,
        key: &str,
        claim: i64,
        status: u16,
        body: &str,
    ) -> Result<()> {
        let (user_id, key, body) = (user_id.to_owned(), key.to_owned(), body.to_owned());
        self.db
            .write(move |tx| {
                tx.execute(
                    "UPDATE idempotency_keys SET status_code = ?3, response_body = ?4
                     WHERE user_id = ?1 AND key = ?2 AND locked_ms = ?5",
                    params![user_id, key, status, body, claim],
                )?;
                // Expired keys are dropped here, on the write path, so the table stays small
                // without a sweeper task.
                tx.execute(
                    "DELETE FROM idempotency_keys WHERE expires_ms < ?1",
                    [now_ms()],
                )?;
                Ok(())
            })
            .await
    }

    async fn idempotency_release(&self, user_id: &str, key: &str, claim: i64) -> Result<()> {
        let (user_id, key) = (user_id.to_owned(), key.to_owned());
        self.db
            .write(move |tx| {
                tx.execute(
                    "DELETE FROM idempotency_keys
                     WHERE user_id = ?1 AND key = ?2 AND status_code IS NULL AND locked_ms = ?3",
                    params![user_id, key, claim],
                )?;
                Ok(())
            })
            .await
    }

    async fn ping(&self) -> Result<()> {
        self.db
            .call(|c| Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?))
            .await
            .map(|_| ())
    }
}
