"""The chat page in a real Chromium (Debian's, driven by Playwright) against the real stack.

Every test checks the page against the server: the raw text the page accumulated for an
answer (``data-raw``) must equal the stored message exactly, and every value it showed on
the way must be a prefix of that final text (nothing flashed, duplicated or dropped).
Screenshots go to test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from playwright.sync_api import (
    Browser,
    Locator,
    Page,
    Route,
    WebSocket,
    expect,
)

from models import keys
from tests.chromium import PHONE, Session
from tests.client import wait_for
from tests.conftest import ON_SQLITE, Stack

pytestmark = ON_SQLITE

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
T = 30_000  # ms: generous, these are upper bounds for waits, never expectations
# ms: for the end of an answer paced to last 20-30 s (a busy machine adds to that)
T_ANSWER = 90_000

# For each message the page's sockets receive: how many chunk texts it carried and how many
# times handling it wrote data-raw (the page's exact text so far).
MESSAGE_PROBE_SCRIPT = """
window.__perMessage = [];
const rawWrites = new MutationObserver(() => {});
rawWrites.observe(document, { subtree: true, attributes: true, attributeFilter: ["data-raw"] });
window.WebSocket = class extends window.WebSocket {
  get onmessage() { return super.onmessage; }
  set onmessage(handler) {
    super.onmessage = handler && ((msg) => {
      rawWrites.takeRecords();
      handler(msg);
      const texts = JSON.parse(msg.data).texts?.length ?? 1;
      window.__perMessage.push([texts, rawWrites.takeRecords().length]);
    });
  }
};
"""

# No skip when chromium is missing: `make test` installs it, and a browser test that cannot
# run must fail rather than hide the page from the suite.


# -- fixtures --------------------------------------------------------------------------------


# -- helpers ---------------------------------------------------------------------------------


def open_app(page: Page, base_url: str, chat_id: str | None = None) -> None:
    page.goto(f"{base_url}/" + (f"#{chat_id}" if chat_id else ""))
    expect(page.locator("html")).to_have_attribute("data-ready", "true", timeout=T)


def send(page: Page, text: str | None) -> str:
    """Type a message (None: keep what is typed) and press Enter; returns the chat id."""
    if text is not None:
        page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function("location.hash.length > 1", timeout=T)
    return str(page.evaluate("decodeURIComponent(location.hash.slice(1))"))


def answer(page: Page) -> Locator:
    return page.locator(".msg.assistant").last


def raw(page: Page) -> str:
    return str(answer(page).get_attribute("data-raw"))


def wait_text(page: Page, chars: int) -> None:
    page.wait_for_function(
        """(n) => { const a = [...document.querySelectorAll('.msg.assistant')].pop();
                    return a && (a.dataset.raw || '').length >= n; }""",
        arg=chars,
        timeout=T,
    )


def wait_status(page: Page, status: str, timeout: float = T) -> None:
    expect(answer(page)).to_have_attribute("data-status", status, timeout=timeout)


def stored_answer(page: Page, base_url: str, chat_id: str) -> dict[str, Any]:
    resp = page.request.get(f"{base_url}/api/v1/chats/{chat_id}")
    assert resp.ok, resp.text()
    messages = resp.json()["messages"]
    return [m for m in messages if m["role"] == "assistant"][-1]  # type: ignore[no-any-return]


def wait_checkpoint(page: Page, base_url: str, chat_id: str) -> None:
    """Return as soon as the stored text of the chat's answer moves (a worker checkpoint)."""
    before = stored_answer(page, base_url, chat_id)["streamSeq"]
    wait_for(lambda: stored_answer(page, base_url, chat_id)["streamSeq"] != before, T / 1000, 0.01)


def assert_exact(page: Page, base_url: str, chat_id: str, status: str = "complete") -> str:
    """The shown answer equals the stored one; everything shown on the way was a prefix."""
    stored = stored_answer(page, base_url, chat_id)
    assert stored["status"] == status
    shown = raw(page)
    assert shown == stored["content"]
    history = page.evaluate("(id) => window.__rawLog[id] || []", stored["id"])
    assert history, "the answer was never rendered"
    for before, after in itertools.pairwise(history):
        assert after.startswith(before), "shown text shrank or changed"
    assert all(shown.startswith(h) for h in history)
    # What people see: the opening words once, not twice.
    opening = shown[:40]
    visible = answer(page).locator(".md").inner_text()
    assert visible.count(opening.split("\n")[0][:30]) == 1
    return shown


def log_length(stack: Stack, stream_id: str) -> int:
    return int(stack.redis().xlen(keys.log_key(stream_id)))


def log_status(stack: Stack, stream_id: str) -> str:
    status = stack.redis().hget(keys.state_key(stream_id), "status")
    return status.decode() if isinstance(status, bytes) else str(status)


def stream_id(page: Page) -> str:
    sid = answer(page).get_attribute("data-stream-id")
    assert sid
    return sid


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


class Sockets:
    """Every WebSocket a page opens: its URL and the messages the server sent on it.

    Playwright hands events over while the test calls into it, so wait with ``until``
    (which keeps calling) rather than with time.sleep."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.opened: list[tuple[str, list[dict[str, Any]]]] = []
        page.on("websocket", self._opened)

    def _opened(self, ws: WebSocket) -> None:
        if "/api/v1/feed/" in ws.url:
            return  # the page's live feed, not an answer's stream
        messages: list[dict[str, Any]] = []
        self.opened.append((ws.url, messages))
        ws.on("framereceived", lambda payload: messages.append(json.loads(payload)))

    def until(self, probe: Callable[[], object], timeout_ms: int = T) -> None:
        for _ in range(timeout_ms // 50):
            if probe():
                return
            self.page.wait_for_timeout(50)
        raise AssertionError("condition not met in time")

    def messages(self, since: int = 0) -> list[dict[str, Any]]:
        return [m for _, msgs in self.opened[since:] for m in msgs]


def query(url: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}


def seqs_of(message: dict[str, Any]) -> list[int]:
    """The seqs a wire message carries (a ``chunks`` message carries one per text)."""
    first = int(message["seq"])
    return list(range(first, first + len(message.get("texts", [None]))))


# -- tests -----------------------------------------------------------------------------------


def test_send_streams_and_matches_the_stored_message(page: Page, stack: Stack) -> None:
    open_app(page, stack.base_url)
    expect(page.locator("#empty")).to_be_visible()
    shot(page, "desktop-empty")
    # Shift+Enter is a new line, Enter sends.
    page.fill("#input", "Explain write-ahead logs in databases")
    page.press("#input", "Shift+Enter")
    assert page.locator("#input").input_value() == "Explain write-ahead logs in databases\n"
    expect(page.locator(".msg")).to_have_count(0)
    page.locator("#input").press_sequentially("[demo:words=140]")
    chat_id = send(page, None)
    expect(page.locator("#input")).to_have_value("")
    user = page.locator(".msg.user").last
    expect(user).to_have_attribute(
        "data-raw", "Explain write-ahead logs in databases\n[demo:words=140]"
    )
    wait_status(page, "streaming")
    expect(page.locator("#stop")).to_be_visible()
    wait_text(page, 300)
    shot(page, "desktop-mid-stream")
    wait_status(page, "done")
    expect(page.locator("#send")).to_be_visible()
    assert_exact(page, stack.base_url, chat_id)
    # Markdown is rendered: the demo answer has a bullet list with bold lead-ins.
    assert answer(page).locator(".md li").count() >= 3
    assert answer(page).locator(".md li strong").count() >= 3
    expect(answer(page).locator(".status")).to_have_text("Done")
    expect(page.locator("#chat-list .chat-link[aria-current=page]")).to_contain_text("Explain")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    shot(page, "desktop-done")


def test_reload_mid_stream_continues_without_duplicates(page: Page, stack: Stack) -> None:
    open_app(page, stack.base_url)
    chat_id = send(page, "Tell me about durable queues [demo:words=220]")
    wait_text(page, 200)
    page.reload()
    expect(page.locator("html")).to_have_attribute("data-ready", "true", timeout=T)
    # History first, then the live tail continues it.
    expect(page.locator(".msg.user")).to_have_count(1)
    expect(page.locator(".msg.assistant")).to_have_count(1)
    wait_status(page, "done")
    assert_exact(page, stack.base_url, chat_id)


def test_offline_mid_stream_then_back_online(page: Page, session: Session, stack: Stack) -> None:
    open_app(page, stack.base_url)
    chat_id = send(page, "Offline resilience [demo:words=220]")
    wait_text(page, 150)
    sid = stream_id(page)
    session.context.set_offline(True)
    expect(page.locator("#conn")).to_have_attribute("data-state", "offline", timeout=T)
    shot(page, "desktop-offline")
    shown_offline = len(raw(page))
    # Generation goes on without us: wait until the log is well ahead of the page.
    at_drop = log_length(stack, sid)
    wait_for(lambda: log_length(stack, sid) > at_drop + 40, timeout=20)
    assert len(raw(page)) == shown_offline  # nothing arrives while offline
    session.context.set_offline(False)
    wait_status(page, "done")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=T)
    assert_exact(page, stack.base_url, chat_id)


def test_web_server_killed_and_restarted_mid_stream(page: Page, stack: Stack) -> None:
    web, port = stack.start_web()
    base = f"http://127.0.0.1:{port}"
    open_app(page, base)
    chat_id = send(page, "Survive a server restart [demo:words=260]")
    wait_text(page, 150)
    sid = stream_id(page)
    web.kill()
    expect(page.locator("#conn")).to_have_attribute("data-state", "reconnecting", timeout=T)
    at_kill = log_length(stack, sid)
    wait_for(lambda: log_length(stack, sid) > at_kill + 40, timeout=20)
    restarted, _ = stack.start_web(port=port)
    try:
        wait_status(page, "done")
        expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=T)
        assert_exact(page, base, chat_id)
    finally:
        restarted.stop()


def test_stop_button_cancels_and_stays_cancelled(page: Page, stack: Stack) -> None:
    open_app(page, stack.base_url)
    chat_id = send(page, "A long answer to stop [demo:words=400]")
    wait_text(page, 120)
    page.click("#stop")
    wait_status(page, "cancelled")
    expect(answer(page).locator(".status")).to_have_text("Cancelled")
    shot(page, "desktop-cancelled")
    expect(page.locator("#send")).to_be_visible()
    partial = assert_exact(page, stack.base_url, chat_id, status="cancelled")
    assert len(partial) >= 120
    status = page.request.get(f"{stack.base_url}/api/v1/streams/{stream_id(page)}").json()
    assert status["status"] == "cancelled"
    page.reload()
    expect(page.locator("html")).to_have_attribute("data-ready", "true", timeout=T)
    wait_status(page, "cancelled")
    assert raw(page) == partial
    expect(page.locator("#stop")).to_be_hidden()


def test_two_tabs_show_the_same_answer(page: Page, session: Session, stack: Stack) -> None:
    open_app(page, stack.base_url)
    chat_id = send(page, "Two tabs [demo:words=160]")
    wait_text(page, 100)
    other = session.new_page()
    open_app(other, stack.base_url, chat_id)
    wait_status(other, "streaming")
    wait_status(page, "done")
    wait_status(other, "done")
    first = assert_exact(page, stack.base_url, chat_id)
    second = assert_exact(other, stack.base_url, chat_id)
    assert first == second
    html = answer(page).locator(".md").inner_html()
    assert html == answer(other).locator(".md").inner_html()
    # A follow-up sent in one tab shows up live in the other, which was already open.
    send(page, "And a follow-up [demo:words=110]")
    expect(other.locator(".msg.assistant")).to_have_count(2, timeout=T)
    wait_status(other, "streaming")
    wait_status(page, "done")
    wait_status(other, "done")
    final = assert_exact(page, stack.base_url, chat_id)
    assert assert_exact(other, stack.base_url, chat_id) == final


def test_html_in_model_output_is_shown_as_text(page: Page, stack: Stack) -> None:
    payload = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
    open_app(page, stack.base_url)
    chat_id = send(page, f"{payload} [demo:echo]")
    wait_status(page, "done")
    assert_exact(page, stack.base_url, chat_id)
    assert page.evaluate("window.__pwned") is None
    thread = page.locator("#thread")
    assert thread.locator("script").count() == 0
    assert thread.locator("img").count() == 0
    assert thread.locator("[onerror]").count() == 0
    expect(answer(page).locator(".md")).to_contain_text("<script>window.__pwned=1</script>")
    expect(answer(page).locator(".md")).to_contain_text('onerror="window.__pwned=2"')
    expect(page.locator(".msg.user .bubble")).to_contain_text("<img src=x onerror=")
    # Reloaded from history, it is still just text.
    page.reload()
    expect(page.locator("html")).to_have_attribute("data-ready", "true", timeout=T)
    expect(answer(page).locator(".md")).to_contain_text("<script>window.__pwned=1</script>")
    assert page.evaluate("window.__pwned") is None
    assert thread.locator("img").count() == 0


def test_failed_generation_shows_the_error(page: Page, stack: Stack) -> None:
    open_app(page, stack.base_url)
    chat_id = send(page, "This one breaks [demo:fail-after=15]")
    wait_status(page, "failed")
    expect(answer(page).locator(".status")).to_contain_text("Failed: demo generator failed")
    shot(page, "desktop-failed")
    assert_exact(page, stack.base_url, chat_id, status="failed")
    page.reload()
    expect(page.locator("html")).to_have_attribute("data-ready", "true", timeout=T)
    expect(answer(page).locator(".status")).to_contain_text("Failed: demo generator failed")


def test_switching_chats_reattaches_to_the_running_answer(page: Page, stack: Stack) -> None:
    open_app(page, stack.base_url)
    first = send(page, "A long answer to come back to [demo:words=220]")
    wait_text(page, 100)
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    second = send(page, "Meanwhile, a short one [demo:words=15]")
    assert second != first
    wait_status(page, "done")
    assert_exact(page, stack.base_url, second)
    page.click(f"#chat-list .chat-link[data-chat-id='{first}']")
    expect(page.locator(".msg.user")).to_have_count(1)
    expect(page.locator(".msg.user")).to_contain_text("A long answer to come back to")
    wait_status(page, "done")
    assert_exact(page, stack.base_url, first)
    page.go_back()  # browser history follows the chats
    expect(page.locator(".msg.user")).to_contain_text("Meanwhile, a short one")


def test_relay_stream_module_contract(page: Page, stack: Stack) -> None:
    """relay-stream.js on its own: resume after a seq, and a 44xx close is final."""
    open_app(page, stack.base_url)
    posted = page.request.post(
        f"{stack.base_url}/api/v1/chat", data={"message": "Module check [demo:words=30]"}
    ).json()
    status_url = f"{stack.base_url}/api/v1/streams/{posted['streamId']}"
    # after=k must not be beyond what is written: wait until the log has more than 5 events.
    wait_for(lambda: page.request.get(status_url).json()["lastSeq"] > 10, timeout=20)
    result = page.evaluate(
        """async (sid) => {
          const { attach, backoffDelay } = await import('/static/relay-stream.js');
          const events = [], states = [];
          const h = attach(sid, { after: 5, onEvent: (e) => events.push(e),
                                  onState: (s) => states.push(s) });
          const terminal = await h.done;
          const bad = [];
          const g = attach('no-such-stream', { onState: (s, d) => bad.push([s, d.code ?? null]) });
          await g.done;
          const delays = [0, 1, 2, 3, 10, 20].map((n) => backoffDelay(n, 300, 10000));
          return { seqs: events.map((e) => e.seq), terminal, states, bad, delays,
                   lastSeq: h.lastSeq };
        }""",
        posted["streamId"],
    )
    seqs = result["seqs"]
    assert seqs == list(range(6, 6 + len(seqs))) and len(seqs) > 5
    assert result["terminal"]["type"] == "done" and result["terminal"]["seq"] == seqs[-1]
    assert result["lastSeq"] == seqs[-1]
    assert result["states"][0] == "connecting" and result["states"][-1] == "ended"
    # The handshake completes, then the server closes with 4404: final, no retries.
    assert result["bad"][-1] == ["failed", 4404]
    assert [st for st, _ in result["bad"]] == ["connecting", "live", "failed"]
    ceilings = [300, 600, 1200, 2400, 10000, 10000]
    for delay, ceiling in zip(result["delays"], ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling


FAKE_SOCKET_SCRIPT = """async () => {
  const { attach } = await import('/static/relay-stream.js');
  const sockets = [];
  class FakeSocket {  // driven by hand: open, events, drops
    constructor(url) { this.url = url; this.readyState = 0; this.sent = []; sockets.push(this); }
    send(data) { this.sent.push(data); }
    close() { this.readyState = 3; }
    open() { this.readyState = 1; this.onopen?.({}); }
    emit(event) { this.onmessage?.({ data: JSON.stringify(event) }); }
    drop(code, reason = '') { this.readyState = 3; this.onclose?.({ code, reason }); }
  }
  const chunk = (seq) => ({ type: 'chunk', seq, text: `t${seq}` });
  const out = { events: [], states: [] };
  const offlineFetch = async () => { throw new TypeError('network down'); };
  const h = attach('s1', {
    after: 2, WebSocket: FakeSocket, fetch: offlineFetch, stallMs: 1e9,
    minDelayMs: 60000, maxDelayMs: 60000,  // a retry would only come from a browser signal
    onEvent: (e) => out.events.push(e.seq), onState: (st) => out.states.push(st),
  });
  sockets[0].open();
  sockets[0].emit(chunk(3)); sockets[0].emit(chunk(4)); sockets[0].emit(chunk(4));
  sockets[0].drop(1006);
  out.socketsAfterDrop = sockets.length;
  document.dispatchEvent(new Event('visibilitychange'));  // back on the page: retry now
  sockets[1].open();
  sockets[1].emit(chunk(3)); sockets[1].emit(chunk(5));
  window.dispatchEvent(new Event('offline'));
  out.closedWhenOffline = sockets[1].readyState === 3;
  out.socketsWhileOffline = sockets.length;
  window.dispatchEvent(new Event('online'));
  sockets[2].open();
  out.cancelled = await h.cancel();  // HTTP unreachable: falls back to the socket
  out.sent = sockets[2].sent;
  sockets[2].emit(chunk(6)); sockets[2].emit({ type: 'cancelled', seq: 7 });
  out.stateAfterTerminal = h.state;  // not the end yet: an admin retry may continue it
  sockets[2].emit({ type: 'resumed', seq: 8, attempt: 2 }); sockets[2].emit(chunk(9));
  sockets[2].emit({ type: 'done', seq: 10, messageId: 'm' });
  sockets[2].drop(1000, 'stream ended');  // the server closes after the final terminal event
  out.terminal = await h.done;
  const g = attach('s2', { WebSocket: FakeSocket, minDelayMs: 1 });
  sockets[3].open();
  sockets[3].drop(4404, 'no such stream');
  await g.done;
  out.fatalState = g.state;
  out.urls = sockets.map((s) => new URL(s.url).pathname + new URL(s.url).search);
  return out;
}"""


def test_relay_stream_reconnects_dedupes_and_follows_the_browser(page: Page, stack: Stack) -> None:
    """relay-stream.js with a hand-driven socket: drops, duplicates, visibility, offline."""
    open_app(page, stack.base_url)
    out = page.evaluate(FAKE_SOCKET_SCRIPT)
    assert out["events"] == [3, 4, 5, 6, 7, 8, 9, 10]  # each seq once, in order
    assert out["urls"] == [
        "/api/v1/streams/s1/ws?after=2&batch=1",
        "/api/v1/streams/s1/ws?after=4&batch=1",  # resumed after the last seq seen
        "/api/v1/streams/s1/ws?after=5&batch=1",
        "/api/v1/streams/s2/ws?after=0&batch=1",
    ]
    assert out["socketsAfterDrop"] == 1  # the backoff waits...
    assert out["closedWhenOffline"] and out["socketsWhileOffline"] == 2  # ...offline waits
    assert out["cancelled"] is True and out["sent"] == ['{"type":"cancel"}']
    assert out["stateAfterTerminal"] == "live"
    assert out["terminal"] == {"type": "done", "seq": 10, "messageId": "m"}
    states = [s for s, nxt in itertools.zip_longest(out["states"], out["states"][1:]) if s != nxt]
    assert states == [
        "connecting", "live", "reconnecting", "live", "offline", "reconnecting", "live", "ended",
    ]  # fmt: skip
    assert out["fatalState"] == "failed"  # 44xx: no retry


# -- the batch form (?batch=1) ---------------------------------------------------------------


def test_page_reads_the_batch_form_and_reloads_show_the_stored_text_once(
    page: Page, stack: Stack
) -> None:
    sockets = Sockets(page)
    open_app(page, stack.base_url)
    chat_id = send(page, "A long answer in batches [demo:words=900] [demo:rate=250]")
    wait_text(page, 600)
    # Right after a checkpoint, and the chat's history handed to the page 0.3 s after the
    # server read it: the log is many events past the stored text when the page attaches,
    # however the next checkpoints fall. (A catch-up of one event comes as a plain chunk: a
    # reload that took longer than a checkpoint interval, on a busy machine, read a checkpoint
    # made just before the page attached.)
    wait_checkpoint(page, stack.base_url, chat_id)
    live = len(sockets.opened)
    history = f"**/api/v1/chats/{chat_id}"
    held: list[str] = []

    def hold(route: Route) -> None:
        response = route.fetch()  # the server reads the stored text now
        time.sleep(0.3)  # the worker goes on meanwhile (about 75 events at this rate)
        held.append(route.request.url)
        route.fulfill(response=response)

    page.route(history, hold)
    page.reload()  # mid-stream: history, then the rest after its streamSeq
    expect(page.locator("html")).to_have_attribute("data-ready", "true", timeout=T)
    # The page may read the chat twice as it loads: wait for a read still held (removing the
    # route under it made its fulfill fail with "Route is already handled").
    page.unroute_all(behavior="wait")
    assert held  # the page's read of the chat was the one held
    expect(page.locator(".msg.assistant")).to_have_count(1)
    wait_status(page, "done")
    assert_exact(page, stack.base_url, chat_id)
    sockets.until(lambda: any(m["type"] == "done" for m in sockets.messages(live)))
    assert sockets.opened and all(query(url).get("batch") == "1" for url, _ in sockets.opened)
    url, messages = sockets.opened[live]
    after = int(query(url)["after"])
    assert after > 0  # continued after the stored text, not from the start
    seqs = [seq for m in sockets.messages(live) for seq in seqs_of(m)]
    assert seqs == list(range(after + 1, after + 1 + len(seqs)))  # what it had not seen, once
    # What was stored at the reload plus the catch-up: the catch-up came as chunks messages.
    assert any(m["type"] == "chunks" and len(m["texts"]) >= 2 for m in messages)
    assert any(m["type"] == "chunks" and m["seq"] == after + 1 for m in messages)

    page.reload()  # finished: shown from history, no socket needed
    expect(page.locator("html")).to_have_attribute("data-ready", "true", timeout=T)
    expect(page.locator(".msg.assistant")).to_have_count(1)
    wait_status(page, "done")
    assert_exact(page, stack.base_url, chat_id)


def test_catch_up_comes_in_few_messages_and_the_page_takes_each_at_once(
    page: Page, session: Session, stack: Stack
) -> None:
    sockets = Sockets(page)
    page.add_init_script(MESSAGE_PROBE_SCRIPT)
    open_app(page, stack.base_url)
    chat_id = send(page, "Catch up in batches [demo:words=1500] [demo:rate=400]")
    wait_text(page, 100)
    sid = stream_id(page)
    session.context.set_offline(True)
    expect(page.locator("#conn")).to_have_attribute("data-state", "offline", timeout=T)
    at_drop = log_length(stack, sid)
    wait_for(lambda: log_length(stack, sid) > at_drop + 700, timeout=30)
    before_online = len(sockets.opened)
    session.context.set_offline(False)  # back: hundreds of chunks to catch up on
    # The answer (2,460 pieces) ends at the worker's pace, which on a loaded two-core machine
    # outlasted the page's wait (CI: 39 s): wait for its end in the log first.
    wait_for(lambda: log_status(stack, sid) == "done", timeout=90)
    wait_status(page, "done")
    shown = assert_exact(page, stack.base_url, chat_id)
    sockets.until(lambda: any(m["type"] == "done" for m in sockets.messages()))
    messages = sockets.messages()
    # What the server sent, by seq (a frame may have reached the browser after the page
    # dropped its socket going offline; the page never saw it, the next socket re-sent it).
    texts: dict[int, str] = {}
    for m in messages:
        if m["type"] in ("chunk", "chunks"):
            texts.update(zip(seqs_of(m), m.get("texts") or [m["text"]], strict=True))
    assert sorted(texts) == list(range(1, len(texts) + 1))
    assert "".join(texts[seq] for seq in sorted(texts)) == shown
    caught_up = next(msgs for _, msgs in sockets.opened[before_online:] if msgs)
    assert caught_up[0]["type"] == "chunks" and len(caught_up[0]["texts"]) >= 100
    assert len(messages) < len(texts) - 500
    # The page takes each message in at once: its text grows once per message, however many
    # chunks the message carried (the Markdown follows at most once per frame).
    per_message: list[list[int]] = page.evaluate("window.__perMessage")
    assert max(texts for texts, _ in per_message) >= 100
    assert all(writes <= 1 for _, writes in per_message), per_message


BATCH_SOCKET_SCRIPT = """async () => {
  const { attach } = await import('/static/relay-stream.js');
  const sockets = [];
  class FakeSocket {  // plays the server's part, message by message
    constructor(url) { this.url = url; this.readyState = 0; sockets.push(this); }
    send() {}
    close() { this.readyState = 3; }
    open() { this.readyState = 1; this.onopen?.({}); }
    emit(message) { this.onmessage?.({ data: JSON.stringify(message) }); }
    drop(code, reason = '') { this.readyState = 3; this.onclose?.({ code, reason }); }
  }
  const until = async (probe) => {
    for (let i = 0; i < 500 && !probe(); i += 1) await new Promise((r) => setTimeout(r, 10));
  };
  const chunks = (seq, ...texts) => ({ type: 'chunks', seq, texts });
  const chunk = (seq, text) => ({ type: 'chunk', seq, text });
  const out = { events: [], calls: [], states: [] };
  const h = attach('s1', {
    after: 2, WebSocket: FakeSocket, stallMs: 1e9, minDelayMs: 1, maxDelayMs: 1,
    onEvent: (e) => out.events.push([e.seq, e.type, e.text ?? null]),
    onEvents: (es) => out.calls.push(es.map((e) => e.seq)),
    onState: (st) => out.states.push(st),
  });
  const a = sockets[0];
  a.open();
  a.emit(chunks(3, 'c', 'd', 'e'));  // 3..5
  a.emit(chunks(1, 'A', 'B', 'C', 'D'));  // 1..4: all seen, nothing delivered
  a.emit(chunks(4, 'D', 'E', 'f', 'g'));  // 4..7 overlaps: only 6 and 7
  a.emit(chunk(8, 'h'));  // a lone chunk
  a.emit(chunks(9, 'i', 'j'));  // then a run again
  a.emit(chunk(10, 'J'));  // seen
  a.emit(chunks(13, 'm', 'n'));  // 11 and 12 missing: a gap, nothing delivered
  out.lastSeqAtGap = h.lastSeq;
  await until(() => sockets.length > 1);
  const b = sockets[1];
  b.open();
  b.emit(chunks(9, 'I', 'J', 'k', 'l'));  // a resend that overlaps: only 11 and 12
  b.emit(chunks(13, 'm', 'n'));
  b.emit({ type: 'cancelled', seq: 15 });
  out.stateAfterTerminal = h.state;
  b.emit({ type: 'cancelled', seq: 15 });
  b.emit({ type: 'resumed', seq: 16, attempt: 2 });  // an admin retry continues it
  b.emit(chunks(17, 'q', 'r', 's'));
  b.emit(chunks(17, 'Q', 'R', 'S', 't'));
  b.emit({ type: 'done', seq: 21, messageId: 'm' });
  b.drop(1000, 'stream ended');
  out.terminal = await h.done;
  out.lastSeq = h.lastSeq;
  out.finalState = h.state;

  // close() from inside onEvent in the middle of a chunks message: nothing after it.
  const closing = { seen: [], calls: 0 };
  const g = attach('s2', {
    WebSocket: FakeSocket, batch: false, stallMs: 1e9,
    onEvent: (e) => { closing.seen.push(e.seq); if (e.seq === 2) g.close(); },
    onEvents: () => { closing.calls += 1; },
  });
  sockets[2].open();
  sockets[2].emit(chunks(1, 'a', 'b', 'c'));  // read even when not asked for
  sockets[2].emit(chunk(4, 'd'));
  Object.assign(closing, { state: g.state, lastSeq: g.lastSeq });
  out.closing = closing;

  // The stall check after a chunks message resumes after its last seq.
  const ahead = async () => ({ ok: true, json: async () => ({ lastSeq: 99 }) });
  const k = attach('s3', { WebSocket: FakeSocket, fetch: ahead, stallMs: 50, minDelayMs: 1 });
  sockets[3].open();
  sockets[3].emit(chunks(1, 'a', 'b', 'c'));
  await until(() => sockets.length > 4);
  k.close();
  out.urls = sockets.map((s) => new URL(s.url).pathname + new URL(s.url).search);
  return out;
}"""


def test_relay_stream_batch_form_edge_cases(page: Page, stack: Stack) -> None:
    """relay-stream.js against a scripted server: overlaps, gaps, mixed forms, resumed."""
    open_app(page, stack.base_url)
    out = page.evaluate(BATCH_SOCKET_SCRIPT)
    texts = dict.fromkeys(range(3, 15)) | dict(zip(range(3, 15), "cdefghijklmn", strict=True))
    texts |= dict(zip(range(17, 21), "qrst", strict=True))
    kinds = {15: "cancelled", 16: "resumed", 21: "done"}
    expected = [[seq, kinds.get(seq, "chunk"), texts.get(seq)] for seq in range(3, 22)]
    assert out["events"] == expected  # every seq once, in order, with the unseen text only
    assert out["calls"] == [
        [3, 4, 5], [6, 7], [8], [9, 10], [11, 12], [13, 14], [15], [16], [17, 18, 19], [20], [21],
    ]  # fmt: skip
    assert out["lastSeqAtGap"] == 10
    assert out["stateAfterTerminal"] == "live"
    assert out["terminal"] == {"type": "done", "seq": 21, "messageId": "m"}
    assert out["lastSeq"] == 21 and out["finalState"] == "ended"
    states = [s for s, nxt in itertools.zip_longest(out["states"], out["states"][1:]) if s != nxt]
    assert states == ["connecting", "live", "reconnecting", "live", "ended"]
    assert out["closing"] == {"seen": [1, 2], "calls": 0, "state": "closed", "lastSeq": 2}
    assert out["urls"] == [
        "/api/v1/streams/s1/ws?after=2&batch=1",
        "/api/v1/streams/s1/ws?after=10&batch=1",  # the gap: re-read after the last delivered
        "/api/v1/streams/s2/ws?after=0",  # batch: false keeps the old URL
        "/api/v1/streams/s3/ws?after=0&batch=1",
        "/api/v1/streams/s3/ws?after=3&batch=1",  # stalled: resumed after the batch's last seq
    ]


def test_relay_stream_batch_form_against_the_server(page: Page, stack: Stack) -> None:
    """A finished long stream read through the module: the batch form arrives in a few
    messages and expands to exactly the events of the default form."""
    open_app(page, stack.base_url)
    posted = page.request.post(
        f"{stack.base_url}/api/v1/chat",
        data={"message": "Many small pieces [demo:words=1500] [demo:rate=1000]"},
    ).json()
    status_url = f"{stack.base_url}/api/v1/streams/{posted['streamId']}"
    wait_for(lambda: page.request.get(status_url).json()["status"] == "done", timeout=60)
    out = page.evaluate(
        """async (sid) => {
          const { attach } = await import('/static/relay-stream.js');
          const read = async (options) => {
            const events = [];
            let calls = 0;
            const h = attach(sid, { ...options, onEvent: (e) => events.push(e),
                                    onEvents: () => { calls += 1; } });
            const terminal = await h.done;
            return { events, calls, terminal, state: h.state };
          };
          return { batched: await read({ after: 0 }), single: await read({ batch: false }),
                   middle: await read({ after: 777 }) };
        }""",
        posted["streamId"],
    )
    batched, single, middle = out["batched"], out["single"], out["middle"]
    events = batched["events"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len(events) > 1500 and events[-1]["type"] == "done"
    assert batched["terminal"] == events[-1] and batched["state"] == "ended"
    text = "".join(e["text"] for e in events if e["type"] == "chunk")
    assert text == stored_answer(page, stack.base_url, posted["chatId"])["content"]
    assert single["events"] == events and single["calls"] == len(events)
    assert batched["calls"] * 100 <= len(events)  # a few messages, not one per chunk
    assert middle["events"] == events[777:]
    assert middle["calls"] * 100 <= len(middle["events"])


def test_phone_layout(browser: Browser, stack: Stack) -> None:
    s = Session(browser, PHONE)
    try:
        page = s.new_page()
        open_app(page, stack.base_url)
        sidebar = page.locator("#sidebar")
        expect(sidebar).not_to_be_in_viewport()
        shot(page, "phone-empty")
        chat_id = send(page, "How do durable queues work? [demo:words=120]")
        wait_text(page, 250)
        shot(page, "phone-mid-stream")
        wait_status(page, "done")
        assert_exact(page, stack.base_url, chat_id)
        shot(page, "phone-done")
        page.click("#open-sidebar")
        expect(sidebar).to_be_in_viewport()
        expect(page.locator("#chat-list .chat-link")).to_have_count(1)
        page.wait_for_function(
            "document.getElementById('sidebar').getBoundingClientRect().left >= 0"
        )
        shot(page, "phone-sidebar")
        page.click("#chat-list .chat-link")
        expect(sidebar).not_to_be_in_viewport()
        assert not s.errors, s.errors
    finally:
        s.close()
