// relay-stream.js: attach to a relay stream over WebSocket and never lose an event.
//
//   import { attach } from "/static/relay-stream.js";
//   const handle = attach(streamId, { after: 0, onEvent, onEvents, onState });
//   handle.cancel();  // ask the server to stop generating
//   handle.close();   // stop listening (generation goes on)
//
// Events are delivered exactly once and in seq order; a dropped socket is reopened with
// exponential backoff and jitter and resumes with ?after=<last seq seen>. By default the
// socket asks for the protocol's batch form (?batch=1): a run of chunks may arrive as one
// {"type":"chunks","seq":7,"texts":[...]} message. The handle expands it into ordinary chunk
// events, calls onEvent for each new one and then onEvents once with all of them, so a page
// can render once per message instead of once per chunk.
//
// The handle ends when the server closes normally (1000, right after the stream's final
// terminal event) or with a 44xx code. A terminal event is not necessarily the end: an admin
// retry can continue the stream after it with a "resumed" event, and the handle delivers that
// too.
// A live stream that brings no event for quietMs (5 s) reports the "stalled" state, and
// "live" again with the next event: the connection is fine, the model is slow.
// While the answer waits in the queue, the server may send {"type":"queued","position":2,
// "etaSeconds":30} notices (no seq: not events of the log). They go to onQueued and
// handle.queued, never to onEvent, and a queued stream is never "stalled".
// See docs/client.md for the full API.

const TERMINAL = new Set(["done", "cancelled", "error"]);

export const STATES = Object.freeze({
  CONNECTING: "connecting", // first socket opening
  LIVE: "live", // socket open, events flowing
  STALLED: "stalled", // socket open, but no event for quietMs (the model is slow or stuck)
  RECONNECTING: "reconnecting", // socket dropped, retry scheduled
  OFFLINE: "offline", // browser is offline; waiting for the "online" event
  ENDED: "ended", // terminal event received (or the server closed with 1000)
  FAILED: "failed", // the server refused the stream (close 44xx) or retries ran out
  CLOSED: "closed", // handle.close() was called
});

const DEFAULTS = {
  after: 0,
  batch: true, // ask for the batch form (?batch=1); false: one message per event
  baseUrl: null, // http(s) origin of the relay server; default: the page's origin
  minDelayMs: 300, // first retry waits between minDelayMs/2 and minDelayMs
  maxDelayMs: 10_000, // backoff ceiling
  maxRetries: Infinity, // consecutive failed connects before giving up (FAILED)
  stallMs: 15_000, // silence after which the stream's status is checked over HTTP
  quietMs: 5_000, // silence after which a live stream reports STALLED (0: never)
  WebSocket: globalThis.WebSocket,
  fetch: (...args) => globalThis.fetch(...args),
  onEvent: () => {}, // each new event, in seq order
  onEvents: () => {}, // then once per message: the new events it carried, in seq order
  onQueued: () => {}, // a "queued" notice: {position, etaSeconds} (etaSeconds may be absent)
  onState: () => {},
};

/** Exponential backoff with "equal jitter": half the delay fixed, half random. */
export function backoffDelay(attempt, minDelayMs, maxDelayMs, random = Math.random) {
  const ceiling = Math.min(maxDelayMs, minDelayMs * 2 ** attempt);
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}

/** Is this close code the server telling us to stop (no retry)? */
export function isFatalClose(code) {
  return code >= 4400 && code < 4500;
}

function wsUrl(baseUrl, streamId, after, batch) {
  const base = new URL(baseUrl || globalThis.location.origin);
  base.protocol = base.protocol === "https:" ? "wss:" : "ws:";
  base.pathname = `/api/v1/streams/${encodeURIComponent(streamId)}/ws`;
  base.search = batch ? `?after=${after}&batch=1` : `?after=${after}`;
  return base.toString();
}

/**
 * The seqs a parsed message carries, or null if it is not an event message:
 * [first, count, eventAt(seq)]. A "chunks" message (the batch form) carries chunk events
 * seq .. seq + texts.length - 1; anything else with a numeric seq is one event.
 */
function messageSpan(msg) {
  if (typeof msg?.seq !== "number" || !Number.isSafeInteger(msg.seq)) return null;
  if (msg.type !== "chunks") return [msg.seq, 1, () => msg];
  const texts = msg.texts;
  if (!Array.isArray(texts) || !texts.length || texts.some((t) => typeof t !== "string")) {
    return null; // malformed: ignored like unparseable JSON (the next seq then looks like a gap)
  }
  return [msg.seq, texts.length, (seq) => ({ type: "chunk", seq, text: texts[seq - msg.seq] })];
}

/**
 * The place a "queued" notice gives: {position, etaSeconds} (etaSeconds only when the
 * server has an estimate), or null when it is malformed (then it is ignored). A notice is
 * not an event of the log: whatever it carries, it never moves the cursor.
 */
function queuedPlace(msg) {
  if (!Number.isSafeInteger(msg.position) || msg.position < 1) return null;
  const place = { position: msg.position };
  if (typeof msg.etaSeconds === "number" && Number.isFinite(msg.etaSeconds)) {
    place.etaSeconds = msg.etaSeconds;
  }
  return place;
}

function httpUrl(baseUrl, path) {
  return new URL(path, baseUrl || globalThis.location.origin).toString();
}

/**
 * Attach to a stream. Returns a handle:
 *   handle.lastSeq   last seq delivered to the callbacks
 *   handle.state     one of STATES
 *   handle.queued    the latest "queued" notice ({position, etaSeconds}) while the answer
 *                    waits in the queue; null once an event has been delivered after it
 *   handle.done      Promise resolved with the terminal event (or null) when the handle ends
 *   handle.cancel()  Promise: POST /api/v1/streams/<id>/cancel (socket message as fallback)
 *   handle.close()   stop for good; does not cancel the generation
 */
export function attach(streamId, options = {}) {
  const opt = { ...DEFAULTS, ...options };
  const s = {
    lastSeq: Number(opt.after) || 0,
    state: null,
    ws: null,
    attempt: 0,
    retryTimer: null,
    stallTimer: null,
    quietTimer: null,
    finished: false,
    terminal: null,
    queued: null, // the latest "queued" notice, until the next event is delivered
  };
  let resolveDone;
  const done = new Promise((resolve) => (resolveDone = resolve));

  function setState(state, detail = {}) {
    if (s.state === state && state !== STATES.RECONNECTING) return;
    s.state = state;
    safeCall(opt.onState, state, detail);
  }

  function finish(state, detail) {
    if (s.finished) return;
    s.finished = true;
    clearTimers();
    dropSocket();
    removeListeners();
    setState(state, detail);
    resolveDone(s.terminal);
  }

  function clearTimers() {
    clearTimeout(s.retryTimer);
    clearTimeout(s.stallTimer);
    clearTimeout(s.quietTimer);
    s.retryTimer = s.stallTimer = s.quietTimer = null;
  }

  function dropSocket() {
    const ws = s.ws;
    s.ws = null;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
    if (ws.readyState <= 1) ws.close(1000);
  }

  function connect() {
    clearTimers();
    if (s.finished) return;
    if (globalThis.navigator?.onLine === false) {
      setState(STATES.OFFLINE);
      return; // the "online" listener resumes
    }
    dropSocket();
    setState(s.state === null ? STATES.CONNECTING : STATES.RECONNECTING, { attempt: s.attempt });
    const ws = new opt.WebSocket(wsUrl(opt.baseUrl, streamId, s.lastSeq, opt.batch));
    s.ws = ws;
    ws.onopen = () => {
      setState(STATES.LIVE);
      armStallCheck();
      armQuiet();
    };
    ws.onmessage = (msg) => onMessage(ws, msg);
    ws.onclose = (ev) => onClose(ws, ev);
  }

  function onMessage(ws, msg) {
    if (ws !== s.ws) return;
    let parsed;
    try {
      parsed = JSON.parse(msg.data);
    } catch {
      return;
    }
    if (parsed?.type === "queued") {
      const place = queuedPlace(parsed);
      if (place) onQueuedNotice(place);
      return; // a notice, never an event: no seq logic, no onEvent
    }
    const span = messageSpan(parsed);
    if (!span) return;
    const [first, count, eventAt] = span;
    s.attempt = 0; // data flows again: the next drop starts the backoff from scratch
    armStallCheck();
    armQuiet();
    if (s.state === STATES.STALLED) setState(STATES.LIVE); // before the event is delivered
    if (first + count - 1 <= s.lastSeq) return; // all delivered already: never twice
    if (first > s.lastSeq + 1) {
      reconnectSoon(); // a hole should never happen; re-read from what we have
      return;
    }
    // Deliver the unseen tail (a message may overlap what an earlier one delivered).
    const fresh = [];
    for (let seq = s.lastSeq + 1; seq < first + count; seq += 1) {
      const event = eventAt(seq);
      s.lastSeq = seq;
      s.queued = null; // the answer left the queue (a later queueing sends notices again)
      if (TERMINAL.has(event.type)) s.terminal = event;
      else if (event.type === "resumed") s.terminal = null;
      fresh.push(event);
      safeCall(opt.onEvent, event);
      if (s.finished) return; // close() from a callback: no callback after it
    }
    safeCall(opt.onEvents, fresh);
  }

  // A "queued" notice: where the answer waits in line. It is no event of the log (no seq):
  // the cursor, the gap check and onEvent never see it. It shows the stream is alive, so it
  // resets the stall check, the retry count and the quiet timer like an event does.
  function onQueuedNotice(place) {
    s.attempt = 0;
    s.queued = place;
    armStallCheck();
    armQuiet();
    if (s.state === STATES.STALLED) setState(STATES.LIVE);
    safeCall(opt.onQueued, { ...place });
  }

  function onClose(ws, ev) {
    if (ws !== s.ws) return;
    s.ws = null;
    if (ev.code === 1000) {
      // The server ends with 1000 only after the final terminal event, or when `after`
      // already was that event's seq: either way there is nothing more to read.
      finish(STATES.ENDED, { code: ev.code, reason: ev.reason, event: s.terminal });
    } else if (isFatalClose(ev.code)) {
      finish(STATES.FAILED, { code: ev.code, reason: ev.reason });
    } else {
      scheduleRetry(ev.code);
    }
  }

  function scheduleRetry(code) {
    clearTimers();
    if (s.finished) return;
    if (s.attempt >= opt.maxRetries) {
      finish(STATES.FAILED, { code, reason: "gave up reconnecting" });
      return;
    }
    if (globalThis.navigator?.onLine === false) {
      setState(STATES.OFFLINE);
      return;
    }
    const delayMs = backoffDelay(s.attempt, opt.minDelayMs, opt.maxDelayMs);
    s.attempt += 1;
    setState(STATES.RECONNECTING, { attempt: s.attempt, delayMs, code });
    s.retryTimer = setTimeout(connect, delayMs);
  }

  function reconnectSoon() {
    dropSocket();
    scheduleRetry(0);
  }

  // A socket can look open while nothing arrives (a half-open connection). After a quiet
  // spell, ask the server how far the stream is; if it is ahead of us, reopen.
  function armStallCheck() {
    clearTimeout(s.stallTimer);
    s.stallTimer = setTimeout(checkStall, opt.stallMs);
  }

  // A live stream that has been quiet for quietMs reports STALLED (the socket is fine, the
  // model is slow to write), and LIVE again with the next event. Not after a terminal event,
  // and not while the answer waits in the queue (a "queued" notice came after the last event:
  // notices come only when the place changes, so the place may be quiet for long).
  function armQuiet() {
    clearTimeout(s.quietTimer);
    s.quietTimer = null;
    if (!(opt.quietMs > 0) || !Number.isFinite(opt.quietMs)) return;
    s.quietTimer = setTimeout(() => {
      s.quietTimer = null;
      if (s.finished || !s.ws || s.state !== STATES.LIVE || s.terminal || s.queued) return;
      setState(STATES.STALLED, { quietMs: opt.quietMs });
    }, opt.quietMs);
  }

  async function checkStall() {
    if (s.finished || !s.ws) return;
    const seenAt = s.lastSeq;
    let behind = false;
    try {
      const resp = await opt.fetch(httpUrl(opt.baseUrl, `/api/v1/streams/${streamId}`), {
        credentials: "same-origin",
        cache: "no-store",
      });
      behind = resp.ok && (await resp.json()).lastSeq > seenAt;
    } catch {
      behind = true; // the server is unreachable: the socket is not to be trusted either
    }
    if (s.finished || !s.ws) return;
    if (behind && s.lastSeq === seenAt) reconnectSoon();
    else armStallCheck();
  }

  // -- browser signals ----------------------------------------------------------------------

  function onOffline() {
    if (s.finished) return;
    clearTimers();
    dropSocket(); // its packets would go nowhere; resume cleanly when back
    setState(STATES.OFFLINE);
  }

  function onOnline() {
    if (s.finished) return;
    s.attempt = 0;
    connect();
  }

  function onVisible() {
    if (s.finished || globalThis.document?.visibilityState !== "visible") return;
    if (!s.ws) {
      s.attempt = 0; // back on the page: retry now rather than after the backoff
      connect();
    } else if (s.ws.readyState === 1) {
      checkStall();
    }
  }

  function addListeners() {
    globalThis.addEventListener?.("online", onOnline);
    globalThis.addEventListener?.("offline", onOffline);
    globalThis.document?.addEventListener("visibilitychange", onVisible);
  }

  function removeListeners() {
    globalThis.removeEventListener?.("online", onOnline);
    globalThis.removeEventListener?.("offline", onOffline);
    globalThis.document?.removeEventListener("visibilitychange", onVisible);
  }

  // -- the handle ---------------------------------------------------------------------------

  async function cancel() {
    let resp;
    try {
      resp = await opt.fetch(httpUrl(opt.baseUrl, `/api/v1/streams/${streamId}/cancel`), {
        method: "POST",
        credentials: "same-origin",
      });
    } catch (err) {
      if (s.ws?.readyState !== 1) throw err;
      s.ws.send(JSON.stringify({ type: "cancel" })); // HTTP is unreachable; the socket is not
      return true;
    }
    if (resp.ok || resp.status === 409) return resp.ok; // 409: it had already finished
    throw new Error(`cancel failed with HTTP ${resp.status}`);
  }

  addListeners();
  connect();

  return {
    get lastSeq() {
      return s.lastSeq;
    },
    get state() {
      return s.state;
    },
    get queued() {
      return s.queued && { ...s.queued };
    },
    get streamId() {
      return streamId;
    },
    done,
    cancel,
    close: () => finish(STATES.CLOSED, {}),
  };
}

function safeCall(fn, ...args) {
  try {
    fn(...args);
  } catch (err) {
    console.error("relay-stream callback failed", err);
  }
}

// -- the live feed -----------------------------------------------------------------------------
//
//   import { openFeed } from "/static/relay-stream.js";
//   const feed = openFeed({ onEvent: (e) => ..., onState });
//   feed.close();
//
// Follows the user's feed (/api/v1/feed/ws): one event per message (chat.created,
// chat.renamed, chat.deleted, answer.queued, answer.started, answer.finished), each with a
// seq, delivered once and in seq order. A dropped socket is reopened with the same backoff as
// attach() and resumes with ?after=<last seq seen>. A {"type":"reset","seq":n} event means
// "reload the chat list, then apply the events after n": the first event of a feed opened
// without `after`, or after a gap the server no longer keeps. The feed never ends by itself;
// it stops for good only on a 44xx close (FAILED) or close().

const FEED_DEFAULTS = {
  after: null, // the last feed seq the page has applied; null: start now (with a reset)
  baseUrl: null,
  minDelayMs: 300,
  maxDelayMs: 10_000,
  maxRetries: Infinity,
  WebSocket: globalThis.WebSocket,
  onEvent: () => {}, // each new event (a reset included), in seq order
  onState: () => {},
};

function feedUrl(baseUrl, after) {
  const base = new URL(baseUrl || globalThis.location.origin);
  base.protocol = base.protocol === "https:" ? "wss:" : "ws:";
  base.pathname = "/api/v1/feed/ws";
  base.search = after === null ? "" : `?after=${after}`;
  return base.toString();
}

/**
 * Follow the user's live feed. Returns a handle:
 *   feed.lastSeq   the last seq delivered (null until the first event when opened without after)
 *   feed.state     one of STATES (never ENDED)
 *   feed.close()   stop for good
 */
export function openFeed(options = {}) {
  const opt = { ...FEED_DEFAULTS, ...options };
  const s = {
    lastSeq: opt.after === null || opt.after === undefined ? null : Number(opt.after) || 0,
    state: null,
    ws: null,
    attempt: 0,
    retryTimer: null,
    finished: false,
  };

  function setState(state, detail = {}) {
    if (s.state === state && state !== STATES.RECONNECTING) return;
    s.state = state;
    safeCall(opt.onState, state, detail);
  }

  function dropSocket() {
    const ws = s.ws;
    s.ws = null;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onclose = null;
    if (ws.readyState <= 1) ws.close(1000);
  }

  function finish(state, detail) {
    if (s.finished) return;
    s.finished = true;
    clearTimeout(s.retryTimer);
    dropSocket();
    globalThis.removeEventListener?.("online", onOnline);
    globalThis.removeEventListener?.("offline", onOffline);
    setState(state, detail);
  }

  function connect() {
    clearTimeout(s.retryTimer);
    if (s.finished) return;
    if (globalThis.navigator?.onLine === false) {
      setState(STATES.OFFLINE);
      return;
    }
    dropSocket();
    setState(s.state === null ? STATES.CONNECTING : STATES.RECONNECTING, { attempt: s.attempt });
    const ws = new opt.WebSocket(feedUrl(opt.baseUrl, s.lastSeq));
    s.ws = ws;
    ws.onopen = () => setState(STATES.LIVE);
    ws.onmessage = (msg) => onMessage(ws, msg);
    ws.onclose = (ev) => onClose(ws, ev);
  }

  function onMessage(ws, msg) {
    if (ws !== s.ws) return;
    let event;
    try {
      event = JSON.parse(msg.data);
    } catch {
      return;
    }
    if (!Number.isSafeInteger(event?.seq)) return;
    s.attempt = 0;
    if (event.type === "reset") {
      s.lastSeq = event.seq; // the page reloads its list; the events after seq follow
    } else if (s.lastSeq !== null && event.seq <= s.lastSeq) {
      return; // delivered already: never twice
    } else if (s.lastSeq !== null && event.seq > s.lastSeq + 1) {
      dropSocket(); // a hole should never happen; resume from what we have
      scheduleRetry(0);
      return;
    } else {
      s.lastSeq = event.seq;
    }
    safeCall(opt.onEvent, event);
  }

  function onClose(ws, ev) {
    if (ws !== s.ws) return;
    s.ws = null;
    if (isFatalClose(ev.code)) finish(STATES.FAILED, { code: ev.code, reason: ev.reason });
    else scheduleRetry(ev.code); // 1001 (a web process going away), 1013, a drop...
  }

  function scheduleRetry(code) {
    clearTimeout(s.retryTimer);
    if (s.finished) return;
    if (s.attempt >= opt.maxRetries) {
      finish(STATES.FAILED, { code, reason: "gave up reconnecting" });
      return;
    }
    const delayMs = backoffDelay(s.attempt, opt.minDelayMs, opt.maxDelayMs);
    s.attempt += 1;
    setState(STATES.RECONNECTING, { attempt: s.attempt, delayMs, code });
    s.retryTimer = setTimeout(connect, delayMs);
  }

  function onOffline() {
    if (s.finished) return;
    clearTimeout(s.retryTimer);
    dropSocket();
    setState(STATES.OFFLINE);
  }

  function onOnline() {
    if (s.finished) return;
    s.attempt = 0;
    connect();
  }

  globalThis.addEventListener?.("online", onOnline);
  globalThis.addEventListener?.("offline", onOffline);
  connect();

  return {
    get lastSeq() {
      return s.lastSeq;
    },
    get state() {
      return s.state;
    },
    close: () => finish(STATES.CLOSED, {}),
  };
}
