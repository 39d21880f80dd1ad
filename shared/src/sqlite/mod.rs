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
use std::sync::{Arc, Mutex, Weak};

use deadpool_sqlite::rusqlite::{self, Connection};
use deadpool_sqlite::{Config, Hook, HookError, InteractError, Pool, Runtime};
use tokio::sync::{mpsc, oneshot};

use crate::error::SharedError;
use crate::{Error, Result};

mod schema;
mod writer;

use schema::{configure, open_reader, open_writer};
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
            .map_err(|e| Error::config("sqlite pool settings", e))?
            .max_size(8)
            .post_create(Hook::async_fn(|conn, _| {
                Box::pin(async move {
                    conn.interact(|c| {
                        configure(c)?;
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
            .map_err(|e| Error::config("sqlite pool", e))?;
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
            .map_err(|e| Error::storage("sqlite worker thread", ThreadFailed(Mutex::new(e))))?
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
            let reply: Reply = Box::new(move |error: Option<&Arc<rusqlite::Error>>| {
                let out = match (out, error) {
                    (Some(Err(e)), _) => Err(e),
                    (_, Some(e)) => Err(Error::storage(
                        "sqlite write failed",
                        SharedError(Arc::clone(e)),
                    )),
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

/// A read's blocking thread panicked or was cancelled. deadpool's [`InteractError`] is not
/// `Sync` (a panic payload is `Send` only), so it cannot be an error's source as it is: the
/// mutex makes it one, whole, for a caller that downcasts.
#[derive(Debug)]
pub struct ThreadFailed(pub Mutex<InteractError>);

impl std::fmt::Display for ThreadFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A poisoned lock still holds the error: nothing panics while formatting it.
        match self.0.lock() {
            Ok(e) => std::fmt::Display::fmt(&*e, f),
            Err(poisoned) => std::fmt::Display::fmt(&**poisoned.get_ref(), f),
        }
    }
}

impl std::error::Error for ThreadFailed {}

#[cfg(test)]
mod tests;
