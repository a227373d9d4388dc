"""Generation in a real worker: cancel from HTTP and from the socket, generator errors."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from models import feed, store
from models.chunklog import ChunkLog
from models.settings import Settings
from models.tables import Chat, Stream
from tests.client import Client, wait_for
from tests.conftest import Stack
from tests.inproc import Worker, in_process_worker
from tests.test_appender import _LosesOneReply
from workers.appender import GroupAppender
from workers.generation import News, StorableText, run_generation

LONG = "[demo:words=400]"


def _log_len(stack: Stack, sid: str) -> int:
    return int(stack.redis().xlen(f"relay:{{{sid}}}:log"))


def test_cancel_over_http_stops_generation_and_keeps_partial_text(
    client: Client, stack: Stack
) -> None:
    posted = client.post_chat(f"Cancel me {LONG}")
    sid = posted["streamId"]
    seen = client.attach(sid, until=lambda a: len(a.events) >= 10)
    resp = client.request("POST", f"/api/v1/streams/{sid}/cancel")
    assert resp.status_code == 202, resp.text
    rest = client.attach(sid, after=seen.last["seq"])
    assert rest.last["type"] == "cancelled"
    assert rest.close_code == 1000
    events = seen.events + rest.events
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    # Nothing is written after the terminal event: the worker really stopped.
    length = _log_len(stack, sid)
    assert length == rest.last["seq"]
    time.sleep(0.5)
    assert _log_len(stack, sid) == length
    answer = client.answer(posted["chatId"])
    assert answer["status"] == "cancelled"
    assert answer["content"] == seen.text + rest.text
    assert 0 < len(answer["content"]) < 1500  # a part of a ~2,500 character answer
    assert client.stream(sid)["status"] == "cancelled"
    # Cancelling again is accepted (idempotent) and changes nothing.
    assert client.request("POST", f"/api/v1/streams/{sid}/cancel").status_code == 202
    assert client.answer(posted["chatId"])["content"] == answer["content"]


def test_cancel_message_on_the_socket(client: Client) -> None:
    posted = client.post_chat(f"Cancel over the socket {LONG}")
    sid = posted["streamId"]
    events = []
    with client.connect_ws(f"/api/v1/streams/{sid}/ws") as ws:
        for raw in ws:
            event = json.loads(raw)
            events.append(event)
            if len(events) == 8:
                ws.send(json.dumps({"type": "cancel"}))
        code = ws.close_code
    assert events[-1]["type"] == "cancelled"
    assert code == 1000
    assert len(events) < 400  # stopped long before the end of the answer
    answer = client.answer(posted["chatId"])
    assert answer["status"] == "cancelled"
    assert answer["content"] == "".join(e["text"] for e in events if e["type"] == "chunk")


def test_cancel_of_a_queued_stream_ends_it_without_a_worker(client: Client, stack: Stack) -> None:
    # Pause the worker's consumption by filling its 8 threads with long generations.
    busy = [client.post_chat(f"busy {i} [demo:words=2000] [demo:rate=20]") for i in range(8)]
    queued = client.post_chat(f"queued {LONG}")
    sid = queued["streamId"]
    assert client.stream(sid)["status"] == "queued"
    resp = client.request("POST", f"/api/v1/streams/{sid}/cancel")
    assert resp.status_code == 202 and resp.json()["status"] == "cancelled"
    got = client.attach(sid)
    assert [e["type"] for e in got.events] == ["cancelled"]
    assert client.answer(queued["chatId"])["status"] == "cancelled"
    for b in busy:
        client.request("POST", f"/api/v1/streams/{b['streamId']}/cancel")
    for b in busy:
        client.wait_status(b["streamId"], {"cancelled"})
    # The worker picks the queued task up later and leaves it alone.
    time.sleep(0.5)
    assert client.stream(sid)["status"] == "cancelled"


def test_generator_error_ends_the_stream_with_an_error_event(client: Client) -> None:
    posted = client.post_chat("Fail please [demo:fail-after=12]")
    sid = posted["streamId"]
    got = client.attach(sid)
    assert [e["type"] for e in got.events[:-1]] == ["chunk"] * 12
    assert got.last["type"] == "error"
    assert got.last["error"]["code"] == "generation_failed"
    assert "12 chunks" in got.last["error"]["message"]
    assert got.close_code == 1000
    status = client.stream(sid)
    assert status["status"] == "failed"
    assert status["error"]["code"] == "generation_failed"
    answer = client.answer(posted["chatId"])
    assert answer["status"] == "failed"
    assert answer["content"] == got.text
    assert answer["error"] == got.last["error"]
    # A viewer attaching after the failure gets the same ending, never a hang.
    assert client.attach(sid).events == got.events


def test_checkpoints_copy_the_partial_answer_to_sql(client: Client) -> None:
    posted = client.post_chat(f"Checkpoint me {LONG}")
    sid = posted["streamId"]

    def partial() -> dict[str, object] | None:
        answer = client.answer(posted["chatId"])
        return answer if answer["content"] and answer["status"] == "streaming" else None

    answer = wait_for(partial, timeout=20)
    # The stored partial text and its seq let a client continue exactly after it.
    rest = client.attach(sid, after=answer["streamSeq"])
    assert rest.last["type"] == "done"
    final = client.answer(posted["chatId"])["content"]
    assert answer["content"] + rest.text == final


def test_model_text_is_made_storable_piece_by_piece() -> None:
    """A NUL and lone surrogates become U+FFFD; a surrogate pair split over two pieces is
    joined; a high surrogate left at the end is replaced."""
    storable = StorableText()
    pieces = ["a\x00b", " c\ud800d", " e\ud83d", "\ude00f", "\ude00", "g\ud83d"]
    out = [storable.clean(p) for p in pieces] + [storable.rest()]
    assert out == ["a\ufffdb", " c\ufffdd", " e", "\U0001f600f", "\ufffd", "g", "\ufffd"]
    assert all(s.encode("utf-8") for s in out)  # UTF-8 takes every one


def test_feed_news_rides_the_flusher_and_goes_alone_when_the_ride_fails(
    redis_client: redis.Redis,
) -> None:
    """An answer's feed events go with the appender's round trips; one whose ride failed
    (here: Redis forgot the feed's script) is published the ordinary way: on the feed once,
    in order."""
    chunks = ChunkLog(redis_client)
    rt: Any = SimpleNamespace(appender=GroupAppender(chunks), log=chunks)
    News(rt, "u1", feed.event_of(feed.ANSWER_STARTED, streamId="a")).wait()
    redis_client.script_flush()
    finished = News(rt, "u1", feed.event_of(feed.ANSWER_FINISHED, streamId="a", status="done"))
    with pytest.raises(redis.exceptions.NoScriptError):
        finished.ride.result(timeout=10)
    finished.wait()
    page = feed.Feed(redis_client).read("u1", 0)
    assert [seq for seq, _ in page.events] == [1, 2]
    assert [json.loads(e)["type"] for _, e in page.events] == ["answer.started", "answer.finished"]


def test_feed_news_whose_reply_was_lost_is_sent_again_so_it_may_repeat_but_not_go_missing(
    redis_client: redis.Redis,
) -> None:
    """The flusher's connection drops after Redis ran the round trip (the reply is lost):
    whether the event was written is unknown, so it is published again alone. The feed then
    holds it twice; a reader that treats ``answer.finished`` as a state sees no difference,
    and none misses it."""
    chunks = ChunkLog(redis_client)
    group = GroupAppender(chunks)
    group._conn = _LosesOneReply(chunks.redis)
    rt: Any = SimpleNamespace(appender=group, log=chunks)
    news = News(rt, "u2", feed.event_of(feed.ANSWER_FINISHED, streamId="b", status="done"))
    with pytest.raises(redis.exceptions.ConnectionError):
        news.ride.result(timeout=10)
    news.wait()
    page = feed.Feed(redis_client).read("u2", 0)
    assert [json.loads(e)["type"] for _, e in page.events] == ["answer.finished"] * 2
    # The flusher goes on, on a new connection: the next event rides and arrives once.
    News(rt, "u2", feed.event_of(feed.ANSWER_STARTED, streamId="c")).wait()
    page = feed.Feed(redis_client).read("u2", 2)
    assert [json.loads(e)["type"] for _, e in page.events] == ["answer.started"]


# -- the attempt's start, in process (tests/inproc.py): SQL's running write beside the request


def _owner(w: Worker, stream_id: str) -> str:
    with w.rt.sessions() as db:
        stream = db.get(Stream, stream_id)
        assert stream is not None
        chat = db.get(Chat, stream.chat_id)
        assert chat is not None
        return chat.user_id


@contextmanager
def _running_held(
    database_url: str, client: redis.Redis, prompt: str
) -> Iterator[tuple[Worker, str, str]]:
    """An in-process worker whose SQL running write waits 0.3 s at its fault point, a new
    stream of its own, and the stream's owner."""
    settings = Settings(database_url=database_url, redis_url="",
                        fault_pause=("before-running=0.3",))  # fmt: skip
    with in_process_worker(database_url, client, settings) as w:
        sid = w.new_stream(prompt).id
        yield w, sid, _owner(w, sid)


def _feed_types(w: Worker, user_id: str) -> list[str]:
    page = feed.Feed(w.rt.log.redis).read(user_id, 0)
    return [json.loads(e)["type"] for _, e in page.events]


def test_the_running_write_goes_beside_the_request_and_lands_before_the_first_piece(
    fresh_database_url: str, redis_client: redis.Redis
) -> None:
    """The model is asked while SQL's running write is still in progress (held here at a
    fault point), and the first piece waits for it: by the time the generator is asked for
    the second piece, SQL has the attempt running. The feed has ``answer.started`` (sent
    once the write is stored) before ``answer.finished``."""
    seen: list[str] = []
    with _running_held(fresh_database_url, redis_client, "beside the request") as (w, sid, owner):

        def script() -> Iterator[str]:
            seen.append(w.stored(sid)[0].status)  # the request is out
            yield "first "
            seen.append(w.stored(sid)[0].status)  # the first piece was handed to the log
            yield "second"

        w.generator.script = script
        assert run_generation(w.rt, sid, "task") == "done"
        stream, message = w.stored(sid)
        assert seen == ["queued", "running"]
        assert (stream.status, message.content) == ("done", "first second")
        assert [e.type for e in w.rt.log.read(sid, 0, 10)] == ["chunk", "chunk", "done"]
        assert _feed_types(w, owner) == ["answer.started", "answer.finished"]


def test_a_claim_sql_voids_while_the_request_is_out_closes_it_and_writes_nothing(
    fresh_database_url: str, redis_client: redis.Redis
) -> None:
    """SQL ends the stream (a cancel that reached only SQL) after the claim and before the
    running write: the write is refused, the model's request is closed at its first piece,
    nothing of the attempt reaches the log or the feed, and the log is sealed from SQL."""
    closed: list[bool] = []
    with _running_held(fresh_database_url, redis_client, "voided") as (w, sid, owner):

        def script() -> Iterator[str]:
            with w.rt.sessions() as db:
                assert store.finalize(db, sid, status="cancelled", text="", layout=[],
                                      attempt=None)  # fmt: skip
            try:
                for n in range(100):
                    yield f"w{n} "
            finally:
                closed.append(True)

        w.generator.script = script
        assert run_generation(w.rt, sid, "task") == "finished"
        assert w.generator.sent == ["w0 "] and closed == [True]
        assert [e.type for e in w.rt.log.read(sid, 0, 10)] == ["cancelled"]
        assert w.stored(sid)[0].status == "cancelled"
        assert "answer.started" not in _feed_types(w, owner)
