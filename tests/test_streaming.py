"""Attach, drop, re-attach: the guarantees of the wire protocol, against real processes."""

from __future__ import annotations

import threading

from tests.client import Attach, Client, chunk_text, expand, wait_for
from tests.conftest import Stack

LONG = "[demo:words=160]"


def test_attach_from_zero_gets_everything_then_done(client: Client) -> None:
    posted = client.post_chat(f"Explain write-ahead logs {LONG}")
    got = client.attach(posted["streamId"])
    assert got.seqs == list(range(1, len(got.events) + 1))
    assert got.last["type"] == "done"
    assert got.last["messageId"] == posted["messageId"]
    assert got.close_code == 1000
    answer = client.answer(posted["chatId"])
    assert answer["status"] == "complete"
    assert answer["content"] == got.text
    assert len(got.text) > 200


def test_reattach_after_drop_has_no_gap_and_no_duplicate(client: Client) -> None:
    posted = client.post_chat(f"Tell me about durable queues {LONG}")
    sid = posted["streamId"]
    first = client.attach(sid, until=lambda a: len(a.events) >= 15)
    assert first.last["type"] == "chunk"
    rest = client.attach(sid, after=first.last["seq"])
    seqs = first.seqs + rest.seqs
    assert seqs == list(range(1, len(seqs) + 1))
    assert rest.last["type"] == "done"
    assert first.text + rest.text == client.answer(posted["chatId"])["content"]


def test_reattach_after_done_replays_from_the_log(client: Client) -> None:
    posted = client.post_chat("Short answer please [demo:words=20]")
    live = client.attach(posted["streamId"])
    again = client.attach(posted["streamId"])
    assert again.events == live.events
    middle = client.attach(posted["streamId"], after=5)
    assert middle.events == live.events[5:]


def test_after_retention_expires_the_answer_is_served_from_sql(
    client: Client, stack: Stack
) -> None:
    posted = client.post_chat("Retention check [demo:words=30]")
    sid = posted["streamId"]
    live = client.attach(sid)
    r = stack.redis()
    log_key = f"relay:{{{sid}}}:log"
    ttl = r.ttl(log_key)
    assert 0 < ttl <= 3600  # the finished log expires after the retention time
    r.pexpire(log_key, 1)  # fast-forward the retention clock
    r.pexpire(f"relay:{{{sid}}}:state", 1)
    client_wait = client.attach(sid)
    assert not r.exists(log_key)
    assert client_wait.events == live.events
    assert client.attach(sid, after=3).events == live.events[3:]
    status, sse = client.sse(f"/api/v1/streams/{sid}/events", last_event_id=7)
    assert status == 200 and sse == live.events[7:]


def test_two_viewers_get_the_same_full_sequence(client: Client) -> None:
    posted = client.post_chat(f"Two viewers {LONG}")
    results: list[Attach] = []

    def view() -> None:
        results.append(client.attach(posted["streamId"]))

    threads = [threading.Thread(target=view) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = results
    assert a.events == b.events
    assert a.seqs == list(range(1, len(a.events) + 1))
    assert a.text == client.answer(posted["chatId"])["content"]


def test_sse_resume_with_last_event_id(client: Client) -> None:
    posted = client.post_chat(f"SSE resume {LONG}")
    path = f"/api/v1/streams/{posted['streamId']}/events"
    status, first = client.sse(path, limit=12)
    assert status == 200 and [e["seq"] for e in first] == list(range(1, 13))
    status, rest = client.sse(path, last_event_id=12)
    events = first + rest
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert rest[-1]["type"] == "done"
    assert chunk_text(events) == client.answer(posted["chatId"])["content"]
    # ?after= works too, and Last-Event-ID wins over it (EventSource keeps the URL).
    status, tail = client.sse(path + "?after=1", last_event_id=len(events) - 2)
    assert tail == events[-2:]
    # An EventSource reconnecting after the end gets 204, which stops it.
    assert client.sse(path, last_event_id=len(events))[0] == 204


def test_chat_socket_follows_the_latest_stream(client: Client) -> None:
    posted = client.post_chat("Chat socket [demo:words=20]")
    got = client.attach("", path=f"/api/v1/chats/{posted['chatId']}/ws?after=0")
    assert got.last["type"] == "done"
    assert got.text == client.answer(posted["chatId"])["content"]


def test_web_server_killed_mid_stream_then_restarted(stack: Stack) -> None:
    web, port = stack.start_web()
    client = stack.client(f"http://127.0.0.1:{port}")
    posted = client.post_chat(f"Survive a web crash {LONG}")
    sid = posted["streamId"]
    seen = Attach()
    try:
        client.attach(sid, until=lambda a: _record(seen, a, 10))
    finally:
        web.kill()  # SIGKILL, mid-stream, while the socket is open
    progress_at_kill = client_status_seq(stack, sid)
    # Generation never paused: the log keeps growing while no web process is up.
    wait_for(lambda: client_status_seq(stack, sid) > progress_at_kill + 5, timeout=10)
    restarted, _ = stack.start_web(port=port)
    try:
        rest = client.attach(sid, after=seen.last["seq"])
        events = seen.events + rest.events
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert rest.last["type"] == "done"
        assert chunk_text(events) == client.answer(posted["chatId"])["content"]
    finally:
        restarted.stop()


def test_reattach_on_another_web_process(client: Client, stack: Stack) -> None:
    _, port = stack.start_web()
    posted = client.post_chat(f"Switch servers {LONG}")
    sid = posted["streamId"]
    first = client.attach(sid, until=lambda a: len(a.events) >= 20)
    other = stack.client(f"http://127.0.0.1:{port}")
    other.http.cookies = client.http.cookies  # same user, different web process
    rest = other.attach(sid, after=first.last["seq"])
    events = first.events + rest.events
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert chunk_text(events) == client.answer(posted["chatId"])["content"]


def _record(into: Attach, got: Attach, n: int) -> bool:
    into.events = list(got.events)
    return len(got.events) >= n


def client_status_seq(stack: Stack, sid: str) -> int:
    return int(stack.redis().xlen(f"relay:{{{sid}}}:log"))


def batch_path(sid: str, after: int = 0) -> str:
    return f"/api/v1/streams/{sid}/ws?after={after}&batch=1"


def test_the_batch_form_expands_to_the_same_events_for_every_after(client: Client) -> None:
    posted = client.post_chat(f"Batches {LONG}")
    sid = posted["streamId"]
    plain = client.attach(sid)
    last = plain.last["seq"]
    whole = client.attach(sid, path=batch_path(sid))
    # The catch-up of a finished stream travels in a few messages, not one per event.
    assert any(m["type"] == "chunks" for m in whole.events)
    assert len(whole.events) <= 3
    for after in range(last):
        got = client.attach(sid, path=batch_path(sid, after))
        assert expand(got.events) == plain.events[after:], after
        assert got.close_code == 1000
    ended = client.attach(sid, path=batch_path(sid, last))
    assert ended.events == [] and ended.close_code == 1000


def test_a_live_attach_in_the_batch_form_gets_the_whole_answer(client: Client) -> None:
    posted = client.post_chat(f"Live batches {LONG}")
    sid = posted["streamId"]
    first = client.attach(sid, path=batch_path(sid), until=lambda a: len(a.events) >= 5)
    seen = expand(first.events)
    rest = client.attach(sid, path=batch_path(sid, seen[-1]["seq"]))
    events = seen + expand(rest.events)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "done" and rest.close_code == 1000
    assert chunk_text(events) == client.answer(posted["chatId"])["content"]
    assert events == client.attach(sid).events


def test_sse_in_the_batch_form(client: Client) -> None:
    posted = client.post_chat(f"SSE batches {LONG}")
    sid = posted["streamId"]
    plain = client.attach(sid)
    url = f"/api/v1/streams/{sid}/events?batch=1"
    for after in (0, 1, 7, len(plain.events) - 3):
        status, messages = client.sse(url, last_event_id=after)
        assert status == 200
        assert expand(messages) == plain.events[after:]
        assert messages[0]["type"] == "chunks"  # its id: is its last seq (checked by sse())


def test_a_bad_batch_parameter_is_refused(client: Client) -> None:
    posted = client.post_chat("Refuse bad batch values [demo:words=5]")
    sid = posted["streamId"]
    got = client.attach(sid, path=f"/api/v1/streams/{sid}/ws?batch=yes")
    assert got.close_code == 4400 and got.events == []
    resp = client.request("GET", f"/api/v1/streams/{sid}/events?batch=2")
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_parameter"
