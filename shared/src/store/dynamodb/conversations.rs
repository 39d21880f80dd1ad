//! Conversations and messages on DynamoDB. A conversation's messages live in its own partition
//! (`CONV#{id}`): its persona snapshot (`PERSONA`, written with the conversation, as is the
//! persona's greeting, the reply of turn 0),
//! `MSG#{turn}#{sub}` items in order, a `MID#{message_id}` index item per user
//! message (id → turn) and a `META` turn counter (moved by a conditional update inside the
//! append's transaction, from the turn last seen).

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{
    ConditionCheck, Put, ReturnValue, ReturnValuesOnConditionCheckFailure, TransactWriteItem,
    Update,
};

use super::{
    body, get_n, get_s, is_conditional_failure, key, mark_changed, msg_sk, n, put_if_absent, s,
    storage, sync_stamp, tombstone, user_pk, Cancelled, ChangeValues, DynamoStore, Item,
    ACTIVITY_INDEX, CHANGE_SET,
};
use crate::domain::{
    snippet, Activity, Conversation, Memory, Message, Page, Persona, RequestRecord, Role,
    PREVIEW_MAX_CHARS,
};
use crate::ids::{ConversationId, MessageId, PersonaId, RequestId};
use crate::store::token;
use crate::store::{chat_context_in_reads, ChangeKind, ChatContext, ConversationStore, Edit, Turn};
use crate::{Error, Result};

/// The sort key of a conversation's persona snapshot, in the conversation's partition. It sorts
/// after every `MSG#` key, so one query, newest first, reads the snapshot and then the latest
/// messages: a chat job's whole context in one round trip.
const SNAPSHOT_SK: &str = "PERSONA";

/// The sort key of a conversation's memory (pinned facts, summary): between the messages and
/// the snapshot, so the chat context's one query reads it too.
const MEMORY_SK: &str = "NOTES";

/// A conversation's record from its item (`USER#{user}` / `CONV#{id}`): the body as created,
/// with what changed since in attributes of their own (`title`, `last_message_at`, `preview`:
/// written by updates that need not read the body). `last_message_at` is also the activity
/// index's sort key, and `persona_id` what a listing filters on.
pub(super) fn conversation_of(item: &Item) -> Result<Conversation> {
    let mut conversation: Conversation = body(item)?;
    if let Some(name) = get_s(item, "persona_name") {
        conversation.persona_name = name.to_owned();
    }
    for (field, name) in [
        (&mut conversation.title, "title"),
        (&mut conversation.last_message_at, "last_message_at"),
        (&mut conversation.preview, "preview"),
    ] {
        if let Some(value) = get_s(item, name) {
            *field = Some(value.to_owned());
        }
    }
    Ok(conversation)
}

/// How many index entries a filtered listing reads per query (it stops early at its page's
/// end); an unfiltered one reads one more than its page.
const LIST_READ: i32 = 100;
/// Most queries one filtered listing makes: a page of a persona with few conversations among
/// many ends there, short, with a token to go on from.
const LIST_QUERIES: usize = 5;

/// The token after `item` in the activity index: its table key and its index key.
fn activity_token(item: &Item) -> Option<String> {
    let raw = serde_json::json!({
        "pk": get_s(item, "pk")?,
        "sk": get_s(item, "sk")?,
        "at": get_s(item, "last_message_at")?,
    });
    Some(token::encode(&raw.to_string()))
}

fn activity_start(next_token: Option<&str>, pk: &str) -> Result<Option<Item>> {
    let Some(t) = next_token else { return Ok(None) };
    let bad = || Error::Invalid("next_token is not valid".into());
    let raw: serde_json::Value =
        serde_json::from_str(&token::decode(t).ok_or_else(bad)?).map_err(|_| bad())?;
    let field = |name: &str| raw[name].as_str().map(str::to_owned).ok_or_else(bad);
    if field("pk")? != pk {
        return Err(bad());
    }
    let mut start = key(pk, field("sk")?);
    start.insert("last_message_at".into(), s(field("at")?));
    Ok(Some(start))
}

/// A conversation's memory item, with its time beside the body (what a fold's condition reads).
fn memory_item(conversation_id: &ConversationId, memory: &Memory) -> Item {
    let mut item = key(format!("CONV#{conversation_id}"), MEMORY_SK);
    if let Some(at) = &memory.updated_at {
        item.insert("updated_at".into(), s(at));
    }
    item
}

/// What a rewind drops: per message, the keys of its items and its tombstone; and the
/// requests of its user messages.
struct Dropped {
    pk: String,
    user_id: String,
    conversation_id: ConversationId,
    messages: Vec<(Vec<Item>, Option<Item>)>,
    requests: Vec<RequestId>,
}

impl Dropped {
    fn new(user_id: &str, conversation_id: &ConversationId) -> Self {
        Dropped {
            pk: format!("CONV#{conversation_id}"),
            user_id: user_id.to_owned(),
            conversation_id: conversation_id.clone(),
            messages: Vec::new(),
            requests: Vec::new(),
        }
    }

    /// The message item of `sk` (and `more` items of the message), with its tombstone where
    /// its id is known.
    fn message(&mut self, sk: &str, id: Option<&MessageId>, more: Vec<Item>) -> Result<()> {
        let mut keys = more;
        keys.push(key(&self.pk, sk));
        let conversation = Some(&self.conversation_id);
        let gone = id
            .map(|id| {
                tombstone(
                    &self.user_id,
                    ChangeKind::Message,
                    id.as_str(),
                    conversation,
                )
            })
            .transpose()?;
        self.messages.push((keys, gone));
        Ok(())
    }

    /// A message item as read, with its index item and request if it is a user message.
    fn item(&mut self, item: &Item) -> Result<()> {
        let m: Message = body(item)?;
        let mut index = Vec::new();
        if m.role == Role::User {
            self.requests.extend(m.request_id.clone());
            index.push(key(&self.pk, format!("MID#{}", m.message_id)));
        }
        self.message(
            get_s(item, "sk").unwrap_or_default(),
            Some(&m.message_id),
            index,
        )
    }
}

/// The turn of a message's sort key (`MSG#{turn:012}#{sub}`).
fn sk_turn(sk: &str) -> Option<i64> {
    sk.strip_prefix("MSG#")?.split('#').next()?.parse().ok()
}

/// The transaction items that append a user message, and where its checks sit.
pub(crate) struct TurnItems {
    /// The ownership check, the turn counter's update, the message, its index.
    pub items: [TransactWriteItem; 4],
    pub turn: i64,
    /// This process's turn to append to the conversation, held until the transaction ended.
    pub _append: tokio::sync::OwnedMutexGuard<()>,
}

impl TurnItems {
    /// Where in `items` the ownership check sits: its failure means another user's (or no)
    /// conversation.
    pub const OWNER_AT: usize = 0;
    /// Where the counter's update sits: its failure means the turn taken was stale (another
    /// accept took it first), and the append is to be built again from the counter as the
    /// refusal returned it.
    pub const COUNTER_AT: usize = 1;
    /// Where the message's put sits: its slot taken means the turn was stale all the same
    /// (the counter's condition passed where another append's write landed in between; moto
    /// does not isolate concurrent transactions), so the append is built again from the
    /// counter as read.
    pub const MESSAGE_AT: usize = 2;

    /// Where to build the next try from, when a transaction holding these items was cancelled
    /// over the turn: its counter refused the turn (the refusal carries the counter), or
    /// another transaction on the counter was under way (DynamoDB cancels rather than waits).
    /// `None` when it was cancelled for another reason.
    pub(crate) fn retry_from(cancelled: &Cancelled) -> Option<LastTurn> {
        if cancelled.failed(Some(Self::COUNTER_AT)) {
            let counter = cancelled.1.get(Self::COUNTER_AT).cloned().flatten();
            return Some(LastTurn::Refused(counter));
        }
        (cancelled.conflicted() || cancelled.failed(Some(Self::MESSAGE_AT)))
            .then_some(LastTurn::Read)
    }
}

/// Where an append takes the conversation's last turn from.
pub(crate) enum LastTurn {
    /// As this process last saw it (read when it has not, or not lately).
    Remembered,
    /// From the table (another transaction on the counter was under way).
    Read,
    /// The counter as a refused transaction returned it (read when it returned none).
    Refused(Option<Item>),
}

/// How often an append is built again over a turn another accept took first.
pub(crate) const TURN_TRIES: u32 = 12;

/// The pause before try `attempt` (from 0) of an append: none for the first two (most
/// refusals are a remembered turn gone stale), then a random share of a window that doubles,
/// so that two processes appending to one conversation in step fall out of step.
pub(crate) async fn before_try(attempt: u32) {
    if attempt >= 2 {
        let window = 10u64 << attempt.min(6);
        tokio::time::sleep(std::time::Duration::from_millis(
            rand::random::<u64>() % window,
        ))
        .await;
    }
}
/// How long the last turn seen is trusted: a chat's quick follow-ups, likely through the same
/// instance, skip the read; a turn after a pause reads the counter instead of betting on a
/// guess that another instance may have moved (a stale guess costs a refused transaction).
const HEAD_FRESH: std::time::Duration = std::time::Duration::from_secs(30);

impl DynamoStore {
    /// The items that append a user message to a conversation as its next turn: a check that
    /// the conversation is the user's, the counter moved from the turn last seen (a
    /// conditional update: no turn number is ever taken twice, and none is lost to a write
    /// that fails), the message and its index. Written once for the store's own append and
    /// for the atomic accept, which adds its request and job to the same transaction.
    ///
    /// The turn last seen is remembered per conversation, so a conversation's next message
    /// costs no read before its transaction; a refused guess is corrected from the counter the
    /// refusal returns (see [`LastTurn`]).
    pub(crate) async fn user_message_items(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        message: &Message,
        from: LastTurn,
    ) -> Result<TurnItems> {
        let append = self.appends.lock(conversation_id).await;
        let conv_pk = format!("CONV#{conversation_id}");
        let remembered = match from {
            LastTurn::Remembered => self
                .heads
                .get(conversation_id)
                .filter(|(_, at)| at.elapsed() < HEAD_FRESH),
            LastTurn::Read | LastTurn::Refused(_) => None,
        };
        let last = match (remembered, from) {
            (Some((last, _)), _) => last,
            (None, LastTurn::Refused(Some(counter))) => {
                self.counter_of(user_id, conversation_id, Some(counter))
                    .await?
            }
            (None, _) => {
                let meta = self.get(&conv_pk, "META").await?;
                self.counter_of(user_id, conversation_id, meta).await?
            }
        };
        let turn = last + 1;
        // The message is the conversation's latest activity; the update's condition is the
        // check that the conversation is the user's.
        let owner = self.activity_item(user_id, conversation_id, &Activity::of(message), false)?;
        let counter = self.counter_item(&conv_pk, last)?;
        let mut msg = key(&conv_pk, msg_sk(turn, 0));
        msg.insert("body".into(), s(serde_json::to_string(message)?));
        mark_changed(&mut msg, user_id);
        let mut index = key(&conv_pk, format!("MID#{}", message.message_id));
        index.insert("turn".into(), n(turn));
        Ok(TurnItems {
            items: [
                owner,
                counter,
                put_if_absent(&self.table, msg)?,
                put_if_absent(&self.table, index)?,
            ],
            turn,
            _append: append,
        })
    }

    /// The update that makes `activity` a conversation's latest, on condition that the
    /// conversation is the user's (the item exists) and, if `forward_only`, that no later
    /// activity is recorded (a reply settled after the user's next message must not move it
    /// back). A refusal returns the item as it stands: absent means gone.
    pub(crate) fn activity_item(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        activity: &Activity,
        forward_only: bool,
    ) -> Result<TransactWriteItem> {
        let condition = if forward_only {
            "attribute_exists(pk) AND (attribute_not_exists(last_message_at) OR last_message_at <= :at)"
        } else {
            "attribute_exists(pk)"
        };
        let update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(
                user_pk(user_id),
                format!("CONV#{conversation_id}"),
            )))
            .condition_expression(condition)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .expression_attribute_values(":at", s(&activity.at))
            .expression_attribute_values(":preview", s(&activity.preview));
        let update = match &activity.title {
            Some(title) => update
                .update_expression(
                    "SET last_message_at = :at, preview = :preview, \
                     title = if_not_exists(title, :title)",
                )
                .expression_attribute_values(":title", s(title)),
            None => update.update_expression("SET last_message_at = :at, preview = :preview"),
        };
        Ok(TransactWriteItem::builder()
            .update(
                update
                    .build()
                    .map_err(|e| storage("build a transaction item", e))?,
            )
            .build())
    }

    /// Deletes every item of a conversation's partition (its messages, their index, its
    /// counter and snapshot), a page of keys at a time.
    async fn purge_partition(&self, conversation_id: &ConversationId) -> Result<()> {
        let pk = format!("CONV#{conversation_id}");
        let mut start = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", s(&pk))
                .projection_expression("pk, sk")
                .set_exclusive_start_key(start)
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| storage("read a conversation's items", e))?;
            self.delete_keys(&out.items.unwrap_or_default()).await?;
            start = out.last_evaluated_key;
            if start.is_none() {
                return Ok(());
            }
        }
    }

    /// The last turn a conversation's counter item (`META`) holds: 0 when it has none, and
    /// `PersonaDeleted` when the conversation is closed (once the conversation is known to be
    /// the user's: another user's answers `NotFound`, as the append's own check would).
    async fn counter_of(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        meta: Option<Item>,
    ) -> Result<i64> {
        if meta
            .as_ref()
            .is_some_and(|m| m.contains_key("persona_deleted"))
        {
            let owned = self
                .get(&user_pk(user_id), &format!("CONV#{conversation_id}"))
                .await?;
            return Err(if owned.is_some() {
                Error::PersonaDeleted
            } else {
                Error::NotFound
            });
        }
        Ok(meta.and_then(|m| get_n(&m, "turns")).unwrap_or(0))
    }

    /// The turn counter moved from `last` to the next turn, on condition that it still is at
    /// `last` (absent for a conversation's first message) and that the conversation's persona
    /// was not deleted (a refusal is read again, and then told apart).
    fn counter_item(&self, conv_pk: &str, last: i64) -> Result<TransactWriteItem> {
        let counter = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(conv_pk, "META")))
            .update_expression("SET turns = :turn")
            .expression_attribute_values(":turn", n(last + 1))
            // A refusal returns the counter: the next try needs no read.
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        let counter = if last == 0 {
            counter.condition_expression(
                "attribute_not_exists(turns) AND attribute_not_exists(persona_deleted)",
            )
        } else {
            counter
                .condition_expression("turns = :last AND attribute_not_exists(persona_deleted)")
                .expression_attribute_values(":last", n(last))
        };
        Ok(TransactWriteItem::builder()
            .update(
                counter
                    .build()
                    .map_err(|e| storage("build a transaction item", e))?,
            )
            .build())
    }

    /// A chat job's context in one query (see [`SNAPSHOT_SK`]): the snapshot, then messages
    /// newest first, skipping those of `message_id`'s turn and later ones (sent while this job
    /// waited: a page holds a few more than `limit` for them), the next `limit` being the
    /// history. `None` when the conversation has no snapshot (made before them, or absent):
    /// the caller reads the records one by one.
    async fn context_query(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        message_id: &MessageId,
        limit: usize,
    ) -> Result<Option<ChatContext>> {
        let pk = format!("CONV#{conversation_id}");
        let mut found: Option<(Conversation, Persona)> = None;
        let mut turn = self.turns.get(message_id);
        let mut history = Vec::new();
        let (mut start, mut cancelled) = (None, None);
        let mut memory = Memory::default();
        loop {
            let out = self.context_page(&pk, limit, start).await?;
            for item in out.items.unwrap_or_default() {
                let sk = get_s(&item, "sk").unwrap_or_default();
                if sk == SNAPSHOT_SK {
                    if get_s(&item, "user_id") != Some(user_id) {
                        return Ok(None);
                    }
                    let conversation = get_s(&item, "conversation").unwrap_or_default();
                    found = Some((serde_json::from_str(conversation)?, body(&item)?));
                    continue;
                }
                if found.is_none() {
                    return Ok(None);
                }
                if sk == MEMORY_SK {
                    memory = body(&item)?;
                    continue;
                }
                let Some(at) = sk_turn(sk) else { continue };
                let message: Message = body(&item)?;
                if message.message_id == *message_id {
                    cancelled = get_s(&item, "cancelled").map(RequestId::from);
                    if turn.is_none() {
                        self.turns.insert(message_id.clone(), at);
                        turn = Some(at);
                    }
                }
                if turn.is_some_and(|t| at < t) && history.len() < limit {
                    history.push(message);
                }
            }
            start = out.last_evaluated_key;
            if start.is_none() || history.len() >= limit {
                break;
            }
        }
        let Some((conversation, persona)) = found else {
            return Ok(None);
        };
        history.reverse();
        Ok(Some(ChatContext {
            conversation,
            persona: Some(persona),
            history,
            cancelled,
            memory,
        }))
    }

    /// One page of [`context_query`](Self::context_query): newest first, from the snapshot down
    /// through the messages.
    async fn context_page(
        &self,
        pk: &str,
        limit: usize,
        start: Option<Item>,
    ) -> Result<aws_sdk_dynamodb::operation::query::QueryOutput> {
        self.client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk AND sk BETWEEN :lo AND :hi")
            .expression_attribute_values(":pk", s(pk))
            .expression_attribute_values(":lo", s("MSG#"))
            .expression_attribute_values(":hi", s(SNAPSHOT_SK))
            .scan_index_forward(false)
            .limit(limit as i32 + 8)
            .set_exclusive_start_key(start)
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| storage("query chat context", e))
    }

    /// The turn whose reply is `reply_id` (stored or to come): its number and its items (the
    /// user message, the reply if stored). A turn this process has not seen is looked for in
    /// the conversation's messages, a page at a time: regenerations and selections are rare
    /// next to turns, so no index item is written per reply for them.
    async fn turn_items(
        &self,
        conversation_id: &ConversationId,
        reply_id: &MessageId,
    ) -> Result<Option<(i64, Item, Option<Item>)>> {
        let pk = format!("CONV#{conversation_id}");
        // A user message stored before it named its reply names the request that shares the
        // reply id's tail.
        let legacy = RequestId::from(format!(
            "req_{}",
            reply_id.as_str().trim_start_matches("msg_")
        ));
        let names = |m: &Message| match m.role {
            Role::Assistant => m.message_id == *reply_id,
            Role::User => {
                m.reply_id.as_ref() == Some(reply_id) || m.request_id.as_ref() == Some(&legacy)
            }
        };
        // Remembered by id alone: checked to be this conversation's turn for this reply.
        if let Some(turn) = self.turns.get(reply_id) {
            if let Some(found) = self.items_of_turn(&pk, turn).await? {
                let reply_names = found
                    .2
                    .as_ref()
                    .is_some_and(|r| body(r).is_ok_and(|m| names(&m)));
                if reply_names || body(&found.1).is_ok_and(|m| names(&m)) {
                    return Ok(Some(found));
                }
            }
        }
        let mut start = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk AND begins_with(sk, :msg)")
                .expression_attribute_values(":pk", s(&pk))
                .expression_attribute_values(":msg", s("MSG#"))
                .set_exclusive_start_key(start)
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| storage("look for a reply's turn", e))?;
            for item in out.items.unwrap_or_default() {
                let Some(turn) = sk_turn(get_s(&item, "sk").unwrap_or_default()) else {
                    continue;
                };
                let m: Message = body(&item)?;
                if names(&m) && turn > 0 {
                    self.turns.insert(reply_id.clone(), turn);
                    return self.items_of_turn(&pk, turn).await;
                }
            }
            start = out.last_evaluated_key;
            if start.is_none() {
                return Ok(None);
            }
        }
    }

    /// Every message item of a conversation, in order, read a page at a time (a rewind's
    /// rare read of the whole conversation).
    async fn message_items(&self, conversation_id: &ConversationId) -> Result<Vec<Item>> {
        let pk = format!("CONV#{conversation_id}");
        let (mut items, mut start) = (Vec::new(), None);
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk AND begins_with(sk, :msg)")
                .expression_attribute_values(":pk", s(&pk))
                .expression_attribute_values(":msg", s("MSG#"))
                .set_exclusive_start_key(start)
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| storage("read a conversation's messages", e))?;
            items.extend(out.items.unwrap_or_default());
            start = out.last_evaluated_key;
            if start.is_none() {
                return Ok(items);
            }
        }
    }

    /// Makes the message a rewind kept its conversation's latest (a conversation deleted
    /// meanwhile has nothing to move).
    async fn rewound_to(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        kept: &Message,
    ) -> Result<()> {
        let activity = Activity {
            at: crate::time::now_rfc3339(),
            preview: snippet(&kept.text, PREVIEW_MAX_CHARS),
            title: None,
        };
        self.move_activity(self.activity_item(user_id, conversation_id, &activity, false)?)
            .await
    }

    /// Writes a conversation's activity (`activity_item`); a conversation deleted meanwhile
    /// has nothing to move. Sent again while it conflicts with another transaction on the
    /// conversation's item (a memory fold's check, another activity move), a few times.
    async fn move_activity(&self, activity: TransactWriteItem) -> Result<()> {
        match self
            .transact(vec![activity], "move a conversation's activity")
            .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(cancelled)) => {
                tracing::debug!(reasons = ?cancelled.0, "a conversation is gone, or has newer activity");
                Ok(())
            }
            Err(Error::Conflict(_)) => {
                tracing::warn!("a conversation's activity kept conflicting; left as it was");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Writes `edit` over the user message of `item`; returns the message as edited.
    async fn edit_message(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        item: &Item,
        edit: &Edit,
    ) -> Result<Message> {
        let mut message: Message = body(item)?;
        edit.apply(&mut message)?;
        if edit.request_id.is_some() {
            let meta = self.get(&format!("CONV#{conversation_id}"), "META").await?;
            self.counter_of(user_id, conversation_id, meta).await?;
        }
        // Written over the item as read: its change stamp is replaced by a fresh one.
        let mut item = item.clone();
        mark_changed(&mut item, user_id);
        self.put_body(item, &message, "edit a message").await?;
        Ok(message)
    }

    /// `NotFound` unless the conversation is the user's.
    async fn owned(&self, user_id: &str, conversation_id: &ConversationId) -> Result<()> {
        match self.get_conversation(user_id, conversation_id).await? {
            Some(_) => Ok(()),
            None => Err(Error::NotFound),
        }
    }

    /// Writes `item` with `value` as its body, whatever was there.
    async fn put_body(
        &self,
        mut item: Item,
        value: &impl serde::Serialize,
        op: &str,
    ) -> Result<()> {
        item.insert("body".into(), s(serde_json::to_string(value)?));
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| storage(op, e))?;
        Ok(())
    }

    /// A turn's user message and reply (if stored); `None` without a user message.
    async fn items_of_turn(
        &self,
        pk: &str,
        turn: i64,
    ) -> Result<Option<(i64, Item, Option<Item>)>> {
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk AND begins_with(sk, :turn)")
            .expression_attribute_values(":pk", s(pk))
            .expression_attribute_values(":turn", s(format!("MSG#{turn:012}#")))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| storage("read a turn", e))?;
        let (mut asked, mut reply) = (None, None);
        for item in out.items.unwrap_or_default() {
            match get_s(&item, "sk") {
                Some(sk) if sk == msg_sk(turn, 0) => asked = Some(item),
                Some(sk) if sk == msg_sk(turn, 1) => reply = Some(item),
                _ => {}
            }
        }
        Ok(asked.map(|asked| (turn, asked, reply)))
    }

    /// Remembers the turn an append took, once its transaction committed.
    pub(crate) fn took_turn(
        &self,
        conversation_id: &ConversationId,
        message_id: &MessageId,
        turn: i64,
    ) {
        self.heads
            .insert(conversation_id.clone(), (turn, std::time::Instant::now()));
        self.turns.insert(message_id.clone(), turn);
    }

    /// The turn of a user message of the conversation (remembered once read: it never
    /// changes).
    pub(crate) async fn turn_of(
        &self,
        conversation_id: &ConversationId,
        message_id: &MessageId,
    ) -> Result<Option<i64>> {
        if let Some(turn) = self.turns.get(message_id) {
            return Ok(Some(turn));
        }
        let turn = self
            .get(
                &format!("CONV#{conversation_id}"),
                &format!("MID#{message_id}"),
            )
            .await?
            .and_then(|i| get_n(&i, "turn"));
        if let Some(turn) = turn {
            self.turns.insert(message_id.clone(), turn);
        }
        Ok(turn)
    }
}

#[async_trait]
impl ConversationStore for DynamoStore {
    async fn create_conversation(
        &self,
        user_id: &str,
        conversation: &Conversation,
        persona: &Persona,
        greeting: &Message,
    ) -> Result<()> {
        let conversation = &conversation.clone().begun_with(greeting);
        let conv_pk = format!("CONV#{}", conversation.conversation_id);
        // The reply of turn 0, which has no user message: the counter starts at 0 all the same.
        let mut first = key(&conv_pk, msg_sk(0, 1));
        first.insert("body".into(), s(serde_json::to_string(greeting)?));
        mark_changed(&mut first, user_id);
        let mut listed = key(user_pk(user_id), &conv_pk);
        listed.insert("body".into(), s(serde_json::to_string(conversation)?));
        mark_changed(&mut listed, user_id);
        let last = conversation.last_message_at.clone().unwrap_or_default();
        listed.insert("last_message_at".into(), s(last));
        listed.insert("persona_id".into(), s(persona.persona_id.as_str()));
        if let Some(title) = &conversation.title {
            listed.insert("title".into(), s(title));
        }
        let mut snapshot = key(&conv_pk, SNAPSHOT_SK);
        snapshot.insert("body".into(), s(serde_json::to_string(persona)?));
        snapshot.insert(
            "conversation".into(),
            s(serde_json::to_string(conversation)?),
        );
        snapshot.insert("user_id".into(), s(user_id));
        // Only while the persona is the user's: one deleted meanwhile is refused here, and one
        // deleted later finds this conversation to mark (see `PersonaStore::delete_persona`).
        let persona_lives = TransactWriteItem::builder()
            .condition_check(
                ConditionCheck::builder()
                    .table_name(&self.table)
                    .set_key(Some(key(
                        user_pk(user_id),
                        format!("PERSONA#{}", persona.persona_id),
                    )))
                    .condition_expression("attribute_exists(pk)")
                    .build()
                    .map_err(|e| storage("build a transaction item", e))?,
            )
            .build();
        let sent = self
            .client
            .transact_write_items()
            .transact_items(put_if_absent(&self.table, listed)?)
            .transact_items(put_if_absent(&self.table, snapshot)?)
            .transact_items(persona_lives)
            .transact_items(put_if_absent(&self.table, first)?)
            .send()
            .await;
        let Err(e) = sent else { return Ok(()) };
        let cancelled = Cancelled::of(e, "create conversation")?;
        Err(if cancelled.failed(Some(2)) {
            Error::NotFound
        } else {
            Error::Conflict(format!("conversation exists: {:?}", cancelled.0))
        })
    }

    async fn get_conversation(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
    ) -> Result<Option<Conversation>> {
        self.get(&user_pk(user_id), &format!("CONV#{conversation_id}"))
            .await?
            .as_ref()
            .map(conversation_of)
            .transpose()
    }

    /// From the activity index, newest first (eventually consistent, as every index read:
    /// a conversation appears there a moment after its write). A persona filter applies after
    /// the read, so a page is filled from as many reads as it takes, and its token continues
    /// from its last conversation.
    async fn list_conversations(
        &self,
        user_id: &str,
        persona_id: Option<&PersonaId>,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Conversation>> {
        let pk = user_pk(user_id);
        let mut start = activity_start(next_token, &pk)?;
        let mut items = Vec::new();
        let read_each = match persona_id {
            Some(_) => LIST_READ,
            None => (limit as i32).saturating_add(1).min(LIST_READ),
        };
        for queries in 1.. {
            let mut query = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(ACTIVITY_INDEX)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", s(&pk))
                .scan_index_forward(false)
                .limit(read_each)
                .set_exclusive_start_key(start);
            if let Some(persona_id) = persona_id {
                query = query
                    .filter_expression("persona_id = :persona")
                    .expression_attribute_values(":persona", s(persona_id.as_str()));
            }
            let out = query
                .send()
                .await
                .map_err(|e| storage("list conversations", e))?;
            let read = out.items.unwrap_or_default();
            let more = out.last_evaluated_key.is_some();
            for (i, item) in read.iter().enumerate() {
                items.push(conversation_of(item)?);
                if items.len() == limit {
                    let rest = i + 1 < read.len() || more;
                    return Ok(Page {
                        items,
                        next_token: if rest { activity_token(item) } else { None },
                    });
                }
            }
            start = out.last_evaluated_key;
            match &start {
                None => break,
                Some(last) if queries >= LIST_QUERIES => {
                    return Ok(Page {
                        items,
                        next_token: activity_token(last),
                    });
                }
                Some(_) => {}
            }
        }
        Ok(Page {
            items,
            next_token: None,
        })
    }

    async fn rename_conversation(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        title: &str,
    ) -> Result<Conversation> {
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(
                user_pk(user_id),
                format!("CONV#{conversation_id}"),
            )))
            .update_expression(format!("SET title = :title, {CHANGE_SET}"))
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":title", s(title))
            .change_values(user_id)
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match out {
            Ok(out) => conversation_of(&out.attributes.unwrap_or_default()),
            Err(e) if is_conditional_failure(&e) => Err(Error::NotFound),
            Err(e) => Err(storage("rename a conversation", e)),
        }
    }

    /// The record first (the conversation is gone for its user, and its next message or
    /// job finds it gone), then its partition. A crash between the two leaves items no
    /// record leads to; a retried delete answers `NotFound` and leaves them: noted in
    /// docs/architecture.md.
    async fn delete_conversation(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
    ) -> Result<()> {
        // With its tombstone, for the change feed (one for the conversation: its messages
        // go with it).
        let at = key(user_pk(user_id), format!("CONV#{conversation_id}"));
        let gone = tombstone(
            user_id,
            ChangeKind::Conversation,
            conversation_id.as_str(),
            None,
        )?;
        if !self
            .delete_with_tombstone(at, gone, "delete a conversation")
            .await?
        {
            return Err(Error::NotFound);
        }
        self.purge_partition(conversation_id).await
    }

    async fn add_user_message(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        message: &Message,
        request: &RequestRecord,
    ) -> Result<()> {
        let mut from = LastTurn::Remembered;
        for attempt in 0..TURN_TRIES {
            before_try(attempt).await;
            let TurnItems {
                items,
                turn,
                _append,
            } = self
                .user_message_items(user_id, conversation_id, message, from)
                .await?;
            let sent = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items.into()))
                .transact_items(put_if_absent(
                    &self.table,
                    Self::request_item(user_id, request, 1)?,
                )?)
                .send()
                .await;
            let Err(e) = sent else {
                self.took_turn(conversation_id, &message.message_id, turn);
                return Ok(());
            };
            let cancelled = Cancelled::of(e, "add message")?;
            if cancelled.failed(Some(TurnItems::OWNER_AT)) {
                return Err(Error::NotFound);
            }
            from = TurnItems::retry_from(&cancelled).ok_or_else(|| {
                Error::storage_msg(format!("add message: cancelled: {:?}", cancelled.0))
            })?;
        }
        Err(Error::Conflict(
            "the conversation's turns kept moving; try again".into(),
        ))
    }

    async fn put_reply(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        reply_to: &MessageId,
        reply: &Message,
    ) -> Result<Message> {
        let turn = self
            .turn_of(conversation_id, reply_to)
            .await?
            .ok_or(Error::NotFound)?;
        let (pk, sk) = (format!("CONV#{conversation_id}"), msg_sk(turn, 1));
        let mut item = key(&pk, &sk);
        item.insert("body".into(), s(serde_json::to_string(reply)?));
        mark_changed(&mut item, user_id);
        if self.put_new(item).await? {
            let activity =
                self.activity_item(user_id, conversation_id, &Activity::of(reply), true)?;
            // Gone meanwhile: the reply is stored all the same, and nothing to move.
            self.move_activity(activity).await?;
            return Ok(reply.clone());
        }
        // A twin delivery wrote first: its reply stands.
        self.get(&pk, &sk)
            .await?
            .as_ref()
            .map(body)
            .transpose()?
            .ok_or(Error::NotFound)
    }

    async fn get_reply(
        &self,
        conversation_id: &ConversationId,
        reply_to: &MessageId,
    ) -> Result<Option<Message>> {
        let Some(turn) = self.turn_of(conversation_id, reply_to).await? else {
            return Ok(None);
        };
        self.get(&format!("CONV#{conversation_id}"), &msg_sk(turn, 1))
            .await?
            .as_ref()
            .map(body)
            .transpose()
    }

    async fn reply_turn(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        reply_id: &MessageId,
    ) -> Result<Turn> {
        self.owned(user_id, conversation_id).await?;
        let meta = self.get(&format!("CONV#{conversation_id}"), "META").await?;
        self.counter_of(user_id, conversation_id, meta).await?;
        let (turn, asked, reply) = self
            .turn_items(conversation_id, reply_id)
            .await?
            .ok_or(Error::NotFound)?;
        Ok(Turn {
            turn,
            asked: body(&asked)?,
            reply: reply.as_ref().map(body).transpose()?,
        })
    }

    async fn answer_with(
        &self,
        conversation_id: &ConversationId,
        turn: &Turn,
        request_id: &RequestId,
    ) -> Result<()> {
        let asked = Message {
            request_id: Some(request_id.clone()),
            ..turn.asked.clone()
        };
        // Still naming the request it named when read (its id is quoted in the body).
        let (condition, was) = match &turn.asked.request_id {
            Some(was) => (
                "attribute_exists(pk) AND contains(body, :was)",
                format!("\"{was}\""),
            ),
            None => (
                "attribute_exists(pk) AND NOT contains(body, :was)",
                "\"request_id\"".to_owned(),
            ),
        };
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(
                format!("CONV#{conversation_id}"),
                msg_sk(turn.turn, 0),
            )))
            // The owner is not known here: a message written since the feed carries its
            // `sync_user` already, and moves in the feed; an older one stays out of it.
            .update_expression("SET body = :body, sync_at = :sync_at")
            .condition_expression(condition)
            .expression_attribute_values(":body", s(serde_json::to_string(&asked)?))
            .expression_attribute_values(":was", s(was))
            .expression_attribute_values(":sync_at", s(sync_stamp()))
            .send()
            .await;
        match out {
            Ok(_) => Ok(()),
            Err(e) if is_conditional_failure(&e) => {
                Err(Error::Conflict("the turn moved on meanwhile".into()))
            }
            Err(e) => Err(storage("point a turn at its request", e)),
        }
    }

    /// Read, changed and written back on condition that the reply is as read (a version
    /// added meanwhile is kept: the selection is made again over it).
    async fn select_version(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        reply_id: &MessageId,
        variant_id: &str,
    ) -> Result<Message> {
        self.owned(user_id, conversation_id).await?;
        for _ in 0..5 {
            let (turn, _, stored) = self
                .turn_items(conversation_id, reply_id)
                .await?
                .ok_or(Error::NotFound)?;
            let stored = stored.ok_or(Error::NotFound)?;
            let read = get_s(&stored, "body").unwrap_or_default().to_owned();
            let mut reply: Message = body(&stored)?;
            if !reply.select(variant_id) {
                return Err(Error::NotFound);
            }
            let out = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(key(
                    format!("CONV#{conversation_id}"),
                    msg_sk(turn, 1),
                )))
                .update_expression(format!("SET body = :new, {CHANGE_SET}"))
                .condition_expression("body = :read")
                .expression_attribute_values(":new", s(serde_json::to_string(&reply)?))
                .expression_attribute_values(":read", s(read))
                .change_values(user_id)
                .send()
                .await;
            match out {
                Ok(_) => return Ok(reply),
                Err(e) if is_conditional_failure(&e) => continue,
                Err(e) => return Err(storage("select a version", e)),
            }
        }
        Err(Error::Conflict("the reply kept changing; try again".into()))
    }

    /// The edited message first (so a retry after a failure half-way finds the edit made and
    /// drops the rest), then the later items, a batch at a time, with the index items of the
    /// user messages dropped. Each dropped message goes in one transaction with its tombstone
    /// (for the change feed): a rewind that fails half-way leaves no live message reported
    /// deleted, and its retry finds only what is left to drop.
    async fn rewind(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        after: &MessageId,
        edit: Option<&Edit>,
    ) -> Result<(Message, Vec<RequestId>)> {
        self.owned(user_id, conversation_id).await?;
        let items = self.message_items(conversation_id).await?;
        let at = items
            .iter()
            .position(|i| body::<Message>(i).is_ok_and(|m| m.message_id == *after))
            .ok_or(Error::NotFound)?;
        let mut kept: Message = body(&items[at])?;
        let mut dropped = Dropped::new(user_id, conversation_id);
        // Rewound to a user message: its reply goes too, and it stays unanswered.
        let unanswered =
            (edit.is_none() && kept.role == Role::User).then(|| Edit::unanswered(&kept));
        if let Some(edit) = edit.or(unanswered.as_ref()) {
            dropped.requests.extend(kept.request_id.clone());
            // The reply's id, as the message named it before the edit.
            let reply_id = (kept.reply_id.clone())
                .or_else(|| kept.request_id.as_ref().map(RequestId::reply_id));
            kept = self
                .edit_message(user_id, conversation_id, &items[at], edit)
                .await?;
            // Its reply, also one written since the read above.
            let reply = sk_turn(get_s(&items[at], "sk").unwrap_or_default()).map(|t| msg_sk(t, 1));
            let listed = items
                .get(at + 1)
                .and_then(|i| get_s(i, "sk"))
                .map(str::to_owned);
            if let Some(reply) = reply.filter(|r| Some(r) != listed.as_ref()) {
                dropped.message(&reply, reply_id.as_ref(), Vec::new())?;
            }
        }
        for item in &items[at + 1..] {
            dropped.item(item)?;
        }
        self.delete_with_tombstones(dropped.messages, "rewind a conversation")
            .await?;
        self.rewound_to(user_id, conversation_id, &kept).await?;
        Ok((kept, dropped.requests))
    }

    async fn get_memory(&self, user_id: &str, conversation_id: &ConversationId) -> Result<Memory> {
        self.owned(user_id, conversation_id).await?;
        Ok(self
            .get(&format!("CONV#{conversation_id}"), MEMORY_SK)
            .await?
            .as_ref()
            .map(body)
            .transpose()?
            .unwrap_or_default())
    }

    async fn put_memory(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        memory: &Memory,
    ) -> Result<Memory> {
        self.owned(user_id, conversation_id).await?;
        let memory = memory.written_now();
        self.put_body(
            memory_item(conversation_id, &memory),
            &memory,
            "write a conversation's memory",
        )
        .await?;
        Ok(memory)
    }

    async fn replace_memory(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        read: &Memory,
        memory: &Memory,
    ) -> Result<bool> {
        let memory = memory.written_now();
        let mut item = memory_item(conversation_id, &memory);
        item.insert("body".into(), s(serde_json::to_string(&memory)?));
        let put = Put::builder().table_name(&self.table).set_item(Some(item));
        // A memory written before its time was kept beside the body has none: it counts as
        // unchanged (only the memory job's fold relies on this, and a fold lost to such a
        // race is queued again by the next turn).
        let put = match &read.updated_at {
            Some(at) => put
                .condition_expression("attribute_not_exists(updated_at) OR updated_at = :at")
                .expression_attribute_values(":at", s(at)),
            None => put.condition_expression("attribute_not_exists(updated_at)"),
        };
        let put = put
            .build()
            .map_err(|e| storage("build a transaction item", e))?;
        // In one transaction with the check that the conversation is still the user's: a
        // fold that raced the conversation's delete would otherwise leave a memory item that
        // no record leads to (the delete purges the partition after removing the record).
        let conversation_lives = ConditionCheck::builder()
            .table_name(&self.table)
            .set_key(Some(key(
                user_pk(user_id),
                format!("CONV#{conversation_id}"),
            )))
            .condition_expression("attribute_exists(pk)")
            .build()
            .map_err(|e| storage("build a transaction item", e))?;
        let sent = self
            .client
            .transact_write_items()
            .transact_items(
                TransactWriteItem::builder()
                    .condition_check(conversation_lives)
                    .build(),
            )
            .transact_items(TransactWriteItem::builder().put(put).build())
            .send()
            .await;
        let Err(e) = sent else { return Ok(true) };
        let cancelled = Cancelled::of(e, "fold a conversation's memory")?;
        if cancelled.failed(Some(0)) {
            return Err(Error::NotFound);
        }
        if cancelled.failed(Some(1)) || cancelled.conflicted() {
            // Changed meanwhile: the next turn queues the fold again.
            return Ok(false);
        }
        Err(Error::storage_msg(format!(
            "fold a conversation's memory: cancelled: {:?}",
            cancelled.0
        )))
    }

    async fn page_messages(
        &self,
        conversation_id: &ConversationId,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Message>> {
        self.page(
            &format!("CONV#{conversation_id}"),
            "MSG#",
            true,
            limit,
            next_token,
        )
        .await
    }

    async fn history_before(
        &self,
        conversation_id: &ConversationId,
        message_id: &MessageId,
        limit: usize,
    ) -> Result<Vec<Message>> {
        let Some(turn) = self.turn_of(conversation_id, message_id).await? else {
            return Ok(Vec::new());
        };
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk AND sk BETWEEN :lo AND :hi")
            .expression_attribute_values(":pk", s(format!("CONV#{conversation_id}")))
            .expression_attribute_values(":lo", s("MSG#"))
            // Sorts before every sub of `turn`: "MSG#{turn}#" < "MSG#{turn}#0".
            .expression_attribute_values(":hi", s(format!("MSG#{turn:012}#")))
            .scan_index_forward(false)
            .limit(limit as i32)
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| storage("query history", e))?;
        let mut messages = out
            .items
            .unwrap_or_default()
            .iter()
            .map(body)
            .collect::<Result<Vec<Message>>>()?;
        messages.reverse();
        Ok(messages)
    }

    async fn chat_context(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        message_id: &MessageId,
        history_limit: usize,
    ) -> Result<Option<ChatContext>> {
        match self
            .context_query(user_id, conversation_id, message_id, history_limit)
            .await?
        {
            Some(context) => Ok(Some(context)),
            // Made before snapshots (or gone): the records one by one.
            None => {
                chat_context_in_reads(self, user_id, conversation_id, message_id, history_limit)
                    .await
            }
        }
    }
}
