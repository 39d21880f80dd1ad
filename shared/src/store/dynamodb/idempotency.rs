//! Idempotency keys on DynamoDB: `USER#{user}` / `IDEM#{key}`, with a TTL. The stored answer
//! keeps the attributes it always had (`status_code`, `response_body`), so keys written before
//! stay readable; the store does not interpret them.

use async_trait::async_trait;

use super::{get_n, get_s, is_conditional_failure, key, n, s, storage, user_pk, DynamoStore, Item};
use crate::store::{IdempotencyBegin, IdempotencyStore, KeyClaim, StoredAnswer};
use crate::time::now_ms;
use crate::Result;

/// A claim that was abandoned (its handler died): taken over only from the claim that was
/// read, keeping its first time so ids derived from the key come out the same.
#[derive(Clone, Copy)]
struct Abandoned {
    locked_ms: i64,
    first_ms: i64,
}

/// What the unexpired item of a key, if any, says about a new claim.
enum Found {
    /// Nothing to claim over: the answer is this.
    Answer(IdempotencyBegin),
    /// No live claim: the key is free.
    Free,
    Abandoned(Abandoned),
}

fn found(existing: Option<&Item>, claim: &KeyClaim<'_>, now: i64) -> Found {
    let Some(item) = existing else {
        return Found::Free;
    };
    if get_s(item, "fingerprint") != Some(claim.fingerprint) {
        return Found::Answer(IdempotencyBegin::Mismatch);
    }
    if let Some(answer) = stored_answer(item) {
        return Found::Answer(IdempotencyBegin::Replay(answer));
    }
    let locked_ms = get_n(item, "locked_ms").unwrap_or(0);
    if locked_ms + claim.lock_ms() > now {
        return Found::Answer(IdempotencyBegin::InFlight);
    }
    Found::Abandoned(Abandoned {
        locked_ms,
        first_ms: get_n(item, "first_ms").filter(|f| *f > 0).unwrap_or(now),
    })
}

/// The answer recorded on a key's item, if it has one.
pub(crate) fn stored_answer(item: &Item) -> Option<StoredAnswer> {
    let code = get_n(item, "status_code")?;
    Some(StoredAnswer {
        code: u16::try_from(code).unwrap_or_default(),
        body: get_s(item, "response_body").unwrap_or_default().to_owned(),
    })
}

impl DynamoStore {
    /// Writes a claim of the key: over the abandoned claim `over` that was read, or where no
    /// live claim is. False when someone else changed the key first.
    async fn put_claim(
        &self,
        pk: &str,
        sk: &str,
        claim: &KeyClaim<'_>,
        now: i64,
        first_ms: i64,
        over: Option<Abandoned>,
    ) -> Result<bool> {
        let expires_ms = now + claim.ttl_ms();
        let mut item = key(pk, sk);
        item.insert("fingerprint".into(), s(claim.fingerprint));
        item.insert("locked_ms".into(), n(now));
        item.insert("first_ms".into(), n(first_ms));
        item.insert("expires_ms".into(), n(expires_ms));
        item.insert("expires_at".into(), n(expires_ms / 1000));
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item));
        let put = match over {
            Some(o) => put
                .condition_expression("locked_ms = :locked AND attribute_not_exists(status_code)")
                .expression_attribute_values(":locked", n(o.locked_ms)),
            None => put
                .condition_expression("attribute_not_exists(pk) OR expires_ms < :now")
                .expression_attribute_values(":now", n(now)),
        };
        match put.send().await {
            Ok(_) => Ok(true),
            Err(e) if is_conditional_failure(&e) => Ok(false),
            Err(e) => Err(storage("claim idempotency key", e)),
        }
    }
}

#[async_trait]
impl IdempotencyStore for DynamoStore {
    async fn idempotency_begin(&self, claim: KeyClaim<'_>) -> Result<IdempotencyBegin> {
        let (pk, sk) = (user_pk(claim.user_id), format!("IDEM#{}", claim.key));
        for _ in 0..3 {
            let now = now_ms();
            let existing = self
                .get(&pk, &sk)
                .await?
                .filter(|i| get_n(i, "expires_ms").unwrap_or(0) > now);
            let over = match found(existing.as_ref(), &claim, now) {
                Found::Answer(begin) => return Ok(begin),
                Found::Free => None,
                Found::Abandoned(over) => Some(over),
            };
            let first_ms = over.map_or(now, |o| o.first_ms);
            if self
                .put_claim(&pk, &sk, &claim, now, first_ms, over)
                .await?
            {
                return Ok(IdempotencyBegin::Started {
                    first_ms,
                    claim: now,
                });
            }
        }
        Ok(IdempotencyBegin::InFlight)
    }

    async fn idempotency_complete(
        &self,
        user_id: &str,
        key_: &str,
        claim: i64,
        answer: &StoredAnswer,
    ) -> Result<()> {
        // Only over this handler's own claim: without the condition, a handler whose claim was
        // taken over would overwrite the new claim's answer, or (the item gone) create one with
        // no fingerprint and no expiry that would answer `409` for good.
        match self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(user_pk(user_id), format!("IDEM#{key_}"))))
            .update_expression("SET status_code = :s, response_body = :b")
            .condition_expression("locked_ms = :c")
            .expression_attribute_values(":s", n(answer.code))
            .expression_attribute_values(":b", s(&answer.body))
            .expression_attribute_values(":c", n(claim))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conditional_failure(&e) => {
                tracing::warn!("an idempotency claim was taken over; its answer is not stored");
                Ok(())
            }
            Err(e) => Err(storage("complete idempotency key", e)),
        }
    }

    async fn idempotency_release(&self, user_id: &str, key_: &str, claim: i64) -> Result<()> {
        match self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key(user_pk(user_id), format!("IDEM#{key_}"))))
            .condition_expression("attribute_not_exists(status_code) AND locked_ms = :c")
            .expression_attribute_values(":c", n(claim))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conditional_failure(&e) => Ok(()),
            Err(e) => Err(storage("release idempotency key", e)),
        }
    }
}
