//! Personas on DynamoDB: `USER#{user}` / `PERSONA#{persona_id}`, written only if absent. Editing
//! one replaces its conversations' snapshots; deleting one marks its conversations
//! (`persona_deleted` on their `META`): they take no new messages.

use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;

use super::{
    body, get_s, is_conditional_failure, key, mark_changed, s, storage, tombstone, user_pk,
    ChangeValues, DynamoStore, CHANGE_SET,
};
use crate::domain::{Conversation, Page, Persona, PersonaEdit};
use crate::ids::{ConversationId, PersonaId};
use crate::store::{ChangeKind, PersonaStore};
use crate::{Error, Result};

impl DynamoStore {
    /// Marks the user's conversations with a deleted persona, so that their next message is
    /// refused by the accept's own condition (no read on its hot path). A rare write, as
    /// long as the user's list of conversations: read in pages, a conversation at a time.
    async fn close_conversations_of(&self, user_id: &str, persona_id: &PersonaId) -> Result<()> {
        for id in self.conversations_of(user_id, persona_id).await? {
            self.client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(key(format!("CONV#{id}"), "META")))
                .update_expression("SET persona_deleted = :yes")
                .expression_attribute_values(":yes", AttributeValue::Bool(true))
                .send()
                .await
                .map_err(|e| storage("close a conversation", e))?;
        }
        Ok(())
    }

    /// The user's conversations with a persona, read from the table (not the index: a
    /// conversation made a moment ago is there too), a page at a time.
    async fn conversations_of(
        &self,
        user_id: &str,
        persona_id: &PersonaId,
    ) -> Result<Vec<ConversationId>> {
        let (mut ids, mut next) = (Vec::new(), None);
        loop {
            let page = self
                .page::<Conversation>(&user_pk(user_id), "CONV#", true, 100, next.as_deref())
                .await?;
            ids.extend(
                page.items
                    .into_iter()
                    .filter(|c| &c.persona_id == persona_id)
                    .map(|c| c.conversation_id),
            );
            match page.next_token {
                Some(token) => next = Some(token),
                None => return Ok(ids),
            }
        }
    }

    /// Gives the persona's conversations its edited self: their snapshots (what the model
    /// answers from) and the name they show (a change of the conversation's record, for the
    /// change feed). A conversation deleted meanwhile is skipped.
    async fn refresh_conversations_of(&self, user_id: &str, persona: &Persona) -> Result<()> {
        let snapshot = serde_json::to_string(persona)?;
        for id in self.conversations_of(user_id, &persona.persona_id).await? {
            let writes = [
                (
                    key(format!("CONV#{id}"), "PERSONA"),
                    "SET body = :v".to_owned(),
                    s(&snapshot),
                    false,
                ),
                (
                    key(user_pk(user_id), format!("CONV#{id}")),
                    format!("SET persona_name = :v, {CHANGE_SET}"),
                    s(&persona.name),
                    true,
                ),
            ];
            for (at, expression, value, changes) in writes {
                let update = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(at))
                    .update_expression(expression)
                    .condition_expression("attribute_exists(pk)")
                    .expression_attribute_values(":v", value);
                let update = if changes {
                    update.change_values(user_id)
                } else {
                    update
                };
                let out = update.send().await;
                match out {
                    Ok(_) => {}
                    Err(e) if is_conditional_failure(&e) => {}
                    Err(e) => return Err(storage("refresh a conversation's persona", e)),
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl PersonaStore for DynamoStore {
    async fn put_persona(&self, user_id: &str, persona: &Persona) -> Result<()> {
        let mut item = key(user_pk(user_id), format!("PERSONA#{}", persona.persona_id));
        item.insert("body".into(), s(serde_json::to_string(persona)?));
        mark_changed(&mut item, user_id);
        self.put_new(item).await.map(|_| ())
    }

    async fn get_persona(&self, user_id: &str, persona_id: &PersonaId) -> Result<Option<Persona>> {
        self.get(&user_pk(user_id), &format!("PERSONA#{persona_id}"))
            .await?
            .as_ref()
            .map(body)
            .transpose()
    }

    /// Read, changed, and written back on condition that the stored body is still the one
    /// read (an edit from another device meanwhile is not overwritten: this one is applied
    /// to it instead). Then its conversations, as after a delete: a retried edit refreshes
    /// what a failure half-way left.
    async fn edit_persona(
        &self,
        user_id: &str,
        persona_id: &PersonaId,
        edit: &PersonaEdit,
    ) -> Result<Persona> {
        let at = key(user_pk(user_id), format!("PERSONA#{persona_id}"));
        for _ in 0..5 {
            let Some(item) = self
                .get(&user_pk(user_id), &format!("PERSONA#{persona_id}"))
                .await?
            else {
                return Err(Error::NotFound);
            };
            let read = get_s(&item, "body").unwrap_or_default().to_owned();
            let mut persona: Persona = body(&item)?;
            edit.apply(&mut persona);
            let out = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(at.clone()))
                .update_expression(format!("SET body = :new, {CHANGE_SET}"))
                .condition_expression("body = :read")
                .expression_attribute_values(":new", s(serde_json::to_string(&persona)?))
                .expression_attribute_values(":read", s(read))
                .change_values(user_id)
                .send()
                .await;
            match out {
                Ok(_) => {
                    self.refresh_conversations_of(user_id, &persona).await?;
                    return Ok(persona);
                }
                Err(e) if is_conditional_failure(&e) => continue,
                Err(e) => return Err(storage("edit a persona", e)),
            }
        }
        Err(Error::Conflict(
            "the persona kept changing; try again".into(),
        ))
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

    /// The persona and its tombstone (for the change feed) in one transaction, on condition
    /// that the persona is there: a delete of none writes no tombstone.
    async fn delete_persona(&self, user_id: &str, persona_id: &PersonaId) -> Result<bool> {
        let at = key(user_pk(user_id), format!("PERSONA#{persona_id}"));
        let gone = tombstone(user_id, ChangeKind::Persona, persona_id.as_str(), None)?;
        let deleted = self
            .delete_with_tombstone(at, gone, "delete a persona")
            .await?;
        // Also when it was gone already: a delete retried after a failure half-way through
        // marks what the first left unmarked (marking is idempotent).
        self.close_conversations_of(user_id, persona_id).await?;
        Ok(deleted)
    }
}
