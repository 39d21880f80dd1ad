//! What a process remembers of what it wrote or read, to save a read the next time: an event
//! counter's head, a message's turn, a request a worker started. Bounded, and forgotten whole
//! when full; always a hint under a conditional write or of a fact that never changes, never
//! trusted on its own.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

pub struct Memo<K, V> {
    map: Mutex<HashMap<K, V>>,
    most: usize,
}

impl<K: Eq + Hash, V: Clone> Memo<K, V> {
    /// Remembers at most `most` entries.
    pub fn new(most: usize) -> Self {
        Memo {
            map: Mutex::new(HashMap::new()),
            most,
        }
    }

    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.map.lock().ok()?.get(key).cloned()
    }

    /// The entry, forgotten as it is returned.
    pub(crate) fn take<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.map.lock().ok()?.remove(key)
    }

    /// Forgets the entry of `key` if it is still `value` (not replaced since).
    pub fn forget_if(&self, key: &K, value: &V)
    where
        V: PartialEq,
    {
        if let Ok(mut map) = self.map.lock() {
            if map.get(key) == Some(value) {
                map.remove(key);
            }
        }
    }

    /// Remembers `value` unless `key` has an entry already.
    pub(crate) fn insert_new(&self, key: K, value: V) {
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= self.most {
                map.clear();
            }
            map.entry(key).or_insert(value);
        }
    }

    pub fn insert(&self, key: K, value: V) {
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= self.most {
                map.clear();
            }
            map.insert(key, value);
        }
    }
}

/// One async lock per key, made on first use: the tasks of a process that write the same
/// counter (a user's events, a conversation's turns) take turns instead of racing each other
/// for it, so only writers in other processes ever collide. Locks nobody holds are dropped
/// once `most` keys are known.
pub(crate) struct KeyedLocks<K> {
    map: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
    most: usize,
}

impl<K: Eq + Hash + Clone> KeyedLocks<K> {
    pub(crate) fn new(most: usize) -> Self {
        KeyedLocks {
            map: Mutex::new(HashMap::new()),
            most,
        }
    }

    /// Waits for `key`'s lock; held until the guard is dropped.
    pub(crate) async fn lock(&self, key: &K) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            if map.len() >= self.most {
                map.retain(|_, lock| Arc::strong_count(lock) > 1);
            }
            map.entry(key.clone()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_forgotten_only_while_it_is_the_one_given() {
        let memo: Memo<String, u32> = Memo::new(10);
        memo.insert("fold".into(), 1);
        // Replaced since (a later fold): kept.
        memo.forget_if(&"fold".to_owned(), &2);
        assert_eq!(memo.get("fold"), Some(1));
        memo.forget_if(&"fold".to_owned(), &1);
        assert_eq!(memo.get("fold"), None);
    }
}
