//! What a process remembers of what it wrote or read, to save a read the next time: an event
//! counter's head, a message's turn, a request a worker started. Bounded, and forgotten whole
//! when full; always a hint under a conditional write or of a fact that never changes, never
//! trusted on its own.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

pub(crate) struct Memo<K, V> {
    map: Mutex<HashMap<K, V>>,
    most: usize,
}

impl<K: Eq + Hash, V: Clone> Memo<K, V> {
    /// Remembers at most `most` entries.
    pub(crate) fn new(most: usize) -> Self {
        Memo {
            map: Mutex::new(HashMap::new()),
            most,
        }
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<V>
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

    pub(crate) fn insert(&self, key: K, value: V) {
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= self.most {
                map.clear();
            }
            map.insert(key, value);
        }
    }
}
