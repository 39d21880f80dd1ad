//! What CharacterBot is about. These are the records clients see (they derive `ToSchema`, so
//! the OpenAPI document is generated from them) and the job message that travels on the queue.
//!
//! Ownership is not a field: every store call takes the owner's user id, so a record can never
//! be fetched without naming whose it is.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ids::{BatchId, ConversationId, MessageId, PersonaId, RequestId};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct User {
    pub user_id: String,
    pub email: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, ToSchema, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PersonaSource {
    /// A well-known character whose real traits were used.
    Famous,
    /// A persona invented from the prompt.
    Original,
}

/// What a persona model produces from a prompt, before it gets an id. Its JSON schema is the
/// strict structured-output schema the persona agent asks OpenAI for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema, JsonSchema)]
pub struct PersonaDraft {
    /// The character's name.
    pub name: String,
    /// One or two sentences on who the character is.
    pub description: String,
    /// Key personality traits.
    pub personality: String,
    /// How the character talks.
    pub speaking_style: String,
    /// The character's first line to a new acquaintance, in their own voice.
    pub greeting: String,
    /// `famous` for a well-known character, `original` for an invented one.
    pub source: PersonaSource,
}

/// Longest accepted field of a persona, in characters; longer model output is rejected.
pub const PERSONA_FIELD_MAX_CHARS: usize = 2_000;
/// Longest persona name, in characters.
pub const PERSONA_NAME_MAX_CHARS: usize = 120;

impl PersonaDraft {
    /// Checks what a model returned before it is stored: no empty field, no runaway length.
    pub fn validate(&self) -> Result<(), String> {
        let fields = [
            ("name", &self.name, PERSONA_NAME_MAX_CHARS),
            ("description", &self.description, PERSONA_FIELD_MAX_CHARS),
            ("personality", &self.personality, PERSONA_FIELD_MAX_CHARS),
            (
                "speaking_style",
                &self.speaking_style,
                PERSONA_FIELD_MAX_CHARS,
            ),
            ("greeting", &self.greeting, PERSONA_FIELD_MAX_CHARS),
        ];
        for (field, value, max) in fields {
            let len = value.trim().chars().count();
            if len == 0 {
                return Err(format!("persona field `{field}` is empty"));
            }
            if len > max {
                return Err(format!(
                    "persona field `{field}` is longer than {max} characters"
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Persona {
    #[schema(value_type = String)]
    pub persona_id: PersonaId,
    pub name: String,
    pub description: String,
    pub personality: String,
    pub speaking_style: String,
    pub greeting: String,
    /// More first lines to choose from when a conversation begins (`greeting_index` 1 is the
    /// first of these; 0 is `greeting`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alternate_greetings: Vec<String>,
    pub source: PersonaSource,
    /// Which engine wrote it: `offline`, or the provider's model id.
    pub model: String,
    /// The prompt the persona was made from.
    pub prompt: String,
    pub created_at: String,
}

impl Persona {
    /// Greeting `index`: 0 is `greeting`, 1 the first alternate, and so on.
    pub fn greeting_at(&self, index: usize) -> Option<&str> {
        match index {
            0 => Some(&self.greeting),
            n => self.alternate_greetings.get(n - 1).map(String::as_str),
        }
    }

    pub fn from_draft(
        persona_id: PersonaId,
        draft: PersonaDraft,
        model: String,
        prompt: String,
    ) -> Self {
        Persona {
            persona_id,
            name: draft.name,
            description: draft.description,
            personality: draft.personality,
            speaking_style: draft.speaking_style,
            greeting: draft.greeting,
            alternate_greetings: Vec::new(),
            source: draft.source,
            model,
            prompt,
            created_at: crate::time::now_rfc3339(),
        }
    }
}

/// What `PATCH /v1/personas/{id}` changes: the fields given; the others stay.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PersonaEdit {
    #[schema(min_length = 1, max_length = 120)]
    pub name: Option<String>,
    #[schema(min_length = 1, max_length = 2000)]
    pub description: Option<String>,
    #[schema(min_length = 1, max_length = 2000)]
    pub personality: Option<String>,
    #[schema(min_length = 1, max_length = 2000)]
    pub speaking_style: Option<String>,
    #[schema(min_length = 1, max_length = 2000)]
    pub greeting: Option<String>,
    /// Replaces the alternates (at most 10; `[]` removes them).
    #[schema(max_items = 10)]
    pub alternate_greetings: Option<Vec<String>>,
}

impl PersonaEdit {
    /// Most alternate greetings a persona keeps.
    pub const MAX_ALTERNATES: usize = 10;

    /// The edit with its texts trimmed, or why it cannot be made: nothing to change, an empty
    /// or too long field, too many alternates.
    pub fn checked(mut self) -> Result<Self, String> {
        let fields = [
            ("name", &mut self.name, PERSONA_NAME_MAX_CHARS),
            (
                "description",
                &mut self.description,
                PERSONA_FIELD_MAX_CHARS,
            ),
            (
                "personality",
                &mut self.personality,
                PERSONA_FIELD_MAX_CHARS,
            ),
            (
                "speaking_style",
                &mut self.speaking_style,
                PERSONA_FIELD_MAX_CHARS,
            ),
            ("greeting", &mut self.greeting, PERSONA_FIELD_MAX_CHARS),
        ];
        let mut any = false;
        for (field, value, max) in fields {
            if let Some(v) = value {
                *v = checked_field(field, v, max)?;
                any = true;
            }
        }
        if let Some(alternates) = &mut self.alternate_greetings {
            if alternates.len() > Self::MAX_ALTERNATES {
                return Err(format!(
                    "at most {} alternate greetings",
                    Self::MAX_ALTERNATES
                ));
            }
            for g in alternates.iter_mut() {
                *g = checked_field("alternate_greetings", g, PERSONA_FIELD_MAX_CHARS)?;
            }
            any = true;
        }
        if !any {
            return Err("nothing to change: give at least one field".into());
        }
        Ok(self)
    }

    pub fn apply(&self, persona: &mut Persona) {
        let fields = [
            (&self.name, &mut persona.name),
            (&self.description, &mut persona.description),
            (&self.personality, &mut persona.personality),
            (&self.speaking_style, &mut persona.speaking_style),
            (&self.greeting, &mut persona.greeting),
        ];
        for (new, old) in fields {
            if let Some(new) = new {
                old.clone_from(new);
            }
        }
        if let Some(alternates) = &self.alternate_greetings {
            persona.alternate_greetings.clone_from(alternates);
        }
    }
}

/// A field of a client's edit: not blank (only spaces, tabs, line ends), at most `max`
/// characters as sent (the rule the OpenAPI document states); stored trimmed of those blanks.
fn checked_field(field: &str, value: &str, max: usize) -> Result<String, String> {
    let trimmed = value.trim_matches([' ', '\t', '\r', '\n']);
    if trimmed.is_empty() {
        return Err(format!("persona field `{field}` is empty"));
    }
    let len = value.chars().count();
    if len > max {
        return Err(format!(
            "persona field `{field}` is longer than {max} characters"
        ));
    }
    Ok(trimmed.to_owned())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Conversation {
    #[schema(value_type = String)]
    pub conversation_id: ConversationId,
    #[schema(value_type = String)]
    pub persona_id: PersonaId,
    pub persona_name: String,
    /// As given (at creation or by a rename); otherwise the opening words of the first user
    /// message, and null until there is one.
    #[serde(default)]
    pub title: Option<String>,
    /// When its latest message was written (the greeting, at first): conversations are listed
    /// by it, newest first.
    #[serde(default)]
    pub last_message_at: Option<String>,
    /// The opening words of its latest message.
    #[serde(default)]
    pub preview: Option<String>,
    pub created_at: String,
}

impl Conversation {
    /// The record as it begins, with `greeting` its first message (and so its latest, for
    /// now).
    pub fn begun_with(mut self, greeting: &Message) -> Self {
        Activity::of(greeting).apply(&mut self);
        self
    }
}

/// What a conversation remembers beyond the turns that fit the model's context: facts its
/// user pinned, always given to the model, and a summary of earlier turns.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Memory {
    /// Earlier turns, summarized. A user may rewrite it.
    #[serde(default)]
    #[schema(max_length = 4000)]
    pub summary: String,
    /// Facts the model is always given (a summary never rewrites them).
    #[serde(default)]
    #[schema(max_items = 20)]
    pub pinned: Vec<String>,
    /// The last message the summary covers: the memory job folds the turns after it, as they
    /// fall out of the model's context. Set by the memory job; a `PUT` leaves it as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, read_only)]
    pub summarized_through: Option<MessageId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

impl Memory {
    pub const SUMMARY_MAX_CHARS: usize = 4_000;
    pub const PINNED_MAX: usize = 20;
    pub const PINNED_MAX_CHARS: usize = 500;

    /// The memory with its texts trimmed (empty pins dropped), or why it cannot be kept.
    pub fn checked(mut self) -> Result<Self, String> {
        self.summary = self.summary.trim().to_owned();
        if self.summary.chars().count() > Self::SUMMARY_MAX_CHARS {
            return Err(format!(
                "the summary is longer than {} characters",
                Self::SUMMARY_MAX_CHARS
            ));
        }
        self.pinned = self
            .pinned
            .iter()
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect();
        if self.pinned.len() > Self::PINNED_MAX {
            return Err(format!("at most {} pinned facts", Self::PINNED_MAX));
        }
        if self
            .pinned
            .iter()
            .any(|p| p.chars().count() > Self::PINNED_MAX_CHARS)
        {
            return Err(format!(
                "a pinned fact is longer than {} characters",
                Self::PINNED_MAX_CHARS
            ));
        }
        Ok(self)
    }

    pub fn is_empty(&self) -> bool {
        self.summary.is_empty() && self.pinned.is_empty()
    }

    /// The memory as a store writes it now: `updated_at` is what a fold's condition compares.
    pub fn written_now(&self) -> Memory {
        Memory {
            updated_at: Some(crate::time::now_rfc3339()),
            ..self.clone()
        }
    }
}

/// Longest title, in characters (a given one is refused beyond it; one taken from a message
/// is cut to it).
pub const TITLE_MAX_CHARS: usize = 80;
/// Longest preview, in characters.
pub const PREVIEW_MAX_CHARS: usize = 140;

/// What a new message does to its conversation's record.
#[derive(Debug, Clone, PartialEq)]
pub struct Activity {
    /// The message's time: the conversation's `last_message_at`.
    pub at: String,
    pub preview: String,
    /// The title a conversation without one takes (from a user message only).
    pub title: Option<String>,
}

impl Activity {
    pub fn of(message: &Message) -> Self {
        Activity {
            at: message.created_at.clone(),
            preview: snippet(&message.text, PREVIEW_MAX_CHARS),
            title: (message.role == Role::User).then(|| snippet(&message.text, TITLE_MAX_CHARS)),
        }
    }

    /// A conversation's record once this activity happened to it.
    pub fn apply(&self, conversation: &mut Conversation) {
        conversation.last_message_at = Some(self.at.clone());
        conversation.preview = Some(self.preview.clone());
        if conversation.title.is_none() {
            conversation.title.clone_from(&self.title);
        }
    }
}

/// `text` on one line, cut to at most `max` characters at a word boundary where there is one
/// (with `…` when cut).
pub fn snippet(text: &str, max: usize) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= max {
        return line;
    }
    let cut: String = line.chars().take(max.saturating_sub(1)).collect();
    let at_word = match cut.rfind(' ') {
        Some(i) if i > cut.len() / 2 => &cut[..i],
        _ => cut.as_str(),
    };
    format!("{}…", at_word.trim_end())
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// Where a message stands. A stored message is `complete`; a reply still being written is shown
/// in its place as `pending` (queued), `streaming` (being written: its text arrives as
/// `message.delta` events) or `failed` (with the request's `error`), so a client rebuilding a
/// screen from one listing needs no other call.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MessageStatus {
    Pending,
    Streaming,
    #[default]
    Complete,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Message {
    #[schema(value_type = String)]
    pub message_id: MessageId,
    pub role: Role,
    pub text: String,
    /// The engine that wrote an assistant message (`offline` or the provider's model id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Stored messages are `complete` (and were, before the field existed).
    #[serde(default)]
    pub status: MessageStatus,
    /// The chat request that answers a user message, or that wrote a reply: the id its events
    /// carry. Absent on a persona's greeting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub request_id: Option<RequestId>,
    /// Why a `failed` reply failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// A user message: the id of its reply (stored or to come; kept through regenerations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub reply_id: Option<MessageId>,
    /// A reply: its versions, oldest first (each regeneration adds one); `text`, `model`,
    /// `status` and `request_id` are the selected one's, and the model only ever sees it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<Variant>,
    /// The `variant_id` of the selected version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected: Option<String>,
    pub created_at: String,
}

/// One version of a reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Variant {
    pub variant_id: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `complete`, or `cancelled` (stopped midway: the words written).
    pub status: MessageStatus,
    /// The request that wrote it.
    #[schema(value_type = String)]
    pub request_id: RequestId,
    pub created_at: String,
}

impl Message {
    /// A stored (complete) message written now.
    pub fn new(
        message_id: MessageId,
        role: Role,
        text: String,
        request_id: Option<RequestId>,
    ) -> Self {
        Message {
            message_id,
            role,
            text,
            model: None,
            status: MessageStatus::Complete,
            request_id,
            error: None,
            reply_id: None,
            variants: Vec::new(),
            selected: None,
            created_at: crate::time::now_rfc3339(),
        }
    }

    /// A reply written by `request`, as its first (or only) version.
    pub fn reply(
        message_id: MessageId,
        request: &RequestId,
        text: String,
        model: &str,
        status: MessageStatus,
    ) -> Self {
        // Its one version is the message itself (see `versions`): its text is not stored
        // twice. `variants` is written once a second version comes.
        Message {
            model: Some(model.to_owned()),
            status,
            ..Message::new(message_id, Role::Assistant, text, Some(request.clone()))
        }
    }

    /// This message as the version of a reply it is (a reply stored before versions is its
    /// own one version).
    fn as_variant(&self) -> Variant {
        let request_id = self.request_id.clone().unwrap_or_else(|| {
            RequestId::from(format!(
                "req_{}",
                self.message_id.as_str().trim_start_matches("msg_")
            ))
        });
        Variant {
            variant_id: request_id.variant_id(),
            text: self.text.clone(),
            model: self.model.clone(),
            status: self.status,
            request_id,
            created_at: self.created_at.clone(),
        }
    }

    /// The message as clients are shown it: a reply with its versions listed even when it
    /// has one (a single version is stored without them).
    pub fn shown(mut self) -> Self {
        if self.role == Role::Assistant && self.variants.is_empty() && self.request_id.is_some() {
            self.variants = self.versions();
            self.selected = self.variants.first().map(|v| v.variant_id.clone());
        }
        self
    }

    /// A reply's versions: `variants`, or itself for a reply stored before them.
    pub fn versions(&self) -> Vec<Variant> {
        if self.variants.is_empty() && self.role == Role::Assistant {
            vec![self.as_variant()]
        } else {
            self.variants.clone()
        }
    }

    /// Whether `request` wrote a version of this reply.
    pub fn has_version_of(&self, request: &RequestId) -> bool {
        let id = request.variant_id();
        self.versions().iter().any(|v| v.variant_id == id)
    }

    /// Makes version `variant_id` the one shown and seen; false when there is none such.
    pub fn select(&mut self, variant_id: &str) -> bool {
        let versions = self.versions();
        let Some(v) = versions.iter().find(|v| v.variant_id == variant_id) else {
            return false;
        };
        self.text.clone_from(&v.text);
        self.model.clone_from(&v.model);
        self.status = v.status;
        self.request_id = Some(v.request_id.clone());
        self.selected = Some(v.variant_id.clone());
        self.variants = versions;
        true
    }

    /// The reply to store when `ours` (one new version) settles over `stored`: ours alone if
    /// there was none, the stored one as it is if it has our version already (a twin
    /// delivery's), else the stored one with ours added and selected.
    pub fn merge_reply(stored: Option<Message>, ours: Message) -> Message {
        let Some(mut stored) = stored else {
            return ours;
        };
        let Some(request) = ours.request_id.clone() else {
            return stored;
        };
        if stored.has_version_of(&request) {
            return stored;
        }
        let mut versions = stored.versions();
        for v in ours.versions() {
            if !versions.iter().any(|have| have.variant_id == v.variant_id) {
                versions.push(v);
            }
        }
        stored.variants = versions;
        stored.select(&request.variant_id());
        stored
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    Persona,
    Chat,
}

impl RequestKind {
    pub const ALL: [RequestKind; 2] = [RequestKind::Persona, RequestKind::Chat];

    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Persona => "persona",
            RequestKind::Chat => "chat",
        }
    }
}

impl std::fmt::Display for RequestKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    /// Cancelled by its user: before it ran, or stopped while running (a chat reply keeps
    /// what was written of it, as a `cancelled` message).
    Cancelled,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Queued => "queued",
            RequestStatus::Running => "running",
            RequestStatus::Succeeded => "succeeded",
            RequestStatus::Failed => "failed",
            RequestStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => RequestStatus::Queued,
            "running" => RequestStatus::Running,
            "succeeded" => RequestStatus::Succeeded,
            "failed" => RequestStatus::Failed,
            "cancelled" => RequestStatus::Cancelled,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            RequestStatus::Succeeded | RequestStatus::Failed | RequestStatus::Cancelled
        )
    }
}

/// What the client asked for; kept with the request so the queue message can stay tiny.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RequestInput {
    Persona {
        prompt: String,
    },
    Chat {
        #[schema(value_type = String)]
        conversation_id: ConversationId,
        /// The user message this request answers.
        #[schema(value_type = String)]
        message_id: MessageId,
        text: String,
        /// A regeneration: the reply it adds a version to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<String>)]
        reply_to: Option<MessageId>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RequestResult {
    Persona(Persona),
    Message(Message),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// The life of one asynchronous job, as the client polls it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct RequestRecord {
    #[schema(value_type = String)]
    pub request_id: RequestId,
    pub kind: RequestKind,
    pub status: RequestStatus,
    /// How many times a worker has started this job.
    pub attempts: u32,
    /// Its user asked to cancel it while it ran: its worker stops it within a second or so,
    /// and it ends `cancelled`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_requested: bool,
    pub input: RequestInput,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub batch_id: Option<BatchId>,
    /// The client's own name for this item of its batch (`items[].custom_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<RequestResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// How long the attempt that succeeded took (model calls and storage), in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    pub created_at: String,
    pub updated_at: String,
}

impl RequestRecord {
    pub fn new(kind: RequestKind, input: RequestInput, batch_id: Option<BatchId>) -> Self {
        Self::with_id(RequestId::new(), kind, input, batch_id)
    }

    /// A new queued request with a given id (see [`crate::ids::Ids`]).
    pub fn with_id(
        request_id: RequestId,
        kind: RequestKind,
        input: RequestInput,
        batch_id: Option<BatchId>,
    ) -> Self {
        let now = crate::time::now_rfc3339();
        RequestRecord {
            request_id,
            kind,
            status: RequestStatus::Queued,
            attempts: 0,
            cancel_requested: false,
            input,
            batch_id,
            custom_id: None,
            result: None,
            error: None,
            usage: None,
            model: None,
            latency_ms: None,
            created_at: now.clone(),
            updated_at: now,
        }
    }
}

/// Where a batch stands: `in_progress` while any of its items is queued or running,
/// `completed` once none is, `cancelled` once none is after its user cancelled it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    #[default]
    InProgress,
    Completed,
    Cancelled,
}

/// Progress of a batch of persona requests.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Batch {
    #[schema(value_type = String)]
    pub batch_id: BatchId,
    #[serde(default)]
    pub status: BatchStatus,
    pub total: u32,
    pub succeeded: u32,
    pub failed: u32,
    /// Cancelled by the user.
    #[serde(default)]
    pub cancelled: u32,
    pub pending: u32,
    #[schema(value_type = Vec<String>)]
    pub request_ids: Vec<RequestId>,
    pub created_at: String,
    /// When its user cancelled it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled_at: Option<String>,
    /// When its last item finished (once none is pending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

impl Batch {
    /// A new batch of these requests, all pending.
    pub fn new(batch_id: BatchId, request_ids: Vec<RequestId>) -> Batch {
        Batch {
            batch_id,
            status: BatchStatus::InProgress,
            total: request_ids.len() as u32,
            succeeded: 0,
            failed: 0,
            cancelled: 0,
            pending: request_ids.len() as u32,
            request_ids,
            created_at: crate::time::now_rfc3339(),
            cancelled_at: None,
            finished_at: None,
        }
    }

    /// The batch as stored (ids, times, whether cancelled) with its counts cleared, to be
    /// counted again from its requests ([`Batch::count`], then [`Batch::counted`]).
    pub fn recount(mut self) -> Batch {
        (self.succeeded, self.failed, self.cancelled, self.pending) = (0, 0, 0, 0);
        self.finished_at = None;
        self
    }

    /// Sets the status from the counts; `last_update` is the latest `updated_at` of its
    /// requests (the batch's end once none is pending).
    pub fn counted(mut self, last_update: Option<String>) -> Batch {
        // Requests no longer in the store (DynamoDB keeps finished ones 30 days) are not
        // counted at all: they finished long ago, and counting them pending would show an old
        // batch running again.
        self.status = match (self.pending, &self.cancelled_at) {
            (0, Some(_)) => BatchStatus::Cancelled,
            (0, None) => BatchStatus::Completed,
            _ => BatchStatus::InProgress,
        };
        self.finished_at = (self.pending == 0).then_some(last_update).flatten();
        self
    }

    /// Counts `n` of the batch's requests as `status` says: succeeded, failed, cancelled, or
    /// (queued, running, unreadable) pending. Both stores count a batch with this, from zero.
    pub fn count(&mut self, status: Option<RequestStatus>, n: u32) {
        match status {
            Some(RequestStatus::Succeeded) => self.succeeded += n,
            Some(RequestStatus::Failed) => self.failed += n,
            Some(RequestStatus::Cancelled) => self.cancelled += n,
            _ => self.pending += n,
        }
    }
}

/// One page of a listing; `next_token` is opaque to clients.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_token: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snippet_is_one_line_cut_at_a_word() {
        assert_eq!(snippet("  Hello,\n  world ", 20), "Hello, world");
        assert_eq!(snippet("The quick brown fox jumps", 12), "The quick…");
        assert_eq!(snippet("Supercalifragilistic", 8), "Superca…");
        assert!(
            snippet(&"word ".repeat(100), PREVIEW_MAX_CHARS)
                .chars()
                .count()
                <= PREVIEW_MAX_CHARS
        );
    }

    #[test]
    fn a_user_message_titles_an_untitled_conversation_only() {
        let mut c = Conversation {
            conversation_id: "conv_1".into(),
            persona_id: "per_1".into(),
            persona_name: "Holmes".into(),
            title: None,
            last_message_at: None,
            preview: None,
            created_at: String::new(),
        };
        let reply = Message::new("m1".into(), Role::Assistant, "Elementary.".into(), None);
        Activity::of(&reply).apply(&mut c);
        assert_eq!(
            (c.title.as_deref(), c.preview.as_deref()),
            (None, Some("Elementary."))
        );
        let asked = Message::new("m2".into(), Role::User, "Who did it?".into(), None);
        Activity::of(&asked).apply(&mut c);
        assert_eq!(c.title.as_deref(), Some("Who did it?"));
        let again = Message::new("m3".into(), Role::User, "And why?".into(), None);
        Activity::of(&again).apply(&mut c);
        assert_eq!(
            (c.title.as_deref(), c.preview.as_deref()),
            (Some("Who did it?"), Some("And why?"))
        );
        assert_eq!(c.last_message_at, Some(again.created_at));
    }
}
