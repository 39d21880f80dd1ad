//! Amazon Bedrock chat: Amazon Nova (`amazon.nova-micro-v1:0` by default) through
//! `aws-sdk-bedrockruntime` `invoke_model`, or `invoke_model_with_response_stream` when the
//! reply is streamed to the user's event stream.
//!
//! The body is Nova's messages schema (`schemaVersion: "messages-v1"`): the persona as `system`
//! (never pasted into a user turn), the bounded history as alternating `messages`, and
//! `inferenceConfig`. The SDK's own retries are turned off: the worker retries in one place.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_bedrockruntime::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_bedrockruntime::primitives::Blob;
use aws_sdk_bedrockruntime::types::ResponseStream;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedSender;

use super::summary::{fit_summary, summary_prompt, SummaryRequest};
use super::{system_prompt, ChatModel, ChatRequest, ModelOutput};
use crate::domain::{Role, Usage};
use crate::{Error, Result};

pub const DEFAULT_MODEL: &str = "amazon.nova-micro-v1:0";

#[derive(Debug, Clone)]
pub struct BedrockOptions {
    pub model_id: String,
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    /// Use `invoke_model_with_response_stream` and push fragments as they come.
    pub stream: bool,
    pub timeout: Duration,
}

pub struct BedrockChatModel {
    client: aws_sdk_bedrockruntime::Client,
    opts: BedrockOptions,
}

impl BedrockChatModel {
    /// A client from a configuration the caller loaded: the binary loads the standard AWS
    /// configuration chain (environment, profile, container or instance role;
    /// `AWS_ENDPOINT_URL_BEDROCK_RUNTIME` overrides the endpoint), tests point it at a fake.
    pub fn with_config(
        config: aws_sdk_bedrockruntime::config::Builder,
        opts: BedrockOptions,
    ) -> Self {
        let config = config
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_timeout(opts.timeout)
                    .build(),
            )
            .build();
        BedrockChatModel {
            client: aws_sdk_bedrockruntime::Client::from_conf(config),
            opts,
        }
    }
}

/// The user turn put before a history that begins with the persona speaking.
const CONVERSATION_BEGINS: &str = "(The conversation begins.)";

/// The Nova request body for a chat request.
pub fn nova_body(request: &ChatRequest, opts: &BedrockOptions) -> Value {
    // Nova wants turns that alternate and begin with the user: a history that begins with the
    // persona's greeting (or is cut by the budget before a reply) gets a user turn before it,
    // so the model still sees what it said; a message whose reply failed leaves two user turns
    // in a row, joined.
    let mut turns: Vec<(&str, String)> = Vec::new();
    let texts = request
        .history
        .iter()
        .map(|m| (m.role, m.text.as_str()))
        .chain(std::iter::once((Role::User, request.user_text.as_str())));
    for (role, text) in texts {
        let role = match role {
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        match turns.last_mut() {
            Some((last, joined)) if *last == role => {
                joined.push_str("\n\n");
                joined.push_str(text);
            }
            None if role == "assistant" => {
                turns.push(("user", CONVERSATION_BEGINS.to_owned()));
                turns.push((role, text.to_owned()));
            }
            _ => turns.push((role, text.to_owned())),
        }
    }
    let messages: Vec<Value> = turns
        .into_iter()
        .map(|(role, text)| json!({ "role": role, "content": [{ "text": text }] }))
        .collect();
    json!({
        "schemaVersion": "messages-v1",
        "system": [{ "text": system_prompt(request) }],
        "messages": messages,
        "inferenceConfig": {
            "maxTokens": opts.max_tokens,
            "temperature": opts.temperature,
            "topP": opts.top_p,
        },
    })
}

/// Maps a Bedrock failure to our transient/permanent split, by the service's error code.
fn classify<E, R>(e: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let transient = |message: String| Error::ModelTransient {
        message: format!("bedrock: {message}"),
        retry_after: None,
    };
    match &e {
        SdkError::ServiceError(service) => {
            let err = service.err();
            let code = err.code().unwrap_or("Unknown").to_owned();
            let message = format!("{code}: {}", err.message().unwrap_or("no message"));
            match code.as_str() {
                "ThrottlingException"
                | "ServiceUnavailableException"
                | "ModelNotReadyException"
                | "InternalServerException"
                | "ModelTimeoutException"
                | "ServiceQuotaExceededException" => transient(message),
                "AccessDeniedException" | "UnrecognizedClientException" => Error::ModelPermanent {
                    code: "provider_auth_failed".into(),
                    message: format!("bedrock: {message}"),
                },
                "ResourceNotFoundException" => Error::ModelPermanent {
                    code: "provider_model_not_found".into(),
                    message: format!("bedrock: {message}"),
                },
                _ => Error::ModelPermanent {
                    code: "provider_rejected".into(),
                    message: format!("bedrock: {message}"),
                },
            }
        }
        SdkError::ConstructionFailure(_) => Error::ModelPermanent {
            code: "provider_error".into(),
            message: format!(
                "bedrock: {}",
                aws_sdk_bedrockruntime::error::DisplayErrorContext(&e)
            ),
        },
        _ => transient(aws_sdk_bedrockruntime::error::DisplayErrorContext(&e).to_string()),
    }
}

/// Why a reply ended, as a failure when it was stopped rather than finished.
fn check_stop(stop_reason: Option<&str>, guardrail: Option<&str>) -> Result<()> {
    if stop_reason == Some("content_filtered") || guardrail == Some("INTERVENED") {
        return Err(Error::ModelPermanent {
            code: "content_filtered".into(),
            message: "Bedrock's content filter or guardrail stopped the reply".into(),
        });
    }
    Ok(())
}

fn usage_of(v: &Value) -> Option<Usage> {
    let u = &v["usage"];
    if u.is_object() {
        return Some(Usage {
            input_tokens: u["inputTokens"].as_u64().unwrap_or(0),
            output_tokens: u["outputTokens"].as_u64().unwrap_or(0),
        });
    }
    let m = &v["amazon-bedrock-invocationMetrics"];
    m.is_object().then(|| Usage {
        input_tokens: m["inputTokenCount"].as_u64().unwrap_or(0),
        output_tokens: m["outputTokenCount"].as_u64().unwrap_or(0),
    })
}

impl BedrockChatModel {
    async fn invoke(&self, body: Vec<u8>) -> Result<ModelOutput<String>> {
        let out = self
            .client
            .invoke_model()
            .model_id(&self.opts.model_id)
            .content_type("application/json")
            .accept("application/json")
            .body(Blob::new(body))
            .send()
            .await
            .map_err(classify)?;
        let v: Value =
            serde_json::from_slice(out.body().as_ref()).map_err(|e| Error::ModelTransient {
                message: format!("bedrock: unreadable response: {e}"),
                retry_after: None,
            })?;
        check_stop(
            v["stopReason"].as_str(),
            v["amazon-bedrock-guardrailAction"].as_str(),
        )?;
        let text: String = v["output"]["message"]["content"]
            .as_array()
            .map(|blocks| blocks.iter().filter_map(|b| b["text"].as_str()).collect())
            .unwrap_or_default();
        Ok(ModelOutput {
            value: text,
            usage: usage_of(&v).unwrap_or_default(),
            model: self.opts.model_id.clone(),
        })
    }

    async fn invoke_streaming(
        &self,
        body: Vec<u8>,
        deltas: UnboundedSender<String>,
    ) -> Result<ModelOutput<String>> {
        let mut out = self
            .client
            .invoke_model_with_response_stream()
            .model_id(&self.opts.model_id)
            .content_type("application/json")
            .accept("application/json")
            .body(Blob::new(body))
            .send()
            .await
            .map_err(classify)?;
        let (mut text, mut usage, mut stop) = (String::new(), Usage::default(), None::<String>);
        let mut guardrail = None::<String>;
        while let Some(event) = out.body.recv().await.map_err(classify)? {
            let ResponseStream::Chunk(part) = event else {
                continue;
            };
            let Some(bytes) = part.bytes() else { continue };
            let Ok(chunk) = serde_json::from_slice::<Value>(bytes.as_ref()) else {
                tracing::warn!("bedrock: skipped an unreadable stream chunk");
                continue;
            };
            if let Some(delta) = chunk["contentBlockDelta"]["delta"]["text"].as_str() {
                text.push_str(delta);
                let _ = deltas.send(delta.to_owned());
            }
            if let Some(reason) = chunk["messageStop"]["stopReason"].as_str() {
                stop = Some(reason.to_owned());
            }
            if let Some(action) = chunk["amazon-bedrock-guardrailAction"].as_str() {
                guardrail = Some(action.to_owned());
            }
            if let Some(u) = usage_of(&chunk["metadata"]).or_else(|| usage_of(&chunk)) {
                usage = u;
            }
        }
        check_stop(stop.as_deref(), guardrail.as_deref())?;
        Ok(ModelOutput {
            value: text,
            usage,
            model: self.opts.model_id.clone(),
        })
    }
}

#[async_trait]
impl ChatModel for BedrockChatModel {
    fn model(&self) -> &str {
        &self.opts.model_id
    }

    async fn reply(
        &self,
        request: &ChatRequest,
        deltas: Option<UnboundedSender<String>>,
    ) -> Result<ModelOutput<String>> {
        let body = serde_json::to_vec(&nova_body(request, &self.opts))?;
        let out = match deltas {
            Some(tx) if self.opts.stream => self.invoke_streaming(body, tx).await?,
            _ => self.invoke(body).await?,
        };
        if out.value.trim().is_empty() {
            return Err(Error::ModelTransient {
                message: "bedrock: empty reply".into(),
                retry_after: None,
            });
        }
        Ok(out)
    }

    async fn summarize(&self, request: &SummaryRequest) -> Result<ModelOutput<String>> {
        let (system, user) = summary_prompt(request);
        let body = json!({
            "schemaVersion": "messages-v1",
            "system": [{ "text": system }],
            "messages": [{ "role": "user", "content": [{ "text": user }] }],
            "inferenceConfig": {
                "maxTokens": request.max_tokens,
                // A summary is a record, not a performance: no variety wanted.
                "temperature": 0.2,
                "topP": self.opts.top_p,
            },
        });
        let mut out = self.invoke(serde_json::to_vec(&body)?).await?;
        if out.value.trim().is_empty() {
            return Err(Error::ModelTransient {
                message: "bedrock: empty summary".into(),
                retry_after: None,
            });
        }
        out.value = fit_summary(&out.value, request.max_tokens, |t| self.count_tokens(t));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Message, Persona, PersonaDraft, PersonaSource};

    fn msg(role: Role, text: &str) -> Message {
        Message {
            created_at: String::new(),
            ..Message::new(text.into(), role, text.into(), None)
        }
    }

    #[test]
    fn turns_alternate_and_begin_with_the_user() {
        let persona = Persona::from_draft(
            "per_1".into(),
            PersonaDraft {
                name: "Yoda".into(),
                description: "A Jedi Master.".into(),
                personality: "Wise.".into(),
                speaking_style: "Inverted.".into(),
                greeting: "Hmm.".into(),
                source: PersonaSource::Famous,
            },
            "offline".into(),
            "Yoda".into(),
        );
        let request = ChatRequest {
            persona,
            history: vec![
                msg(Role::Assistant, "cut-off reply"),
                msg(Role::User, "a"),
                msg(Role::User, "b"),
                msg(Role::Assistant, "c"),
            ],
            user_text: "d".into(),
            variation: None,
            memory: Default::default(),
        };
        let opts = BedrockOptions {
            model_id: DEFAULT_MODEL.into(),
            max_tokens: 300,
            temperature: 0.7,
            top_p: 0.9,
            stream: false,
            timeout: Duration::from_secs(5),
        };
        let body = nova_body(&request, &opts);
        assert_eq!(body["schemaVersion"], "messages-v1");
        assert!(body["system"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("You are Yoda."));
        assert_eq!(
            body["messages"],
            json!([
                { "role": "user", "content": [{ "text": CONVERSATION_BEGINS }] },
                { "role": "assistant", "content": [{ "text": "cut-off reply" }] },
                { "role": "user", "content": [{ "text": "a\n\nb" }] },
                { "role": "assistant", "content": [{ "text": "c" }] },
                { "role": "user", "content": [{ "text": "d" }] },
            ])
        );
        assert_eq!(body["inferenceConfig"]["maxTokens"], 300);
    }
}
