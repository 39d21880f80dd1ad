//! What the embedded database holds and how a connection is set up: the schema of a new
//! database, the migrations that bring an older one up to it, and the pragmas of every
//! connection. Apart from the writer and the handle so that a change to a table is read in one
//! place.

use std::path::Path;

use deadpool_sqlite::rusqlite::Connection;

use super::Sync;
use crate::Result;

/// Every connection, reader or writer.
pub(super) const PRAGMAS: &str = "
    PRAGMA journal_mode = WAL;
    PRAGMA busy_timeout = 10000;
    PRAGMA foreign_keys = ON;
";

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    user_id       TEXT PRIMARY KEY,
    email         TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS refresh_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS personas (
    user_id    TEXT NOT NULL,
    persona_id TEXT NOT NULL,
    body       TEXT NOT NULL,
    PRIMARY KEY (user_id, persona_id)
);
CREATE TABLE IF NOT EXISTS conversations (
    user_id         TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    body            TEXT NOT NULL,
    PRIMARY KEY (user_id, conversation_id)
);
-- A message's place is (turn, sub): the user message of turn n is (n, 0), its reply (n, 1), so a
-- late reply still sorts right after the message it answers.
CREATE TABLE IF NOT EXISTS messages (
    conversation_id TEXT NOT NULL,
    turn            INTEGER NOT NULL,
    sub             INTEGER NOT NULL,
    message_id      TEXT NOT NULL UNIQUE,
    body            TEXT NOT NULL,
    PRIMARY KEY (conversation_id, turn, sub)
);
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL,
    status     TEXT NOT NULL,
    batch_id   TEXT,
    body       TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_by_batch ON requests (batch_id) WHERE batch_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS batches (
    batch_id    TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    request_ids TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    user_id       TEXT NOT NULL,
    key           TEXT NOT NULL,
    fingerprint   TEXT NOT NULL,
    status_code   INTEGER,
    response_body TEXT,
    locked_ms     INTEGER NOT NULL,
    expires_ms    INTEGER NOT NULL,
    PRIMARY KEY (user_id, key)
);
-- Expired rows are deleted on the write paths that create them (keys, refresh tokens) and by
-- the event tailer; these indexes keep those deletes from scanning the tables.
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency_keys (expires_ms);
CREATE INDEX IF NOT EXISTS refresh_token_expiry ON refresh_tokens (expires_ms);
CREATE TABLE IF NOT EXISTS queue_messages (
    id            TEXT PRIMARY KEY,
    queue         TEXT NOT NULL,
    body          TEXT NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    visible_ms    INTEGER NOT NULL,
    receipt       TEXT,
    sent_ms       INTEGER NOT NULL
);
-- The index receives read by is made by migration 3.
CREATE TABLE IF NOT EXISTS dead_letters (
    id            TEXT PRIMARY KEY,
    queue         TEXT NOT NULL,
    body          TEXT NOT NULL,
    receive_count INTEGER NOT NULL,
    reason        TEXT NOT NULL,
    dead_ms       INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id    TEXT NOT NULL,
    name       TEXT NOT NULL,
    data       TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_age ON events (created_ms);
";

/// Changes to `SCHEMA` after the first release, applied in order to a database whose
/// `user_version` says it lacks them (a new database gets `SCHEMA`, then all of these).
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: message attributes (request and trace ids), kept when a message is dead-lettered.
    "ALTER TABLE queue_messages ADD COLUMN attributes TEXT NOT NULL DEFAULT '{}';
     ALTER TABLE dead_letters ADD COLUMN attributes TEXT NOT NULL DEFAULT '{}';",
    // 2: when an idempotency key was first claimed: ids derived from the key use it, so a
    // retry after a crash derives the same ids.
    "ALTER TABLE idempotency_keys ADD COLUMN first_ms INTEGER NOT NULL DEFAULT 0;",
    // 3: a receive takes the oldest ready messages in (visible_ms, sent_ms) order; with both in
    // the index it reads just those, not every ready message, to sort them. Deletes and
    // visibility changes find their message by receipt, not by scanning the queue.
    "DROP INDEX IF EXISTS queue_ready;
     CREATE INDEX IF NOT EXISTS queue_ready_in_order ON queue_messages (queue, visible_ms, sent_ms);
     CREATE INDEX IF NOT EXISTS queue_by_receipt ON queue_messages (receipt);",
    // 4: sessions. A refresh token belongs to a family (the sign-in it descends from); using
    // it marks it used and hands out the next one; a used one coming back ends the family.
    "ALTER TABLE refresh_tokens ADD COLUMN family TEXT;
     ALTER TABLE refresh_tokens ADD COLUMN used_ms INTEGER;
     ALTER TABLE refresh_tokens ADD COLUMN created_ms INTEGER NOT NULL DEFAULT 0;
     UPDATE refresh_tokens SET family = token_hash WHERE family IS NULL;
     CREATE INDEX IF NOT EXISTS refresh_tokens_by_family ON refresh_tokens (family);
     CREATE INDEX IF NOT EXISTS refresh_tokens_by_user ON refresh_tokens (user_id, created_ms);",
    // 5: the persona a conversation began with (JSON): the model answers from it, and it
    // outlives the persona. NULL for conversations made before (they read the live persona).
    "ALTER TABLE conversations ADD COLUMN persona TEXT;",
    // 6: message groups (a conversation's chat turns): received one at a time, in order.
    "ALTER TABLE queue_messages ADD COLUMN group_id TEXT;
     CREATE INDEX IF NOT EXISTS queue_by_group ON queue_messages (queue, group_id, sent_ms)
         WHERE group_id IS NOT NULL;",
    // 7: conversations listed by their latest message (RFC 3339 UTC strings of one width sort
    // as times do); the body keeps it too, with the title and preview.
    "ALTER TABLE conversations ADD COLUMN last_message_at TEXT NOT NULL DEFAULT '';
     UPDATE conversations SET last_message_at = json_extract(body, '$.created_at'),
         body = json_set(body, '$.last_message_at', json_extract(body, '$.created_at'));
     CREATE INDEX IF NOT EXISTS conversations_by_activity
         ON conversations (user_id, last_message_at, conversation_id);",
    // 8: what a conversation remembers (JSON: pinned facts, summary); NULL: nothing yet.
    "ALTER TABLE conversations ADD COLUMN memory TEXT;",
    // 9: a conversation's activity is derived when read (from its messages), so migration 7's
    // column is no longer written and its index is not read.
    "DROP INDEX IF EXISTS conversations_by_activity;",
];

fn migrate(c: &Connection) -> Result<()> {
    let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        c.execute_batch(step)?;
        // PRAGMA takes no parameters; the value is our own integer.
        c.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
    }
    Ok(())
}

pub(super) fn open_reader(path: &Path) -> Result<Connection> {
    let c = Connection::open(path)?;
    c.execute_batch(PRAGMAS)?;
    c.execute_batch("PRAGMA query_only = ON")?;
    Ok(c)
}

pub(super) fn open_writer(path: &Path) -> Result<Connection> {
    let c = Connection::open(path)?;
    c.execute_batch(PRAGMAS)?;
    c.execute_batch(Sync::Full.pragma())?;
    c.execute_batch(SCHEMA)?;
    c.execute_batch("BEGIN IMMEDIATE")?;
    match migrate(&c) {
        Ok(()) => c.execute_batch("COMMIT")?,
        Err(e) => {
            let _ = c.execute_batch("ROLLBACK");
            return Err(e);
        }
    }
    Ok(c)
}
