//! The embedded store: SQLite tables whose rows hold each record as JSON beside the few columns
//! that queries filter or sort on (the same shape a DynamoDB item has, so the two adapters
//! read alike).

mod conversations;
mod idempotency;
mod personas;
mod requests;
mod sync;

use async_trait::async_trait;
use deadpool_sqlite::rusqlite::{params, Connection, OptionalExtension};

use super::{token, Ping};
use crate::domain::Page;
use crate::sqlite::Db;
use crate::{Error, Result};

// The writes the atomic accept and settle of `crate::atomic::sqlite` run inside their own
// transaction.
pub(crate) use conversations::{append_user_message, put_reply_in, reply_wanted};
pub(crate) use idempotency::{idempotency_answer_in, record_idempotency_answer};
pub(crate) use personas::put_persona_in;
pub(crate) use requests::{insert_batch, insert_request, transition_in};

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
    serde_json::from_str(s).map_err(|e| Error::storage("corrupt record", e))
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
fn body_in<T>(c: &Connection, sql: &'static str, a: &str, b: &str) -> Result<Option<T>>
where
    T: serde::de::DeserializeOwned,
{
    c.prepare_cached(sql)?
        .query_row(params![a, b], |r| r.get::<_, String>(0))
        .optional()?
        .map(|body| from_json(&body))
        .transpose()
}

/// [`body_in`] on this thread's read connection (a key lookup: see [`Db::read_here`]).
async fn one_body<T>(db: &Db, sql: &'static str, a: &str, b: &str) -> Result<Option<T>>
where
    T: serde::de::DeserializeOwned + Send + 'static,
{
    db.read_here(|c| body_in(c, sql, a, b))
}

#[async_trait]
impl Ping for SqliteStore {
    async fn ping(&self) -> Result<()> {
        self.db
            .call(|c| Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?))
            .await
            .map(|_| ())
    }
}
