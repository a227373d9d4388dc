// The relay chat page: chat list, messages, composer; answers stream in through
// relay-stream.js and survive reloads, dropped networks and server restarts.
// No framework, no build step. Text from users and models only reaches the DOM as
// textContent or through the Markdown renderer + DOMPurify below.

import { attach, STATES } from "./relay-stream.js";

const $ = (id) => document.getElementById(id);
const ui = {
  app: $("app"),
  chatList: $("chat-list"),
  listEmpty: $("list-empty"),
  title: $("chat-title"),
  conn: $("conn"),
  connLabel: $("conn-label"),
  thread: $("thread"),
  messages: $("messages"),
  empty: $("empty"),
  notice: $("notice"),
  noticeText: $("notice-text"),
  composer: $("composer"),
  input: $("input"),
  send: $("send"),
  stop: $("stop"),
  scrim: $("scrim"),
};

const state = {
  chats: [],
  chatId: null,
  loadToken: 0, // bumped on every chat switch: late answers for an old chat are ignored
  views: new Map(), // message id -> view (see newView)
  sending: false,
  stopping: false,
  apiDown: false,
  chatVersion: null, // updatedAt of the open chat when we last loaded it
};

const STATUS_OF_MESSAGE = {
  pending: "queued",
  streaming: "streaming",
  complete: "done",
  cancelled: "cancelled",
  failed: "failed",
};
const STATUS_LABEL = {
  queued: "Queued",
  streaming: "Streaming",
  done: "Done",
  cancelled: "Cancelled",
  failed: "Failed",
};
const ACTIVE = new Set(["queued", "streaming"]);
const POLL_MS = 10_000;

// -- Markdown (marked + DOMPurify, served from /static/vendor) ------------------------------

let md = null; // {marked, purify} once loaded; plain text until then (or if they fail)

const mdReady = Promise.all([import("./vendor/marked.esm.js"), import("./vendor/purify.es.js")])
  .then(([markedMod, purifyMod]) => {
    md = { marked: makeMarked(markedMod.Marked), purify: makePurify(purifyMod.default) };
  })
  .catch((err) => console.warn("Markdown unavailable, showing plain text", err));

function escapeHtml(text) {
  const map = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  return String(text).replace(/[&<>"']/g, (c) => map[c]);
}

function makeMarked(Marked) {
  return new Marked({
    gfm: true,
    breaks: false,
    renderer: {
      // Raw HTML in model output is shown as the text it is, never interpreted.
      html: ({ text, block }) => (block ? `<p>${escapeHtml(text)}</p>` : escapeHtml(text)),
      // Images would load third-party URLs: show them as links instead.
      image: ({ href, text }) =>
        `<a href="${escapeHtml(href || "")}">${escapeHtml(text || href || "image")}</a>`,
    },
  });
}

function makePurify(purify) {
  purify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    }
  });
  return purify;
}

function sanitize(html) {
  return md.purify.sanitize(html, {
    USE_PROFILES: { html: true },
    FORBID_TAGS: [
      "style",
      "img",
      "svg",
      "math",
      "form",
      "input",
      "button",
      "iframe",
      "video",
      "audio",
    ],
    FORBID_ATTR: ["style", "class", "id"],
  });
}

const blockSource = new WeakMap(); // rendered block element -> the Markdown it came from

/** Render Markdown into root, block by block: blocks whose source is unchanged stay as is. */
function renderMarkdownInto(root, raw) {
  if (!md) {
    root.classList.add("plain");
    root.textContent = raw;
    return;
  }
  if (root.classList.contains("plain")) {
    root.classList.remove("plain"); // shown as plain text before the renderer loaded
    root.replaceChildren();
  }
  const tokens = md.marked.lexer(raw);
  const blocks = tokens.filter((t) => t.type !== "space" && t.type !== "def");
  const kids = root.children;
  let keep = 0;
  while (
    keep < blocks.length &&
    keep < kids.length &&
    blockSource.get(kids[keep]) === blocks[keep].raw
  ) {
    keep += 1;
  }
  while (kids.length > keep) kids[kids.length - 1].remove();
  for (const token of blocks.slice(keep)) {
    const one = Object.assign([token], { links: tokens.links });
    const el = document.createElement("div");
    el.className = "blk";
    try {
      el.innerHTML = sanitize(md.marked.parser(one));
    } catch {
      el.textContent = token.raw; // never lose text to a renderer bug
    }
    blockSource.set(el, token.raw);
    root.append(el);
  }
}

// -- API ----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, { method = "GET", body } = {}) {
  let resp;
  try {
    resp = await fetch(path, {
      method,
      credentials: "same-origin",
      cache: "no-store",
      headers: body ? { "Content-Type": "application/json" } : {},
      body: body ? JSON.stringify(body) : undefined,
    });
  } catch {
    setApiDown(true);
    throw new ApiError(0, "network", "The server cannot be reached right now.");
  }
  setApiDown(false);
  const data = await resp.json().catch(() => null);
  if (!resp.ok) {
    const err = data?.error ?? {};
    throw new ApiError(
      resp.status,
      err.code ?? `http_${resp.status}`,
      err.message ?? resp.statusText,
    );
  }
  return data;
}

function setApiDown(down) {
  if (state.apiDown === down) return;
  state.apiDown = down;
  renderConnection();
}

// -- chat list ----------------------------------------------------------------------------

async function refreshChats() {
  try {
    const { chats } = await api("/api/v1/chats");
    state.chats = chats;
    renderChatList();
    return chats;
  } catch (err) {
    if (err.code !== "network") showNotice(err.message);
    return null;
  }
}

function renderChatList() {
  const items = state.chats.map(chatListItem);
  ui.chatList.replaceChildren(...items);
  ui.listEmpty.hidden = state.chats.length > 0;
  renderTitle();
}

function chatListItem(chat) {
  const li = document.createElement("li");
  const a = document.createElement("a");
  a.className = "chat-link";
  a.href = `#${encodeURIComponent(chat.id)}`;
  a.dataset.chatId = chat.id;
  if (chat.id === state.chatId) a.setAttribute("aria-current", "page");
  const title = document.createElement("span");
  title.className = "chat-link-title";
  title.textContent = chat.title || "Untitled chat";
  const when = document.createElement("span");
  when.className = "chat-link-time";
  when.textContent = relativeTime(chat.updatedAt);
  a.append(title, when);
  li.append(a);
  return li;
}

function relativeTime(iso) {
  const then = Date.parse(iso);
  if (Number.isNaN(then)) return "";
  const minutes = Math.round((Date.now() - then) / 60_000);
  if (minutes < 1) return "now";
  if (minutes < 60) return `${minutes}m`;
  const hours = Math.round(minutes / 60);
  if (hours < 24) return `${hours}h`;
  const days = Math.round(hours / 24);
  return days < 7 ? `${days}d` : new Date(then).toLocaleDateString();
}

function renderTitle() {
  const chat = state.chats.find((c) => c.id === state.chatId);
  const title = chat?.title || (state.chatId ? "Chat" : "New chat");
  ui.title.textContent = title;
  document.title = state.chatId ? `${title} · relay` : "relay";
}

// -- opening a chat -------------------------------------------------------------------------

function chatIdFromUrl() {
  try {
    return decodeURIComponent(location.hash.slice(1)) || null;
  } catch {
    return null; // a mangled fragment: start a new chat
  }
}

async function openChat(chatId) {
  const token = ++state.loadToken;
  if (chatId !== state.chatId) {
    detachAll();
    ui.messages.replaceChildren();
    state.chatId = chatId;
  }
  renderChatList();
  closeSidebar();
  renderComposer();
  if (!chatId) {
    renderEmpty();
    ui.input.focus();
    return;
  }
  await loadChat(token, { scroll: true });
}

async function loadChat(token, { scroll = false } = {}) {
  const chatId = state.chatId;
  let chat;
  try {
    [chat] = await Promise.all([api(`/api/v1/chats/${encodeURIComponent(chatId)}`), mdReady]);
  } catch (err) {
    if (token !== state.loadToken) return;
    if (err.status === 404) {
      showNotice("That chat does not exist (or belongs to someone else).");
      history.replaceState(null, "", location.pathname);
      openChat(null);
    } else {
      showNotice(err.message);
    }
    return;
  }
  if (token !== state.loadToken) return; // the user moved on meanwhile
  state.chatVersion = chat.updatedAt;
  syncMessages(chat.messages);
  renderEmpty();
  if (scroll) scrollToBottom();
}

function detachAll() {
  for (const view of state.views.values()) view.handle?.close();
  state.views.clear();
  state.stopping = false;
}

/** Bring the shown messages in line with the server's list, touching only what changed. */
function syncMessages(messages) {
  const stick = nearBottom();
  let prev = null;
  for (const m of messages) {
    const view = state.views.get(m.id) ?? adoptPending(m) ?? createView(m);
    placeAfter(view.el, prev);
    prev = view.el;
    applyServerMessage(view, m);
  }
  renderComposer();
  if (stick) scrollToBottom();
}

function placeAfter(el, prev) {
  if (prev ? prev.nextElementSibling !== el : ui.messages.firstElementChild !== el) {
    if (prev) prev.after(el);
    else ui.messages.prepend(el);
  }
}

/** A user message shown optimistically before the server gave it an id. */
function adoptPending(m) {
  for (const [key, view] of state.views) {
    if (view.pending && view.role === m.role && view.raw === m.content) {
      state.views.delete(key);
      view.id = m.id;
      view.pending = false;
      view.el.dataset.id = m.id;
      view.el.classList.remove("sending");
      state.views.set(m.id, view);
      return view;
    }
  }
  return null;
}

function applyServerMessage(view, m) {
  view.streamId = m.streamId;
  if (view.handle || view.final) return; // what we streamed ourselves is as new as it gets
  const status = view.role === "user" ? "done" : (STATUS_OF_MESSAGE[m.status] ?? m.status);
  if (m.content !== view.raw || status !== view.status) {
    view.raw = m.content ?? "";
    view.seq = m.streamSeq ?? 0;
    view.status = status;
    renderView(view);
  }
  if (view.role !== "assistant") return;
  if (ACTIVE.has(status) && m.streamId) startStream(view, view.seq);
  else view.final = true;
  if (status === "failed" && !view.error && m.streamId) loadStreamError(view);
}

async function loadStreamError(view) {
  try {
    const stream = await api(`/api/v1/streams/${encodeURIComponent(view.streamId)}`);
    view.error = stream.error ?? { code: "failed", message: "The answer failed." };
    renderStatus(view);
  } catch {
    /* the status stays "Failed" without details */
  }
}

// -- message views ------------------------------------------------------------------------

function newView({ id, role, content = "", status = "done", streamId = null, seq = 0 }) {
  const view = { id, role, raw: content, status, streamId, seq, handle: null, final: false };
  view.el = document.createElement("article");
  view.el.className = `msg ${role}`;
  view.el.dataset.id = id;
  view.el.dataset.role = role;
  if (role === "user") {
    view.body = document.createElement("div");
    view.body.className = "bubble";
    view.el.append(view.body);
  } else {
    buildAssistant(view);
  }
  state.views.set(id, view);
  return view;
}

function buildAssistant(view) {
  const avatar = document.createElement("div");
  avatar.className = "avatar";
  avatar.setAttribute("aria-hidden", "true");
  const main = document.createElement("div");
  main.className = "msg-main";
  view.body = document.createElement("div");
  view.body.className = "md";
  const meta = document.createElement("div");
  meta.className = "meta";
  view.statusEl = document.createElement("span");
  view.statusEl.className = "status";
  meta.append(view.statusEl);
  main.append(view.body, meta);
  view.el.append(avatar, main);
}

function createView(m) {
  return newView({ id: m.id, role: m.role, content: "", status: "", streamId: m.streamId });
}

function renderView(view) {
  view.renderPending = false;
  view.el.dataset.raw = view.raw;
  if (view.streamId) view.el.dataset.streamId = view.streamId;
  if (view.role === "user") view.body.textContent = view.raw;
  else renderMarkdownInto(view.body, view.raw);
  renderStatus(view);
}

function renderStatus(view) {
  view.el.dataset.status = view.status;
  if (!view.statusEl) return;
  const label = STATUS_LABEL[view.status] ?? view.status;
  const detail = view.status === "failed" && view.error ? `: ${view.error.message}` : "";
  view.statusEl.textContent = label + detail;
  view.statusEl.title = view.error?.code ?? "";
}

/** Coalesce renders of a streaming message to one per frame (or per 250 ms when hidden). */
function scheduleRender(view) {
  if (view.renderPending) return;
  view.renderPending = true;
  const run = () => {
    if (!view.renderPending) return;
    const stick = nearBottom();
    renderView(view);
    if (stick) scrollToBottom();
  };
  if (document.visibilityState === "visible") requestAnimationFrame(run);
  else setTimeout(run, 250);
}

// -- streaming ----------------------------------------------------------------------------

function startStream(view, after) {
  view.handle = attach(view.streamId, {
    after,
    batch: true, // a catch-up of thousands of chunks comes as a few messages
    onEvents: (events) => onStreamEvents(view, events),
    onState: (st, detail) => onStreamState(view, st, detail),
  });
  renderConnection();
  renderComposer();
}

const STATUS_OF_TERMINAL = { done: "done", cancelled: "cancelled", error: "failed" };

/** The new events of one socket message (one event, or a run of chunks): take them in at
 * once, so the text grows once per message and the Markdown is rendered at most once per
 * frame, however many chunks the message carried. */
function onStreamEvents(view, events) {
  const texts = [];
  let flush = false;
  for (const event of events) {
    view.seq = event.seq;
    if (event.type === "chunk") {
      texts.push(event.text);
      view.status = "streaming";
    } else if (event.type === "resumed") {
      // An admin retried this answer: it goes on after the earlier ending.
      view.final = false;
      view.status = "streaming";
      view.error = null;
      flush = true;
    } else if (Object.hasOwn(STATUS_OF_TERMINAL, event.type)) {
      view.final = true;
      view.status = STATUS_OF_TERMINAL[event.type];
      if (event.type === "error") view.error = event.error ?? { code: "error", message: "failed" };
      flush = true; // terminal: render now, not on the next frame
    } // else: an event type from a newer server; skip it
  }
  if (texts.length) {
    view.raw += texts.join("");
    view.el.dataset.raw = view.raw; // the exact text so far; the Markdown follows per frame
  }
  if (flush) renderView(view);
  else if (texts.length) scheduleRender(view);
}

function onStreamState(view, st, detail) {
  if (st === STATES.ENDED || st === STATES.FAILED) {
    view.handle = null;
    if (state.views.get(view.id) === view) afterStreamEnded(view, st, detail);
  }
  renderConnection();
}

function afterStreamEnded(view, st, detail) {
  state.stopping = false;
  renderComposer();
  refreshChats();
  if (st === STATES.FAILED) {
    view.final = true;
    view.status = "failed";
    const reason = detail.reason || "the stream is unavailable";
    view.error = { code: `ws_${detail.code}`, message: `could not follow this answer (${reason})` };
    renderView(view);
  } else if (!detail.event) {
    // Closed without a terminal event we saw: the server's copy is the truth (asked at most
    // twice, so a server that keeps disagreeing with itself cannot make us loop).
    view.endedWithoutEvent = (view.endedWithoutEvent ?? 0) + 1;
    if (view.endedWithoutEvent > 2) view.final = true;
    loadChat(state.loadToken);
  }
}

function activeViews() {
  return [...state.views.values()].filter(
    (v) => v.role === "assistant" && ACTIVE.has(v.status) && !v.final,
  );
}

async function stopGenerating() {
  const views = activeViews();
  if (!views.length || state.stopping) return;
  state.stopping = true;
  renderComposer();
  try {
    await Promise.all(views.map(cancelView));
  } catch (err) {
    state.stopping = false;
    renderComposer();
    showNotice(err.message || "Could not stop the answer.");
  }
}

function cancelView(view) {
  if (view.handle) return view.handle.cancel();
  return api(`/api/v1/streams/${encodeURIComponent(view.streamId)}/cancel`, { method: "POST" });
}

// -- sending ------------------------------------------------------------------------------

async function sendMessage() {
  const text = ui.input.value;
  if (!text.trim() || state.sending || activeViews().length) return;
  state.sending = true;
  const chatId = state.chatId;
  const pending = newView({ id: `pending-${Date.now()}`, role: "user", content: text });
  pending.pending = true;
  pending.el.classList.add("sending");
  ui.messages.append(pending.el);
  renderView(pending);
  setInput("");
  renderEmpty();
  scrollToBottom();
  renderComposer();
  try {
    const posted = await api("/api/v1/chat", { method: "POST", body: { chatId, message: text } });
    if (state.chatId === chatId) onPosted(posted);
  } catch (err) {
    pending.el.remove();
    state.views.delete(pending.id);
    setInput(text);
    renderEmpty();
    showNotice(
      err.code === "chat_busy"
        ? "This chat is still answering. Stop it or wait for it."
        : err.message,
    );
  } finally {
    state.sending = false;
    renderComposer();
  }
}

function onPosted(posted) {
  if (!state.chatId) {
    state.chatId = posted.chatId;
    history.pushState(null, "", `#${encodeURIComponent(posted.chatId)}`);
  }
  const view = newView({ id: posted.messageId, role: "assistant", status: "queued" });
  view.streamId = posted.streamId;
  ui.messages.append(view.el);
  renderView(view);
  startStream(view, 0);
  scrollToBottom();
  refreshChats();
  loadChat(state.loadToken); // learn the user message's id
  tabs?.postMessage({ type: "posted", chatId: posted.chatId });
}

// Other tabs of this browser hear about new turns at once (the 10 s poll is the fallback).
const tabs = "BroadcastChannel" in window ? new BroadcastChannel("relay-chats") : null;

function onTabMessage({ data }) {
  if (data?.type !== "posted") return;
  refreshChats();
  if (data.chatId === state.chatId && !activeViews().length) loadChat(state.loadToken);
}

function setInput(text) {
  ui.input.value = text;
  autosize();
}

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 200)}px`;
}

// -- page chrome --------------------------------------------------------------------------

function renderComposer() {
  const streaming = activeViews().length > 0;
  ui.stop.hidden = !streaming;
  ui.send.hidden = streaming;
  ui.stop.disabled = state.stopping;
  ui.send.disabled = state.sending || !ui.input.value.trim();
  ui.composer.dataset.streaming = String(streaming);
}

function renderEmpty() {
  ui.empty.hidden = ui.messages.childElementCount > 0 || Boolean(state.chatId);
}

function connectionState() {
  const states = [...state.views.values()].map((v) => v.handle?.state).filter(Boolean);
  if (!navigator.onLine || states.includes(STATES.OFFLINE)) return "offline";
  if (states.includes(STATES.RECONNECTING) || state.apiDown) return "reconnecting";
  if (states.includes(STATES.CONNECTING)) return "connecting";
  return "live";
}

function renderConnection() {
  const st = connectionState();
  const labels = {
    live: "Live",
    connecting: "Connecting…",
    reconnecting: "Reconnecting…",
    offline: "Offline",
  };
  ui.conn.dataset.state = st;
  ui.connLabel.textContent = labels[st];
}

let noticeTimer = null;
function showNotice(text) {
  ui.noticeText.textContent = text;
  ui.notice.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(hideNotice, 8000);
}

function hideNotice() {
  ui.notice.hidden = true;
}

function nearBottom() {
  const t = ui.thread;
  return t.scrollHeight - t.scrollTop - t.clientHeight < 120;
}

function scrollToBottom() {
  ui.thread.scrollTop = ui.thread.scrollHeight;
}

function openSidebar() {
  ui.app.dataset.sidebar = "open";
  ui.scrim.hidden = false;
}

function closeSidebar() {
  ui.app.dataset.sidebar = "closed";
  ui.scrim.hidden = true;
}

/** Back on the page (or idle polling): pick up what other tabs or devices did meanwhile. */
async function refreshQuietly() {
  if (document.visibilityState !== "visible") return;
  const chats = await refreshChats();
  const latest = chats?.find((c) => c.id === state.chatId)?.updatedAt;
  if (latest && latest !== state.chatVersion && !activeViews().length) loadChat(state.loadToken);
}

function wire() {
  ui.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    sendMessage();
  });
  ui.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      sendMessage();
    }
  });
  ui.input.addEventListener("input", () => {
    autosize();
    renderComposer();
  });
  ui.stop.addEventListener("click", stopGenerating);
  $("new-chat").addEventListener("click", () => {
    history.pushState(null, "", location.pathname);
    openChat(null);
  });
  $("brand").addEventListener("click", (e) => {
    e.preventDefault();
    history.pushState(null, "", location.pathname);
    openChat(null);
  });
  ui.chatList.addEventListener("click", (e) => {
    if (e.target.closest(".chat-link")) closeSidebar(); // also when it is the open chat
  });
  $("open-sidebar").addEventListener("click", openSidebar);
  $("close-sidebar").addEventListener("click", closeSidebar);
  ui.scrim.addEventListener("click", closeSidebar);
  $("notice-close").addEventListener("click", hideNotice);
  for (const chip of document.querySelectorAll(".suggestion")) {
    chip.addEventListener("click", () => {
      setInput(chip.textContent);
      renderComposer();
      ui.input.focus();
    });
  }
  const followUrl = () => {
    if (chatIdFromUrl() !== state.chatId) openChat(chatIdFromUrl());
  };
  window.addEventListener("popstate", followUrl);
  window.addEventListener("hashchange", followUrl);
  window.addEventListener("online", () => {
    renderConnection();
    refreshQuietly();
  });
  window.addEventListener("offline", renderConnection);
  document.addEventListener("visibilitychange", refreshQuietly);
  tabs?.addEventListener("message", onTabMessage);
  setInterval(refreshQuietly, POLL_MS);
}

async function boot() {
  wire();
  renderConnection();
  await refreshChats(); // first: this request gives a new browser its guest cookie
  await Promise.all([openChat(chatIdFromUrl()), mdReady]);
  document.documentElement.dataset.ready = "true";
}

boot();
