//! The memory job: folds the turns that fell out of the model's context into the
//! conversation's rolling summary, so a long conversation does not forget its beginning.
//!
//! A chat job sees what its context drops ([`fold_due`]) and queues a
//! [`MemoryJob`](shared::job::MemoryJob) for it; this job reads the turns, asks the chat model
//! for the new summary (the offline engine extracts it) and writes it with the last message it
//! covers, on condition that the memory is still as read. A fold runs ahead of the context's
//! edge by [`FOLD_AHEAD`] messages, so the turns about to drop are summarized before they do,
//! and the next fold is due only some turns later: about one summary call per eight turns
//! once a conversation outgrows its context.

use std::sync::Arc;

use shared::domain::{Memory, Message, Role};
use shared::ids::MessageId;
pub use shared::job::MemoryJob;
use shared::models::{ChatModel, SummaryRequest};
use shared::store::Store;
use shared::{Error, Result};

/// Messages still in the context that a fold covers as well.
pub const FOLD_AHEAD: usize = 16;
/// A fold is due once fewer than this many messages of the context are summarized.
const MIN_AHEAD: usize = 2;
/// Most messages one fold reads: a fold is due every few turns, so this is far more than one
/// needs; a memory that lags further (its folds failing for many turns) resumes from the
/// newest of them.
pub const FOLD_READ: usize = 64;

/// A fold a chat job found due: the `after`, `until` and `messages` of a [`MemoryJob`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fold {
    pub after: Option<MessageId>,
    pub until: MessageId,
    pub messages: usize,
}

/// The fold a chat job's context calls for, if any. `read` is the history read before the
/// message being answered (oldest first), `kept_from` the index of the first message the
/// model is given, `current` the (user) message being answered.
pub fn fold_due(
    read: &[Message],
    kept_from: usize,
    memory: &Memory,
    current: &MessageId,
) -> Option<Fold> {
    let covered_to = memory
        .summarized_through
        .as_ref()
        .and_then(|through| read.iter().position(|m| &m.message_id == through))
        .map(|p| p + 1);
    let due = match covered_to {
        // Nothing dropped yet, or what dropped is summarized with some to spare.
        Some(end) => end < kept_from + MIN_AHEAD,
        None => kept_from > 0,
    };
    if !due {
        return None;
    }
    // A user message: a fold takes whole turns (a store finds a turn by its user message).
    let (at, until) = read
        .iter()
        .enumerate()
        .skip(kept_from + FOLD_AHEAD)
        .find(|(_, m)| m.role == Role::User)
        .map_or_else(
            || (read.len(), current.clone()),
            |(i, m)| (i, m.message_id.clone()),
        );
    Some(Fold {
        after: memory.summarized_through.clone(),
        until,
        // Just the messages after the summary's end; a first fold, or one whose summary ends
        // before what was read, reads as far back as a fold goes.
        messages: covered_to.map_or(FOLD_READ, |end| at.saturating_sub(end)),
    })
}

/// Runs memory jobs.
pub struct Summarizer {
    pub store: Arc<dyn Store>,
    pub model: Arc<dyn ChatModel>,
    /// A summary's budget, in the chat model's tokens (a share of the context's).
    pub summary_tokens: usize,
}

impl Summarizer {
    /// Brings the memory up to `job.until`; done (and nothing written) when the memory moved
    /// on since the job was queued, or its conversation is gone.
    pub async fn run(&self, job: &MemoryJob) -> Result<()> {
        let read = match self
            .store
            .get_memory(&job.user_id, &job.conversation_id)
            .await
        {
            Ok(memory) => memory,
            Err(Error::NotFound) => return Ok(()),
            Err(e) => return Err(e),
        };
        if read.summarized_through != job.after {
            tracing::info!("memory moved on since the fold was queued; nothing to do");
            return Ok(());
        }
        let turns = self.turns_of(job).await?;
        let Some(last) = turns.last().map(|m| m.message_id.clone()) else {
            return Ok(());
        };
        let out = self
            .model
            .summarize(&SummaryRequest {
                persona_name: job.persona_name.clone(),
                summary: read.summary.clone(),
                pinned: read.pinned.clone(),
                turns,
                max_tokens: self.summary_tokens,
            })
            .await;
        let summary = match out {
            Ok(out) => {
                tracing::info!(model = %out.model, "memory folded");
                out.value
            }
            // The model refuses these turns (a content filter): they are passed over, the
            // summary kept as it was, rather than asked for again at every later turn.
            Err(e) if !e.is_transient() => {
                tracing::warn!(error = %shared::error::Report(&e), "the model would not summarize these turns; passed over");
                read.summary.clone()
            }
            Err(e) => return Err(e),
        };
        let folded = Memory {
            summary,
            summarized_through: Some(last),
            ..read.clone()
        };
        let written = self
            .store
            .replace_memory(&job.user_id, &job.conversation_id, &read, &folded)
            .await;
        match written {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!("memory changed while it was folded; the next turn queues it again")
            }
            Err(Error::NotFound) => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// The messages a fold takes: after `job.after` (when found) and before `job.until`.
    async fn turns_of(&self, job: &MemoryJob) -> Result<Vec<Message>> {
        // One more than the fold's messages: the summary's last, to find where to begin.
        let wanted = job.messages.min(FOLD_READ) + 1;
        let mut turns = self
            .store
            .history_before(&job.conversation_id, &job.until, wanted)
            .await?;
        if let Some(after) = &job.after {
            if let Some(p) = turns.iter().position(|m| &m.message_id == after) {
                turns.drain(..=p);
            }
        }
        Ok(turns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(n: usize) -> Vec<Message> {
        (0..n)
            .map(|i| Message::new(format!("m{i}").into(), Role::User, format!("t{i}"), None))
            .collect()
    }

    fn through(id: &str) -> Memory {
        Memory {
            summarized_through: Some(id.into()),
            ..Memory::default()
        }
    }

    fn fold(after: Option<&str>, until: &str, messages: usize) -> Option<Fold> {
        Some(Fold {
            after: after.map(Into::into),
            until: until.into(),
            messages,
        })
    }

    #[test]
    fn a_fold_is_due_when_the_context_drops_what_the_summary_lacks() {
        let read = history(21);
        let now = "now".into();
        // All fits: nothing to fold.
        assert_eq!(fold_due(&read, 0, &Memory::default(), &now), None);
        // The first drop: fold ahead of the context's edge, reading as far back as folds go.
        assert_eq!(
            fold_due(&read, 1, &Memory::default(), &now),
            fold(None, "m17", FOLD_READ)
        );
        // Summarized well into the context: not yet.
        assert_eq!(fold_due(&read, 11, &through("m12"), &now), None);
        // The summarized part of the context runs short: again, from where it ended (the
        // eight messages after it).
        assert_eq!(
            fold_due(&read, 12, &through("m12"), &now),
            fold(Some("m12"), "now", 8)
        );
        // What it covers is older than all that was read: due.
        assert_eq!(
            fold_due(&read, 1, &through("gone"), &now),
            fold(Some("gone"), "m17", FOLD_READ)
        );
    }
}
