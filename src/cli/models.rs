//! The model flags: which engine answers, and the plain options of each provider's adapter
//! ([`OpenAiOptions`], [`BedrockOptions`]). `crate::models` picks the engines from them.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use shared::models::bedrock::BedrockOptions;
use shared::models::openai::OpenAiOptions;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PersonaModelChoice {
    /// OpenAI when `OPENAI_API_KEY` is set, the offline engine otherwise.
    Auto,
    /// Deterministic offline engine (no key, no network).
    Offline,
    /// OpenAI structured outputs (or any OpenAI-compatible server at `OPENAI_BASE_URL`).
    Openai,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ChatModelChoice {
    /// Bedrock when AWS credentials are configured, else OpenAI when `OPENAI_API_KEY` is set,
    /// else the offline engine.
    Auto,
    /// Deterministic offline engine (no key, no network).
    Offline,
    /// Amazon Bedrock (Nova) through `invoke_model`.
    Bedrock,
    /// OpenAI Chat Completions (or any OpenAI-compatible server at `OPENAI_BASE_URL`).
    Openai,
}

#[derive(Debug, Clone, Args)]
pub struct ModelSettings {
    /// Engine that turns prompts into personas.
    #[arg(
        long,
        env = "CHARACTERBOT_PERSONA_MODEL",
        value_enum,
        default_value = "auto"
    )]
    pub persona_model: PersonaModelChoice,
    /// Engine that answers chat messages.
    #[arg(
        long,
        env = "CHARACTERBOT_CHAT_MODEL",
        value_enum,
        default_value = "auto"
    )]
    pub chat_model: ChatModelChoice,
    /// Artificial latency of the offline engine, in milliseconds (to try timeouts, kills and
    /// streaming by hand; 0 in normal use).
    #[arg(long, env = "CHARACTERBOT_OFFLINE_DELAY_MS", default_value_t = 0)]
    pub offline_delay_ms: u64,
    /// OpenAI API key; setting it makes `auto` choose OpenAI.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<String>,
    /// Base URL of the OpenAI API, or of any OpenAI-compatible server (llama.cpp, Ollama, vLLM).
    #[arg(
        long,
        env = "OPENAI_BASE_URL",
        default_value = "https://api.openai.com/v1"
    )]
    pub openai_base_url: String,
    /// OpenAI organization id, if the key belongs to several.
    #[arg(long, env = "OPENAI_ORG_ID")]
    pub openai_org_id: Option<String>,
    /// Model of the persona agent on OpenAI.
    #[arg(
        long,
        env = "CHARACTERBOT_OPENAI_PERSONA_MODEL",
        default_value = "gpt-4o-mini"
    )]
    pub openai_persona_model: String,
    /// Model of the chat on OpenAI.
    #[arg(
        long,
        env = "CHARACTERBOT_OPENAI_CHAT_MODEL",
        default_value = "gpt-4o-mini"
    )]
    pub openai_chat_model: String,
    /// Bedrock model id of the chat.
    #[arg(
        long,
        env = "CHARACTERBOT_BEDROCK_MODEL_ID",
        default_value = "amazon.nova-micro-v1:0"
    )]
    pub bedrock_model_id: String,
    /// Stream Bedrock replies (`invoke_model_with_response_stream`), pushing each fragment to
    /// the user's event stream as `message.delta`.
    #[arg(long, env = "CHARACTERBOT_BEDROCK_STREAM", default_value_t = true, action = clap::ArgAction::Set)]
    pub bedrock_stream: bool,
    /// Sampling temperature of chat replies.
    #[arg(long, env = "CHARACTERBOT_TEMPERATURE", default_value_t = 0.7)]
    pub temperature: f32,
    /// Nucleus sampling (`topP`) of chat replies.
    #[arg(long, env = "CHARACTERBOT_TOP_P", default_value_t = 0.9)]
    pub top_p: f32,
    /// Time limit of one provider call, in seconds.
    #[arg(long, env = "CHARACTERBOT_MODEL_TIMEOUT_SECS", default_value_t = 60)]
    pub model_timeout_secs: u64,
    /// Most tokens a provider may write for one persona or reply.
    #[arg(long, env = "CHARACTERBOT_MAX_OUTPUT_TOKENS", default_value_t = 800)]
    pub max_output_tokens: u32,
}

impl ModelSettings {
    /// The OpenAI key, if one is configured (an empty value counts as none).
    pub fn openai_key(&self) -> Option<&str> {
        self.openai_api_key
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty())
    }

    /// Artificial latency of the offline engine.
    pub fn offline_delay(&self) -> Duration {
        Duration::from_millis(self.offline_delay_ms)
    }

    /// Time limit of one provider call (at least 1 s).
    fn model_timeout(&self) -> Duration {
        Duration::from_secs(self.model_timeout_secs.max(1))
    }

    /// The OpenAI client's options for `model`; an error when no key is configured.
    pub fn openai_options(&self, model: &str) -> anyhow::Result<OpenAiOptions> {
        let key = self
            .openai_key()
            .context("the openai model needs OPENAI_API_KEY (or --openai-api-key)")?;
        Ok(OpenAiOptions {
            api_key: key.to_owned(),
            base_url: self.openai_base_url.clone(),
            organization: self.openai_org_id.clone(),
            model: model.to_owned(),
            timeout: self.model_timeout(),
            max_output_tokens: self.max_output_tokens,
        })
    }

    /// The Bedrock chat model's options.
    pub fn bedrock_options(&self) -> BedrockOptions {
        BedrockOptions {
            model_id: self.bedrock_model_id.clone(),
            max_tokens: self.max_output_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            stream: self.bedrock_stream,
            timeout: self.model_timeout(),
        }
    }
}
