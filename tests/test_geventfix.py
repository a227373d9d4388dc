"""gevent's repairs (ops/geventfix.py): nothing kombu uses to wait may block the worker;
the readiness checks of redis-py's pooled connections and of urllib3's kept-alive upstream
connections do not turn the event loop; a background greenlet starts without a turn; a
lock for hot paths behaves as a lock with and without gevent."""

from __future__ import annotations

from ops.redis_server import EmbeddedRedis
from tests.procs import run_snippet

# What `celery -A workers worker --pool gevent` does first: patch, then load the app.
STARTUP = """
import sys
sys.argv = ["celery", "-A", "workers", "worker", "--pool", "gevent"]
from celery import maybe_patch_concurrency
maybe_patch_concurrency()
import workers.celery_app
import gevent, gevent.monkey, kombu.resource, kombu.utils.functional, queue
blocking = gevent.monkey.get_original("time", "sleep")
print(kombu.utils.functional.sleep is not blocking, kombu.resource.LifoQueue is queue.LifoQueue)
"""


def test_kombu_waits_with_gevent_not_with_a_blocking_sleep() -> None:
    assert run_snippet(STARTUP).split() == ["True", "True"]


# A patched process, a pool on the test's Redis: how many greenlet switches redis-py's check
# of a pooled connection (``can_read``) makes before and after the repair, what it answers,
# and whether a check with a timeout still lets other greenlets run while it waits.
# How many greenlet switches ``check()`` makes, and its answer.
SWITCHES = """
import greenlet

def switches(check):
    count = [0]
    greenlet.settrace(lambda event, args: count.__setitem__(0, count[0] + 1))
    try:
        answer = check()
    finally:
        greenlet.settrace(None)
    return count[0], answer
"""

READINESS = (
    """
import gevent.monkey
gevent.monkey.patch_all()
import sys, time, gevent, greenlet, redis
from ops.geventfix import readiness_checks_without_yield
"""
    + SWITCHES
    + """
pool = redis.BlockingConnectionPool.from_url(sys.argv[1], max_connections=2)
client = redis.Redis(connection_pool=pool)
client.ping()
conn = pool.get_connection()

print("before", *switches(conn.can_read))
print("repaired", readiness_checks_without_yield(), readiness_checks_without_yield())
print("idle", *switches(conn.can_read))
conn.send_command("PING")
deadline = time.monotonic() + 5
while not conn._parser._reader.has_data() and time.monotonic() < deadline:
    if conn.can_read():
        break
    time.sleep(0.001)
print("pending", *switches(conn.can_read))
conn.read_response()
ticks = []
ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(1000)])
started = time.monotonic()
answer = conn.can_read(timeout=0.3)
print("timeout", answer, round(time.monotonic() - started, 1), len(ticks) > 5)
ticker.kill()
pool.release(conn)
killed = client.client_id()
other = redis.Redis.from_url(sys.argv[1])
other.client_kill_filter(_id=killed)
time.sleep(0.1)
print("after kill", client.ping(), client.client_id() != killed)
"""
)


def test_redis_readiness_checks_do_not_turn_the_event_loop(redis_server: EmbeddedRedis) -> None:
    lines = run_snippet(READINESS, redis_server.url).splitlines()
    assert lines[0] == "before 2 False"  # gevent's poll: to the loop and back
    assert lines[1] == "repaired True False"  # once per process
    assert lines[2] == "idle 0 False"  # nothing to read: answered without a switch
    assert lines[3] == "pending 0 True"  # a reply waiting: seen, still without one
    assert lines[4] == "timeout False 0.3 True"  # a real wait still lets others run
    assert lines[5] == "after kill True True"  # a closed pooled connection is replaced


# The same for urllib3 (the worker's upstream transport): its check of a kept-alive
# connection before each request (``is_connection_dropped``) with a zero timeout; and a
# pooled connection the server closed is still seen as dropped and replaced.
UPSTREAM_CHECKS = (
    """
import gevent.monkey
gevent.monkey.patch_all()
import socket, time, gevent, greenlet, urllib3
from urllib3.util.wait import wait_for_read
from ops.geventfix import readiness_checks_without_yield
"""
    + SWITCHES
    + """
ours, theirs = socket.socketpair()
wait_for_read(ours, timeout=0)  # the first call also picks poll (one more check)
print("before", *switches(lambda: wait_for_read(ours, timeout=0)))
readiness_checks_without_yield()
print("idle", *switches(lambda: wait_for_read(ours, timeout=0)))
theirs.send(b"x")
print("pending", *switches(lambda: wait_for_read(ours, timeout=0)))
ticks = []
ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(1000)])
ours.recv(1)
started = time.monotonic()
answer = wait_for_read(ours, timeout=0.3)
print("timeout", answer, round(time.monotonic() - started, 1), len(ticks) > 5)
ticker.kill()

# A server that keeps a connection for two requests, then closes it while it is idle (as a
# keep-alive timeout does). No retries: a dropped connection not seen as dropped would fail.
peers = []
def serve(conn, addr):
    for _ in range(2):
        if not conn.recv(65536):
            break
        peers.append(addr[1])
        conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
    conn.close()
listener = socket.create_server(("127.0.0.1", 0))
gevent.spawn(lambda: [gevent.spawn(serve, *listener.accept()) for _ in range(10)])
pool = urllib3.PoolManager(retries=False)
url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
bodies = [pool.request("GET", url).data]
bodies.append(pool.request("GET", url).data)
gevent.sleep(0.1)  # the server has closed the idle connection
bodies.append(pool.request("GET", url).data)
print("reuse", bodies == [b"ok"] * 3, peers[0] == peers[1], peers[2] != peers[1])
"""
)


def test_upstream_readiness_checks_do_not_turn_the_event_loop() -> None:
    assert run_snippet(UPSTREAM_CHECKS).splitlines() == [
        "before 2 False",  # gevent's poll: to the loop and back
        "idle 0 False",  # nothing to read: answered without a switch
        "pending 0 True",  # data waiting: seen, still without one
        "timeout False 0.3 True",  # a real wait still lets others run
        "reuse True True True",  # kept alive and reused; replaced once the server closed it
    ]


# A background task does not wait for its greenlet to begin (a patched Thread.start does:
# a turn of the loop, running every ready greenlet first); without gevent it is a thread.
BACKGROUND = """
import sys
if sys.argv[1] == "gevent":
    import gevent.monkey
    gevent.monkey.patch_all()
import threading, greenlet
from ops.geventfix import start_background

ran = threading.Event()
count = [0]
greenlet.settrace(lambda event, args: count.__setitem__(0, count[0] + 1))
start_background(ran.set, "test")
greenlet.settrace(None)
print(count[0], ran.wait(5))
"""


def test_a_background_task_starts_without_a_switch_under_gevent() -> None:
    # No switch to start it under gevent; it ran once we waited. A thread ran without.
    assert run_snippet(BACKGROUND, "gevent").split() == ["0", "True"]
    assert run_snippet(BACKGROUND, "threads").split() == ["0", "True"]


# fast_lock: a lock with threading.Lock's behaviour; under gevent the compiled semaphore,
# which a greenlet that waits for it yields to the others (held across a switch, it still
# excludes them), without gevent a real lock.
FAST_LOCK = """
import sys
if sys.argv[1] == "gevent":
    import gevent.monkey
    gevent.monkey.patch_all()
import threading, time
from ops.geventfix import fast_lock

lock = fast_lock()
print(type(lock).__name__)
with lock:
    held = not lock.acquire(False) and not lock.acquire(timeout=0.05) and lock.locked()
order = []

def holder():
    with lock:
        order.append("holder in")
        time.sleep(0.1)  # a switch under gevent: the lock stays held
        order.append("holder out")

def waiter():
    time.sleep(0.02)
    with lock:
        order.append("waiter in")

threads = [threading.Thread(target=holder), threading.Thread(target=waiter)]
for t in threads:
    t.start()
for t in threads:
    t.join(5)
print(held, not lock.locked(), order == ["holder in", "holder out", "waiter in"])
"""


def test_a_fast_lock_is_a_lock_with_and_without_gevent() -> None:
    assert run_snippet(FAST_LOCK, "gevent").split() == ["BoundedSemaphore", "True", "True", "True"]
    assert run_snippet(FAST_LOCK, "threads").split() == ["lock", "True", "True", "True"]
