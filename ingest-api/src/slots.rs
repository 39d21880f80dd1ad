//! How many long-lived answers (event streams and long polls) each user holds open.
//!
//! Each one costs a connection, a task and a subscription for as long as it lasts, and a rate
//! limit counts it once, when it starts: without a cap one user could hold hundreds. A user at
//! the cap is refused a new one with `429 too_many_streams` (the client closes one it no longer
//! needs, or waits), rather than the oldest being closed under a screen that still shows it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The per-user counts, shared by every guard.
#[derive(Default)]
pub struct Slots {
    held: Mutex<HashMap<String, usize>>,
}

/// One open stream or long poll; the slot is given back when it is dropped (the answer ended,
/// or the client went away and the server dropped the answer).
pub struct Slot {
    slots: Arc<Slots>,
    user_id: String,
}

impl Slots {
    /// Takes one of `user_id`'s `max` slots, or `None` when all are held.
    pub fn take(self: &Arc<Self>, user_id: &str, max: usize) -> Option<Slot> {
        let mut held = self.held.lock().ok()?;
        let n = held.entry(user_id.to_owned()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            slots: self.clone(),
            user_id: user_id.to_owned(),
        })
    }

    /// Slots `user_id` holds now.
    pub fn held(&self, user_id: &str) -> usize {
        self.held
            .lock()
            .map_or(0, |h| h.get(user_id).copied().unwrap_or(0))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut held) = self.slots.held.lock() {
            if let Some(n) = held.get_mut(&self.user_id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    // No entry for a user with nothing open: the map stays as small as the
                    // set of users connected now.
                    held.remove(&self.user_id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_holds_at_most_max_and_gets_them_back() {
        let slots = Arc::new(Slots::default());
        let held: Vec<Slot> = (0..3).filter_map(|_| slots.take("ann", 3)).collect();
        assert_eq!(held.len(), 3);
        assert!(slots.take("ann", 3).is_none());
        assert!(slots.take("bob", 3).is_some(), "others are not affected");
        drop(held);
        assert_eq!(slots.held("ann"), 0);
        assert!(slots.take("ann", 3).is_some());
    }
}
