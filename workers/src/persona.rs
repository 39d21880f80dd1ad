//! The persona job: turns a request's prompt into a persona record.
//!
//! The persona id is derived from the request id, so a redelivered message finds the persona it
//! already made instead of paying for a second model call and storing a twin.

use std::sync::Arc;

use async_trait::async_trait;
use shared::domain::{Persona, RequestInput, RequestKind, RequestRecord, RequestResult};
use shared::models::PersonaModel;
use shared::store::Store;
use shared::{Error, Result};

use crate::consumer::{Job, JobContext, JobOutput};

pub struct PersonaJob {
    pub store: Arc<dyn Store>,
    pub model: Arc<dyn PersonaModel>,
}

/// The id of the persona a request makes.
pub fn persona_id_for(request_id: &str) -> String {
    format!("per_{}", request_id.trim_start_matches("req_"))
}

#[async_trait]
impl Job for PersonaJob {
    fn kind(&self) -> RequestKind {
        RequestKind::Persona
    }

    async fn run(&self, request: &RequestRecord, ctx: &JobContext) -> Result<JobOutput> {
        let RequestInput::Persona { prompt } = &request.input else {
            return Err(Error::ModelPermanent {
                code: "invalid_request".into(),
                message: "persona job got a request of another kind".into(),
            });
        };
        let persona_id = persona_id_for(&request.request_id);
        if let Some(existing) = self.store.get_persona(&ctx.user_id, &persona_id).await? {
            return Ok(JobOutput::replayed(RequestResult::Persona(existing)));
        }
        let out = self.model.create_persona(prompt).await?;
        out.value
            .validate()
            .map_err(|reason| Error::ModelPermanent {
                code: "invalid_model_output".into(),
                message: reason,
            })?;
        let persona = Persona::from_draft(
            persona_id.clone(),
            out.value,
            out.model.clone(),
            prompt.clone(),
        );
        self.store.put_persona(&ctx.user_id, &persona).await?;
        // Read back: if a twin delivery stored first, its persona is the one that stands.
        let stored = self
            .store
            .get_persona(&ctx.user_id, &persona_id)
            .await?
            .unwrap_or(persona);
        Ok(JobOutput {
            result: RequestResult::Persona(stored),
            usage: out.usage,
            model: out.model,
        })
    }
}
