//! OpenAI (or any OpenAI-compatible server: llama.cpp, Ollama, vLLM) through `async-openai`.
//!
//! - [`OpenAiPersonaModel`]: Chat Completions with `response_format: json_schema`,
//!   `strict: true`, the schema generated from [`PersonaDraft`]. Refusals, truncated or
//!   filtered output, and output that does not parse or validate are told apart.
//! - [`OpenAiChatModel`]: the same client as a chat provider, the persona as system message.
//!
//! The client makes no retries of its own (async-openai retries only when a retry layer is
//! installed, and none is): the worker retries in one place. HTTP errors are caught and
//! classified in a tower service below the client, where status, `Retry-After` and the
//! provider's message are all at hand.

use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedSender;

use super::summary::{fit_summary, summary_prompt, SummaryRequest};
use super::{system_prompt, ChatModel, ChatRequest, ModelOutput, PersonaModel};
use crate::domain::{PersonaDraft, Role, Usage};
use crate::{Error, Result};

mod schema;
pub use schema::persona_schema;

/// The instructions of the persona agent.
pub const PERSONA_SYSTEM_PROMPT: &str = "You create character personas for a role-play chat app. \
The user names a character or describes one. If the text names a well-known real or fictional \
character, describe that character faithfully with their real traits, set `source` to \"famous\" \
and use their usual name. Otherwise invent an original character that fits the description, give \
them a memorable name, and set `source` to \"original\". `description`: one or two sentences on \
who they are. `personality`: their key traits. `speaking_style`: how they talk. `greeting`: the \
first line they would say to a new acquaintance, in their own voice. Refuse only for requests \
that are hateful, sexual involving minors, or meant to harass a real private person.";

/// Settings of the OpenAI client.
#[derive(Debug, Clone)]
pub struct OpenAiOptions {
    pub api_key: String,
    pub base_url: String,
    pub organization: Option<String>,
    pub model: String,
    pub timeout: Duration,
    pub max_output_tokens: u32,
}

/// `Retry-After` as seconds or an HTTP date; OpenAI also sends `retry-after-ms`.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    let value = headers.get("retry-after")?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return Some(Duration::from_secs_f64(secs.max(0.0)));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// Maps a provider failure to our transient/permanent split.
fn classify(e: OpenAIError) -> Error {
    match e {
        // Our transport (see `client`) has already classified HTTP failures.
        OpenAIError::Boxed(inner) => match inner.downcast::<Error>() {
            Ok(classified) => *classified,
            Err(other) => Error::ModelTransient {
                message: format!("openai: {other}"),
                retry_after: None,
            },
        },
        OpenAIError::ApiError(api) => {
            classify_status(api.status_code.as_u16(), None, api.api_error.to_string())
        }
        OpenAIError::Reqwest(e) => Error::ModelTransient {
            message: format!(
                "openai: {}",
                if e.is_timeout() {
                    "request timed out".to_string()
                } else {
                    e.to_string()
                }
            ),
            retry_after: None,
        },
        OpenAIError::JSONDeserialize(e, _) => Error::ModelTransient {
            message: format!("openai: unreadable response: {e}"),
            retry_after: None,
        },
        other => Error::ModelPermanent {
            code: "provider_error".into(),
            message: format!("openai: {other}"),
        },
    }
}

fn classify_status(status: u16, retry_after: Option<Duration>, message: String) -> Error {
    let message = format!("openai: {message}");
    match status {
        408 | 409 | 429 | 500..=599 => Error::ModelTransient {
            message,
            retry_after,
        },
        401 | 403 => Error::ModelPermanent {
            code: "provider_auth_failed".into(),
            message,
        },
        404 => Error::ModelPermanent {
            code: "provider_model_not_found".into(),
            message,
        },
        _ => Error::ModelPermanent {
            code: "provider_rejected".into(),
            message,
        },
    }
}

/// The client, with a transport that reports HTTP failures in full and never retries.
fn client(opts: &OpenAiOptions) -> Result<async_openai::Client<OpenAIConfig>> {
    let http = reqwest::Client::builder()
        .timeout(opts.timeout)
        .build()
        .map_err(|e| Error::config("http client", e))?;
    let mut config = OpenAIConfig::new()
        .with_api_key(opts.api_key.clone())
        .with_api_base(opts.base_url.trim_end_matches('/'));
    if let Some(org) = &opts.organization {
        config = config.with_org_id(org.clone());
    }
    let service = tower::service_fn(move |factory: HttpRequestFactory| {
        let http = http.clone();
        async move {
            let request = factory.build().await?;
            let response = http.execute(request).await.map_err(OpenAIError::Reqwest)?;
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            let retry_after = retry_after(response.headers());
            let body = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| body.chars().take(300).collect());
            Err(OpenAIError::Boxed(Box::new(classify_status(
                status.as_u16(),
                retry_after,
                message,
            ))))
        }
    });
    Ok(async_openai::Client::with_config(config).with_http_service(service))
}

fn usage_of(body: &Value) -> Usage {
    Usage {
        input_tokens: body["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
        output_tokens: body["usage"]["completion_tokens"].as_u64().unwrap_or(0),
    }
}

pub struct OpenAiPersonaModel {
    client: async_openai::Client<OpenAIConfig>,
    opts: OpenAiOptions,
}

impl OpenAiPersonaModel {
    pub fn new(opts: OpenAiOptions) -> Result<Self> {
        Ok(OpenAiPersonaModel {
            client: client(&opts)?,
            opts,
        })
    }

    /// One call; `Ok(Err(reason))` when the output was not a valid persona.
    async fn attempt(
        &self,
        prompt: &str,
    ) -> Result<(std::result::Result<PersonaDraft, String>, Usage)> {
        let request = json!({
            "model": self.opts.model,
            "messages": [
                { "role": "system", "content": PERSONA_SYSTEM_PROMPT },
                { "role": "user", "content": prompt },
            ],
            "response_format": {
                "type": "json_schema",
                "json_schema": { "name": "persona", "strict": true, "schema": persona_schema() },
            },
            "max_completion_tokens": self.opts.max_output_tokens,
            "stream": false,
        });
        let body: Value = self
            .client
            .chat()
            .create_byot(request)
            .await
            .map_err(classify)?;
        let usage = usage_of(&body);
        let choice = &body["choices"][0];
        if let Some(refusal) = choice["message"]["refusal"].as_str() {
            return Err(Error::ModelPermanent {
                code: "persona_refused".into(),
                message: refusal.to_owned(),
            });
        }
        match choice["finish_reason"].as_str() {
            Some("length") => {
                return Err(Error::ModelPermanent {
                    code: "model_output_truncated".into(),
                    message: format!(
                        "the persona did not fit in {} output tokens",
                        self.opts.max_output_tokens
                    ),
                })
            }
            Some("content_filter") => {
                return Err(Error::ModelPermanent {
                    code: "content_filtered".into(),
                    message: "the provider's content filter stopped the persona".into(),
                })
            }
            _ => {}
        }
        let content = choice["message"]["content"].as_str().unwrap_or_default();
        let parsed = serde_json::from_str::<PersonaDraft>(content)
            .map_err(|e| format!("output does not match the persona schema: {e}"))
            .and_then(|draft| draft.validate().map(|()| draft));
        Ok((parsed, usage))
    }
}

#[async_trait]
impl PersonaModel for OpenAiPersonaModel {
    fn model(&self) -> &str {
        &self.opts.model
    }

    async fn create_persona(&self, prompt: &str) -> Result<ModelOutput<PersonaDraft>> {
        let mut total = Usage::default();
        let mut reason = String::new();
        // Output that does not match the schema is asked for once more, then given up on.
        for _ in 0..2 {
            let (parsed, usage) = self.attempt(prompt).await?;
            total.input_tokens += usage.input_tokens;
            total.output_tokens += usage.output_tokens;
            match parsed {
                Ok(draft) => {
                    return Ok(ModelOutput {
                        value: draft,
                        usage: total,
                        model: self.opts.model.clone(),
                    })
                }
                Err(r) => {
                    tracing::warn!(reason = %r, "persona output invalid; asking once more");
                    reason = r;
                }
            }
        }
        Err(Error::ModelPermanent {
            code: "invalid_model_output".into(),
            message: reason,
        })
    }
}

pub struct OpenAiChatModel {
    client: async_openai::Client<OpenAIConfig>,
    opts: OpenAiOptions,
}

impl OpenAiChatModel {
    pub fn new(opts: OpenAiOptions) -> Result<Self> {
        Ok(OpenAiChatModel {
            client: client(&opts)?,
            opts,
        })
    }
}

/// Whether an OpenAI model counts its tokens with `o200k_base`.
fn uses_o200k(model: &str) -> bool {
    ["gpt-4o", "gpt-4.1", "gpt-5", "o1", "o3", "o4"]
        .iter()
        .any(|family| model.starts_with(family))
}

#[async_trait]
impl ChatModel for OpenAiChatModel {
    fn model(&self) -> &str {
        &self.opts.model
    }

    /// Counted by `o200k_base`, the tokenizer of the GPT-4o family and later (loaded on first
    /// use, once per process); other models behind an OpenAI-compatible URL are estimated.
    fn count_tokens(&self, text: &str) -> usize {
        if uses_o200k(&self.opts.model) {
            tiktoken_rs::o200k_base_singleton()
                .encode_ordinary(text)
                .len()
        } else {
            super::estimate_tokens(text) as usize
        }
    }

    async fn reply(
        &self,
        request: &ChatRequest,
        _deltas: Option<UnboundedSender<String>>,
    ) -> Result<ModelOutput<String>> {
        let mut messages = vec![json!({ "role": "system", "content": system_prompt(request) })];
        for m in &request.history {
            let role = match m.role {
                Role::User => "user",
                Role::Assistant => "assistant",
            };
            messages.push(json!({ "role": role, "content": m.text }));
        }
        messages.push(json!({ "role": "user", "content": request.user_text }));
        self.complete(messages, self.opts.max_output_tokens).await
    }

    async fn summarize(&self, request: &SummaryRequest) -> Result<ModelOutput<String>> {
        let (system, user) = summary_prompt(request);
        let messages = vec![
            json!({ "role": "system", "content": system }),
            json!({ "role": "user", "content": user }),
        ];
        let mut out = self.complete(messages, request.max_tokens as u32).await?;
        out.value = fit_summary(&out.value, request.max_tokens, |t| self.count_tokens(t));
        Ok(out)
    }
}

impl OpenAiChatModel {
    /// One chat completion, not streamed: its text, refused when empty or filtered.
    async fn complete(&self, messages: Vec<Value>, max_tokens: u32) -> Result<ModelOutput<String>> {
        let body: Value = self
            .client
            .chat()
            .create_byot(json!({
                "model": self.opts.model,
                "messages": messages,
                "max_completion_tokens": max_tokens,
                "stream": false,
            }))
            .await
            .map_err(classify)?;
        let choice = &body["choices"][0];
        if let Some(refusal) = choice["message"]["refusal"].as_str() {
            return Err(Error::ModelPermanent {
                code: "reply_refused".into(),
                message: refusal.to_owned(),
            });
        }
        if choice["finish_reason"] == "content_filter" {
            return Err(Error::ModelPermanent {
                code: "content_filtered".into(),
                message: "the provider's content filter stopped the reply".into(),
            });
        }
        let text = choice["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_owned();
        if text.is_empty() {
            return Err(Error::ModelTransient {
                message: "openai: empty reply".into(),
                retry_after: None,
            });
        }
        Ok(ModelOutput {
            value: text,
            usage: usage_of(&body),
            model: self.opts.model.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_milliseconds_and_dates() {
        use reqwest::header::{HeaderMap, HeaderValue};
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        let mut d = HeaderMap::new();
        d.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(
            retry_after(&d),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }
}
