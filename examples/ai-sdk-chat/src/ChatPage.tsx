import { useChat } from '@ai-sdk/react';
import { DefaultChatTransport, type UIMessage } from 'ai';
import { type FormEvent, useEffect, useRef, useState } from 'react';
import { API, chatUrl } from './api';

// The stock transport, configured with `api` only: sends POST {api}, resumes GET {api}/{id}/stream.
const transport = new DefaultChatTransport({ api: API });

const textOf = (message: UIMessage) =>
  message.parts.map(part => (part.type === 'text' ? part.text : '')).join('');

/** `streaming` while the answer is being written, `done` once ended, `empty` before any text
 * (the page shows `stopped` for an answer stopped here). */
const stateOf = (message: UIMessage) => {
  const texts = message.parts.filter(part => part.type === 'text');
  if (texts.length === 0) return 'empty';
  return texts.some(part => part.state === 'streaming') ? 'streaming' : 'done';
};

/** Reconnect delays after a dropped connection: 0.5 s, 1 s, 2 s, ... at most 8 s. */
const retryDelay = (attempt: number) => Math.min(500 * 2 ** attempt, 8000);

function useOnline() {
  const [online, setOnline] = useState(() => navigator.onLine);
  useEffect(() => {
    const update = () => setOnline(navigator.onLine);
    window.addEventListener('online', update);
    window.addEventListener('offline', update);
    return () => {
      window.removeEventListener('online', update);
      window.removeEventListener('offline', update);
    };
  }, []);
  return online;
}

export function ChatPage({ id, initialMessages }: { id: string; initialMessages: UIMessage[] }) {
  const online = useOnline();
  const [input, setInput] = useState('');
  const [stopFailure, setStopFailure] = useState<string | null>(null);
  // The last response was cut by the network (not stopped, not failed): resume it.
  const [dropped, setDropped] = useState(false);
  const attempts = useRef(0);

  const { messages, sendMessage, status, error, stop, resumeStream } = useChat({
    id,
    messages: initialMessages,
    resume: true, // on mount: GET {api}/{id}/stream replays the running answer, else 204
    transport,
    onFinish: ({ isDisconnect }) => setDropped(isDisconnect),
  });

  // useChat resumes after a drop only when the page becomes visible again. Resume at once
  // instead (or as soon as the browser is back online), retrying while the network is down.
  const reconnecting = status === 'error' && dropped && error instanceof TypeError;
  useEffect(() => {
    if (status === 'streaming') attempts.current = 0;
    if (!reconnecting || !online) return;
    const timer = setTimeout(() => void resumeStream(), retryDelay(attempts.current++));
    return () => clearTimeout(timer);
  }, [reconnecting, online, status, error, resumeStream]);

  // chat.stop() only closes this tab's request, which relay (rightly) never takes as a stop.
  // So: ask relay to cancel the answer first, then close the request (docs/ai-sdk.md).
  // relay answers once the answer has ended; chat.stop() may then close the response before
  // its closing parts arrive, leaving the text part `streaming`: remember which one stopped.
  const [stopped, setStopped] = useState<ReadonlySet<string>>(new Set());
  const stopAnswer = async () => {
    const wasCut = reconnecting;
    setDropped(false);
    setStopFailure(null);
    try {
      const response = await fetch(chatUrl(id, 'stop'), { method: 'POST' });
      if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
      const { messageId } = (await response.json()) as { messageId: string | null };
      if (messageId) setStopped(ids => new Set(ids).add(messageId));
    } catch (err) {
      setStopFailure(String(err));
      return;
    }
    await stop();
    // Stopped while the connection was down: fetch the stopped answer once, as relay kept it.
    if (wasCut) await resumeStream();
  };

  const busy = status === 'submitted' || status === 'streaming';
  const send = (event: FormEvent) => {
    event.preventDefault();
    if (!input.trim() || busy) return;
    void sendMessage({ text: input });
    setInput('');
  };

  const bottom = useRef<HTMLDivElement>(null);
  useEffect(() => {
    bottom.current?.scrollIntoView({ block: 'end' }); // newer browsers return a promise here
  }, [messages]);

  const connection = reconnecting ? 'reconnecting' : online ? 'online' : 'offline';
  return (
    <main data-role="chat" data-chat-id={id} data-status={status} data-connection={connection}>
      <header>
        <h1>relay · AI SDK chat</h1>
        <a href="?" data-role="new-chat">
          New chat
        </a>
      </header>

      <ol data-role="messages">
        {messages.map(message => (
          <li
            key={message.id}
            data-role="message"
            data-message-role={message.role}
            data-message-id={message.id}
            data-state={stopped.has(message.id) ? 'stopped' : stateOf(message)}
            data-sdk-state={stateOf(message)}
          >
            <span className="who">
              {message.role === 'user' ? 'You' : 'Assistant'}
              {stopped.has(message.id) && ' (stopped)'}
            </span>
            <div data-role="message-text">{textOf(message)}</div>
          </li>
        ))}
      </ol>
      <div ref={bottom} />

      <p data-role="status">
        {connection === 'reconnecting'
          ? 'Connection lost: the answer goes on at relay, and shows again on reconnecting…'
          : connection === 'offline'
            ? `Offline (${status})`
            : status}
      </p>
      {error && !reconnecting && <p data-role="error">{error.message}</p>}
      {stopFailure && <p data-role="error">Stop failed: {stopFailure}</p>}

      <form onSubmit={send}>
        <input
          data-role="input"
          value={input}
          onChange={event => setInput(event.target.value)}
          placeholder="Ask something (try [demo:words=300] for a long answer)"
          autoFocus
        />
        <button type="submit" data-role="send" disabled={busy || !input.trim()}>
          Send
        </button>
        <button type="button" data-role="stop" disabled={!busy && !reconnecting} onClick={stopAnswer}>
          Stop
        </button>
      </form>
    </main>
  );
}
