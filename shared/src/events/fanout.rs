//! In-process fan-out, shared by both event buses: how an event that reached this process (the
//! SQLite tailer read it, or the AWS inbox received it) gets to the streams and long polls held
//! here, and how a stream is replayed what it missed from the bus's stored events.
//!
//! Fan-out is per user: each user with an open stream has a channel of their own, so an event
//! wakes only its user's streams, and a busy user cannot make anyone else's stream fall behind.
//! A stream that does fall behind its channel is ended rather than left to skip events: the
//! client reconnects with `Last-Event-ID` (as `EventSource` does by itself) and the backlog,
//! read from storage in chunks, brings it back exactly where it was. Long polls wait on one
//! request each, keyed by request id, so an event wakes only the waiters of its request.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};

use super::{Event, Published};
use crate::domain::RequestRecord;
use crate::error::Report;
use crate::ids::RequestId;
use crate::memo::Memo;
use crate::Result;

/// Events a user's channel holds for a stream that has not taken them yet; one that falls
/// further behind is ended, to resume from storage.
pub const USER_CHANNEL: usize = 1024;
/// Most events of a stream's backlog read at once.
pub const BACKLOG_BATCH: usize = 1000;

/// What one read of stored events found.
pub struct Read {
    /// In order; rows this version cannot read are left out (see `Event::from_parts`).
    pub events: Vec<Published>,
    /// The id of the last row read, readable or not: where the next read starts.
    pub last: u64,
    /// Whether more rows may follow.
    pub more: bool,
}

/// A bus's stored events, as the streams of this process read them.
#[async_trait]
pub trait Backlog: Send + Sync + 'static {
    /// The user's events after `after`, in id order, at most `limit` of them.
    async fn read(&self, user_id: &str, after: u64, limit: usize) -> Result<Read>;

    /// The id of the user's newest stored event: what "from now on" starts after.
    async fn head(&self, user_id: &str) -> Result<u64>;

    /// Whether a user's ids have no holes (1, 2, 3, ...): then a live event past the next id
    /// means one arrived out of order or not at all, and the stream reads the gap from storage
    /// before going on. (The SQLite bus numbers all users' events together, in commit order,
    /// so it has holes but never delivers out of order.)
    fn dense(&self) -> bool;
}

/// The streams and long polls of this process.
pub struct Fanout {
    /// One live channel per user with an open stream; dropped when their last stream closes.
    users: Mutex<HashMap<String, broadcast::Sender<Arc<Published>>>>,
    /// Long polls waiting on one request each, by request id.
    watchers: Mutex<HashMap<RequestId, Vec<mpsc::UnboundedSender<Arc<Published>>>>>,
    /// The latest this process knows of recent requests: their last update that passed
    /// through, or the accept this process made. A long poll starts from it instead of a read
    /// (see [`Fanout::known`]).
    recent: Memo<RequestId, Known>,
}

/// Most recent requests a process keeps the latest state of (an update it received, with the
/// request's result, or a queued record): some 10 MiB at results of a couple of KiB, more if
/// results are larger; forgotten whole when full.
const RECENT_KEPT: usize = 4096;

#[derive(Clone)]
enum Known {
    /// Accepted here (queued), with its user.
    Accepted(String, Arc<RequestRecord>),
    /// Its last update seen here.
    Updated(Arc<Published>),
}

impl Default for Fanout {
    fn default() -> Self {
        Fanout {
            users: Mutex::default(),
            watchers: Mutex::default(),
            recent: Memo::new(RECENT_KEPT),
        }
    }
}

impl Fanout {
    /// Hands an event to the streams of its user and the waiters of its request held here.
    pub fn deliver(&self, e: Arc<Published>) {
        if let Event::RequestUpdated(record) = &e.event {
            // An older update that arrives late never hides a final one.
            let known_final = matches!(
                self.recent.get(&record.request_id),
                Some(Known::Updated(old)) if matches!(&old.event, Event::RequestUpdated(r) if r.status.is_final())
            );
            if !known_final {
                self.recent
                    .insert(record.request_id.clone(), Known::Updated(e.clone()));
            }
        }
        self.tell_watchers(&e);
        self.tell_user(e);
    }

    /// Notes a request this process accepted (queued): a long poll of it need not read it to
    /// know that it is the user's and not finished. Kept only if no update of it came first.
    pub fn note_accepted(&self, user_id: &str, record: &RequestRecord) {
        let known = Known::Accepted(user_id.to_owned(), Arc::new(record.clone()));
        self.recent.insert_new(record.request_id.clone(), known);
    }

    /// The latest state of the user's request that passed through this process, if it is
    /// recent: committed (an update, or the accept), but perhaps overtaken by an update this
    /// process missed. A final one can be answered as it is; a pending one is a place to
    /// start waiting, to be confirmed by an update or a read before it is answered.
    pub fn known(&self, user_id: &str, request_id: &RequestId) -> Option<RequestRecord> {
        match self.recent.get(request_id)? {
            Known::Accepted(user, record) if user == user_id => Some((*record).clone()),
            Known::Updated(e) if e.user_id == user_id => match &e.event {
                Event::RequestUpdated(record) => Some((**record).clone()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Drops what closed streams and ended long polls left behind; call it now and then.
    pub fn housekeep(&self) {
        if let Ok(mut users) = self.users.lock() {
            users.retain(|_, channel| channel.receiver_count() > 0);
        }
        if let Ok(mut watchers) = self.watchers.lock() {
            watchers.retain(|_, ws| {
                ws.retain(|w| !w.is_closed());
                !ws.is_empty()
            });
        }
    }

    /// The user's events from now on, preceded by those after `after` when given, read from
    /// `backlog`.
    pub async fn subscribe(
        &self,
        backlog: Arc<dyn Backlog>,
        user_id: &str,
        after: Option<u64>,
    ) -> Result<BoxStream<'static, Arc<Published>>> {
        // Subscribe before reading the backlog (or the head) so nothing falls between the two;
        // duplicates from the overlap are dropped by id.
        let live = self
            .user_channel(user_id)
            .ok_or_else(|| crate::Error::internal_msg("event channels poisoned"))?;
        let head = backlog.head(user_id).await?;
        let (cursor, replay) = match after {
            Some(after) if after < head => (after, true),
            // "From now on": anything already stored counts as the past. So does an id past
            // the newest (from a table since replaced): waiting for ids to catch up with it
            // would skip everything until then.
            _ => (head, false),
        };
        let stream = Stream {
            live,
            cursor,
            replay,
            user_id: user_id.to_owned(),
            dense: backlog.dense(),
            backlog,
            chunk: VecDeque::new(),
            held: None,
        };
        Ok(futures::stream::unfold(stream, Stream::next).boxed())
    }

    /// The updates of one request, from now on. Routed by request id alone: the API checks the
    /// request is the caller's right after watching (by `known`, or a read) and answers 404
    /// (dropping this stream unread) when it is not theirs.
    pub fn watch(&self, request_id: &RequestId) -> BoxStream<'static, Arc<Published>> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Ok(mut watchers) = self.watchers.lock() {
            watchers.entry(request_id.to_owned()).or_default().push(tx);
        }
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed()
    }

    /// Hands a request's update to the waiters of that request. A request that finished gets
    /// no more news: its waiters are dropped with it.
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

    /// A new receiver on `user_id`'s channel, made on their first stream.
    fn user_channel(&self, user_id: &str) -> Option<broadcast::Receiver<Arc<Published>>> {
        let mut users = self.users.lock().ok()?;
        let channel = users
            .entry(user_id.to_owned())
            .or_insert_with(|| broadcast::channel(USER_CHANNEL).0);
        Some(channel.subscribe())
    }
}

/// One subscriber's stream: its backlog from storage, read a chunk at a time, then its user's
/// live channel. `cursor` is the id of the last event it has covered, so the live part skips
/// what the backlog already gave.
struct Stream {
    live: broadcast::Receiver<Arc<Published>>,
    cursor: u64,
    /// Whether storage may hold events after `cursor` not yet sent: the backlog of a
    /// reconnect, or the gap before a live event that came early.
    replay: bool,
    user_id: String,
    dense: bool,
    backlog: Arc<dyn Backlog>,
    chunk: VecDeque<Published>,
    /// A live event that came past a gap, sent after the gap is read unless the read covered
    /// it.
    held: Option<Arc<Published>>,
}

impl Stream {
    /// The next event, or the end: of the channel, of a failed read, or of a stream that fell
    /// behind its channel (it resumes from `Last-Event-ID`, see the module).
    async fn next(mut self) -> Option<(Arc<Published>, Stream)> {
        loop {
            if let Some(e) = self.chunk.pop_front() {
                return Some((Arc::new(e), self));
            }
            if self.replay {
                self.read_backlog().await?;
                continue;
            }
            if let Some(e) = self.held.take() {
                if e.id > self.cursor {
                    self.cursor = e.id;
                    return Some((e, self));
                }
            }
            match self.live.recv().await {
                Ok(e) if e.id <= self.cursor => {}
                Ok(e) if self.dense && e.id > self.cursor + 1 => {
                    self.held = Some(e);
                    self.replay = true;
                }
                Ok(e) => {
                    self.cursor = e.id;
                    return Some((e, self));
                }
                Err(RecvError::Lagged(skipped)) => {
                    tracing::info!(skipped, "event stream fell behind; ending it so the client resumes from Last-Event-ID");
                    return None;
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }

    /// Reads the next chunk of the backlog; `None` ends the stream (the read failed).
    async fn read_backlog(&mut self) -> Option<()> {
        match self
            .backlog
            .read(&self.user_id, self.cursor, BACKLOG_BATCH)
            .await
        {
            Ok(read) => {
                // Not `max`: a `Last-Event-ID` past the newest id (from a table since
                // replaced) comes back as the newest, so the stream does not skip what follows.
                self.cursor = read.last;
                self.chunk = read.events.into();
                self.replay = read.more;
                Some(())
            }
            Err(e) => {
                tracing::warn!(error = %Report(&e), "could not read a stream's backlog; ending it");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Stored events with dense ids, as the AWS bus keeps them; counts its reads.
    #[derive(Default)]
    struct Stored {
        events: Mutex<Vec<Published>>,
        reads: AtomicUsize,
    }

    #[async_trait]
    impl Backlog for Stored {
        async fn read(&self, user_id: &str, after: u64, limit: usize) -> Result<Read> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let events: Vec<Published> = self
                .events
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e.user_id == user_id && e.id > after)
                .take(limit)
                .cloned()
                .collect();
            Ok(Read {
                last: events.last().map_or(after, |e| e.id),
                more: events.len() == limit,
                events,
            })
        }

        async fn head(&self, _user_id: &str) -> Result<u64> {
            Ok(self.events.lock().unwrap().last().map_or(0, |e| e.id))
        }

        fn dense(&self) -> bool {
            true
        }
    }

    fn event(id: u64) -> Published {
        let data = format!(r#"{{"request_id":"req_1","text":"{id}"}}"#);
        Published::from_stored(id, "alice".into(), "message.delta", data).unwrap()
    }

    #[test]
    fn a_long_poll_knows_its_users_recent_requests_and_a_final_update_is_not_overwritten() {
        use crate::domain::{RequestInput, RequestKind, RequestStatus};
        let fanout = Fanout::default();
        let record = RequestRecord::new(
            RequestKind::Persona,
            RequestInput::Persona { prompt: "p".into() },
            None,
        );
        let id = record.request_id.clone();
        assert!(fanout.known("alice", &id).is_none());
        fanout.note_accepted("alice", &record);
        assert_eq!(
            fanout.known("alice", &id).map(|r| r.status),
            Some(RequestStatus::Queued)
        );
        assert!(fanout.known("bob", &id).is_none(), "another user's");

        let mut done = record.clone();
        done.status = RequestStatus::Succeeded;
        let update = |r: &RequestRecord, at: u64| {
            let (name, data) = Event::updated(r).to_parts().unwrap();
            Arc::new(Published::from_stored(at, "alice".into(), name, data).unwrap())
        };
        fanout.deliver(update(&done, 7));
        assert_eq!(
            fanout.known("alice", &id).map(|r| r.status),
            Some(RequestStatus::Succeeded)
        );
        // An accept noted late (its update overtook it) leaves the update standing.
        fanout.note_accepted("alice", &record);
        assert_eq!(
            fanout.known("alice", &id).map(|r| r.status),
            Some(RequestStatus::Succeeded)
        );
    }

    async fn ids(stream: &mut BoxStream<'static, Arc<Published>>, n: usize) -> Vec<u64> {
        let mut ids = Vec::new();
        for _ in 0..n {
            let e = tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await
                .expect("an event in time")
                .expect("stream open");
            ids.push(e.id);
        }
        ids
    }

    /// Announcements arrive out of order and twice (SNS to SQS promises neither order nor
    /// once): a stream still gives each id once, in order, reading a gap from storage when an
    /// event comes early.
    #[tokio::test]
    async fn a_stream_of_dense_ids_reads_gaps_and_drops_repeats() {
        let stored = Arc::new(Stored::default());
        stored.events.lock().unwrap().push(event(1));
        let fanout = Fanout::default();
        let mut stream = fanout
            .subscribe(stored.clone(), "alice", None)
            .await
            .unwrap();
        assert_eq!(
            stored.reads.load(Ordering::SeqCst),
            0,
            "live: no backlog read"
        );

        // 2 and 3 are committed; 3's announcement comes first.
        stored.events.lock().unwrap().extend([event(2), event(3)]);
        fanout.deliver(Arc::new(event(3)));
        assert_eq!(ids(&mut stream, 2).await, [2, 3]);
        assert_eq!(
            stored.reads.load(Ordering::SeqCst),
            1,
            "one read for the gap"
        );

        // The late 2, a repeated 3, then 4 in order: only 4 is news, and no read is needed.
        stored.events.lock().unwrap().push(event(4));
        for id in [2, 3, 4] {
            fanout.deliver(Arc::new(event(id)));
        }
        assert_eq!(ids(&mut stream, 1).await, [4]);
        assert_eq!(stored.reads.load(Ordering::SeqCst), 1);
    }

    /// A `Last-Event-ID` past the newest id (one from a table since replaced) resumes from the
    /// newest, rather than skipping everything until ids catch up with it.
    #[tokio::test]
    async fn a_resume_from_past_the_newest_id_does_not_skip_what_follows() {
        let stored = Arc::new(Stored::default());
        stored.events.lock().unwrap().push(event(1));
        let fanout = Fanout::default();
        let mut stream = fanout
            .subscribe(stored.clone(), "alice", Some(500))
            .await
            .unwrap();
        stored.events.lock().unwrap().push(event(2));
        fanout.deliver(Arc::new(event(2)));
        assert_eq!(ids(&mut stream, 1).await, [2]);
    }
}
