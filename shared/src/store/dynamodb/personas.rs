//! Personas on DynamoDB: `USER#{user}` / `PERSONA#{persona_id}`, written only if absent.

use async_trait::async_trait;
use aws_sdk_dynamodb::types::ReturnValue;

use super::{body, key, s, storage, user_pk, DynamoStore};
use crate::domain::{Page, Persona};
use crate::ids::PersonaId;
use crate::store::PersonaStore;
use crate::Result;

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
        Ok(out.attributes.is_some_and(|a| !a.is_empty()))
    }
}
