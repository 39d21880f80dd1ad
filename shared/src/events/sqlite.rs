//! The embedded event bus: events appended to a SQLite table, and one tailer task per process
//! that reads new rows and fans them out in memory, so an API process sees what worker
//! processes publish. Events get increasing ids, so `Last-Event-ID` replays what was missed.
//!
//! Fan-out is per user: each user with an open stream has a channel of their own, so an event
//! wakes only its user's streams, and a busy user cannot make anyone else's stream fall behind.
//! A stream that does fall behind its channel is ended rather than left to skip events: the
//! client reconnects with `Last-Event-ID` (as `EventSource` does by itself) and the backlog,
//! read from the table in chunks, brings it back exactly where it was.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_sqlite::rusqlite::{params, Connection};
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc, Notify};

use super::{Event, EventBus, Published, RETENTION_MS};
use crate::error::Report;
use crate::ids::RequestId;
use crate::sqlite::Db;
use crate::time::now_ms;
use crate::Result;

/// How often the tailer looks for events written by another process.
const TAIL_POLL: Duration = Duration::from_millis(100);
/// Most events the tailer reads at once; it reads again at once while there are more.
const TAIL_BATCH: usize = 256;
/// Most events of a reconnecting stream's backlog read at once.
const BACKLOG_BATCH: usize = 1000;
/// Events a user's channel holds for a stream that has not taken them yet; one that falls
/// further behind is ended, to resume from the table.
const USER_CHANNEL: usize = 1024;

pub struct SqliteEventBus {
    db: Db,
    /// One live channel per user with an open stream; dropped when their last stream closes.
    users: Mutex<HashMap<String, broadcast::Sender<Arc<Published>>>>,
    wake: Arc<Notify>,
    /// Long polls waiting on one request each, by request id: an event wakes only the waiters
    /// of its request instead of every stream of the process.
    watchers: Mutex<HashMap<RequestId, Vec<mpsc::UnboundedSender<Arc<Published>>>>>,
}

impl SqliteEventBus {
    /// Starts the tailer task; it ends when the last handle to the bus is dropped.
    pub async fn start(db: Db) -> Result<Arc<Self>> {
        let bus = Arc::new(SqliteEventBus {
            db,
            users: Mutex::new(HashMap::new()),
            wake: Arc::new(Notify::new()),
            watchers: Mutex::new(HashMap::new()),
        });
        let mut last = bus.max_seq()?;
        let weak = Arc::downgrade(&bus);
        tokio::spawn(async move {
            let mut last_prune = 0i64;
            loop {
                let Some(bus) = weak.upgrade() else { return };
                let wake = bus.wake.clone();
                let notified = wake.notified();
                // Read even when nobody listens, so `last` keeps up and a new subscriber is
                // never sent old news.
                let mut more = false;
                match bus.read_new(last).await {
                    Ok(read) => {
                        more = read.rows == TAIL_BATCH;
                        last = last.max(read.last);
                        for e in read.events {
                            let e = Arc::new(e);
                            bus.tell_watchers(&e);
                            bus.tell_user(e);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %Report(&e), "event tailer could not read events")
                    }
                }
                if now_ms() - last_prune > 60_000 {
                    last_prune = now_ms();
                    let _ = bus.prune().await;
                    bus.forget_gone_watchers();
                    bus.forget_gone_users();
                }
                drop(bus);
                if more {
                    tokio::task::yield_now().await;
                } else {
                    let _ = tokio::time::timeout(TAIL_POLL, notified).await;
                }
            }
        });
        Ok(bus)
    }

    /// Hands a request's update to the waiters of that request. A request that finished gets no more
    /// news: its waiters are dropped with it.
    fn tell_watchers(&self, e: &Arc<Published>) {
        let Event::RequestUpdated(record) = &e.event else {
            return;
        };
        let id = record.request_id.as_str();
        let Ok(mut watchers) = self.watchers.lock() else {
            return;
        };
        if record.status.is_final() {
            for w in watchers.remove(id).unwrap_or_default() {
                let _ = w.send(e.clone());
            }
        } else if let Some(ws) = watchers.get_mut(id) {
            ws.retain(|w| w.send(e.clone()).is_ok());
            if ws.is_empty() {
                watchers.remove(id);
            }
        }
    }

    /// Hands an event to its user's streams, if they have any open.
    fn tell_user(&self, e: Arc<Published>) {
        let Ok(mut users) = self.users.lock() else {
            return;
        };
        if let Some(channel) = users.get(&e.user_id) {
            // An error means no stream is left: the user's channel goes with them.
            if channel.send(e.clone()).is_err() {
                users.remove(&e.user_id);
            }
        }
    }

    /// Drops the channels of users whose streams all closed with no event since.
    fn forget_gone_users(&self) {
        if let Ok(mut users) = self.users.lock() {
            users.retain(|_, channel| channel.receiver_count() > 0);
        }
    }

    /// A new receiver on `user_id`'s channel, made on their first stream.
    fn user_channel(&self, user_id: &str) -> Option<broadcast::Receiver<Arc<Published>>> {
        let mut users = self.users.lock().ok()?;
        let channel = users
            .entry(user_id.to_owned())
            .or_insert_with(|| broadcast::channel(USER_CHANNEL).0);
        Some(channel.subscribe())
    }

    /// Drops the waiters of long polls that ended before their request changed again.
    fn forget_gone_watchers(&self) {
        if let Ok(mut watchers) = self.watchers.lock() {
            watchers.retain(|_, ws| {
                ws.retain(|w| !w.is_closed());
                !ws.is_empty()
            });
        }
    }

    fn max_seq(&self) -> Result<u64> {
        self.db.read_here(|c| {
            Ok(
                c.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| {
                    r.get::<_, i64>(0)
                })? as u64,
            )
        })
    }

    /// What the tailer reads each time it wakes: the latest events, on a blocking thread. (Read
    /// on the tailer's own thread instead, it woke and read more often under load, a few events
    /// at a time, and chat throughput fell by a tenth.)
    async fn read_new(&self, after: u64) -> Result<Read> {
        self.db
            .call(move |c| read_after_in(c, None, after, TAIL_BATCH))
            .await
    }

    async fn prune(&self) -> Result<()> {
        self.db
            .write_relaxed(|tx| {
                tx.execute(
                    "DELETE FROM events WHERE created_ms < ?1",
                    [now_ms() - RETENTION_MS],
                )?;
                Ok(())
            })
            .await
    }
}

/// What one read of the events table found.
struct Read {
    /// In order; rows this version cannot read are left out (see `Event::from_parts`).
    events: Vec<Published>,
    /// Rows read, readable or not, and the id of the last: where the next read starts.
    rows: usize,
    last: u64,
}

/// Events after `after` in order (of one user, or of all), at most `limit` rows.
fn read_after_in(c: &Connection, user_id: Option<&str>, after: u64, limit: usize) -> Result<Read> {
    let mut stmt = c.prepare_cached(
        "SELECT seq, user_id, name, data FROM events
         WHERE seq > ?1 AND (?2 IS NULL OR user_id = ?2) ORDER BY seq LIMIT ?3",
    )?;
    let rows = stmt
        .query_map(params![after as i64, user_id, limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Read {
        rows: rows.len(),
        last: rows.last().map_or(after, |r| r.0),
        events: rows
            .into_iter()
            .filter_map(|(id, user, name, data)| Published::from_stored(id, user, &name, data))
            .collect(),
    })
}

/// Appends an event inside a caller's write (see [`crate::sqlite::Db::write`]); the publisher
/// calls [`SqliteEventBus::wake`] once it is committed.
pub(crate) fn insert_in(c: &Connection, user_id: &str, name: &str, data: &str) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO events (user_id, name, data, created_ms) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![user_id, name, data, now_ms()])?;
    Ok(())
}

/// [`insert_in`] for an event.
pub(crate) fn insert_event_in(c: &Connection, user_id: &str, event: &Event) -> Result<()> {
    let (name, data) = event.to_parts()?;
    insert_in(c, user_id, name, &data)
}

impl SqliteEventBus {
    /// Tells this process's tailer that events were committed, so streams get them at once
    /// rather than at the next poll.
    pub fn wake(&self) {
        self.wake.notify_waiters();
    }
}

#[async_trait]
impl EventBus for SqliteEventBus {
    async fn publish(&self, user_id: &str, event: &Event) -> Result<()> {
        let (name, data) = event.to_parts()?;
        let user_id = user_id.to_owned();
        self.db
            .write_relaxed(move |c| insert_in(c, &user_id, name, &data))
            .await?;
        self.wake();
        Ok(())
    }

    async fn subscribe(
        &self,
        user_id: &str,
        after: Option<u64>,
    ) -> Result<BoxStream<'static, Arc<Published>>> {
        // Subscribe before reading the backlog so nothing falls between the two; duplicates
        // from the overlap are dropped by id.
        let live = self
            .user_channel(user_id)
            .ok_or_else(|| crate::Error::internal_msg("event channels poisoned"))?;
        let stream = match after {
            Some(after) => Stream::replaying(self.db.clone(), user_id, after, live),
            // "From now on": anything already written counts as the past.
            None => Stream::live(self.max_seq()?, live),
        };
        Ok(futures::stream::unfold(stream, Stream::next).boxed())
    }

    async fn watch_request(
        &self,
        _user_id: &str,
        request_id: &RequestId,
    ) -> Result<BoxStream<'static, Arc<Published>>> {
        // Routed by request id alone: the API reads the request as the caller's right after
        // watching and answers 404 (dropping this stream unread) when it is not theirs.
        let (tx, rx) = mpsc::unbounded_channel();
        if let Ok(mut watchers) = self.watchers.lock() {
            watchers.entry(request_id.to_owned()).or_default().push(tx);
        }
        Ok(tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed())
    }
}

/// One subscriber's stream: its backlog from the table, read a chunk at a time, then its
/// user's live channel. `cursor` is the id of the last event it has covered, so the live part
/// skips what the backlog already gave.
struct Stream {
    live: broadcast::Receiver<Arc<Published>>,
    cursor: u64,
    /// `None` once the backlog is read to its end.
    replay: Option<(Db, String)>,
    chunk: std::collections::VecDeque<Published>,
}

impl Stream {
    fn live(cursor: u64, live: broadcast::Receiver<Arc<Published>>) -> Stream {
        Stream {
            live,
            cursor,
            replay: None,
            chunk: Default::default(),
        }
    }

    fn replaying(
        db: Db,
        user_id: &str,
        after: u64,
        live: broadcast::Receiver<Arc<Published>>,
    ) -> Stream {
        Stream {
            replay: Some((db, user_id.to_owned())),
            ..Stream::live(after, live)
        }
    }

    /// The next event, or the end: of the channel, of a failed read, or of a stream that fell
    /// behind its channel (it resumes from `Last-Event-ID`, see the module).
    async fn next(mut self) -> Option<(Arc<Published>, Stream)> {
        loop {
            if let Some(e) = self.chunk.pop_front() {
                return Some((Arc::new(e), self));
            }
            if let Some((db, user)) = self.replay.take() {
                let (after, who) = (self.cursor, user.clone());
                let read = db
                    .call(move |c| read_after_in(c, Some(&who), after, BACKLOG_BATCH))
                    .await;
                let read = match read {
                    Ok(read) => read,
                    Err(e) => {
                        tracing::warn!(error = %Report(&e), "could not read a stream's backlog; ending it");
                        return None;
                    }
                };
                self.cursor = read.last;
                self.chunk = read.events.into();
                if read.rows == BACKLOG_BATCH {
                    self.replay = Some((db, user));
                }
                continue;
            }
            match self.live.recv().await {
                Ok(e) if e.id > self.cursor => {
                    self.cursor = e.id;
                    return Some((e, self));
                }
                Ok(_) => {}
                Err(RecvError::Lagged(skipped)) => {
                    tracing::info!(skipped, "event stream fell behind; ending it so the client resumes from Last-Event-ID");
                    return None;
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that falls behind its user's channel ends instead of skipping; resuming from
    /// the last id it saw gives every event exactly once, in order, through a backlog longer
    /// than one read; another user's stream sees none of it.
    #[tokio::test]
    async fn a_stream_that_falls_behind_ends_and_resumes_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).await.unwrap();
        let bus = SqliteEventBus::start(db).await.unwrap();
        let mut slow = bus.subscribe("alice", None).await.unwrap();
        let mut other = bus.subscribe("bob", None).await.unwrap();
        let total = USER_CHANNEL + BACKLOG_BATCH / 2;
        for i in 0..total {
            bus.publish("alice", &Event::delta(&"req_a".into(), &i.to_string()))
                .await
                .unwrap();
        }
        // The tailer hands all of them to alice's channel, which holds fewer.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (mut seen, mut got) = (0, 0);
        loop {
            match tokio::time::timeout(Duration::from_secs(5), slow.next()).await {
                Ok(Some(e)) => (seen, got) = (e.id, got + 1),
                Ok(None) => break,
                Err(_) => panic!("a stream that fell behind must end, not stall"),
            }
        }
        assert!(got < total, "it ended before the end ({got} of {total})");

        let mut resumed = bus.subscribe("alice", Some(seen)).await.unwrap();
        let mut texts = Vec::new();
        let mut last = seen;
        while texts.len() < total - got {
            let e = tokio::time::timeout(Duration::from_secs(5), resumed.next())
                .await
                .unwrap()
                .unwrap();
            assert!(e.id > last, "in order, once");
            last = e.id;
            let Event::MessageDelta(d) = &e.event else {
                panic!("{:?}", e.event)
            };
            texts.push(d.text.clone());
        }
        let expected: Vec<String> = (got..total).map(|i| i.to_string()).collect();
        assert_eq!(texts, expected);
        // And it carries on live.
        bus.publish("alice", &Event::delta(&"req_a".into(), "live"))
            .await
            .unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), resumed.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(e.event, Event::delta(&"req_a".into(), "live"));
        assert!(
            tokio::time::timeout(Duration::from_millis(300), other.next())
                .await
                .is_err(),
            "bob's stream woke for none of alice's events"
        );
    }

    #[tokio::test]
    async fn subscribers_get_their_own_events_and_replay_after_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).await.unwrap();
        let bus = SqliteEventBus::start(db.clone()).await.unwrap();
        let mut mine = bus.subscribe("alice", None).await.unwrap();
        bus.publish("bob", &Event::delta(&"req_b".into(), "1"))
            .await
            .unwrap();
        bus.publish("alice", &Event::delta(&"req_a".into(), "2"))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), mine.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.event, Event::delta(&"req_a".into(), "2"));

        // A second process (another bus on the same file) sees it too, and replays by id.
        let other = SqliteEventBus::start(db).await.unwrap();
        let mut replay = other.subscribe("alice", Some(0)).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), replay.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.id, got.id);
        bus.publish("alice", &Event::delta(&"req_a".into(), "3"))
            .await
            .unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), replay.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(next.event, Event::delta(&"req_a".into(), "3"));
        assert_eq!(
            next.data,
            serde_json::json!({ "request_id": "req_a", "text": "3" }).to_string()
        );
    }
}
