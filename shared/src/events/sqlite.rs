//! The embedded event bus: events appended to a SQLite table, and one tailer task per process
//! that reads new rows and fans them out in memory, so an API process sees what worker
//! processes publish. Events get increasing ids, so `Last-Event-ID` replays what was missed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_sqlite::rusqlite::{params, Connection};
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::{broadcast, mpsc, Notify};
use tokio_stream::wrappers::BroadcastStream;

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

pub struct SqliteEventBus {
    db: Db,
    fanout: broadcast::Sender<Arc<Published>>,
    wake: Arc<Notify>,
    /// Long polls waiting on one request each, by request id: an event wakes only the waiters
    /// of its request instead of every stream of the process.
    watchers: Mutex<HashMap<RequestId, Vec<mpsc::UnboundedSender<Arc<Published>>>>>,
}

impl SqliteEventBus {
    /// Starts the tailer task; it ends when the last handle to the bus is dropped.
    pub async fn start(db: Db) -> Result<Arc<Self>> {
        let (fanout, _) = broadcast::channel(4096);
        let bus = Arc::new(SqliteEventBus {
            db,
            fanout,
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
                            let _ = bus.fanout.send(e);
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

    /// A reconnecting stream's backlog, which may be long: read on a blocking thread.
    async fn read_backlog(&self, user_id: String, after: u64) -> Result<Vec<Published>> {
        self.db
            .call(move |c| read_after_in(c, Some(&user_id), after, BACKLOG_BATCH))
            .await
            .map(|read| read.events)
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
        // from the overlap are dropped by id below.
        let live = BroadcastStream::new(self.fanout.subscribe());
        let (backlog, mut seen) = match after {
            Some(after) => {
                let backlog = self.read_backlog(user_id.to_owned(), after).await?;
                let seen = backlog.last().map_or(after, |e| e.id);
                (backlog, seen)
            }
            // "From now on": anything already written counts as the past.
            None => (Vec::new(), self.max_seq()?),
        };
        let user = user_id.to_owned();
        let live = live.filter_map(move |item| {
            let out = match item {
                Ok(e) if e.user_id == user && e.id > seen => {
                    seen = e.id;
                    Some(e)
                }
                Ok(_) => None,
                Err(lagged) => {
                    tracing::warn!(%lagged, "event subscriber fell behind; events were skipped");
                    None
                }
            };
            futures::future::ready(out)
        });
        let backlog = backlog.into_iter().map(Arc::new);
        Ok(futures::stream::iter(backlog).chain(live).boxed())
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

#[cfg(test)]
mod tests {
    use super::*;

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
