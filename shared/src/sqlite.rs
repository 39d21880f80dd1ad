//! The SQLite database behind every embedded adapter (queue, store, events, local auth).
//!
//! One file in the data dir, in WAL mode so that readers never wait for the writer and several
//! processes (`characterbot api` and `characterbot worker …` side by side) can share it. Every
//! query runs on a pooled connection in a blocking thread, so the async runtime never stalls on
//! disk I/O. Write transactions use `BEGIN IMMEDIATE` so two writers queue up on the busy
//! timeout instead of failing half-way with `SQLITE_BUSY`.

use std::path::Path;

use deadpool_sqlite::rusqlite::{self, Connection};
use deadpool_sqlite::{Config, Hook, HookError, Pool, Runtime};

use crate::{Error, Result};

const PRAGMAS: &str = "
    PRAGMA journal_mode = WAL;
    PRAGMA synchronous = NORMAL;
    PRAGMA busy_timeout = 10000;
    PRAGMA foreign_keys = ON;
";

const SCHEMA: &str = "
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
CREATE INDEX IF NOT EXISTS queue_ready ON queue_messages (queue, visible_ms);
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

/// A pool of connections to the embedded database.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
}

/// Changes to `SCHEMA` after the first release, applied in order to a database whose
/// `user_version` says it lacks them (a new database gets `SCHEMA`, then all of these).
const MIGRATIONS: &[&str] = &[
    // 1: message attributes (request and trace ids), kept when a message is dead-lettered.
    "ALTER TABLE queue_messages ADD COLUMN attributes TEXT NOT NULL DEFAULT '{}';
     ALTER TABLE dead_letters ADD COLUMN attributes TEXT NOT NULL DEFAULT '{}';",
];

fn migrate(tx: &rusqlite::Transaction<'_>) -> Result<()> {
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        tx.execute_batch(step)?;
        // PRAGMA takes no parameters; the value is our own integer.
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
    }
    Ok(())
}

impl Db {
    /// Opens (creating if needed) `characterbot.db` in `data_dir` and brings its schema up.
    pub async fn open(data_dir: &Path) -> Result<Db> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join("characterbot.db");
        let pool = Config::new(path)
            .builder(Runtime::Tokio1)
            .map_err(|e| Error::Config(e.to_string()))?
            .max_size(8)
            .post_create(Hook::async_fn(|conn, _| {
                Box::pin(async move {
                    conn.interact(|c| c.execute_batch(PRAGMAS))
                        .await
                        .map_err(|e| HookError::message(e.to_string()))?
                        .map_err(HookError::Backend)
                })
            }))
            .build()
            .map_err(|e| Error::Config(format!("sqlite pool: {e}")))?;
        let db = Db { pool };
        db.call(|c| c.execute_batch(SCHEMA).map_err(Error::from))
            .await?;
        db.write(migrate).await?;
        Ok(db)
    }

    /// Runs `f` on a pooled connection in a blocking thread.
    pub async fn call<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let conn = self
            .pool
            .get()
            .await
            .map_err(|e| Error::Storage(format!("sqlite pool: {e}")))?;
        conn.interact(f)
            .await
            .map_err(|e| Error::Storage(format!("sqlite worker thread: {e}")))?
    }

    /// Runs `f` inside a `BEGIN IMMEDIATE` transaction, committed when `f` returns `Ok`.
    pub async fn write<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.call(move |c| {
            let tx = rusqlite::Transaction::new(c, rusqlite::TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_database_of_the_first_release_is_migrated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let old = Connection::open(dir.path().join("characterbot.db")).unwrap();
            old.execute_batch(SCHEMA).unwrap();
            old.execute(
                "INSERT INTO queue_messages (id, queue, body, visible_ms, sent_ms)
                 VALUES ('m1', 'persona', '{}', 0, 0)",
                [],
            )
            .unwrap();
        }
        for _ in 0..2 {
            // Twice: opening a migrated database changes nothing.
            let db = Db::open(dir.path()).await.unwrap();
            let (version, attributes) = db
                .call(|c| {
                    let v: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
                    let a: String = c.query_row(
                        "SELECT attributes FROM queue_messages WHERE id = 'm1'",
                        [],
                        |r| r.get(0),
                    )?;
                    Ok((v, a))
                })
                .await
                .unwrap();
            assert_eq!(version, MIGRATIONS.len() as i64);
            assert_eq!(attributes, "{}", "old messages get no attributes");
        }
    }
}
