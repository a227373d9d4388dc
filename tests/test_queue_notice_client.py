"""The stream's own ``queued`` notices in the browser (issue 14, last item): the real
relay-stream.js in Debian's Chromium against the real stack (one worker that runs one answer
at a time, kept busy by a long answer of the same user), and against a hand-driven socket.

A notice (``{"type": "queued", "position": 1, "etaSeconds": 60}``, see docs/protocol.md) has
no seq: ``attach`` hands it to ``onQueued`` and ``handle.queued``, never to ``onEvent``; the
events around it keep their seqs 1..n with no gap; a queued stream never reports ``stalled``.
The chat page with no live feed shows the place from its stream's notices alone. Every
WebSocket message the module received is recorded in the page, so a failure says exactly
what the server sent.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.chromium import FAKE_SOCKET_JS, Session
from tests.client import Client, wait_until
from tests.conftest import Stack
from tests.test_browser import T, answer, assert_exact, open_app, send, wait_status

# Places in line are computed for answers queued longer than 0.5 s (the tests' sweep runs
# every 0.5 s); the default test setting (600 s) would never announce one.
QUEUE_FAST = pytest.mark.stack_env(RELAY_QUEUE_POSITION_AFTER_S="0.5")
# The page with neither a live feed nor a list poll: a place it shows came from the stream.
NO_FEED = "window.relayTest = { feed: false, pollMs: 0 };"
BUSY = "Busy elsewhere [demo:words=5000] [demo:rate=40]"  # minutes, unless cancelled
QUIET_MS = 800  # the handles' quietMs: short, so a queue wait spans several of them


def same_user(stack: Stack, session: Session) -> Client:
    """A client with the browser's guest cookie: the same user on another device."""
    other = stack.client()
    for cookie in session.context.cookies():
        other.http.cookies.set(cookie["name"], cookie["value"])
    return other


def keep_worker_busy(stack: Stack, other: Client) -> str:
    """The only worker slot taken by a long answer; returns its stream id."""
    stack.start_worker("one-at-a-time", concurrency=1)
    busy = other.post_chat(BUSY)["streamId"]
    other.wait_status(busy, {"running"}, timeout=60)
    return str(busy)


def cancel(other: Client, stream_id: str) -> None:
    resp = other.request("POST", f"/api/v1/streams/{stream_id}/cancel")
    assert resp.status_code in (200, 202), resp.text


def first_notice(other: Client, stream_id: str) -> dict[str, Any]:
    """Wait until the server knows the stream's place: a socket of our own hears it (the
    notice comes at attach once the place is known, or when it first becomes known)."""
    got: list[str] = []
    with other.connect_ws(f"/api/v1/streams/{stream_id}/ws?after=0", max_queue=None) as ws:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                got.append(str(ws.recv(timeout=max(0.1, deadline - time.monotonic()))))
            except TimeoutError:
                break
            message: dict[str, Any] = json.loads(got[-1])
            if message.get("type") == "queued":
                return message
    raise AssertionError(f"no queued notice within 30 s; the server sent {got}")


# -- the module against the server --------------------------------------------------------------

# Two handles on the queued stream, the batch form and the default one. Each records what
# its socket received (raw), what the module made of it (events, onQueued calls, states with
# handle.queued at the time) and its end.
ATTACH_SCRIPT = """async ({ streamId, quietMs }) => {
  const { attach } = await import('/static/relay-stream.js');
  const q = (window.__q = {});
  for (const batch of [true, false]) {
    const rec = { raw: [], events: [], batches: [], notices: [], states: [], queuedAtEvent: [] };
    class RecordingSocket extends WebSocket {
      constructor(url) {
        super(url);
        rec.raw.push(['open', url]);
        this.addEventListener('message', (m) => rec.raw.push(['message', m.data]));
        this.addEventListener('close', (e) => rec.raw.push(['close', e.code, e.reason]));
      }
    }
    const form = batch ? 'batch' : 'plain';
    q[form] = rec;
    const handle = attach(streamId, {
      batch, quietMs, WebSocket: RecordingSocket,
      onEvent: (e) => { rec.events.push(e); rec.queuedAtEvent.push(rec.handle?.queued ?? null); },
      onEvents: (events) => rec.batches.push(events.map((e) => e.seq)),
      onQueued: (place) => rec.notices.push({ place, queued: rec.handle?.queued ?? null }),
      onState: (st) => rec.states.push([st, rec.handle?.queued ?? null, rec.handle?.lastSeq ?? 0]),
    });
    rec.handle = handle;
    handle.done.then((terminal) => {
      rec.terminal = terminal;
      rec.queuedAtEnd = handle.queued;
      rec.lastSeq = handle.lastSeq;
      rec.ended = true;
    });
  }
}"""

SNAPSHOT = """() => Object.fromEntries(Object.entries(window.__q).map(([form, rec]) => [form, {
  raw: rec.raw, events: rec.events, batches: rec.batches, notices: rec.notices,
  states: rec.states, queuedAtEvent: rec.queuedAtEvent, queued: rec.handle.queued,
  state: rec.handle.state, lastSeq: rec.handle.lastSeq, ended: Boolean(rec.ended),
  terminal: rec.terminal ?? null, queuedAtEnd: rec.queuedAtEnd ?? null,
}]))"""


def check_place(place: dict[str, Any], where: str) -> None:
    assert place["position"] == 1, where
    assert set(place) <= {"position", "etaSeconds"}, where
    eta = place.get("etaSeconds")
    assert eta is None or (isinstance(eta, int | float) and eta >= 0), where


def check_raw(rec: dict[str, Any], form: str) -> None:
    """What the socket carried: notices without seq, all before the first event."""
    messages = [json.loads(r[1]) for r in rec["raw"] if r[0] == "message"]
    kinds = [m["type"] for m in messages if m.get("type") != "ping"]
    notices = [m for m in messages if m.get("type") == "queued"]
    assert notices, f"{form}: no queued notice on the socket: {rec['raw']}"
    assert all("seq" not in m for m in notices), f"{form}: {rec['raw']}"
    first_event = next((i for i, k in enumerate(kinds) if k != "queued"), len(kinds))
    assert "queued" not in kinds[first_event:], f"{form}: a notice after an event: {rec['raw']}"
    assert len(rec["notices"]) == len(notices), f"{form}: {rec['raw']}"
    assert [n["place"]["position"] for n in rec["notices"]] == [m["position"] for m in notices]
    opened = [r[1] for r in rec["raw"] if r[0] == "open"]
    assert len(opened) == 1 and ("batch=1" in opened[0]) == (form == "batch"), opened


def check_handle(rec: dict[str, Any], form: str, content: str) -> None:
    """Events 1..n, ending done, the text stored; handle.queued set until the first event."""
    where = f"{form}: {rec['raw']}"
    events = rec["events"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), where
    assert all(e["type"] == "chunk" for e in events[:-1]), where
    assert events[-1]["type"] == "done" and rec["terminal"] == events[-1], where
    assert "".join(e["text"] for e in events[:-1]) == content, where
    assert list(itertools.chain(*rec["batches"])) == [e["seq"] for e in events], where
    for n in rec["notices"]:
        check_place(n["place"], where)
        assert n["queued"] == n["place"], where  # handle.queued is the latest, already
    assert rec["queuedAtEvent"][0] is None, where  # the first event ends the queueing
    assert all(q is None for q in rec["queuedAtEvent"]), where
    assert rec["queuedAtEnd"] is None and rec["lastSeq"] == len(events), where
    states = [s[0] for s in rec["states"]]
    assert states[0] == "connecting" and states[-1] == "ended", where
    # Attached once the place was known: never stalled while queued, nor before the first
    # event (the notice came right after the socket opened).
    assert not [s for s in rec["states"] if s[0] == "stalled" and (s[1] or s[2] == 0)], where


@QUEUE_FAST
def test_attach_hears_its_place_then_streams_without_a_gap(
    session: Session, page: Page, isolated_stack: Stack
) -> None:
    """relay-stream.js attached to a queued answer (batch and default forms): onQueued
    with position 1, handle.queued while it waits (several quietMs without a state change),
    then, once the busy answer is cancelled, the answer's events 1..n ending done, with the
    stored text, handle.queued null, and no event for any notice."""
    page.add_init_script(NO_FEED)
    open_app(page, isolated_stack.base_url)
    other = same_user(isolated_stack, session)
    busy = keep_worker_busy(isolated_stack, other)
    posted = other.post_chat("Waits its turn [demo:words=40] [demo:rate=20]")
    sid = posted["streamId"]
    notice = first_notice(other, sid)
    assert notice.pop("type") == "queued" and "seq" not in notice, notice
    check_place(notice, f"the server's first notice: {notice}")
    page.evaluate(ATTACH_SCRIPT, {"streamId": sid, "quietMs": QUIET_MS})
    page.wait_for_function(
        "['batch', 'plain'].every((f) => window.__q[f].handle.queued !== null)", timeout=T
    )
    time.sleep(3 * QUIET_MS / 1000)  # quiet, and queued: no "stalled"
    waiting = page.evaluate(SNAPSHOT)
    assert other.stream(sid)["status"] == "queued", "the test wanted a stream still queued"
    for form, rec in waiting.items():
        where = f"{form}: {rec['raw']}"
        check_place(rec["queued"], where)
        assert rec["queued"] == rec["notices"][-1]["place"], where
        assert rec["events"] == [] and rec["lastSeq"] == 0, where
        assert rec["state"] == "live", f"{form} is {rec['state']} while queued: {rec['states']}"
    cancel(other, busy)
    page.wait_for_function("window.__q.batch.ended && window.__q.plain.ended", timeout=T)
    content = other.answer(posted["chatId"])["content"]
    assert content
    for form, rec in page.evaluate(SNAPSHOT).items():
        check_raw(rec, form)
        check_handle(rec, form, content)


@QUEUE_FAST
def test_a_page_without_feed_shows_the_place_from_its_stream(
    session: Session, page: Page, isolated_stack: Stack
) -> None:
    """The chat page with no live feed: its queued answer says where it waits (from the
    stream's notices, through relay-stream's onQueued), never "Waiting for the model…",
    then streams and ends equal to the stored message."""
    page.add_init_script(NO_FEED)
    open_app(page, isolated_stack.base_url)
    other = same_user(isolated_stack, session)
    busy = keep_worker_busy(isolated_stack, other)
    chat_id = send(page, "Mine waits [demo:words=20]")
    status = answer(page).locator(".status")
    place = re.compile(r"^Queued: next in line(, about \d+ (s|min))?$")
    expect(status).to_have_text(place, timeout=T)
    time.sleep(1.5)
    expect(status).to_have_text(place)
    expect(answer(page)).not_to_have_attribute("data-waiting", "true")
    expect(answer(page)).to_have_attribute("data-status", "queued")
    cancel(other, busy)
    wait_status(page, "done")
    assert_exact(page, isolated_stack.base_url, chat_id)
    wait_until(lambda: other.stream(busy)["status"] == "cancelled", "the busy answer cancelled")


# -- the module against a hand-driven socket ----------------------------------------------------

SCRIPTED = (
    """async () => {
  const { attach } = await import('/static/relay-stream.js');
"""
    + FAKE_SOCKET_JS
    + """  const out = { states: [], events: [], batches: [], notices: [], q: {} };
  let h = null;
  h = attach('s1', {
    WebSocket: FakeSocket, stallMs: 1e9, quietMs: 50, minDelayMs: 1, maxDelayMs: 1,
    onState: (st) => out.states.push([st, h?.queued?.position ?? null]),
    onEvent: (e) => out.events.push(e.seq),
    onEvents: (es) => out.batches.push(es.map((e) => e.seq)),
    onQueued: (place) => out.notices.push(place),
  });
  out.q.initial = h.queued;
  sockets[0].open();
  await until(() => h.state === 'stalled');  // no place known yet: quiet is quiet
  sockets[0].emit({ type: 'queued', position: 3, etaSeconds: 40 });
  out.q.first = h.queued;
  out.afterNotice = h.state;  // live again
  await sleep(200);
  out.whileQueued = h.state;  // still live: a queued stream is not stalled
  sockets[0].emit({ type: 'queued', position: 1 });
  out.q.second = h.queued;
  sockets[0].emit({ type: 'queued', position: 0 });  // malformed: ignored
  sockets[0].emit({ type: 'queued', seq: 1, position: 2 });  // a notice whatever it carries
  out.lastSeqWhileQueued = h.lastSeq;
  sockets[0].emit({ type: 'chunks', seq: 1, texts: ['a', 'b'] });
  out.q.afterChunks = h.queued;
  sockets[0].emit({ type: 'error', seq: 3, error: { code: 'x', message: 'y' } });
  sockets[0].emit({ type: 'resumed', seq: 4, attempt: 2 });  // an admin retry: queued again
  sockets[0].emit({ type: 'queued', position: 2 });
  await sleep(200);
  out.whileQueuedAgain = h.state;
  sockets[0].drop(1006);
  await until(() => sockets.length === 2);
  out.q.afterDrop = h.queued;  // the latest place, until an event says otherwise
  out.secondUrl = sockets[1].url;
  sockets[1].open();
  sockets[1].emit({ type: 'queued', position: 1 });
  sockets[1].emit({ type: 'chunk', seq: 5, text: 'c' });
  out.q.afterChunk = h.queued;
  await until(() => h.state === 'stalled');  // streaming and quiet: stalled, as before
  out.stalledAfterEvents = h.state;
  sockets[1].emit({ type: 'done', seq: 6, messageId: 'm' });
  sockets[1].drop(1000);
  out.terminal = await h.done;
  out.q.end = h.queued;
  return out;
}"""
)


def test_relay_stream_queued_notices_with_a_scripted_socket(
    page: Page, isolated_stack: Stack
) -> None:
    """Notices never move the cursor, reach onEvent or onEvents, or look like a gap (even
    one that carries a seq); handle.queued is the latest place until the next event; a
    notice brings a stalled stream back to live and a queued one never stalls; after a
    resumed event notices count again; a reconnect keeps the place."""
    open_app(page, isolated_stack.base_url)
    out = page.evaluate(SCRIPTED)
    assert out["notices"] == [
        {"position": 3, "etaSeconds": 40},
        {"position": 1},
        {"position": 2},
        {"position": 2},
        {"position": 1},
    ]
    assert out["q"] == {
        "initial": None,
        "first": {"position": 3, "etaSeconds": 40},
        "second": {"position": 1},
        "afterChunks": None,
        "afterDrop": {"position": 2},
        "afterChunk": None,
        "end": None,
    }
    assert out["events"] == [1, 2, 3, 4, 5, 6]
    assert out["batches"] == [[1, 2], [3], [4], [5], [6]]
    assert out["lastSeqWhileQueued"] == 0
    assert out["afterNotice"] == out["whileQueued"] == out["whileQueuedAgain"] == "live"
    assert out["stalledAfterEvents"] == "stalled"
    assert "after=4" in out["secondUrl"]
    assert out["terminal"] == {"type": "done", "seq": 6, "messageId": "m"}
    # Stalled only with no place known; the notice's "live" already has it.
    states = out["states"]
    assert [s for s in states if s[0] == "stalled"] == [["stalled", None], ["stalled", None]]
    assert states[states.index(["stalled", None]) + 1] == ["live", 3]
    assert states[-1] == ["ended", None]
