//! Requests and batches in SQLite. A request row keeps its status and batch in columns of their
//! own, so a batch's counts are one grouped query.

use async_trait::async_trait;
use deadpool_sqlite::rusqlite::{params, Connection, OptionalExtension};

use super::{from_json, one_body, to_json, SqliteStore};
use crate::domain::{Batch, Page, RequestRecord, RequestStatus};
use crate::ids::{BatchId, RequestId};
use crate::store::{RequestStore, Transition};
use crate::time::now_ms;
use crate::{Error, Result};

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

/// The writes below run inside a caller's write (see [`crate::sqlite::Db::write`]), so the
/// store's own methods and the atomic accept/settle of [`crate::atomic::sqlite`] share them.
pub(crate) fn insert_batch(c: &Connection, user_id: &str, b: &Batch) -> Result<()> {
    c.execute(
        "INSERT INTO batches (batch_id, user_id, request_ids, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![b.batch_id, user_id, to_json(&b.request_ids)?, b.created_at],
    )?;
    Ok(())
}

/// The user's batch, counted from its requests as they are now.
fn batch_in(c: &Connection, user_id: &str, batch_id: &BatchId) -> Result<Option<Batch>> {
    let row = c
        .prepare_cached(
            "SELECT request_ids, created_at, cancelled_at FROM batches
             WHERE user_id = ?1 AND batch_id = ?2",
        )?
        .query_row(params![user_id, batch_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })
        .optional()?;
    let Some((ids, created_at, cancelled_at)) = row else {
        return Ok(None);
    };
    let mut batch = Batch {
        created_at,
        cancelled_at,
        ..Batch::new(batch_id.clone(), from_json(&ids)?)
    }
    .recount();
    let mut last: Option<String> = None;
    let mut stmt = c.prepare_cached(
        "SELECT status, COUNT(*), MAX(json_extract(body, '$.updated_at')) FROM requests
         WHERE batch_id = ?1 GROUP BY status",
    )?;
    let rows = stmt.query_map([batch_id], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, u32>(1)?,
            r.get::<_, Option<String>>(2)?,
        ))
    })?;
    for row in rows {
        let (status, n, updated) = row?;
        batch.count(RequestStatus::parse(&status), n);
        last = last.max(updated);
    }
    Ok(Some(batch.counted(last)))
}

/// The request with this id, whoever owns it, with its owner.
pub(crate) fn request_in(c: &Connection, request_id: &RequestId) -> Result<Option<RequestRecord>> {
    c.prepare_cached("SELECT body FROM requests WHERE request_id = ?1")?
        .query_row([request_id], |r| r.get::<_, String>(0))
        .optional()?
        .map(|b| from_json(&b))
        .transpose()
}

/// Applies a transition; `NotFound` for an unknown request.
pub(crate) fn transition_in(
    c: &Connection,
    request_id: &RequestId,
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

#[async_trait]
impl RequestStore for SqliteStore {
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

    async fn get_request(
        &self,
        user_id: &str,
        request_id: &RequestId,
    ) -> Result<Option<RequestRecord>> {
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
        request_id: &RequestId,
        transition: Transition,
    ) -> Result<(RequestRecord, bool)> {
        let id = request_id.to_owned();
        self.db
            .write(move |c| transition_in(c, &id, transition))
            .await
    }

    async fn get_batch(&self, user_id: &str, batch_id: &BatchId) -> Result<Option<Batch>> {
        let (user_id, id) = (user_id.to_owned(), batch_id.to_owned());
        self.db.call(move |c| batch_in(c, &user_id, &id)).await
    }

    async fn list_batches(
        &self,
        user_id: &str,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Batch>> {
        // Ids are time-ordered (UUIDv7), so "before this id" is "older than this batch".
        let before = match next_token {
            Some(t) => super::token::decode(t).ok_or_else(super::bad_token)?,
            None => "\u{10FFFF}".to_string(),
        };
        let user_id = user_id.to_owned();
        self.db
            .call(move |c| {
                let ids = c
                    .prepare_cached(
                        "SELECT batch_id FROM batches WHERE user_id = ?1 AND batch_id < ?2
                         ORDER BY batch_id DESC LIMIT ?3",
                    )?
                    .query_map(params![user_id, before, limit as i64 + 1], |r| {
                        r.get::<_, BatchId>(0)
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                let more = ids.len() > limit;
                let mut items = Vec::with_capacity(limit);
                for id in ids.iter().take(limit) {
                    items.extend(batch_in(c, &user_id, id)?);
                }
                let next_token = match items.last() {
                    Some(b) if more => Some(super::token::encode(b.batch_id.as_str())),
                    _ => None,
                };
                Ok(Page { items, next_token })
            })
            .await
    }

    async fn batch_requests(
        &self,
        user_id: &str,
        request_ids: &[RequestId],
    ) -> Result<Vec<RequestRecord>> {
        let (user_id, ids) = (user_id.to_owned(), request_ids.to_vec());
        self.db
            .call(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT body FROM requests WHERE user_id = ?1 AND request_id = ?2",
                )?;
                let mut out = Vec::with_capacity(ids.len());
                for id in &ids {
                    let body = stmt
                        .query_row(params![user_id, id], |r| r.get::<_, String>(0))
                        .optional()?;
                    if let Some(body) = body {
                        out.push(from_json(&body)?);
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn mark_batch_cancelled(&self, user_id: &str, batch_id: &BatchId) -> Result<bool> {
        let (user_id, id) = (user_id.to_owned(), batch_id.to_owned());
        let at = crate::time::now_rfc3339();
        let changed = self
            .db
            .write(move |c| {
                // The first cancel's time is kept: a repeated cancel changes nothing.
                Ok(c.execute(
                    "UPDATE batches SET cancelled_at = COALESCE(cancelled_at, ?3)
                     WHERE user_id = ?1 AND batch_id = ?2",
                    params![user_id, id, at],
                )?)
            })
            .await?;
        Ok(changed == 1)
    }
}
