//! Access tokens already verified, by SHA-256 of the token, until they expire.
//!
//! A client sends the same token for an hour; checking its RSA signature once instead of on
//! every request saves most of the cost of authentication. The cache sits in the API rather
//! than in the verifier because only the API knows whether a request was admitted: a token is
//! remembered only once its request got past the rate limit, so a user minting tokens (through
//! refresh) can add at most their rate of requests. It is least-recently-used first out
//! (`hashlink`'s LRU, already in the build through `rusqlite`), so the tokens of people using
//! the API stay while a flood of one-off tokens churns through the cold end, instead of the
//! whole cache being dropped when it fills.

use std::sync::Mutex;

use hashlink::LruCache;
use sha2::{Digest, Sha256};
use shared::auth::AuthUser;

/// Most tokens remembered.
const CAPACITY: usize = 10_000;

pub type Key = [u8; 32];

pub struct TokenCache {
    entries: Mutex<LruCache<Key, AuthUser>>,
}

impl Default for TokenCache {
    fn default() -> Self {
        TokenCache::new(CAPACITY)
    }
}

impl TokenCache {
    pub fn new(capacity: usize) -> Self {
        TokenCache {
            entries: Mutex::new(LruCache::new(capacity.max(1))),
        }
    }

    /// The cache key of a token (its SHA-256: the token itself is not kept).
    pub fn key(token: &str) -> Key {
        Sha256::digest(token.as_bytes()).into()
    }

    /// The token's user, if it was verified, admitted and has not expired since.
    pub fn get(&self, key: &Key) -> Option<AuthUser> {
        let mut entries = self.entries.lock().ok()?;
        let user = entries.get(key)?.clone();
        // Only up to the real expiry: the verifier's leeway is for clock skew at the first
        // check, not a licence to keep accepting the token.
        if user.expires_at > shared::time::now_secs() {
            Some(user)
        } else {
            entries.remove(key);
            None
        }
    }

    /// Remembers a verified token whose request was admitted.
    pub fn put(&self, key: Key, user: AuthUser) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(key, user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str) -> AuthUser {
        AuthUser {
            user_id: id.into(),
            expires_at: shared::time::now_secs() + 3600,
        }
    }

    #[test]
    fn a_flood_of_new_tokens_evicts_the_coldest_not_everyone() {
        let cache = TokenCache::new(100);
        let regular = TokenCache::key("regular");
        cache.put(regular, user("regular"));
        for i in 0..1000 {
            // The regular user keeps using their token while the flood goes on.
            assert!(
                cache.get(&regular).is_some(),
                "evicted after {i} new tokens"
            );
            cache.put(TokenCache::key(&format!("minted-{i}")), user("minter"));
        }
        assert!(cache.get(&TokenCache::key("minted-0")).is_none());
        assert!(cache.get(&TokenCache::key("minted-999")).is_some());
    }

    #[test]
    fn an_expired_token_is_not_served() {
        let cache = TokenCache::new(10);
        let key = TokenCache::key("old");
        let mut old = user("u");
        old.expires_at = shared::time::now_secs() - 1;
        cache.put(key, old);
        assert!(cache.get(&key).is_none());
    }
}
