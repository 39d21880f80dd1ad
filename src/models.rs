//! The persona and chat models the settings name. `auto` resolves here, once, to a
//! `Provider`, which both builds the adapter and names itself in the start-up log.

use std::sync::Arc;

use shared::models::bedrock::BedrockChatModel;
use shared::models::offline::{OfflineChatModel, OfflinePersonaModel};
use shared::models::openai::{OpenAiChatModel, OpenAiPersonaModel};
use shared::models::{ChatModel, Models, PersonaModel};

use crate::cli::{ChatModelChoice, ModelSettings, PersonaModelChoice, Settings};

/// Where a model's answers come from, once `auto` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Provider {
    Offline,
    OpenAi,
    Bedrock,
}

impl Provider {
    /// `auto`: OpenAI when a key is configured, the offline engine otherwise.
    fn for_persona(m: &ModelSettings) -> Provider {
        match m.persona_model {
            PersonaModelChoice::Openai => Provider::OpenAi,
            PersonaModelChoice::Auto if m.openai_key().is_some() => Provider::OpenAi,
            PersonaModelChoice::Auto | PersonaModelChoice::Offline => Provider::Offline,
        }
    }

    /// `auto`: Bedrock when AWS credentials are configured, else OpenAI when a key is, else
    /// the offline engine.
    fn for_chat(m: &ModelSettings) -> Provider {
        match m.chat_model {
            ChatModelChoice::Bedrock => Provider::Bedrock,
            ChatModelChoice::Openai => Provider::OpenAi,
            ChatModelChoice::Auto if aws_credentials_in_environment() => Provider::Bedrock,
            ChatModelChoice::Auto if m.openai_key().is_some() => Provider::OpenAi,
            ChatModelChoice::Auto | ChatModelChoice::Offline => Provider::Offline,
        }
    }

    /// How the start-up log names it.
    fn label(self, m: &ModelSettings) -> String {
        match self {
            Provider::Offline => {
                "offline engine (deterministic, built in, no provider called)".to_string()
            }
            Provider::Bedrock => "Amazon Bedrock".to_string(),
            Provider::OpenAi => format!("OpenAI-compatible API at {}", m.openai_base_url),
        }
    }
}

/// Whether AWS credentials are configured in the environment (keys, a profile, a web identity,
/// or a container role); the `auto` chat model then picks Bedrock. Read here, where the binary
/// chooses its adapters, so that no library reads the process environment.
fn aws_credentials_in_environment() -> bool {
    [
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
}

fn persona_model(from: Provider, m: &ModelSettings) -> anyhow::Result<Arc<dyn PersonaModel>> {
    Ok(match from {
        Provider::OpenAi => Arc::new(OpenAiPersonaModel::new(
            m.openai_options(&m.openai_persona_model)?,
        )?),
        // `for_persona` never picks Bedrock: it has no persona model.
        Provider::Offline | Provider::Bedrock => Arc::new(OfflinePersonaModel {
            delay: m.offline_delay(),
        }),
    })
}

async fn chat_model(from: Provider, m: &ModelSettings) -> anyhow::Result<Arc<dyn ChatModel>> {
    Ok(match from {
        Provider::Bedrock => {
            // The standard AWS configuration chain, read here in the binary (no library reads
            // the environment).
            let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            Arc::new(BedrockChatModel::with_config(
                aws_sdk_bedrockruntime::config::Builder::from(&sdk),
                m.bedrock_options(),
            ))
        }
        Provider::OpenAi => Arc::new(OpenAiChatModel::new(
            m.openai_options(&m.openai_chat_model)?,
        )?),
        Provider::Offline => Arc::new(OfflineChatModel {
            delay: m.offline_delay(),
        }),
    })
}

/// The models the settings name; `auto` picks a provider whose credentials are present and the
/// offline engine otherwise, and the choice is logged. Part of the ports (`crate::open_ports`).
pub async fn open_models(settings: &Settings) -> anyhow::Result<Models> {
    let m = &settings.models;
    let (persona_from, chat_from) = (Provider::for_persona(m), Provider::for_chat(m));
    let persona = persona_model(persona_from, m)?;
    let chat = chat_model(chat_from, m).await?;
    tracing::info!(
        persona_model = persona.model(),
        persona_provider = %persona_from.label(m),
        chat_model = chat.model(),
        chat_provider = %chat_from.label(m),
        "models in use"
    );
    Ok(Models { persona, chat })
}
