//! The change feed on DynamoDB (see `crate::store::sync`).
//!
//! Every write that makes or changes a record item (a persona, a conversation, a message, a
//! request) also sets `sync_user` (its owner) and `sync_at` (when, as a string that sorts as
//! time: milliseconds, zero-padded, then random hex so that changes of one millisecond in
//! several processes stay apart). The sparse global index [`CHANGE_INDEX`] keys the items that
//! carry both by them, so a user's changes are one key-range query, oldest first, and an item
//! changed again moves to the end of the feed (an index holds one entry per item): the feed
//! holds each record once, at its latest change. A deletion writes a tombstone item
//! (`USER#{user}` / `GONE#{kind}#{id}`, in the delete's transaction where it has one), which
//! the feed lists as a `deleted` change, until the table's TTL drops it 30 days on.
//!
//! A page is read from the index (keys only: a record's state is read from the table, with a
//! consistent read, so it is the latest), then the items by key in batches. A position is a
//! `sync_at`. Index reads are eventually consistent and `sync_at` is taken before the write
//! commits, so a change may turn up in the index a moment after a younger one: the position
//! at the end of the feed stays [`SETTLE_MS`] behind the clock (younger changes are returned
//! all the same, and again next time; clients upsert by id).
//!
//! Items written before the feed carry no `sync_*` attributes: `aws-init` gives them theirs
//! ([`backfill_changes`]), so a first sync of an older account is whole.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::types::builders::UpdateBuilder;
use aws_sdk_dynamodb::types::{Delete, KeysAndAttributes, Put, TransactWriteItem};
use serde::{Deserialize, Serialize};

use super::conversations::conversation_of;
use super::{body, get_s, key, n, s, storage, user_pk, Cancelled, DynamoStore, Item};
use crate::domain::{Message, Persona, RequestRecord};
use crate::error::Report;
use crate::ids::ConversationId;
use crate::store::{Change, ChangeKind, ChangePage, SyncStore};
use crate::time::{now_ms, now_secs};
use crate::{Error, Result};

/// The index of the change feed: `sync_user`, `sync_at`, keys only; only changed record items
/// and tombstones carry its keys (a sparse index). The same in `infra/template.yaml`.
pub(crate) const CHANGE_INDEX: &str = "by_change";

/// The `SET` clauses that mark an updated item as a change of its owner's (values from
/// [`ChangeValues::change_values`]).
pub(crate) const CHANGE_SET: &str = "sync_user = :sync_user, sync_at = :sync_at";

/// How long a tombstone is kept: a client away longer misses deletions.
const TOMBSTONE_TTL_SECS: i64 = 30 * 86_400;

/// How far behind the clock the position at the end of the feed stays: a change stamped
/// earlier may still be on its way to the index (stamped before its write committed, and
/// the index is updated asynchronously), or stamped by a process whose clock is a little
/// behind.
const SETTLE_MS: i64 = 5_000;

/// Most changes a page holds, whatever the caller asks.
const MAX_PAGE: usize = 1_000;

/// A change's place in its user's feed: the time in milliseconds (13 digits: strings sort as
/// times) and 12 random hex digits.
pub(crate) fn sync_stamp() -> String {
    format!("{:013}#{:012x}", now_ms(), rand::random::<u64>() >> 16)
}

/// Marks an item to be put as a change of `user`'s, now.
pub(crate) fn mark_changed(item: &mut Item, user: &str) {
    item.insert("sync_user".into(), s(user));
    item.insert("sync_at".into(), s(sync_stamp()));
}

/// The values of [`CHANGE_SET`] on an update.
pub(crate) trait ChangeValues: Sized {
    fn change_values(self, user: &str) -> Self;
}

impl ChangeValues for UpdateItemFluentBuilder {
    fn change_values(self, user: &str) -> Self {
        self.expression_attribute_values(":sync_user", s(user))
            .expression_attribute_values(":sync_at", s(sync_stamp()))
    }
}

impl ChangeValues for UpdateBuilder {
    fn change_values(self, user: &str) -> Self {
        self.expression_attribute_values(":sync_user", s(user))
            .expression_attribute_values(":sync_at", s(sync_stamp()))
    }
}

/// What a tombstone's `body` holds.
#[derive(Serialize, Deserialize)]
struct Gone {
    kind: ChangeKind,
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    conversation_id: Option<ConversationId>,
}

/// The tombstone of a deleted record (`conversation_id`: a message's), to put with or right
/// after its delete.
pub(crate) fn tombstone(
    user: &str,
    kind: ChangeKind,
    id: &str,
    conversation_id: Option<&ConversationId>,
) -> Result<Item> {
    let gone = Gone {
        kind,
        id: id.to_owned(),
        conversation_id: conversation_id.cloned(),
    };
    let mut item = key(user_pk(user), format!("GONE#{}#{id}", kind.as_str()));
    item.insert("body".into(), s(serde_json::to_string(&gone)?));
    item.insert("expires_at".into(), n(now_secs() + TOMBSTONE_TTL_SECS));
    mark_changed(&mut item, user);
    Ok(item)
}

/// An entry of the change index: an item's key and its place in the feed.
struct Entry {
    pk: String,
    sk: String,
    at: String,
}

/// A position this store made: where in the feed (a `sync_at`, or its 13 digits of time
/// alone), and, after a `~`, the cursor's horizon: the time after which every deletion the
/// client has not seen happened (see [`Position::next`]). Positions made before horizons
/// existed have none.
#[derive(Debug, PartialEq)]
struct Position<'a> {
    at: &'a str,
    horizon: Option<i64>,
}

impl<'a> Position<'a> {
    fn parse(position: &'a str) -> Result<Position<'a>> {
        let invalid = || Error::Invalid("the sync position is not valid".into());
        let digits = |t: &str| t.len() == 13 && t.bytes().all(|b| b.is_ascii_digit());
        let hex =
            |t: &str| !t.is_empty() && t.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let (at, horizon) = match position.split_once('~') {
            Some((at, h)) if digits(h) => (at, Some(h.parse().map_err(|_| invalid())?)),
            Some(_) => return Err(invalid()),
            None => (position, None),
        };
        let (ms, tail) = match at.split_once('#') {
            Some((ms, tail)) => (ms, Some(tail)),
            None => (at, None),
        };
        if digits(ms) && tail.is_none_or(hex) {
            Ok(Position { at, horizon })
        } else {
            Err(invalid())
        }
    }

    /// Refuses a cursor whose horizon is older than the oldest tombstone kept (a tombstone
    /// lives [`TOMBSTONE_TTL_SECS`] from its deletion): a deletion the client has not seen may
    /// be gone, and a client that applied the rest would keep records that no longer exist.
    /// It syncs again from the beginning instead and replaces what it holds.
    fn refuse_expired(&self, now_ms: i64) -> Result<()> {
        match self.horizon {
            Some(h) if now_ms - h > TOMBSTONE_TTL_SECS * 1000 => Err(Error::Expired(format!(
                "this cursor is older than the {} days deletions are kept: sync again without \
                 `since` and replace the records you hold",
                TOMBSTONE_TTL_SECS / 86_400
            ))),
            _ => Ok(()),
        }
    }

    /// The position a page hands out: after `at` (the page's, else the cursor's own: a quiet
    /// feed keeps its place), with a horizon. At the end of the feed every change up to
    /// [`SETTLE_MS`] ago was listed, so the client has seen every deletion before that; mid-feed
    /// (`has_more`) it has not seen the rest of the page run yet, so the horizon stays the
    /// cursor's (a first sync's is its start: a client that holds nothing misses nothing).
    fn next(
        from: Option<&Position>,
        at: Option<String>,
        has_more: bool,
        now_ms: i64,
    ) -> Option<String> {
        let at = at.or_else(|| from.map(|p| p.at.to_owned()))?;
        let horizon = match from {
            _ if !has_more => now_ms - SETTLE_MS,
            Some(Position {
                horizon: Some(h), ..
            }) => *h,
            // A first sync, or a cursor from before horizons: from now on.
            _ => now_ms,
        };
        Some(format!("{at}~{horizon:013}"))
    }
}

/// The change an item stands for; `None` for an item that is none of the user's records.
fn change_of(user: &str, item: &Item) -> Result<Option<Change>> {
    let (pk, sk) = (
        get_s(item, "pk").unwrap_or_default(),
        get_s(item, "sk").unwrap_or_default(),
    );
    if get_s(item, "sync_user") != Some(user) {
        return Ok(None);
    }
    let change = |kind, id: String, conversation_id, record: serde_json::Value| Change {
        kind,
        id,
        conversation_id,
        deleted: false,
        record: Some(record),
    };
    let kind = |prefix: &str| sk.starts_with(prefix);
    Ok(Some(if pk.starts_with("USER#") && kind("GONE#") {
        let gone: Gone = body(item)?;
        Change {
            kind: gone.kind,
            id: gone.id,
            conversation_id: gone.conversation_id,
            deleted: true,
            record: None,
        }
    } else if pk.starts_with("USER#") && kind("PERSONA#") {
        let persona: Persona = body(item)?;
        let id = persona.persona_id.to_string();
        change(
            ChangeKind::Persona,
            id,
            None,
            serde_json::to_value(persona)?,
        )
    } else if pk.starts_with("USER#") && kind("CONV#") {
        let conversation = conversation_of(item)?;
        let id = conversation.conversation_id.to_string();
        change(
            ChangeKind::Conversation,
            id,
            None,
            serde_json::to_value(conversation)?,
        )
    } else if let (Some(conversation_id), true) = (pk.strip_prefix("CONV#"), kind("MSG#")) {
        let message = body::<Message>(item)?.shown();
        let id = message.message_id.to_string();
        let value = serde_json::to_value(message)?;
        change(ChangeKind::Message, id, Some(conversation_id.into()), value)
    } else if pk.starts_with("REQ#") && sk == "REQ" {
        let record: RequestRecord = body(item)?;
        let id = record.request_id.to_string();
        change(ChangeKind::Request, id, None, serde_json::to_value(record)?)
    } else {
        return Ok(None);
    }))
}

/// The changes of the entries whose items were read, in the feed's order, each record once
/// (at its latest change: a record deleted and written again has its tombstone and item).
/// An entry whose item is gone was deleted since the index was read: its tombstone follows.
fn feed(user: &str, entries: &[Entry], found: &HashMap<(String, String), Item>) -> Vec<Change> {
    let mut changes: Vec<Option<Change>> = Vec::with_capacity(entries.len());
    let mut at: HashMap<(&'static str, String), usize> = HashMap::new();
    for entry in entries {
        let Some(item) = found.get(&(entry.pk.clone(), entry.sk.clone())) else {
            continue;
        };
        let change = match change_of(user, item) {
            Ok(Some(change)) => change,
            Ok(None) => continue,
            // Skipped rather than failing every sync of the user from here on; listings show
            // the same record's error.
            Err(e) => {
                tracing::warn!(pk = %entry.pk, sk = %entry.sk, error = %Report(&e), "a changed item that cannot be read");
                continue;
            }
        };
        if let Some(earlier) = at.insert((change.kind.as_str(), change.id.clone()), changes.len()) {
            changes[earlier] = None;
        }
        changes.push(Some(change));
    }
    changes.into_iter().flatten().collect()
}

/// Where the next page starts: after the last entry that settled (see [`SETTLE_MS`]), so
/// that a change still on its way to the index is not passed over (the younger entries are
/// returned again). At the end of the feed, `None` if none settled. Mid-feed, a page of
/// nothing but young entries (a burst under way) goes on after its last, or paging would
/// never move: a change of that burst still on its way could be missed.
fn next_position(entries: &[Entry], has_more: bool) -> Option<String> {
    // A stamp sorts below the bare 13 digits of a later millisecond only.
    let settled = format!("{:013}", now_ms() - SETTLE_MS);
    let last_settled = entries.iter().rev().find(|e| e.at < settled);
    match last_settled {
        Some(e) => Some(e.at.clone()),
        None if has_more => entries.last().map(|e| e.at.clone()),
        None => None,
    }
}

impl DynamoStore {
    /// Up to `want` entries of the user's changes after `after`, oldest first (several
    /// queries only where one stopped at DynamoDB's 1 MB per query).
    async fn changed_entries(
        &self,
        user_id: &str,
        after: Option<&str>,
        want: usize,
    ) -> Result<Vec<Entry>> {
        let (mut entries, mut start) = (Vec::new(), None);
        loop {
            let query = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(CHANGE_INDEX)
                .expression_attribute_values(":user", s(user_id))
                .scan_index_forward(true)
                .limit((want - entries.len()) as i32)
                .set_exclusive_start_key(start);
            let query = match after {
                Some(p) => query
                    .key_condition_expression("sync_user = :user AND sync_at > :after")
                    .expression_attribute_values(":after", s(p)),
                None => query.key_condition_expression("sync_user = :user"),
            };
            let out = query
                .send()
                .await
                .map_err(|e| storage("query the change feed", e))?;
            for item in out.items.unwrap_or_default() {
                let (Some(pk), Some(sk), Some(at)) = (
                    get_s(&item, "pk"),
                    get_s(&item, "sk"),
                    get_s(&item, "sync_at"),
                ) else {
                    continue;
                };
                let (pk, sk, at) = (pk.to_owned(), sk.to_owned(), at.to_owned());
                entries.push(Entry { pk, sk, at });
            }
            start = out.last_evaluated_key;
            if start.is_none() || entries.len() >= want {
                return Ok(entries);
            }
        }
    }

    /// The items of the entries that still exist, by key, read consistently 100 at a time.
    async fn read_entries(&self, entries: &[Entry]) -> Result<HashMap<(String, String), Item>> {
        let mut found = HashMap::new();
        for chunk in entries.chunks(100) {
            let keys = chunk.iter().map(|e| key(&e.pk, &e.sk)).collect();
            for item in self.batch_get(keys).await? {
                let (Some(pk), Some(sk)) = (get_s(&item, "pk"), get_s(&item, "sk")) else {
                    continue;
                };
                found.insert((pk.to_owned(), sk.to_owned()), item);
            }
        }
        Ok(found)
    }

    /// The items of up to 100 keys, asking again for what DynamoDB left unprocessed (it does
    /// under throttling) a few times before giving up.
    pub(super) async fn batch_get(&self, mut keys: Vec<Item>) -> Result<Vec<Item>> {
        let mut items = Vec::new();
        for attempt in 0..5 {
            if keys.is_empty() {
                return Ok(items);
            }
            if attempt > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(50 << attempt)).await;
            }
            let request = KeysAndAttributes::builder()
                .set_keys(Some(keys))
                .consistent_read(true)
                .build()
                .map_err(|e| storage("build a batch read", e))?;
            let out = self
                .client
                .batch_get_item()
                .request_items(&self.table, request)
                .send()
                .await
                .map_err(|e| storage("read changed items", e))?;
            items.extend(
                out.responses
                    .and_then(|mut r| r.remove(&self.table))
                    .unwrap_or_default(),
            );
            keys = out
                .unprocessed_keys
                .and_then(|mut u| u.remove(&self.table))
                .map(|k| k.keys)
                .unwrap_or_default();
        }
        if keys.is_empty() {
            return Ok(items);
        }
        Err(Error::storage_msg("dynamodb throttled a batch read"))
    }

    /// Deletes the item of `at` and puts `gone`, its tombstone, in one transaction, on
    /// condition that the item is there: false when it was not (and nothing was written).
    /// Tried again over another transaction on the item (DynamoDB cancels rather than waits).
    pub(crate) async fn delete_with_tombstone(
        &self,
        at: Item,
        gone: Item,
        op: &str,
    ) -> Result<bool> {
        let delete = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(at))
            .condition_expression("attribute_exists(pk)")
            .build()
            .map_err(|e| storage("build a transaction item", e))?;
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(gone))
            .build()
            .map_err(|e| storage("build a transaction item", e))?;
        let items = vec![
            TransactWriteItem::builder().delete(delete).build(),
            TransactWriteItem::builder().put(put).build(),
        ];
        match self.transact(items, op).await? {
            Ok(()) => Ok(true),
            Err(cancelled) if cancelled.failed(Some(0)) => Ok(false),
            Err(cancelled) => Err(cancelled.into_error(op)),
        }
    }

    /// Deletes records with their tombstones: each of `records` (its item keys, and the
    /// tombstone to put, if any) in the same transaction as its tombstone, so the feed never
    /// reports a record deleted that is still there, nor loses the deletion of one that is
    /// gone, whatever fails between. Up to 100 writes a transaction; a record's writes are
    /// never split.
    pub(crate) async fn delete_with_tombstones(
        &self,
        records: Vec<(Vec<Item>, Option<Item>)>,
        op: &str,
    ) -> Result<()> {
        const MOST: usize = 100;
        let mut batch: Vec<TransactWriteItem> = Vec::new();
        let mut records = records.into_iter().peekable();
        while let Some((keys, gone)) = records.next() {
            for k in keys {
                let delete = Delete::builder()
                    .table_name(&self.table)
                    .set_key(Some(k))
                    .build()
                    .map_err(|e| storage("build a transaction item", e))?;
                batch.push(TransactWriteItem::builder().delete(delete).build());
            }
            if let Some(gone) = gone {
                let put = Put::builder()
                    .table_name(&self.table)
                    .set_item(Some(gone))
                    .build()
                    .map_err(|e| storage("build a transaction item", e))?;
                batch.push(TransactWriteItem::builder().put(put).build());
            }
            let next = records
                .peek()
                .map_or(0, |(keys, gone)| keys.len() + usize::from(gone.is_some()));
            if records.peek().is_none() || batch.len() + next > MOST {
                self.transact(std::mem::take(&mut batch), op)
                    .await?
                    .map_err(|cancelled| cancelled.into_error(op))?;
            }
        }
        Ok(())
    }

    /// Sends one transaction, again while it conflicts with another (a few times): its
    /// cancellation when a condition failed, `Conflict` when it kept conflicting.
    pub(crate) async fn transact(
        &self,
        items: Vec<TransactWriteItem>,
        op: &str,
    ) -> Result<std::result::Result<(), Cancelled>> {
        for _ in 0..5 {
            let sent = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items.clone()))
                .send()
                .await;
            let Err(e) = sent else { return Ok(Ok(())) };
            let cancelled = Cancelled::of(e, op)?;
            if !cancelled.conflicted() {
                return Ok(Err(cancelled));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Err(Error::Conflict(format!(
            "{op}: the records kept changing; try again"
        )))
    }
}

#[async_trait]
impl SyncStore for DynamoStore {
    async fn changes(
        &self,
        user_id: &str,
        position: Option<&str>,
        limit: usize,
    ) -> Result<ChangePage> {
        let from = position.map(Position::parse).transpose()?;
        if let Some(from) = &from {
            from.refuse_expired(now_ms())?;
        }
        let limit = limit.clamp(1, MAX_PAGE);
        // One more than the page: whether more follow.
        let after = from.as_ref().map(|p| p.at);
        let mut entries = self.changed_entries(user_id, after, limit + 1).await?;
        let has_more = entries.len() > limit;
        entries.truncate(limit);
        let found = self.read_entries(&entries).await?;
        Ok(ChangePage {
            changes: feed(user_id, &entries, &found),
            position: Position::next(
                from.as_ref(),
                next_position(&entries, has_more),
                has_more,
                now_ms(),
            ),
            has_more,
        })
    }
}

/// The owner of a record item written before the change feed, if it is one: a persona's or a
/// conversation's from its partition, a request's from its `user_id`, a message's from its
/// conversation (`owners`, filled by the scan's first pass).
fn owner_of(item: &Item, owners: &HashMap<String, String>) -> Option<String> {
    let (pk, sk) = (get_s(item, "pk")?, get_s(item, "sk")?);
    if let Some(user) = pk.strip_prefix("USER#") {
        let record = sk.starts_with("PERSONA#") || sk.starts_with("CONV#");
        return record.then(|| user.to_owned());
    }
    if pk.starts_with("REQ#") && sk == "REQ" {
        return get_s(item, "user_id").map(str::to_owned);
    }
    if sk.starts_with("MSG#") {
        return owners.get(pk).cloned();
    }
    None
}

/// Gives the record items written before the change feed its keys (`sync_user`, `sync_at`
/// now), so that a first sync of an older account lists them. Two scans of the table per
/// `aws-init` (the first learns which user owns each conversation, for its messages), writing
/// only what lacks them: a rerun after a failure half-way finishes the job.
pub(crate) async fn backfill_changes(client: &aws_sdk_dynamodb::Client, table: &str) -> Result<()> {
    let mut owners: HashMap<String, String> = HashMap::new();
    for pass in [0, 1] {
        let mut start = None;
        loop {
            let out = client
                .scan()
                .table_name(table)
                .filter_expression("attribute_not_exists(sync_at) AND attribute_exists(body)")
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| storage("scan for records to add to the change feed", e))?;
            for item in out.items.unwrap_or_default() {
                if let (Some(pk), Some(sk)) = (get_s(&item, "pk"), get_s(&item, "sk")) {
                    if let Some(user) = pk.strip_prefix("USER#").filter(|_| sk.starts_with("CONV#"))
                    {
                        owners.insert(sk.to_owned(), user.to_owned());
                    }
                }
                let Some(user) = owner_of(&item, &owners).filter(|_| pass == 1) else {
                    continue;
                };
                stamp_old(client, table, &item, &user).await?;
            }
            start = out.last_evaluated_key;
            if start.is_none() {
                break;
            }
        }
    }
    Ok(())
}

/// Gives one old record item its change keys, unless a write gave it some meanwhile.
async fn stamp_old(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    item: &Item,
    user: &str,
) -> Result<()> {
    let (Some(pk), Some(sk)) = (get_s(item, "pk"), get_s(item, "sk")) else {
        return Ok(());
    };
    let written = client
        .update_item()
        .table_name(table)
        .set_key(Some(key(pk, sk)))
        .update_expression(format!("SET {CHANGE_SET}"))
        .condition_expression("attribute_exists(pk) AND attribute_not_exists(sync_at)")
        .change_values(user)
        .send()
        .await;
    match written {
        Ok(_) => Ok(()),
        Err(e) if super::is_conditional_failure(&e) => Ok(()),
        Err(e) => Err(storage("add a record to the change feed", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_expires_by_its_horizon_not_by_its_last_change() {
        let day = 86_400_000;
        let now = 100 * day;
        let cursor = |at: i64, horizon: i64| format!("{at:013}#{:012x}~{horizon:013}", 7);
        let refused = |c: &str| Position::parse(c).unwrap().refuse_expired(now).is_err();
        assert!(!refused(&cursor(now - 29 * day, now - 29 * day)));
        assert!(!refused(&cursor(now - 30 * day, now - 30 * day)));
        assert!(refused(&cursor(now - 30 * day - 1, now - 30 * day - 1)));
        // A quiet account: its last change is old, its cursor recent.
        assert!(!refused(&cursor(now - 90 * day, now - day)));
        // Positions from before horizons are taken as they were.
        assert!(!refused(&format!("{:013}", now - 90 * day)));
        let err = Position::parse(&cursor(0, 0))
            .unwrap()
            .refuse_expired(now)
            .unwrap_err();
        assert!(matches!(err, Error::Expired(_)), "{err:?}");
        for bad in [
            "",
            "123",
            "0000000000001~",
            "0000000000001~12",
            "0000000000001#~0000000000001",
            "x000000000001",
        ] {
            assert!(Position::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_page_hands_out_a_horizon_that_moves_only_at_the_end_of_the_feed() {
        let now = 1_000_000_000_000;
        let old = Position::parse("0000000000005~0000000000009").unwrap();
        // End of the feed: the horizon is now, less the settling time, even when no entry
        // settled (the cursor keeps its place).
        let quiet = Position::next(Some(&old), None, false, now).unwrap();
        assert_eq!(quiet, format!("0000000000005~{:013}", now - SETTLE_MS));
        // Mid-feed: the cursor's horizon is kept.
        let mid = Position::next(Some(&old), Some("0000000000007".into()), true, now);
        assert_eq!(mid.as_deref(), Some("0000000000007~0000000000009"));
        // A first sync's pages carry its start.
        let first = Position::next(None, Some("0000000000007".into()), true, now);
        assert_eq!(first, Some(format!("0000000000007~{now:013}")));
        // Nothing at all yet: the beginning (which never expires).
        assert_eq!(Position::next(None, None, false, now), None);
        // Every position made parses.
        for p in [quiet, mid.unwrap(), first.unwrap()] {
            assert!(Position::parse(&p).is_ok(), "{p}");
        }
    }
}
