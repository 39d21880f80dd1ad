//! The writer thread: the one connection of this process that writes, and its group commit
//! (see the "One writer, group commit" and "Durability" sections of the module above).

use std::sync::Arc;

use deadpool_sqlite::rusqlite::{self, Connection};
use tokio::sync::mpsc;

use super::Sync;

/// Most writes committed together; more wait for the next commit.
const MAX_GROUP: usize = 512;
/// One write handed to the writer thread: runs the caller's closure on the connection (or not,
/// given none: the transaction could not begin) and returns whether it succeeded, plus what to
/// tell the caller once the commit's fate is known.
pub(super) type Write = Box<dyn FnOnce(Option<&Connection>) -> (bool, Reply) + Send>;
/// Answers a caller: given the commit's error, if any. One failed commit fails every write in
/// it, so its error is shared (one `Arc` per failed commit, nothing per successful one).
pub(super) type Reply = Box<dyn FnOnce(Option<&Arc<rusqlite::Error>>) + Send>;

/// A write waiting for the writer thread.
pub(super) struct Pending {
    pub(super) run: Write,
    /// Must be on disk before its caller is answered (see the module's "Durability").
    pub(super) durable: bool,
}

/// Runs one of the writer's transaction-control statements from the statement cache: parsing them anew for every write was a measurable share of the writer's time.
fn run_cached(c: &Connection, sql: &str) -> rusqlite::Result<()> {
    c.prepare_cached(sql)?.raw_execute().map(|_| ())
}

/// Puts `first` and the writes waiting behind it (up to [`MAX_GROUP`]) into `group`; whether
/// any of them is durable.
fn take_group(first: Pending, inbox: &mut mpsc::Receiver<Pending>, group: &mut Vec<Write>) -> bool {
    let mut durable = first.durable;
    group.push(first.run);
    while group.len() < MAX_GROUP {
        match inbox.try_recv() {
            Ok(w) => {
                durable |= w.durable;
                group.push(w.run);
            }
            Err(_) => break,
        }
    }
    durable
}

/// The writer thread: takes all waiting writes, runs each in its own savepoint of one
/// transaction, commits, answers. Ends when every `Db` handle is gone.
pub(super) fn write_loop(c: Connection, sync: Sync, mut inbox: mpsc::Receiver<Pending>) {
    let mut group: Vec<Write> = Vec::with_capacity(MAX_GROUP);
    let mut replies: Vec<Reply> = Vec::with_capacity(MAX_GROUP);
    let mut fsyncing = true; // as `open_writer` left the connection
    while let Some(first) = inbox.blocking_recv() {
        let durable = take_group(first, &mut inbox, &mut group);
        // `synchronous` is set between transactions: FULL fsyncs the WAL at this commit (and so
        // every earlier commit with it), NORMAL leaves that to a later one or a checkpoint.
        let fsync = durable && sync == Sync::Full;
        if fsync != fsyncing {
            let pragma = if fsync { Sync::Full } else { Sync::Normal }.pragma();
            // Not from the statement cache: this pragma takes effect when it is prepared.
            if let Err(e) = c.execute_batch(pragma) {
                tracing::error!(error = %e, "could not set PRAGMA synchronous");
            } else {
                fsyncing = fsync;
            }
        }
        if let Err(e) = run_cached(&c, "BEGIN IMMEDIATE") {
            let e = Arc::new(e);
            for w in group.drain(..) {
                let (_, reply) = w(None);
                reply(Some(&e));
            }
            continue;
        }
        for w in group.drain(..) {
            // Cached statements: parsing these two anew for every write was a measurable
            // share of the writer's time.
            if c.prepare_cached("SAVEPOINT w")
                .and_then(|mut s| s.execute([]))
                .is_err()
            {
                replies.push(w(None).1);
                continue;
            }
            // A panicking write loses its caller's answer but must not take the writer (and
            // with it every later write of the process) down.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w(Some(&c))));
            let ok = matches!(ran, Ok((true, _)));
            let end = if ok {
                c.prepare_cached("RELEASE w")
                    .and_then(|mut s| s.execute([]).map(|_| ()))
            } else {
                c.execute_batch("ROLLBACK TO w; RELEASE w")
            };
            if let Err(e) = end {
                tracing::error!(error = %e, "sqlite savepoint could not be closed");
            }
            if let Ok((_, reply)) = ran {
                replies.push(reply);
            }
        }
        let commit = run_cached(&c, "COMMIT").map_err(Arc::new);
        if commit.is_err() {
            let _ = c.execute_batch("ROLLBACK");
        }
        let error = commit.as_ref().err();
        for reply in replies.drain(..) {
            reply(error);
        }
    }
}
