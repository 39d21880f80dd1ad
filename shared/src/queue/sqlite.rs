//! The embedded queue: one SQLite table shared by all queues, rows keyed by message id.
//!
//! A receive claims rows inside one `BEGIN IMMEDIATE` transaction, so two consumers — threads
//! or processes — never get the same delivery. Long polling is a loop: in-process senders wake
//! waiting receivers through a `Notify`; senders in another process are seen by a short poll.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_sqlite::rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::Notify;

use super::{Attributes, DeadLetter, Delivery, Outgoing, Queue, QueueStats};
use crate::sqlite::Db;
use crate::time::now_ms;
use crate::{Error, Result};

/// How often an idle long poll looks for messages sent by another process.
const CROSS_PROCESS_POLL: Duration = Duration::from_millis(100);
/// Longest wait of one receive. An empty receive costs nothing here (unlike on SQS), and a
/// short wait keeps shutdown quick, since the consume loop lets a receive in flight finish.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// Attributes are stored as a JSON object; a row that cannot be read back has none (they are
/// tracing context only, never needed to do the job).
fn decode_attributes(json: &str) -> Attributes {
    serde_json::from_str(json).unwrap_or_default()
}

/// Which messages (`m`) of queue `?1` a receive may take at `?2` (ms): visible, and, in a group,
/// the group's oldest, with none of the group in flight or waiting for a retry (see the port).
const READY: &str = "m.queue = ?1 AND m.visible_ms <= ?2
    AND (m.group_id IS NULL OR NOT EXISTS (
        SELECT 1 FROM queue_messages o
        WHERE o.queue = m.queue AND o.group_id = m.group_id AND o.id <> m.id
          AND (o.visible_ms > ?2 OR o.sent_ms < m.sent_ms
               OR (o.sent_ms = m.sent_ms AND o.id < m.id))))";

static READY_EXISTS: LazyLock<String> =
    LazyLock::new(|| format!("SELECT EXISTS (SELECT 1 FROM queue_messages m WHERE {READY})"));
/// The first `?3` ready messages, oldest first.
static READY_FIRST: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT id, body, receive_count, attributes, group_id FROM queue_messages m
         WHERE {READY} ORDER BY visible_ms, sent_ms LIMIT ?3"
    )
});

/// The writes below run inside a caller's write (see [`crate::sqlite::Db::write`]), so the
/// queue's own methods and the atomic accept/settle of [`crate::atomic::sqlite`] share them.
pub(crate) fn enqueue_in(c: &Connection, queue: &str, messages: &[Outgoing]) -> Result<()> {
    let now = now_ms();
    let mut insert = c.prepare_cached(
        "INSERT INTO queue_messages (id, queue, body, attributes, visible_ms, sent_ms, group_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)",
    )?;
    for m in messages {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let attributes = serde_json::to_string(&m.attributes)?;
        insert.execute(params![id, queue, m.body, attributes, now, m.group])?;
    }
    Ok(())
}

/// Deletes a delivered message; a stale receipt deletes nothing.
pub(crate) fn delete_in(c: &Connection, receipt: &str) -> Result<()> {
    c.prepare_cached("DELETE FROM queue_messages WHERE receipt = ?1")?
        .execute([receipt])?;
    Ok(())
}

/// Hides a delivered message for `timeout` from now; the number of messages changed (0 for a
/// stale receipt).
pub(crate) fn change_visibility_in(
    c: &Connection,
    receipt: &str,
    timeout: Duration,
) -> Result<usize> {
    let visible = now_ms() + timeout.as_millis() as i64;
    Ok(
        c.prepare_cached("UPDATE queue_messages SET visible_ms = ?2 WHERE receipt = ?1")?
            .execute(params![receipt, visible])?,
    )
}

/// Moves a delivered message to the dead letters; nothing if a newer delivery handled it.
pub(crate) fn dead_letter_in(c: &Connection, delivery: &Delivery, reason: &str) -> Result<()> {
    let row = c
        .query_row(
            "SELECT queue, body, receive_count, attributes FROM queue_messages
             WHERE id = ?1 AND receipt = ?2",
            params![delivery.message_id, delivery.receipt],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, String>(3)?,
                ))
            },
        )
        .optional()?;
    let Some((queue, body, count, attributes)) = row else {
        return Ok(());
    };
    c.execute(
        "INSERT OR REPLACE INTO dead_letters
             (id, queue, body, attributes, receive_count, reason, dead_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            delivery.message_id,
            queue,
            body,
            attributes,
            count,
            reason,
            now_ms()
        ],
    )?;
    c.execute(
        "DELETE FROM queue_messages WHERE id = ?1",
        [&delivery.message_id],
    )?;
    Ok(())
}

pub struct SqliteQueue {
    db: Db,
    name: String,
    wake: Arc<Notify>,
    /// The last receive got all it asked for: more is likely waiting, so the next one skips
    /// the look before the write.
    backlog: AtomicBool,
}

impl SqliteQueue {
    pub fn new(db: Db, name: impl Into<String>) -> Self {
        SqliteQueue {
            db,
            name: name.into(),
            wake: Arc::new(Notify::new()),
            backlog: AtomicBool::new(false),
        }
    }

    /// Wakes this process's receivers waiting in a long poll: a message was queued or handed
    /// back by a write made outside [`Queue::send`].
    pub fn wake(&self) {
        self.wake.notify_waiters();
    }

    async fn try_receive(&self, max: usize, visibility: Duration) -> Result<Vec<Delivery>> {
        // Look before taking the write lock: an idle poll then costs a read, and does not
        // queue up behind (or hold up) the API's writes.
        let ready = self.backlog.load(Ordering::Relaxed)
            || self.db.read_here(|c| {
                Ok(c.prepare_cached(&READY_EXISTS)?
                    .query_row(params![self.name, now_ms()], |r| r.get::<_, bool>(0))?)
            })?;
        if !ready {
            return Ok(Vec::new());
        }
        let queue = self.name.clone();
        let hide_ms = visibility.as_millis() as i64;
        self.db
            .write_relaxed(move |tx| {
                let now = now_ms();
                let mut select = tx.prepare_cached(&READY_FIRST)?;
                let rows = select
                    .query_map(params![queue, now, max as i64], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, u32>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, Option<String>>(4)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                let mut claim = tx.prepare_cached(
                    "UPDATE queue_messages
                     SET receive_count = receive_count + 1, visible_ms = ?2, receipt = ?3
                     WHERE id = ?1",
                )?;
                let mut out = Vec::with_capacity(rows.len());
                for (id, body, count, attributes, group) in rows {
                    let receipt = uuid::Uuid::new_v4().simple().to_string();
                    claim.execute(params![id, now + hide_ms, receipt])?;
                    out.push(Delivery {
                        message_id: id,
                        receipt,
                        body,
                        attributes: decode_attributes(&attributes),
                        receive_count: count + 1,
                        group,
                    });
                }
                Ok(out)
            })
            .await
            .inspect(|got| self.backlog.store(got.len() >= max, Ordering::Relaxed))
    }
}

#[async_trait]
impl Queue for SqliteQueue {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&self, messages: &[Outgoing]) -> Result<()> {
        let (queue, messages) = (self.name.clone(), messages.to_vec());
        self.db
            .write(move |c| enqueue_in(c, &queue, &messages))
            .await?;
        self.wake();
        Ok(())
    }

    async fn receive(
        &self,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Delivery>> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        loop {
            // Register for wake-ups before looking, so a send between the look and the wait
            // is not missed.
            let notified = self.wake.notified();
            let got = self.try_receive(max.max(1), visibility).await?;
            let now = tokio::time::Instant::now();
            if !got.is_empty() || now >= deadline {
                return Ok(got);
            }
            let nap = CROSS_PROCESS_POLL.min(deadline - now);
            let _ = tokio::time::timeout(nap, notified).await;
        }
    }

    async fn delete(&self, receipt: &str) -> Result<()> {
        let receipt = receipt.to_owned();
        self.db
            .write_relaxed(move |c| delete_in(c, &receipt))
            .await?;
        // The next message of its group may be taken now.
        self.wake();
        Ok(())
    }

    async fn change_visibility(&self, receipt: &str, timeout: Duration) -> Result<()> {
        let receipt = receipt.to_owned();
        let changed = self
            .db
            .write_relaxed(move |c| change_visibility_in(c, &receipt, timeout))
            .await?;
        if timeout.is_zero() {
            self.wake();
        }
        if changed == 0 {
            return Err(Error::queue_msg("receipt is no longer valid"));
        }
        Ok(())
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<()> {
        let (delivery, reason) = (delivery.clone(), reason.to_owned());
        self.db
            .write_relaxed(move |c| dead_letter_in(c, &delivery, &reason))
            .await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let queue = self.name.clone();
        self.db
            .call(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT id, body, receive_count, reason, attributes FROM dead_letters
                     WHERE queue = ?1 ORDER BY dead_ms LIMIT ?2",
                )?;
                let rows = stmt
                    .query_map(params![queue, limit as i64], |r| {
                        Ok(DeadLetter {
                            message_id: r.get(0)?,
                            body: r.get(1)?,
                            receive_count: r.get(2)?,
                            reason: r.get(3)?,
                            attributes: decode_attributes(&r.get::<_, String>(4)?),
                        })
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await
    }

    async fn stats(&self) -> Result<QueueStats> {
        let queue = self.name.clone();
        self.db
            .call(move |c| {
                let now = now_ms();
                let (visible, in_flight) = c.query_row(
                    "SELECT COALESCE(SUM(visible_ms <= ?2), 0), COALESCE(SUM(visible_ms > ?2), 0)
                     FROM queue_messages WHERE queue = ?1",
                    params![queue, now],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
                )?;
                let dead = c.query_row(
                    "SELECT COUNT(*) FROM dead_letters WHERE queue = ?1",
                    [&queue],
                    |r| r.get::<_, i64>(0),
                )?;
                Ok(QueueStats {
                    visible: visible as u64,
                    in_flight: in_flight as u64,
                    dead: dead as u64,
                })
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn queue() -> (tempfile::TempDir, SqliteQueue) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).await.expect("db");
        (dir, SqliteQueue::new(db, "test"))
    }

    const HIDE: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn a_received_message_is_hidden_until_deleted_or_expired() {
        let (_dir, q) = queue().await;
        q.send(&["a".into()]).await.unwrap();
        let first = q
            .receive(10, Duration::from_millis(300), Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].receive_count, 1);
        assert!(q
            .receive(10, HIDE, Duration::ZERO)
            .await
            .unwrap()
            .is_empty());
        // After the visibility timeout it comes back, counted again, with a new receipt.
        let again = q.receive(10, HIDE, Duration::from_secs(2)).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].receive_count, 2);
        assert_ne!(again[0].receipt, first[0].receipt);
        // The stale receipt deletes nothing; the fresh one does.
        q.delete(&first[0].receipt).await.unwrap();
        assert_eq!(q.stats().await.unwrap().in_flight, 1);
        q.delete(&again[0].receipt).await.unwrap();
        assert_eq!(q.stats().await.unwrap(), QueueStats::default());
    }

    #[tokio::test]
    async fn long_poll_wakes_on_send() {
        let (_dir, q) = queue().await;
        let q = Arc::new(q);
        let sender = q.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            sender.send(&["late".into()]).await.unwrap();
        });
        let got = q.receive(1, HIDE, Duration::from_secs(5)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].body, "late");
    }

    #[tokio::test]
    async fn dead_letter_moves_the_message_out() {
        let (_dir, q) = queue().await;
        q.send(&["poison".into()]).await.unwrap();
        let d = q.receive(1, HIDE, Duration::ZERO).await.unwrap().remove(0);
        q.dead_letter(&d, "always fails").await.unwrap();
        let stats = q.stats().await.unwrap();
        assert_eq!((stats.visible, stats.in_flight, stats.dead), (0, 0, 1));
        let dead = q.dead_letters(10).await.unwrap();
        assert_eq!(dead[0].body, "poison");
        assert_eq!(dead[0].reason, "always fails");
    }

    #[tokio::test]
    async fn concurrent_receivers_never_share_a_delivery() {
        let (_dir, q) = queue().await;
        let bodies: Vec<Outgoing> = (0..50).map(|i| Outgoing::new(i.to_string())).collect();
        q.send(&bodies).await.unwrap();
        let q = Arc::new(q);
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let q = q.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let batch = q.receive(3, HIDE, Duration::ZERO).await.unwrap();
                    if batch.is_empty() {
                        return got;
                    }
                    got.extend(batch.into_iter().map(|d| d.body));
                }
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_by_key(|b| b.parse::<u32>().unwrap());
        assert_eq!(all, bodies.into_iter().map(|m| m.body).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn change_visibility_zero_releases_now() {
        let (_dir, q) = queue().await;
        q.send(&["x".into()]).await.unwrap();
        let d = q.receive(1, HIDE, Duration::ZERO).await.unwrap().remove(0);
        q.change_visibility(&d.receipt, Duration::ZERO)
            .await
            .unwrap();
        let again = q.receive(1, HIDE, Duration::ZERO).await.unwrap();
        assert_eq!(again.len(), 1);
        assert!(
            q.change_visibility(&d.receipt, HIDE).await.is_err(),
            "stale receipt"
        );
    }
}
