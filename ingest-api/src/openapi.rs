//! The OpenAPI 3.1 document, generated from the handlers' annotations and the domain types, so
//! it cannot drift from the code. Served at `GET /openapi.json`.

use serde::Serialize;
use shared::domain::{
    Batch, BatchStatus, Conversation, ErrorBody, Memory, Message, MessageStatus, Persona,
    PersonaEdit, PersonaSource, RequestInput, RequestKind, RequestRecord, RequestResult,
    RequestStatus, Role, Usage, Variant,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::handlers::{self, auth, batches, conversations, personas, Accepted};

/// The shape of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "CharacterBot API",
        description = "Asynchronous persona chat. POSTs answer 202 with a request id; results \
            arrive by polling GET /v1/requests/{id} (long poll with ?wait=) or on the \
            GET /v1/events stream. Errors: {\"error\": {\"code\", \"message\"}}."
    ),
    paths(
        handlers::auth::sign_up, handlers::auth::confirm, handlers::auth::sign_in, handlers::auth::refresh,
        handlers::auth::sign_out, handlers::auth::sign_out_everywhere,
        handlers::personas::create, handlers::personas::list,
        handlers::personas::get, handlers::personas::edit, handlers::personas::delete,
        handlers::batches::create, handlers::batches::list, handlers::batches::get,
        handlers::batches::results, handlers::batches::cancel,
        handlers::conversations::create, handlers::conversations::list, handlers::conversations::get,
        handlers::conversations::rename, handlers::conversations::delete,
        handlers::conversations::post_message, handlers::conversations::list_messages,
        handlers::conversations::regenerate, handlers::conversations::select,
        handlers::conversations::edit, handlers::conversations::rewind,
        handlers::conversations::get_memory, handlers::conversations::put_memory,
        handlers::requests::get, handlers::requests::cancel, handlers::events::stream,
        handlers::sync::sync,
        handlers::ops::healthz, handlers::ops::readyz, handlers::ops::metrics,
        handlers::ops::openapi, handlers::ops::jwks,
    ),
    components(schemas(
        ErrorResponse, ErrorBody, Accepted, Persona, PersonaEdit, PersonaSource, Conversation, Message, Role,
        RequestRecord, RequestKind, RequestStatus, RequestInput, RequestResult, Usage, Batch,
        auth::Credentials, auth::SignedUp, auth::ConfirmRequest, auth::Confirmed, auth::RefreshRequest, auth::SignOutRequest, shared::auth::Tokens,
        personas::CreatePersona, batches::CreateBatch, batches::BatchAccepted, batches::BatchItem,
        batches::BatchResults, batches::BatchResult, BatchStatus,
        conversations::CreateConversation, conversations::RenameConversation,
        conversations::PostMessage, conversations::MessageAccepted, MessageStatus, Variant,
        conversations::SelectVersion, conversations::EditMessage, conversations::Rewind, Memory,
        handlers::sync::SyncPage, shared::store::Change, shared::store::ChangeKind,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "auth", description = "Sign-up, sign-in, tokens"),
        (name = "personas", description = "Personas"),
        (name = "batches", description = "Many persona prompts in one call: progress, results, cancel"),
        (name = "conversations", description = "Conversations and messages"),
        (name = "requests", description = "Polling and push of asynchronous results"),
        (name = "sync", description = "Catch-up: every record changed since a cursor"),
        (name = "ops", description = "Health, readiness, metrics"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}
