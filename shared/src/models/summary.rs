//! A conversation's rolling summary: what the memory job asks a chat model for when turns fall
//! out of the context. Providers write it with their chat model from [`summary_prompt`]; the
//! offline engine (and any model without its own) extracts it ([`extractive_summary`]), the
//! same way every time. Either way the result is cut to its budget by [`fit_summary`], newest
//! kept, so a summary never crowds the turns out of the context it is part of.

use crate::domain::{Memory, Message, Role};

/// What a summary is written from.
#[derive(Debug, Clone)]
pub struct SummaryRequest {
    /// Who the user talks to: how the persona's turns are labelled.
    pub persona_name: String,
    /// The summary so far (empty at first).
    pub summary: String,
    /// The user's pinned facts: kept apart, never restated or rewritten by a summary.
    pub pinned: Vec<String>,
    /// The turns to fold in, oldest first.
    pub turns: Vec<Message>,
    /// Its budget, in the chat model's tokens.
    pub max_tokens: usize,
}

impl SummaryRequest {
    fn speaker(&self, message: &Message) -> &str {
        match message.role {
            Role::User => "User",
            Role::Assistant => &self.persona_name,
        }
    }

    /// The new turns as a transcript, a line each.
    pub fn transcript(&self) -> String {
        self.turns
            .iter()
            .filter(|m| !m.text.trim().is_empty())
            .map(|m| format!("{}: {}", self.speaker(m), m.text.trim()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The system and user messages that ask a chat model for the new summary.
pub fn summary_prompt(request: &SummaryRequest) -> (String, String) {
    let words = (request.max_tokens * 3 / 4).max(20);
    let mut system = format!(
        "You keep the running summary of a role-play chat between a user and {name}, so that \
         the chat can go on once its early turns are no longer shown. Rewrite the summary so \
         that it also covers the new turns: keep names, facts the user shared, decisions, \
         promises and open threads; leave out small talk. Write plain prose in the third \
         person, at most {words} words, and reply with the summary alone.",
        name = request.persona_name,
    );
    if !request.pinned.is_empty() {
        system.push_str(
            "\nThese facts are kept apart, word for word: do not restate or change them.",
        );
        for fact in &request.pinned {
            system.push_str("\n- ");
            system.push_str(fact);
        }
    }
    let so_far = if request.summary.is_empty() {
        "(none yet)"
    } else {
        request.summary.as_str()
    };
    let user = format!(
        "Summary so far:\n{so_far}\n\nNew turns:\n{}",
        request.transcript()
    );
    (system, user)
}

/// Most words of a message an extractive summary keeps.
const EXTRACT_WORDS: usize = 24;

/// The offline summary: the summary so far, then a line per new message, its first sentence
/// (at most [`EXTRACT_WORDS`] words) after its speaker; cut to the budget by [`fit_summary`].
pub fn extractive_summary(request: &SummaryRequest, count: impl Fn(&str) -> usize) -> String {
    let mut lines: Vec<String> = Vec::new();
    if !request.summary.is_empty() {
        lines.push(request.summary.clone());
    }
    for message in &request.turns {
        let sentence = first_sentence(&message.text, EXTRACT_WORDS);
        if !sentence.is_empty() {
            lines.push(format!("{}: {sentence}", request.speaker(message)));
        }
    }
    fit_summary(&lines.join("\n"), request.max_tokens, count)
}

/// The first sentence of `text`, at most `max_words` words (cut with "…").
fn first_sentence(text: &str, max_words: usize) -> String {
    let text = text.trim();
    let end = text
        .char_indices()
        .find(|&(i, c)| {
            matches!(c, '.' | '!' | '?')
                && text[i + c.len_utf8()..].starts_with(char::is_whitespace)
        })
        .map_or(text.len(), |(i, c)| i + c.len_utf8());
    let words: Vec<&str> = text[..end].split_whitespace().collect();
    let mut sentence = words[..words.len().min(max_words)].join(" ");
    if words.len() > max_words {
        sentence.push('…');
    }
    sentence
}

/// `text` cut to `max_tokens` (as `count` counts) and to [`Memory::SUMMARY_MAX_CHARS`], by
/// dropping whole lines and sentences from its beginning: the oldest part goes first.
pub fn fit_summary(text: &str, max_tokens: usize, count: impl Fn(&str) -> usize) -> String {
    let pieces = pieces(text.trim());
    let fits = |s: &str| count(s) <= max_tokens && s.chars().count() <= Memory::SUMMARY_MAX_CHARS;
    // Each piece counted once, the newest first: where the kept part begins is found in one
    // pass (a summary at its cap sheds a few pieces at each fold; counting every candidate
    // whole was quadratic in its length). A tokenizer need not count a text as the sum of its
    // pieces, so the candidate is counted whole too, and moved on while it does not fit.
    let (mut tokens, mut chars) = (0, 0);
    let mut start = pieces.len();
    for (i, piece) in pieces.iter().enumerate().rev() {
        tokens += count(piece);
        chars += piece.chars().count();
        if tokens > max_tokens || chars > Memory::SUMMARY_MAX_CHARS {
            break;
        }
        start = i;
    }
    for start in start.min(pieces.len().saturating_sub(1))..pieces.len() {
        let kept = pieces[start..].concat();
        if fits(kept.trim()) {
            return kept.trim().to_owned();
        }
    }
    // Not even the last sentence fits: its words, as many as do.
    let last = pieces.last().copied().unwrap_or_default().trim();
    let mut cut = String::new();
    for word in last.split_whitespace() {
        let longer = if cut.is_empty() {
            word.to_owned()
        } else {
            format!("{cut} {word}")
        };
        if !fits(&longer) {
            break;
        }
        cut = longer;
    }
    cut
}

/// `text` in lines and sentences, each with what ends it.
fn pieces(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let next_blank = chars.peek().is_some_and(|&(_, n)| n.is_whitespace());
        if c == '\n' || (matches!(c, '.' | '!' | '?') && next_blank) {
            let end = i + c.len_utf8();
            out.push(&text[start..end]);
            start = end;
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: Role, text: &str) -> Message {
        Message::new("m".into(), role, text.into(), None)
    }

    fn request(turns: Vec<Message>, max_tokens: usize) -> SummaryRequest {
        SummaryRequest {
            persona_name: "Sherlock Holmes".into(),
            summary: "They met at Baker Street.".into(),
            pinned: vec!["Alice is allergic to cats".into()],
            turns,
            max_tokens,
        }
    }

    fn words(t: &str) -> usize {
        t.split_whitespace().count()
    }

    #[test]
    fn an_extractive_summary_keeps_the_summary_and_each_messages_first_sentence() {
        let r = request(
            vec![
                msg(
                    Role::User,
                    "My cousin Ada vanished on Tuesday. Can you help?",
                ),
                msg(Role::Assistant, "Elementary. Tell me everything."),
            ],
            1000,
        );
        assert_eq!(
            extractive_summary(&r, words),
            "They met at Baker Street.\nUser: My cousin Ada vanished on Tuesday.\n\
             Sherlock Holmes: Elementary."
        );
        assert_eq!(extractive_summary(&r, words), extractive_summary(&r, words));
    }

    #[test]
    fn a_summary_over_its_budget_loses_its_oldest_part_first() {
        let text = "One two three. Four five.\nSix seven eight nine.";
        assert_eq!(fit_summary(text, 100, words), text);
        assert_eq!(
            fit_summary(text, 6, words),
            "Four five.\nSix seven eight nine."
        );
        assert_eq!(fit_summary(text, 4, words), "Six seven eight nine.");
        assert_eq!(fit_summary(text, 2, words), "Six seven");
        let long = "word ".repeat(2000);
        assert!(fit_summary(&long, 10_000, words).chars().count() <= Memory::SUMMARY_MAX_CHARS);
    }

    #[test]
    fn the_prompt_carries_the_summary_the_new_turns_and_keeps_pinned_facts_apart() {
        let r = request(vec![msg(Role::User, "I found a red key.")], 400);
        let (system, user) = summary_prompt(&r);
        assert!(system.contains("Sherlock Holmes") && system.contains("at most 300 words"));
        assert!(system.contains("- Alice is allergic to cats"), "{system}");
        assert!(
            user.contains("They met at Baker Street.") && user.contains("User: I found a red key.")
        );
    }
}
