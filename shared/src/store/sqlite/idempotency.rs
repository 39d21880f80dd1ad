//! Idempotency keys in SQLite. The stored answer keeps the columns it always had
//! (`status_code`, `response_body`), so keys written before stay readable; the store does not
//! interpret them.

use async_trait::async_trait;
use deadpool_sqlite::rusqlite::{params, Connection, OptionalExtension};

use super::SqliteStore;
use crate::store::{IdempotencyBegin, IdempotencyStore, KeyClaim, StoredAnswer};
use crate::time::now_ms;
use crate::Result;

/// The final answer of an idempotency key, if it has one.
pub(crate) fn idempotency_answer_in(
    c: &Connection,
    user_id: &str,
    key: &str,
) -> Result<Option<StoredAnswer>> {
    let row = c
        .prepare_cached(
            "SELECT status_code, response_body FROM idempotency_keys
             WHERE user_id = ?1 AND key = ?2 AND expires_ms > ?3 AND status_code IS NOT NULL",
        )?
        .query_row(params![user_id, key, now_ms()], |r| {
            Ok((r.get::<_, u16>(0)?, r.get::<_, Option<String>>(1)?))
        })
        .optional()?;
    Ok(row.map(|(code, body)| StoredAnswer {
        code,
        body: body.unwrap_or_default(),
    }))
}

/// Records the answer to replay for a key (claimed or not), keeping its first-claim time.
pub(crate) fn record_idempotency_answer(
    c: &Connection,
    user_id: &str,
    key: &str,
    fingerprint: &str,
    answer: &StoredAnswer,
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
        answer.code,
        answer.body,
        now,
        now + ttl_ms
    ])?;
    Ok(())
}

#[async_trait]
impl IdempotencyStore for SqliteStore {
    async fn idempotency_begin(&self, claim: KeyClaim<'_>) -> Result<IdempotencyBegin> {
        let (user_id, key, fp) = (
            claim.user_id.to_owned(),
            claim.key.to_owned(),
            claim.fingerprint.to_owned(),
        );
        let (lock_ms, ttl_ms) = (claim.lock_ms(), claim.ttl_ms());
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
                    Some((_, Some(code), body, ..)) => {
                        return Ok(IdempotencyBegin::Replay(StoredAnswer {
                            code,
                            body: body.unwrap_or_default(),
                        }))
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
        answer: &StoredAnswer,
    ) -> Result<()> {
        let (user_id, key) = (user_id.to_owned(), key.to_owned());
        let (code, body) = (answer.code, answer.body.clone());
        self.db
            .write(move |tx| {
                tx.execute(
                    "UPDATE idempotency_keys SET status_code = ?3, response_body = ?4
                     WHERE user_id = ?1 AND key = ?2 AND locked_ms = ?5",
                    params![user_id, key, code, body, claim],
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
}
