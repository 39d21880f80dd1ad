//! Conversations and their messages in SQLite. A message row is keyed by its conversation and
//! `(turn, sub)`: a user message is sub 0 of its turn, the reply to it sub 1, so a redelivered
//! reply finds its place taken. The persona's greeting is the reply of turn 0, which has no
//! user message.

use async_trait::async_trait;
use deadpool_sqlite::rusqlite::{params, Connection, OptionalExtension};

use super::personas::PERSONA_BY_ID;
use super::{bad_token, body_in, from_json, insert_request, to_json, SqliteStore};
use crate::domain::{
    snippet, Conversation, Memory, Message, Page, Persona, RequestRecord, Role, PREVIEW_MAX_CHARS,
    TITLE_MAX_CHARS,
};
use crate::ids::{ConversationId, MessageId, PersonaId, RequestId};
use crate::store::{token, ChatContext, ConversationStore, Edit, Turn};
use crate::{Error, Result};

/// A user's conversation by id.
const CONVERSATION_BY_ID: &str =
    "SELECT body FROM conversations WHERE user_id = ?1 AND conversation_id = ?2";

/// Up to `limit` messages before `message_id`, oldest first.
fn history_in(c: &Connection, conv: &str, msg: &str, limit: usize) -> Result<Vec<Message>> {
    let mut stmt = c.prepare_cached(
        "SELECT body FROM messages
         WHERE conversation_id = ?1
           AND turn < (SELECT turn FROM messages WHERE conversation_id = ?1 AND message_id = ?2)
         ORDER BY turn DESC, sub DESC LIMIT ?3",
    )?;
    let mut out = stmt
        .query_map(params![conv, msg, limit as i64], |r| r.get::<_, String>(0))?
        .map(|b| from_json(&b?))
        .collect::<Result<Vec<Message>>>()?;
    out.reverse();
    Ok(out)
}

/// A conversation's record with its activity, which the embedded store derives when read
/// rather than writing on every message (two more row and index writes per chat turn cost
/// about 15% of chat throughput): `last` is its latest message, `first_text` its first user
/// message's text (the title, unless it was given one).
pub(super) const CONVERSATION_WITH_ACTIVITY: &str = "
    SELECT c.conversation_id, c.body,
      (SELECT m.body FROM messages m WHERE m.conversation_id = c.conversation_id
       ORDER BY m.turn DESC, m.sub DESC LIMIT 1) AS last,
      (SELECT json_extract(m.body, '$.text') FROM messages m
       WHERE m.conversation_id = c.conversation_id AND m.turn > 0 AND m.sub = 0
       ORDER BY m.turn LIMIT 1) AS first_text
    FROM conversations c";

/// A conversation from a row of [`CONVERSATION_WITH_ACTIVITY`].
pub(super) fn with_activity(
    body: &str,
    last: Option<String>,
    first_text: Option<String>,
) -> Result<Conversation> {
    let mut conversation: Conversation = from_json(body)?;
    if let Some(last) = last {
        let last: Message = from_json(&last)?;
        conversation.last_message_at = Some(last.created_at);
        conversation.preview = Some(snippet(&last.text, PREVIEW_MAX_CHARS));
    }
    if conversation.title.is_none() {
        conversation.title = first_text.map(|t| snippet(&t, TITLE_MAX_CHARS));
    }
    Ok(conversation)
}

/// The user's conversation with its activity.
fn conversation_in(
    c: &Connection,
    user_id: &str,
    conv: &ConversationId,
) -> Result<Option<Conversation>> {
    let sql =
        format!("{CONVERSATION_WITH_ACTIVITY} WHERE c.user_id = ?1 AND c.conversation_id = ?2");
    c.prepare_cached(&sql)?
        .query_row(params![user_id, conv], |r| {
            Ok((
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })
        .optional()?
        .map(|(body, last, first)| with_activity(&body, last, first))
        .transpose()
}

/// Whether the user's conversation takes messages: `NotFound` when it is not the user's,
/// `PersonaDeleted` when its persona was deleted.
fn conversation_open(
    c: &Connection,
    user_id: &str,
    conversation_id: &ConversationId,
) -> Result<()> {
    let persona_lives: Option<bool> = c
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM personas p
                            WHERE p.user_id = c.user_id
                              AND p.persona_id = json_extract(c.body, '$.persona_id'))
             FROM conversations c WHERE c.user_id = ?1 AND c.conversation_id = ?2",
        )?
        .query_row(params![user_id, conversation_id], |r| r.get(0))
        .optional()?;
    match persona_lives {
        None => Err(Error::NotFound),
        Some(false) => Err(Error::PersonaDeleted),
        Some(true) => Ok(()),
    }
}

/// The turn whose reply is `reply_id`, stored or to come (a user message names its reply; one
/// stored before that is found by the request it names, which shares the reply id's tail).
fn turn_of_reply(
    c: &Connection,
    conversation_id: &ConversationId,
    reply_id: &MessageId,
) -> Result<Turn> {
    let legacy = format!("req_{}", reply_id.as_str().trim_start_matches("msg_"));
    let turn: i64 = c
        .prepare_cached(
            "SELECT turn FROM messages WHERE conversation_id = ?1 AND turn > 0
               AND ((sub = 1 AND message_id = ?2)
                    OR (sub = 0 AND (json_extract(body, '$.reply_id') = ?2
                                     OR json_extract(body, '$.request_id') = ?3)))
             LIMIT 1",
        )?
        .query_row(params![conversation_id, reply_id, legacy], |r| r.get(0))
        .optional()?
        .ok_or(Error::NotFound)?;
    let mut stmt = c.prepare_cached(
        "SELECT sub, body FROM messages WHERE conversation_id = ?1 AND turn = ?2 ORDER BY sub",
    )?;
    let rows = stmt
        .query_map(params![conversation_id, turn], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let (mut asked, mut reply) = (None, None);
    for (sub, body) in rows {
        match sub {
            0 => asked = Some(from_json::<Message>(&body)?),
            _ => reply = Some(from_json::<Message>(&body)?),
        }
    }
    Ok(Turn {
        turn,
        asked: asked.ok_or(Error::NotFound)?,
        reply,
    })
}

/// See [`ConversationStore::rewind`].
fn rewind_in(
    c: &Connection,
    user_id: &str,
    conv: &ConversationId,
    after: &MessageId,
    edit: Option<&Edit>,
) -> Result<(Message, Vec<RequestId>)> {
    if body_in::<Conversation>(c, CONVERSATION_BY_ID, user_id, conv)?.is_none() {
        return Err(Error::NotFound);
    }
    let (turn, sub, body): (i64, i64, String) = c
        .prepare_cached(
            "SELECT turn, sub, body FROM messages WHERE conversation_id = ?1 AND message_id = ?2",
        )?
        .query_row(params![conv, after], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?
        .ok_or(Error::NotFound)?;
    let mut kept: Message = from_json(&body)?;
    let mut requests = Vec::new();
    // Rewound to a user message: its reply goes too, and it stays unanswered.
    let unanswered = (edit.is_none() && kept.role == Role::User).then(|| Edit::unanswered(&kept));
    if let Some(edit) = edit.or(unanswered.as_ref()) {
        let was = kept.request_id.clone();
        edit.apply(&mut kept)?;
        if edit.request_id.is_some() {
            conversation_open(c, user_id, conv)?;
        }
        requests.extend(was);
        c.execute(
            "UPDATE messages SET body = ?3 WHERE conversation_id = ?1 AND message_id = ?2",
            params![conv, after, to_json(&kept)?],
        )?;
    }
    let mut stmt = c.prepare_cached(
        "SELECT body FROM messages WHERE conversation_id = ?1 AND sub = 0 AND turn > ?2",
    )?;
    let later = stmt
        .query_map(params![conv, turn], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    for body in later {
        requests.extend(from_json::<Message>(&body)?.request_id);
    }
    c.execute(
        "DELETE FROM messages WHERE conversation_id = ?1 AND (turn > ?2 OR (turn = ?2 AND sub > ?3))",
        params![conv, turn, sub],
    )?;
    // The conversation's latest message is now the one kept (derived when read).
    Ok((kept, requests))
}

/// Appends a user message as the conversation's next turn; `NotFound` when the conversation is
/// not the user's.
pub(crate) fn append_user_message(
    c: &Connection,
    user_id: &str,
    conversation_id: &ConversationId,
    message: &Message,
) -> Result<()> {
    conversation_open(c, user_id, conversation_id)?;
    let turn: i64 = c
        .prepare_cached(
            "SELECT COALESCE(MAX(turn), 0) + 1 FROM messages WHERE conversation_id = ?1",
        )?
        .query_row([conversation_id], |r| r.get(0))?;
    c.prepare_cached(
        "INSERT INTO messages (conversation_id, turn, sub, message_id, body)
         VALUES (?1, ?2, 0, ?3, ?4)",
    )?
    .execute(params![
        conversation_id,
        turn,
        message.message_id,
        to_json(message)?
    ])?;
    Ok(())
}

/// Whether a reply of `request_id` to user message `asked` is still wanted: `Some(false)`
/// when the turn was edited (the message names another request) or rewound away, `None` when
/// the conversation is gone. A message stored before messages named their request wants it;
/// one edited to stay unanswered (no request, a reply id) wants none.
pub(crate) fn reply_wanted(
    c: &Connection,
    user_id: &str,
    conversation_id: &ConversationId,
    asked: &MessageId,
    request_id: &RequestId,
) -> Result<Option<bool>> {
    // The two fields alone, by the message's key: this runs in every chat settlement.
    let names: Option<(Option<String>, Option<String>)> = c
        .prepare_cached(
            "SELECT json_extract(body, '$.request_id'), json_extract(body, '$.reply_id')
             FROM messages WHERE conversation_id = ?1 AND message_id = ?2",
        )?
        .query_row(params![conversation_id, asked], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    Ok(match names {
        Some((Some(r), _)) => Some(r == request_id.as_str()),
        // Edited to be left unanswered.
        Some((None, Some(_))) => Some(false),
        // Stored before messages named their request.
        Some((None, None)) => Some(true),
        // Rewound away, or the conversation is gone.
        None => {
            let exists: bool = c
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM conversations
                                    WHERE user_id = ?2 AND conversation_id = ?1)",
                )?
                .query_row(params![conversation_id, user_id], |r| r.get(0))?;
            exists.then_some(false)
        }
    })
}

/// Stores `reply` (one version) as the reply to `reply_to`: alone, or added to the stored
/// reply's versions and selected (a regeneration); returns the reply that stands, which is
/// the stored one as it was when it has this version already (a twin delivery's).
pub(crate) fn put_reply_in(
    c: &Connection,
    conversation_id: &ConversationId,
    reply_to: &MessageId,
    reply: &Message,
) -> Result<Message> {
    let turn: i64 = c
        .prepare_cached("SELECT turn FROM messages WHERE conversation_id = ?1 AND message_id = ?2")?
        .query_row(params![conversation_id, reply_to], |r| r.get(0))
        .optional()?
        .ok_or(Error::NotFound)?;
    let stored: Option<Message> = c
        .prepare_cached(
            "SELECT body FROM messages WHERE conversation_id = ?1 AND turn = ?2 AND sub = 1",
        )?
        .query_row(params![conversation_id, turn], |r| r.get::<_, String>(0))
        .optional()?
        .map(|b| from_json(&b))
        .transpose()?;
    let merged = Message::merge_reply(stored.clone(), reply.clone());
    if stored.as_ref() == Some(&merged) {
        return Ok(merged);
    }
    c.prepare_cached(
        "INSERT INTO messages (conversation_id, turn, sub, message_id, body)
         VALUES (?1, ?2, 1, ?3, ?4)
         ON CONFLICT (conversation_id, turn, sub) DO UPDATE SET body = excluded.body",
    )?
    .execute(params![
        conversation_id,
        turn,
        merged.message_id,
        to_json(&merged)?
    ])?;
    Ok(merged)
}

#[async_trait]
impl ConversationStore for SqliteStore {
    async fn create_conversation(
        &self,
        user_id: &str,
        conversation: &Conversation,
        persona: &Persona,
        greeting: &Message,
    ) -> Result<()> {
        // Its activity is derived when read (see `CONVERSATION_WITH_ACTIVITY`), not stored.
        let (user_id, id, body, snapshot) = (
            user_id.to_owned(),
            conversation.conversation_id.clone(),
            to_json(conversation)?,
            to_json(persona)?,
        );
        let (greeting_id, greeting) = (greeting.message_id.clone(), to_json(greeting)?);
        let persona_id = persona.persona_id.clone();
        self.db
            .write(move |tx| {
                // Only while the persona is the user's: one deleted meanwhile is refused.
                let made = tx.execute(
                    "INSERT INTO conversations (user_id, conversation_id, body, persona)
                     SELECT ?1, ?2, ?3, ?4
                     WHERE EXISTS (SELECT 1 FROM personas WHERE user_id = ?1 AND persona_id = ?5)",
                    params![user_id, id, body, snapshot, persona_id],
                )?;
                if made == 0 {
                    return Err(Error::NotFound);
                }
                tx.execute(
                    "INSERT INTO messages (conversation_id, turn, sub, message_id, body)
                     VALUES (?1, 0, 1, ?2, ?3)",
                    params![id, greeting_id, greeting],
                )?;
                Ok(())
            })
            .await
    }

    async fn get_conversation(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
    ) -> Result<Option<Conversation>> {
        let (user_id, conv) = (user_id.to_owned(), conversation_id.to_owned());
        self.db
            .call(move |c| conversation_in(c, &user_id, &conv))
            .await
    }

    async fn list_conversations(
        &self,
        user_id: &str,
        persona_id: Option<&PersonaId>,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Conversation>> {
        // By the time of each conversation's latest message, derived (see
        // `CONVERSATION_WITH_ACTIVITY`): a scan of the user's conversations with an index seek
        // each, paid by the listing rather than by every message. The token is the last row's
        // (time, conversation_id); the first page starts above every time.
        let (at, id) = match next_token {
            Some(t) => {
                let raw = token::decode(t).ok_or_else(bad_token)?;
                let (at, id) = raw.split_once('\n').ok_or_else(bad_token)?;
                (at.to_owned(), id.to_owned())
            }
            None => ("\u{10FFFF}".to_owned(), String::new()),
        };
        let (user_id, persona_id) = (user_id.to_owned(), persona_id.cloned());
        self.db
            .call(move |c| {
                let sql = format!(
                    "SELECT at, conversation_id, body, last, first_text FROM (
                       SELECT conversation_id, body, last, first_text,
                         COALESCE(json_extract(last, '$.created_at'),
                                  json_extract(body, '$.created_at')) AS at
                       FROM ({CONVERSATION_WITH_ACTIVITY}
                             WHERE c.user_id = ?1
                               AND (?4 IS NULL OR json_extract(c.body, '$.persona_id') = ?4)))
                     WHERE (at, conversation_id) < (?2, ?3)
                     ORDER BY at DESC, conversation_id DESC LIMIT ?5"
                );
                let mut stmt = c.prepare_cached(&sql)?;
                let rows = stmt
                    .query_map(
                        params![user_id, at, id, persona_id, limit as i64 + 1],
                        |r| {
                            Ok((
                                r.get::<_, String>(0)?,
                                r.get::<_, String>(1)?,
                                r.get::<_, String>(2)?,
                                r.get::<_, Option<String>>(3)?,
                                r.get::<_, Option<String>>(4)?,
                            ))
                        },
                    )?
                    .collect::<Result<Vec<_>, _>>()?;
                let more = rows.len() > limit;
                let rows = &rows[..rows.len().min(limit)];
                let next_token = match rows.last() {
                    Some((at, id, ..)) if more => Some(token::encode(&format!("{at}\n{id}"))),
                    _ => None,
                };
                let items = rows
                    .iter()
                    .map(|(_, _, body, last, first)| {
                        with_activity(body, last.clone(), first.clone())
                    })
                    .collect::<Result<Vec<Conversation>>>()?;
                Ok(Page { items, next_token })
            })
            .await
    }

    async fn rename_conversation(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        title: &str,
    ) -> Result<Conversation> {
        let (user_id, conv, title) = (
            user_id.to_owned(),
            conversation_id.to_owned(),
            title.to_owned(),
        );
        self.db
            .write(move |c| {
                let renamed = c.execute(
                    "UPDATE conversations SET body = json_set(body, '$.title', ?3)
                     WHERE user_id = ?1 AND conversation_id = ?2",
                    params![user_id, conv, title],
                )?;
                if renamed == 0 {
                    return Err(Error::NotFound);
                }
                conversation_in(c, &user_id, &conv)?.ok_or(Error::NotFound)
            })
            .await
    }

    async fn delete_conversation(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
    ) -> Result<()> {
        let (user_id, conv) = (user_id.to_owned(), conversation_id.to_owned());
        self.db
            .write(move |c| {
                let gone = c.execute(
                    "DELETE FROM conversations WHERE user_id = ?1 AND conversation_id = ?2",
                    params![user_id, conv],
                )?;
                if gone == 0 {
                    return Err(Error::NotFound);
                }
                c.execute("DELETE FROM messages WHERE conversation_id = ?1", [&conv])?;
                Ok(())
            })
            .await
    }

    async fn add_user_message(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        message: &Message,
        request: &RequestRecord,
    ) -> Result<()> {
        let (user_id, conv, message, request) = (
            user_id.to_owned(),
            conversation_id.to_owned(),
            message.clone(),
            request.clone(),
        );
        self.db
            .write(move |c| {
                append_user_message(c, &user_id, &conv, &message)?;
                insert_request(c, &user_id, &request)
            })
            .await
    }

    async fn put_reply(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        reply_to: &MessageId,
        reply: &Message,
    ) -> Result<Message> {
        let _ = user_id; // the embedded store keys messages by conversation alone
        let (conv, reply_to, reply) = (
            conversation_id.to_owned(),
            reply_to.to_owned(),
            reply.clone(),
        );
        self.db
            .write(move |c| put_reply_in(c, &conv, &reply_to, &reply))
            .await
    }

    async fn get_reply(
        &self,
        conversation_id: &ConversationId,
        reply_to: &MessageId,
    ) -> Result<Option<Message>> {
        let (conv, reply_to) = (conversation_id.to_owned(), reply_to.to_owned());
        self.db
            .call(move |c| {
                c.query_row(
                    "SELECT r.body FROM messages m JOIN messages r
                       ON r.conversation_id = m.conversation_id AND r.turn = m.turn AND r.sub = 1
                     WHERE m.conversation_id = ?1 AND m.message_id = ?2",
                    params![conv, reply_to],
                    |r| r.get::<_, String>(0),
                )
                .optional()?
                .map(|b| from_json(&b))
                .transpose()
            })
            .await
    }

    async fn reply_turn(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        reply_id: &MessageId,
    ) -> Result<Turn> {
        let (user_id, conv, reply_id) = (
            user_id.to_owned(),
            conversation_id.to_owned(),
            reply_id.to_owned(),
        );
        self.db
            .call(move |c| {
                conversation_open(c, &user_id, &conv)?;
                turn_of_reply(c, &conv, &reply_id)
            })
            .await
    }

    async fn answer_with(
        &self,
        conversation_id: &ConversationId,
        turn: &Turn,
        request_id: &RequestId,
    ) -> Result<()> {
        let (conv, asked, request, was) = (
            conversation_id.to_owned(),
            turn.asked.message_id.clone(),
            request_id.to_owned(),
            turn.asked.request_id.clone(),
        );
        self.db
            .write(move |c| {
                let changed = c.execute(
                    "UPDATE messages SET body = json_set(body, '$.request_id', ?3)
                     WHERE conversation_id = ?1 AND message_id = ?2
                       AND json_extract(body, '$.request_id') IS ?4",
                    params![conv, asked, request, was],
                )?;
                if changed == 0 {
                    return Err(Error::Conflict("the turn moved on meanwhile".into()));
                }
                Ok(())
            })
            .await
    }

    async fn select_version(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        reply_id: &MessageId,
        variant_id: &str,
    ) -> Result<Message> {
        let (user_id, conv, reply_id, variant) = (
            user_id.to_owned(),
            conversation_id.to_owned(),
            reply_id.to_owned(),
            variant_id.to_owned(),
        );
        self.db
            .write(move |c| {
                if body_in::<Conversation>(c, CONVERSATION_BY_ID, &user_id, &conv)?.is_none() {
                    return Err(Error::NotFound);
                }
                let turn = turn_of_reply(c, &conv, &reply_id)?;
                let mut reply = turn.reply.ok_or(Error::NotFound)?;
                if !reply.select(&variant) {
                    return Err(Error::NotFound);
                }
                c.execute(
                    "UPDATE messages SET body = ?3 WHERE conversation_id = ?1 AND turn = ?2 AND sub = 1",
                    params![conv, turn.turn, to_json(&reply)?],
                )?;
                Ok(reply)
            })
            .await
    }

    async fn rewind(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        after: &MessageId,
        edit: Option<&Edit>,
    ) -> Result<(Message, Vec<RequestId>)> {
        let (user_id, conv, after, edit) = (
            user_id.to_owned(),
            conversation_id.to_owned(),
            after.to_owned(),
            edit.cloned(),
        );
        self.db
            .write(move |c| rewind_in(c, &user_id, &conv, &after, edit.as_ref()))
            .await
    }

    async fn get_memory(&self, user_id: &str, conversation_id: &ConversationId) -> Result<Memory> {
        // One row by key: on this thread (see `Db::read_here`).
        self.db.read_here(|c| {
            let memory: Option<Option<String>> = c
                .prepare_cached(
                    "SELECT memory FROM conversations WHERE user_id = ?1 AND conversation_id = ?2",
                )?
                .query_row(params![user_id, conversation_id], |r| r.get(0))
                .optional()?;
            match memory.ok_or(Error::NotFound)? {
                Some(m) => from_json(&m),
                None => Ok(Memory::default()),
            }
        })
    }

    async fn put_memory(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        memory: &Memory,
    ) -> Result<Memory> {
        let memory = memory.written_now();
        let (user_id, conv, body) = (
            user_id.to_owned(),
            conversation_id.to_owned(),
            to_json(&memory)?,
        );
        let changed = self
            .db
            .write(move |c| {
                Ok(c.execute(
                    "UPDATE conversations SET memory = ?3 WHERE user_id = ?1 AND conversation_id = ?2",
                    params![user_id, conv, body],
                )?)
            })
            .await?;
        if changed == 0 {
            return Err(Error::NotFound);
        }
        Ok(memory)
    }

    async fn replace_memory(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        read: &Memory,
        memory: &Memory,
    ) -> Result<bool> {
        let memory = memory.written_now();
        let (user_id, conv, body, read_at) = (
            user_id.to_owned(),
            conversation_id.to_owned(),
            to_json(&memory)?,
            read.updated_at.clone(),
        );
        self.db
            .write(move |c| {
                if c.execute(
                    "UPDATE conversations SET memory = ?3
                     WHERE user_id = ?1 AND conversation_id = ?2
                       AND json_extract(memory, '$.updated_at') IS ?4",
                    params![user_id, conv, body, read_at],
                )? == 1
                {
                    return Ok(true);
                }
                let exists = c
                    .query_row(
                        "SELECT 1 FROM conversations WHERE user_id = ?1 AND conversation_id = ?2",
                        params![user_id, conv],
                        |_| Ok(()),
                    )
                    .optional()?;
                exists.map(|()| false).ok_or(Error::NotFound)
            })
            .await
    }

    async fn page_messages(
        &self,
        conversation_id: &ConversationId,
        limit: usize,
        next_token: Option<&str>,
    ) -> Result<Page<Message>> {
        let (after_turn, after_sub) = match next_token {
            Some(t) => {
                let raw = token::decode(t).ok_or_else(bad_token)?;
                let (turn, sub) = raw.split_once(':').ok_or_else(bad_token)?;
                (
                    turn.parse::<i64>().map_err(|_| bad_token())?,
                    sub.parse::<i64>().map_err(|_| bad_token())?,
                )
            }
            None => (-1, -1),
        };
        let conv = conversation_id.to_owned();
        self.db
            .call(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT turn, sub, body FROM messages
                     WHERE conversation_id = ?1 AND (turn > ?2 OR (turn = ?2 AND sub > ?3))
                     ORDER BY turn, sub LIMIT ?4",
                )?;
                let rows = stmt
                    .query_map(
                        params![conv, after_turn, after_sub, limit as i64 + 1],
                        |r| {
                            Ok((
                                r.get::<_, i64>(0)?,
                                r.get::<_, i64>(1)?,
                                r.get::<_, String>(2)?,
                            ))
                        },
                    )?
                    .collect::<Result<Vec<_>, _>>()?;
                let more = rows.len() > limit;
                let rows = &rows[..rows.len().min(limit)];
                let next_token = match rows.last() {
                    Some((turn, sub, _)) if more => Some(token::encode(&format!("{turn}:{sub}"))),
                    _ => None,
                };
                let items = rows
                    .iter()
                    .map(|(_, _, b)| from_json(b))
                    .collect::<Result<Vec<Message>>>()?;
                Ok(Page { items, next_token })
            })
            .await
    }

    async fn history_before(
        &self,
        conversation_id: &ConversationId,
        message_id: &MessageId,
        limit: usize,
    ) -> Result<Vec<Message>> {
        // A few rows by key: on this thread (see `Db::read_here`).
        self.db
            .read_here(|c| history_in(c, conversation_id, message_id, limit))
    }

    async fn chat_context(
        &self,
        user_id: &str,
        conversation_id: &ConversationId,
        message_id: &MessageId,
        history_limit: usize,
    ) -> Result<Option<ChatContext>> {
        // On this thread (`Db::read_here`): nothing needs copying into a closure of its own.
        let (conv, msg) = (conversation_id, message_id);
        self.db.read_here(|c| {
            let Some((conversation, snapshot, memory)) = c
                .prepare_cached(
                    "SELECT body, persona, memory FROM conversations
                     WHERE user_id = ?1 AND conversation_id = ?2",
                )?
                .query_row(params![user_id, conv], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, Option<String>>(2)?,
                    ))
                })
                .optional()?
            else {
                return Ok(None);
            };
            let memory = memory
                .map(|m| from_json(&m))
                .transpose()?
                .unwrap_or_default();
            let conversation: Conversation = from_json(&conversation)?;
            let persona = match snapshot {
                Some(snapshot) => Some(from_json(&snapshot)?),
                // Made before snapshots: the live persona, if it still exists.
                None => body_in(c, PERSONA_BY_ID, user_id, &conversation.persona_id)?,
            };
            let history = history_in(c, conv, msg, history_limit)?;
            Ok(Some(ChatContext {
                conversation,
                persona,
                history,
                cancelled: None,
                memory,
            }))
        })
    }
}
