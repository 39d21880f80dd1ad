//! The ports of one backend, together: built once at start-up by the binary (the only place
//! that chooses adapters) and handed whole to the API and the workers, which know only the
//! traits. The API holds the models too but never calls them (nothing in `ingest-api` names
//! them); building a model makes no call, so an API process needs none of a model's
//! credentials (on AWS only the persona workers are given the OpenAI key).

use std::sync::Arc;

use crate::atomic::Atomic;
use crate::auth::{IdentityProvider, TokenVerifier};
use crate::domain::RequestKind;
use crate::events::EventBus;
use crate::metrics::Metrics;
use crate::models::Models;
use crate::queue::Queue;
use crate::store::Store;

#[derive(Clone)]
pub struct Ports {
    pub store: Arc<dyn Store>,
    /// Accept, start and settle, each one unit of work across store, queue and events.
    pub atomic: Arc<dyn Atomic>,
    pub persona_queue: Arc<dyn Queue>,
    pub chat_queue: Arc<dyn Queue>,
    pub events: Arc<dyn EventBus>,
    pub verifier: Arc<dyn TokenVerifier>,
    pub identity: Arc<dyn IdentityProvider>,
    /// The embedded issuer's public keys, served at `/.well-known/jwks.json`; `None` when
    /// tokens come from elsewhere (Cognito).
    pub jwks: Option<serde_json::Value>,
    pub metrics: Arc<Metrics>,
    /// The persona and chat models (used by the workers only).
    pub models: Models,
}

impl Ports {
    /// The queue of a kind of job.
    pub fn queue(&self, kind: RequestKind) -> &Arc<dyn Queue> {
        match kind {
            RequestKind::Persona => &self.persona_queue,
            RequestKind::Chat => &self.chat_queue,
        }
    }
}
