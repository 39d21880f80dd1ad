//! Personas in SQLite: one row per persona, keyed by user and id.

use async_trait::async_trait;
use deadpool_sqlite::rusqlite::{params, Connection};

use super::{body_in, one_body, page_by_id, to_json, SqliteStore};
use crate::domain::{Page, Persona, PersonaEdit};
use crate::ids::PersonaId;
use crate::store::PersonaStore;
use crate::{Error, Result};

/// A user's persona by id (read by the chat context too).
pub(super) const PERSONA_BY_ID: &str =
    "SELECT body FROM personas WHERE user_id = ?1 AND persona_id = ?2";

/// Stores a persona unless one with its id exists; returns the one that stands.
pub(crate) fn put_persona_in(c: &Connection, user_id: &str, persona: &Persona) -> Result<Persona> {
    let inserted = c
        .prepare_cached(
            "INSERT OR IGNORE INTO personas (user_id, persona_id, body) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![user_id, persona.persona_id, to_json(persona)?])?;
    if inserted == 1 {
        return Ok(persona.clone());
    }
    // The insert was ignored, so the row is there: inside this write nothing can delete it.
    body_in(c, PERSONA_BY_ID, user_id, &persona.persona_id)?
        .ok_or_else(|| Error::storage_msg("the persona that stands vanished"))
}

#[async_trait]
impl PersonaStore for SqliteStore {
    async fn put_persona(&self, user_id: &str, persona: &Persona) -> Result<()> {
        let (user_id, persona) = (user_id.to_owned(), persona.clone());
        self.db
            .write(move |c| put_persona_in(c, &user_id, &persona).map(|_| ()))
            .await
    }

    async fn get_persona(&self, user_id: &str, persona_id: &PersonaId) -> Result<Option<Persona>> {
        one_body(&self.db, PERSONA_BY_ID, user_id, persona_id).await
    }

    async fn edit_persona(
        &self,
        user_id: &str,
        persona_id: &PersonaId,
        edit: &PersonaEdit,
    ) -> Result<Persona> {
        let (user_id, id, edit) = (user_id.to_owned(), persona_id.clone(), edit.clone());
        self.db
            .write(move |c| {
                let mut persona: Persona =
                    body_in(c, PERSONA_BY_ID, &user_id, &id)?.ok_or(Error::NotFound)?;
                edit.apply(&mut persona);
                let body = to_json(&persona)?;
                c.execute(
                    "UPDATE personas SET body = ?3 WHERE user_id = ?1 AND persona_id = ?2",
                    params![user_id, id, body],
                )?;
                c.execute(
                    "UPDATE conversations
                     SET persona = ?3, body = json_set(body, '$.persona_name', ?4)
                     WHERE user_id = ?1 AND json_extract(body, '$.persona_id') = ?2",
                    params![user_id, id, body, persona.name],
                )?;
                Ok(persona)
            })
            .await
    }

    async fn list_personas(
        &self,
        user_id: &str,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Persona>> {
        page_by_id(
            &self.db,
            "personas",
            "persona_id",
            user_id,
            limit,
            next_token,
        )
        .await
    }

    async fn delete_persona(&self, user_id: &str, persona_id: &PersonaId) -> Result<bool> {
        let (user_id, id) = (user_id.to_owned(), persona_id.to_owned());
        self.db
            .write(move |tx| {
                Ok(tx.execute(
                    "DELETE FROM personas WHERE user_id = ?1 AND persona_id = ?2",
                    params![user_id, id],
                )? > 0)
            })
            .await
    }
}
