//! The change feed on SQLite (see `crate::store::sync`): the `sync_log` table, which triggers
//! append to (schema migration 10), read in `seq` order, each record listed once per page and
//! read as it is now, in the same snapshot. A position is a `seq` (of the user's own
//! sequence). A record changed again after the page's rows comes again on a later page.

use async_trait::async_trait;
use deadpool_sqlite::rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use super::conversations::{with_activity, CONVERSATION_WITH_ACTIVITY};
use super::personas::PERSONA_BY_ID;
use super::{body_in, from_json, SqliteStore};
use crate::domain::{Message, Persona, RequestRecord};
use crate::store::{Change, ChangeKind, ChangePage, SyncStore};
use crate::{Error, Result};

/// One row of the feed.
struct Row {
    seq: i64,
    kind: String,
    id: String,
    conversation_id: Option<String>,
    deleted: bool,
}

#[async_trait]
impl SyncStore for SqliteStore {
    async fn changes(
        &self,
        user_id: &str,
        position: Option<&str>,
        limit: usize,
    ) -> Result<ChangePage> {
        let after: i64 = match position {
            Some(p) => p
                .parse()
                .map_err(|_| Error::Invalid("the sync cursor is not valid".into()))?,
            None => 0,
        };
        let user_id = user_id.to_owned();
        self.db
            .call(move |c| {
                // One snapshot: the feed and the records as they were at the same moment.
                let tx = c.transaction()?;
                let page = changes_in(&tx, &user_id, after, limit)?;
                tx.finish()?;
                Ok(page)
            })
            .await
    }
}

/// Most log rows one page reads, per record it may list: a page lists the distinct records
/// among the rows after its cursor, read in order, so it costs its own rows, never the whole
/// feed after the cursor (a catch-up from far back is linear in the changes, not quadratic).
const ROWS_PER_RECORD: usize = 4;

fn changes_in(c: &Connection, user_id: &str, after: i64, limit: usize) -> Result<ChangePage> {
    let most = limit * ROWS_PER_RECORD;
    let mut stmt = c.prepare_cached(
        "SELECT seq, kind, record_id, conversation_id, deleted FROM sync_log
         WHERE user_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let mut rows = stmt
        .query_map(params![user_id, after, most as i64 + 1], |r| {
            Ok(Row {
                seq: r.get(0)?,
                kind: r.get(1)?,
                id: r.get(2)?,
                conversation_id: r.get(3)?,
                deleted: r.get(4)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut has_more = rows.len() > most;
    rows.truncate(most);
    // Each record once, as it is now (read below): its later rows here are passed with it.
    let mut seen = std::collections::HashSet::new();
    let (mut picked, mut position) = (Vec::new(), None);
    for row in &rows {
        if !seen.contains(&(row.kind.as_str(), row.id.as_str())) {
            if picked.len() == limit {
                has_more = true;
                break;
            }
            seen.insert((row.kind.as_str(), row.id.as_str()));
            picked.push(row);
        }
        position = Some(row.seq.to_string());
    }
    let mut changes = Vec::with_capacity(picked.len());
    for row in picked {
        let kind = ChangeKind::parse(&row.kind)
            .ok_or_else(|| Error::storage("corrupt change", row.kind.clone()))?;
        let record = if row.deleted {
            None
        } else {
            record_in(c, user_id, kind, &row.id)?
        };
        changes.push(Change {
            kind,
            id: row.id.clone(),
            conversation_id: row.conversation_id.clone().map(Into::into),
            // Gone by now (a later row says so too, and may come on a later page): a deletion.
            deleted: record.is_none(),
            record,
        });
    }
    Ok(ChangePage {
        changes,
        position,
        has_more,
    })
}

/// The record as the API shows it; `None` when it no longer exists.
fn record_in(c: &Connection, user_id: &str, kind: ChangeKind, id: &str) -> Result<Option<Value>> {
    Ok(match kind {
        ChangeKind::Persona => body_in::<Persona>(c, PERSONA_BY_ID, user_id, id)?
            .map(serde_json::to_value)
            .transpose()?,
        ChangeKind::Request => body_in::<RequestRecord>(
            c,
            "SELECT body FROM requests WHERE user_id = ?1 AND request_id = ?2",
            user_id,
            id,
        )?
        .map(serde_json::to_value)
        .transpose()?,
        ChangeKind::Message => c
            .prepare_cached("SELECT body FROM messages WHERE message_id = ?1")?
            .query_row([id], |r| r.get::<_, String>(0))
            .optional()?
            .map(|body| from_json::<Message>(&body))
            .transpose()?
            .map(|m| serde_json::to_value(m.shown()))
            .transpose()?,
        ChangeKind::Conversation => {
            let sql = format!(
                "{CONVERSATION_WITH_ACTIVITY} WHERE c.user_id = ?1 AND c.conversation_id = ?2"
            );
            c.prepare_cached(&sql)?
                .query_row(params![user_id, id], |r| {
                    Ok((r.get::<_, String>(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()?
                .map(|(body, last, first)| with_activity(&body, last, first))
                .transpose()?
                .map(serde_json::to_value)
                .transpose()?
        }
    })
}
