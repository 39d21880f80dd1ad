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

/// The document as served: [`ApiDoc`] completed by [`complete`] for these options.
pub fn document(options: &crate::ApiOptions) -> serde_json::Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    complete(&mut doc, options);
    doc
}

/// The error answers every operation can give, and why; [`answers`] says which apply.
const ERROR_ANSWERS: [(&str, &str); 10] = [
    ("400", "The request is not valid: a parameter, the body or a header (`error.code` says which rule)"),
    ("401", "No valid access token (`unauthorized`)"),
    ("404", "Not found, or not the caller's (`not_found`)"),
    ("408", "The body did not arrive in time (`request_timeout`)"),
    ("409", "A request with this `Idempotency-Key` is still being handled (`idempotency_key_in_use`)"),
    ("413", "The body is too large (`payload_too_large`)"),
    ("415", "The body is not `application/json` (`unsupported_media_type`)"),
    ("422", "This `Idempotency-Key` was used for a different request (`idempotency_key_reused`)"),
    ("429", "Too many requests, streams or failed sign-ins; `Retry-After` says when to try again"),
    ("503", "Overloaded or a dependency is down (`busy`, `unavailable`); `Retry-After` when known"),
];

/// Completes the generated document with what the middleware and the extractors answer,
/// declared once here rather than on each handler, so a new route is documented as exactly
/// as the old ones: the error answers of each operation (with the error schema), the
/// `Idempotency-Key` header wherever it is honoured, operation ids unique across tags (client
/// generators name methods after them), and the configured limits on the bodies.
fn complete(doc: &mut serde_json::Value, options: &crate::ApiOptions) {
    if let Some(paths) = doc["paths"].as_object_mut() {
        for (path, item) in paths.iter_mut() {
            if let Some(methods) = item.as_object_mut() {
                for (method, op) in methods.iter_mut() {
                    complete_operation(path, method, op);
                }
            }
        }
    }
    limits(doc, options);
    links(doc);
    examples(doc);
}

/// An example of each request body, as a client generator shows it (and the fuzzer's
/// examples phase sends it).
fn examples(doc: &mut serde_json::Value) {
    use serde_json::json;
    let examples = [
        (
            "Credentials",
            json!({ "email": "ada@example.com", "password": "correct horse battery" }),
        ),
        ("CreatePersona", json!({ "prompt": "Sherlock Holmes" })),
        (
            "CreateBatch",
            json!({ "items": [
            { "custom_id": "row-1", "prompt": "Ada Lovelace" },
            { "custom_id": "row-2", "prompt": "a grumpy pirate who loves cats" }] }),
        ),
        (
            "PersonaEdit",
            json!({ "greeting": "Good evening. Shall we begin?" }),
        ),
        (
            "CreateConversation",
            json!({ "persona_id": "per_01a21c9888ad709696c42842b22c4290", "greeting_index": 0 }),
        ),
        (
            "RenameConversation",
            json!({ "title": "The case of the pearl" }),
        ),
        ("PostMessage", json!({ "text": "Who stole the pearl?" })),
        (
            "EditMessage",
            json!({ "text": "Who stole the black pearl?", "regenerate": true }),
        ),
        (
            "Rewind",
            json!({ "message_id": "msg_01a21c9888ad709696c42842b22c4290" }),
        ),
        (
            "SelectVersion",
            json!({ "variant_id": "var_01a21c9888ad709696c42842b22c4290" }),
        ),
        (
            "Memory",
            json!({ "summary": "", "pinned": ["Alice is allergic to cats"] }),
        ),
    ];
    for (schema, example) in examples {
        let at = &mut doc["components"]["schemas"][schema];
        if at.is_object() {
            at["examples"] = json!([example]);
        }
    }
}

/// OpenAPI links from the operations that create or list a record to those that take its id,
/// so a generator (or a stateful test) can follow them: `(from, status, to, parameters)` with
/// each parameter a runtime expression; `persona_id` in a body as `body:persona_id`.
/// `(from, status, to, parameters)`: see [`LINKS`].
type Link = (
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

const LINKS: &[Link] = &[
    (
        "personas_create",
        "202",
        "requests_get",
        &[("id", "$response.body#/request_id")],
    ),
    (
        "personas_create",
        "202",
        "requests_cancel",
        &[("id", "$response.body#/request_id")],
    ),
    (
        "requests_get",
        "200",
        "personas_get",
        &[("id", "$response.body#/result/persona/persona_id")],
    ),
    (
        "personas_list",
        "200",
        "personas_get",
        &[("id", "$response.body#/items/0/persona_id")],
    ),
    (
        "personas_get",
        "200",
        "personas_edit",
        &[("id", "$response.body#/persona_id")],
    ),
    (
        "personas_get",
        "200",
        "personas_delete",
        &[("id", "$response.body#/persona_id")],
    ),
    (
        "personas_get",
        "200",
        "conversations_create",
        &[("body:persona_id", "$response.body#/persona_id")],
    ),
    (
        "conversations_create",
        "201",
        "conversations_get",
        &[("id", "$response.body#/conversation_id")],
    ),
    (
        "conversations_create",
        "201",
        "conversations_rename",
        &[("id", "$response.body#/conversation_id")],
    ),
    (
        "conversations_create",
        "201",
        "conversations_delete",
        &[("id", "$response.body#/conversation_id")],
    ),
    (
        "conversations_create",
        "201",
        "conversations_post_message",
        &[("id", "$response.body#/conversation_id")],
    ),
    (
        "conversations_create",
        "201",
        "conversations_list_messages",
        &[("id", "$response.body#/conversation_id")],
    ),
    (
        "conversations_create",
        "201",
        "conversations_get_memory",
        &[("id", "$response.body#/conversation_id")],
    ),
    (
        "conversations_create",
        "201",
        "conversations_put_memory",
        &[("id", "$response.body#/conversation_id")],
    ),
    (
        "conversations_list",
        "200",
        "conversations_get",
        &[("id", "$response.body#/items/0/conversation_id")],
    ),
    (
        "conversations_post_message",
        "202",
        "requests_get",
        &[("id", "$response.body#/request_id")],
    ),
    (
        "conversations_post_message",
        "202",
        "requests_cancel",
        &[("id", "$response.body#/request_id")],
    ),
    (
        "conversations_post_message",
        "202",
        "conversations_edit",
        &[
            ("id", "$request.path.id"),
            ("message_id", "$response.body#/message_id"),
        ],
    ),
    (
        "conversations_post_message",
        "202",
        "conversations_rewind",
        &[
            ("id", "$request.path.id"),
            ("body:message_id", "$response.body#/message_id"),
        ],
    ),
    (
        "conversations_list_messages",
        "200",
        "conversations_regenerate",
        &[
            ("id", "$request.path.id"),
            ("message_id", "$response.body#/items/0/message_id"),
        ],
    ),
    (
        "conversations_list_messages",
        "200",
        "conversations_select",
        &[
            ("id", "$request.path.id"),
            ("message_id", "$response.body#/items/0/message_id"),
        ],
    ),
    (
        "batches_create",
        "202",
        "batches_get",
        &[("id", "$response.body#/batch_id")],
    ),
    (
        "batches_create",
        "202",
        "batches_results",
        &[("id", "$response.body#/batch_id")],
    ),
    (
        "batches_create",
        "202",
        "batches_cancel",
        &[("id", "$response.body#/batch_id")],
    ),
    (
        "batches_create",
        "202",
        "requests_get",
        &[("id", "$response.body#/request_ids/0")],
    ),
    (
        "batches_list",
        "200",
        "batches_get",
        &[("id", "$response.body#/items/0/batch_id")],
    ),
];

/// A text field as `crate::handlers::check_text` takes it: not blank, at most `max` characters.
fn text(max: usize) -> serde_json::Value {
    serde_json::json!({ "type": "string", "minLength": 1, "maxLength": max, "pattern": crate::handlers::NOT_BLANK })
}

/// `schema`, also taking `null` (as absent).
fn or_null(mut schema: serde_json::Value) -> serde_json::Value {
    let kind = schema["type"].take();
    schema["type"] = serde_json::json!([kind, "null"]);
    schema
}

/// `PATCH /v1/personas/{id}`: each field optional (`null` as absent), at least one given.
fn persona_edit(schema: &mut serde_json::Value) {
    use serde_json::json;
    use shared::domain::{PersonaEdit, PERSONA_FIELD_MAX_CHARS, PERSONA_NAME_MAX_CHARS};
    let fields = [
        "name",
        "description",
        "personality",
        "speaking_style",
        "greeting",
    ];
    for field in fields {
        let max = if field == "name" {
            PERSONA_NAME_MAX_CHARS
        } else {
            PERSONA_FIELD_MAX_CHARS
        };
        schema["properties"][field] = or_null(text(max));
    }
    schema["properties"]["alternate_greetings"] = json!({
        "type": ["array", "null"], "items": text(PERSONA_FIELD_MAX_CHARS), "maxItems": PersonaEdit::MAX_ALTERNATES
    });
    let given: Vec<_> = fields
        .iter()
        .map(|f| json!({ "required": [f], "properties": { *f: { "type": "string" } } }))
        .chain([json!({ "required": ["alternate_greetings"], "properties": { "alternate_greetings": { "type": "array" } } })])
        .collect();
    schema["anyOf"] = json!(given);
}

fn links(doc: &mut serde_json::Value) {
    use serde_json::{json, Map, Value};
    let mut by_id: std::collections::HashMap<String, (String, String)> = Default::default();
    if let Some(paths) = doc["paths"].as_object() {
        for (path, item) in paths {
            for (method, op) in item.as_object().into_iter().flatten() {
                if let Some(id) = op["operationId"].as_str() {
                    by_id.insert(id.to_owned(), (path.clone(), method.clone()));
                }
            }
        }
    }
    for (from, status, to, parameters) in LINKS {
        let (Some((path, method)), true) = (by_id.get(*from), by_id.contains_key(*to)) else {
            continue;
        };
        let (mut params, mut body) = (Map::new(), Map::new());
        for (name, expression) in *parameters {
            match name.strip_prefix("body:") {
                Some(field) => body.insert(field.to_owned(), json!(expression)),
                None => params.insert((*name).to_owned(), json!(expression)),
            };
        }
        let mut link = json!({ "operationId": to });
        if !params.is_empty() {
            link["parameters"] = Value::Object(params);
        }
        if !body.is_empty() {
            link["requestBody"] = Value::Object(body);
        }
        let answer = &mut doc["paths"][path][method]["responses"][*status];
        if answer.is_object() {
            answer["links"][format!("{to}_from_{from}")] = link;
        }
    }
}

fn complete_operation(path: &str, method: &str, op: &mut serde_json::Value) {
    use serde_json::json;
    let tag = op["tags"][0].as_str().unwrap_or("api").to_owned();
    if let Some(id) = op["operationId"].as_str() {
        if !id.starts_with(&tag) {
            op["operationId"] = json!(format!("{tag}_{id}"));
        }
    }
    let idempotent = op.get("security").is_some() && (method == "post" || method == "patch");
    if idempotent && !has_header(op, "Idempotency-Key") {
        add_parameter(
            op,
            json!({
                "name": "Idempotency-Key", "in": "header", "required": false,
                "description": "Makes retries safe: a repeat with the same key and body gets the first answer (empty: no key)",
                "schema": { "type": "string", "maxLength": 255, "pattern": "^[ -~]*$" }
            }),
        );
    }
    let answers = answers(path, op, idempotent);
    let Some(responses) = op["responses"].as_object_mut() else {
        return;
    };
    for (code, description) in ERROR_ANSWERS {
        if answers.contains(&code) && !responses.contains_key(code) {
            responses.insert(code.into(), json!({ "description": description }));
        }
    }
    for (code, answer) in responses.iter_mut() {
        if code.starts_with('4') || code.starts_with('5') {
            answer["content"] = json!({ "application/json": { "schema": { "$ref": "#/components/schemas/ErrorResponse" } } });
        }
    }
}

/// The statuses of [`ERROR_ANSWERS`] an operation can answer, by what it takes.
fn answers(path: &str, op: &serde_json::Value, idempotent: bool) -> Vec<&'static str> {
    let has = |place: &str| {
        op["parameters"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["in"] == place))
    };
    let body = op.get("requestBody").is_some();
    let v1 = path.starts_with("/v1/");
    [
        ("400", body || has("query") || has("path") || idempotent),
        ("401", op.get("security").is_some()),
        ("404", has("path")),
        ("408", body),
        ("409", idempotent),
        ("413", body),
        ("415", body),
        ("422", idempotent),
        ("429", v1),
        ("503", v1),
    ]
    .into_iter()
    .filter_map(|(code, applies)| applies.then_some(code))
    .collect()
}

fn has_header(op: &serde_json::Value, name: &str) -> bool {
    op["parameters"].as_array().is_some_and(|ps| {
        ps.iter().any(|p| {
            p["in"] == "header"
                && p["name"]
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
    })
}

fn add_parameter(op: &mut serde_json::Value, parameter: serde_json::Value) {
    match op["parameters"].as_array_mut() {
        Some(ps) => ps.push(parameter),
        None => op["parameters"] = serde_json::json!([parameter]),
    }
}

/// The configured limits on the bodies (`CHARACTERBOT_MAX_PROMPT_CHARS` and the like), which
/// the annotations cannot know.
fn limits(doc: &mut serde_json::Value, o: &crate::ApiOptions) {
    use serde_json::json;
    let schemas = &mut doc["components"]["schemas"];
    {
        use shared::auth::local::{
            EMAIL_MAX_CHARS, EMAIL_PATTERN, MAX_PASSWORD_CHARS, MIN_PASSWORD_CHARS,
        };
        let credentials = &mut schemas["Credentials"]["properties"];
        credentials["email"] =
            json!({ "type": "string", "maxLength": EMAIL_MAX_CHARS, "pattern": EMAIL_PATTERN });
        credentials["password"] = json!({ "type": "string", "minLength": MIN_PASSWORD_CHARS, "maxLength": MAX_PASSWORD_CHARS });
    }
    schemas["CreatePersona"]["properties"]["prompt"] = text(o.max_prompt_chars);
    persona_edit(&mut schemas["PersonaEdit"]);
    schemas["BatchItem"]["properties"]["prompt"] = text(o.max_prompt_chars);
    schemas["BatchItem"]["properties"]["custom_id"] = json!({
        "type": "string", "minLength": 1, "maxLength": crate::handlers::batches::CUSTOM_ID_MAX_CHARS,
        "pattern": "^[^\\u0000-\\u001F\\u007F-\\u009F]+$"
    });
    schemas["PostMessage"]["properties"]["text"] = text(o.max_message_chars);
    schemas["EditMessage"]["properties"]["text"] = text(o.max_message_chars);
    let title = text(shared::domain::TITLE_MAX_CHARS);
    schemas["RenameConversation"]["properties"]["title"] = title.clone();
    schemas["CreateConversation"]["properties"]["title"] = or_null(title);
    let batch = &mut schemas["CreateBatch"]["properties"];
    batch["prompts"] = json!({ "type": ["array", "null"], "items": text(o.max_prompt_chars), "minItems": 1, "maxItems": o.max_batch });
    // Exactly one of the two given as a list (`invalid_batch` otherwise).
    schemas["CreateBatch"]["oneOf"] = json!([
        { "required": ["prompts"], "properties": { "prompts": { "type": "array" } } },
        { "required": ["items"], "properties": { "items": { "type": "array" } } }
    ]);
    let batch = &mut schemas["CreateBatch"]["properties"];
    batch["items"] = json!({ "type": ["array", "null"], "items": { "$ref": "#/components/schemas/BatchItem" }, "minItems": 1, "maxItems": o.max_batch });
}
