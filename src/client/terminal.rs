//! `characterbot persona ...` and `characterbot chat`: the API from a terminal, on the session
//! `characterbot login` kept.
//!
//! The chat reads lines from standard input (a terminal or a pipe): a line is a message, and
//! `/regenerate`, `/cancel`, `/history`, `/quit` are commands. Replies are printed as they
//! stream (`message.delta` on the event stream, which reconnects by itself and resumes with
//! `Last-Event-ID`); a reply whose fragments were missed is printed whole from its request.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use shared::domain::{Persona, RequestRecord, RequestResult, RequestStatus};
use tokio::sync::mpsc;

use super::events::{self, SseEvent};
use super::http::Api;
use super::session::Session;
use crate::cli::{ChatArgs, PersonaArgs, PersonaCommand};

fn key() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Waits for a request to finish (long polls of 20 s).
async fn finished(api: &Api, request_id: &str) -> anyhow::Result<RequestRecord> {
    loop {
        let record: RequestRecord = api
            .get(&format!("/v1/requests/{request_id}?wait=20"))
            .await?;
        if record.status.is_final() {
            return Ok(record);
        }
    }
}

/// Makes a persona from `prompt` and waits for it.
async fn create_persona(api: &Api, prompt: &str) -> anyhow::Result<Persona> {
    let accepted = api
        .post("/v1/personas", &key(), &json!({ "prompt": prompt }))
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message().unwrap_or(&e.to_string()).to_owned()))?;
    let request_id = accepted["request_id"].as_str().context("no request_id")?;
    eprint!("creating…");
    let record = finished(api, request_id).await?;
    eprintln!();
    match (record.status, record.result, record.error) {
        (RequestStatus::Succeeded, Some(RequestResult::Persona(p)), _) => Ok(p),
        (status, _, Some(error)) => bail!("{}: {}", status.as_str(), error.message),
        (status, _, None) => bail!("the persona was not made ({})", status.as_str()),
    }
}

fn print_persona(p: &Persona) {
    println!("{} ({})", p.name, p.persona_id);
    println!("  {}", p.description);
    println!("  personality: {}", p.personality);
    println!("  speaking style: {}", p.speaking_style);
    println!("  greeting: {}", p.greeting);
}

pub async fn persona(args: PersonaArgs) -> anyhow::Result<()> {
    let api = Session::resume(&args.client).await?;
    match args.command {
        PersonaCommand::Create { prompt } => print_persona(&create_persona(&api, &prompt).await?),
        PersonaCommand::Show { persona_id } => {
            print_persona(&api.get(&format!("/v1/personas/{persona_id}")).await?);
        }
        PersonaCommand::List => {
            let mut next: Option<String> = None;
            loop {
                let path = match &next {
                    Some(t) => format!("/v1/personas?limit=100&next_token={t}"),
                    None => "/v1/personas?limit=100".to_owned(),
                };
                let page: shared::domain::Page<Persona> = api.get(&path).await?;
                for p in &page.items {
                    println!("{}  {}", p.persona_id, p.name);
                }
                match page.next_token {
                    Some(t) => next = Some(t),
                    None => break,
                }
            }
        }
    }
    Ok(())
}

/// One chat: its conversation, the event stream and the user's lines.
struct Chat {
    api: Api,
    conversation_id: String,
    name: String,
    events: mpsc::UnboundedReceiver<SseEvent>,
    lines: mpsc::UnboundedReceiver<String>,
    /// Lines typed (or piped) while a reply was being written: taken next, in order.
    waiting: std::collections::VecDeque<String>,
}

pub async fn chat(args: ChatArgs) -> anyhow::Result<()> {
    let api = Session::resume(&args.client).await?;
    let persona: Persona = match (&args.persona_id, &args.new) {
        (Some(id), _) => api.get(&format!("/v1/personas/{id}")).await?,
        (None, Some(prompt)) => create_persona(&api, prompt).await?,
        (None, None) => bail!("give a persona id, or --new \"a prompt\""),
    };
    let conversation = api
        .post(
            "/v1/conversations",
            &key(),
            &json!({ "persona_id": persona.persona_id }),
        )
        .await?;
    let (tx, events) = mpsc::unbounded_channel();
    let up = Arc::new(AtomicBool::new(false));
    tokio::spawn(events::follow(api.clone(), tx, up.clone()));
    // Subscribed before the first message, so its reply's first fragments are seen.
    for _ in 0..30 {
        if up.load(Ordering::Relaxed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (line_tx, lines) = mpsc::unbounded_channel();
    // A thread of its own: reading standard input blocks.
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut chat = Chat {
        api,
        conversation_id: conversation["conversation_id"]
            .as_str()
            .context("no conversation_id")?
            .to_owned(),
        name: persona.name.clone(),
        events,
        lines,
        waiting: Default::default(),
    };
    eprintln!(
        "chatting with {} (/regenerate, /cancel, /history, /quit)",
        persona.name
    );
    println!("{}: {}", persona.name, persona.greeting);
    chat.run().await
}

impl Chat {
    async fn run(&mut self) -> anyhow::Result<()> {
        loop {
            eprint!("> ");
            std::io::stderr().flush()?;
            let line = match self.waiting.pop_front() {
                Some(line) => line,
                None => match self.lines.recv().await {
                    Some(line) => line,
                    None => return Ok(()),
                },
            };
            let line = line.trim().to_owned();
            match line.as_str() {
                "" => {}
                "/quit" => return Ok(()),
                "/history" => self.history().await?,
                "/cancel" => eprintln!("no reply is being written"),
                "/regenerate" => self.regenerate().await?,
                text if text.starts_with('/') => eprintln!("unknown command {text}"),
                text => {
                    let path = format!("/v1/conversations/{}/messages", self.conversation_id);
                    match self.api.post(&path, &key(), &json!({ "text": text })).await {
                        Ok(accepted) => self.reply(&accepted).await?,
                        Err(e) => eprintln!("not sent: {}", e.message().unwrap_or(&e.to_string())),
                    }
                }
            }
        }
    }

    /// Every message, oldest first (a page of 100 at a time).
    async fn messages(&self) -> anyhow::Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let mut path = format!(
                "/v1/conversations/{}/messages?limit=100",
                self.conversation_id
            );
            if let Some(t) = &next {
                path.push_str(&format!("&next_token={t}"));
            }
            let page: Value = self.api.get(&path).await?;
            items.extend(page["items"].as_array().cloned().unwrap_or_default());
            match page["next_token"].as_str() {
                Some(t) => next = Some(t.to_owned()),
                None => return Ok(items),
            }
        }
    }

    async fn history(&self) -> anyhow::Result<()> {
        for m in self.messages().await? {
            let who = if m["role"] == "user" {
                "you"
            } else {
                self.name.as_str()
            };
            println!("{who}: {}", m["text"].as_str().unwrap_or_default());
        }
        Ok(())
    }

    async fn regenerate(&mut self) -> anyhow::Result<()> {
        let messages = self.messages().await?;
        let Some(last) = messages.iter().rev().find(|m| m["role"] == "assistant") else {
            eprintln!("no reply to regenerate");
            return Ok(());
        };
        let path = format!(
            "/v1/conversations/{}/messages/{}/regenerate",
            self.conversation_id,
            last["message_id"].as_str().unwrap_or_default()
        );
        match self.api.post(&path, &key(), &json!({})).await {
            Ok(accepted) => self.reply(&accepted).await,
            Err(e) => {
                eprintln!("not regenerated: {}", e.message().unwrap_or(&e.to_string()));
                Ok(())
            }
        }
    }

    /// Prints the reply of an accepted request as it streams; `/cancel` stops it.
    async fn reply(&mut self, accepted: &Value) -> anyhow::Result<()> {
        let request_id = accepted["request_id"]
            .as_str()
            .context("no request_id")?
            .to_owned();
        print!("{}: ", self.name);
        std::io::stdout().flush()?;
        let mut printed = false;
        let mut poll = tokio::time::interval(Duration::from_secs(2));
        poll.tick().await;
        let record = loop {
            tokio::select! {
                Some(event) = self.events.recv() => {
                    if let Some(record) = events::finished_record(&event) {
                        if record.request_id.as_str() == request_id {
                            break record;
                        }
                    } else if event.event == "message.delta" {
                        let data: Value = serde_json::from_str(&event.data).unwrap_or_default();
                        if data["request_id"] == request_id.as_str() {
                            print!("{}", data["text"].as_str().unwrap_or_default());
                            std::io::stdout().flush()?;
                            printed = true;
                        }
                    }
                }
                Some(line) = self.lines.recv() => {
                    if line.trim() == "/cancel" {
                        let path = format!("/v1/requests/{request_id}/cancel");
                        let _ = self.api.post(&path, &key(), &json!({})).await;
                    } else {
                        self.waiting.push_back(line);
                    }
                }
                // The stream may be down: the request says when the reply is done.
                _ = poll.tick() => {
                    let record: RequestRecord = self.api.get(&format!("/v1/requests/{request_id}")).await?;
                    if record.status.is_final() {
                        break record;
                    }
                }
            }
        };
        self.end(&record, printed);
        Ok(())
    }

    /// The end of a reply: what was missed of its text, and how it ended.
    fn end(&self, record: &RequestRecord, printed: bool) {
        if !printed {
            if let Some(RequestResult::Message(m)) = &record.result {
                print!("{}", m.text);
            }
        }
        match record.status {
            RequestStatus::Succeeded => println!(),
            RequestStatus::Cancelled => println!(" [cancelled]"),
            status => println!(
                " [{}: {}]",
                status.as_str(),
                record.error.as_ref().map_or("", |e| e.message.as_str())
            ),
        }
    }
}
