"""workers.endgate: answers' final writes take turns, after whatever else the loop has ready."""

from __future__ import annotations

import json
import threading
import time

from tests.procs import run_snippet
from workers.endgate import EndGate

# A gevent worker's process: patched first, as `celery worker --pool gevent` does.
UNDER_GEVENT = """
from gevent import monkey; monkey.patch_all()
import json, socket, time, gevent
from tests.procs import run_snippet
from workers.endgate import EndGate

def run(churn_s, patience_s):
    '''A greenlet that keeps the loop busy (socket round trips and turns) for churn_s while
    another asks for a turn; where in the churn the turn came, and whether it waited out.'''
    gate, order = EndGate(patience_s), []
    a, b = socket.socketpair()
    def churn():
        end = time.monotonic() + churn_s
        while time.monotonic() < end:
            a.sendall(b"x"); b.recv(1); time.sleep(0); order.append("churn")
    def end():
        with gate.turn():
            order.append("end")
    gevent.joinall([gevent.spawn(churn), gevent.spawn(end)])
    return {"before": order.index("end"), "churn": len(order) - 1, "waited_out": gate.waited_out}

def exclusive():
    '''Three ends whose writes yield inside their turns: never two in a turn at once.'''
    gate, inside, most = EndGate(0.01), [0], [0]
    def end():
        with gate.turn():
            inside[0] += 1; most[0] = max(most[0], inside[0])
            gevent.sleep(0.02)
            inside[0] -= 1
    gevent.joinall([gevent.spawn(end) for _ in range(3)])
    return most[0]

print(json.dumps({"idle": run(0.2, 5.0), "busy": run(1.0, 0.05), "most": exclusive()}))
"""


def test_under_gevent_an_end_goes_after_the_ready_work_but_never_waits_past_patience() -> None:
    found = json.loads(run_snippet(UNDER_GEVENT))
    idle, busy = found["idle"], found["busy"]
    # The loop had work ready for 0.2 s (less than the patience): the end went after all of it.
    assert idle["churn"] > 100 and idle["before"] == idle["churn"], idle
    assert idle["waited_out"] == 0
    # Ready work for 1 s, patience 0.05 s: the end went after ~0.05 s, in the churn's midst.
    assert 0 < busy["before"] < busy["churn"] / 2, busy
    assert busy["waited_out"] == 1
    assert found["most"] == 1


def test_with_threads_turns_are_taken_one_at_a_time_without_waiting() -> None:
    """The threads pool: no event loop to wait for (a wait would sit out the hour's
    patience); the turns still exclude each other."""
    gate = EndGate(patience_s=3600.0)
    inside, most, lock = [0], [0], threading.Lock()

    def end() -> None:
        with gate.turn():
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.02)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=end) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
    assert gate.waited_out == 0
