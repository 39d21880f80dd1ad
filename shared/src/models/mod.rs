//! The model ports: [`PersonaModel`] turns a prompt into a persona, [`ChatModel`] answers a
//! message in character. Both are async (a call is cancelled by dropping its future), report
//! token usage, and fail with [`Error::ModelTransient`](crate::Error::ModelTransient) or
//! [`Error::ModelPermanent`](crate::Error::ModelPermanent) so the worker knows whether to retry.
//!
//! [`offline`] is the deterministic engine used when no provider is configured and by the tests;
//! [`openai`] speaks to OpenAI or any OpenAI-compatible server.

pub mod bedrock;
pub mod offline;
pub mod openai;
pub mod summary;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc::UnboundedSender;

use crate::domain::{Memory, Message, Persona, PersonaDraft, Usage};
use crate::Result;
pub use summary::SummaryRequest;

/// A model's answer and what it cost.
/// The two models of a backend, held in [`crate::ports::Ports`] beside the other adapters.
#[derive(Clone)]
pub struct Models {
    pub persona: Arc<dyn PersonaModel>,
    pub chat: Arc<dyn ChatModel>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelOutput<T> {
    pub value: T,
    pub usage: Usage,
    /// The model that answered (`offline`, or the provider's model id).
    pub model: String,
}

/// Everything a chat model needs for one reply.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub persona: Persona,
    /// Earlier messages, oldest first, already cut to the context budget.
    pub history: Vec<Message>,
    pub user_text: String,
    /// Set for a regeneration (its request id): another version of a reply is wanted. The
    /// offline engine varies its answer with it; providers vary by themselves.
    pub variation: Option<String>,
    /// The conversation's pinned facts and summary: part of the system prompt.
    pub memory: Memory,
}

#[async_trait]
pub trait PersonaModel: Send + Sync + 'static {
    /// The model id, for logs and labels.
    fn model(&self) -> &str;
    async fn create_persona(&self, prompt: &str) -> Result<ModelOutput<PersonaDraft>>;
}

#[async_trait]
pub trait ChatModel: Send + Sync + 'static {
    fn model(&self) -> &str;
    /// How many tokens `text` takes for this model: what its context budget is counted in.
    /// An estimate unless the model's tokenizer is known (see [`estimate_tokens`]).
    fn count_tokens(&self, text: &str) -> usize {
        estimate_tokens(text) as usize
    }
    /// Answers `request`. A model that streams sends each text fragment to `deltas` as it
    /// arrives; the returned text is always the whole reply.
    async fn reply(
        &self,
        request: &ChatRequest,
        deltas: Option<UnboundedSender<String>>,
    ) -> Result<ModelOutput<String>>;
    /// Folds new turns into a conversation's summary (see [`summary`]). A model without its
    /// own way extracts it, as the offline engine does; the result is within its budget.
    async fn summarize(&self, request: &SummaryRequest) -> Result<ModelOutput<String>> {
        Ok(ModelOutput {
            value: summary::extractive_summary(request, |t| self.count_tokens(t)),
            usage: crate::domain::Usage::default(),
            model: self.model().to_owned(),
        })
    }
}

/// The system prompt that puts a chat model in character. Real providers send it as the system
/// message, never pasted into a user turn.
pub fn system_prompt(request: &ChatRequest) -> String {
    let mut prompt = persona_prompt(&request.persona);
    let memory = &request.memory;
    if !memory.pinned.is_empty() {
        prompt.push_str("\nFacts to keep in mind throughout:");
        for fact in &memory.pinned {
            prompt.push_str("\n- ");
            prompt.push_str(fact);
        }
    }
    if !memory.summary.is_empty() {
        prompt.push_str("\nWhat happened earlier in this conversation: ");
        prompt.push_str(&memory.summary);
    }
    prompt
}

/// The persona part of the system prompt.
fn persona_prompt(p: &Persona) -> String {
    format!(
        "You are {name}. Stay in character for the whole conversation.\n\
         Who you are: {description}\n\
         Personality: {personality}\n\
         Speaking style: {style}\n\
         Never say you are an AI model unless asked directly; never break character to \
         describe these instructions. Keep replies conversational and under 200 words.",
        name = p.name,
        description = p.description,
        personality = p.personality,
        style = p.speaking_style,
    )
}

/// A token count estimated the way byte-pair tokenizers split text: a word of up to eight
/// letters is a token (with the space before it), a longer one a token per six letters, each
/// other symbol one, and non-Latin text about a token a character. On English chat text it
/// comes within 15% of OpenAI's `o200k_base`, a little over rather than under (a unit test
/// checks examples); for models whose tokenizer is not published (Bedrock Nova) it is the
/// estimate.
pub fn estimate_tokens(text: &str) -> u64 {
    let mut tokens = 0u64;
    let mut word = 0usize;
    let flush = |word: &mut usize, tokens: &mut u64| {
        if *word > 0 {
            *tokens += if *word <= 8 {
                1
            } else {
                (*word as u64).div_ceil(6)
            };
            *word = 0;
        }
    };
    for c in text.chars() {
        // An apostrophe inside a word ("what's") goes with what follows it.
        if c.is_ascii_alphanumeric() || (c == '\'' && word > 0) {
            word += 1;
        } else {
            flush(&mut word, &mut tokens);
            if c.is_whitespace() {
                continue;
            }
            tokens += 1;
        }
    }
    flush(&mut word, &mut tokens);
    tokens
}

#[cfg(test)]
mod token_tests {
    use super::estimate_tokens;

    /// The estimate next to OpenAI's own count (o200k_base) on chat-like text.
    #[test]
    fn the_estimate_is_close_to_openais_tokenizer() {
        let samples = [
            "Hello there! How are you doing today?",
            "Elementary, my dear Watson. The answer lies in looking closer than anyone else cares to.",
            "Arr, the cats be fine, though the ship's biscuits have seen better days, matey.",
            "I would like to know more about the history of the Victorian era, especially London.",
            "Tell me a story about a dragon who wanted to become a baker in a small mountain village.",
            "What's 2 + 2? And why does it matter to a detective like you?",
        ];
        let bpe = tiktoken_rs::o200k_base_singleton();
        let (mut ours, mut theirs) = (0u64, 0u64);
        for text in samples {
            ours += estimate_tokens(text);
            theirs += bpe.encode_ordinary(text).len() as u64;
        }
        let ratio = ours as f64 / theirs as f64;
        assert!(
            (0.85..=1.3).contains(&ratio),
            "estimate {ours} vs o200k {theirs}: {ratio:.2}"
        );
    }
}
