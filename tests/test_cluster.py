"""relay's own data on a Redis Cluster, against real servers: three masters started for the
tests (redis-server 7, ``tests/cluster.py``), relay's ``redis+cluster://`` URL, the worker's
group commit split by slot over every node (and following MOVED and ASK while a slot moves),
the hub's one pub/sub connection hearing streams on every node, and a whole stack (web and
worker processes, the Celery broker on a plain Redis) serving posts, resumes, cancels and an
admin retry on streams spread over the cluster."""

from __future__ import annotations

import json
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot

from models import keys
from models.chunklog import ChunkLog
from models.events import CHUNK, DONE, Event
from models.exceptions import LogUnavailable
from models.redisconn import (
    ClusterPipeline,
    ClusterURL,
    broker_settings,
    make_client,
    sharded_pubsub,
)
from models.settings import Settings
from ops.redis_server import EmbeddedRedis, free_port
from tests.client import Client, chunk_text, wait_for
from tests.cluster import Cluster, ClusterNode
from tests.conftest import migrated_database
from tests.procs import BIN, ROOT, Proc, stack_env, start_web, start_worker
from web.hub import Hub, ShardedHub, Subscription, make_hub
from workers.appender import GroupAppender


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    deployment = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield deployment.start()
    finally:
        deployment.stop()


@pytest.fixture
def client(cluster: Cluster) -> Iterator[RedisCluster]:
    made = make_client(cluster.url, max_connections=20, wait_s=5)
    assert isinstance(made, RedisCluster)
    yield made
    made.close()


def spread(cluster: Cluster, count: int, prefix: str = "") -> list[str]:
    """``count`` new stream IDs whose keys hash to every node in turn."""
    out: list[str] = []
    while len(out) < count:
        sid = f"{prefix}{uuid.uuid4().hex[:12]}"
        node = cluster.nodes[len(out) % len(cluster.nodes)]
        if cluster.owner(key_slot(keys.log_key(sid).encode())) is node:
            out.append(sid)
    return out


def owner_of(cluster: Cluster, sid: str) -> ClusterNode:
    return cluster.owner(key_slot(keys.log_key(sid).encode()))


def chunk(seq: int, sid: str = "") -> Event:
    return Event(seq, CHUNK, text=f"<{sid[:4]}:{seq}>")


def started(log: ChunkLog, sid: str) -> int:
    log.init(sid)
    return log.claim(sid, "task", 30).attempt


# -- the URL ------------------------------------------------------------------------------------


def test_a_cluster_url_names_seed_nodes_and_their_password() -> None:
    url = ClusterURL.parse("redis+cluster://app:s%40cret@10.0.0.1:7000,10.0.0.2:7001")
    assert url.hosts == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert (url.username, url.password) == ("app", "s@cret")
    assert ClusterURL.parse("redis+cluster://:pw@h:1/0").auth() == {
        "username": None,
        "password": "pw",
    }
    for bad in ("redis+cluster://", "redis+cluster://h", "redis+cluster://h:1/3"):
        with pytest.raises(ValueError):
            ClusterURL.parse(bad)
    with pytest.raises(ValueError, match="celery/celery#2852"):
        broker_settings("redis+cluster://10.0.0.1:7000")
    # relay's data follows REDIS_URL unless RELAY_LOG_REDIS_URL says otherwise.
    assert Settings.from_env({"REDIS_URL": "redis://h:1/0"}).log_redis_url == "redis://h:1/0"
    apart = Settings.from_env(
        {"REDIS_URL": "redis://h:1/0", "RELAY_LOG_REDIS_URL": "redis+cluster://n:7000"}
    )
    assert (apart.broker_url, apart.log_redis_url) == ("redis://h:1/0", "redis+cluster://n:7000")


# -- the worker's group commit ------------------------------------------------------------------


def test_one_appender_writes_streams_on_every_node_exactly(
    cluster: Cluster, client: RedisCluster
) -> None:
    log = ChunkLog(client)
    group = GroupAppender(log)
    sids = spread(cluster, 30, "a")
    assert {owner_of(cluster, s).port for s in sids} == {n.port for n in cluster.nodes}
    streams = [group.open(sid, started(log, sid), 0) for sid in sids]
    for seq in range(1, 61):  # interleaved: each round trip carries many streams, all nodes
        for stream in streams:
            stream.submit(chunk(seq, stream.stream_id))
    for stream in streams:
        stream.submit(Event(61, DONE, message_id="m"))
    for stream in streams:
        stream.flush(timeout=60)
        assert stream.acked == 61
    assert isinstance(group._conn, ClusterPipeline)
    assert len(group._conn.conns) == len(cluster.nodes)  # one pinned connection per node
    for sid in sids:
        events = log.read(sid, 0, 100)
        assert [e.seq for e in events] == list(range(1, 62))
        assert "".join(e.text for e in events) == "".join(f"<{sid[:4]}:{s}>" for s in range(1, 61))
        assert log.state(sid).status == "done"
        # Read on the node that owns the stream: the keys never left their slot.
        node = owner_of(cluster, sid).client()
        assert node.xlen(keys.log_key(sid)) == 61
    # SCAN (the admin commands' check for relay's keys) walks every primary.
    scanned = set(client.scan_iter(match="relay:{a*", count=1000))
    assert {keys.log_key(sid) for sid in sids} <= scanned


def test_appends_follow_a_slot_that_moves_to_another_node(
    cluster: Cluster, client: RedisCluster
) -> None:
    """A stream's slot is migrated while its writer appends: ASK while the keys have moved
    and the slot is still migrating (sent again after ASKING), MOVED once it is done (sent
    again after the slot map is read again). Neither reply ran the append, so nothing is
    written twice or lost."""
    log = ChunkLog(client)
    group = GroupAppender(log)
    (sid,) = spread(cluster, 1, "m")
    stream = group.open(sid, started(log, sid), 0)
    for seq in range(1, 11):
        stream.submit(chunk(seq, sid))
    stream.flush(timeout=30)
    slot = key_slot(keys.log_key(sid).encode())
    source = owner_of(cluster, sid)
    dest = next(n for n in cluster.nodes if n is not source)
    cluster.move_slot(slot, dest, finish=False)  # keys moved, slot migrating: ASK
    for seq in range(11, 21):
        stream.submit(chunk(seq, sid))
    stream.flush(timeout=30)
    assert stream.acked == 20
    cluster.finish_move(slot, dest)  # the slot is dest's: MOVED
    for seq in range(21, 31):
        stream.submit(chunk(seq, sid))
    stream.flush(timeout=30)
    assert stream.acked == 30
    assert owner_of(cluster, sid) is dest
    assert dest.client().xlen(keys.log_key(sid)) == 30
    assert source.client().execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    events = log.read(sid, 0, 100)
    assert [e.seq for e in events] == list(range(1, 31))
    assert "".join(e.text for e in events) == "".join(f"<{sid[:4]}:{s}>" for s in range(1, 31))
    cluster.move_slot(slot, source)  # put it back for the other tests


def test_sharded_pubsub_is_the_default_on_redis_7_and_can_be_turned_off(
    cluster: Cluster, client: RedisCluster
) -> None:
    """auto: the log's scripts SPUBLISH and the hub is sharded; off: both classic; web and
    worker runtimes build both from the same setting."""
    auto = Settings(sharded_pubsub="auto")
    log = ChunkLog(client, sharded=auto.sharded())
    assert log.sharded and "SPUBLISH" in log._append.script
    assert isinstance(make_hub(cluster.url, client, sharded=log.sharded), ShardedHub)
    off = Settings(sharded_pubsub="off")
    log = ChunkLog(client, sharded=off.sharded())
    assert not log.sharded and "SPUBLISH" not in log._append.script
    hub = make_hub(cluster.url, client, sharded=log.sharded)
    assert type(hub) is Hub
    with pytest.raises(ValueError, match="RELAY_SHARDED_PUBSUB"):
        Settings(sharded_pubsub="on")


def test_the_sharded_hub_follows_a_slot_that_moves(cluster: Cluster, client: RedisCluster) -> None:
    """A watched stream's slot moves to another primary: the old owner ends the hub's
    subscription (``sunsubscribe``), the hub subscribes again on the new owner, and the
    viewer gets every event, before, during and after the move, live or from the log."""
    log = ChunkLog(client)
    hub = make_hub(cluster.url, client, queue_size=100_000, check_interval_s=3600)
    assert isinstance(hub, ShardedHub)
    (sid,) = spread(cluster, 1, "s")
    slot = key_slot(keys.log_key(sid).encode())
    source = owner_of(cluster, sid)
    dest = next(n for n in cluster.nodes if n is not source)
    try:
        group = GroupAppender(log)
        stream = group.open(sid, started(log, sid), 0)
        sub = hub.subscribe(sid, 0, threading.Event())
        at_source = f"{source.address}:{source.port}"
        wait_for(lambda: hub._where.get(sid) == at_source and hub._channels[sid].confirmed)
        for seq in range(1, 11):
            stream.submit(chunk(seq, sid))
        stream.flush(timeout=30)
        assert _followed(sub, log, 10) == [f"<{sid[:4]}:{s}>" for s in range(1, 11)]
        cluster.move_slot(slot, dest)
        moved = f"{dest.address}:{dest.port}"

        def confirmed_on(name: str) -> bool:
            return hub._where.get(sid) == name and hub._channels[sid].confirmed

        wait_for(lambda: confirmed_on(moved), timeout=30)
        for seq in range(11, 31):
            stream.submit(chunk(seq, sid))
        stream.flush(timeout=30)
        got = _followed(sub, log, 30)
        assert got == [f"<{sid[:4]}:{s}>" for s in range(1, 31)]
        wait_for(lambda: confirmed_on(moved), timeout=30)
    finally:
        hub.stop()
        cluster.move_slot(slot, source)  # put it back for the other tests


def test_reseed_rebuilds_an_expired_log_in_its_slot(client: RedisCluster) -> None:
    log = ChunkLog(client)
    events = [chunk(1, "rs"), chunk(2, "rs"), Event(3, DONE, message_id="m")]
    log.reseed("rs1", events, "done", 2)
    log.reseed("rs1", [chunk(1, "xx")], "failed", 9)  # exists again: left alone
    assert [e.text for e in log.read("rs1", 0, 10)] == [e.text for e in events]
    state = log.state("rs1")
    assert (state.status, state.attempt, state.last_seq) == ("done", 2, 3)
    now_ms, states = log.states(["rs1", "nothing"])
    assert now_ms > 0 and states[0].status == "done" and states[1].status is None
    types, datas = log.read_columns("rs1", 0, 3)
    assert types == ["chunk", "chunk", "done"] and datas[2] == "m"
    log.forget(["rs1", "nothing"])
    assert not log.exists("rs1")


# -- the hub ------------------------------------------------------------------------------------


def hub_of(sharded: bool, url: str, client: RedisCluster, **options: Any) -> Hub:
    return (ShardedHub if sharded else Hub)(url, client, queue_size=100_000, **options)


@pytest.mark.parametrize("sharded", [False, True], ids=["classic", "sharded"])
def test_the_hub_hears_streams_on_every_node(
    cluster: Cluster, client: RedisCluster, sharded: bool
) -> None:
    """Classic pub/sub: the append script's PUBLISH on a stream's node reaches the hub's one
    connection on whichever node it is. Sharded (Redis 7, the default on such a cluster):
    the script's SPUBLISH stays on the stream's primary, where the hub has a connection."""
    assert sharded_pubsub(client)  # the cluster's Redis 7: sharded unless told otherwise
    log = ChunkLog(client, sharded=sharded)
    hub = hub_of(sharded, cluster.url, client, check_interval_s=3600)
    try:
        sids = spread(cluster, 24, "h")
        viewers = {}
        for sid in sids:
            started(log, sid)
            wake = threading.Event()
            viewers[sid] = (hub.subscribe(sid, 0, wake), wake)
        for sub, wake in viewers.values():  # each channel confirmed: flagged once
            assert wake.wait(30)
            wake.clear()
            assert sub.take() == ([], True, False)
        group = GroupAppender(log)
        streams = [group.open(sid, 1, 0) for sid in sids]
        for seq in range(1, 41):
            for stream in streams:
                stream.submit(chunk(seq, stream.stream_id))
        for stream in streams:
            stream.flush(timeout=60)
        for sid, (sub, _wake) in viewers.items():
            got: list[str] = []

            def heard(sub: Any = sub, got: list[str] = got) -> bool:
                batches, reread, _ = sub.take()
                assert not reread
                got.extend(e.text for b in batches for e in b.events)
                return len(got) >= 40

            wait_for(heard, timeout=30)
            assert got == [f"<{sid[:4]}:{s}>" for s in range(1, 41)]
        hub.check()  # the periodic check's cluster pipeline: nothing missed, writers alive
        assert all(sub.take() == ([], False, False) for sub, _ in viewers.values())
    finally:
        hub.stop()


def _followed(sub: Subscription, log: ChunkLog, last: int) -> list[str]:
    """The texts a viewer of ``sub`` gets up to seq ``last``: the hub's batches, and the log
    when the hub flags that it may have missed something (as web/attach.py does)."""
    got: list[str] = []

    def heard() -> bool:
        batches, reread, _ = sub.take()
        for batch in batches:
            for event in batch.events:
                if event.seq == len(got) + 1:
                    got.append(event.text)
                elif event.seq > len(got) + 1:  # a gap: the log fills it
                    reread = True
        if reread:
            got.extend(e.text for e in log.read(sub.stream_id, len(got), 1000))
        return len(got) >= last

    wait_for(heard, timeout=30)
    return got


def _hub_node(hub: Hub, cluster: Cluster) -> ClusterNode:
    """The node to kill: the classic hub's one connection's; a node the sharded hub has a
    link to (it has one to each)."""
    if isinstance(hub, ShardedHub):
        wait_for(lambda: len(hub._links) == len(cluster.nodes), timeout=30)
        return cluster.nodes[0]
    wait_for(lambda: hub._conn is not None, timeout=30)
    assert hub._conn is not None
    return next(n for n in cluster.nodes if n.port == hub._conn.port)


def _assert_hub_left(hub: Hub, cluster: Cluster, victim: ClusterNode) -> None:
    """The hub is connected to live nodes only."""
    if isinstance(hub, ShardedHub):
        live = {f"{n.address}:{n.port}" for n in cluster.nodes if n is not victim}
        assert set(hub._links) == live
    else:
        assert hub._conn is not None and hub._conn.port != victim.port


@pytest.mark.parametrize("sharded", [False, True], ids=["classic", "sharded"])
def test_a_dead_node_stops_only_its_streams_and_the_hub_goes_on(
    tmp_path: Path, sharded: bool
) -> None:
    """One primary is SIGKILLed (no replica takes over; the others keep serving their
    slots): the streams on the live nodes go on in the same worker's round trips, those on
    the dead node fail once the appender's budget is spent (their appends' outcome unknown,
    never guessed), and the hub's viewers get every event of the live streams, live or from
    the log. Classic: the hub's one connection was on the dead node, and it reconnects to
    another. Sharded: the hub loses only its link to the dead node."""
    cluster = Cluster(tmp_path / "cluster", full_coverage=False).start()
    try:
        client = make_client(cluster.url, max_connections=20, wait_s=5)
        assert isinstance(client, RedisCluster)
        log = ChunkLog(client, sharded=sharded)
        group = GroupAppender(log, budget_s=3)
        sids = spread(cluster, 9, "d")
        hub = hub_of(sharded, cluster.url, client, check_interval_s=1)
        try:
            viewers = {}
            for sid in sids:
                started(log, sid)
                wake = threading.Event()
                viewers[sid] = (hub.subscribe(sid, 0, wake), wake)
            victim = _hub_node(hub, cluster)
            alive = [s for s in sids if owner_of(cluster, s) is not victim]
            doomed = [s for s in sids if owner_of(cluster, s) is victim]
            assert len(alive) == 6 and len(doomed) == 3
            streams = {sid: group.open(sid, 1, 0) for sid in sids}
            for seq in range(1, 11):
                for stream in streams.values():
                    stream.submit(chunk(seq, stream.stream_id))
            for stream in streams.values():
                stream.flush(timeout=30)
            victim.kill()
            for seq in range(11, 21):
                for stream in streams.values():
                    stream.submit(chunk(seq, stream.stream_id))
            for sid in alive:
                streams[sid].flush(timeout=60)
                assert streams[sid].acked == 20
            for sid in doomed:
                with pytest.raises(LogUnavailable):
                    streams[sid].flush(timeout=60)
                assert streams[sid].acked == 10
            for sid in alive:
                got = _followed(viewers[sid][0], log, 20)
                assert got == [f"<{sid[:4]}:{s}>" for s in range(1, 21)]
                assert [e.seq for e in log.read(sid, 0, 100)] == list(range(1, 21))
            _assert_hub_left(hub, cluster, victim)
        finally:
            hub.stop()
    finally:
        cluster.stop()


def test_answers_stream_on_through_a_primary_failover(tmp_path: Path) -> None:
    """Three primaries with a replica each. While one worker appender writes streams on
    every node, a primary is SIGKILLed and its replica promoted by the cluster: the
    appender rides out the CLUSTERDOWN and the lost connection (reading back what it does
    not know), follows the slots to the promoted replica, refills what asynchronous
    replication lost, and every log ends whole: each seq once, in order, the right text.
    The hub's viewers get every event too, live or from the log."""
    cluster = Cluster(tmp_path / "cluster", replicas=True).start()
    try:
        client = make_client(cluster.url, max_connections=20, wait_s=5)
        assert isinstance(client, RedisCluster)
        log = ChunkLog(client)
        group = GroupAppender(log)
        sids = spread(cluster, 9, "f")
        hub = make_hub(cluster.url, client, queue_size=100_000, check_interval_s=1)
        assert isinstance(hub, ShardedHub) and log.sharded  # Redis 7: sharded pub/sub
        try:
            viewers = {}
            for sid in sids:
                started(log, sid)
                viewers[sid] = hub.subscribe(sid, 0, threading.Event())
            streams = [group.open(sid, 1, 0) for sid in sids]
            total = 150
            written = threading.Event()

            def write() -> None:
                for seq in range(1, total + 1):
                    for stream in streams:
                        stream.submit(chunk(seq, stream.stream_id))
                    threading.Event().wait(0.02)
                written.set()

            writer = threading.Thread(target=write, daemon=True)
            writer.start()
            wait_for(lambda: min(st.acked for st in streams) >= 30, timeout=30)
            victim = owner_of(cluster, sids[0])
            victim.kill()
            cluster.wait_promoted(victim, key_slot(keys.log_key(sids[0]).encode()))
            assert written.wait(120)
            for stream in streams:
                stream.flush(timeout=120)
                assert stream.acked == total
            for sid in sids:
                events = log.read(sid, 0, 1000)
                assert [e.seq for e in events] == list(range(1, total + 1))
                assert [e.text for e in events] == [f"<{sid[:4]}:{s}>" for s in range(1, total + 1)]
                got = _followed(viewers[sid], log, total)
                assert got == [f"<{sid[:4]}:{s}>" for s in range(1, total + 1)]
        finally:
            hub.stop()
    finally:
        cluster.stop()


# -- the whole stack --------------------------------------------------------------------------


def _read_all(client: Client, sid: str, events: list[dict[str, Any]], after: int = 0) -> None:
    """Read the stream to its terminal event, re-attaching with after=<last> when the
    connection ends."""
    while not events or events[-1]["type"] not in {"done", "cancelled", "error"}:
        last = events[-1]["seq"] if events else after
        events += client.attach(sid, after=last, timeout=90).events


def _celery(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "celery"), "-A", "workers", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip


@contextmanager
def cluster_stack(
    cluster: Cluster, tmp_path: Path
) -> Iterator[tuple[dict[str, str], EmbeddedRedis, Client, list[Proc]]]:
    """A web process and a worker with relay's data on ``cluster`` and Celery's broker on a
    plain Redis of their own: (environment, broker, client, processes)."""
    broker = EmbeddedRedis(tmp_path / "broker").start()
    procs: list[Proc] = []
    try:
        with migrated_database("sqlite", tmp_path) as database_url:
            env = stack_env(broker.url, database_url)
            env["RELAY_LOG_REDIS_URL"] = cluster.url
            port = free_port()
            procs.append(start_worker(env, tmp_path, "c1", concurrency=16))
            procs.append(start_web(env, port, tmp_path))
            yield env, broker, Client(f"http://127.0.0.1:{port}"), procs
    finally:
        for proc in procs:
            if proc.name.startswith("worker"):
                proc.kill()
            proc.stop()
        broker.stop()


def post_on_every_node(
    client: Client, cluster: Cluster, at_least: int, text: str
) -> list[dict[str, Any]]:
    """Post ``text`` (``{}``: a number) at least ``at_least`` times, and on until every node
    owns one of the answers (stream ids are random: 12 posts leave a node without any 2 % of
    the time; 40, one time in 3 million)."""
    nodes = {n.port for n in cluster.nodes}
    posted: list[dict[str, Any]] = []
    owners: set[int] = set()
    while len(posted) < at_least or (owners != nodes and len(posted) < 40):
        posted.append(client.post_chat(text.format(len(posted))))
        owners.add(owner_of(cluster, posted[-1]["streamId"]).port)
    assert owners == nodes, f"{len(posted)} random streams, {len(nodes)} nodes"
    return posted


@pytest.mark.timeout(300)
def test_a_stack_on_the_cluster_serves_posts_resumes_cancels_and_a_retry(
    cluster: Cluster, tmp_path: Path
) -> None:
    with cluster_stack(cluster, tmp_path) as (env, broker, client, _procs):
        text = "Cluster answer {} [demo:words=60] [demo:rate=60]"
        posted = post_on_every_node(client, cluster, 12, text)
        sids = [p["streamId"] for p in posted]
        # Two viewers per answer: one from the start, one that drops after 5 events and
        # resumes with after=<its last seq>.
        whole: dict[str, list[dict[str, Any]]] = {sid: [] for sid in sids}
        resumed: dict[str, list[dict[str, Any]]] = {}
        readers = [
            threading.Thread(target=_read_all, args=(client, sid, whole[sid]), daemon=True)
            for sid in sids
        ]
        for reader in readers:
            reader.start()
        for sid in sids:
            first = client.attach(sid, until=lambda a: len(a.events) >= 5, timeout=60)
            resumed[sid] = list(first.events)
            _read_all(client, sid, resumed[sid], after=first.events[-1]["seq"])
        for reader in readers:
            reader.join(120)
            assert not reader.is_alive()
        for p, sid in zip(posted, sids, strict=True):
            answer = client.answer(p["chatId"])
            for events in (whole[sid], resumed[sid]):
                assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
                assert events[-1]["type"] == "done"
                assert chunk_text(events) == answer["content"]
            assert answer["status"] == "complete"

        # Cancel a long answer mid-way, then retry it from the admin command line.
        long = client.post_chat("Cancel me on the cluster [demo:words=400] [demo:rate=40]")
        sid = long["streamId"]
        seen = client.attach(sid, until=lambda a: len(a.events) >= 10, timeout=60)
        resp = client.request("POST", f"/api/v1/streams/{sid}/cancel")
        assert resp.status_code == 202, resp.text
        first_part = list(seen.events)
        _read_all(client, sid, first_part, after=seen.events[-1]["seq"])
        assert first_part[-1]["type"] == "cancelled"
        out = _celery(env, "streams", "retry", sid).stdout
        assert "retrying" in out
        rest = client.attach(sid, after=first_part[-1]["seq"], timeout=120)
        assert rest.events[0]["type"] == "resumed"
        events = first_part + rest.events
        while events[-1]["type"] not in {"done", "error"}:
            events += client.attach(sid, after=events[-1]["seq"], timeout=120).events
        assert events[-1]["type"] == "done"
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert chunk_text(events) == client.answer(long["chatId"])["content"]
        assert client.attach(sid).events == events  # a fresh viewer: the whole history
        listed = _celery(env, "streams", "list", "--status", "done").stdout
        assert sid in listed
        shown = json.loads(_celery(env, "streams", "show", sid).stdout)
        assert shown["status"] == "done"
        # Nothing of relay's went to the broker's Redis.
        plain = make_client(broker.url)
        assert not list(plain.scan_iter(match="relay:*"))


@pytest.mark.timeout(300)
def test_a_stack_streams_on_through_a_primary_failover(tmp_path: Path) -> None:
    """A web process (gevent, sharded hub) and a worker on a cluster of three primaries with a
    replica each: while answers on every primary stream to their viewers, one primary is
    SIGKILLed and the cluster promotes its replica. Every viewer gets one gapless answer,
    ending done, equal to what is stored; the web process's sharded hub lost only the dead
    primary's link, and never had to start over."""
    cluster = Cluster(tmp_path / "cluster", replicas=True).start()
    try:
        with cluster_stack(cluster, tmp_path) as (_env, _broker, client, procs):
            text = "Failover answer {} [demo:words=200] [demo:rate=25]"
            posted = post_on_every_node(client, cluster, 6, text)
            sids = [p["streamId"] for p in posted]
            events: dict[str, list[dict[str, Any]]] = {sid: [] for sid in sids}
            readers = [
                threading.Thread(target=_read_all, args=(client, sid, events[sid]), daemon=True)
                for sid in sids
            ]
            for reader in readers:
                reader.start()
            wait_for(lambda: all(len(e) >= 10 for e in events.values()), timeout=60)
            victim = owner_of(cluster, sids[0])
            victim.kill()
            promoted = cluster.wait_promoted(victim, key_slot(keys.log_key(sids[0]).encode()))
            for reader in readers:
                reader.join(180)
                assert not reader.is_alive()
            for p, sid in zip(posted, sids, strict=True):
                got = events[sid]
                answer = client.answer(p["chatId"])
                assert [e["seq"] for e in got] == list(range(1, len(got) + 1)), sid
                assert got[-1]["type"] == "done", got[-1]
                assert chunk_text(got) == answer["content"]
                assert answer["status"] == "complete"
            web_log = procs[1].output()
            assert f"hub lost {victim.address}:{victim.port}" in web_log
            assert "sharded hub failed" not in web_log
            assert promoted.alive()
    finally:
        cluster.stop()
