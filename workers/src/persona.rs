//! The persona job: turns a request's prompt into a persona record.
//!
//! The persona id is derived from the request id, and the settlement stores the persona only if
//! none with that id exists, so a redelivered message can never leave a twin.

use std::sync::Arc;

use async_trait::async_trait;
use shared::domain::{Persona, RequestInput, RequestKind, RequestRecord, RequestResult};
use shared::models::PersonaModel;
use shared::{Error, Result};

use crate::consumer::{Job, JobContext, JobOutput};

pub struct PersonaJob {
    pub model: Arc<dyn PersonaModel>,
}

#[async_trait]
impl Job for PersonaJob {
    fn kind(&self) -> RequestKind {
        RequestKind::Persona
    }

    async fn run(&self, request: &RequestRecord, _ctx: &JobContext) -> Result<JobOutput> {
        let RequestInput::Persona { prompt } = &request.input else {
            return Err(Error::ModelPermanent {
                code: "invalid_request".into(),
                message: "persona job got a request of another kind".into(),
            });
        };
        let out = self.model.create_persona(prompt).await?;
        out.value
            .validate()
            .map_err(|reason| Error::ModelPermanent {
                code: "invalid_model_output".into(),
                message: reason,
            })?;
        let persona = Persona::from_draft(
            request.request_id.persona_id(),
            out.value,
            out.model.clone(),
            prompt.clone(),
        );
        Ok(JobOutput {
            last_fragment: None,
            result: RequestResult::Persona(persona),
            usage: out.usage,
            model: out.model,
        })
    }
}
