"""The chunk log's Lua scripts against a real Redis: fencing, cancel, claim, retention."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis
from redis.exceptions import ResponseError

from models import keys
from models.chunklog import Beat, ChunkLog
from models.events import CANCELLED, CHUNK, DONE, Event
from models.exceptions import LogBehind, StaleAttempt
from tests.client import wait_for


@pytest.fixture
def log(redis_client: redis.Redis) -> ChunkLog:
    return ChunkLog(redis_client, retention_s=600, running_ttl_s=3600)


def chunk(seq: int, text: str = "x") -> Event:
    return Event(seq, CHUNK, text=text)


def test_claim_append_and_read_back(log: ChunkLog) -> None:
    log.init("s1")
    claim = log.claim("s1", "task-1", stale_after_s=5)
    assert (claim.result, claim.attempt, claim.last_seq) == ("claimed", 1, 0)
    for seq, text in enumerate(["Hel", "lo", " world"], start=1):
        assert log.append("s1", 1, chunk(seq, text)) is False
    assert [e.text for e in log.read("s1", 0, 10)] == ["Hel", "lo", " world"]
    assert [e.seq for e in log.read("s1", 1, 10)] == [2, 3]
    assert log.text("s1", 2) == ("Hello", [3, 5])
    assert log.state("s1").worker == ""
    assert log.last_seq("s1") == 3
    assert list(log.iter_from("s1", 0, batch=2)) == log.read("s1", 0, 10)


def test_a_live_attempt_makes_a_second_claim_busy(log: ChunkLog) -> None:
    log.init("s2")
    assert log.claim("s2", "t1", 5).result == "claimed"
    busy = log.claim("s2", "t1-redelivered", 5)
    assert busy.result == "busy"


def test_a_stale_attempt_is_fenced_off(log: ChunkLog, redis_client: redis.Redis) -> None:
    log.init("s3")
    log.claim("s3", "t1", 5)
    log.append("s3", 1, chunk(1))
    redis_client.hset(keys.state_key("s3"), "hb", 0)  # the first attempt's heartbeat died
    second = log.claim("s3", "t2", 5)
    assert (second.result, second.attempt, second.last_seq) == ("claimed", 2, 1)
    with pytest.raises(StaleAttempt):
        log.append("s3", 1, chunk(2, "from the dead"))
    log.append("s3", 2, chunk(2, "from the living"))
    assert log.heartbeat("s3", 1) == Beat(owner=False, cancel=False)
    assert log.heartbeat("s3", 2) == Beat(owner=True, cancel=False)
    assert [e.text for e in log.read("s3", 0, 10)] == ["x", "from the living"]


def test_a_seq_that_is_not_above_the_last_is_refused(log: ChunkLog) -> None:
    log.init("s4")
    log.claim("s4", "t1", 5)
    log.append("s4", 1, chunk(1))
    log.append("s4", 1, chunk(2))
    with pytest.raises(StaleAttempt):
        log.append("s4", 1, chunk(2, "duplicate"))
    assert len(log.read("s4", 0, 10)) == 2


def test_terminal_event_sets_status_and_retention(log: ChunkLog, redis_client: redis.Redis) -> None:
    log.init("s5")
    log.claim("s5", "t1", 5)
    log.append("s5", 1, chunk(1))
    assert redis_client.ttl(keys.log_key("s5")) > 600  # running: the long safety TTL
    log.append("s5", 1, Event(2, DONE, message_id="m1"))
    assert log.state("s5").status == "done"
    assert 0 < redis_client.ttl(keys.log_key("s5")) <= 600
    assert 0 < redis_client.ttl(keys.state_key("s5")) <= 600
    with pytest.raises(StaleAttempt):
        log.append("s5", 1, chunk(3))  # nothing is written after the end
    assert log.claim("s5", "t2", 5).result == "finished"


def test_cancel_of_a_running_stream_is_reported_to_the_writer(log: ChunkLog) -> None:
    log.init("s6")
    log.claim("s6", "t1", 5)
    log.append("s6", 1, chunk(1))
    assert log.cancel("s6", 5) == ("requested", 0, 0)
    assert log.heartbeat("s6", 1) == Beat(owner=True, cancel=True)
    assert log.append("s6", 1, chunk(2)) is True


def test_cancel_of_a_queued_stream_ends_it_and_fences_the_worker(log: ChunkLog) -> None:
    log.init("s7")
    assert log.cancel("s7", 5) == ("taken", 1, 0)
    assert log.claim("s7", "t1", 5).result == "busy"  # the canceller owns it now
    log.append("s7", 1, Event(1, CANCELLED))
    assert [e.type for e in log.read("s7", 0, 10)] == ["cancelled"]
    assert log.claim("s7", "t1", 5).result == "finished"
    assert log.cancel("s7", 5) == ("finished", 0, 0)


def test_cancel_of_a_stream_whose_writer_died_ends_it_here(
    log: ChunkLog, redis_client: redis.Redis
) -> None:
    log.init("s8")
    log.claim("s8", "t1", 5)
    log.append("s8", 1, chunk(1, "partial"))
    redis_client.hset(keys.state_key("s8"), "hb", 0)
    assert log.cancel("s8", 5) == ("taken", 2, 1)
    with pytest.raises(StaleAttempt):
        log.append("s8", 1, chunk(2))  # the dead writer is fenced off


def test_keys_share_a_cluster_hash_tag() -> None:
    assert keys.log_key("abc") == "relay:{abc}:log"
    assert keys.state_key("abc") == "relay:{abc}:state"
    assert keys.stream_id_from_key(keys.log_key("abc")) == "abc"


def test_attempts_never_go_below_sql_after_redis_lost_the_state(
    log: ChunkLog, redis_client: redis.Redis
) -> None:
    log.init("s9")
    redis_client.delete(keys.state_key("s9"))  # Redis lost the hash; SQL says attempt 4
    claim = log.claim("s9", "t5", 5, min_attempt=4)
    assert (claim.result, claim.attempt) == ("claimed", 5)
    with pytest.raises(StaleAttempt):
        log.append("s9", 1, chunk(1))  # an old writer from before the loss


def server_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_the_detach_policy_counts_from_the_last_viewer_leaving(
    log: ChunkLog, redis_client: redis.Redis
) -> None:
    sid = f"dp-{uuid.uuid4().hex}"
    log.init(sid, detach_after_s=5)
    assert log.state(sid).detach_ms == 5000
    assert not log.claim(
        sid, "t1", 5, detach=True
    ).cancel_requested  # just posted: nobody needed yet
    now = server_ms(redis_client)
    redis_client.hset(keys.state_key(sid), "qt", now - 60_000)  # posted a minute ago
    viewers = keys.viewers_key(sid)
    redis_client.zadd(viewers, {"web-a": now + 10_000, "web-b": now - 30_000})  # a lease runs
    assert log.heartbeat(sid, 1, detach=True) == Beat(owner=True, cancel=False, unwatched=False)
    assert log.detach_status(sid).cancel_at_ms is None
    redis_client.zadd(viewers, {"web-a": now - 4_000})  # its last viewer left 4 s ago
    assert log.heartbeat(sid, 1, detach=True) == Beat(owner=True, cancel=False, unwatched=True)
    assert log.detach_status(sid).cancel_at_ms == now + 1_000  # from the latest leave
    redis_client.zadd(viewers, {"web-a": now - 5_000})
    assert log.heartbeat(sid, 1, detach=True) == Beat(owner=True, cancel=True)
    state = log.state(sid)
    assert state.cancel_requested and state.why == "abandoned"
    assert log.append(sid, 1, chunk(1)) is True  # the writer's next append hears it too


def test_without_a_policy_nobody_watching_changes_nothing(
    log: ChunkLog, redis_client: redis.Redis
) -> None:
    sid = f"dp-{uuid.uuid4().hex}"
    log.init(sid)
    log.claim(sid, "t1", 5)
    redis_client.hset(keys.state_key(sid), "qt", server_ms(redis_client) - 3_600_000)
    assert log.heartbeat(sid, 1, detach=True) == Beat(owner=True, cancel=False, unwatched=False)
    assert log.detach_status(sid).policy_ms is None
    assert log.state(sid).why is None


def test_an_answer_abandoned_while_queued_is_claimed_with_the_cancel_flag(
    log: ChunkLog, redis_client: redis.Redis
) -> None:
    sid = f"dp-{uuid.uuid4().hex}"
    log.init(sid, detach_after_s=1)
    redis_client.hset(keys.state_key(sid), "qt", server_ms(redis_client) - 1_500)
    claim = log.claim(sid, "t1", 5, detach=True)
    assert claim.result == "claimed" and claim.cancel_requested
    assert log.state(sid).why == "abandoned"
    # A retry starts the count again, with the policy it is given (or none).
    log.append(sid, claim.attempt, Event(1, CANCELLED, reason="abandoned"))
    assert log.reopen(sid, "t2", detach_after_s=30)[0] == "reopened"
    state = log.state(sid)
    assert (state.detach_ms, state.why, state.cancel_requested) == (30_000, None, False)
    again = log.claim(sid, "t2", 5, detach=True)
    assert again.result == "claimed" and not again.cancel_requested
    log.append(sid, again.attempt, Event(3, CANCELLED))
    assert log.reopen(sid, "t3")[0] == "reopened"
    assert log.state(sid).detach_ms is None


def test_the_terminal_event_records_whether_a_viewer_saw_the_end(
    log: ChunkLog, redis_client: redis.Redis
) -> None:
    for watched in (True, False):
        sid = f"ew-{uuid.uuid4().hex}"
        log.init(sid)
        attempt = log.claim(sid, "t1", 5).attempt
        log.append(sid, attempt, chunk(1))
        lease = server_ms(redis_client) + (10_000 if watched else -1_000)
        redis_client.zadd(keys.viewers_key(sid), {"web-a": lease})
        assert log.state(sid).watched_end is False  # only the end records it
        log.append(sid, attempt, Event(2, DONE, message_id="m"))
        assert log.state(sid).watched_end is watched
        assert log.reopen(sid, "t2")[0] == "reopened"
        assert log.state(sid).watched_end is False  # a retry's end records it again


def append_all(log: ChunkLog, work: list[tuple[str, int, list[Event]]]) -> list[Any]:
    """``work``'s appends as one script call, a reply per stream (what the worker sends)."""
    log.load_scripts()
    reply = log.redis.execute_command(*log.append_all_command(work))
    return ChunkLog.append_all_replies(reply, len(work))


def test_many_streams_append_in_one_call_each_on_its_own(
    log: ChunkLog, redis_client: redis.Redis
) -> None:
    ids = {name: f"all-{name}-{uuid.uuid4().hex}" for name in
           ("ok", "stale", "behind", "end", "broken", "after")}  # fmt: skip
    attempts = {}
    for name, sid in ids.items():
        log.init(sid)
        attempts[name] = log.claim(sid, "t1", 5).attempt
    log.append(ids["behind"], attempts["behind"], chunk(1))
    redis_client.zadd(keys.viewers_key(ids["end"]), {"web-a": server_ms(redis_client) + 10_000})
    redis_client.delete(keys.state_key(ids["broken"]))
    redis_client.set(keys.state_key(ids["broken"]), "not a hash")  # its first command fails
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe("relay:{all-*}:live")
    wait_for(lambda: pubsub.get_message(timeout=0.01) is None)

    replies = append_all(log, [
        (ids["ok"], attempts["ok"], [chunk(1, "a"), chunk(2, "b")]),
        (ids["stale"], attempts["stale"] + 1, [chunk(1)]),
        (ids["behind"], attempts["behind"], [chunk(3)]),
        (ids["broken"], attempts["broken"], [chunk(1), chunk(2)]),
        (ids["end"], attempts["end"], [chunk(1, "z"), Event(2, DONE, message_id="m")]),
        (ids["after"], attempts["after"], [chunk(1, "last")]),
    ])  # fmt: skip

    assert replies[0] == ["ok", 0] and replies[5] == ["ok", 0]
    with pytest.raises(StaleAttempt):
        ChunkLog.append_result(ids["stale"], attempts["stale"] + 1, replies[1])
    with pytest.raises(LogBehind) as behind:
        ChunkLog.append_result(ids["behind"], attempts["behind"], replies[2])
    assert behind.value.seq == 1
    assert isinstance(replies[3], ResponseError) and "WRONGTYPE" in str(replies[3])
    assert replies[4] == ["ok", 0]
    assert [(e.seq, e.text) for e in log.read(ids["ok"], 0, 10)] == [(1, "a"), (2, "b")]
    assert log.read(ids["stale"], 0, 10) == []
    assert [e.seq for e in log.read(ids["behind"], 0, 10)] == [1]
    assert [e.seq for e in log.read(ids["end"], 0, 10)] == [1, 2]
    assert [e.text for e in log.read(ids["after"], 0, 10)] == ["last"]
    assert log.state(ids["ok"]).status == "running"
    assert log.state(ids["end"]).status == "done" and log.state(ids["end"]).watched_end is True
    assert 0 < redis_client.ttl(keys.log_key(ids["end"])) <= 600  # the retention
    # Every stream that appended published its events, once, in one message.
    got: dict[str, list[int]] = {}
    for _ in range(50):
        message = pubsub.get_message(timeout=0.1)
        if message is not None:
            first, types, _ = json.loads(message["data"])
            sid = keys.stream_id_from_key(message["channel"])
            got[sid] = got.get(sid, []) + list(range(first, first + len(types)))
        if len(got) == 3:
            break
    pubsub.close()
    assert got == {ids["ok"]: [1, 2], ids["end"]: [1, 2], ids["after"]: [1]}


def test_the_running_ttl_is_set_by_an_attempts_first_append_then_every_tenth(
    redis_client: redis.Redis,
) -> None:
    log = ChunkLog(redis_client, running_ttl_s=1000, retention_s=600)
    sid = f"ttl-{uuid.uuid4().hex}"
    log_key, state_key = keys.log_key(sid), keys.state_key(sid)

    def ttls() -> tuple[int, int]:
        return int(redis_client.ttl(log_key)), int(redis_client.ttl(state_key))

    log.init(sid)
    attempt = log.claim(sid, "t1", 5).attempt
    log.append(sid, attempt, chunk(1))
    assert all(990 <= t <= 1000 for t in ttls())
    redis_client.expire(log_key, 50)
    redis_client.expire(state_key, 50)
    log.append(sid, attempt, chunk(2))  # within a tenth of the TTL since: not refreshed
    assert all(0 < t <= 50 for t in ttls())
    refreshed = int(redis_client.hget(state_key, "xt") or 0)
    redis_client.hset(state_key, "xt", refreshed - 100_001)  # a tenth ago (100 s)
    append_all(log, [(sid, attempt, [chunk(3)])])
    assert all(990 <= t <= 1000 for t in ttls())
    # A new attempt refreshes at its first append, whatever the last one did.
    redis_client.expire(log_key, 50)
    redis_client.hset(state_key, "hb", 0)
    attempt = log.claim(sid, "t2", 5).attempt
    assert redis_client.hget(state_key, "xt") is None
    log.append(sid, attempt, chunk(4))
    assert all(990 <= t <= 1000 for t in ttls())
    log.append(sid, attempt, Event(5, DONE, message_id="m"))
    assert all(0 < t <= 600 for t in ttls())
