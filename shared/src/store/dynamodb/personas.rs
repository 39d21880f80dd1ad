//! Personas on DynamoDB: `USER#{user}` / `PERSONA#{persona_id}`, written only if absent. Deleting
//! one marks its conversations (`persona_deleted` on their `META`): they take no new messages.

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};

use super::{body, key, s, storage, user_pk, DynamoStore};
use crate::domain::{Conversation, Page, Persona};
use crate::ids::PersonaId;
use crate::store::PersonaStore;
use crate::Result;

impl DynamoStore {
    /// Marks the user's conversations with a deleted persona, so that their next message is
    /// refused by the accept's own condition (no read on its hot path). A rare write, as
    /// long as the user's list of conversations: read in pages, a conversation at a time.
    async fn close_conversations_of(&self, user_id: &str, persona_id: &PersonaId) -> Result<()> {
        let mut next = None;
        loop {
            let page = self
                .page::<Conversation>(&user_pk(user_id), "CONV#", true, 100, next.as_deref())
                .await?;
            for c in page.items.iter().filter(|c| &c.persona_id == persona_id) {
                self.client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(key(format!("CONV#{}", c.conversation_id), "META")))
                    .update_expression("SET persona_deleted = :yes")
                    .expression_attribute_values(":yes", AttributeValue::Bool(true))
                    .send()
                    .await
                    .map_err(|e| storage("close a conversation", e))?;
            }
            match page.next_token {
                Some(token) => next = Some(token),
                None => return Ok(()),
            }
        }
    }
}

#[async_trait]
impl PersonaStore for DynamoStore {
    async fn put_persona(&self, user_id: &str, persona: &Persona) -> Result<()> {
        let mut item = key(user_pk(user_id), format!("PERSONA#{}", persona.persona_id));
        item.insert("body".into(), s(serde_json::to_string(persona)?));
        self.put_new(item).await.map(|_| ())
    }

    async fn get_persona(&self, user_id: &str, persona_id: &PersonaId) -> Result<Option<Persona>> {
        self.get(&user_pk(user_id), &format!("PERSONA#{persona_id}"))
            .await?
            .as_ref()
            .map(body)
            .transpose()
    }

    async fn list_personas(
        &self,
        user_id: &str,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Persona>> {
        self.page(&user_pk(user_id), "PERSONA#", false, limit, next_token)
            .await
    }

    async fn delete_persona(&self, user_id: &str, persona_id: &PersonaId) -> Result<bool> {
        let out = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key(user_pk(user_id), format!("PERSONA#{persona_id}"))))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| storage("delete", e))?;
        let deleted = out.attributes.is_some_and(|a| !a.is_empty());
        // Also when it was gone already: a delete retried after a failure half-way through
        // marks what the first left unmarked (marking is idempotent).
        self.close_conversations_of(user_id, persona_id).await?;
        Ok(deleted)
    }
}
