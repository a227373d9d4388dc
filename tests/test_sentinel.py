"""relay on Redis Sentinel, against real servers (a master, a replica and three sentinels
started for each test): relay's ``redis+sentinel://`` URL, clients that find the new master
after a failover, an answer that streams on through one without a gap or a duplicate, the
Celery broker on Sentinel, and a log that a failover cut short filled again by its writer."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from websockets.exceptions import ConnectionClosed, InvalidStatus

from models import keys
from models.chunklog import ChunkLog
from models.events import CHUNK, Event
from models.exceptions import StaleAttempt
from models.redisconn import PinnedConnection, SentinelURL, broker_settings, make_redis
from ops.redis_server import free_port
from tests.client import Client, chunk_text, wait_for
from tests.conftest import migrated_database
from tests.procs import Proc, stack_env, start_web, start_worker
from tests.sentinel import Sentinels
from workers.appender import GroupAppender


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[Sentinels]:
    deployment = Sentinels(tmp_path / "sentinel")
    try:
        yield deployment.start()
    finally:
        deployment.stop()


# -- the URL ------------------------------------------------------------------------------------


def test_a_sentinel_url_names_the_sentinels_the_master_and_the_database() -> None:
    url = SentinelURL.parse(
        "redis+sentinel://:s%40cret@10.0.0.1:26379,10.0.0.2:26380/mymaster/2"
        "?sentinel_password=other"
    )
    assert url.hosts == (("10.0.0.1", 26379), ("10.0.0.2", 26380))
    assert (url.master, url.db, url.password, url.sentinel_password) == (
        "mymaster",
        2,
        "s@cret",
        "other",
    )
    broker, options = broker_settings("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26380/mymaster")
    assert broker == "sentinel://:pw@10.0.0.1:26379/0;sentinel://:pw@10.0.0.2:26380/0"
    assert options == {"master_name": "mymaster", "sentinel_kwargs": {"password": "pw"}}
    assert broker_settings("redis://127.0.0.1:6379/0") == ("redis://127.0.0.1:6379/0", {})


@pytest.mark.parametrize(
    "bad",
    [
        "redis+sentinel://10.0.0.1:26379",  # no master name
        "redis+sentinel:///mymaster",  # no sentinel
        "redis+sentinel://10.0.0.1/mymaster",  # no port
        "redis+sentinel://10.0.0.1:26379/mymaster/0/extra",
    ],
)
def test_a_malformed_sentinel_url_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        SentinelURL.parse(bad)


# -- clients ------------------------------------------------------------------------------------


def test_clients_reach_the_new_master_after_a_failover(sentinels: Sentinels) -> None:
    client = make_redis(sentinels.url, max_connections=4, wait_s=5)
    pinned = PinnedConnection(client, recheck_idle_s=0)
    client.set("before", "1")
    assert pinned.pipeline([["SET", "pinned-before", "1"]]) == ["OK"]
    wait_for(lambda: sentinels.client(sentinels.nodes[1].port).get("pinned-before"))

    old = sentinels.kill_master()
    new = sentinels.wait_for_failover(old)
    assert new != old

    def written(write: Any) -> bool:
        try:
            write()
            return True
        except redis.ConnectionError:
            return False  # a connection to the dead master: the next one asks the sentinels

    wait_for(lambda: written(lambda: client.set("after", "1")), timeout=30)
    wait_for(lambda: written(lambda: pinned.pipeline([["SET", "pinned-after", "1"]])), 30)
    promoted = sentinels.client(new)
    assert promoted.get("before") == b"1" and promoted.get("after") == b"1"
    assert promoted.get("pinned-after") == b"1"
    client.close()


# -- the writer refills a log that a failover cut short ------------------------------------------


def _started(log: ChunkLog, sid: str) -> int:
    log.init(sid)
    return log.claim(sid, "task", 5).attempt


def _cut(client: redis.Redis, sid: str, keep: int) -> None:
    """Make the log and state what a replica promoted ``keep`` entries into the stream has
    (its log never had the later entries, so its last ID is ``keep``'s)."""
    log_key = keys.log_key(sid)
    entries = client.xrange(log_key, "-", f"0-{keep}")
    client.delete(log_key)
    for entry_id, fields in entries:
        client.xadd(log_key, fields, id=entry_id)
    client.hset(keys.state_key(sid), "seq", keep)


def _chunk(seq: int) -> Event:
    return Event(seq, CHUNK, text=f"<{seq}>")


def test_appends_a_failover_lost_are_sent_again_before_new_ones(
    redis_client: redis.Redis,
) -> None:
    log = ChunkLog(redis_client)
    group = GroupAppender(log)
    stream = group.open("gap1", _started(log, "gap1"), 0)
    for seq in range(1, 11):
        stream.submit(_chunk(seq))
    stream.flush()
    _cut(redis_client, "gap1", 7)
    stream.submit(_chunk(11))
    stream.submit(_chunk(12))
    stream.flush()
    assert stream.acked == 12
    events = log.read("gap1", 0, 100)
    assert [e.seq for e in events] == list(range(1, 13))
    assert "".join(e.text for e in events) == "".join(f"<{s}>" for s in range(1, 13))


def test_a_gap_the_writer_cannot_fill_ends_its_attempt_instead_of_writing_it(
    redis_client: redis.Redis,
) -> None:
    log = ChunkLog(redis_client)
    group = GroupAppender(log)
    stream = group.open("gap2", _started(log, "gap2"), 0)
    for seq in range(1, 11):
        stream.submit(_chunk(seq))
    stream.flush()
    _cut(redis_client, "gap2", 3)
    stream.kept.clear()  # as if more had been lost than the writer keeps
    stream.submit(_chunk(11))
    with pytest.raises(StaleAttempt):
        stream.flush()
    assert [e.seq for e in log.read("gap2", 0, 100)] == [1, 2, 3]  # no gap written


def test_appends_wait_for_replicas_when_asked(
    sentinels: Sentinels, caplog: pytest.LogCaptureFixture
) -> None:
    log = ChunkLog(make_redis(sentinels.url, max_connections=4, wait_s=5))
    replica = sentinels.client(sentinels.nodes[1].port)
    enough = GroupAppender(log, wait_replicas=1, wait_ms=5000)
    stream = enough.open("w1", _started(log, "w1"), 0)
    stream.submit(_chunk(1))
    stream.flush()
    assert replica.xlen(keys.log_key("w1")) == 1  # WAIT returned: the replica has it
    too_many = GroupAppender(log, wait_replicas=2, wait_ms=200)  # there is one replica
    stream = too_many.open("w2", _started(log, "w2"), 0)
    stream.submit(_chunk(1))
    stream.flush()  # still confirmed (Redis applied it), and said
    assert stream.acked == 1
    assert "reached 1 of 2 replicas within 200 ms" in caplog.text


# -- the whole stack on Sentinel -----------------------------------------------------------------


def _read_all(client: Client, sid: str, events: list[dict[str, Any]]) -> None:
    """Read the stream to its terminal event as a client would: re-attach with after=<last>
    whenever the connection ends (a 1013 while the master is down, a refused attach)."""
    while not events or events[-1]["type"] not in {"done", "cancelled", "error"}:
        after = events[-1]["seq"] if events else 0
        try:
            with client.connect_ws(f"/api/v1/streams/{sid}/ws?after={after}") as ws:
                while True:
                    events.append(json.loads(ws.recv(timeout=60)))
        except (ConnectionClosed, InvalidStatus, OSError):
            threading.Event().wait(0.2)


def test_an_answer_streams_on_through_a_failover(sentinels: Sentinels, tmp_path: Path) -> None:
    with migrated_database("sqlite", tmp_path) as database_url:
        env = stack_env(sentinels.url, database_url)
        port = free_port()
        procs: list[Proc] = []
        try:
            procs.append(start_web(env, port, tmp_path))
            procs.append(start_worker(env, tmp_path, "w1"))
            client = Client(f"http://127.0.0.1:{port}")
            posted = client.post_chat("Through a failover [demo:words=400] [demo:rate=40]")
            events: list[dict[str, Any]] = []
            reader = threading.Thread(
                target=_read_all, args=(client, posted["streamId"], events), daemon=True
            )
            reader.start()
            wait_for(lambda: len(events) >= 20, timeout=30)
            old = sentinels.kill_master()
            at_kill = len(events)
            assert events[-1]["type"] == "chunk"  # the answer is mid-way
            sentinels.wait_for_failover(old)
            reader.join(120)
            assert not reader.is_alive(), f"the viewer is still waiting after {len(events)}"

            assert events[-1]["type"] == "done"
            assert len(events) > at_kill + 20  # most of it was written after the failover
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
            answer = client.answer(posted["chatId"])
            assert answer["status"] == "complete"
            assert chunk_text(events) == answer["content"]

            # The broker is on Sentinel too: a chat posted after the failover is answered.
            after = client.post_chat("After the failover [demo:words=20]")
            done = client.attach(after["streamId"], timeout=60).events
            assert done[-1]["type"] == "done"
            assert chunk_text(done) == client.answer(after["chatId"])["content"]
        finally:
            for proc in procs:
                if proc.name.startswith("worker"):
                    proc.kill()
                proc.stop()
