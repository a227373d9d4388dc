import { generateId, type UIMessage } from 'ai';
import { useEffect, useState } from 'react';
import { chatUrl } from './api';
import { ChatPage } from './ChatPage';

/** The chat id lives in the URL (?chat=<id>), so a reload opens, and resumes, the same chat.
 * A page without one starts a new chat: relay creates it on the first message. */
function chatIdFromUrl(): string {
  const url = new URL(window.location.href);
  const id = url.searchParams.get('chat');
  if (id && /^[A-Za-z0-9_-]{1,64}$/.test(id)) return id;
  const fresh = generateId();
  url.searchParams.set('chat', fresh);
  window.history.replaceState(null, '', url);
  return fresh;
}

/** Loads the chat's messages from relay, then mounts useChat with them: a reload shows the
 * history at once, and an answer still being written with the text it has so far. */
export function App() {
  const [id] = useState(chatIdFromUrl);
  const [initial, setInitial] = useState<UIMessage[] | null>(null);
  const [failure, setFailure] = useState<string | null>(null);
  const [attempt, setAttempt] = useState(0);

  useEffect(() => {
    const controller = new AbortController();
    fetch(chatUrl(id, 'messages'), { signal: controller.signal })
      .then(async response => {
        if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
        setInitial((await response.json()) as UIMessage[]);
      })
      .catch((err: unknown) => {
        if (!controller.signal.aborted) setFailure(String(err));
      });
    return () => controller.abort();
  }, [id, attempt]);

  if (initial === null) {
    return failure === null ? (
      <p data-role="loading">Loading…</p>
    ) : (
      <p data-role="error">
        Could not load the chat: {failure}{' '}
        <button
          onClick={() => {
            setFailure(null);
            setAttempt(n => n + 1);
          }}
        >
          Retry
        </button>
      </p>
    );
  }
  return <ChatPage id={id} initialMessages={initial} />;
}
