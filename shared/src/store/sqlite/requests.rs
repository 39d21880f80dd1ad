//! Requests and batches in SQLite. A request row keeps its status and batch in columns of their
//! own, so a batch's counts are one grouped query.

use async_trait::async_trait;
use deadpool_sqlite::rusqlite::{params, Connection, OptionalExtension};

use super::{from_json, one_body, to_json, SqliteStore};
use crate::domain::{Batch, RequestRecord, RequestStatus};
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
                let request_ids: Vec<RequestId> = from_json(&ids)?;
                let mut stmt = c.prepare_cached(
                    "SELECT status, COUNT(*) FROM requests WHERE batch_id = ?1 GROUP BY status",
                )?;
                let mut batch = Batch {
                    batch_id: id.clone(),
                    total: request_ids.len() as u32,
                    succeeded: 0,
                    failed: 0,
                    cancelled: 0,
                    pending: 0,
                    request_ids,
                    created_at,
                };
                for row in stmt.query_map([&id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)))? {
                    let (status, n) = row?;
                    batch.count(RequestStatus::parse(&status), n);
                }
                Ok(Some(batch))
            })
            .await
    }
}
