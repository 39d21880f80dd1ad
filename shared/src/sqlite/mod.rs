//! The SQLite database behind every embedded adapter (queue, store, events, local auth).
//!
//! One file in the data dir, in WAL mode, so readers never wait for the writer and several
//! processes (`characterbot api` and `characterbot worker …` side by side) can share it.
//!
//! **One writer, group commit.** Every write of this process goes to a single connection on its
//! own thread. The thread takes every write waiting in its channel, runs each inside a savepoint
//! of one `BEGIN IMMEDIATE` transaction, commits once, and only then answers each caller. So
//! a hundred concurrent accepts cost one commit (one fsync) instead of a hundred transactions
//! queueing in SQLite's busy handler, and a write that fails rolls back to its own savepoint
//! without failing the others in its batch. Callers see their writes committed in the order they
//! made them. Writers of *other* processes on the same file still take turns on SQLite's lock
//! (the writer thread waits on `busy_timeout`, never an async task).
//!
//! **Reads** use read-only connections; in WAL mode they see the last commit and never wait
//! for the writer. Short reads by key run on the calling thread's own connection
//! ([`Db::read_here`]); anything longer on a pool in blocking threads ([`Db::call`]).
//!
//! **Durability.** Every commit survives a crash of the process (WAL). Against a crash of the
//! machine, a write is either *durable* ([`Db::write`]: what the API acknowledges, e.g. an
//! accepted request) or *relaxed* ([`Db::write_relaxed`]: a worker's progress, which a job
//! simply redoes if it is lost). With [`Sync::Full`] (the default) a commit holding a durable
//! write is fsynced before any of its callers is answered, and that fsync also makes every
//! relaxed commit before it durable (the WAL is written in order); a commit of relaxed writes
//! alone is not fsynced, so a power cut may roll a worker's last steps back to an earlier,
//! consistent state, from which its jobs run again. [`Sync::Normal`] fsyncs no commit.
//!
//! No crate does group commit for rusqlite, so the writer is ours (about a hundred lines).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use deadpool_sqlite::rusqlite::Connection;
use deadpool_sqlite::{Config, Hook, HookError, Pool, Runtime};
use tokio::sync::{mpsc, oneshot};

use crate::{Error, Result};

mod schema;
mod writer;

use schema::{open_reader, open_writer, PRAGMAS};
use writer::{write_loop, Pending, Reply, Write};

/// Writes waiting for the writer thread before callers wait to hand theirs in.
const CHANNEL_DEPTH: usize = 4096;

/// Whether commits of durable writes wait for the disk (`PRAGMA synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sync {
    /// A commit holding a durable write is fsynced before its writers are answered.
    #[default]
    Full,
    /// No fsync per commit: survives a process crash, may lose the last commits on power loss.
    Normal,
}

impl Sync {
    fn pragma(self) -> &'static str {
        match self {
            Sync::Full => "PRAGMA synchronous = FULL",
            Sync::Normal => "PRAGMA synchronous = NORMAL",
        }
    }
}

/// The embedded database: a pool of readers and the one writer of this process.
#[derive(Clone)]
pub struct Db {
    readers: Pool,
    writer: mpsc::Sender<Pending>,
    /// The database file; also what names this database in each thread's [`Db::read_here`]
    /// connections, which go when the last handle does.
    path: Arc<PathBuf>,
}

thread_local! {
    /// This thread's read-only connection to each open database (see [`Db::read_here`]).
    static HERE: RefCell<Vec<(Weak<PathBuf>, Connection)>> = const { RefCell::new(Vec::new()) };
}

impl Db {
    /// Opens (creating if needed) `characterbot.db` in `data_dir` with every commit fsynced.
    pub async fn open(data_dir: &Path) -> Result<Db> {
        Db::open_with(data_dir, Sync::Full).await
    }

    /// Opens `characterbot.db` in `data_dir`, brings its schema up, and starts the writer.
    pub async fn open_with(data_dir: &Path, sync: Sync) -> Result<Db> {
        crate::private_fs::private_dir(data_dir)?;
        let path = data_dir.join("characterbot.db");
        // SQLite gives the `-wal` and `-shm` files the database file's mode: make that 0600
        // first (and mend the files of an older release, made 0644).
        crate::private_fs::private_file(&path)?;
        for suffix in ["-wal", "-shm"] {
            let side = data_dir.join(format!("characterbot.db{suffix}"));
            if side.exists() {
                crate::private_fs::private_file(&side)?;
            }
        }
        let writer_path = path.clone();
        let conn = tokio::task::spawn_blocking(move || open_writer(&writer_path))
            .await
            .map_err(|e| Error::storage("opening the database", e))??;
        let (writer, inbox) = mpsc::channel(CHANNEL_DEPTH);
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || write_loop(conn, sync, inbox))?;
        let readers = Config::new(path.clone())
            .builder(Runtime::Tokio1)
            .map_err(|e| Error::Config(e.to_string()))?
            .max_size(8)
            .post_create(Hook::async_fn(|conn, _| {
                Box::pin(async move {
                    conn.interact(|c| {
                        c.execute_batch(PRAGMAS)?;
                        // A read connection that tries to write fails loudly instead of
                        // competing with the writer for the lock.
                        c.execute_batch("PRAGMA query_only = ON")
                    })
                    .await
                    .map_err(|e| HookError::message(e.to_string()))?
                    .map_err(HookError::Backend)
                })
            }))
            .build()
            .map_err(|e| Error::Config(format!("sqlite pool: {e}")))?;
        Ok(Db {
            readers,
            writer,
            path: Arc::new(path),
        })
    }

    /// Runs `f` on a read-only pooled connection in a blocking thread.
    pub async fn call<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let conn = self
            .readers
            .get()
            .await
            .map_err(|e| Error::storage("sqlite pool", e))?;
        conn.interact(f)
            .await
            .map_err(|e| Error::storage_msg(format!("sqlite worker thread: {e}")))?
    }

    /// Runs a short read, a few rows found by key, on the calling thread with that thread's own
    /// read-only connection. The hot reads of a chat turn (the request, the job's context) take
    /// tens of microseconds; handing each to a blocking thread and back ([`Db::call`]) cost
    /// more than the read, in wake-ups. Anything that may scan or return many rows uses
    /// [`Db::call`], so a runtime thread is never held for long.
    pub fn read_here<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&Connection) -> Result<R>,
    {
        HERE.with_borrow_mut(|conns| {
            conns.retain(|(db, _)| db.strong_count() > 0);
            let mine =
                |(db, _): &(Weak<PathBuf>, Connection)| db.as_ptr() == Arc::as_ptr(&self.path);
            let i = match conns.iter().position(mine) {
                Some(i) => i,
                None => {
                    conns.push((Arc::downgrade(&self.path), open_reader(&self.path)?));
                    conns.len() - 1
                }
            };
            f(&conns[i].1)
        })
    }

    /// Runs `f` as one atomic write: its changes are committed (with other writes waiting at
    /// the same time) when it returns `Ok`, and rolled back alone when it returns `Err`.
    /// Returns once the commit is durable as the [`Sync`] setting says.
    pub async fn write<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.submit(f, true).await
    }

    /// Like [`Db::write`], for a write whose loss on a power cut is harmless because it is
    /// redone (a worker's progress: a receive, a job's start or settlement, an event): its
    /// commit is not fsynced unless a durable write shares it.
    pub async fn write_relaxed<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.submit(f, false).await
    }

    async fn submit<F, R>(&self, f: F, durable: bool) -> Result<R>
    where
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let (answer, answered) = oneshot::channel::<Result<R>>();
        let job: Write = Box::new(move |c: Option<&Connection>| {
            let out = c.map(f);
            let ok = matches!(out, Some(Ok(_)));
            let reply: Reply = Box::new(move |error: Option<&str>| {
                let out = match (out, error) {
                    (Some(Err(e)), _) => Err(e),
                    (_, Some(e)) => Err(Error::storage_msg(format!("sqlite write failed: {e}"))),
                    (Some(Ok(v)), None) => Ok(v),
                    (None, None) => Err(Error::storage_msg("the write was not run")),
                };
                // The caller may have gone away (a dropped request); nothing to tell then.
                let _ = answer.send(out);
            });
            (ok, reply)
        });
        self.writer
            .send(Pending { run: job, durable })
            .await
            .map_err(|_| Error::storage_msg("the database writer has stopped"))?;
        answered
            .await
            .map_err(|_| Error::storage_msg("the database writer has stopped"))?
    }
}

#[cfg(test)]
mod tests {
    use super::schema::{MIGRATIONS, SCHEMA};
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

    async fn counter_db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).await.unwrap();
        db.write(|c| Ok(c.execute_batch("CREATE TABLE t (caller INTEGER, n INTEGER)")?))
            .await
            .unwrap();
        (dir, db)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writes_are_grouped_and_a_failing_one_fails_alone() {
        let (_dir, db) = counter_db().await;
        let mut tasks = tokio::task::JoinSet::new();
        for caller in 0..50i64 {
            let db = db.clone();
            tasks.spawn(async move {
                let mut outcomes = Vec::new();
                for n in 0..20i64 {
                    let out = db
                        .write(move |c| {
                            c.execute("INSERT INTO t VALUES (?1, ?2)", [caller, n])?;
                            if n % 7 == 3 {
                                // Fails after writing: its row must be rolled back alone.
                                return Err(Error::Conflict("refused".into()));
                            }
                            Ok(n)
                        })
                        .await;
                    outcomes.push(out.is_ok());
                }
                outcomes
            });
        }
        while let Some(outcomes) = tasks.join_next().await {
            let outcomes = outcomes.unwrap();
            let expected: Vec<bool> = (0..20).map(|n| n % 7 != 3).collect();
            assert_eq!(outcomes, expected, "only the refused writes fail");
        }
        let (rows, failed_rows): (i64, i64) = db
            .call(|c| {
                Ok(c.query_row(
                    "SELECT COUNT(*), COALESCE(SUM(n % 7 = 3), 0) FROM t",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?)
            })
            .await
            .unwrap();
        assert_eq!((rows, failed_rows), (50 * 17, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn each_callers_writes_commit_in_the_order_made() {
        let (_dir, db) = counter_db().await;
        let mut tasks = tokio::task::JoinSet::new();
        for caller in 0..20i64 {
            let db = db.clone();
            tasks.spawn(async move {
                for n in 0..25i64 {
                    db.write(move |c| {
                        c.execute("INSERT INTO t VALUES (?1, ?2)", [caller, n])?;
                        Ok(())
                    })
                    .await
                    .unwrap();
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let per_caller: Vec<Vec<i64>> = db
            .call(|c| {
                let mut out = vec![Vec::new(); 20];
                let mut stmt = c.prepare("SELECT caller, n FROM t ORDER BY rowid")?;
                let rows =
                    stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
                for row in rows {
                    let (caller, n) = row?;
                    out[caller as usize].push(n);
                }
                Ok(out)
            })
            .await
            .unwrap();
        for ns in per_caller {
            assert_eq!(ns, (0..25).collect::<Vec<_>>());
        }
    }

    #[tokio::test]
    async fn reads_cannot_write_and_a_panicking_write_does_not_stop_the_writer() {
        let (_dir, db) = counter_db().await;
        let read_write = db
            .call(|c| Ok(c.execute("INSERT INTO t VALUES (1, 1)", [])?))
            .await;
        assert!(read_write.is_err(), "read connections are read-only");
        let panicked = db
            .write(|c| -> Result<()> {
                c.execute("INSERT INTO t VALUES (2, 2)", [])?;
                panic!("a bug in a write");
            })
            .await;
        assert!(panicked.is_err());
        db.write(|c| Ok(c.execute("INSERT INTO t VALUES (3, 3)", [])?))
            .await
            .unwrap();
        let callers: Vec<i64> = db
            .call(|c| {
                let mut stmt = c.prepare("SELECT caller FROM t")?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await
            .unwrap();
        assert_eq!(
            callers,
            [3],
            "the panicked write was rolled back, the next one committed"
        );
    }
}
