//! Slows down password guessing: failed sign-ins and refreshes, counted per account (or per
//! refresh token) and per client address.
//!
//! A key gets a few failures free; after that each failure locks it out for twice as long as
//! the last (1 s, 2 s, 4 s, … up to 15 minutes), and attempts during a lockout are refused with
//! `429` and `Retry-After` without being tried (no password hash, no call to Cognito). A
//! success clears the account's count; a key with no failure for 15 minutes is forgotten.
//!
//! Written by hand: `governor` (the per-user limiter) limits every request, while this must
//! count only failures, so that a person who types the right password is never slowed down.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The longest lockout, and how long a key's failures are remembered.
const MAX_LOCKOUT: Duration = Duration::from_secs(15 * 60);
/// Keys tracked at most; beyond that the oldest are forgotten first.
const MAX_KEYS: usize = 100_000;

/// What failures are counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// An account, by its e-mail as typed (lower-cased), or a refresh token's hash.
    Account(String),
    Address(IpAddr),
}

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    last_failure: Instant,
    locked_until: Option<Instant>,
}

pub struct Throttle {
    free_per_account: u32,
    free_per_address: u32,
    keys: Mutex<HashMap<Key, Record>>,
}

impl Throttle {
    /// `per_account` and `per_address` failures are free before lockouts start; 0 turns that
    /// kind of key off.
    pub fn new(per_account: u32, per_address: u32) -> Self {
        Throttle {
            free_per_account: per_account,
            free_per_address: per_address,
            keys: Mutex::new(HashMap::new()),
        }
    }

    fn free(&self, key: &Key) -> u32 {
        match key {
            Key::Account(_) => self.free_per_account,
            Key::Address(_) => self.free_per_address,
        }
    }

    /// `Err(wait)` when any of `keys` is locked out now.
    pub fn check(&self, keys: &[Key]) -> Result<(), Duration> {
        let now = Instant::now();
        let Ok(map) = self.keys.lock() else {
            return Ok(());
        };
        let wait = keys
            .iter()
            .filter_map(|k| map.get(k)?.locked_until)
            .filter(|until| *until > now)
            .map(|until| until - now)
            .max();
        match wait {
            Some(wait) => Err(wait),
            None => Ok(()),
        }
    }

    /// Counts a failure against each of `keys`.
    pub fn failed(&self, keys: &[Key]) {
        let now = Instant::now();
        let Ok(mut map) = self.keys.lock() else {
            return;
        };
        if map.len() >= MAX_KEYS {
            forget_old(&mut map, now);
        }
        for key in keys {
            let free = self.free(key);
            if free == 0 {
                continue;
            }
            let record = map.entry(key.clone()).or_insert(Record {
                failures: 0,
                last_failure: now,
                locked_until: None,
            });
            if now.duration_since(record.last_failure) > MAX_LOCKOUT {
                record.failures = 0;
            }
            record.failures += 1;
            record.last_failure = now;
            if record.failures > free {
                let doublings = (record.failures - free - 1).min(20);
                let lockout = Duration::from_secs(1 << doublings).min(MAX_LOCKOUT);
                record.locked_until = Some(now + lockout);
            }
        }
    }

    /// Clears the count of `key` (an account that just signed in).
    pub fn succeeded(&self, key: &Key) {
        if let Ok(mut map) = self.keys.lock() {
            map.remove(key);
        }
    }
}

/// Drops keys with no recent failure; if that is not enough, the older half.
fn forget_old(map: &mut HashMap<Key, Record>, now: Instant) {
    map.retain(|_, r| now.duration_since(r.last_failure) <= MAX_LOCKOUT);
    if map.len() >= MAX_KEYS {
        let mut ages: Vec<Instant> = map.values().map(|r| r.last_failure).collect();
        ages.sort_unstable();
        let cutoff = ages[ages.len() / 2];
        map.retain(|_, r| r.last_failure > cutoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(name: &str) -> Key {
        Key::Account(name.into())
    }

    #[test]
    fn lockouts_start_after_the_free_failures_and_double() {
        let t = Throttle::new(3, 0);
        let keys = [account("a@x.io")];
        for _ in 0..3 {
            assert!(t.check(&keys).is_ok());
            t.failed(&keys);
        }
        assert!(t.check(&keys).is_ok(), "three failures are free");
        t.failed(&keys);
        let first = t.check(&keys).unwrap_err();
        assert!(first <= Duration::from_secs(1) && first > Duration::from_millis(500));
        t.failed(&keys);
        let second = t.check(&keys).unwrap_err();
        assert!(second > Duration::from_millis(1500), "{second:?}");
        assert!(
            t.check(&[account("b@x.io")]).is_ok(),
            "others are not locked"
        );
        t.succeeded(&keys[0]);
        assert!(t.check(&keys).is_ok());
    }

    #[test]
    fn an_address_is_locked_out_across_accounts() {
        let t = Throttle::new(3, 5);
        let addr = Key::Address("192.0.2.7".parse().unwrap());
        for i in 0..6 {
            t.failed(&[account(&format!("user{i}@x.io")), addr.clone()]);
        }
        assert!(t.check(&[account("new@x.io"), addr]).is_err());
        let other = Key::Address("192.0.2.8".parse().unwrap());
        assert!(t.check(&[account("new@x.io"), other]).is_ok());
    }

    #[test]
    fn the_lockout_is_capped() {
        let t = Throttle::new(1, 0);
        let keys = [account("a@x.io")];
        for _ in 0..40 {
            t.failed(&keys);
        }
        assert!(t.check(&keys).unwrap_err() <= MAX_LOCKOUT);
    }
}
