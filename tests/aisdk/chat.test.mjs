// The real AI SDK against a running relay: the Chat class behind useChat (@ai-sdk/react)
// with an unmodified DefaultChatTransport configured with `api` only, and the `fetch` a
// browser would have. Proves each item of the "Acceptance" section of the AI SDK contract
// (docs/ai-sdk.md).
//
//   node tests/aisdk/chat.test.mjs http://127.0.0.1:8000      (or RELAY_URL=...)
//
// The "browser" is the transport's documented `fetch` option: a fetch that keeps relay's
// guest session cookie and sends Origin on writes, as a browser does (Node's fetch keeps no
// cookies), and that can cut a response after N text-deltas with a TypeError("network
// error ..."), which is how a dropped connection reaches the SDK in a browser. Nothing else
// is configured: no headers, no prepare* hooks (except the {id, message} body that the SDK's
// resume docs build, tested as such), no changes to the parsing.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Chat } from '@ai-sdk/react';
import { DefaultChatTransport } from 'ai';

const BASE = (process.argv[2] || process.env.RELAY_URL || '').replace(/\/$/, '');
if (!BASE) {
  console.error('usage: node chat.test.mjs <relay base url>');
  process.exit(2);
}
const API = `${BASE}/api/v1/ai-sdk/chat`;
const LONG = '[demo:words=150]'; // a few seconds at the test stack's 80 chunks/s
const TIMEOUT_MS = 60_000;

/** One browser profile: a cookie jar, and responses it can cut like a dropped network. */
class Browser {
  cookies = new Map();
  statuses = []; // [method, url path, status] of every request, for the 204 checks
  #cut = null;

  /** Cut the next response after `deltas` text-delta parts reached the page. */
  cutNext(deltas) {
    this.#cut = deltas;
  }

  fetch = async (input, init = {}) => {
    const url = new URL(typeof input === 'string' ? input : input.url);
    const method = (init.method || 'GET').toUpperCase();
    const headers = new Headers(init.headers);
    if (this.cookies.size) {
      headers.set('cookie', [...this.cookies].map(([k, v]) => `${k}=${v}`).join('; '));
    }
    if (method !== 'GET' && method !== 'HEAD') headers.set('origin', url.origin);
    const response = await fetch(url, { ...init, headers });
    for (const line of response.headers.getSetCookie()) {
      const [pair] = line.split(';');
      const at = pair.indexOf('=');
      this.cookies.set(pair.slice(0, at).trim(), pair.slice(at + 1).trim());
    }
    this.statuses.push([method, url.pathname, response.status]);
    const cut = this.#cut;
    this.#cut = null;
    if (cut == null || !response.body) return response;
    return new Response(cutAfter(response.body, cut), {
      status: response.status,
      headers: response.headers,
    });
  };

  transport(extra = {}) {
    return new DefaultChatTransport({ api: API, fetch: this.fetch, ...extra });
  }

  chat(id, messages) {
    return new Chat({ id, messages, transport: this.transport() });
  }

  async json(path, init) {
    const response = await this.fetch(`${BASE}${path}`, init);
    assert.ok(response.ok, `${path}: ${response.status}`);
    return response.json();
  }
}

/** The body passes through whole SSE events; once `deltas` text-deltas went through and the
 * page has read them, the body fails as a dropped connection does in a browser. */
function cutAfter(body, deltas) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  const encoder = new TextEncoder();
  let buffer = '';
  let seen = 0;
  return new ReadableStream(
    {
      async pull(controller) {
        if (seen >= deltas) {
          await reader.cancel(); // the connection is gone: relay sees the client leave
          controller.error(new TypeError('network error (connection cut by the test)'));
          return;
        }
        const { done, value } = await reader.read();
        if (done) return controller.close();
        buffer += decoder.decode(value, { stream: true });
        let end;
        while (seen < deltas && (end = buffer.indexOf('\n\n')) !== -1) {
          const event = buffer.slice(0, end + 2);
          buffer = buffer.slice(end + 2);
          if (event.includes('"type":"text-delta"')) seen += 1;
          controller.enqueue(encoder.encode(event));
        }
      },
    },
    { highWaterMark: 0 },
  );
}

const newId = () => Math.random().toString(36).slice(2, 10) + Date.now().toString(36);

function texts(message) {
  return message.parts.filter(p => p.type === 'text');
}

function textOf(message) {
  return texts(message)
    .map(p => p.text)
    .join('');
}

/** Statuses a chat goes through, recorded from the Chat class's own callbacks. */
function watch(chat) {
  const seen = [chat.status];
  chat['~registerStatusCallback'](() => seen.push(chat.status));
  return seen;
}

async function until(probe, what) {
  const deadline = Date.now() + TIMEOUT_MS;
  while (Date.now() < deadline) {
    if (await probe()) return;
    await new Promise(resolve => setTimeout(resolve, 25));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** relay's own view of an answer, from its /api/v1 chat API (not the AI SDK endpoints). */
async function relayAnswer(browser, messageId) {
  const { chats } = await browser.json('/api/v1/chats');
  for (const { id } of chats) {
    const { messages } = await browser.json(`/api/v1/chats/${id}`);
    const found = messages.find(m => m.id === messageId);
    if (found) return found;
  }
  throw new Error(`relay has no message ${messageId}`);
}

async function finishedAnswer(browser, messageId) {
  let answer;
  await until(async () => {
    answer = await relayAnswer(browser, messageId);
    return !['pending', 'streaming'].includes(answer.status);
  }, `answer ${messageId} to end`);
  return answer;
}

/** The chat shows `answer` exactly once, whole, as one finished text part. */
function assertShownOnce(chat, answer, { partState = 'done' } = {}) {
  const assistants = chat.messages.filter(m => m.role === 'assistant');
  assert.equal(assistants.length, 1, JSON.stringify(chat.messages));
  const [shown] = assistants;
  assert.equal(shown.id, answer.id);
  assert.equal(texts(shown).length, 1);
  assert.equal(textOf(shown), answer.content);
  assert.equal(texts(shown)[0].state, partState);
  assert.equal(chat.status, 'ready');
  assert.equal(new Set(chat.messages.map(m => m.id)).size, chat.messages.length);
}

const lastAssistant = chat => chat.messages.findLast(m => m.role === 'assistant');

test('send with the default body: the answer streams in with relay\'s message id', async () => {
  const browser = new Browser();
  const chat = browser.chat(newId());
  const statuses = watch(chat);
  await chat.sendMessage({ text: 'Hello from the AI SDK [demo:words=30]' });
  assert.deepEqual(
    chat.messages.map(m => m.role),
    ['user', 'assistant'],
  );
  const answer = await relayAnswer(browser, lastAssistant(chat).id);
  assert.equal(answer.status, 'complete');
  assertShownOnce(chat, answer);
  assert.deepEqual([...new Set(statuses)], ['ready', 'submitted', 'streaming']);
  assert.equal(chat.error, undefined);
});

test('send with the {id, message} body of the SDK\'s resume docs', async () => {
  const browser = new Browser();
  const id = newId();
  const transport = browser.transport({
    prepareSendMessagesRequest: ({ id, messages }) => ({ body: { id, message: messages.at(-1) } }),
  });
  const chat = new Chat({ id, transport });
  await chat.sendMessage({ text: 'First [demo:words=10]' });
  await chat.sendMessage({ text: 'Second [demo:words=10]' });
  assert.deepEqual(
    chat.messages.map(m => m.role),
    ['user', 'assistant', 'user', 'assistant'],
  );
  const answer = await relayAnswer(browser, lastAssistant(chat).id);
  assert.equal(textOf(lastAssistant(chat)), answer.content);
  // relay's history is the conversation: the hydration endpoint has all four, and the
  // answers under the ids the page shows (user message ids are the client's own).
  const hydrated = await browser.json(`/api/v1/ai-sdk/chat/${id}/messages`);
  assert.deepEqual(
    hydrated.map(m => [m.role, textOf(m)]),
    chat.messages.map(m => [m.role, textOf(m)]),
  );
  assert.equal(hydrated[1].id, chat.messages[1].id);
  assert.equal(hydrated[3].id, lastAssistant(chat).id);
});

test('a cut mid-answer, then resume in the same tab: whole, once, same id', async () => {
  const browser = new Browser();
  const finishes = [];
  const chat = new Chat({
    id: newId(),
    transport: browser.transport(),
    onFinish: info => finishes.push(info),
  });
  browser.cutNext(5);
  await chat.sendMessage({ text: `Cut me ${LONG}` });
  assert.equal(chat.status, 'error');
  assert.equal(finishes.at(-1).isDisconnect, true); // resumable, as in a browser
  const before = lastAssistant(chat);
  const seenText = textOf(before);
  assert.ok(seenText.length > 0);
  await chat.resumeStream(); // what an app does when onFinish reports isDisconnect
  const answer = await finishedAnswer(browser, before.id);
  assert.equal(answer.status, 'complete');
  assertShownOnce(chat, answer);
  assert.ok(answer.content.startsWith(seenText), 'the text seen before the cut is its start');
  assert.ok(answer.content.length > seenText.length);
  assert.equal(chat.messages.length, 2);
  assert.equal(finishes.at(-1).isDisconnect, false);
});

test('a second tab opened mid-answer sees the same answer', async () => {
  const browser = new Browser();
  const id = newId();
  const first = browser.chat(id);
  const sending = first.sendMessage({ text: `Two tabs ${LONG}` });
  await until(() => textOf(lastAssistant(first) ?? { parts: [] }).length > 0, 'first text');
  const second = browser.chat(id); // same browser profile, a new tab: no messages yet
  await second.resumeStream();
  await sending;
  const answer = await relayAnswer(browser, lastAssistant(first).id);
  assertShownOnce(first, answer);
  assertShownOnce(second, answer);
  assert.equal(second.messages.length, 1);
});

test('a page reloaded mid-answer, hydrated with the partial message, shows it once and whole', async () => {
  const browser = new Browser();
  const id = newId();
  const first = browser.chat(id);
  const sending = first.sendMessage({ text: `Reload me [demo:words=250]` });
  await until(() => textOf(lastAssistant(first) ?? { parts: [] }).length > 0, 'some text');
  await first.stop(); // the old page goes away: closing the connection does not cancel
  await sending;
  // The new page loads the chat: once relay has checkpointed some of the answer (every
  // 0.5 s on the test stack), it is a partial message, still being written.
  let hydrated;
  await until(async () => {
    hydrated = await browser.json(`/api/v1/ai-sdk/chat/${id}/messages`);
    return hydrated.length === 2 && texts(hydrated[1]).length === 1;
  }, 'a checkpointed partial answer');
  assert.equal(texts(hydrated[1])[0].state, 'streaming');
  const reloaded = browser.chat(id, hydrated);
  await reloaded.resumeStream(); // useChat({resume: true}) does this on mount
  const answer = await relayAnswer(browser, hydrated[1].id);
  assert.equal(answer.status, 'complete');
  assertShownOnce(reloaded, answer);
  assert.equal(reloaded.messages.length, 2);
  assert.ok(answer.content.startsWith(textOf(hydrated[1])));
  // A fresh page right after the end gets the finished answer: hydrated or not.
  const fresh = browser.chat(id, await browser.json(`/api/v1/ai-sdk/chat/${id}/messages`));
  await fresh.resumeStream();
  assertShownOnce(fresh, answer);
  assert.equal(fresh.messages.length, 2);
  const bare = browser.chat(id);
  await bare.resumeStream();
  assertShownOnce(bare, answer);
});

test('stop: the stop endpoint, then chat.stop(); the answer no longer grows; the next turn is accepted', async () => {
  const browser = new Browser();
  const id = newId();
  const chat = browser.chat(id);
  const statuses = watch(chat);
  const sending = chat.sendMessage({ text: `Stop me ${LONG}` });
  await until(() => textOf(lastAssistant(chat) ?? { parts: [] }).length > 0, 'some text');
  // The application code the SDK's docs prescribe: the server-side stop, then the client's.
  const stopped = await browser.fetch(`${API}/${encodeURIComponent(id)}/stop`, { method: 'POST' });
  assert.equal(stopped.status, 200);
  const { status, messageId } = await stopped.json();
  assert.equal(status, 'cancelled');
  await chat.stop();
  await sending;
  assert.equal(chat.status, 'ready');
  assert.ok(!statuses.includes('error'));
  const answer = await relayAnswer(browser, messageId);
  assert.equal(answer.status, 'cancelled');
  // Reconnects replay the stopped answer: the same text, twice over, never longer.
  for (let i = 0; i < 2; i++) {
    await chat.resumeStream();
    assertShownOnce(chat, answer);
    assert.equal(chat.messages.length, 2);
    await new Promise(resolve => setTimeout(resolve, 300));
  }
  assert.equal((await relayAnswer(browser, messageId)).content, answer.content);
  await chat.sendMessage({ text: 'And now? [demo:words=8]' });
  assert.equal(chat.status, 'ready');
  assert.deepEqual(
    chat.messages.map(m => m.role),
    ['user', 'assistant', 'user', 'assistant'],
  );
  const next = await relayAnswer(browser, lastAssistant(chat).id);
  assert.equal(next.status, 'complete');
  assert.equal(textOf(lastAssistant(chat)), next.content);
});

test('204 for an unknown chat and for another user\'s chat id; status stays ready', async () => {
  const alice = new Browser();
  const bob = new Browser();
  const id = newId();
  const alices = alice.chat(id);
  await alices.sendMessage({ text: "Alice's [demo:words=5]" });
  for (const [browser, chatId] of [
    [alice, newId()],
    [bob, id],
  ]) {
    const chat = browser.chat(chatId);
    const statuses = watch(chat);
    await chat.resumeStream();
    assert.deepEqual(browser.statuses.at(-1), [
      'GET',
      `/api/v1/ai-sdk/chat/${chatId}/stream`,
      204,
    ]);
    assert.equal(chat.status, 'ready');
    assert.deepEqual([...new Set(statuses)], ['ready']);
    assert.deepEqual(chat.messages, []);
    assert.equal(chat.error, undefined);
  }
  assert.equal(alices.messages.length, 2);
});
