"""The live per-user feed: models/feed.py against the test Redis, and the endpoints
(/api/v1/feed/ws, /api/v1/feed/events) against the real stack."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from playwright.sync_api import Browser
from prometheus_client import REGISTRY
from redis.backoff import NoBackoff
from redis.retry import Retry
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from models import feed, keys
from models.chunklog import ChunkLog
from models.feed import Feed
from models.redisconn import run_together
from models.tables import Chat
from ops.redis_server import free_port
from tests.client import Client, wait_for
from tests.conftest import Stack

Event = dict[str, Any]

# -- models/feed.py, in-process ----------------------------------------------------------------


def test_append_assigns_consecutive_seqs_and_publishes_each_entry(
    redis_client: redis.Redis,
) -> None:
    log = Feed(redis_client)
    pubsub = redis_client.pubsub()
    pubsub.subscribe(keys.feed_channel("u1"))
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    seqs = [log.append("u1", {"type": "chat.created", "chatId": f"c{i}"}) for i in range(3)]
    assert seqs == [1, 2, 3]
    assert log.append("u2", {"type": "chat.created", "chatId": "x"}) == 1  # per user
    published = [pubsub.get_message(timeout=5) for _ in range(3)]
    page = log.read("u1", 0)
    assert [m["data"] for m in published] == [data for _, data in page.events]
    events = [json.loads(data) for _, data in page.events]
    assert events == [{"seq": i + 1, "type": "chat.created", "chatId": f"c{i}"} for i in range(3)]
    assert page.events[0][1].startswith('{"seq":1,')
    assert 0 < redis_client.ttl(keys.feed_key("u1")) <= keys.FEED_TTL_S
    assert log.read("u1", 3).events == [] and log.read("u1", 3).reset is None
    assert [s for s, _ in log.read("u1", 1).events] == [2, 3]
    pubsub.close()


def test_the_feed_keeps_the_last_entries_and_resets_a_reader_from_before_them(
    redis_client: redis.Redis,
) -> None:
    log = Feed(redis_client, max_len=3)
    for i in range(5):
        log.append("u", {"type": "answer.queued", "n": i})
    assert redis_client.xlen(keys.feed_key("u")) == 3
    assert [s for s, _ in log.read("u", 2).events] == [3, 4, 5]  # all it asks for is kept
    for stale in (0, 1):  # events 1 and 2 are gone: reload, then go on after 5
        assert log.read("u", stale).reset == 5 and log.read("u", stale).events == []
    assert log.read("u", None).reset == 5  # a reader that starts now
    assert log.read("u", 9).reset == 5  # beyond the last: the feed expired or was lost
    assert log.read("nobody", None).reset == 0 and log.read("nobody", 0).reset is None
    assert log.append("u", {"type": "answer.queued"}) == 6  # trimming never reuses a seq


def test_all_keys_of_a_user_share_one_hash_tag() -> None:
    key, channel = keys.feed_key("abc"), keys.feed_channel("abc")
    assert key.split("{")[1].split("}")[0] == channel.split("{")[1].split("}")[0] == "user:abc"
    assert keys.user_id_from_feed_channel(channel) == "abc"


def test_a_turns_feed_events_and_its_logs_init_are_sent_together(
    redis_client: redis.Redis,
) -> None:
    """What a post sends once its turn is committed: ``chat.created`` and ``answer.queued``
    and the log's init, as one pipeline of script calls; on a Redis that lost its scripts
    (a restart, a flush) each call loads its script and is made again; an error reply (a
    feed key of the wrong type) comes back in its place, and the other call stands."""
    log = ChunkLog(redis_client)
    turn = feed.turn_events("c", "Hello", "s1", "m", new_chat=True)
    assert [e["type"] for e in turn] == [feed.CHAT_CREATED, feed.ANSWER_QUEUED]
    redis_client.script_flush()
    fed, _ = run_together(redis_client, [Feed(redis_client).append_call("u", *turn),
                                         log.init_call("s1", detach_after_s=30)])  # fmt: skip
    assert fed == 2
    assert [json.loads(e)["type"] for _, e in Feed(redis_client).read("u", 0).events] == [
        feed.CHAT_CREATED, feed.ANSWER_QUEUED,
    ]  # fmt: skip
    state = log.state("s1")
    assert state.status == "queued" and state.detach_ms == 30_000
    fed, _ = run_together(redis_client, [Feed(redis_client).append_call("u", turn[1]),
                                         log.init_call("s2")])  # fmt: skip
    assert fed == 3  # the scripts are loaded now: the raw calls alone
    redis_client.delete(keys.feed_key("u"))
    redis_client.set(keys.feed_key("u"), "not a stream")
    fed, _ = run_together(redis_client, [Feed(redis_client).append_call("u", turn[1]),
                                         log.init_call("s3")])  # fmt: skip
    assert isinstance(fed, redis.ResponseError) and "WRONGTYPE" in str(fed)
    assert log.state("s3").status == "queued"


def test_a_feed_write_while_redis_is_unreachable_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture, redis_client: redis.Redis
) -> None:
    """What a post, a delete or a worker calls, with the log's Redis gone: nothing raises
    (the operation it reports goes on), every lost event is counted, each failure is one
    line of the log (an outage fails every write: no traceback for each), and a failure
    that is not an outage keeps its traceback."""
    caplog.set_level("WARNING", logger="relay.feed")
    dead = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    log = ChunkLog(dead)
    chat = Chat(id="c", user_id="u", title="Hello")
    before = REGISTRY.get_sample_value("relay_feed_write_failures_total") or 0.0
    turn = feed.turn_events("c", "Hello", "s", "m", new_chat=True)  # chat.created, answer.queued
    assert feed.publish_events(log, "u", turn) is None
    assert feed.publish_chat(log, "u", feed.CHAT_DELETED, chat) is None
    assert feed.publish(dead, "u", feed.CHAT_RENAMED, chatId="c", title="New") is None
    assert REGISTRY.get_sample_value("relay_feed_write_failures_total") == before + 4
    lines = [r for r in caplog.records if r.name == "relay.feed"]
    assert len(lines) == 3 and not any(r.exc_info for r in lines)
    assert "feed user=u chat.renamed not written: ConnectionError: " in lines[-1].getMessage()
    caplog.clear()
    redis_client.set(keys.feed_key("u"), "not a stream")  # WRONGTYPE: a bug, not an outage
    assert feed.publish(redis_client, "u", feed.CHAT_RENAMED, chatId="c", title="New") is None
    [line] = [r for r in caplog.records if r.name == "relay.feed"]
    assert "not written: ResponseError: " in line.getMessage() and line.exc_info


# -- the endpoints, against the real stack -----------------------------------------------------


def two_tabs(stack: Stack) -> tuple[Client, Client]:
    """One user in two tabs: two clients with the same session cookie."""
    tab1 = stack.client()
    tab1.get_json("/api/v1/chats")  # the guest cookie
    tab2 = stack.client()
    tab2.http.cookies.update(tab1.http.cookies)
    return tab1, tab2


def read_until(ws: ClientConnection, done: Callable[[Event], bool], got: list[Event]) -> Event:
    """Read feed events into ``got`` until one satisfies ``done``; return it."""
    while True:
        event: Event = json.loads(ws.recv(timeout=30))
        got.append(event)
        if done(event):
            return event


def finished(stream_id: str, status: str | None = None) -> Callable[[Event], bool]:
    def check(event: Event) -> bool:
        return (
            event["type"] == "answer.finished"
            and event["streamId"] == stream_id
            and status in (None, event["status"])
        )

    return check


@contextmanager
def feed_socket(client: Client, after: int | None = None) -> Iterator[ClientConnection]:
    query = "" if after is None else f"?after={after}"
    with client.connect_ws(f"/api/v1/feed/ws{query}", max_queue=None) as ws:
        yield ws


def test_a_tab_hears_what_another_tab_of_the_same_user_does(stack: Stack) -> None:
    tab1, tab2 = two_tabs(stack)
    with feed_socket(tab1) as ws:
        assert json.loads(ws.recv(timeout=30)) == {"type": "reset", "seq": 0}  # a new user
        posted = tab2.post_chat("hello feed [demo:words=20]")
        got: list[Event] = []
        read_until(ws, finished(posted["streamId"]), got)
    assert [e["type"] for e in got] == [
        "chat.created", "answer.queued", "answer.started", "answer.finished",
    ]  # fmt: skip
    assert [e["seq"] for e in got] == [1, 2, 3, 4]
    created, queued, started, ended = got
    assert created["chatId"] == posted["chatId"] and created["title"]
    for event in (queued, started, ended):
        assert event["streamId"] == posted["streamId"]
        assert event["chatId"] == posted["chatId"]
        assert event["messageId"] == posted["messageId"]
    assert ended["status"] == "done" and "status" not in started
    assert all(isinstance(e["at"], str) and e["at"].endswith("Z") for e in got)
    # A second answer in the same chat: no chat.created, the seqs go on without a hole.
    with feed_socket(tab1, after=4) as ws:
        again = tab2.post_chat("and again [demo:words=5]", posted["chatId"])
        more: list[Event] = []
        read_until(ws, finished(again["streamId"], "done"), more)
    assert [(e["seq"], e["type"]) for e in more] == [
        (5, "answer.queued"), (6, "answer.started"), (7, "answer.finished"),
    ]  # fmt: skip


def test_cancel_and_delete_are_reported_and_a_resume_gets_exactly_the_rest(
    stack: Stack,
) -> None:
    tab1, tab2 = two_tabs(stack)
    got: list[Event] = []
    with feed_socket(tab1, after=0) as ws:
        posted = tab2.post_chat("long one [demo:words=2000]")
        sid = posted["streamId"]
        read_until(ws, lambda e: e["type"] == "answer.started", got)
        resp = tab2.request("POST", f"/api/v1/streams/{sid}/cancel")
        assert resp.status_code == 202, resp.text
        read_until(ws, finished(sid), got)
        assert got[-1]["status"] == "cancelled"
        assert tab2.request("DELETE", f"/api/v1/chats/{posted['chatId']}").status_code == 204
        deleted = read_until(ws, lambda e: e["type"] == "chat.deleted", got)
    assert deleted["chatId"] == posted["chatId"]
    assert [e["seq"] for e in got] == list(range(1, len(got) + 1))
    assert [e["type"] for e in got].count("answer.finished") == 1  # one end, reported once
    for k in (0, 2, len(got) - 1):
        with feed_socket(tab2, after=k) as ws:
            rest: list[Event] = []
            read_until(ws, lambda e: e["seq"] == len(got), rest)
        assert rest == got[k:]


def test_another_users_feed_never_sees_any_of_it(stack: Stack) -> None:
    tab1, tab2 = two_tabs(stack)
    stranger = stack.client()
    stranger.get_json("/api/v1/chats")
    with feed_socket(stranger, after=0) as theirs:
        with feed_socket(tab1, after=0) as mine:
            posted = tab2.post_chat("private [demo:words=5]")
            read_until(mine, finished(posted["streamId"]), [])
        own = stranger.post_chat("mine [demo:words=5]")
        first = json.loads(theirs.recv(timeout=30))
    # The stranger's first event is about its own chat, numbered in its own feed.
    assert first["seq"] == 1 and first["type"] == "chat.created"
    assert first["chatId"] == own["chatId"]


def sse_events(client: Client, path: str, count: int, **headers: str) -> list[tuple[int, Event]]:
    """The first ``count`` (id, event) pairs of a feed SSE response."""
    out: list[tuple[int, Event]] = []
    with client.http.get(client.url(path), headers=headers, stream=True, timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["Content-Type"].startswith(
            "text/event-stream"
        )
        fields: dict[str, str] = {}
        for line in resp.iter_lines(decode_unicode=True):
            if line:
                if not line.startswith(":"):
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")
                continue
            if "data" in fields:
                assert "event" not in fields  # every event is a "message"
                out.append((int(fields["id"]), json.loads(fields["data"])))
                if len(out) == count:
                    return out
            fields = {}
    raise AssertionError(f"the response ended after {len(out)} events")


def test_sse_gives_the_same_events_with_their_seqs_as_ids(stack: Stack) -> None:
    tab1, tab2 = two_tabs(stack)
    posted = tab2.post_chat("over sse [demo:words=5]")
    with feed_socket(tab1, after=0) as ws:
        seen: list[Event] = []
        read_until(ws, finished(posted["streamId"]), seen)
    got = sse_events(tab1, "/api/v1/feed/events?after=0", len(seen))
    assert [e for _, e in got] == seen and [i for i, _ in got] == [e["seq"] for e in seen]
    # Last-Event-ID wins over ?after, as on stream SSE; no position at all starts with a reset.
    assert sse_events(tab1, "/api/v1/feed/events?after=0", 1, **{"Last-Event-ID": "3"}) == [
        (4, seen[3])
    ]
    assert sse_events(tab1, "/api/v1/feed/events", 1) == [
        (len(seen), {"type": "reset", "seq": len(seen)})
    ]


def test_a_bad_after_is_refused_with_the_error_shape(client: Client) -> None:
    for bad in ("-1", "abc", "1.5"):
        resp = client.request("GET", f"/api/v1/feed/events?after={bad}")
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["code"] == "invalid_after" and error["message"]
        with feed_socket(client) as ws:
            pass  # a well-formed one opens
        with client.connect_ws(f"/api/v1/feed/ws?after={bad}") as ws:
            try:
                ws.recv(timeout=10)
                raise AssertionError("the socket sent an event")
            except ConnectionClosed:
                pass
            assert ws.close_code == 4400 and ws.close_reason


def test_a_cross_site_feed_socket_is_refused(client: Client) -> None:
    with client.connect_ws("/api/v1/feed/ws", Origin="https://evil.example") as ws:
        try:
            ws.recv(timeout=10)
            raise AssertionError("the socket sent an event")
        except ConnectionClosed:
            pass
        assert ws.close_code == 4403


def test_two_sockets_of_one_user_get_every_event(stack: Stack) -> None:
    """Two pages of one user on one web process, fed by its one feed subscription."""
    tab1, tab2 = two_tabs(stack)
    with feed_socket(tab1, after=0) as one, feed_socket(tab2, after=0) as two:
        posted = tab2.post_chat("twice [demo:words=5]")
        a: list[Event] = []
        b: list[Event] = []
        read_until(one, finished(posted["streamId"]), a)
        read_until(two, finished(posted["streamId"]), b)
    assert a == b and len(a) == 4


def test_a_failed_answer_is_reported_failed(stack: Stack) -> None:
    tab1, tab2 = two_tabs(stack)
    with feed_socket(tab1, after=0) as ws:
        posted = tab2.post_chat("Break [demo:words=50] [demo:fail-after=3]")
        got: list[Event] = []
        ended = read_until(ws, finished(posted["streamId"]), got)
    assert ended["status"] == "failed"
    assert [e["type"] for e in got].count("answer.finished") == 1


def test_a_cancel_that_ends_a_queued_answer_itself_is_reported(isolated_stack: Stack) -> None:
    """No worker: the cancel takes the queued stream over and ends it (lifecycle.end_taken),
    and that end is reported like a worker's."""
    tab1, tab2 = two_tabs(isolated_stack)
    with feed_socket(tab1, after=0) as ws:
        posted = tab2.post_chat("nobody will start this [demo:words=5]")
        got: list[Event] = []
        read_until(ws, lambda e: e["type"] == "answer.queued", got)
        resp = tab2.request("POST", f"/api/v1/streams/{posted['streamId']}/cancel")
        assert resp.status_code == 202 and resp.json()["status"] == "cancelled", resp.text
        read_until(ws, finished(posted["streamId"]), got)
    assert [(e["type"], e.get("status")) for e in got] == [
        ("chat.created", None), ("answer.queued", None), ("answer.finished", "cancelled"),
    ]  # fmt: skip


def test_a_web_process_going_away_closes_feed_sockets_with_1001(stack: Stack) -> None:
    web, port = stack.start_web()
    tab = stack.client(f"http://127.0.0.1:{port}")
    tab.get_json("/api/v1/chats")
    with feed_socket(tab) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "reset"
        os.kill(web.pid, signal.SIGTERM)
        try:
            while True:
                ws.recv(timeout=30)
        except ConnectionClosed:
            pass
        assert ws.close_code == 1001 and "reconnect" in (ws.close_reason or "")
    web.popen.wait(30)


FEED_SCRIPT = """async () => {
  const { openFeed } = await import('/static/relay-stream.js');
  const events = [], urls = [], sockets = [];
  class Tracked extends WebSocket {
    constructor(url) { super(url); urls.push(url); sockets.push(this); }
  }
  const until = async (probe) => {
    for (let i = 0; i < 600 && !probe(); i += 1) await new Promise((r) => setTimeout(r, 50));
    if (!probe()) throw new Error('timed out: ' + JSON.stringify(events));
  };
  const post = async (message) => (await fetch('/api/v1/chat', {
    method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ message }) })).json();
  const ended = (sid) => () =>
    events.some((e) => e.type === 'answer.finished' && e.streamId === sid);
  const feed = openFeed({ WebSocket: Tracked, minDelayMs: 50, onEvent: (e) => events.push(e) });
  await until(() => events.length === 1);
  const one = await post('first [demo:words=5]');
  await until(ended(one.streamId));
  const seen = feed.lastSeq;
  sockets[0].close();  // dropped: the feed reopens with after=<last seq>
  await until(() => sockets.length === 2 && sockets[1].readyState === 1);
  const two = await post('second [demo:words=5]');
  await until(ended(two.streamId));
  feed.close();
  return { events, urls, seen, state: feed.state };
}"""


def test_open_feed_in_a_browser_resumes_after_a_drop(browser: Browser, stack: Stack) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{stack.base_url}/api/v1/chats")  # the guest cookie
        result = page.evaluate(FEED_SCRIPT)
    finally:
        context.close()
    events = result["events"]
    assert events[0] == {"type": "reset", "seq": 0}
    assert [e["seq"] for e in events[1:]] == list(range(1, len(events)))  # none twice or lost
    assert [e["type"] for e in events].count("chat.created") == 2
    assert "after" not in result["urls"][0]
    assert result["urls"][1].endswith(f"/api/v1/feed/ws?after={result['seen']}")
    assert result["state"] == "closed"


def test_an_event_whose_message_was_lost_still_arrives(stack: Stack) -> None:
    """Pub/sub is not durable: an entry added without its message (lost on the way) reaches
    the connected page through the process's periodic check of the watched feeds."""
    tab = stack.client()
    tab.get_json("/api/v1/chats")
    with feed_socket(tab, after=0) as ws:
        posted = tab.post_chat("seen live [demo:words=5]")
        got: list[Event] = []
        last = read_until(ws, finished(posted["streamId"]), got)
        uid = last_user(stack, posted["chatId"])
        silent = {"seq": last["seq"] + 1, "type": "chat.renamed", "chatId": posted["chatId"]}
        stack.redis().xadd(keys.feed_key(uid), {"e": json.dumps(silent)}, id=f"0-{silent['seq']}")
        assert json.loads(ws.recv(timeout=30)) == silent


def last_user(stack: Stack, chat_id: str) -> str:
    """The owner of a chat, from the feed keys in Redis (the one whose feed names it)."""
    r = stack.redis()
    for key in r.scan_iter(match="relay:{user:*}:feed"):
        if any(chat_id in fields["e"] for _, fields in r.xrange(key)):
            return keys.user_id_from_feed_channel(key + ":live")
    raise AssertionError(f"no feed names chat {chat_id}")


@pytest.mark.stack_env(RELAY_FAULT_PAUSE="before-terminal=60")
def test_an_end_the_sweeper_writes_is_reported_once(isolated_stack: Stack) -> None:
    """The worker dies between storing the answer in SQL and writing its terminal event; the
    next worker's sweeper writes the end from SQL (lifecycle.seal_from_sql) and reports it."""
    stack = isolated_stack
    worker = stack.start_worker("w1")
    tab1, tab2 = two_tabs(stack)
    with feed_socket(tab1, after=0) as ws:
        posted = tab2.post_chat("Die at the very end [demo:words=20]")
        got: list[Event] = []
        read_until(ws, lambda e: e["type"] == "answer.started", got)
        wait_for(lambda: "fault point before-terminal" in worker.output(), timeout=30)
        worker.kill()
        stack.env.pop("RELAY_FAULT_PAUSE")
        stack.start_worker("w2")
        read_until(ws, finished(posted["streamId"]), got)
        # Nothing else about that answer comes before the next thing that happens.
        assert tab2.request("DELETE", f"/api/v1/chats/{posted['chatId']}").status_code == 204
        read_until(ws, lambda e: e["type"] == "chat.deleted", got)
    assert [(e["type"], e.get("status")) for e in got] == [
        ("chat.created", None), ("answer.queued", None), ("answer.started", None),
        ("answer.finished", "done"), ("chat.deleted", None),
    ]  # fmt: skip
