//! Conversations and messages on DynamoDB. A conversation's messages live in its own partition
//! (`CONV#{id}`): `MSG#{turn}#{sub}` items in order, a `MID#{message_id}` index item per user
//! message (id → turn) and a `META` turn counter.

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{ConditionCheck, ReturnValue, TransactWriteItem};

use super::{
    body, get_n, key, msg_sk, n, put_if_absent, s, storage, user_pk, Cancelled, DynamoStore,
};
use crate::domain::{Conversation, Message, Page, RequestRecord};
use crate::ids::{ConversationId, MessageId};
use crate::store::{chat_context_in_reads, ChatContext, ConversationStore};
use crate::{Error, Result};

impl DynamoStore {
    /// The items that append a user message to a conversation as its next turn, led by a
    /// check that the conversation is the user's: a cancelled transaction whose first reason
    /// is a failed condition means another user's conversation. Written once for the store's
    /// own append and for the atomic accept, which adds its request and job to the same
    /// transaction.
    pub(crate) async fn user_message_items(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        message: &Message,
    ) -> Result<[TransactWriteItem; 3]> {
        // A cheap early "no" for another user's conversation (the transaction checks again),
        // before a turn number is taken.
        if self
            .get_conversation(user_id, conversation_id)
            .await?
            .is_none()
        {
            return Err(Error::NotFound);
        }
        let conv_pk = format!("CONV#{conversation_id}");
        let turn = self.next_turn(&conv_pk).await?;
        let owner = TransactWriteItem::builder()
            .condition_check(
                ConditionCheck::builder()
                    .table_name(&self.table)
                    .set_key(Some(key(
                        user_pk(user_id),
                        format!("CONV#{conversation_id}"),
                    )))
                    .condition_expression("attribute_exists(pk)")
                    .build()
                    .map_err(|e| storage("build a transaction item", e))?,
            )
            .build();
        let mut msg = key(&conv_pk, msg_sk(turn, 0));
        msg.insert("body".into(), s(serde_json::to_string(message)?));
        let mut index = key(&conv_pk, format!("MID#{}", message.message_id));
        index.insert("turn".into(), n(turn));
        Ok([
            owner,
            put_if_absent(&self.table, msg)?,
            put_if_absent(&self.table, index)?,
        ])
    }

    /// Takes the next turn number of the conversation whose partition is `conv_pk` (an atomic
    /// counter; a number taken by a write that then fails is skipped, which only leaves a gap
    /// in the sort keys).
    pub(crate) async fn next_turn(&self, conv_pk: &str) -> Result<i64> {
        let turns = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(conv_pk, "META")))
            .update_expression("ADD turns :one")
            .expression_attribute_values(":one", n(1))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await
            .map_err(|e| storage("count turn", e))?;
        turns
            .attributes
            .as_ref()
            .and_then(|a| get_n(a, "turns"))
            .ok_or_else(|| Error::storage_msg("turn counter missing"))
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
    async fn create_conversation(&self, user_id: &str, conversation: &Conversation) -> Result<()> {
        let mut item = key(
            user_pk(user_id),
            format!("CONV#{}", conversation.conversation_id),
        );
        item.insert("body".into(), s(serde_json::to_string(conversation)?));
        if self.put_new(item).await? {
            Ok(())
        } else {
            Err(Error::Conflict("conversation exists".into()))
        }
    }

    async fn get_conversation(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
    ) -> Result<Option<Conversation>> {
        self.get(&user_pk(user_id), &format!("CONV#{conversation_id}"))
            .await?
            .as_ref()
            .map(body)
            .transpose()
    }

    async fn list_conversations(
        &self,
        user_id: &str,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Conversation>> {
        self.page(&user_pk(user_id), "CONV#", false, limit, next_token)
            .await
    }

    async fn add_user_message(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        message: &Message,
        request: &RequestRecord,
    ) -> Result<()> {
        let [owner, msg, index] = self
            .user_message_items(user_id, conversation_id, message)
            .await?;
        let sent = self
            .client
            .transact_write_items()
            .transact_items(owner)
            .transact_items(msg)
            .transact_items(index)
            .transact_items(put_if_absent(
                &self.table,
                Self::request_item(user_id, request, 1)?,
            )?)
            .send()
            .await;
        if let Err(e) = sent {
            // The owner check leads the transaction (see `user_message_items`).
            let cancelled = Cancelled::of(e, "add message")?;
            return Err(if cancelled.failed(Some(0)) {
                Error::NotFound
            } else {
                Error::storage_msg(format!("add message: cancelled: {:?}", cancelled.0))
            });
        }
        Ok(())
    }

    async fn put_reply(
        &self,
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
        if self.put_new(item).await? {
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
        // The three records live in different partitions: no one read fetches them together.
        chat_context_in_reads(self, user_id, conversation_id, message_id, history_limit).await
    }
}
