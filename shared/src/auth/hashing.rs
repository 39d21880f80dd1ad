//! Password hashing with a bound on memory.
//!
//! Argon2 (the default parameters: 19 MiB, two passes) is slow and memory-hard on purpose, so
//! an unbounded number of hashes at once is a way to exhaust the server's memory without an
//! account: each sign-in ran in its own blocking task with its own 19 MiB, and the allocator
//! kept what it was given (~5 GiB after bursts of 96 failed sign-ins). Here a fixed set of
//! threads (about one per core) does every hash, each reusing one buffer for the whole life of
//! the process, and a short queue holds what waits for them. When the queue is full the caller
//! is told to come back (`Error::Busy`, a `503` with `Retry-After`) instead of being queued.
//!
//! Written by hand because `argon2`'s `PasswordHasher` allocates its memory per hash; the
//! crate's `hash_password_into_with_memory` takes a caller's buffer, and the PHC string around
//! it is built and checked here with the crate's own types (`PasswordHash`, `Output`, whose
//! comparison is constant-time).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::sync::oneshot;

use crate::{Error, Result};

/// How long a caller turned away by a full queue is told to wait.
const RETRY_AFTER: Duration = Duration::from_secs(1);

type Job = Box<dyn FnOnce(&mut Vec<Block>) + Send>;

/// Which line a hash waits in. A flood of failed sign-ins from many addresses (a botnet, with
/// a new e-mail per try) gets past the lockouts, which count per account and per address, and
/// would fill the one queue, so the owner of an account would get `503` until it ended. Sign-ins
/// of accounts that exist wait in a line of their own, served first: a flood of unknown
/// e-mails cannot reach it, and one of known e-mails runs into each account's lockout.
/// (Which line a try waited in shows in its timing under load, telling that an account exists;
/// sign-up tells that anyway, `409 email_taken`, a documented choice.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// A sign-in of an account that exists.
    Account,
    /// Everything else: sign-ups, and sign-ins of unknown e-mails (hashed all the same, so an
    /// answer's timing does not tell them apart when the server is idle).
    Anyone,
}

/// The two lines, each bounded.
struct Lines {
    account: VecDeque<Job>,
    anyone: VecDeque<Job>,
    closed: bool,
}

struct Queue {
    lines: Mutex<Lines>,
    ready: Condvar,
    /// Room in each line.
    capacity: usize,
}

impl Queue {
    /// The next job, account sign-ins first; `None` once the pool is dropped.
    fn next(&self) -> Option<Job> {
        let mut lines = self.lines.lock().ok()?;
        loop {
            if lines.closed {
                return None;
            }
            if let Some(job) = lines
                .account
                .pop_front()
                .or_else(|| lines.anyone.pop_front())
            {
                return Some(job);
            }
            lines = self.ready.wait(lines).ok()?;
        }
    }
}

/// A fixed pool of hashing threads behind two bounded lines (see [`Lane`]).
pub struct PasswordHashing {
    queue: Arc<Queue>,
}

impl PasswordHashing {
    /// `threads` hashing threads (at least one), and room for `queue` hashes waiting in each
    /// line.
    pub fn new(threads: usize, queue: usize) -> Result<Self> {
        let queue = Arc::new(Queue {
            lines: Mutex::new(Lines {
                account: VecDeque::new(),
                anyone: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            capacity: queue.max(1),
        });
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    // This thread's one buffer, grown to the largest hash it has run.
                    let mut memory = Vec::new();
                    while let Some(job) = queue.next() {
                        job(&mut memory);
                    }
                })?;
        }
        Ok(PasswordHashing { queue })
    }

    /// One thread per core, and four hashes per thread waiting in each line.
    pub fn per_core() -> Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        PasswordHashing::new(cores, cores * 4)
    }

    /// A new PHC string (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`) for `password`: a new
    /// account's, so it waits in the line of [`Lane::Anyone`].
    pub async fn hash(&self, password: String) -> Result<String> {
        self.run(Lane::Anyone, move |memory| hash_with(memory, &password))
            .await
    }

    /// Whether `password` matches the PHC string `hash`.
    pub async fn verify(&self, lane: Lane, hash: String, password: String) -> Result<bool> {
        self.run(lane, move |memory| verify_with(memory, &hash, &password))
            .await
    }

    async fn run<R, F>(&self, lane: Lane, f: F) -> Result<R>
    where
        F: FnOnce(&mut Vec<Block>) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(move |memory| {
            let _ = answer.send(f(memory));
        });
        {
            let mut lines = self
                .queue
                .lines
                .lock()
                .map_err(|_| Error::internal_msg("the password hashing threads stopped"))?;
            let line = match lane {
                Lane::Account => &mut lines.account,
                Lane::Anyone => &mut lines.anyone,
            };
            if line.len() >= self.queue.capacity {
                return Err(Error::Busy {
                    message: "too many sign-ins at once; retry shortly".into(),
                    retry_after: RETRY_AFTER,
                });
            }
            line.push_back(job);
        }
        self.queue.ready.notify_one();
        answered
            .await
            .map_err(|_| Error::internal_msg("a password hash was dropped"))?
    }
}

impl Drop for PasswordHashing {
    /// Stops the threads once they are done with what they are running.
    fn drop(&mut self) {
        if let Ok(mut lines) = self.queue.lines.lock() {
            lines.closed = true;
        }
        self.queue.ready.notify_all();
    }
}

/// A hash made on the calling thread with a buffer of its own (the dummy hash at start-up).
pub fn hash_now(password: &str) -> Result<String> {
    hash_with(&mut Vec::new(), password)
}

/// The buffer for `params`, reused when it is big enough.
fn memory_for<'m>(memory: &'m mut Vec<Block>, params: &Params) -> &'m mut [Block] {
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    &mut memory[..blocks]
}

/// The `len`-byte argon2 output of `password` and `salt`, computed in `memory`.
fn digest(
    argon: &Argon2,
    params: &Params,
    password: &str,
    salt: &[u8],
    len: usize,
    memory: &mut Vec<Block>,
) -> argon2::password_hash::Result<Output> {
    Output::init_with(len, |out| {
        argon
            .hash_password_into_with_memory(
                password.as_bytes(),
                salt,
                out,
                memory_for(memory, params),
            )
            .map_err(Into::into)
    })
}

fn hash_with(memory: &mut Vec<Block>, password: &str) -> Result<String> {
    let failed = |e: argon2::password_hash::Error| Error::internal("hashing a password", e);
    let params = Params::default();
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let salt = SaltString::generate(&mut OsRng);
    let mut salt_bytes = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_bytes).map_err(failed)?;
    let output = digest(
        &argon,
        &params,
        password,
        salt_bytes,
        Params::DEFAULT_OUTPUT_LEN,
        memory,
    )
    .map_err(failed)?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(failed)?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(phc.to_string())
}

fn verify_with(memory: &mut Vec<Block>, hash: &str, password: &str) -> Result<bool> {
    let bad = |e: argon2::password_hash::Error| Error::storage("stored password hash", e);
    let phc = PasswordHash::new(hash).map_err(bad)?;
    let (Some(salt), Some(expected)) = (phc.salt, phc.hash) else {
        return Err(Error::storage_msg("stored password hash: no salt or hash"));
    };
    let algorithm = Algorithm::try_from(phc.algorithm).map_err(bad)?;
    let version = phc
        .version
        .map(Version::try_from)
        .transpose()
        .map_err(|e| Error::storage("stored password hash", e))?
        .unwrap_or_default();
    let params = Params::try_from(&phc).map_err(bad)?;
    let mut salt_bytes = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_bytes).map_err(bad)?;
    let argon = Argon2::new(algorithm, version, params.clone());
    let computed = digest(
        &argon,
        &params,
        password,
        salt_bytes,
        expected.len(),
        memory,
    )
    .map_err(bad)?;
    // `Output`'s equality is constant-time.
    Ok(computed == expected)
}

#[cfg(test)]
mod tests {
    use argon2::password_hash::{PasswordHasher, PasswordVerifier};

    use super::*;

    #[tokio::test]
    async fn hashes_verify_both_ways_with_the_argon2_crate() {
        let pool = PasswordHashing::new(1, 4).unwrap();
        let ours = pool.hash("correct horse".into()).await.unwrap();
        assert!(
            ours.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{ours}"
        );
        // Ours verifies with the crate's own verifier, and the crate's with ours.
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default()
            .verify_password(b"correct horse", &parsed)
            .is_ok());
        let salt = SaltString::generate(&mut OsRng);
        let theirs = Argon2::default()
            .hash_password(b"battery staple", &salt)
            .unwrap()
            .to_string();
        assert!(pool
            .verify(Lane::Account, theirs.clone(), "battery staple".into())
            .await
            .unwrap());
        assert!(!pool
            .verify(Lane::Account, theirs, "battery stable".into())
            .await
            .unwrap());
        assert!(!pool
            .verify(Lane::Anyone, ours, "correct horse!".into())
            .await
            .unwrap());
    }

    /// Holds the pool's (one) hashing thread with a job of the test's own until the returned
    /// sender lets go, so a test fills the lines without racing the hashes.
    async fn hold(
        pool: &Arc<PasswordHashing>,
    ) -> (
        std::sync::mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<()>>,
    ) {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, running) = oneshot::channel::<()>();
        let pool = pool.clone();
        let holder = tokio::spawn(async move {
            pool.run(Lane::Anyone, move |_| {
                let _ = started.send(());
                let _ = held.recv();
                Ok(())
            })
            .await
        });
        running.await.unwrap();
        (release, holder)
    }

    #[tokio::test]
    async fn a_full_queue_turns_callers_away_instead_of_queueing_them() {
        let pool = Arc::new(PasswordHashing::new(1, 1).unwrap());
        let hash = pool.hash("a password".into()).await.unwrap();
        let (release, holder) = hold(&pool).await;
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (pool, hash) = (pool.clone(), hash.clone());
            calls.spawn(async move {
                pool.verify(Lane::Anyone, hash, "wrong password".into())
                    .await
            });
        }
        // One waits (the line holds one); the other seven are answered at once.
        let mut busy = 0;
        for _ in 0..7 {
            match calls.join_next().await.unwrap().unwrap() {
                Err(Error::Busy { retry_after, .. }) => {
                    assert!(retry_after >= Duration::from_secs(1));
                    busy += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(busy, 7);
        release.send(()).unwrap();
        holder.await.unwrap().unwrap();
        assert!(
            !calls.join_next().await.unwrap().unwrap().unwrap(),
            "the one that waited"
        );
        // Once the burst is over the pool answers again.
        assert!(pool
            .verify(Lane::Anyone, hash, "a password".into())
            .await
            .unwrap());
    }

    /// Waits until `lane`'s line holds `n` jobs.
    async fn queued(pool: &PasswordHashing, lane: Lane, n: usize) {
        loop {
            let len = {
                let lines = pool.queue.lines.lock().unwrap();
                match lane {
                    Lane::Account => lines.account.len(),
                    Lane::Anyone => lines.anyone.len(),
                }
            };
            if len == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn an_accounts_sign_in_gets_through_a_flood_of_unknown_ones() {
        let pool = Arc::new(PasswordHashing::new(1, 2).unwrap());
        let hash = pool.hash("the owner's password".into()).await.unwrap();
        // The one hashing thread is held, so the lines fill without racing the hashes (a fast
        // machine finished them before the next try, and the line was never full).
        let (release, holder) = hold(&pool).await;
        // The flood fills the line of unknown e-mails (two waiting), and the next is turned
        // away.
        let mut flood = tokio::task::JoinSet::new();
        for _ in 0..2 {
            let (pool, hash) = (pool.clone(), hash.clone());
            flood.spawn(async move { pool.verify(Lane::Anyone, hash, "guess".into()).await });
        }
        queued(&pool, Lane::Anyone, 2).await;
        let anyone = pool
            .verify(Lane::Anyone, hash.clone(), "one more guess".into())
            .await;
        assert!(matches!(anyone, Err(Error::Busy { .. })), "{anyone:?}");
        // The owner's try is not turned away: it waits in its own line, served first.
        let owner = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.verify(Lane::Account, hash, "the owner's password".into())
                    .await
            })
        };
        queued(&pool, Lane::Account, 1).await;
        assert_eq!(
            pool.queue.lines.lock().unwrap().anyone.len(),
            2,
            "the flood still waits"
        );
        release.send(()).unwrap();
        assert!(owner.await.unwrap().unwrap());
        holder.await.unwrap().unwrap();
        while flood.join_next().await.is_some() {}
    }
}
