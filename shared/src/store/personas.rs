//! The personas port: a user's generated characters. Its own trait so that code which only
//! reads or lists personas names no more of the store than that.

use async_trait::async_trait;

use crate::domain::{Page, Persona, PersonaEdit};
use crate::ids::PersonaId;
use crate::Result;

#[async_trait]
pub trait PersonaStore: Send + Sync + 'static {
    /// Stores a persona once; a second put with the same id keeps the first.
    async fn put_persona(&self, user_id: &str, persona: &Persona) -> Result<()>;
    async fn get_persona(&self, user_id: &str, persona_id: &PersonaId) -> Result<Option<Persona>>;
    /// Newest first.
    async fn list_personas(
        &self,
        user_id: &str,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Persona>>;
    /// Changes a persona as `edit` says and returns it; `NotFound` when it is not the user's.
    /// Its conversations answer from the edited persona from their next message on (their
    /// snapshots are replaced: see `ConversationStore`).
    async fn edit_persona(
        &self,
        user_id: &str,
        persona_id: &PersonaId,
        edit: &PersonaEdit,
    ) -> Result<Persona>;
    /// Returns whether something was deleted.
    async fn delete_persona(&self, user_id: &str, persona_id: &PersonaId) -> Result<bool>;
}
