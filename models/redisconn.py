"""Redis clients: a blocking pool (never raises past its size) shared per process, on a
plain Redis server, on the master that Redis Sentinel names, or on a Redis Cluster.

A Sentinel deployment is given as one URL (redis-py offers Sentinel only through code)::

    redis+sentinel://[[user]:password@]host:port[,host:port...]/<master name>[/<db>][?options]

The hosts are the sentinels; user and password are the master's (and the sentinels' too,
unless ``sentinel_password`` / ``sentinel_username`` is given). Every connection asks the
sentinels for the master's address when it connects, so after a failover each client (pool,
pinned connection, subscriber) reaches the new master on its next reconnect, and a demoted
master's ``READONLY`` reply is turned into a connection error, which relay already rides out.

A Redis Cluster (for relay's own data only: Celery cannot use one) is given by seed nodes::

    redis+cluster://[[user]:password@]host:port[,host:port...][/0]

``make_client`` builds a ``redis.cluster.RedisCluster`` for it (every node's pool blocking like
``make_redis``'s), and ``pipeliner`` gives the worker's appender a ``ClusterPipeline`` in
place of its ``PinnedConnection``: one pinned connection per node, each round trip split by
slot and sent to every node before any reply is read.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from queue import Empty, LifoQueue
from typing import Any
from urllib.parse import parse_qs, quote, unquote

import redis
import redis.utils
from hiredis import pack_command as _pack_command
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MaxConnectionsError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPoolProxy, SentinelManagedConnection

from models.db import OUTAGE_ERRORS

log = logging.getLogger("relay.redis")
SENTINEL_SCHEME = "redis+sentinel://"
CLUSTER_SCHEME = "redis+cluster://"
# What relay's own data lives on: one server (or Sentinel's master), or a cluster.
RedisClient = redis.Redis | RedisCluster
# A backend that is down or restarting (Redis's "loading the dataset" is a ConnectionError).
OUTAGES: tuple[type[Exception], ...] = (*OUTAGE_ERRORS, RedisConnectionError, RedisTimeoutError)


def described(exc: BaseException) -> str:
    """An exception in one line of a log: its class and the start of its message. An
    outage fails every request for a while, and the same traceback for each buries the log:
    those are logged as this line alone (anything else keeps its traceback)."""
    return f"{type(exc).__name__}: {str(exc)[:200]}"


class PoolExhausted(MaxConnectionsError):
    """Every connection of the pool stayed in use for the whole wait: the process is
    overloaded (a burst of viewers, a saturated event loop), which says nothing about Redis.
    A ConnectionError still, so code that retries on those retries on this too (and a
    MaxConnectionsError, which a cluster client does not take for a failed node)."""


class _FreeConnections(LifoQueue[Any]):
    """The pool's free list. redis-py raises the same ConnectionError for "no free
    connection after the wait" as for "Redis refused the connection"; this tells them apart
    (a checkout is the only blocking ``get`` the pool makes)."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        try:
            return super().get(block, timeout)
        except Empty:
            raise PoolExhausted(f"no free Redis connection within {timeout} s") from None


@dataclass(frozen=True)
class SentinelURL:
    """A ``redis+sentinel://`` URL, taken apart."""

    hosts: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelURL:
        if not url.startswith(SENTINEL_SCHEME):
            raise ValueError(f"not a {SENTINEL_SCHEME} URL")
        rest, _, query = url[len(SENTINEL_SCHEME) :].partition("?")
        netloc, _, path = rest.partition("/")
        userinfo, _, hostlist = netloc.rpartition("@")
        username = password = None
        if userinfo:
            user, _, pw = userinfo.partition(":")
            username, password = unquote(user) or None, unquote(pw) or None
        hosts = tuple(_host_port(h) for h in hostlist.split(",") if h)
        parts = [p for p in path.split("/") if p]
        if not hosts or not parts or len(parts) > 2:
            raise ValueError(
                f"expected {SENTINEL_SCHEME}host:port[,host:port...]/<master name>[/<db>]"
            )
        options = {k: v[-1] for k, v in parse_qs(query).items()}
        return cls(
            hosts=hosts,
            master=unquote(parts[0]),
            db=int(parts[1]) if len(parts) == 2 else 0,
            username=username,
            password=password,
            sentinel_username=options.get("sentinel_username", username),
            sentinel_password=options.get("sentinel_password", password),
        )

    def kombu(self) -> tuple[str, dict[str, Any]]:
        """The same deployment as kombu's broker URL (``sentinel://`` hosts joined by ``;``)
        and the transport options it needs (the master's name, the sentinels' password)."""
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        url = ";".join(f"sentinel://{auth}{host}:{port}/{self.db}" for host, port in self.hosts)
        options: dict[str, Any] = {"master_name": self.master}
        if self.sentinel_password is not None:
            sentinel_kwargs: dict[str, Any] = {"password": self.sentinel_password}
            if self.sentinel_username:
                sentinel_kwargs["username"] = self.sentinel_username
            options["sentinel_kwargs"] = sentinel_kwargs
        return url, options


@dataclass(frozen=True)
class ClusterURL:
    """A ``redis+cluster://`` URL, taken apart: seed nodes (any of the cluster's nodes; the
    client learns the others from them) and the nodes' user and password."""

    hosts: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> ClusterURL:
        if not url.startswith(CLUSTER_SCHEME):
            raise ValueError(f"not a {CLUSTER_SCHEME} URL")
        rest = url[len(CLUSTER_SCHEME) :].partition("?")[0]
        netloc, _, path = rest.partition("/")
        userinfo, _, hostlist = netloc.rpartition("@")
        username = password = None
        if userinfo:
            user, _, pw = userinfo.partition(":")
            username, password = unquote(user) or None, unquote(pw) or None
        hosts = tuple(_host_port(h, "node") for h in hostlist.split(",") if h)
        if not hosts or path.strip("/") not in ("", "0"):
            raise ValueError(
                f"expected {CLUSTER_SCHEME}host:port[,host:port...] (a cluster has database 0 only)"
            )
        return cls(hosts=hosts, username=username, password=password)

    def auth(self) -> dict[str, Any]:
        return {"username": self.username, "password": self.password}


def _host_port(text: str, what: str = "sentinel") -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"a {what} is host:port, not {text!r}")
    return host.strip("[]"), int(port)


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME)


def is_cluster(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEME)


def broker_settings(url: str) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL for relay's Redis URL, and transport options to add."""
    if is_cluster(url):
        raise ValueError(
            "Celery cannot use a Redis Cluster as its broker (celery/celery#2852): set "
            "REDIS_URL or CELERY_BROKER_URL to a plain Redis or Sentinel, and "
            "RELAY_LOG_REDIS_URL to the cluster"
        )
    return SentinelURL.parse(url).kombu() if is_sentinel(url) else (url, {})


@functools.cache
def _sentinels(url: str) -> Sentinel:
    """One Sentinel manager per URL and process: the sentinels' own connections."""
    parsed = SentinelURL.parse(url)
    kwargs: dict[str, Any] = {"socket_connect_timeout": 2, "socket_timeout": 2}
    if parsed.sentinel_password is not None:
        kwargs["password"] = parsed.sentinel_password
        if parsed.sentinel_username:
            kwargs["username"] = parsed.sentinel_username
    make: Any = Sentinel  # untyped before redis-py 8.2, typed since: one spelling for both
    sentinel: Sentinel = make(list(parsed.hosts), sentinel_kwargs=kwargs)
    return sentinel


def connection_pool(
    url: str, pool_class: type[redis.ConnectionPool] = redis.ConnectionPool, **options: Any
) -> redis.ConnectionPool:
    """A pool of ``pool_class`` for ``url``: from the URL as redis-py reads it, or, for a
    ``redis+sentinel://`` URL, of connections that find the master through the sentinels
    each time they connect (redis-py's own Sentinel connection, in any kind of pool)."""
    if not is_sentinel(url):
        return pool_class.from_url(url, **options)
    parsed = SentinelURL.parse(url)
    options.update(db=parsed.db, username=parsed.username, password=parsed.password)
    pool = pool_class(connection_class=SentinelManagedConnection, **options)
    proxy = SentinelConnectionPoolProxy(  # type: ignore[no-untyped-call]
        connection_pool=pool,
        is_master=True,
        check_connection=False,
        service_name=parsed.master,
        sentinel_manager=_sentinels(url),
    )
    pool.connection_kwargs["connection_pool"] = proxy
    return pool


def make_redis(url: str, max_connections: int = 200, wait_s: float = 60.0) -> redis.Redis:
    """A client whose pool waits for a free connection instead of raising.

    Under a burst (a thousand viewers attaching at once) a checkout may wait while the
    event loop serves everyone ahead of it: ``wait_s`` bounds that wait and should be
    longer than any realistic burst, so that only an overloaded process gives up (with
    PoolExhausted). A Redis that is down fails each connection attempt on its own, at once
    (refused) or after ``socket_connect_timeout``, whatever the wait."""
    pool = connection_pool(
        url,
        redis.BlockingConnectionPool,
        max_connections=max_connections,
        timeout=wait_s,
        queue_class=_FreeConnections,
        decode_responses=True,
        health_check_interval=30,
        socket_connect_timeout=5,
    )
    return redis.Redis(connection_pool=pool)


def make_cluster(url: str, max_connections: int = 200, wait_s: float = 60.0) -> RedisCluster:
    """A Redis Cluster client for a ``redis+cluster://`` URL, with ``make_redis``'s pool
    behaviour on every node (a checkout waits up to ``wait_s``). It does not retry a failed
    command itself (like ``make_redis``'s client): a connection error refreshes its slot map
    and is raised, so the next command goes to the node that owns the slot then. MOVED and
    ASK replies are followed by redis-py."""
    parsed = ClusterURL.parse(url)
    first, *others = parsed.hosts
    return RedisCluster(
        # A URL makes redis-py build each node's pool from connection_pool_class.
        url=f"redis://{first[0]}:{first[1]}/0",
        startup_nodes=[ClusterNode(host, port) for host, port in others],  # type: ignore[no-untyped-call]
        retry=Retry(NoBackoff(), 0),
        connection_pool_class=redis.BlockingConnectionPool,
        max_connections=max_connections,
        timeout=wait_s,
        queue_class=_FreeConnections,
        decode_responses=True,
        socket_connect_timeout=5,
        **parsed.auth(),
    )


def make_client(url: str, max_connections: int = 200, wait_s: float = 60.0) -> RedisClient:
    """``make_cluster``'s client for a ``redis+cluster://`` URL, else ``make_redis``'s."""
    if is_cluster(url):
        return make_cluster(url, max_connections, wait_s)
    return make_redis(url, max_connections, wait_s)


def server_time_ms(client: RedisClient) -> int:
    """Redis's clock in ms (on a cluster: the clock of whichever node answers)."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


# A script's call as a raw command (``EVALSHA`` and its arguments), and the same call made
# through its redis-py ``Script``, which loads the script when the server lost it.
ScriptCall = tuple[list[Any], Callable[[], Any]]


def run_together(client: RedisClient, calls: Sequence[ScriptCall]) -> list[Any]:
    """Send script calls in one round trip (a pipeline, not a transaction; on a cluster, split
    by slot and sent to every node before a reply is read). A ``NoScriptError`` reply (the
    server restarted or was flushed) is answered by that call's own ``Script`` call. Error
    replies are returned in place of the replies; a connection error raises. (A redis-py
    ``Script`` on a pipeline would cost a ``SCRIPT EXISTS`` round trip on every execute.)"""
    pipe = client.pipeline(transaction=False)
    for command, _ in calls:
        pipe.execute_command(*command)
    replies = pipe.execute(raise_on_error=False)
    out: list[Any] = []
    for reply, (_, again) in zip(replies, calls, strict=True):
        if isinstance(reply, NoScriptError):
            try:
                reply = again()
            except (redis.RedisError, RedisClusterException) as exc:
                reply = exc
        out.append(reply)
    return out


def sharded_pubsub(client: RedisClient) -> bool:
    """Whether relay's live channels use sharded pub/sub (``SPUBLISH``, ``SSUBSCRIBE``): on a
    Redis Cluster whose primaries all run Redis 7 or later. A classic ``PUBLISH`` on a
    cluster is copied over the cluster bus to every node (each node's CPU, and milliseconds
    of delay for a subscriber on another node); a sharded one stays on the channel's
    primary. Asked once per ``ChunkLog`` and hub, so web and worker processes agree."""
    if not isinstance(client, RedisCluster):
        return False
    try:
        infos = client.info("server", target_nodes=RedisCluster.PRIMARIES)
    except (redis.RedisError, RedisClusterException):
        log.warning("could not ask the cluster's version; assuming Redis 7 (sharded pub/sub)")
        return True
    versions = [str(info.get("redis_version", "0")) for info in infos.values()]
    return all(int(v.split(".")[0]) >= 7 for v in versions)


def node_pool(url: str, host: str, port: int, **options: Any) -> redis.ConnectionPool:
    """A pool of connections to one node of the cluster of ``url`` (its credentials)."""
    auth = ClusterURL.parse(url).auth()
    return redis.ConnectionPool(host=host, port=port, **auth, **options)


def subscriber_pool(
    url: str, client: RedisClient, pick: int, refresh: bool, **options: Any
) -> redis.ConnectionPool:
    """A pool for one pub/sub connection (the hub's). On a cluster, to one of its nodes (the
    ``pick``-th, round the nodes ``client`` knows and the seeds; a classic PUBLISH reaches
    every node, so any will do), after refreshing the slot map when ``refresh`` (the last
    connection failed: the node may be gone)."""
    if not isinstance(client, RedisCluster):
        return connection_pool(url, **options)
    if refresh:  # when no node answers now: the seeds and the nodes known before
        with contextlib.suppress(redis.RedisError, RedisClusterException):
            client.nodes_manager.initialize()
    nodes = [(n.host, n.port) for n in client.get_nodes()]  # type: ignore[no-untyped-call]
    nodes += [h for h in ClusterURL.parse(url).hosts if h not in nodes]
    host, port = nodes[pick % len(nodes)]
    return node_pool(url, host, port, **options)


def _lib_version_once() -> None:
    """redis-py 8 reads its own version from the package metadata (disk, email parsing:
    about 240 µs here) for every connection it creates, in relay's pools and in kombu's
    alike: a thousand viewers attaching at once, or two hundred tasks acknowledged together
    (kombu's pool grows), paid for it hundreds of times on the event loop. The version
    cannot change in a running process: resolve it once (redis-py looks the function up in
    ``redis.utils`` at each call)."""
    lookup = redis.utils.get_lib_version
    if not hasattr(lookup, "cache_info"):  # not already cached (a second import)
        redis.utils.get_lib_version = functools.cache(lookup)


_lib_version_once()


def make_blocking_client(url: str, block_s: float) -> redis.Redis:
    """A single-connection client for long ``XREAD BLOCK`` calls (socket timeout above BLOCK)."""
    pool = connection_pool(
        url, decode_responses=True, socket_timeout=block_s + 10, socket_connect_timeout=5
    )
    return redis.Redis(connection_pool=pool, single_connection_client=True)


def pack_commands(conn: Any, commands: Sequence[Sequence[Any]]) -> bytes:
    """``commands`` in Redis's protocol, the bytes redis-py's ``pack_commands`` writes, each
    packed by hiredis in C as it is given. redis-py's packer first runs its encoder over every
    argument in Python: 19.7 us for an append of three streams, against 3.0 here (the
    worker's every round trip). An argument hiredis does not take (None, a bool) or a
    command name of several words goes to redis-py's packer, which says what is wrong or
    splits the name."""
    try:
        if all(" " not in command[0] for command in commands):
            return b"".join([_pack_command(tuple(command)) for command in commands])
    except TypeError:
        pass
    return b"".join(conn.pack_commands(commands))


class PinnedConnection:
    """One connection of a client's kind, held by one owner that sends a pipeline many times
    a second (the worker's appender): no pool checkout, pid check or lock per round trip
    (those were a tenth of a busy worker's CPU). Not thread-safe: one owner.

    Like the pool at checkout, it makes sure a connection that sat idle (``recheck_idle_s``)
    was not closed meanwhile (a Redis restart, a server timeout) before sending on it, and
    dials again if it was; a busy connection is not polled before every round trip."""

    def __init__(self, client: redis.Redis, recheck_idle_s: float = 1.0) -> None:
        pool = client.connection_pool
        # No retries inside (not even while connecting): whether a failed round trip may be
        # sent again is its owner's call (an append may have run), and so is how long to try.
        kwargs = {**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
        self.conn = pool.connection_class(**kwargs)
        self.recheck_idle_s = recheck_idle_s
        self.used_at = 0.0

    def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send ``commands`` in one write; return a reply per command (a ResponseError in
        place of a command that failed). Raises the connection's errors at once."""
        self.send(commands)
        return self.read(len(commands))

    def send(self, commands: Sequence[Sequence[Any]]) -> None:
        """The first half of ``pipeline``: write ``commands`` (``read`` their replies)."""
        conn = self.conn
        now = time.monotonic()
        if now - self.used_at >= self.recheck_idle_s:
            self._drop_if_closed()
        self.used_at = now
        try:
            if conn._sock is None:
                # Dial through connect(): sending on an unconnected connection would dial
                # without it, and so without asking the sentinels for the master (redis-py's
                # SentinelManagedConnection only overrides connect()).
                conn.connect()
            packed = pack_commands(conn, commands)
            # One send() writes a round trip whole nearly always, where gevent's sendall()
            # also asks the kernel for SO_SNDBUF and arms a timer every time. The rest of a
            # partial write, or a write that failed, goes through redis-py's own, which
            # reports a failure as it always has (no health check halfway through a command).
            try:
                sent = conn._sock.send(packed)
            except TimeoutError as exc:
                if exc.errno is not None:  # the OS's ETIMEDOUT: a dead connection
                    raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
                raise RedisTimeoutError("Timeout writing to socket") from None  # the socket's own
            except OSError:
                sent = 0
            if sent < len(packed):
                conn.send_packed_command([packed[sent:]], check_health=False)
        except Exception:
            conn.disconnect()  # never send on a connection left mid-reply
            raise

    def read(self, count: int) -> list[Any]:
        """The second half of ``pipeline``: the replies to the ``count`` commands sent."""
        conn = self.conn
        replies: list[Any] = []
        try:
            for _ in range(count):
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
        except Exception:
            conn.disconnect()
            raise
        return replies

    def _drop_if_closed(self) -> None:
        conn = self.conn
        if conn._sock is None:  # not connected yet: sending dials
            return
        try:
            closed = conn.can_read()  # an idle connection has nothing to read unless closed
        except (RedisConnectionError, RedisTimeoutError, OSError):
            closed = True
        if closed:
            conn.disconnect()


class ClusterUnavailable(RedisConnectionError):
    """A command of a cluster round trip whose outcome is unknown: its node did not answer
    (it may have run), no node owns its slot (CLUSTERDOWN), its slot is being moved
    (TRYAGAIN) or its redirects did not settle. A ConnectionError, so callers treat it as
    they treat a lost connection to a single Redis."""


# Replies that mean "not run here, not now": the command's outcome is reported unknown.
_NOT_RUN = (TryAgainError, ClusterDownError)
MAX_REDIRECTS = 5


def _key_of(command: Sequence[Any]) -> Any:
    """The key a command touches first (its slot is the command's): EVAL/EVALSHA name it
    after the script and the key count, other commands first. None: a keyless command."""
    name = str(command[0]).upper()
    if name in ("EVALSHA", "EVAL"):
        return command[3] if int(command[2]) > 0 else None
    if name == "WAIT":
        return None
    return command[1]


class ClusterPipeline:
    """``PinnedConnection`` for a Redis Cluster: a pinned connection per node, and a round
    trip that splits the commands by slot, writes each node's share, then reads every reply.

    Keyed commands go to the master that owns their slot in the client's slot map. A keyless
    command (``WAIT``) goes to every node of the round trip, and its reply is the smallest.
    A MOVED reply (the command did not run) refreshes the slot map and sends the command
    again to its new owner; an ASK reply sends it to the node named, after ``ASKING``.

    Unlike ``PinnedConnection``, trouble with one node does not fail the others' commands:
    a command whose node did not answer, or that was answered CLUSTERDOWN or TRYAGAIN, gets a
    ``ClusterUnavailable`` as its reply (its outcome is unknown to the caller, exactly as
    after a lost connection to a single Redis), and the slot map is refreshed before the
    next round trip. Nothing is raised for that."""

    def __init__(self, client: RedisCluster, recheck_idle_s: float = 1.0) -> None:
        self.client = client
        self.recheck_idle_s = recheck_idle_s
        self.conns: dict[str, PinnedConnection] = {}
        self._stale = False  # refresh the slot map before the next round trip

    def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        replies: list[Any] = [None] * len(commands)
        if self._stale and (down := self._refresh()) is not None:
            return [down] * len(commands)
        keyed = [i for i, c in enumerate(commands) if _key_of(c) is not None]
        keyless = [i for i, c in enumerate(commands) if _key_of(c) is None]
        routes = self._route(commands, keyed, replies)
        asking: dict[str, list[int]] = {}
        for _ in range(MAX_REDIRECTS):
            self._round(commands, routes, asking, keyless, replies)
            keyless = []  # WAIT was answered by the nodes of the first send
            moved, asking = self._redirects(keyed, replies)
            routes = {}
            if moved:
                if (down := self._refresh()) is not None:
                    for i in moved:
                        replies[i] = down
                else:
                    routes = self._route(commands, moved, replies)
            if not routes and not asking:
                return replies
        for i in keyed:
            if isinstance(replies[i], AskError):  # MOVED too
                replies[i] = ClusterUnavailable(f"redirected more than {MAX_REDIRECTS} times")
        self._stale = True
        return replies

    def _redirects(
        self, keyed: list[int], replies: list[Any]
    ) -> tuple[list[int], dict[str, list[int]]]:
        """The commands answered MOVED, and those answered ASK by the node they go to; a
        CLUSTERDOWN or TRYAGAIN reply becomes unknown (``ClusterUnavailable``)."""
        moved: list[int] = []
        asking: dict[str, list[int]] = {}
        for i in keyed:
            reply = replies[i]
            if isinstance(reply, _NOT_RUN):
                self._stale = True
                replies[i] = ClusterUnavailable(f"the cluster answered: {reply}")
            elif isinstance(reply, MovedError):
                moved.append(i)
            elif isinstance(reply, AskError):
                asking.setdefault(f"{reply.host}:{reply.port}", []).append(i)
        return moved, asking

    def _route(
        self, commands: Sequence[Sequence[Any]], indices: list[int], replies: list[Any]
    ) -> dict[str, list[int]]:
        """The nodes that own the commands' slots (a command no node owns: unknown)."""
        routes: dict[str, list[int]] = {}
        for i in indices:
            slot = self.client.keyslot(_key_of(commands[i]))  # type: ignore[no-untyped-call]
            try:
                node = self.client.nodes_manager.get_node_from_slot(slot)
            except RedisClusterException as exc:  # no node owns it, as far as the map knows
                self._stale = True
                replies[i] = ClusterUnavailable(str(exc))
                continue
            routes.setdefault(str(node.name), []).append(i)
        return routes

    def _refresh(self) -> ClusterUnavailable | None:
        """Read the slot map again; the error when no node answered."""
        try:
            self.client.nodes_manager.initialize()
        except (redis.RedisError, RedisClusterException) as exc:
            self._stale = True
            return ClusterUnavailable(f"no node of the cluster answered: {exc}")
        self._stale = False
        known = {n.name for n in self.client.get_nodes()}  # type: ignore[no-untyped-call]
        for name in [n for n in self.conns if n not in known]:
            self.conns.pop(name).conn.disconnect()
        return None

    def _conn(self, name: str) -> PinnedConnection | None:
        pinned = self.conns.get(name)
        if pinned is None:
            node = self.client.get_node(node_name=name)  # type: ignore[no-untyped-call]
            if node is None and self._refresh() is None:  # an ASK to a node not listed yet
                node = self.client.get_node(node_name=name)  # type: ignore[no-untyped-call]
            if node is None:
                return None
            redis_node = self.client.get_redis_connection(node)
            pinned = self.conns[name] = PinnedConnection(redis_node, self.recheck_idle_s)
        return pinned

    def _round(
        self,
        commands: Sequence[Sequence[Any]],
        routes: dict[str, list[int]],
        asking: dict[str, list[int]],
        keyless: list[int],
        replies: list[Any],
    ) -> None:
        """Write every node's share, then read every node's replies into ``replies``."""
        sent = []
        for name in {*routes, *asking}:
            batch, targets = self._share(
                commands, routes.get(name, []), asking.get(name, []), keyless
            )
            try:
                pinned = self._conn(name)
                if pinned is None:
                    raise ClusterUnavailable(f"the cluster named {name}, a node it does not list")
                pinned.send(batch)
                sent.append((pinned, batch, targets))
            except Exception as exc:  # this node's commands only; the others go on
                self._lost(exc, targets, replies)
        waits: dict[int, list[Any]] = {}
        for pinned, batch, targets in sent:
            try:
                got = pinned.read(len(batch))
            except Exception as exc:
                self._lost(exc, targets, replies)
                continue
            for (i, kind), reply in zip(targets, got, strict=True):
                if kind == "keyed":
                    replies[i] = reply
                elif kind == "keyless":
                    waits.setdefault(i, []).append(reply)
        for i, got in waits.items():  # WAIT: the fewest replicas any node reached
            counts = [r for r in got if isinstance(r, int)]
            replies[i] = min(counts) if len(counts) == len(got) else got[0]

    def _lost(self, exc: Exception, targets: list[tuple[int, str]], replies: list[Any]) -> None:
        """A node failed mid round trip: its commands' outcomes are unknown."""
        self._stale = True
        error = exc if isinstance(exc, ClusterUnavailable) else ClusterUnavailable(
            f"a node of the cluster failed: {exc}"
        )  # fmt: skip
        for i, kind in targets:
            if kind != "asking" and (replies[i] is None or isinstance(replies[i], AskError)):
                replies[i] = error

    @staticmethod
    def _share(
        commands: Sequence[Sequence[Any]], routed: list[int], asked: list[int], keyless: list[int]
    ) -> tuple[list[Sequence[Any]], list[tuple[int, str]]]:
        """One node's commands, and where each reply goes (ASKING's OK goes nowhere)."""
        batch: list[Sequence[Any]] = []
        targets: list[tuple[int, str]] = []
        for i in asked:
            batch += [["ASKING"], commands[i]]
            targets += [(-1, "asking"), (i, "keyed")]
        for i in routed:
            batch.append(commands[i])
            targets.append((i, "keyed"))
        if routed:
            batch += [commands[i] for i in keyless]
            targets += [(i, "keyless") for i in keyless]
        return batch, targets


def pipeliner(
    client: RedisClient, recheck_idle_s: float = 1.0
) -> PinnedConnection | ClusterPipeline:
    """The appender's round-trip sender for ``client``: a ``PinnedConnection`` on one
    server (no slot is ever computed there), a ``ClusterPipeline`` on a cluster."""
    if isinstance(client, RedisCluster):
        return ClusterPipeline(client, recheck_idle_s)
    return PinnedConnection(client, recheck_idle_s)
