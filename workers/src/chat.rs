//! The chat job: answers one user message in character.
//!
//! Context is the persona (as system prompt, with the conversation's pinned facts and summary)
//! plus the most recent messages before the one being answered, cut to a message count and a
//! token budget; when what is cut is not yet summarized, a fold of the memory is queued
//! (`crate::memory`). The reply is keyed by the user
//! message it answers and stored by the settlement only if none exists, so a conversation gets
//! exactly one reply per message however often the job is delivered. Text fragments of a streaming model are
//! pushed to the user's event stream as `message.delta` while the reply is being written; the
//! last one goes out with the settlement, just before the `request.updated` that ends it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use shared::domain::{
    Message, MessageStatus, RequestInput, RequestKind, RequestRecord, RequestResult,
};
use shared::events::Event;
use shared::events::EventBus;
use shared::ids::{ConversationId, MessageId, RequestId};
use shared::job::MemoryJob;
use shared::memo::Memo;
use shared::models::{system_prompt, ChatModel, ChatRequest, ModelOutput};
use shared::queue::Queue;
use shared::store::Store;
use shared::{Error, Result};
use tokio::sync::mpsc::error::TryRecvError;

use crate::consumer::{Job, JobContext, JobOutput};
use crate::memory::{fold_due, Fold};

pub struct ChatJob {
    pub store: Arc<dyn Store>,
    pub model: Arc<dyn ChatModel>,
    pub events: Arc<dyn EventBus>,
    pub history_messages: usize,
    pub context_tokens: usize,
    /// Where a fold of the conversation's memory is queued (the chat queue).
    pub memory_queue: Arc<dyn Queue>,
    /// The folds this process queued lately, by conversation (from where, and when): the
    /// turns that follow before a fold is done find it still due, and would queue it again.
    pub queued_folds: Arc<Memo<ConversationId, (Option<MessageId>, Instant)>>,
}

/// How long a queued fold is taken to be on its way (after that it is queued again).
const FOLD_PENDING: Duration = Duration::from_secs(60);

fn permanent(code: &str, message: &str) -> Error {
    Error::ModelPermanent {
        code: code.into(),
        message: message.into(),
    }
}

/// The reply a chat request writes (a version of): the one it regenerates, or its own.
fn reply_id_of(request: &RequestRecord) -> MessageId {
    match &request.input {
        RequestInput::Chat {
            reply_to: Some(reply),
            ..
        } => reply.clone(),
        _ => request.request_id.reply_id(),
    }
}

/// Tokens a message costs beyond its text (role markers and separators, as chat formats add).
const PER_MESSAGE_TOKENS: usize = 4;

/// Keeps the newest messages that fit in `budget` tokens, as `count` counts them.
pub fn fit_history(
    mut history: Vec<Message>,
    budget: usize,
    count: impl Fn(&str) -> usize,
) -> Vec<Message> {
    let mut used = 0;
    let keep_from = history
        .iter()
        .rposition(|m| {
            used += count(&m.text) + PER_MESSAGE_TOKENS;
            used > budget
        })
        .map_or(0, |i| i + 1);
    history.drain(..keep_from);
    history
}

#[async_trait]
impl Job for ChatJob {
    fn kind(&self) -> RequestKind {
        RequestKind::Chat
    }

    fn stopped(&self, request: &RequestRecord, written: String) -> Option<RequestResult> {
        self.cancelled_reply(request, written)
    }

    async fn run(&self, request: &RequestRecord, ctx: &JobContext) -> Result<JobOutput> {
        let chat = self.chat_request(request, &ctx.user_id).await?;
        let (out, last_fragment) = self
            .reply_streaming(&chat, ctx, &request.request_id)
            .await?;
        let reply = Message::reply(
            reply_id_of(request),
            &request.request_id,
            out.value,
            &out.model,
            MessageStatus::Complete,
        );
        Ok(JobOutput {
            last_fragment,
            result: RequestResult::Message(reply),
            usage: out.usage,
            model: out.model,
        })
    }
}

impl ChatJob {
    /// The beginning of a reply whose user cancelled it midway: a `cancelled` message.
    fn cancelled_reply(&self, request: &RequestRecord, written: String) -> Option<RequestResult> {
        if written.trim().is_empty() {
            return None;
        }
        Some(RequestResult::Message(Message::reply(
            reply_id_of(request),
            &request.request_id,
            written,
            self.model.model(),
            MessageStatus::Cancelled,
        )))
    }

    /// What the model is asked: the persona, the history that fits, the user's text.
    async fn chat_request(&self, request: &RequestRecord, user_id: &str) -> Result<ChatRequest> {
        let RequestInput::Chat {
            conversation_id,
            message_id,
            text,
            ..
        } = &request.input
        else {
            return Err(permanent(
                "invalid_request",
                "chat job got a request of another kind",
            ));
        };
        // One more than is given: the message before the context's edge tells whether the
        // summary reaches it (see `crate::memory::fold_due`).
        let context = self
            .store
            .chat_context(
                user_id,
                conversation_id,
                message_id,
                self.history_messages + 1,
            )
            .await?
            .ok_or_else(|| {
                permanent(
                    "conversation_not_found",
                    "the conversation no longer exists",
                )
            })?;
        if context.cancelled.as_ref() == Some(&request.request_id) {
            return Err(Error::Cancelled);
        }
        let persona = context.persona.ok_or_else(|| {
            permanent(
                "persona_not_found",
                "the conversation's persona was deleted",
            )
        })?;
        let mut chat = ChatRequest {
            variation: (reply_id_of(request) != request.request_id.reply_id())
                .then(|| request.request_id.to_string()),
            memory: context.memory,
            history: Vec::new(),
            persona,
            user_text: text.clone(),
        };
        let kept_from = self.fit(&mut chat, &context.history);
        if chat.variation.is_none() {
            let due = fold_due(&context.history, kept_from, &chat.memory, message_id);
            if let Some(fold) = due {
                self.queue_fold(fold, user_id, conversation_id, &chat.persona.name);
            }
        }
        Ok(chat)
    }

    /// Gives `chat` the newest of the messages `read` that fit its budget (at most
    /// `history_messages`); returns the index in `read` of the first one given.
    fn fit(&self, chat: &mut ChatRequest, read: &[Message]) -> usize {
        // What is sent whatever the history: the system prompt and the message.
        let fixed = self.model.count_tokens(&system_prompt(chat))
            + self.model.count_tokens(&chat.user_text)
            + 2 * PER_MESSAGE_TOKENS;
        let budget = self.context_tokens.saturating_sub(fixed);
        let window = read.len().saturating_sub(self.history_messages);
        chat.history = fit_history(read[window..].to_vec(), budget, |t| {
            self.model.count_tokens(t)
        });
        read.len() - chat.history.len()
    }

    /// Queues a fold of the memory (never for a regeneration, which answers a turn the
    /// summary may have passed), beside the reply rather than before it: the send is a
    /// durable write, and waiting for its commit held up one turn in seven of a long
    /// conversation by a whole commit. A send that fails, or is lost with the process, is only
    /// logged: the next turn finds the fold still due and queues it again.
    fn queue_fold(
        &self,
        fold: Fold,
        user_id: &str,
        conversation_id: &ConversationId,
        persona_name: &str,
    ) {
        let job = MemoryJob {
            user_id: user_id.to_owned(),
            conversation_id: conversation_id.clone(),
            after: fold.after,
            until: fold.until,
            messages: fold.messages,
            persona_name: persona_name.to_owned(),
        };
        let pending = self.queued_folds.get(&job.conversation_id);
        if pending.is_some_and(|(after, at)| after == job.after && at.elapsed() < FOLD_PENDING) {
            return;
        }
        // Taken as queued now, so the turns that follow while the send is under way do not
        // queue it again; forgotten if the send fails (unless a later fold took its place).
        let pending = (job.after.clone(), Instant::now());
        self.queued_folds
            .insert(job.conversation_id.clone(), pending.clone());
        let (queue, queued) = (self.memory_queue.clone(), self.queued_folds.clone());
        tokio::spawn(async move {
            if let Err(e) = queue.send(&[job.encode()]).await {
                tracing::warn!(error = %shared::error::Report(&e), "could not queue a memory fold");
                queued.forget_if(&job.conversation_id, &pending);
            }
        });
    }

    /// Calls the model, pushing its fragments to the user's stream as they come. Returns the
    /// reply and the fragment not yet pushed (it goes out with the settlement).
    async fn reply_streaming(
        &self,
        chat: &ChatRequest,
        ctx: &JobContext,
        request_id: &RequestId,
    ) -> Result<(ModelOutput<String>, Option<String>)> {
        let user_id = ctx.user_id.as_str();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let events = &self.events;
        // Forwarded in this task, beside the model call: a fast reply then costs no extra task
        // or wake-up. Fragments that arrived while the last one was being published go out as
        // one event, so a fast model costs a few writes, not one per word. What is left when
        // the model is done (all of the reply, when it came at once) is returned, and goes out
        // with the settlement instead of in a write of its own.
        let forward = async move {
            while let Some(mut text) = rx.recv().await {
                let closed = loop {
                    match rx.try_recv() {
                        Ok(more) => text.push_str(&more),
                        Err(TryRecvError::Empty) => break false,
                        Err(TryRecvError::Disconnected) => break true,
                    }
                };
                // Kept for a cancel midway (see `Job::stopped`).
                ctx.written
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&text);
                if closed {
                    return Some(text);
                }
                // Seen running before its first fragment (see `crate::start`); nothing more of a
                // job whose request finished elsewhere.
                ctx.start.ensure().await;
                if ctx.start.is_superseded() {
                    continue;
                }
                if let Err(e) = events
                    .publish(user_id, &Event::delta(request_id, &text))
                    .await
                {
                    tracing::warn!(error = %shared::error::Report(&e), "could not push a reply fragment");
                }
            }
            None
        };
        let (out, last_fragment) = tokio::join!(self.model.reply(chat, Some(tx)), forward);
        match out {
            Ok(out) => Ok((out, last_fragment)),
            Err(e) => {
                // No settlement will carry the rest: push it now, as before the failure.
                if let Some(text) = last_fragment {
                    ctx.start.ensure().await;
                    let _ = events
                        .publish(user_id, &Event::delta(request_id, &text))
                        .await;
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(text: &str) -> Message {
        Message::new(text.into(), shared::domain::Role::User, text.into(), None)
    }

    #[test]
    fn history_keeps_the_newest_messages_that_fit() {
        let h = vec![msg("aaaa"), msg("bbbb"), msg("cc")];
        // Counted a token a character: each message costs its length and the overhead.
        let chars = |t: &str| t.chars().count();
        let two = 4 + 2 + 2 * PER_MESSAGE_TOKENS;
        let kept: Vec<_> = fit_history(h.clone(), two, chars)
            .into_iter()
            .map(|m| m.text)
            .collect();
        assert_eq!(kept, ["bbbb", "cc"]);
        assert_eq!(fit_history(h.clone(), 100, chars).len(), 3);
        assert!(fit_history(h, 1, chars).is_empty());
    }
}
