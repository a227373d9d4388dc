"""The per-process hub against a real Redis: one pub/sub connection, many streams, batches,
bounded mailboxes, and the flags that send viewers back to the log."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from models import keys
from models.chunklog import ChunkLog
from models.events import CHUNK, DONE, Event
from ops.redis_server import EmbeddedRedis, free_port
from tests.client import wait_for
from tests.conftest import Stack
from web.frames import Batch
from web.hub import Hub, Subscription


@pytest.fixture
def hub(redis_server: EmbeddedRedis, redis_client: redis.Redis) -> Iterator[Hub]:
    url = f"redis://127.0.0.1:{redis_server.port}/2"
    h = Hub(url, redis_client, queue_size=4, check_interval_s=3600)
    yield h
    h.stop()


@pytest.fixture
def log(redis_client: redis.Redis) -> ChunkLog:
    return ChunkLog(redis_client)


def start(log: ChunkLog, sid: str) -> None:
    log.init(sid)
    log.claim(sid, "t", 5)


def chunks(first: int, *texts: str) -> list[Event]:
    return [Event(first + i, CHUNK, text=t) for i, t in enumerate(texts)]


def listening(hub: Hub, sid: str, n: int = 1) -> list[tuple[Subscription, threading.Event]]:
    """Subscribe ``n`` viewers of ``sid``: the first, and wait until Redis confirmed the
    channel (its viewers are flagged then, to re-read the log), then the others, which join
    a confirmed channel and are not flagged (a viewer reads the log after subscribing
    anyway). Subscribing all before the confirmation would race with it: a viewer added
    after it would wait for a flag that never comes."""
    wake = threading.Event()
    first = hub.subscribe(sid, 0, wake)
    assert wake.wait(30.0)
    assert first.take() == ([], True, False)
    wake.clear()
    out = [(first, wake)]
    for _ in range(n - 1):
        wake = threading.Event()
        out.append((hub.subscribe(sid, 0, wake), wake))
        assert not wake.is_set()
    return out


def received(sub: Subscription, wake: threading.Event) -> list[Batch]:
    assert wake.wait(30.0)
    wake.clear()
    batches, reread, check = sub.take()
    assert not reread and not check
    return batches


def test_every_subscriber_gets_each_append_as_one_batch(hub: Hub, log: ChunkLog) -> None:
    start(log, "a")
    viewers = listening(hub, "a", 3)
    log.append_many("a", 1, chunks(1, "one", "two", "three"))
    shared = None
    for sub, wake in viewers:
        (batch,) = received(sub, wake)
        assert [e.text for e in batch.events] == ["one", "two", "three"]
        assert (batch.first, batch.last) == (1, 3)
        shared = shared or batch
        assert batch is shared  # decoded once, handed to every viewer
    assert hub.stats() == {"streams": 1, "subscriptions": 3}
    for sub, _ in viewers:
        hub.unsubscribe(sub)
    assert hub.stats() == {"streams": 0, "subscriptions": 0}


def test_the_terminal_event_and_resumed_travel_too(hub: Hub, log: ChunkLog) -> None:
    start(log, "t")
    ((sub, wake),) = listening(hub, "t")
    log.append("t", 1, Event(1, DONE, message_id="m1"))
    (batch,) = received(sub, wake)
    assert batch.events == [Event(1, DONE, message_id="m1")]
    assert log.reopen("t", "retry-task")[0] == "reopened"
    (batch,) = received(sub, wake)
    assert batch.events[0].type == "resumed" and batch.events[0].seq == 2


def test_streams_added_later_are_followed(hub: Hub, log: ChunkLog) -> None:
    start(log, "b")
    start(log, "c")
    ((first, wake_b),) = listening(hub, "b")
    log.append("b", 1, Event(1, CHUNK, text="b1"))
    assert received(first, wake_b)
    ((second, wake_c),) = listening(hub, "c")
    log.append("c", 1, Event(1, CHUNK, text="c1"))
    (batch,) = received(second, wake_c)
    assert batch.events == [Event(1, CHUNK, text="c1")]


def test_a_slow_subscriber_is_flagged_not_buffered(hub: Hub, log: ChunkLog) -> None:
    start(log, "d")
    (slow, _), (fast, fast_wake) = listening(hub, "d", 2)
    for seq in range(1, 11):
        log.append("d", 1, Event(seq, CHUNK, text=str(seq)))
        assert received(fast, fast_wake)
    batches, reread, check = slow.take()
    assert sum(len(b) for b in batches) == 4  # the bound, not 10
    assert reread and not check  # the viewer reads the rest from the log


def test_the_check_flags_viewers_of_a_write_the_hub_did_not_see(
    hub: Hub, log: ChunkLog, redis_client: redis.Redis
) -> None:
    start(log, "e")
    ((sub, wake),) = listening(hub, "e")
    hub.check()
    assert not wake.is_set()  # a live writer and nothing new: nobody is disturbed
    # An entry that reached the log without its live message (as if the hub had missed it).
    redis_client.xadd(keys.log_key("e"), {"t": "chunk", "d": "x"}, id="0-1")
    redis_client.hset(keys.state_key("e"), "seq", 1)
    hub.check()
    assert wake.is_set() and sub.take() == ([], True, False)  # read the log; the writer is fine


def test_the_check_flags_viewers_of_a_dead_writer(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, log: ChunkLog
) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/2"
    hub = Hub(url, redis_client, check_interval_s=0.2, stale_ms=500)
    try:
        start(log, "f")
        ((sub, wake),) = listening(hub, "f")
        redis_client.hset(keys.state_key("f"), "hb", 0)  # the writer's heartbeat stopped
        assert wake.wait(30.0)
        assert sub.take() == ([], True, True)
    finally:
        hub.stop()


def test_the_hub_reconnects_and_sends_viewers_to_the_log(
    hub: Hub, log: ChunkLog, redis_client: redis.Redis
) -> None:
    start(log, "g")
    ((sub, wake),) = listening(hub, "g")
    killed = redis_client.client_kill_filter(_type="pubsub")
    assert killed >= 1
    # Whatever was published while it was away is in the log: the viewer is flagged.
    assert wake.wait(30.0)
    assert sub.take() == ([], True, False)
    wake.clear()
    wait_for(lambda: redis_client.pubsub_numsub(keys.live_channel("g"))[0][1] == 1)
    log.append("g", 1, Event(1, CHUNK, text="after"))
    (batch,) = received(sub, wake)
    assert batch.events == [Event(1, CHUNK, text="after")]


def test_wake_all_wakes_every_viewer(hub: Hub, log: ChunkLog) -> None:
    start(log, "h")
    viewers = listening(hub, "h", 2)
    hub.wake_all()
    assert all(wake.is_set() for _, wake in viewers)


def test_an_idle_viewer_is_not_woken(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, log: ChunkLog
) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/2"
    hub = Hub(url, redis_client, check_interval_s=0.1)
    try:
        log.init("i")  # queued: nothing to send and nobody to check on
        start(log, "j")  # running, with a live writer
        viewers = listening(hub, "i") + listening(hub, "j")
        time.sleep(1.0)  # ten checks, each with a PING on the hub's connection
        assert not any(wake.is_set() for _, wake in viewers)
    finally:
        hub.stop()


class Writer:
    """Stands in for a viewer's socket (the hub's side of a direct write)."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.written: list[tuple[int, int]] = []

    def __call__(self, batch: Batch) -> bool:
        if self.accept:
            self.written.append((batch.first, batch.last))
        return self.accept


def test_a_waiting_viewer_gets_batches_written_directly(hub: Hub, log: ChunkLog) -> None:
    start(log, "k")
    ((sub, wake),) = listening(hub, "k")
    sub.direct = writer = Writer()
    sub.park(0)
    log.append_many("k", 1, chunks(1, "a", "b"))
    log.append("k", 1, Event(3, CHUNK, text="c"))
    wait_for(lambda: len(writer.written) == 2)
    assert writer.written == [(1, 2), (3, 3)]
    assert not wake.is_set()  # no wake-up: nothing for the viewer to do
    assert sub.unpark() == 3
    log.append("k", 1, Event(4, CHUNK, text="d"))  # awake now: the mailbox, as usual
    (batch,) = received(sub, wake)
    assert (batch.first, writer.written[-1]) == (4, (3, 3))


def test_direct_writes_leave_the_hard_cases_to_the_viewer(hub: Hub, log: ChunkLog) -> None:
    start(log, "m")
    ((sub, wake),) = listening(hub, "m")
    sub.direct = Writer(accept=False)  # e.g. the kernel's buffer is full
    sub.park(0)
    log.append("m", 1, Event(1, CHUNK, text="a"))
    assert [b.first for b in received(sub, wake)] == [1]
    assert sub.unpark() == 0  # nothing was written for it
    sub.direct = writer = Writer()
    sub.park(5)  # a gap: the log fills it, not the hub
    log.append("m", 1, Event(2, CHUNK, text="b"))
    assert [b.first for b in received(sub, wake)] == [2]
    assert sub.unpark() == 5
    sub.park(2)
    log.append("m", 1, Event(3, DONE, message_id="x"))  # the end: the viewer closes
    assert [b.first for b in received(sub, wake)] == [3]
    assert writer.written == [] and sub.unpark() == 2


def test_the_hub_holds_a_lease_on_the_streams_it_has_viewers_of(
    hub: Hub, redis_client: redis.Redis
) -> None:
    """Presence, the detach policy's input: a lease while this process has viewers of the
    stream, ended (at the time of leaving) when its last viewer leaves."""
    viewers = keys.viewers_key("presence")
    (sub, _wake), (other, _) = listening(hub, "presence", 2)

    def lease() -> float | None:
        return redis_client.zscore(viewers, hub.hub_id)

    seconds, micros = redis_client.time()
    now_ms = seconds * 1000 + micros // 1000
    assert (lease() or 0) > now_ms + hub.presence_lease_ms / 2
    assert 0 < redis_client.pttl(viewers) <= hub.presence_ttl_ms
    hub.unsubscribe(sub)  # one viewer left: the lease stands
    hub.unsubscribe(other)  # the last one left
    wait_for(lambda: (lease() or 0) < now_ms + hub.presence_lease_ms / 2)
    seconds, micros = redis_client.time()
    assert (lease() or 0) <= seconds * 1000 + micros // 1000


def test_a_web_process_s_hub_is_connected_before_its_first_viewer(isolated_stack: Stack) -> None:
    """gunicorn's worker connects the hub at start: a burst of viewers right after a restart
    finds it listening (started by the first viewer, it connected only once the burst had
    passed, and every subscription of the burst took effect late)."""
    db = isolated_stack.env["REDIS_URL"].rsplit("/", 1)[1]
    control = redis.Redis.from_url(isolated_stack.env["REDIS_URL"], decode_responses=True)

    def hub_listening() -> bool:
        clients = control.client_list(_type="pubsub")
        return any(c.get("db") == db and int(c.get("sub", 0)) >= 1 for c in clients)

    wait_for(hub_listening, timeout=15)  # no viewer has come, nor any request
    control.close()


class GatedHub(Hub):
    """A hub whose thread waits at a gate before it subscribes what is watched: time for
    the test's viewers to park before Redis confirms their stream."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def _reconcile(self) -> None:
        self.gate.wait(30.0)
        super()._reconcile()


def confirmed(hub: Hub, sid: str) -> bool:
    with hub._lock:
        channel = hub._channels.get(sid)
        return channel is not None and channel.confirmed


QUEUED_2 = '{"type":"queued","position":2}'


def test_a_confirmation_sends_back_to_the_log_only_viewers_that_may_have_missed_something(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, log: ChunkLog
) -> None:
    """Viewers waiting with everything the log has (and the queue place it keeps) when
    Redis confirms their stream are left alone; one behind, one without that place, and
    one not waiting re-read the log. What comes next reaches the ones left alone."""
    url = f"redis://127.0.0.1:{redis_server.port}/2"
    hub = GatedHub(url, redis_client, check_interval_s=3600)
    try:
        log.init("q")
        assert log.queue_notice("q", QUEUED_2)
        start(log, "r")
        log.append_many("r", 1, chunks(1, "a", "b", "c"))
        subs = {
            name: (hub.subscribe(sid, 0, threading.Event()), sid)
            for name, sid in [("told", "q"), ("untold", "q"), ("all", "r"), ("behind", "r"),
                              ("awake", "r")]
        }  # fmt: skip
        subs["told"][0].park(0, QUEUED_2)
        subs["untold"][0].park(0, None)
        subs["all"][0].park(3)
        subs["behind"][0].park(1)
        hub.gate.set()
        wait_for(lambda: confirmed(hub, "q") and confirmed(hub, "r"))
        flagged = {name for name, (sub, _) in subs.items() if sub.wake.is_set()}
        assert flagged == {"untold", "behind", "awake"}
        assert [sub.take()[1] for sub, _ in subs.values()] == [False, True, False, True, True]
        log.append("r", 1, Event(4, CHUNK, text="d"))
        (batch,) = received(subs["all"][0], subs["all"][0].wake)
        assert batch.events == [Event(4, CHUNK, text="d")]
    finally:
        hub.stop()


def test_without_the_state_a_confirmation_sends_every_viewer_back_to_the_log(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, log: ChunkLog
) -> None:
    """The hub cannot read the stream's state (its control connection is down): each
    viewer re-reads the log, as if nothing were known."""
    url = f"redis://127.0.0.1:{redis_server.port}/2"
    down = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    hub = GatedHub(url, down, check_interval_s=3600)
    try:
        start(log, "s")
        sub = hub.subscribe("s", 0, threading.Event())
        sub.park(0)
        hub.gate.set()
        wait_for(lambda: confirmed(hub, "s"))
        wait_for(sub.wake.is_set)
        assert sub.take() == ([], True, False)
    finally:
        hub.stop()


def test_after_a_reconnect_only_viewers_behind_go_back_to_the_log(
    hub: Hub, log: ChunkLog, redis_client: redis.Redis
) -> None:
    """The hub loses its connection; on twenty streams, one was written meanwhile. Every
    stream is confirmed again (their states read in one round trip), and only that
    stream's waiting viewer is sent back to the log; the others, which have everything,
    are left alone and get what comes next through the hub."""
    sids = [f"re{i}" for i in range(20)]
    viewers = []
    for sid in sids:
        start(log, sid)
        ((sub, wake),) = listening(hub, sid)
        sub.park(0)
        viewers.append((sub, wake))
    before = hub._conn
    assert redis_client.client_kill_filter(_type="pubsub") >= 1
    log.append("re7", 1, Event(1, CHUNK, text="while away"))  # no one listens: only the log
    wait_for(lambda: hub._conn is not before and all(confirmed(hub, sid) for sid in sids))
    wait_for(viewers[7][1].is_set)
    time.sleep(0.3)  # time for a flag that should not come
    assert [i for i, (_, wake) in enumerate(viewers) if wake.is_set()] == [7]
    assert viewers[7][0].take() == ([], True, False)
    log.append("re3", 1, Event(1, CHUNK, text="after"))
    (batch,) = received(*viewers[3])
    assert batch.events == [Event(1, CHUNK, text="after")]
