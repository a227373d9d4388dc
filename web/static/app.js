// The relay chat page: chat list, messages, composer; answers stream in through
// relay-stream.js and survive reloads, dropped networks and server restarts.
// No framework, no build step. Text from users and models only reaches the DOM as
// textContent or through the Markdown renderer + DOMPurify below.

import { attach, openFeed, STATES } from "./relay-stream.js";

// Hooks for tests, read once at start: a test sets window.relayTest before the page loads
// (an init script). pollMs: the chat list poll's period instead of POLL_MS / FEED_POLL_MS
// (0: no poll); quietMs: how long an answer may be quiet before "Waiting for the model…";
// feedLog: an array the page appends each applied feed event to; feed: false, no live feed
// (the page as it was before it: for tests of what happens when the page has not heard yet).
const testHooks = window.relayTest ?? {};

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
  jump: $("jump"),
  announcer: $("announcer"),
  noticeRetry: $("notice-retry"),
  theme: $("theme"),
  notify: $("notify"),
  search: $("chat-search"),
  listLabel: $("list-label"),
  model: $("model"),
  modelPick: $("model-pick"),
};

const state = {
  chats: [],
  chatId: null,
  loadToken: 0, // bumped on every chat switch: late answers for an old chat are ignored
  views: new Map(), // message id -> view (see newView)
  sending: false,
  apiDown: false,
  chatVersion: null, // updatedAt of the open chat when we last loaded it
  follow: true, // keep the newest text in view; false once the user scrolled up
  lastScrollTop: 0,
  pendingCancels: new Map(), // stream id -> {attempt, timer}: cancels waiting for the network
  sendingCancels: new Set(), // stream ids whose cancel request is in flight (kept in storage too)
  query: "", // the chat list's search text ("" lists every chat)
  listSeq: 0, // bumped on every list request: an answer to an older search is dropped
  renaming: null, // the chat id whose title is being edited in the list
  listShown: null, // what the chat list's nodes show (renderChatList redraws on a change)
  openTitle: null, // the open chat's title as last loaded (it may be outside a search)
  models: [], // the models the server allows, the default first (GET /api/v1/models)
  deletedHere: new Set(), // chats this page deleted (their chat.deleted is not news)
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
const RETRYABLE = new Set(["failed", "cancelled"]);
const REGENERABLE = new Set(["done", "failed", "cancelled"]);
const POLL_MS = 10_000; // the chat list poll while the live feed is not connected
const FEED_POLL_MS = 60_000; // a fallback only, while the feed is connected
const QUIET_MS = 5_000; // an answer quiet this long shows "Waiting for the model…"

// -- Markdown (marked + DOMPurify, served from /static/vendor) ------------------------------

let md = null; // {marked, purify, hl} once loaded; plain text until then (or if they fail)

// highlight.js (common languages) is optional: without it code blocks are shown unhighlighted.
const hlReady = import("./vendor/highlight.es.min.js")
  .then((mod) => mod.default)
  .catch((err) => {
    console.warn("Code highlighting unavailable", err);
    return null;
  });

const mdReady = Promise.all([
  import("./vendor/marked.esm.js"),
  import("./vendor/purify.es.js"),
  hlReady,
])
  .then(([markedMod, purifyMod, hl]) => {
    md = { marked: makeMarked(markedMod.Marked), purify: makePurify(purifyMod.default), hl };
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
      // The fence's language travels as data-lang (DOMPurify drops class attributes); the
      // code is the fence's exact text, so Copy copies what the answer wrote.
      code: ({ text, lang }) => {
        const language = /^\S*/.exec(lang || "")[0];
        const attr = language ? ` data-lang="${escapeHtml(language)}"` : "";
        return `<pre><code${attr}>${escapeHtml(text)}</code></pre>\n`;
      },
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

const blockKey = new WeakMap(); // rendered block element -> what it was rendered from

/** What a block's HTML depends on: its own source and, when it can contain a reference
 * link, the targets its links resolved to. Reference definitions ("[id]: url") usually come
 * at the end of an answer, after the blocks that use them, and a definition's URL streams in
 * over several renders: a block whose source did not change must still be rebuilt when a
 * definition it uses appears or grows. The lexer has already resolved every reference in
 * the block's tokens, so the resolved hrefs and titles are exactly its dependencies. */
function blockKeyOf(token) {
  if (!token.raw.includes("[")) return token.raw; // no reference can be used without "["
  const targets = [];
  md.marked.walkTokens([token], (t) => {
    if (t.type === "link" || t.type === "image") targets.push(t.href, t.title ?? "");
  });
  return `${token.raw}\u0000${JSON.stringify(targets)}`;
}

/** Render Markdown into root, block by block: a block whose key (source and resolved
 * references, see blockKeyOf) is unchanged stays as it is; every other block is rebuilt in
 * its place. Used for every render: visible or hidden tab, streaming or history. */
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
  const keys = blocks.map(blockKeyOf);
  const kids = root.children;
  // A changed block in the middle (a definition it uses arrived) is replaced in place; the
  // blocks around it stay if theirs are unchanged.
  for (let i = 0; i < blocks.length; i += 1) {
    const old = kids[i];
    if (old && blockKey.get(old) === keys[i]) continue;
    const el = renderBlock(blocks[i], tokens.links, keys[i]);
    if (old?.querySelector(".code-block")) {
      // A code block being streamed is re-rendered on every chunk: patch it in place, so its
      // Copy button stays the same element (its focus, a click half-way, "Copied").
      morph(old, el);
      blockKey.set(old, keys[i]);
    } else if (old) old.replaceWith(el);
    else root.append(el);
  }
  while (kids.length > blocks.length) kids[kids.length - 1].remove();
}

/** Make the rendered node ``from`` equal to ``to``, keeping every node whose place and tag
 * did not change (only text and attributes are updated); anything else is replaced. A code
 * block's Copy button keeps its own state and content. */
function morph(from, to) {
  if (from.nodeType !== to.nodeType || from.nodeName !== to.nodeName) {
    from.replaceWith(to);
    return;
  }
  if (from.nodeType === Node.TEXT_NODE) {
    if (from.data !== to.data) from.data = to.data;
    return;
  }
  if (from.nodeType !== Node.ELEMENT_NODE) {
    from.replaceWith(to);
    return;
  }
  const isCopy = from.classList.contains("code-copy");
  for (const { name } of [...from.attributes]) {
    if (!to.hasAttribute(name) && !(isCopy && name === "data-copied")) from.removeAttribute(name);
  }
  for (const { name, value } of [...to.attributes]) {
    if (from.getAttribute(name) !== value) from.setAttribute(name, value);
  }
  if (isCopy) return; // its label says "Copied" for 2 s after a copy
  const olds = [...from.childNodes];
  const news = [...to.childNodes];
  news.forEach((node, i) => (i < olds.length ? morph(olds[i], node) : from.append(node)));
  for (const node of olds.slice(news.length)) node.remove();
}

function renderBlock(token, links, key) {
  const el = document.createElement("div");
  el.className = "blk";
  try {
    el.innerHTML = sanitize(md.marked.parser(Object.assign([token], { links })));
  } catch {
    el.textContent = token.raw; // never lose text to a renderer bug
  }
  decorateCode(el);
  blockKey.set(el, key);
  return el;
}

const HIGHLIGHT_MAX_CHARS = 100_000; // longer code is shown plain: highlighting it would lag
const COPY_ICON =
  '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M9 9h10v10H9zM5 15V5h10"/></svg>';

/** Code blocks of a rendered (already sanitized) block: syntax highlighting when the fence
 * names a language highlight.js knows, a header with the language and a Copy button.
 * highlight.js escapes the code it is given (the text of the sanitized DOM) and adds only
 * <span class="hljs-..."> around it; its output goes through DOMPurify again, allowing
 * nothing but those spans, before it reaches the page. */
function decorateCode(root) {
  for (const code of root.querySelectorAll("pre > code")) {
    const pre = code.parentElement;
    const lang = code.dataset.lang || "";
    const known = lang && md.hl?.getLanguage(lang);
    const text = code.textContent;
    if (known && text.length <= HIGHLIGHT_MAX_CHARS) {
      try {
        const html = md.hl.highlight(text, { language: lang, ignoreIllegals: true }).value;
        code.innerHTML = md.purify.sanitize(html, {
          ALLOWED_TAGS: ["span"],
          ALLOWED_ATTR: ["class"],
        });
        code.classList.add("hljs");
      } catch {
        code.textContent = text; // shown plain
      }
    }
    const box = document.createElement("div");
    box.className = "code-block";
    const head = document.createElement("div");
    head.className = "code-head";
    const label = document.createElement("span");
    label.className = "code-lang";
    label.textContent = lang || "code";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "code-copy";
    copy.setAttribute("aria-label", lang ? `Copy ${lang} code` : "Copy code");
    copy.innerHTML = COPY_ICON;
    const copyLabel = document.createElement("span");
    copyLabel.className = "code-copy-label";
    copyLabel.textContent = "Copy";
    copy.append(copyLabel);
    head.append(label, copy);
    pre.replaceWith(box);
    box.append(head, pre);
  }
}

async function copyCode(button) {
  const code = button.closest(".code-block")?.querySelector("pre > code");
  if (!code) return;
  const label = button.querySelector(".code-copy-label");
  try {
    await navigator.clipboard.writeText(code.textContent);
  } catch {
    showNotice("Could not copy the code: the browser did not allow it. Select the text.");
    return;
  }
  label.textContent = "Copied";
  button.dataset.copied = "true";
  setTimeout(() => {
    label.textContent = "Copy";
    delete button.dataset.copied;
  }, 2000);
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

/** What to tell a person about a failed request (never the browser's "Failed to fetch"). */
function humanError(err, doing) {
  const what = doing ? `Could not ${doing}: ` : "";
  if (!(err instanceof ApiError) || err.code === "network" || err.status === 0) {
    return `${what}the server cannot be reached. Check your connection.`;
  }
  switch (err.code) {
    case "too_many_running":
      return `${what}you already have several answers being written. Wait for one, or stop one.`;
    case "rate_limited":
      return `${what}that was a lot of messages in a short time. Wait a minute and try again.`;
    case "chat_busy":
      return `${what}this chat is still answering. Stop it or wait for it.`;
    case "illegal_transition":
    case "stream_finished":
      return `${what}the answer has already moved on. Reload the chat to see where it is.`;
    case "stream_not_found":
    case "chat_not_found":
      return `${what}it no longer exists (it may have been deleted).`;
    default:
      break;
  }
  if (err.status === 503) return `${what}the server is busy or restarting. Try again shortly.`;
  if (err.status >= 500) return `${what}something went wrong on the server.`;
  return what + (err.message || `the server answered ${err.status}.`);
}

function setApiDown(down) {
  if (state.apiDown === down) return;
  state.apiDown = down;
  renderConnection();
}

// -- chat list ----------------------------------------------------------------------------

async function refreshChats() {
  const seq = ++state.listSeq;
  const query = state.query.trim();
  const path = query ? `/api/v1/chats?q=${encodeURIComponent(query)}` : "/api/v1/chats";
  try {
    const { chats } = await api(path);
    if (seq !== state.listSeq) return chats; // a newer search (or refresh) is on its way
    state.chats = chats;
    state.listedQuery = query;
    renderChatList();
    return chats;
  } catch (err) {
    if (err.code !== "network" && seq === state.listSeq) {
      showNotice(humanError(err, "load your chats"), { retry: refreshChats });
    }
    return null;
  }
}

function renderChatList() {
  if (state.renaming) return; // the list is redrawn when the title being edited is done
  // Redrawn only when what it shows changed: a poll or a feed event that brings the same
  // list must not replace the links under a click in progress (a press and a release on
  // two different nodes is no click: the user's choice of chat was lost).
  const shown = JSON.stringify([
    state.chatId,
    state.listedQuery ?? "",
    state.chats.map((c) => [c.id, c.title, relativeTime(c.updatedAt)]),
  ]);
  if (shown !== state.listShown) {
    state.listShown = shown;
    redrawChatList();
  }
  ui.listEmpty.hidden = state.chats.length > 0;
  const searched = state.listedQuery ?? "";
  ui.listEmpty.textContent = searched
    ? `No chat titles contain \u201c${searched}\u201d.`
    : "No chats yet.";
  ui.listLabel.textContent = searched ? "Matching chats" : "Recent";
  renderTitle();
}

function redrawChatList() {
  // Keep the keyboard focus where it was.
  const focused = ui.chatList.contains(document.activeElement) ? document.activeElement : null;
  const focusKey = focused && [focused.closest("li")?.dataset.chatId, focused.className];
  ui.chatList.replaceChildren(...state.chats.map(chatListItem));
  if (focusKey) {
    const li = [...ui.chatList.children].find((el) => el.dataset.chatId === focusKey[0]);
    li?.querySelector(`[class="${focusKey[1]}"]`)?.focus();
  }
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
  const rename = document.createElement("button");
  rename.type = "button";
  rename.className = "chat-rename";
  rename.dataset.chatId = chat.id;
  rename.setAttribute("aria-label", `Rename chat: ${chat.title || "Untitled chat"}`);
  rename.title = "Rename chat";
  rename.innerHTML = PENCIL_ICON;
  const del = document.createElement("button");
  del.type = "button";
  del.className = "chat-delete";
  del.dataset.chatId = chat.id;
  del.setAttribute("aria-label", `Delete chat: ${chat.title || "Untitled chat"}`);
  del.title = "Delete chat";
  del.innerHTML = TRASH_ICON;
  li.dataset.chatId = chat.id;
  li.append(a, rename, del);
  return li;
}

const PENCIL_ICON =
  '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M4 20h4L19 9l-4-4L4 16zM14 6l4 4"/></svg>';

/** Edit a chat's title in place: Enter (or leaving the field) saves, Escape cancels. The
 * list is not redrawn meanwhile, so a poll cannot take the field away. */
function startRename(chatId) {
  const li = [...ui.chatList.children].find((el) => el.dataset.chatId === chatId);
  const chat = state.chats.find((c) => c.id === chatId);
  if (!li || !chat || state.renaming) return;
  state.renaming = chatId;
  state.listShown = null; // the item is edited in place: redraw it when done
  const form = document.createElement("form");
  form.className = "chat-rename-form";
  const input = document.createElement("input");
  input.className = "chat-rename-input";
  input.value = chat.title;
  input.maxLength = 200;
  input.setAttribute("aria-label", `New title for: ${chat.title || "Untitled chat"}`);
  form.append(input);
  li.replaceChildren(form);
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== chat.title) {
      try {
        const renamed = await api(`/api/v1/chats/${encodeURIComponent(chatId)}`, {
          method: "PATCH",
          body: { title },
        });
        for (const c of state.chats) if (c.id === chatId) c.title = renamed.title;
        if (chatId === state.chatId) state.openTitle = renamed.title;
        tabs?.postMessage({ type: "posted", chatId }); // other tabs refresh their lists
      } catch (err) {
        showNotice(humanError(err, "rename the chat"));
      }
    }
    state.renaming = null;
    renderChatList();
    const again = [...ui.chatList.children].find((el) => el.dataset.chatId === chatId);
    (again?.querySelector(".chat-rename") ?? ui.search).focus();
    if (save) refreshChats();
  };
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    finish(true);
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Escape") {
      e.preventDefault();
      e.stopPropagation();
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
  input.focus();
  input.select();
}

// -- chat search ----------------------------------------------------------------------------

const SEARCH_DEBOUNCE_MS = 250;
let searchTimer = null;

/** The search box: the list asks the server (GET /api/v1/chats?q=) once typing pauses. */
function onSearchInput() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => {
    if (ui.search.value.trim() === state.query.trim()) return;
    state.query = ui.search.value;
    refreshChats();
  }, SEARCH_DEBOUNCE_MS);
}

function clearSearch() {
  clearTimeout(searchTimer);
  ui.search.value = "";
  if (!state.query) return;
  state.query = "";
  refreshChats();
}

const TRASH_ICON =
  '<svg viewBox="0 0 24 24" aria-hidden="true">' +
  '<path d="M4 7h16M10 11v6M14 11v6M6 7l1 12a2 2 0 0 0 2 2h6a2 2 0 0 0 2-2l1-12M9 7V4h6v3"/>' +
  "</svg>";

async function deleteChat(chatId) {
  const chat = state.chats.find((c) => c.id === chatId);
  const name = chat?.title || "this chat";
  const question = `Delete \u201c${name}\u201d? Its messages and answers are removed for good.`;
  if (!confirm(question)) return;
  state.deletedHere.add(chatId);
  try {
    await api(`/api/v1/chats/${encodeURIComponent(chatId)}`, { method: "DELETE" });
  } catch (err) {
    if (err.status !== 404) {
      state.deletedHere.delete(chatId);
      showNotice(humanError(err, "delete the chat"), { retry: () => deleteChat(chatId) });
      return;
    }
  }
  saveDraft(chatId, "");
  state.chats = state.chats.filter((c) => c.id !== chatId);
  if (chatId === state.chatId) {
    history.pushState(null, "", location.pathname);
    await openChat(null); // focuses the composer
  } else {
    renderChatList();
    if (document.activeElement === document.body) $("new-chat").focus(); // its button is gone
  }
  refreshChats();
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
  const fallback = state.chatId ? state.openTitle || "Chat" : "New chat";
  const title = chat?.title || fallback;
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
    state.openTitle = null;
  }
  renderChatList();
  closeSidebar();
  setInput(loadDraft(chatId));
  renderComposer();
  renderModelPick();
  if (!chatId) {
    renderEmpty();
    ui.input.focus();
    return;
  }
  await loadChat(token, { scroll: true });
}

async function loadChat(token, { scroll = false } = {}) {
  const chatId = state.chatId;
  const asked = performance.now(); // what the answer tells is as of about now
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
      showNotice(humanError(err, "load this chat"), { retry: () => loadChat(state.loadToken) });
    }
    return;
  }
  if (token !== state.loadToken) return; // the user moved on meanwhile
  state.chatVersion = chat.updatedAt;
  state.openTitle = chat.title;
  renderTitle();
  syncMessages(chat.messages, asked);
  renderEmpty();
  if (scroll) scrollToBottom();
}

function detachAll() {
  for (const view of state.views.values()) view.handle?.close();
  state.views.clear();
  renderJump();
}

/** Bring the shown messages in line with the server's list, touching only what changed. */
function syncMessages(messages, asked) {
  const stick = state.follow;
  dropReplaced(messages);
  let prev = null;
  for (const m of messages) {
    const view = state.views.get(m.id) ?? adoptPending(m) ?? createView(m);
    placeAfter(view.el, prev);
    prev = view.el;
    applyServerMessage(view, m, asked);
  }
  renderComposer();
  if (stick) scrollToBottom();
}

/** Answers the server no longer has (regenerated, here or in another tab) leave the page.
 * Only ended answers: one this page has just posted may be newer than the list. */
function dropReplaced(messages) {
  const ids = new Set(messages.map((m) => m.id));
  for (const [id, view] of state.views) {
    if (view.role === "assistant" && view.final && !view.handle && !ids.has(id)) {
      view.el.remove();
      state.views.delete(id);
    }
  }
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

function applyServerMessage(view, m, asked) {
  view.streamId = m.streamId;
  if (m.streamId && state.pendingCancels.has(m.streamId)) view.stopping = true; // pre-reload
  const serverActive = ACTIVE.has(STATUS_OF_MESSAGE[m.status]);
  // Asked after this page saw the answer end, and active: retried elsewhere (another tab or
  // device), so follow the continuation. Asked before: the answer as it was while it ran.
  const askedAfterEnd = asked > (view.endedAt ?? 0);
  if (view.final && !view.handle && RETRYABLE.has(view.status) && serverActive && askedAfterEnd) {
    view.final = false;
    view.error = null;
  }
  if (view.handle || view.final) return; // what we streamed ourselves is as new as it gets
  const status = view.role === "user" ? "done" : (STATUS_OF_MESSAGE[m.status] ?? m.status);
  if (view.role === "assistant" && m.error && !view.error) view.error = m.error;
  if (m.content !== view.raw || status !== view.status) {
    view.raw = m.content ?? "";
    view.seq = m.streamSeq ?? 0;
    view.status = status;
    renderView(view);
  }
  if (view.role !== "assistant") return;
  if (ACTIVE.has(status) && m.streamId) {
    startStream(view, view.seq);
  } else if (!view.final) {
    view.final = true;
    renderStatus(view); // offers Retry for a failed or stopped answer
  }
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
  view.el.setAttribute("aria-label", role === "user" ? "You said" : "Answer");
  if (role === "user") {
    buildUser(view);
  } else {
    buildAssistant(view);
  }
  state.views.set(id, view);
  return view;
}

function actionButton(action, label, icon) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "act";
  b.dataset.action = action;
  b.innerHTML = `<svg viewBox="0 0 24 24" aria-hidden="true"><path d="${icon}"/></svg>`;
  const text = document.createElement("span");
  text.className = "act-label";
  text.textContent = label;
  b.append(text);
  return b;
}

const ICONS = {
  copy: "M9 9h10v10H9zM5 15V5h10",
  retry: "M4 4v6h6M20 20v-6h-6M5.5 15a7 7 0 0 0 12 2.5M18.5 9A7 7 0 0 0 6.5 6.5",
  edit: "M4 20h4L19 9l-4-4L4 16zM14 6l4 4",
  regenerate: "M21 12a9 9 0 1 1-3-6.7L21 8M21 3v5h-5",
};

function buildUser(view) {
  const main = document.createElement("div");
  main.className = "user-main";
  view.body = document.createElement("div");
  view.body.className = "bubble";
  const actions = document.createElement("div");
  actions.className = "actions";
  view.editBtn = actionButton("edit", "Edit", ICONS.edit);
  actions.append(view.editBtn);
  main.append(view.body, actions);
  view.el.append(main);
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
  const actions = document.createElement("div");
  actions.className = "actions";
  view.copyBtn = actionButton("copy", "Copy", ICONS.copy);
  view.retryBtn = actionButton("retry", "Retry", ICONS.retry);
  view.retryBtn.hidden = true;
  view.regenerateBtn = actionButton("regenerate", "Regenerate", ICONS.regenerate);
  view.regenerateBtn.hidden = true;
  view.regenerateBtn.title = "Replace this answer with a new one";
  actions.append(view.copyBtn, view.retryBtn, view.regenerateBtn);
  meta.append(view.statusEl, actions);
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
  if (view.role === "user") {
    if (!view.editing) view.body.textContent = view.raw;
  } else {
    renderMarkdownInto(view.body, view.raw);
  }
  renderStatus(view);
}

function renderStatus(view) {
  view.el.dataset.status = view.status;
  if (!view.statusEl) return;
  const active = ACTIVE.has(view.status) && !view.final;
  // The text being written is not announced piece by piece (no live region on the thread);
  // the finished answer is announced once (see announceEnd).
  if (active) view.el.setAttribute("aria-busy", "true");
  else view.el.removeAttribute("aria-busy");
  const stopping = active && view.stopping;
  if (stopping) view.el.dataset.stopping = "true";
  else delete view.el.dataset.stopping;
  let text = STATUS_LABEL[view.status] ?? view.status;
  if (stopping) {
    text = state.pendingCancels.has(view.streamId)
      ? "Stopping\u2026 (the stop is sent when the connection is back)"
      : "Stopping\u2026";
  } else if (view.status === "failed" && view.error) {
    text += `: ${view.error.message}`;
  } else if (view.status === "queued" && view.place) {
    text = placeText(view.place); // from the feed (answer.waiting) or the stream (queued)
  }
  // Connected, but the model has written nothing for a while (relay-stream's STALLED).
  const waiting = active && !stopping && view.status === "streaming" && view.waiting;
  if (waiting) {
    text = "Waiting for the model\u2026";
    view.el.dataset.waiting = "true";
  } else delete view.el.dataset.waiting;
  view.statusEl.textContent = text;
  view.statusEl.title = view.error?.code ?? "";
  view.retryBtn.hidden = !(view.final && RETRYABLE.has(view.status));
  view.retryBtn.disabled = activeViews().length > 0;
  renderRegenerate();
}

/** Regenerate is offered on the chat's last answer once it has ended. */
function renderRegenerate() {
  const answers = ui.messages.querySelectorAll(".msg.assistant");
  const lastEl = answers[answers.length - 1];
  const busy = activeViews().length > 0 || state.sending;
  for (const view of state.views.values()) {
    if (!view.regenerateBtn) continue;
    const lost = view.error?.code?.startsWith("ws_"); // the page lost it: Retry reloads it
    const ended = view.final && REGENERABLE.has(view.status) && !lost;
    view.regenerateBtn.hidden = !(view.el === lastEl && ended);
    view.regenerateBtn.disabled = busy || Boolean(view.regenerating);
  }
}

/** The answer as read: its rendered text without the code blocks' headers (Copy buttons). */
function answerText(view) {
  if (!view.body.querySelector(".code-head")) return view.body.innerText;
  const copy = view.body.cloneNode(true);
  for (const head of copy.querySelectorAll(".code-head")) head.remove();
  // innerText needs layout: measure the copy off-screen, then drop it.
  copy.style.cssText = "position:absolute;left:-99999px;top:0;width:600px";
  document.body.append(copy);
  const text = copy.innerText;
  copy.remove();
  return text;
}

/** The finished answer, once, through the polite live region (not the streaming text). */
function announceEnd(view) {
  if (view.announcedSeq === view.seq) return;
  view.announcedSeq = view.seq;
  const said = {
    done: `Answer finished. ${answerText(view)}`,
    cancelled: "Answer stopped.",
    failed: `Answer failed: ${view.error?.message ?? "unknown error"}.`,
  }[view.status];
  if (!said) return;
  ui.announcer.textContent = "";
  // Set after the clear, so screen readers take it as a new announcement (a timer, not an
  // animation frame: it must also happen in a background tab).
  setTimeout(() => (ui.announcer.textContent = said), 50);
}

/** Coalesce renders of a streaming message to one per frame (or per 250 ms when hidden). */
function scheduleRender(view) {
  if (view.renderPending) return;
  view.renderPending = true;
  const run = () => {
    if (!view.renderPending) return;
    renderView(view);
    if (state.follow) scrollToBottom();
    else renderJump();
  };
  if (document.visibilityState === "visible") requestAnimationFrame(run);
  else setTimeout(run, 250);
}

// -- streaming ----------------------------------------------------------------------------

/** Follow the answer on a socket of its own: one per answer. An earlier handle is closed
 * first, and whatever it still reports is dropped: the end of a failed attempt's socket can
 * come after Retry opened the next one (the closing handshake), and taken for the answer's
 * it would let a chat read open a second socket beside the first (every chunk twice). */
function startStream(view, after) {
  view.handle?.close();
  let handle = null; // attach() reports its first state before it returns the handle
  const mine = () => handle === null || view.handle === handle;
  handle = attach(view.streamId, {
    after,
    batch: true, // a catch-up of thousands of chunks comes as a few messages
    quietMs: testHooks.quietMs ?? QUIET_MS,
    onEvents: (events) => mine() && onStreamEvents(view, events),
    onQueued: (place) => mine() && onStreamQueued(view, place),
    onState: (st, detail) => mine() && onStreamState(view, st, detail),
  });
  view.handle = handle;
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
      view.endedAt = performance.now();
      view.status = STATUS_OF_TERMINAL[event.type];
      if (event.type === "error") view.error = event.error ?? { code: "error", message: "failed" };
      flush = true; // terminal: render now, not on the next frame
    } // else: an event type from a newer server; skip it
  }
  if (texts.length) {
    view.raw += texts.join("");
    view.el.dataset.raw = view.raw; // the exact text so far; the Markdown follows per frame
  }
  if (flush) {
    if (view.final) {
      view.stopping = false;
      forgetCancel(view.streamId);
    }
    renderView(view);
    if (state.follow) scrollToBottom();
    renderComposer();
    if (view.final) announceEnd(view);
  } else if (texts.length) {
    scheduleRender(view);
  }
}

/** The stream's own "queued" notice: the answer waits for a worker (also again after an
 * admin retry's resumed event, which made it "streaming"). The socket keeps notices and
 * events in order, so, unlike a feed event, a notice is never older than the text shown. */
function onStreamQueued(view, place) {
  if (view.final) return;
  view.status = "queued";
  showPlace(view, place);
}

function onStreamState(view, st, detail) {
  const waiting = st === STATES.STALLED;
  if (Boolean(view.waiting) !== waiting) {
    view.waiting = waiting;
    renderStatus(view);
  }
  if (st === STATES.ENDED || st === STATES.FAILED) {
    view.handle = null;
    if (state.views.get(view.id) === view) afterStreamEnded(view, st, detail);
  }
  renderConnection();
}

function afterStreamEnded(view, st, detail) {
  renderComposer();
  refreshChats();
  if (st === STATES.FAILED) {
    view.final = true;
    view.status = "failed";
    const reason = detail.reason || "the stream is unavailable";
    view.error = { code: `ws_${detail.code}`, message: `could not follow this answer (${reason})` };
    renderView(view);
    announceEnd(view);
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

// Stop works offline: the cancel is remembered (also across a reload, in localStorage) and
// sent when the connection is back (the "online" event, and retries with backoff meanwhile).
// The answer shows "Stopping…" until its cancelled event arrives.
const CANCELS_KEY = "relay.pendingCancels";
const CANCEL_RETRY_MIN_MS = 1000;
const CANCEL_RETRY_MAX_MS = 15_000;

async function stopGenerating() {
  const views = activeViews().filter((v) => !v.stopping && v.streamId);
  if (!views.length) return;
  for (const view of views) {
    view.stopping = true;
    renderStatus(view);
  }
  renderComposer();
  await Promise.all(views.map((view) => requestCancel(view.streamId)));
}

function viewOfStream(streamId) {
  return [...state.views.values()].find((v) => v.streamId === streamId) ?? null;
}

/** Send one stream's cancel; on a network failure keep it queued and try again later. The
 * stream id is written to localStorage before the request goes out (and dropped once it is
 * answered), so a tab closed or crashed while the request is in flight leaves the cancel to
 * the next page of this browser rather than losing it. */
async function requestCancel(streamId) {
  const pending = state.pendingCancels.get(streamId) ?? { attempt: 0, timer: null };
  clearTimeout(pending.timer);
  pending.timer = null;
  state.sendingCancels.add(streamId);
  saveCancels();
  try {
    await sendCancel(streamId);
    state.sendingCancels.delete(streamId);
    forgetCancel(streamId);
  } catch (err) {
    state.sendingCancels.delete(streamId);
    if (err.code === "network") {
      queueCancel(streamId, pending);
      return;
    }
    forgetCancel(streamId);
    const view = viewOfStream(streamId);
    if (view) {
      view.stopping = false;
      renderStatus(view);
    }
    renderComposer();
    showNotice(humanError(err, "stop the answer"), { retry: stopGenerating });
  }
}

async function sendCancel(streamId) {
  const view = viewOfStream(streamId);
  try {
    if (view?.handle) {
      await view.handle.cancel(); // falls back to the socket when only HTTP is unreachable
    } else {
      await api(`/api/v1/streams/${encodeURIComponent(streamId)}/cancel`, { method: "POST" });
    }
  } catch (err) {
    if (err instanceof ApiError) {
      if (err.status === 409 || err.status === 404) return; // it had ended, or is gone
      throw err;
    }
    const status = Number(/HTTP (\d+)/.exec(err?.message ?? "")?.[1] ?? 0);
    if (status === 404) return;
    throw new ApiError(status, status ? `http_${status}` : "network", "");
  }
}

function queueCancel(streamId, pending) {
  const delay = Math.min(CANCEL_RETRY_MAX_MS, CANCEL_RETRY_MIN_MS * 2 ** pending.attempt);
  pending.attempt += 1;
  pending.timer = setTimeout(() => requestCancel(streamId), delay);
  const first = !state.pendingCancels.has(streamId);
  state.pendingCancels.set(streamId, pending);
  saveCancels();
  const view = viewOfStream(streamId);
  if (view && first) renderStatus(view);
}

function forgetCancel(streamId) {
  const pending = state.pendingCancels.get(streamId);
  if (!pending) {
    saveCancels(); // it was only in flight
    return;
  }
  clearTimeout(pending.timer);
  state.pendingCancels.delete(streamId);
  saveCancels();
  const view = viewOfStream(streamId);
  if (view) renderStatus(view);
}

function saveCancels() {
  const ids = [...new Set([...state.pendingCancels.keys(), ...state.sendingCancels])];
  store(CANCELS_KEY, ids.length ? JSON.stringify(ids) : "");
}

/** Back online (or a reload): send every cancel that is still waiting, now. */
function flushCancels() {
  for (const streamId of state.pendingCancels.keys()) requestCancel(streamId);
}

function restoreCancels() {
  let ids = [];
  try {
    ids = JSON.parse(localStorage.getItem(CANCELS_KEY) || "[]");
  } catch {
    /* unreadable: nothing to restore */
  }
  for (const id of Array.isArray(ids) ? ids : []) {
    if (typeof id === "string") state.pendingCancels.set(id, { attempt: 0, timer: null });
  }
  flushCancels();
}

// -- per-message actions --------------------------------------------------------------------

async function copyAnswer(view) {
  try {
    await navigator.clipboard.writeText(view.raw);
  } catch {
    const text = "Could not copy the answer: the browser did not allow it. Select the text.";
    showNotice(text, { retry: () => copyAnswer(view) });
    return;
  }
  const label = view.copyBtn.querySelector(".act-label");
  label.textContent = "Copied";
  view.copyBtn.dataset.copied = "true";
  clearTimeout(view.copyTimer);
  view.copyTimer = setTimeout(() => {
    label.textContent = "Copy";
    delete view.copyBtn.dataset.copied;
  }, 2000);
}

/** Continue a failed or stopped answer on the same stream (POST .../retry). */
async function retryAnswer(view) {
  if (view.error?.code?.startsWith("ws_")) {
    // The page lost the stream, not the server: follow it again from the stored copy.
    view.final = false;
    view.error = null;
    view.endedWithoutEvent = 0;
    loadChat(state.loadToken);
    return;
  }
  if (activeViews().length || view.retrying) return;
  view.retrying = true;
  view.retryBtn.disabled = true;
  let resumedSeq;
  try {
    const path = `/api/v1/streams/${encodeURIComponent(view.streamId)}/retry`;
    ({ resumedSeq } = await api(path, { method: "POST" }));
  } catch (err) {
    view.retrying = false;
    renderStatus(view);
    showNotice(humanError(err, "retry the answer"), { retry: () => retryAnswer(view) });
    return;
  }
  view.retrying = false;
  view.final = false;
  view.error = null;
  view.endedWithoutEvent = 0;
  view.status = "queued";
  view.place = null;
  // The text shown is the whole stored partial answer; the events after the old terminal
  // event continue it: resumed, then the new chunks.
  view.seq = resumedSeq - 1;
  renderView(view);
  startStream(view, view.seq);
  tabs?.postMessage({ type: "posted", chatId: state.chatId });
}

function startEdit(view) {
  if (view.editing || view.pending) return;
  view.editing = true;
  const form = document.createElement("form");
  form.className = "edit";
  const area = document.createElement("textarea");
  area.className = "edit-input";
  area.value = view.raw;
  area.rows = Math.min(10, Math.max(2, view.raw.split("\n").length));
  area.setAttribute("aria-label", "Edit message");
  const buttons = document.createElement("div");
  buttons.className = "edit-buttons";
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.className = "btn";
  cancel.textContent = "Cancel";
  const send = document.createElement("button");
  send.type = "submit";
  send.className = "btn primary";
  send.textContent = "Send";
  buttons.append(cancel, send);
  form.append(area, buttons);
  view.body.replaceChildren(form);
  view.el.classList.add("editing");
  const close = () => {
    view.editing = false;
    view.el.classList.remove("editing");
    view.body.textContent = view.raw;
    view.editBtn.focus();
  };
  cancel.addEventListener("click", close);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = area.value;
    if (!text.trim()) return;
    if (activeViews().length || state.sending) {
      showNotice("This chat is still answering. Stop it or wait for it, then send.");
      return;
    }
    close();
    sendMessage(text, { fromComposer: false }); // a new turn; this one stays above
  });
  area.addEventListener("keydown", (e) => {
    if (e.key === "Escape") {
      e.preventDefault();
      close();
    } else if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
  area.focus();
  area.setSelectionRange(area.value.length, area.value.length);
}

function onMessageAction(e) {
  const codeCopy = e.target.closest(".code-copy");
  if (codeCopy) {
    copyCode(codeCopy);
    return;
  }
  const button = e.target.closest(".act");
  if (!button) return;
  const view = state.views.get(button.closest(".msg")?.dataset.id);
  if (!view) return;
  if (button.dataset.action === "copy") copyAnswer(view);
  else if (button.dataset.action === "retry") retryAnswer(view);
  else if (button.dataset.action === "edit") startEdit(view);
  else if (button.dataset.action === "regenerate") regenerateAnswer(view);
}

/** Replace the chat's last answer with a new one to the same message (POST
 * /api/v1/chats/<id>/regenerate): the old answer is deleted on the server, and the new one
 * streams in its place. */
async function regenerateAnswer(view) {
  if (activeViews().length || state.sending || view.regenerating || !state.chatId) return;
  const chatId = state.chatId;
  view.regenerating = true;
  renderRegenerate();
  let posted;
  try {
    const path = `/api/v1/chats/${encodeURIComponent(chatId)}/regenerate`;
    posted = await api(path, { method: "POST", body: modelBody(chatId) });
  } catch (err) {
    view.regenerating = false;
    renderRegenerate();
    showNotice(humanError(err, "regenerate the answer"), { retry: () => regenerateAnswer(view) });
    return;
  }
  view.regenerating = false;
  if (state.chatId !== chatId) return;
  state.views.delete(view.id);
  if (state.views.has(posted.messageId)) {
    view.el.remove(); // a reload of the chat meanwhile already shows (and follows) the new one
  } else {
    const fresh = newView({ id: posted.messageId, role: "assistant", status: "queued" });
    fresh.streamId = posted.streamId;
    if (view.el.isConnected) view.el.replaceWith(fresh.el);
    else ui.messages.append(fresh.el);
    renderView(fresh);
    startStream(fresh, 0);
  }
  ui.input.focus({ preventScroll: true }); // the button that had the focus is gone
  if (state.follow) scrollToBottom();
  refreshChats();
  tabs?.postMessage({ type: "posted", chatId });
}

// -- sending ------------------------------------------------------------------------------

/** Post a message to the open chat: the composer's text, or an edited earlier message
 * (sent as a new turn; the turn it was edited from stays above). */
async function sendMessage(text = ui.input.value, { fromComposer = true } = {}) {
  if (!text.trim() || state.sending || activeViews().length) return;
  state.sending = true;
  const chatId = state.chatId;
  const pending = newView({ id: `pending-${Date.now()}`, role: "user", content: text });
  pending.pending = true;
  pending.el.classList.add("sending");
  ui.messages.append(pending.el);
  renderView(pending);
  if (fromComposer) {
    setInput("");
    saveDraft(chatId, "");
  }
  renderEmpty();
  scrollToBottom();
  renderComposer();
  try {
    const body = { chatId, message: text, ...modelBody(chatId) };
    const posted = await api("/api/v1/chat", { method: "POST", body });
    if (state.chatId === chatId) onPosted(posted);
  } catch (err) {
    pending.el.remove();
    state.views.delete(pending.id);
    if (fromComposer && state.chatId === chatId && !ui.input.value) {
      setInput(text); // nothing typed is lost
      saveDraft(chatId, text);
    }
    renderEmpty();
    showNotice(humanError(err, "send the message"), {
      retry: () => {
        if (fromComposer && ui.input.value === text) setInput("");
        sendMessage(text, { fromComposer });
      },
    });
  } finally {
    state.sending = false;
    renderComposer();
  }
}

function onPosted(posted) {
  if (!state.chatId) {
    state.chatId = posted.chatId;
    history.pushState(null, "", `#${encodeURIComponent(posted.chatId)}`);
    adoptNewChatModel(posted.chatId);
  }
  if (!state.views.has(posted.messageId)) {
    // (A reload of the chat meanwhile may already show and follow it.)
    const view = newView({ id: posted.messageId, role: "assistant", status: "queued" });
    view.streamId = posted.streamId;
    ui.messages.append(view.el);
    renderView(view);
    startStream(view, 0);
  }
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

// -- the live feed --------------------------------------------------------------------------

// What happens to the user's chats in any tab or device (GET /api/v1/feed/ws): the list and
// the open chat follow at once. The list poll stays, slow, as a fallback while it is live.
let feed = null;
let listSoonTimer = null;

function startFeed() {
  feed = openFeed({ onEvent: onFeedEvent, onState: onFeedState });
}

let feedWasLive = false; // connected at least once: a later connection is a reconnection

function onFeedState(st) {
  const wasLive = document.documentElement.dataset.feed === STATES.LIVE;
  document.documentElement.dataset.feed = st;
  if (wasLive === (st === STATES.LIVE)) return;
  schedulePoll(); // 60 s while live, 10 s otherwise
  // Back after a drop: the missed events are replayed, but one lost while being written
  // (see api.md) would not be, so the list is read again too.
  if (st === STATES.LIVE && feedWasLive) refreshListSoon();
  if (st === STATES.LIVE) feedWasLive = true;
}

function onFeedEvent(e) {
  if (Array.isArray(testHooks.feedLog)) testHooks.feedLog.push(e);
  switch (e.type) {
    case "reset": // where the feed is now: start from the server's list and chat
      refreshListSoon();
      if (state.chatId && !activeViews().length && !busyHere()) loadChat(state.loadToken);
      break;
    case "chat.created":
    case "chat.renamed":
      refreshListSoon();
      break;
    case "chat.deleted":
      refreshListSoon();
      if (e.chatId === state.chatId && !state.deletedHere.has(e.chatId)) closeDeleted(e.chatId);
      break;
    case "answer.queued":
    case "answer.started":
      refreshListSoon(); // the chat moved to the top
      if (e.chatId === state.chatId) followAnswer(e.streamId);
      break;
    case "answer.waiting": // still queued: its place in line
      showPlace(viewOfStream(e.streamId), e);
      break;
    case "answer.finished":
      refreshListSoon();
      notifyFinished(e);
      break;
    default:
      break; // an event type from a newer server
  }
}

/** A queued answer of this page learns its place in line (and, when known, a wait): from
 * the feed's answer.waiting or from its stream's "queued" notice (relay-stream's onQueued),
 * whichever comes; both say the same, from the same sweep. */
function showPlace(view, { position, etaSeconds }) {
  if (!view) return;
  view.place = { position, etaSeconds: etaSeconds ?? null };
  renderStatus(view);
}

function placeText({ position, etaSeconds }) {
  const where = position <= 1 ? "next in line" : `${position - 1} ahead in line`;
  if (etaSeconds == null) return `Queued: ${where}`;
  const wait = etaSeconds < 60 ? `${etaSeconds} s` : `${Math.round(etaSeconds / 60)} min`;
  return `Queued: ${where}, about ${wait}`;
}

/** One list request for a burst of events. */
function refreshListSoon() {
  if (listSoonTimer) return;
  listSoonTimer = setTimeout(() => {
    listSoonTimer = null;
    refreshChats();
  }, 100);
}

/** Is this page itself posting, retrying or regenerating? It follows that answer itself. */
function busyHere() {
  return state.sending || [...state.views.values()].some((v) => v.retrying || v.regenerating);
}

/** A new answer in the open chat (another tab or device posted, retried or regenerated):
 * load the chat, so the new turn appears and streams here too. */
function followAnswer(streamId) {
  if (!streamId || busyHere() || viewOfStream(streamId)?.handle) return;
  loadChat(state.loadToken);
}

/** The open chat was deleted elsewhere: back to the empty state, as after a local delete. */
function closeDeleted(chatId) {
  saveDraft(chatId, "");
  history.replaceState(null, "", location.pathname);
  openChat(null);
  showNotice("This chat was deleted in another tab or on another device.");
}

/** The list poll: every POLL_MS without the feed, FEED_POLL_MS while it is live. */
let pollTimer = null;
let polling = false; // a poll is being answered: it schedules the next one itself
function schedulePoll() {
  clearTimeout(pollTimer);
  pollTimer = null;
  // The next poll is counted from the end of this one: polls started while one is answered
  // would each make the one before stale, and on a slow server no list would ever be shown.
  // So a call while a poll is answered (the feed going live) only changes the period, which
  // the poll in flight picks up when it schedules the next: a second chain of polls started
  // then would make every answer of the first stale, and the first every answer of it.
  if (polling) return;
  const live = document.documentElement.dataset.feed === STATES.LIVE;
  const delay = testHooks.pollMs ?? (live ? FEED_POLL_MS : POLL_MS);
  if (!(delay > 0)) return;
  pollTimer = setTimeout(async () => {
    pollTimer = null;
    polling = true;
    try {
      await refreshQuietly();
    } finally {
      polling = false;
      schedulePoll();
    }
  }, delay);
}

// -- completion notifications ---------------------------------------------------------------

// The bell in the top bar: off by default; on, a hidden tab shows a system notification when
// an answer finishes. Kept per browser (localStorage); permission is asked only when turned on.
const NOTIFY_KEY = "relay.notify";
const NOTIFY_BODY = { done: "Answer ready", cancelled: "Answer stopped", failed: "Answer failed" };

function notifySupported() {
  return typeof window.Notification === "function";
}

function notifyWanted() {
  try {
    return localStorage.getItem(NOTIFY_KEY) === "on";
  } catch {
    return false;
  }
}

function notifyOn() {
  return notifySupported() && notifyWanted() && Notification.permission === "granted";
}

async function toggleNotify() {
  if (notifyOn()) {
    store(NOTIFY_KEY, "");
    renderNotify();
    return;
  }
  let permission = Notification.permission;
  if (permission === "default") {
    try {
      permission = await Notification.requestPermission();
    } catch {
      permission = "denied";
    }
  }
  if (permission === "granted") {
    store(NOTIFY_KEY, "on");
  } else {
    store(NOTIFY_KEY, "");
    showNotice(
      "Notifications are blocked for this page. Allow them in the browser\u2019s site " +
        "settings to be told when an answer finishes.",
    );
  }
  renderNotify();
}

function renderNotify() {
  ui.notify.hidden = !notifySupported();
  const on = notifyOn();
  ui.notify.setAttribute("aria-pressed", String(on));
  ui.notify.dataset.on = String(on);
  ui.notify.title = `Notify me when an answer finishes: ${on ? "on" : "off"}`;
}

async function chatTitle(chatId) {
  const listed = state.chats.find((c) => c.id === chatId);
  if (listed) return listed.title || "Untitled chat";
  try {
    const chat = await api(`/api/v1/chats/${encodeURIComponent(chatId)}`);
    return chat.title || "Untitled chat";
  } catch {
    return "relay";
  }
}

/** An answer finished (here or anywhere): tell a person who is not looking at this tab. The
 * tag (the stream) makes several hidden tabs of one browser show one notification. */
async function notifyFinished(e) {
  if (!document.hidden || !notifyOn() || !e.streamId) return;
  let body = NOTIFY_BODY[e.status] ?? "Answer ended";
  if (e.reason === "abandoned") body += " (nobody was watching)";
  const title = await chatTitle(e.chatId);
  try {
    const note = new Notification(title, { body, tag: e.streamId });
    note.onclick = () => {
      window.focus();
      note.close();
      if (e.chatId !== state.chatId) location.hash = `#${encodeURIComponent(e.chatId)}`;
    };
  } catch (err) {
    console.warn("Could not show a notification", err); // e.g. Android: service workers only
  }
}

function setInput(text) {
  ui.input.value = text;
  autosize();
}

// -- drafts: per chat, kept across reloads --------------------------------------------------

const DRAFT_PREFIX = "relay.draft:";

function draftKey(chatId) {
  return DRAFT_PREFIX + (chatId ?? "new");
}

function store(key, value) {
  try {
    if (value) localStorage.setItem(key, value);
    else localStorage.removeItem(key);
  } catch {
    /* storage full or disabled: drafts are a convenience */
  }
}

function loadDraft(chatId) {
  try {
    return localStorage.getItem(draftKey(chatId)) ?? "";
  } catch {
    return "";
  }
}

function saveDraft(chatId, text) {
  store(draftKey(chatId), text.trim() ? text : "");
}

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 200)}px`;
}

// -- model picker: shown when the server allows more than one model -----------------------

// The choice is kept per chat in localStorage (relay.model:<chatId>; relay.model:new for a
// chat not yet sent, which becomes the chat's when its first message is posted).
const MODEL_PREFIX = "relay.model:";

function modelKey(chatId) {
  return MODEL_PREFIX + (chatId ?? "new");
}

async function loadModels() {
  try {
    const { models } = await api("/api/v1/models");
    state.models = Array.isArray(models) ? models.filter((m) => typeof m === "string") : [];
  } catch {
    state.models = []; // no picker: posts get the server's default model
  }
  const options = state.models.map((name) => {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    return option;
  });
  ui.model.replaceChildren(...options);
  renderModelPick();
}

/** The chat's model: its stored choice while the server still allows it, else the default. */
function chosenModel(chatId) {
  let stored = null;
  try {
    stored = localStorage.getItem(modelKey(chatId));
  } catch {
    /* storage disabled: the default */
  }
  return state.models.includes(stored) ? stored : state.models[0];
}

function modelBody(chatId) {
  return state.models.length > 1 ? { model: chosenModel(chatId) } : undefined;
}

function renderModelPick() {
  ui.modelPick.hidden = state.models.length < 2;
  if (state.models.length) ui.model.value = chosenModel(state.chatId);
}

function adoptNewChatModel(chatId) {
  if (state.models.length < 2) return;
  store(modelKey(chatId), chosenModel(null));
  store(modelKey(null), "");
}

function onModelChange() {
  // The default is stored too: a chat keeps its model if the server's default changes.
  store(modelKey(state.chatId), ui.model.value);
}

// -- light / dark -------------------------------------------------------------------------

// theme.js applied the stored choice before the first paint; this is the toggle.
const THEME_KEY = "relay.theme";
const THEMES = ["system", "light", "dark"];
const THEME_NAMES = { system: "follows the system", light: "light", dark: "dark" };

function themeChoice() {
  const t = document.documentElement.dataset.theme;
  return t === "light" || t === "dark" ? t : "system";
}

function applyTheme(choice) {
  if (choice === "light" || choice === "dark") document.documentElement.dataset.theme = choice;
  else delete document.documentElement.dataset.theme;
  renderTheme();
}

/** The button cycles system -> light -> dark -> system; the choice is kept per browser. */
function cycleTheme() {
  const next = THEMES[(THEMES.indexOf(themeChoice()) + 1) % THEMES.length];
  store(THEME_KEY, next === "system" ? "" : next);
  applyTheme(next);
}

function renderTheme() {
  const choice = themeChoice();
  const next = THEMES[(THEMES.indexOf(choice) + 1) % THEMES.length];
  const label = `Theme: ${THEME_NAMES[choice]}. Switch to ${THEME_NAMES[next]}`;
  ui.theme.dataset.choice = choice;
  ui.theme.setAttribute("aria-label", label);
  ui.theme.title = label;
}

// -- page chrome --------------------------------------------------------------------------

function renderComposer() {
  const active = activeViews();
  const streaming = active.length > 0;
  const stopping = streaming && active.every((v) => v.stopping);
  ui.stop.hidden = !streaming;
  ui.send.hidden = streaming;
  ui.stop.disabled = stopping;
  ui.stop.dataset.stopping = String(stopping);
  ui.stop.setAttribute("aria-label", stopping ? "Stopping\u2026" : "Stop generating");
  ui.stop.title = stopping ? "Stopping\u2026" : "Stop";
  ui.send.disabled = state.sending || !ui.input.value.trim();
  ui.composer.dataset.streaming = String(streaming);
  for (const view of state.views.values()) {
    if (view.retryBtn) view.retryBtn.disabled = streaming || Boolean(view.retrying);
  }
  renderRegenerate();
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
let noticeRetry = null;
/** A message for people; with ``retry``, a Retry button that runs it (and no time-out). */
function showNotice(text, { retry = null } = {}) {
  ui.noticeText.textContent = text;
  noticeRetry = retry;
  ui.noticeRetry.hidden = !retry;
  ui.notice.hidden = false;
  clearTimeout(noticeTimer);
  if (!retry) noticeTimer = setTimeout(hideNotice, 8000);
}

function hideNotice() {
  ui.notice.hidden = true;
  noticeRetry = null;
}

function fromBottom() {
  const t = ui.thread;
  return t.scrollHeight - t.scrollTop - t.clientHeight;
}

function scrollToBottom() {
  state.follow = true;
  ui.thread.scrollTop = ui.thread.scrollHeight;
  state.lastScrollTop = ui.thread.scrollTop;
  renderJump();
}

/** The user scrolled: moving up stops following the new text, reaching the end resumes. */
function onThreadScroll() {
  const top = ui.thread.scrollTop;
  if (fromBottom() < 8) state.follow = true;
  else if (top < state.lastScrollTop - 2) state.follow = false;
  state.lastScrollTop = top;
  renderJump();
}

function renderJump() {
  ui.jump.hidden = state.follow || fromBottom() < 8;
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
    saveDraft(state.chatId, ui.input.value);
  });
  ui.stop.addEventListener("click", stopGenerating);
  ui.theme.addEventListener("click", cycleTheme);
  window.addEventListener("storage", (e) => {
    if (e.key === THEME_KEY || e.key === null) applyTheme(e.newValue ?? "system"); // other tabs
    if (e.key === NOTIFY_KEY || e.key === null) renderNotify();
  });
  ui.notify.addEventListener("click", toggleNotify);
  ui.messages.addEventListener("click", onMessageAction);
  ui.chatList.addEventListener("click", (e) => {
    const del = e.target.closest(".chat-delete");
    if (del) deleteChat(del.dataset.chatId);
    const rename = e.target.closest(".chat-rename");
    if (rename) startRename(rename.dataset.chatId);
  });
  ui.search.addEventListener("input", onSearchInput);
  ui.search.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && ui.search.value) {
      e.preventDefault();
      clearSearch();
    }
  });
  ui.model.addEventListener("change", onModelChange);
  ui.thread.addEventListener("scroll", onThreadScroll, { passive: true });
  ui.jump.addEventListener("click", () => {
    scrollToBottom();
    ui.input.focus({ preventScroll: true });
  });
  ui.noticeRetry.addEventListener("click", () => {
    const retry = noticeRetry;
    hideNotice();
    retry?.();
  });
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
    flushCancels();
    renderConnection();
    refreshQuietly();
  });
  window.addEventListener("offline", renderConnection);
  document.addEventListener("visibilitychange", refreshQuietly);
  tabs?.addEventListener("message", onTabMessage);
  schedulePoll();
}

async function boot() {
  wire();
  renderTheme();
  renderNotify();
  renderConnection();
  await refreshChats(); // first: this request gives a new browser its guest cookie
  if (testHooks.feed !== false) startFeed();
  restoreCancels();
  await Promise.all([openChat(chatIdFromUrl()), mdReady, loadModels()]);
  document.documentElement.dataset.ready = "true";
}

boot();
