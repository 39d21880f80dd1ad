//! The embedded event bus: events appended to a SQLite table, and one tailer task per process
//! that reads new rows and fans them out in memory, so an API process sees what worker
//! processes publish. Events get increasing ids, so `Last-Event-ID` replays what was missed.
//! Fan-out to the streams and long polls of the process is [`super::fanout`]'s.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_sqlite::rusqlite::{params, Connection};
use futures::stream::BoxStream;
use tokio::sync::Notify;

use super::fanout::{Backlog, Fanout, Read};
use super::{Event, EventBus, Published, RETENTION_MS};
use crate::domain::RequestRecord;
use crate::error::Report;
use crate::ids::RequestId;
use crate::sqlite::Db;
use crate::time::now_ms;
use crate::Result;

/// How often the tailer looks for events written by another process.
const TAIL_POLL: Duration = Duration::from_millis(100);
/// Most events the tailer reads at once; it reads again at once while there are more.
const TAIL_BATCH: usize = 256;

pub struct SqliteEventBus {
    db: Db,
    stored: Arc<Stored>,
    fanout: Fanout,
    wake: Arc<Notify>,
}

/// The events table, as streams read their backlog from it.
struct Stored {
    db: Db,
}

#[async_trait]
impl Backlog for Stored {
    async fn read(&self, user_id: &str, after: u64, limit: usize) -> Result<Read> {
        let user = user_id.to_owned();
        self.db
            .call(move |c| read_after_in(c, Some(&user), after, limit))
            .await
    }

    async fn head(&self, _user_id: &str) -> Result<u64> {
        max_seq(&self.db)
    }

    fn dense(&self) -> bool {
        false
    }
}

fn max_seq(db: &Db) -> Result<u64> {
    db.read_here(|c| {
        Ok(
            c.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| {
                r.get::<_, i64>(0)
            })? as u64,
        )
    })
}

impl SqliteEventBus {
    /// Starts the tailer task; it ends when the last handle to the bus is dropped.
    pub async fn start(db: Db) -> Result<Arc<Self>> {
        let bus = Arc::new(SqliteEventBus {
            stored: Arc::new(Stored { db: db.clone() }),
            db,
            fanout: Fanout::default(),
            wake: Arc::new(Notify::new()),
        });
        let mut last = max_seq(&bus.db)?;
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
                        more = read.more;
                        last = last.max(read.last);
                        for e in read.events {
                            bus.fanout.deliver(Arc::new(e));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %Report(&e), "event tailer could not read events")
                    }
                }
                if now_ms() - last_prune > 60_000 {
                    last_prune = now_ms();
                    let _ = bus.prune().await;
                    bus.fanout.housekeep();
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
        more: rows.len() == limit,
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
        self.fanout
            .subscribe(self.stored.clone(), user_id, after)
            .await
    }

    async fn watch_request(
        &self,
        _user_id: &str,
        request_id: &RequestId,
    ) -> Result<BoxStream<'static, Arc<Published>>> {
        Ok(self.fanout.watch(request_id))
    }

    fn note_accepted(&self, user_id: &str, record: &RequestRecord) {
        self.fanout.note_accepted(user_id, record);
    }

    fn known_request(&self, user_id: &str, request_id: &RequestId) -> Option<RequestRecord> {
        self.fanout.known(user_id, request_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::fanout::{BACKLOG_BATCH, USER_CHANNEL};
    use futures::StreamExt;

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
