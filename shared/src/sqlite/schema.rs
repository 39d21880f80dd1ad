//! What the embedded database holds and how a connection is set up: the schema of a new
//! database, the migrations that bring an older one up to it, and the pragmas of every
//! connection. Apart from the writer and the handle so that a change to a table is read in one
//! place.

use std::path::Path;

use deadpool_sqlite::rusqlite::config::DbConfig;
use deadpool_sqlite::rusqlite::Connection;

use super::Sync;
use crate::Result;

/// Every connection, reader or writer (see [`configure`]).
const PRAGMAS: &str = "
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
    // 10: the change feed of `GET /v1/sync` (see `crate::store::sync`): a row per change of a
    // user's record, appended by triggers in the transaction that makes the change, so no
    // write path can forget it. One b-tree, keyed by (user, seq), `seq` counting each user's
    // changes: an append is a lookup of the user's last row and one insert (a table with a
    // row per record, replaced on each change, cost twice as much: about 20 % of chat
    // throughput). A sync keeps each record's latest row. A message deleted with its
    // conversation leaves no row (the conversation's tombstone covers it); nor does a change of
    // a conversation's memory alone (not part of the record).
    "CREATE TABLE IF NOT EXISTS sync_log (
         user_id         TEXT NOT NULL,
         seq             INTEGER NOT NULL,
         kind            TEXT NOT NULL,
         record_id       TEXT NOT NULL,
         conversation_id TEXT,
         deleted         INTEGER NOT NULL,
         PRIMARY KEY (user_id, seq)
     ) WITHOUT ROWID;
     -- The message triggers find a message's owner by its conversation's id alone.
     CREATE INDEX IF NOT EXISTS conversations_by_id ON conversations (conversation_id);
     CREATE TRIGGER IF NOT EXISTS sync_personas_insert AFTER INSERT ON personas
     BEGIN
       INSERT INTO sync_log VALUES (NEW.user_id,
         (SELECT COALESCE(MAX(seq), 0) + 1 FROM sync_log WHERE user_id = NEW.user_id),
         'persona', NEW.persona_id, NULL, 0);
     END;
     CREATE TRIGGER IF NOT EXISTS sync_personas_update AFTER UPDATE ON personas
     BEGIN
       INSERT INTO sync_log VALUES (NEW.user_id,
         (SELECT COALESCE(MAX(seq), 0) + 1 FROM sync_log WHERE user_id = NEW.user_id),
         'persona', NEW.persona_id, NULL, 0);
     END;
     CREATE TRIGGER IF NOT EXISTS sync_personas_delete AFTER DELETE ON personas
     BEGIN
       INSERT INTO sync_log VALUES (OLD.user_id,
         (SELECT COALESCE(MAX(seq), 0) + 1 FROM sync_log WHERE user_id = OLD.user_id),
         'persona', OLD.persona_id, NULL, 1);
     END;
     CREATE TRIGGER IF NOT EXISTS sync_conversations_insert AFTER INSERT ON conversations
     BEGIN
       INSERT INTO sync_log VALUES (NEW.user_id,
         (SELECT COALESCE(MAX(seq), 0) + 1 FROM sync_log WHERE user_id = NEW.user_id),
         'conversation', NEW.conversation_id, NULL, 0);
     END;
     CREATE TRIGGER IF NOT EXISTS sync_conversations_update AFTER UPDATE ON conversations
       WHEN NEW.body IS NOT OLD.body OR NEW.persona IS NOT OLD.persona
     BEGIN
       INSERT INTO sync_log VALUES (NEW.user_id,
         (SELECT COALESCE(MAX(seq), 0) + 1 FROM sync_log WHERE user_id = NEW.user_id),
         'conversation', NEW.conversation_id, NULL, 0);
     END;
     CREATE TRIGGER IF NOT EXISTS sync_conversations_delete AFTER DELETE ON conversations
     BEGIN
       INSERT INTO sync_log VALUES (OLD.user_id,
         (SELECT COALESCE(MAX(seq), 0) + 1 FROM sync_log WHERE user_id = OLD.user_id),
         'conversation', OLD.conversation_id, NULL, 1);
     END;
     CREATE TRIGGER IF NOT EXISTS sync_messages_insert AFTER INSERT ON messages
       WHEN (SELECT user_id FROM conversations WHERE conversation_id = NEW.conversation_id) IS NOT NULL
     BEGIN
       INSERT INTO sync_log VALUES ((SELECT user_id FROM conversations WHERE conversation_id = NEW.conversation_id),
         (SELECT COALESCE(MAX(seq), 0) + 1 FROM sync_log WHERE user_id = (SELECT user_id FROM conversations WHERE conversation_id = NEW.conversation_id)),
         'message', NEW.message_id, NEW.conversation_id, 0);
     END;
     CREATE TRIGGER IF NOT EXISTS sync_messages_update AFTER UPDATE ON messages
       WHEN (SELECT user_id FROM conversations WHERE conversation_id = NEW.conversation_id) IS NOT NULL
     BEGIN
       INSERT INTO sync_log VALUES ((SELECT user_id FROM conversations WHERE conversation_id = NEW.conversation_id),
         (SELECT COALESCE(MAX(seq), 0) + 1 FROM sync_log WHERE user_id = (SELECT user_id FROM conversations WHERE conversation_id = NEW.conversation_id)),
         'message', NEW.message_id, NEW.conversation_id, 0);
     END;
     CREATE TRIGGER IF NOT EXISTS sync_messages_delete AFTER DELETE ON messages
       WHEN (SELECT user_id FROM conversations WHERE conversation_id = OLD.conversation_id) IS NOT NULL
     BEGIN
       INSERT INTO sync_log VALUES ((SELECT user_id FROM conversations WHERE conversation_id = OLD.conversation_id),
         (SELECT COALESCE(MAX(seq), 0) + 1 FROM sync_log WHERE user_id = (SELECT user_id FROM conversations WHERE conversation_id = OLD.conversation_id)),
         'message', OLD.message_id, OLD.conversation_id, 1);
     END;
     CREATE TRIGGER IF NOT EXISTS sync_requests_insert AFTER INSERT ON requests
     BEGIN
       INSERT INTO sync_log VALUES (NEW.user_id,
         (SELECT COALESCE(MAX(seq), 0) + 1 FROM sync_log WHERE user_id = NEW.user_id),
         'request', NEW.request_id, NULL, 0);
     END;
     CREATE TRIGGER IF NOT EXISTS sync_requests_update AFTER UPDATE ON requests
     BEGIN
       INSERT INTO sync_log VALUES (NEW.user_id,
         (SELECT COALESCE(MAX(seq), 0) + 1 FROM sync_log WHERE user_id = NEW.user_id),
         'request', NEW.request_id, NULL, 0);
     END;
     CREATE TRIGGER IF NOT EXISTS sync_requests_delete AFTER DELETE ON requests
     BEGIN
       INSERT INTO sync_log VALUES (OLD.user_id,
         (SELECT COALESCE(MAX(seq), 0) + 1 FROM sync_log WHERE user_id = OLD.user_id),
         'request', OLD.request_id, NULL, 1);
     END;
     INSERT INTO sync_log
         SELECT user_id, ROW_NUMBER() OVER (PARTITION BY user_id), kind, record_id, conv, 0 FROM (
             SELECT user_id, 'persona' AS kind, persona_id AS record_id, NULL AS conv FROM personas
             UNION ALL SELECT user_id, 'conversation', conversation_id, NULL FROM conversations
             UNION ALL SELECT c.user_id, 'message', m.message_id, m.conversation_id
                 FROM messages m JOIN conversations c ON c.conversation_id = m.conversation_id
             UNION ALL SELECT user_id, 'request', request_id, NULL FROM requests);",
    // 11: batches listed by their user (newest id first), and cancelled as a whole.
    "ALTER TABLE batches ADD COLUMN cancelled_at TEXT;
     CREATE INDEX IF NOT EXISTS batches_by_user ON batches (user_id, batch_id);",
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

/// Prepared statements kept per connection (see [`configure`]).
const STATEMENT_CACHE: usize = 256;

/// What every connection needs, reader or writer.
pub(super) fn configure(c: &Connection) -> deadpool_sqlite::rusqlite::Result<()> {
    c.execute_batch(PRAGMAS)?;
    // The query planner's stability guarantee: a statement keeps the plan it was prepared
    // with. Without it SQLite (3.47 on) plans `LIMIT ?` with the value bound, so every bind
    // of that parameter, even to the same value, makes the next step parse and plan the
    // statement again: the history, queue and event reads were prepared once per call, about
    // a tenth of the process's time under chat load.
    c.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    // rusqlite keeps 16 prepared statements per connection by default, fewer than the writer
    // and the workers' readers use in one chat turn: `prepare_cached` then evicted and parsed
    // again (triggers compiled with them) on most calls, about 5 % of the process's time under
    // chat load. Every statement of the store, queue and event tables fits in this.
    c.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(())
}

fn open(path: &Path) -> Result<Connection> {
    let c = Connection::open(path)?;
    configure(&c)?;
    Ok(c)
}

pub(super) fn open_reader(path: &Path) -> Result<Connection> {
    let c = open(path)?;
    c.execute_batch("PRAGMA query_only = ON")?;
    Ok(c)
}

pub(super) fn open_writer(path: &Path) -> Result<Connection> {
    let c = open(path)?;
    c.execute_batch(Sync::Full.pragma())?;
    // Every write of a group commit runs in a savepoint of its own (see `writer`), and the
    // savepoint keeps the first-changed pages' old contents in a sub-journal. SQLite holds
    // that in memory only up to 64 KiB, then moves it to a temporary file: with the change
    // feed's triggers most settlements passed that, and wrote and re-wrote the file through
    // the kernel, about 30 % of the writer's time. In memory it is a copy per page.
    c.execute_batch("PRAGMA temp_store = MEMORY")?;
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
