//! Every id CharacterBot hands out, as its own type.
//!
//! Ids are strings on the wire and in storage (`per_…`, `req_…`), but inside the code a
//! persona id and a request id are different types: passing one where the other belongs is a
//! compile error, not an empty result in production. Each type knows its prefix, and the ids
//! derived from another (the persona a request makes, the reply it writes) are derived here
//! and nowhere else.
//!
//! An id read back from storage or from a client is taken as it is ([`From<String>`]): an
//! unknown or malformed one simply finds nothing, which is the answer the API has always given
//! (`404`), so checking prefixes on the way in would change the contract for no gain.

use std::fmt;

use deadpool_sqlite::rusqlite;
use rusqlite::types::{FromSql, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::{Deserialize, Serialize};

/// A new, sortable, unguessable id: `{prefix}_{UUIDv7}` (time first, so ids sort by creation).
fn fresh(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        // No `ToSchema`: the OpenAPI document shows ids as plain strings, as it always has;
        // each field of an id type says `#[schema(value_type = String)]`.
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// What every id of this type starts with, before `_`.
            pub const PREFIX: &'static str = $prefix;

            /// A new random id.
            #[allow(clippy::new_without_default)] // a default id would hide where ids come from
            pub fn new() -> Self {
                $name(fresh($prefix))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                $name(id)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                $name(id.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        // Hashes and compares as its text (the derives delegate to the one field), so maps
        // keyed by an id can be looked up by a `&str`.
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl From<&$name> for String {
            fn from(id: &$name) -> String {
                id.0.clone()
            }
        }

        // Ids are text columns in the embedded store.
        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                self.0.to_sql()
            }
        }

        impl FromSql for $name {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                String::column_result(value).map($name)
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

id_type!(
    /// A persona: `per_…`. A generated persona's id is derived from its request's
    /// ([`RequestId::persona_id`]), so a redelivered job finds the persona it already stored.
    PersonaId,
    "per"
);
id_type!(
    /// A conversation: `conv_…`.
    ConversationId,
    "conv"
);
id_type!(
    /// A message, the user's or a reply: `msg_…`. A reply's id is derived from the request that
    /// writes it ([`RequestId::reply_id`]).
    MessageId,
    "msg"
);
id_type!(
    /// An asynchronous request: `req_…`.
    RequestId,
    "req"
);
id_type!(
    /// A batch of persona requests: `bat_…`.
    BatchId,
    "bat"
);

impl RequestId {
    /// The part after the prefix, shared by the ids derived from this one.
    fn tail(&self) -> &str {
        self.0
            .strip_prefix(Self::PREFIX)
            .and_then(|t| t.strip_prefix('_'))
            .unwrap_or(&self.0)
    }

    /// The persona this (persona) request creates: the same tail, so every attempt of the job
    /// stores the same persona.
    pub fn persona_id(&self) -> PersonaId {
        PersonaId(format!("{}_{}", PersonaId::PREFIX, self.tail()))
    }

    /// The reply this (chat) request writes: the same tail, so every attempt of the job stores
    /// the same reply.
    pub fn reply_id(&self) -> MessageId {
        MessageId(format!("{}_{}", MessageId::PREFIX, self.tail()))
    }

    /// The version of a reply this (chat) request writes ("swipe"): the same tail, so every
    /// attempt of the job adds the same one.
    pub fn variant_id(&self) -> String {
        format!("var_{}", self.tail())
    }
}

/// An id type that [`Ids`] can make.
pub trait Id: From<String> {
    const PREFIX: &'static str;
}

macro_rules! impl_id {
    ($($name:ident),*) => {$(
        impl Id for $name {
            const PREFIX: &'static str = $name::PREFIX;
        }
    )*};
}
impl_id!(PersonaId, ConversationId, MessageId, RequestId, BatchId);

/// Where the ids of what an API call creates come from.
///
/// With an `Idempotency-Key` they are derived from the user, the key and the time the key was
/// first claimed, so a client retrying after a crash gets the same ids: whatever the first
/// attempt stored is found instead of stored twice. They keep the shape of a fresh id (a
/// UUIDv7: time first, so they sort like fresh ids) with the hash of user and key as the
/// "random" part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ids {
    /// No key: new random ids.
    Fresh,
    Keyed {
        user_id: String,
        key: String,
        first_ms: i64,
    },
}

impl Ids {
    /// The id for `slot` (what it names within the call: `"request"`, `"request/3"`, …).
    pub fn id<T: Id>(&self, slot: &str) -> T {
        T::from(self.raw(T::PREFIX, slot))
    }

    fn raw(&self, prefix: &str, slot: &str) -> String {
        let Ids::Keyed {
            user_id,
            key,
            first_ms,
        } = self
        else {
            return fresh(prefix);
        };
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [user_id.as_str(), key, slot] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        let digest = h.finalize();
        let mut tail = [0u8; 10];
        tail.copy_from_slice(&digest[..10]);
        let uuid = uuid::Builder::from_unix_timestamp_millis(*first_ms as u64, &tail).into_uuid();
        format!("{prefix}_{}", uuid.simple())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_ids_carry_their_prefix_and_sort_by_creation() {
        let a = RequestId::new();
        let b = RequestId::new();
        assert!(a.as_str().starts_with("req_"), "{a}");
        assert!(a < b, "UUIDv7 ids sort by time: {a} {b}");
        assert!(PersonaId::new().starts_with("per_"));
        assert!(ConversationId::new().starts_with("conv_"));
        assert!(MessageId::new().starts_with("msg_"));
        assert!(BatchId::new().starts_with("bat_"));
    }

    #[test]
    fn derived_ids_share_the_request_tail() {
        let request = RequestId::from("req_0192abc");
        assert_eq!(request.persona_id(), "per_0192abc");
        assert_eq!(request.reply_id(), "msg_0192abc");
    }

    #[test]
    fn ids_are_plain_strings_on_the_wire() {
        let id = PersonaId::from("per_1");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"per_1\"");
        let back: PersonaId = serde_json::from_str("\"per_1\"").unwrap();
        assert_eq!(back, id);
    }

    #[test]
    fn keyed_ids_are_stable_distinct_and_time_ordered() {
        let ids = |user: &str, key: &str, first_ms| Ids::Keyed {
            user_id: user.into(),
            key: key.into(),
            first_ms,
        };
        let a = ids("alice", "k1", 1_700_000_000_000);
        let request = |ids: &Ids, slot| ids.id::<RequestId>(slot);
        assert_eq!(request(&a, "request"), request(&a, "request"));
        assert_ne!(request(&a, "request"), request(&a, "request/1"));
        assert_ne!(
            request(&a, "request"),
            request(&ids("bob", "k1", 1_700_000_000_000), "request")
        );
        assert_ne!(
            request(&a, "request"),
            request(&ids("alice", "k2", 1_700_000_000_000), "request")
        );
        let later = request(&ids("alice", "k1", 1_700_000_000_001), "request");
        assert!(request(&a, "request") < later);
        assert!(later < RequestId::new(), "keyed ids sort like fresh ones");
        let uuid = uuid::Uuid::parse_str(later.tail()).unwrap();
        assert_eq!(uuid.get_version_num(), 7);
        assert_ne!(
            request(&Ids::Fresh, "request"),
            request(&Ids::Fresh, "request")
        );
        let message: MessageId = a.id("message");
        assert!(message.starts_with("msg_"));
    }
}
