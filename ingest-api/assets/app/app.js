// CharacterBot's page: the API from a browser, with no framework and no build step.
//
// Tokens live in sessionStorage: they last as long as the tab, survive a reload, and are not
// shared with other tabs or kept after the tab closes (localStorage would keep the refresh
// token on disk for good). The event stream is read with fetch and the Authorization header,
// so no token ever goes into a URL; it resumes with Last-Event-ID, then asks GET /v1/sync what
// changed while it was away.
"use strict";

const $ = (id) => document.getElementById(id);
const store = {
  get: (k) => JSON.parse(sessionStorage.getItem("cb." + k) || "null"),
  set: (k, v) => sessionStorage.setItem("cb." + k, JSON.stringify(v)),
  clear: () => Object.keys(sessionStorage).filter((k) => k.startsWith("cb.")).forEach((k) => sessionStorage.removeItem(k)),
};
const FINAL = ["succeeded", "failed", "cancelled"];
let current = null;      // the open conversation: {conversation_id, persona_name}
let writing = null;      // the request whose reply is being written in it
let streamAbort = null;

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || "HTTP " + status);
    this.status = status;
    this.code = body && body.error && body.error.code;
  }
}

async function api(method, path, body, retried) {
  const tokens = store.get("tokens");
  const headers = { accept: "application/json" };
  if (tokens) headers.authorization = "Bearer " + tokens.access_token;
  if (body !== undefined) headers["content-type"] = "application/json";
  if (method === "POST" || method === "PATCH") headers["idempotency-key"] = crypto.randomUUID();
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (res.status === 401 && tokens && !retried && (await refresh())) return api(method, path, body, true);
  const data = res.status === 204 ? null : await res.json().catch(() => null);
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

// One refresh at a time: a refresh token is used once (a second use ends the session), and
// calls that fail together (after a reload with an expired token) all wait for the same one.
let refreshing = null;
function refresh() {
  if (!refreshing) {
    refreshing = (async () => {
      const tokens = store.get("tokens");
      try {
        const fresh = await api("POST", "/v1/auth/refresh", { refresh_token: tokens.refresh_token }, true);
        store.set("tokens", fresh);
        return true;
      } catch {
        signedOut();
        return false;
      } finally {
        refreshing = null;
      }
    })();
  }
  return refreshing;
}

// --- Signing in and out ---------------------------------------------------------------

function credentials() {
  return { email: $("email").value.trim(), password: $("password").value };
}

async function signIn() {
  try {
    store.set("tokens", await api("POST", "/v1/auth/signin", credentials()));
    signedIn();
  } catch (e) {
    if (e.code === "user_not_confirmed") return askCode();
    $("auth-error").textContent = e.message;
  }
}

async function signUp() {
  if (!$("auth-form").reportValidity()) return;
  try {
    await api("POST", "/v1/auth/signup", credentials());
    await signIn();
  } catch (e) {
    $("auth-error").textContent = e.message;
  }
}

function askCode() {
  $("confirm-form").hidden = false;
  $("code").focus();
}

async function confirmCode() {
  try {
    await api("POST", "/v1/auth/confirm", { email: credentials().email, code: $("code").value.trim() });
    $("confirm-form").hidden = true;
    await signIn();
  } catch (e) {
    $("auth-error").textContent = e.message;
  }
}

async function signOut() {
  const tokens = store.get("tokens");
  if (tokens) await api("POST", "/v1/auth/signout", { refresh_token: tokens.refresh_token }).catch(() => {});
  signedOut();
}

function signedOut() {
  if (streamAbort) streamAbort.abort();
  store.clear();
  current = null;
  $("app").hidden = true;
  $("signout").hidden = true;
  $("auth").hidden = false;
}

function signedIn() {
  $("auth").hidden = true;
  $("auth-error").textContent = "";
  $("app").hidden = false;
  $("signout").hidden = false;
  loadPersonas();
  loadConversations();
  const open = store.get("conversation");
  if (open) openConversation(open);
  followEvents();
}

// --- Personas -------------------------------------------------------------------------

async function waitFor(requestId) {
  for (;;) {
    const r = await api("GET", `/v1/requests/${requestId}?wait=20`);
    if (FINAL.includes(r.status)) return r;
  }
}

async function createPersona(prompt) {
  const status = $("persona-status");
  status.textContent = "creating…";
  try {
    const accepted = await api("POST", "/v1/personas", { prompt });
    const done = await waitFor(accepted.request_id);
    status.textContent = done.status === "succeeded" ? `${done.result.persona.name} is ready.` : done.error.message;
    loadPersonas();
  } catch (e) {
    status.textContent = e.message;
  }
}

function item(list, build) {
  const li = document.createElement("li");
  build(li);
  list.appendChild(li);
}

function button(label, onClick, cls = "small") {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

function text(tag, content, cls) {
  const el = document.createElement(tag);
  el.textContent = content;
  if (cls) el.className = cls;
  return el;
}

async function loadPersonas() {
  const page = await api("GET", "/v1/personas?limit=100");
  const list = $("personas");
  list.replaceChildren();
  for (const p of page.items) {
    item(list, (li) => {
      li.append(text("strong", p.name), text("div", p.description, "meta"));
      li.append(button(`Chat with ${p.name}`, () => startConversation(p.persona_id)));
    });
  }
}

// --- Conversations --------------------------------------------------------------------

async function loadConversations() {
  const page = await api("GET", "/v1/conversations?limit=100");
  const list = $("conversations");
  list.replaceChildren();
  for (const c of page.items) {
    item(list, (li) => {
      li.append(text("strong", c.title || c.persona_name));
      li.append(text("div", `${c.persona_name} · ${new Date(c.last_message_at || c.created_at).toLocaleString()}`, "meta"));
      li.append(button("Open", () => openConversation(c.conversation_id)));
      li.append(button("Rename", () => rename(c)));
      li.append(button("Delete", () => remove(c)));
    });
  }
}

async function startConversation(personaId) {
  const c = await api("POST", "/v1/conversations", { persona_id: personaId });
  await loadConversations();
  openConversation(c.conversation_id);
}

async function rename(c) {
  const title = window.prompt("New title", c.title || "");
  if (title && title.trim()) await api("PATCH", `/v1/conversations/${c.conversation_id}`, { title });
  loadConversations();
}

async function remove(c) {
  if (!window.confirm(`Delete "${c.title || c.persona_name}" and its messages?`)) return;
  await api("DELETE", `/v1/conversations/${c.conversation_id}`);
  if (current && current.conversation_id === c.conversation_id) {
    current = null;
    store.set("conversation", null);
    $("messages").replaceChildren();
    $("message-form").hidden = true;
    $("chat-title").textContent = "Pick a persona to start a conversation";
  }
  loadConversations();
}

async function openConversation(id) {
  try {
    const c = await api("GET", `/v1/conversations/${id}`);
    current = c;
    store.set("conversation", id);
    $("chat-title").textContent = `${c.persona_name}${c.title ? " — " + c.title : ""}`;
    $("message-form").hidden = false;
    await showMessages();
    $("text").focus();
  } catch {
    store.set("conversation", null);
  }
}

async function allMessages(id) {
  const items = [];
  let next = null;
  do {
    const page = await api("GET", `/v1/conversations/${id}/messages?limit=100` + (next ? "&next_token=" + encodeURIComponent(next) : ""));
    items.push(...page.items);
    next = page.next_token;
  } while (next);
  return items;
}

async function showMessages() {
  if (!current) return;
  const page = { items: await allMessages(current.conversation_id) };
  const list = $("messages");
  list.replaceChildren();
  writing = null;
  const replies = page.items.filter((m) => m.role === "assistant");
  const last = replies[replies.length - 1];
  for (const m of page.items) {
    item(list, (li) => {
      li.className = m.role;
      // The reply's fragments go to the reply, not to the message it answers (both name
      // the request).
      if (m.request_id && m.role === "assistant") li.dataset.request = m.request_id;
      li.append(text("span", m.role === "user" ? "You" : current.persona_name, "who"));
      li.append(text("span", m.text, "body"));
      if (m.status !== "complete") li.append(text("span", ` (${m.status})`, "state"));
      if (["pending", "streaming"].includes(m.status) && m.role === "assistant") writing = m.request_id;
      li.append(tools(m, m === last));
    });
  }
  $("cancel").hidden = !writing;
  list.scrollTop = list.scrollHeight;
}

function tools(m, isLast) {
  const box = document.createElement("div");
  box.className = "tools";
  if (m.role === "user") {
    box.append(button("Edit", () => edit(m)));
    box.append(button("Rewind to here", () => rewind(m)));
  } else if (m.request_id) {
    const variants = m.variants || [];
    const at = variants.findIndex((v) => v.variant_id === m.selected);
    if (variants.length > 1) {
      box.append(button("‹", () => select(m, variants[(at - 1 + variants.length) % variants.length])));
      box.append(text("span", `${at + 1}/${variants.length}`, "state"));
      box.append(button("›", () => select(m, variants[(at + 1) % variants.length])));
    }
    if (isLast) box.append(button("Regenerate", () => regenerate(m)));
  }
  return box;
}

async function act(promise) {
  try {
    const accepted = await promise;
    if (accepted && accepted.request_id) writing = accepted.request_id;
  } catch (e) {
    window.alert(e.message);
  }
  await showMessages();
}

function send(textValue) {
  return act(api("POST", `/v1/conversations/${current.conversation_id}/messages`, { text: textValue }));
}
function regenerate(m) {
  return act(api("POST", `/v1/conversations/${current.conversation_id}/messages/${m.message_id}/regenerate`, {}));
}
function select(m, v) {
  return act(api("PUT", `/v1/conversations/${current.conversation_id}/messages/${m.message_id}/selected`, { variant_id: v.variant_id }));
}
function edit(m) {
  const changed = window.prompt("Edit your message", m.text);
  if (changed && changed.trim()) return act(api("PATCH", `/v1/conversations/${current.conversation_id}/messages/${m.message_id}`, { text: changed }));
}
function rewind(m) {
  if (window.confirm("Drop every message after this one?")) return act(api("POST", `/v1/conversations/${current.conversation_id}/rewind`, { message_id: m.message_id }));
}
function cancelReply() {
  if (writing) return act(api("POST", `/v1/requests/${writing}/cancel`, {}));
}

// --- The event stream -----------------------------------------------------------------

function onEvent(name, data) {
  if (name === "message.delta") {
    const li = document.querySelector(`#messages li[data-request="${CSS.escape(data.request_id)}"] .body`);
    if (li) li.textContent += data.text;
    return;
  }
  if (name !== "request.updated") return;
  if (data.kind === "persona" && FINAL.includes(data.status)) loadPersonas();
  const chat = data.input && data.input.chat;
  if (current && chat && chat.conversation_id === current.conversation_id) {
    if (data.status === "running" && !document.querySelector(`#messages li[data-request="${CSS.escape(data.request_id)}"]`)) showMessages();
    if (FINAL.includes(data.status)) {
      showMessages();
      loadConversations();
    }
  }
}

function parseBlock(block) {
  let name = "message", data = "", id = null;
  for (const line of block.split("\n")) {
    const at = line.indexOf(":");
    const field = at < 0 ? line : line.slice(0, at);
    const value = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
    if (field === "event") name = value;
    else if (field === "data") data += (data ? "\n" : "") + value;
    else if (field === "id") id = value;
  }
  return { name, data, id };
}

async function followEvents() {
  if (streamAbort) streamAbort.abort();
  const abort = new AbortController();
  streamAbort = abort;
  while (!abort.signal.aborted && store.get("tokens")) {
    // Each attempt its own: a failed one is closed before the next opens (streams per user
    // are capped).
    const attempt = new AbortController();
    const stop = () => attempt.abort();
    abort.signal.addEventListener("abort", stop);
    try {
      const headers = { accept: "text/event-stream", authorization: "Bearer " + store.get("tokens").access_token };
      const last = store.get("lastEventId");
      if (last) headers["last-event-id"] = last;
      const res = await fetch("/v1/events", { headers, signal: attempt.signal });
      if (res.status === 401) await refresh();
      if (!res.ok) throw new Error("stream " + res.status);
      await catchUp();
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const e = parseBlock(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (e.id) store.set("lastEventId", e.id);
          if (e.data) onEvent(e.name, JSON.parse(e.data));
        }
      }
    } catch (e) {
      // Lost: try again in a second (the server's retry hint), missing nothing. A cursor the
      // server no longer takes is dropped: the next catch-up starts from the beginning.
      if (e.code === "invalid_cursor") store.set("cursor", null);
    } finally {
      attempt.abort();
      abort.signal.removeEventListener("abort", stop);
    }
    if (!abort.signal.aborted) await new Promise((r) => setTimeout(r, 1000));
  }
}

/// What changed while the page was away (reloaded, offline): one sync, then fresh lists.
async function catchUp() {
  let since = store.get("cursor");
  let changed = false;
  for (let pages = 0; pages < 50; pages++) {
    const page = await api("GET", "/v1/sync?limit=500" + (since ? "&since=" + encodeURIComponent(since) : ""));
    changed = changed || page.changes.length > 0;
    since = page.cursor;
    if (!page.has_more) break;
  }
  store.set("cursor", since);
  if (changed) {
    loadPersonas();
    loadConversations();
    showMessages();
  }
}

// --- Wiring ---------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("auth-form").addEventListener("submit", (e) => { e.preventDefault(); signIn(); });
  $("signup").addEventListener("click", signUp);
  $("confirm-form").addEventListener("submit", (e) => { e.preventDefault(); confirmCode(); });
  $("signout").addEventListener("click", signOut);
  $("persona-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const prompt = $("prompt").value.trim();
    if (prompt) createPersona(prompt);
    $("prompt").value = "";
  });
  $("message-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("text").value.trim();
    if (!value || !current) return;
    $("text").value = "";
    send(value);
  });
  $("text").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("message-form").requestSubmit(); }
  });
  $("cancel").addEventListener("click", cancelReply);
  if (store.get("tokens")) signedIn();
});
