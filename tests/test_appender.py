"""The worker's group commit against a real Redis: pieces that arrive while an append is in
flight share the next one, failures reach the generation, the fence still holds."""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from models import keys
from models.chunklog import ChunkLog
from models.events import CHUNK, DONE, RESUMED, Event, error_event
from models.exceptions import LogUnavailable, StaleAttempt
from models.redisconn import PinnedConnection
from ops.redis_server import EmbeddedRedis, free_port
from tests.client import wait_for
from tests.conftest import command_calls
from workers.appender import GroupAppender, StreamAppender


@pytest.fixture
def log(redis_client: redis.Redis) -> ChunkLog:
    return ChunkLog(redis_client)


@contextmanager
def recording(client: redis.Redis) -> Iterator[list[tuple[str, list[int]]]]:
    """Record every live message on streams named s*: (stream id, its seqs)."""
    out: list[tuple[str, list[int]]] = []
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe("relay:{s*}:live")
    stop = threading.Event()

    def record() -> None:
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.05)
            if message is not None:
                first, types, _ = json.loads(message["data"])
                seqs = list(range(first, first + len(types)))
                out.append((keys.stream_id_from_key(message["channel"]), seqs))

    thread = threading.Thread(target=record, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        pubsub.close()


@pytest.fixture
def published(redis_client: redis.Redis) -> Iterator[list[tuple[str, list[int]]]]:
    with recording(redis_client) as out:
        yield out


def started(log: ChunkLog, sid: str) -> int:
    log.init(sid)
    return log.claim(sid, "task", 5).attempt


def chunk(seq: int) -> Event:
    return Event(seq, CHUNK, text=f"<{seq}>")


def test_an_idle_stream_sends_each_piece_alone(
    log: ChunkLog, published: list[tuple[str, list[int]]]
) -> None:
    group = GroupAppender(log)
    stream = group.open("s1", started(log, "s1"), 0)
    for seq in (1, 2, 3):
        stream.submit(chunk(seq))
        stream.flush()
        assert stream.acked == seq
    wait_for(lambda: len(published) == 3)
    assert published == [("s1", [1]), ("s1", [2]), ("s1", [3])]
    assert "".join(e.text for e in log.read("s1", 0, 10)) == "<1><2><3>"


def test_pieces_that_arrive_during_an_append_share_the_next(
    log: ChunkLog, redis_client: redis.Redis, published: list[tuple[str, list[int]]]
) -> None:
    group = GroupAppender(log)
    attempts = {sid: started(log, sid) for sid in ("s2", "s3")}
    a = group.open("s2", attempts["s2"], 0)
    b = group.open("s3", attempts["s3"], 0)
    redis_client.client_pause(1000, all=False)  # write commands wait: the first append hangs
    a.submit(chunk(1))
    wait_for(lambda: a.in_flight)
    for seq in range(2, 41):
        a.submit(chunk(seq))
        b.submit(chunk(seq - 1))
    a.flush()
    b.flush()
    assert (a.acked, b.acked) == (40, 39)
    wait_for(lambda: sum(len(s) for _, s in published) == 79)
    assert [s for sid, s in published if sid == "s2"] == [[1], list(range(2, 41))]
    assert [s for sid, s in published if sid == "s3"] == [list(range(1, 40))]
    assert [e.seq for e in log.read("s2", 0, 100)] == list(range(1, 41))


def test_a_log_that_lost_its_last_appends_is_refilled_from_the_kept_events(
    log: ChunkLog, redis_client: redis.Redis
) -> None:
    """What a Sentinel failover can leave: a promoted replica whose log ends before what the
    appender had confirmed. The next append finds the log behind and sends the missing
    events again, rebuilt from what the appender keeps, at their seqs and as they were."""
    group = GroupAppender(log)
    stream = group.open("s9", started(log, "s9"), 0)
    sent = [chunk(1), chunk(2), chunk(3), Event(4, RESUMED, attempt=2), chunk(5),
            error_event(6, "upstream_error", "the model said no")]  # fmt: skip
    for event in sent[:5]:
        stream.submit(event)
    stream.flush()
    # The replica had received events 1 to 3 only (its stream's last ID is 0-3).
    redis_client.delete(keys.log_key("s9"))
    for event in sent[:3]:
        redis_client.xadd(keys.log_key("s9"), {"t": event.type, "d": event.payload()},
                          id=f"0-{event.seq}")  # fmt: skip
    redis_client.hset(keys.state_key("s9"), "seq", 3)
    stream.submit(sent[5])
    stream.flush()
    assert stream.acked == 6
    assert log.read("s9", 0, 100) == sent
    gc.collect()  # what the appender keeps is nothing the collector has to walk again
    assert len(stream.kept) == 6 and not any(gc.is_tracked(k) for k in stream.kept)


def test_a_coalescing_window_gathers_pieces(
    log: ChunkLog, published: list[tuple[str, list[int]]]
) -> None:
    group = GroupAppender(log, coalesce_s=0.5)
    stream = group.open("s4", started(log, "s4"), 0)
    for seq in range(1, 6):
        stream.submit(chunk(seq))
    stream.flush()
    wait_for(lambda: len(published) == 1)
    assert published == [("s4", [1, 2, 3, 4, 5])]


def test_under_load_the_flusher_lets_ready_pieces_join_the_round_trip(
    log: ChunkLog, published: list[tuple[str, list[int]]]
) -> None:
    """Under load (``busy_s`` here: a minute) the flusher gives other threads a turn before it
    takes the pending pieces; what they submit meanwhile goes in the same round trip. After a
    quiet spell it takes no turn."""
    rounds: list[list[str]] = []
    turns: list[Callable[[], None]] = []

    class Recording(GroupAppender):
        def _send(self, work: list[tuple[StreamAppender, list[Event]]]) -> list[Any]:
            rounds.append([s.stream_id for s, _ in work])
            return super()._send(work)

        def _turn(self) -> None:
            turns.pop(0)()

    group = Recording(log, gather=1, busy_s=60.0)
    a = group.open("s9", started(log, "s9"), 0)
    b = group.open("s10", started(log, "s10"), 0)
    a.submit(chunk(1))
    a.flush(timeout=5)  # the first round trip in a while: no turn taken (none queued)
    turns.append(lambda: b.submit(chunk(1)))  # another generation's piece, during the turn
    a.submit(chunk(2))
    a.flush(timeout=5)
    b.flush(timeout=5)
    assert rounds == [["s9"], ["s9", "s10"]]
    assert not turns
    wait_for(lambda: len(published) == 3)
    assert "".join(e.text for e in log.read("s10", 0, 10)) == "<1>"
    assert "".join(e.text for e in log.read("s9", 0, 10)) == "<1><2>"


def test_a_fenced_off_attempt_gets_stale_attempt(log: ChunkLog, redis_client: redis.Redis) -> None:
    group = GroupAppender(log)
    stream = group.open("s5", started(log, "s5"), 0)
    stream.submit(chunk(1))
    stream.flush()
    redis_client.hset(keys.state_key("s5"), "hb", 0)
    assert log.claim("s5", "task-2", 5).result == "claimed"  # another worker took over
    stream.submit(chunk(2))
    with pytest.raises(StaleAttempt):
        stream.flush()
    assert stream.acked == 1
    assert [e.seq for e in log.read("s5", 0, 10)] == [1]


def test_a_pending_cancel_is_reported(log: ChunkLog) -> None:
    group = GroupAppender(log)
    stream = group.open("s6", started(log, "s6"), 0)
    stream.submit(chunk(1))
    stream.flush()
    assert not stream.cancel_requested
    assert log.cancel("s6", 5)[0] == "requested"
    stream.submit(chunk(2))
    stream.flush()
    assert stream.cancel_requested
    stream.submit(Event(3, DONE, message_id="m"))
    stream.flush()
    assert log.state("s6").status == "done"


def test_a_lost_script_is_loaded_again(log: ChunkLog, redis_client: redis.Redis) -> None:
    group = GroupAppender(log)
    stream = group.open("s7", started(log, "s7"), 0)
    redis_client.script_flush()
    stream.submit(chunk(1))
    stream.flush()
    assert stream.acked == 1


def test_an_outage_longer_than_the_budget_fails_the_append_once() -> None:
    dead = ChunkLog(redis.Redis(port=free_port(), socket_connect_timeout=1))
    group = GroupAppender(dead, budget_s=0.5)
    stream = group.open("s8", 1, 0)
    stream.submit(chunk(1))
    with pytest.raises(LogUnavailable):
        stream.flush()
    assert stream.acked == 0
    stream.flush()  # reported once: nothing is pending any more


def test_a_generation_waits_when_redis_falls_far_behind(
    log: ChunkLog, redis_client: redis.Redis
) -> None:
    group = GroupAppender(log, max_pending=10)
    stream = group.open("s9", started(log, "s9"), 0)
    redis_client.client_pause(500, all=False)
    stream.submit(chunk(1))
    wait_for(lambda: stream.in_flight)
    done = threading.Event()

    def more() -> None:
        for seq in range(2, 31):
            stream.submit(chunk(seq))
        done.set()

    threading.Thread(target=more, daemon=True).start()
    wait_for(lambda: len(stream.pending) == 10)
    assert not done.is_set()  # held at the bound while the append is in flight
    assert done.wait(30)
    stream.flush()
    assert [e.seq for e in log.read("s9", 0, 100)] == list(range(1, 31))


def test_confirmed_events_are_counted_and_a_dropped_connection_is_dialled_again(
    log: ChunkLog, redis_client: redis.Redis
) -> None:
    counted: list[int] = []
    group = GroupAppender(log, on_appended=counted.append, recheck_idle_s=0)
    stream = group.open("s10", started(log, "s10"), 0)
    for seq in (1, 2, 3):
        stream.submit(chunk(seq))
    stream.flush()
    killed = redis_client.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1  # the appender's own connection was among them
    stream.submit(chunk(4))
    stream.flush()  # the flusher saw its connection closed and dialled again
    assert stream.acked == 4
    wait_for(lambda: sum(counted) == 4)  # reported when the flusher goes idle
    assert [e.seq for e in log.read("s10", 0, 10)] == [1, 2, 3, 4]


class _LosesOneReply(PinnedConnection):
    """A real connection whose first round trip is applied by Redis but whose reply never
    arrives (the connection drops right after): the fault a Redis restart or a network
    blip causes between the write and its acknowledgement."""

    lost = False

    def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        replies = super().pipeline(commands)
        if not self.lost and commands[0][0] == "EVALSHA":
            self.lost = True
            self.conn.disconnect()
            raise RedisConnectionError("the reply was lost (injected)")
        return replies


def test_a_lost_reply_is_read_back_from_the_log_not_guessed(log: ChunkLog) -> None:
    group = GroupAppender(log)
    attempt = started(log, "s11")
    group._conn = _LosesOneReply(log.redis)
    stream = group.open("s11", attempt, 0)
    for seq in (1, 2, 3):
        stream.submit(chunk(seq))
    stream.flush()  # the append was applied: the writer learns it from the log
    assert stream.acked == 3
    stream.submit(chunk(4))
    stream.flush()
    assert [e.seq for e in log.read("s11", 0, 10)] == [1, 2, 3, 4]
    assert "".join(e.text for e in log.read("s11", 0, 10)) == "<1><2><3><4>"


def test_a_redis_restart_is_ridden_out_without_a_gap_or_a_double(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", persistent=True).start()
    try:
        log = ChunkLog(redis.Redis.from_url(server.url, decode_responses=True))
        group = GroupAppender(log, budget_s=30)
        stream = group.open("s12", started(log, "s12"), 0)
        for seq in range(1, 11):
            stream.submit(chunk(seq))
        stream.flush()
        server.stop()  # SIGTERM: Redis writes its append-only file and exits
        for seq in range(11, 21):  # the generation keeps handing pieces over meanwhile
            stream.submit(chunk(seq))
        wait_for(lambda: stream.in_flight)  # the flusher is retrying its round trip
        server.start()  # same port, same data, no scripts loaded
        stream.flush()
        assert stream.acked == 20
        assert [e.seq for e in log.read("s12", 0, 100)] == list(range(1, 21))
        assert "".join(e.text for e in log.read("s12", 0, 100)) == "".join(
            f"<{i}>" for i in range(1, 21)
        )
    finally:
        server.stop()


def test_the_fate_of_an_append_comes_from_the_state_it_left() -> None:
    outcome = ChunkLog.append_outcome
    assert outcome(["2", "7", "running", None], 2, 5, 7) == "written"
    assert outcome(["2", "7", "running", "1"], 2, 5, 7) == "written+cancel"
    assert outcome(["2", "7", "done", None], 2, 5, 7) == "written"  # it carried the end
    assert outcome(["2", "4", "running", None], 2, 5, 7) == "missing"
    assert outcome(["3", "4", "running", None], 2, 5, 7) == "stale"  # taken over
    assert outcome(["2", "4", "cancelled", None], 2, 5, 7) == "stale"
    assert outcome([None, None, None, None], 2, 5, 7) == "gone"


class _Recording(PinnedConnection):
    """A real connection that records the command names of each round trip."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client)
        self.rounds: list[list[str]] = []

    def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        self.rounds.append([str(c[0]) for c in commands])
        return super().pipeline(commands)


def test_a_rider_goes_with_the_next_round_trip_after_its_appends(
    log: ChunkLog, redis_client: redis.Redis
) -> None:
    """A command handed to the flusher (a feed event) takes no round trip of its own: it goes
    in the next one, after the appends gathered for it, and its reply comes back."""
    group = GroupAppender(log)
    group._conn = conn = _Recording(log.redis)
    stream = group.open("s12", started(log, "s12"), 0)
    redis_client.client_pause(1000, all=False)  # the first append hangs; the rest gather
    stream.submit(chunk(1))
    wait_for(lambda: stream.in_flight)
    for seq in range(2, 6):
        stream.submit(chunk(seq))
    ride = group.ride(ChunkLog.position_command("s12"))
    assert ride.result(timeout=10)[1] == "5"  # the log's seq when it ran: every append before
    stream.flush()
    assert conn.rounds == [["EVALSHA"], ["EVALSHA", "HMGET"]]


def test_a_rider_gets_its_own_error_and_a_failed_round_trip_answers_every_rider(
    log: ChunkLog, redis_client: redis.Redis
) -> None:
    group = GroupAppender(log)
    stream = group.open("s13", started(log, "s13"), 0)
    stream.submit(chunk(1))
    forgotten = group.ride(["EVALSHA", "0" * 40, 0])  # a script Redis does not have
    stream.flush()
    with pytest.raises(redis.exceptions.NoScriptError):
        forgotten.result(timeout=10)
    assert stream.acked == 1  # the appends of the same round trip stand
    dead = GroupAppender(ChunkLog(redis.Redis(port=free_port(), socket_connect_timeout=1)),
                         budget_s=0.5)  # fmt: skip
    with pytest.raises(RedisConnectionError):
        dead.ride(["PING"]).result(timeout=30)


def test_a_round_trip_is_one_script_call_per_max_events_each_stream_on_its_own(
    tmp_path: Path,
) -> None:
    """On a Redis server of its own: Redis counts script calls per server, and the shared
    one also serves the test stacks (their sweepers call scripts at any moment)."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    redis_client = redis.Redis.from_url(server.url, decode_responses=True)
    log = ChunkLog(redis_client)
    try:
        with recording(redis_client) as published:
            group = GroupAppender(log, max_events=4)
            names = [f"s-all-{i}" for i in range(6)]
            streams = [group.open(sid, started(log, sid), 0) for sid in names]
            streams[0].submit(chunk(1))
            streams[0].flush()  # the script is loaded; the next round trip gathers the rest
            fenced = streams[3]
            redis_client.hset(keys.state_key(fenced.stream_id), "hb", 0)
            assert log.claim(fenced.stream_id, "task-2", 5).result == "claimed"
            before = command_calls(redis_client, "evalsha")
            redis_client.client_pause(1000, all=False)  # hold the flusher's first round trip
            streams[0].submit(chunk(2))
            wait_for(lambda: streams[0].in_flight)
            for stream in streams:
                first = stream.acked + 1 + len(stream.pending) + (stream is streams[0])
                for seq in (first, first + 1):
                    stream.submit(chunk(seq))
            for stream in streams:
                if stream is fenced:
                    with pytest.raises(StaleAttempt):
                        stream.flush()
                else:
                    stream.flush()
            # One call for the held piece, then 12 events of 6 streams in calls of at most 4
            # events.
            assert command_calls(redis_client, "evalsha") - before == 1 + 3
            assert [s.acked for s in streams] == [4, 2, 2, 0, 2, 2]
            for stream in streams:
                seqs = [e.seq for e in log.read(stream.stream_id, 0, 10)]
                assert seqs == list(range(1, stream.acked + 1))
            wait_for(lambda: sum(len(s) for _, s in published) == 4 + 2 * 4)
            assert not [sid for sid, _ in published if sid == fenced.stream_id]
    finally:
        redis_client.close()
        server.stop()


def test_submits_from_many_threads_racing_the_flusher_to_sleep_all_get_sent(
    log: ChunkLog,
) -> None:
    """Each thread's next piece often arrives just as the flusher goes back to sleep (the
    last round trip done, nothing ready): no wake-up is lost, no piece left behind."""
    group = GroupAppender(log)
    names = [f"s-race-{i}" for i in range(8)]
    streams = [group.open(sid, started(log, sid), 0) for sid in names]
    errors: list[BaseException] = []

    def write(stream: StreamAppender) -> None:
        try:
            for seq in range(1, 201):
                stream.submit(chunk(seq))
                if seq % 7 == 0:
                    stream.flush(timeout=10)
            stream.flush(timeout=10)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(s,)) for s in streams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for stream in streams:
        assert stream.acked == 200
        assert [e.seq for e in log.read(stream.stream_id, 0, 300)] == list(range(1, 201))


def test_a_failure_of_the_flusher_itself_is_logged_and_it_goes_on(
    log: ChunkLog, caplog: pytest.LogCaptureFixture
) -> None:
    """``on_appended`` (the worker's metrics) raising once after a round trip settled: the
    flusher logs it and keeps sending; nothing waits forever for a flusher that died."""
    calls: list[int] = []

    def count(n: int) -> None:
        calls.append(n)
        if len(calls) == 1:
            raise RuntimeError("metrics backend failed")

    group = GroupAppender(log, on_appended=count)
    stream = group.open("s-survives", started(log, "s-survives"), 0)
    stream.submit(chunk(1))
    stream.flush(timeout=10)  # settled before the report failed
    wait_for(lambda: len(calls) == 1)
    for seq in (2, 3):
        stream.submit(chunk(seq))
        stream.flush(timeout=10)
    assert stream.acked == 3
    assert [e.seq for e in log.read("s-survives", 0, 10)] == [1, 2, 3]
    assert "the appender's round trip failed" in caplog.text


class _SettleFailsOnce(GroupAppender):
    """The flusher's own code failing once between a round trip and its settling (a fault
    injected where no outside failure reaches: Redis's are replies, never raised)."""

    failed = False

    def _settle(self, work: Any, replies: Any) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("a bug in settling")
        super()._settle(work, replies)


def test_appends_the_flusher_failed_to_settle_fail_and_the_next_ones_go_through(
    log: ChunkLog,
) -> None:
    group = _SettleFailsOnce(log)
    stream = group.open("s-abandoned", started(log, "s-abandoned"), 0)
    stream.submit(chunk(1))
    with pytest.raises(LogUnavailable, match="a bug in settling"):
        stream.flush(timeout=10)
    assert not stream.in_flight
    # The append itself reached the log: the generation's next attempt continues from it.
    assert [e.seq for e in log.read("s-abandoned", 0, 10)] == [1]
    stream.acked = 1  # as a new attempt would start: from the log's last seq
    stream.submit(chunk(2))
    stream.flush(timeout=10)
    assert [e.seq for e in log.read("s-abandoned", 0, 10)] == [1, 2]
