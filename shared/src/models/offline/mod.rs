//! The offline engine: deterministic persona and chat models that need no key and no network.
//!
//! It exists so the product can be tried on any machine and tested deterministically; every
//! record it writes says `model: "offline"`. A small catalogue of well-known characters gives
//! real descriptions; any other prompt becomes an original persona built from its own words.
//! Replies are composed from the persona's fields, the last user message and the history
//! length: in character, but templated, not generated.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc::UnboundedSender;

use super::{estimate_tokens, ChatModel, ChatRequest, ModelOutput, PersonaModel};
use crate::domain::{PersonaDraft, PersonaSource, Usage};
use crate::Result;

mod catalogue;
use catalogue::{Famous, CATALOGUE, FIRST_NAMES, TRAITS};

pub const MODEL: &str = "offline";

/// FNV-1a: a stable hash, so the same input gives the same persona on every machine and
/// version (the standard library's hasher is randomly seeded).
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'' && c != '-')
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn title_case(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn find_famous(prompt: &str) -> Option<&'static Famous> {
    let padded = format!(" {} ", words(prompt).join(" "));
    CATALOGUE
        .iter()
        .find(|f| f.aliases.iter().any(|a| padded.contains(&format!(" {a} "))))
}

fn famous_by_name(name: &str) -> Option<&'static Famous> {
    CATALOGUE.iter().find(|f| f.name == name)
}

fn original_persona(prompt: &str) -> PersonaDraft {
    let all = words(prompt);
    let traits: Vec<_> = TRAITS
        .iter()
        .filter(|t| {
            all.iter()
                .any(|w| w == t.0 || w.trim_end_matches('s') == t.0)
        })
        .collect();
    // The head of the prompt ("a grumpy pirate" in "a grumpy pirate who loves cats").
    let cut = ["who", "that", "with", "which", "from", "and"];
    let head: Vec<&String> = all
        .iter()
        .skip_while(|w| ["a", "an", "the", "some"].contains(&w.as_str()))
        .take_while(|w| !cut.contains(&w.as_str()))
        .take(4)
        .collect();
    let first = FIRST_NAMES[(stable_hash(prompt) % FIRST_NAMES.len() as u64) as usize];
    let name = if head.is_empty() {
        first.to_string()
    } else {
        let title: Vec<String> = head.iter().map(|w| title_case(w)).collect();
        format!("{first} the {}", title.join(" "))
    };
    let personality = if traits.is_empty() {
        "Curious, warm and a little mischievous, with opinions shaped by the prompt that made them."
            .to_string()
    } else {
        let parts: Vec<&str> = traits.iter().map(|t| t.1).collect();
        format!("{}.", title_case(&parts.join("; ")))
    };
    let speaking_style = match traits.first() {
        Some(t) => format!("{}.", title_case(t.2)),
        None => "Plain and friendly, with vivid turns of phrase.".to_string(),
    };
    let opener = traits.first().map(|t| t.3).unwrap_or("Hello!");
    let clean_prompt = prompt.trim().trim_end_matches('.');
    PersonaDraft {
        description: format!("An original character: {clean_prompt}."),
        greeting: format!("{opener} I'm {name}. What shall we talk about?"),
        name,
        personality,
        speaking_style,
        source: PersonaSource::Original,
    }
}

/// The offline persona model.
#[derive(Debug, Clone, Default)]
pub struct OfflinePersonaModel {
    /// Simulated latency.
    pub delay: Duration,
}

#[async_trait]
impl PersonaModel for OfflinePersonaModel {
    fn model(&self) -> &str {
        MODEL
    }

    async fn create_persona(&self, prompt: &str) -> Result<ModelOutput<PersonaDraft>> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let draft = match find_famous(prompt) {
            Some(f) => PersonaDraft {
                name: f.name.into(),
                description: f.description.into(),
                personality: f.personality.into(),
                speaking_style: f.speaking_style.into(),
                greeting: f.greeting.into(),
                source: PersonaSource::Famous,
            },
            None => original_persona(prompt),
        };
        let output = format!(
            "{}{}{}{}{}",
            draft.name, draft.description, draft.personality, draft.speaking_style, draft.greeting
        );
        Ok(ModelOutput {
            usage: Usage {
                input_tokens: estimate_tokens(prompt),
                output_tokens: estimate_tokens(&output),
            },
            value: draft,
            model: MODEL.into(),
        })
    }
}

/// The offline chat model.
#[derive(Debug, Clone, Default)]
pub struct OfflineChatModel {
    /// Simulated latency, spread over the streamed fragments.
    pub delay: Duration,
}

fn snippet(text: &str, max_words: usize) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut s = words[..words.len().min(max_words)].join(" ");
    s = s.trim_end_matches(['?', '!', '.', ',']).to_string();
    if words.len() > max_words {
        s.push('…');
    }
    s
}

fn compose_reply(request: &ChatRequest) -> String {
    let p = &request.persona;
    let seed = stable_hash(&format!(
        "{}|{}|{}{}",
        p.persona_id,
        request.history.len(),
        request.user_text,
        request.variation.as_deref().unwrap_or_default()
    ));
    let opener = match famous_by_name(&p.name) {
        Some(f) => f.openers[(seed % f.openers.len() as u64) as usize].to_string(),
        None => {
            let style = p.speaking_style.to_lowercase() + " " + &p.description.to_lowercase();
            TRAITS
                .iter()
                .find(|t| style.contains(t.0) || p.speaking_style.contains(t.2))
                .map(|t| t.3.to_string())
                .unwrap_or_else(|| {
                    ["Well,", "Ah,", "Hmm,", "Indeed,"][(seed % 4) as usize].to_string()
                })
        }
    };
    let topic = snippet(&request.user_text, 12);
    let heard = if request.user_text.trim_end().ends_with('?') {
        format!("You ask: \"{topic}?\"")
    } else {
        format!("You say: \"{topic}\"")
    };
    let trait_line = p
        .personality
        .split([',', ';', '.'])
        .next()
        .unwrap_or("")
        .trim()
        .to_lowercase();
    let stances = [
        "here is what I make of it",
        "let me answer the way I always do",
        "I have an opinion on that, naturally",
        "that deserves an answer in my own manner",
    ];
    let stance = stances[((seed >> 8) % stances.len() as u64) as usize];
    // The persona's greeting (and whatever else precedes the user's first message) is not
    // something the two have exchanged.
    let exchanged = request
        .history
        .iter()
        .skip_while(|m| m.role == crate::domain::Role::Assistant)
        .count();
    let memory = match exchanged {
        0 => "This is the start of our conversation.".to_string(),
        n => format!("We have exchanged {n} messages so far, and I remember them."),
    };
    format!(
        "{opener} {heard} As {name}, {trait_line} as ever, {stance}: {answer} {memory}",
        name = p.name,
        answer = answer_for(&request.user_text, seed),
    )
}

fn answer_for(text: &str, seed: u64) -> &'static str {
    let lower = text.to_lowercase();
    if ["hello", "hi", "hey", "greetings"]
        .iter()
        .any(|g| lower.split_whitespace().next() == Some(g))
    {
        return "a fine greeting, and I return it gladly.";
    }
    if lower.contains("who are you") || lower.contains("your name") {
        return "I am exactly who I seem, and proud of it.";
    }
    let answers = [
        "the answer lies in looking closer than anyone else cares to.",
        "it depends on what you value most, and I suspect you already know.",
        "courage first, cleverness second, and a good story always.",
        "begin with what you know to be true, and the rest will follow.",
    ];
    answers[(seed % answers.len() as u64) as usize]
}

#[async_trait]
impl ChatModel for OfflineChatModel {
    fn model(&self) -> &str {
        MODEL
    }

    async fn reply(
        &self,
        request: &ChatRequest,
        deltas: Option<UnboundedSender<String>>,
    ) -> Result<ModelOutput<String>> {
        let text = compose_reply(request);
        // Stream word by word, spreading the simulated latency over the fragments, so clients
        // can exercise streaming without a provider.
        let fragments: Vec<String> = text.split_inclusive(' ').map(str::to_owned).collect();
        let pause = self.delay / fragments.len().max(1) as u32;
        for fragment in fragments {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            if let Some(tx) = &deltas {
                let _ = tx.send(fragment);
            }
        }
        let context: usize = request.history.iter().map(|m| m.text.len()).sum::<usize>()
            + request.persona.description.len()
            + request.user_text.len();
        Ok(ModelOutput {
            usage: Usage {
                input_tokens: context.div_ceil(4) as u64,
                output_tokens: estimate_tokens(&text),
            },
            value: text,
            model: MODEL.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Persona;

    #[tokio::test]
    async fn famous_characters_come_from_the_catalogue() {
        let m = OfflinePersonaModel::default();
        let out = m.create_persona("Sherlock Holmes").await.unwrap();
        assert_eq!(out.value.name, "Sherlock Holmes");
        assert_eq!(out.value.source, PersonaSource::Famous);
        assert!(out.value.description.contains("Baker Street"));
        assert_eq!(out.model, "offline");
        // Alias inside a sentence, any case.
        let yoda = m
            .create_persona("please be master YODA for me")
            .await
            .unwrap();
        assert_eq!(yoda.value.name, "Yoda");
    }

    #[tokio::test]
    async fn other_prompts_become_original_personas_from_their_words() {
        let m = OfflinePersonaModel::default();
        let a = m
            .create_persona("a grumpy pirate who loves cats")
            .await
            .unwrap()
            .value;
        let b = m
            .create_persona("a grumpy pirate who loves cats")
            .await
            .unwrap()
            .value;
        assert_eq!(a, b, "deterministic");
        assert_eq!(a.source, PersonaSource::Original);
        assert!(a.name.ends_with("the Grumpy Pirate"), "{}", a.name);
        assert!(a.personality.to_lowercase().contains("gruff"));
        assert!(a.speaking_style.contains("arr"));
        assert!(a.description.contains("loves cats"));
        a.validate().unwrap();
        // "holmes" inside another word is not Sherlock.
        let c = m
            .create_persona("a chef from Holmesville")
            .await
            .unwrap()
            .value;
        assert_eq!(c.source, PersonaSource::Original);
    }

    #[tokio::test]
    async fn replies_stay_in_character_and_stream_the_same_text() {
        let persona = Persona::from_draft(
            "per_1".into(),
            OfflinePersonaModel::default()
                .create_persona("Yoda")
                .await
                .unwrap()
                .value,
            MODEL.into(),
            "Yoda".into(),
        );
        let request = ChatRequest {
            persona,
            history: vec![],
            user_text: "How do I learn patience?".into(),
            variation: None,
            memory: Default::default(),
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let out = OfflineChatModel::default()
            .reply(&request, Some(tx))
            .await
            .unwrap();
        let mut streamed = String::new();
        while let Ok(d) = rx.try_recv() {
            streamed.push_str(&d);
        }
        assert_eq!(streamed, out.value);
        assert!(out.value.contains("As Yoda"));
        assert!(out.value.contains("How do I learn patience?"));
        assert!(out.usage.output_tokens > 0);
    }
}
