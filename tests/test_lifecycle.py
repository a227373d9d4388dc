"""One authority per stream, recovery sends and the attempt budget: cancel, seal and the
sweeper against a real Redis and SQLite (and PostgreSQL when configured), in process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import select, update
from sqlalchemy import text as sql
from sqlalchemy.orm import Session, sessionmaker

from models import keys, lifecycle, store
from models.chunklog import REQUEUE_NO, REQUEUE_OVER_BUDGET, REQUEUE_SEND, ChunkLog, LogState
from models.db import make_engine, make_sessionmaker
from models.events import CHUNK, DONE, Event
from models.exceptions import StaleAttempt
from models.tables import Chat, Message, Stream, utcnow
from tests.conftest import PG_URL
from tests.procs import run_snippet
from tests.test_store import make_stream


@pytest.fixture
def sessions(fresh_database_url: str) -> Iterator[sessionmaker[Session]]:
    """A database of the test's own: the sweeper looks at every stream in it."""
    engine = make_engine(fresh_database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def chunks(redis_client: redis.Redis) -> ChunkLog:
    return ChunkLog(redis_client)


class Sent:
    """What the sweeper sent (its enqueue callable; the sweeper is the thing under test)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, stream_id: str, task_id: str) -> None:
        self.calls.append((stream_id, task_id))


def new_stream(sessions: sessionmaker[Session]) -> Stream:
    with sessions() as db:
        stream = make_stream(db)
        db.expunge(stream)
        return stream


def start_writer(chunks: ChunkLog, db: Session, stream: Stream, pieces: list[str]) -> int:
    """Queue, claim and write ``pieces`` as a worker would; return the attempt."""
    chunks.init(stream.id)
    claim = chunks.claim(stream.id, f"task-{stream.id}", 5, "w1", stream.attempt)
    assert store.mark_running(db, stream.id, stream.message_id, claim.attempt, "task")
    events = [Event(claim.last_seq + i, CHUNK, text=p) for i, p in enumerate(pieces, 1)]
    if events:
        chunks.append_many(stream.id, claim.attempt, events)
    return claim.attempt


def sql_row(db: Session, stream_id: str) -> tuple[Stream, Message]:
    db.expire_all()
    stream = db.get(Stream, stream_id)
    assert stream is not None
    message = db.get(Message, stream.message_id)
    assert message is not None
    return stream, message


def log_events(chunks: ChunkLog, stream_id: str) -> list[Event]:
    return list(chunks.iter_from(stream_id, 0))


def test_a_cancel_takeover_fences_the_writer_in_sql_too(
    chunks: ChunkLog, sessions: sessionmaker[Session]
) -> None:
    """The canceller of a stream whose writer looks dead takes it over as a new attempt in
    both stores: the old writer can then neither checkpoint nor end it in SQL."""
    stream = new_stream(sessions)
    with sessions() as db:
        attempt = start_writer(chunks, db, stream, ["Hel", "lo"])
        row, _ = sql_row(db, stream.id)
        assert lifecycle.cancel(chunks, db, row, stale_after_s=0) == "finalized"
        row, message = sql_row(db, stream.id)
        assert (row.status, row.attempt) == ("cancelled", attempt + 1)
        assert (message.content, message.status) == ("Hello", "cancelled")
        # The writer that only looked dead wakes up: every write it tries is refused.
        assert not store.checkpoint(db, stream.id, stream.message_id, attempt, "Hello!", [3, 5])
        assert not store.finalize(
            db, stream.id, status="done", text="Hello!", layout=[3, 5, 6], attempt=attempt
        )
        with pytest.raises(StaleAttempt):
            chunks.append(stream.id, attempt, Event(3, CHUNK, text="!"))
    events = log_events(chunks, stream.id)
    assert [(e.seq, e.type) for e in events] == [(1, CHUNK), (2, CHUNK), (3, "cancelled")]
    assert chunks.state(stream.id).status == "cancelled"


def test_a_writer_that_ended_in_sql_first_decides_the_end_of_the_log_too(
    chunks: ChunkLog, sessions: sessionmaker[Session]
) -> None:
    """A writer stores `done` in SQL, then is taken over by a cancel before its terminal
    event lands: SQL decided, so the log ends `done` as well (never two different ends)."""
    stream = new_stream(sessions)
    with sessions() as db:
        attempt = start_writer(chunks, db, stream, ["Hel", "lo"])
        assert store.finalize(
            db, stream.id, status="done", text="Hello", layout=[3, 5], attempt=attempt
        )
        taken, new_attempt, last = chunks.cancel(stream.id, 0)  # the writer looked dead
        assert taken == "taken"
        assert not lifecycle.end_taken(chunks, db, stream.id, new_attempt, last, "cancelled")
        with pytest.raises(StaleAttempt):  # the writer's own terminal event comes too late
            chunks.append(stream.id, attempt, Event(3, DONE, message_id=stream.message_id))
        row, message = sql_row(db, stream.id)
        assert (row.status, message.content) == ("done", "Hello")
    events = log_events(chunks, stream.id)
    assert [(e.seq, e.type) for e in events] == [(1, CHUNK), (2, CHUNK), (3, DONE)]
    assert chunks.state(stream.id).status == "done"


def test_a_seal_lands_after_the_logs_last_entry_and_sql_catches_up(
    chunks: ChunkLog, sessions: sessionmaker[Session]
) -> None:
    """SQL ended a stream with less text than its log holds (the writer lost an append's
    reply that had in fact been written, then died): the sweeper brings SQL up to the log
    and writes the terminal event after the log's last entry, not over it."""
    stream = new_stream(sessions)
    sent = Sent()
    with sessions() as db:
        attempt = start_writer(chunks, db, stream, ["a", "b", "c", "d"])
        assert store.finalize(
            db, stream.id, status="done", text="abc", layout=[1, 2, 3], attempt=attempt
        )
    sweeper = lifecycle.Sweeper(chunks, sessions, sent, stale_after_s=0.05)
    time.sleep(0.1)  # the writer's heartbeat goes stale
    report = sweeper.sweep()
    assert report.sealed == [stream.id]
    events = log_events(chunks, stream.id)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5] and events[-1].type == DONE
    with sessions() as db:
        row, message = sql_row(db, stream.id)
        assert (message.content, row.last_seq, row.status) == ("abcd", 5, "done")
        assert row.content_hash == store.content_hash("abcd")
    assert sent.calls == []


def test_a_seal_refuses_a_terminal_event_the_log_has_moved_past(chunks: ChunkLog) -> None:
    chunks.init("m1")
    attempt = chunks.claim("m1", "t", 5).attempt
    chunks.append_many("m1", attempt, [Event(1, CHUNK, text="a"), Event(2, CHUNK, text="b")])
    assert chunks.seal("m1", [Event(2, DONE, message_id="x")], 0) == "moved"
    assert chunks.state("m1").status == "running"
    assert chunks.seal("m1", [Event(3, DONE, message_id="x")], 0) == "sealed"


def test_no_second_send_while_a_copy_may_still_wait_then_backoff(
    chunks: ChunkLog, sessions: sessionmaker[Session]
) -> None:
    """A dead writer's stream is sent again once; while that copy is unclaimed it is not
    sent again before the resend wait, then only after twice as long."""
    stream = new_stream(sessions)
    sent = Sent()
    with sessions() as db:
        start_writer(chunks, db, stream, ["x"])
    sweeper = lifecycle.Sweeper(chunks, sessions, sent, stale_after_s=0.05, resend_wait_s=0.4)
    time.sleep(0.1)
    assert sweeper.sweep().requeued == [stream.id]
    time.sleep(0.1)
    assert sweeper.sweep().requeued == []  # stale again, but a copy is on its way
    time.sleep(0.35)
    assert sweeper.sweep().requeued == [stream.id]  # 0.4 s after the first send
    time.sleep(0.45)
    assert sweeper.sweep().requeued == []  # the second waits 0.8 s
    time.sleep(0.4)
    assert sweeper.sweep().requeued == [stream.id]
    assert len(sent.calls) == 3
    # A claim of one of the copies ends the back-off: the new writer is what counts now.
    claim = chunks.claim(stream.id, "t", 0.05)
    assert claim.result == "claimed"
    state = chunks.state(stream.id)
    assert state.resent_ms is None and state.resends == 0


def test_a_hand_off_is_not_sent_twice(chunks: ChunkLog, sessions: sessionmaker[Session]) -> None:
    stream = new_stream(sessions)
    sent = Sent()
    with sessions() as db:
        attempt = start_writer(chunks, db, stream, ["x"])
    assert chunks.release(stream.id, attempt)  # the worker sends its own copy next
    sweeper = lifecycle.Sweeper(chunks, sessions, sent, stale_after_s=0.05)
    time.sleep(0.1)
    assert sweeper.sweep().requeued == []
    assert sent.calls == []


def test_the_attempt_budget_ends_a_stream_that_keeps_dying(
    chunks: ChunkLog, sessions: sessionmaker[Session]
) -> None:
    """Claims count; past the budget the sweeper ends the stream failed with
    too_many_attempts, its text kept in both stores."""
    stream = new_stream(sessions)
    sent = Sent()
    sweeper = lifecycle.Sweeper(
        chunks, sessions, sent, stale_after_s=0.05, max_attempts=3, resend_wait_s=0.05
    )
    with sessions() as db:
        attempt = start_writer(chunks, db, stream, ["one "])  # claim 1
    for n, text in ((2, "two "), (3, "three")):
        time.sleep(0.1)  # the writer dies
        assert sweeper.sweep().requeued == [stream.id]  # a re-send: not a claim
        claim = chunks.claim(stream.id, "t", 0.05, f"w{n}", attempt)
        assert (claim.result, claim.tries) == ("claimed", n)
        attempt = claim.attempt
        chunks.append(stream.id, attempt, Event(n, CHUNK, text=text))
    time.sleep(0.1)  # the third writer dies too: the budget (3 claims) is spent
    report = sweeper.sweep()
    assert report.exhausted == [stream.id] and report.requeued == []
    events = log_events(chunks, stream.id)
    assert [e.type for e in events] == [CHUNK, CHUNK, CHUNK, "error"]
    assert events[-1].error["code"] == "too_many_attempts"
    with sessions() as db:
        row, message = sql_row(db, stream.id)
        assert (row.status, row.error_code) == ("failed", "too_many_attempts")
        assert (message.content, row.last_seq) == ("one two three", 4)
        # An admin retry starts a new budget.
        seq, _task = lifecycle.retry(chunks, db, stream.id, sent)
    fresh = chunks.claim(stream.id, "t", 0.05, "w4", row.attempt)
    assert (fresh.result, fresh.tries) == ("claimed", 1)
    assert seq == 5


def test_unclaimed_copies_are_bounded_too(
    chunks: ChunkLog, sessions: sessionmaker[Session]
) -> None:
    """No worker ever claims the copies (all busy, or none running): the sends back off and,
    after the budget's worth of them, the stream ends too_many_attempts."""
    stream = new_stream(sessions)
    sent = Sent()
    sweeper = lifecycle.Sweeper(
        chunks, sessions, sent, stale_after_s=0.02, max_attempts=2, resend_wait_s=0.02
    )
    with sessions() as db:
        start_writer(chunks, db, stream, ["x"])
    time.sleep(0.05)
    assert sweeper.sweep().requeued == [stream.id]
    time.sleep(0.05)
    assert sweeper.sweep().requeued == [stream.id]  # the second, after the resend wait
    time.sleep(0.1)
    assert sweeper.sweep().exhausted == [stream.id]
    assert len(sent.calls) == 2


def test_a_committed_stream_whose_task_was_never_sent_is_sent_soon(
    chunks: ChunkLog, sessions: sessionmaker[Session]
) -> None:
    """The web process died between committing a chat and sending its task: the sweeper
    sends it after the stale period, not after the queued grace. A stream whose task was
    sent waits the grace (workers may just be busy)."""
    sent = Sent()
    # A stale period of 1 s: setting up the three streams must take less than that (0.1 s
    # was too close: a loaded machine took longer and the first sweep already sent them).
    sweeper = lifecycle.Sweeper(chunks, sessions, sent, stale_after_s=1.0, queued_grace_s=300)
    unsent = new_stream(sessions)
    chunks.init(unsent.id)  # died after marking it queued, before sending
    never = new_stream(sessions)  # died before even that
    waiting = new_stream(sessions)
    chunks.init(waiting.id)
    chunks.mark_sent(waiting.id)
    assert sweeper.sweep().requeued == []  # too new: the web process may still send them
    time.sleep(1.05)
    # The one never marked queued has been without state for the stale period since the
    # first sweep saw it so: both are sent.
    assert sorted(sweeper.sweep().requeued) == sorted([unsent.id, never.id])
    assert {sid for sid, _ in sent.calls} == {unsent.id, never.id}
    assert sweeper.sweep().requeued == []


def test_a_post_between_its_commit_and_its_init_is_not_sent_twice(
    chunks: ChunkLog, sessions: sessionmaker[Session]
) -> None:
    """The post committed its row long after the row's created_at (its commit waited for
    the database's lock under load) and has not marked the log queued yet when a sweep
    looks: the stream is not sent. The missing state is timed from the first sweep that saw
    it, on Redis's clock: once the post marks it queued and sent, nothing is sent at all;
    and one that stays without state is sent after the stale period (a post that died)."""
    sent = Sent()
    sweeper = lifecycle.Sweeper(chunks, sessions, sent, stale_after_s=0.5, queued_grace_s=300)
    late, dead = new_stream(sessions), new_stream(sessions)
    with sessions() as db:  # both rows look an hour old
        hour_ago = utcnow() - timedelta(hours=1)
        db.execute(update(Stream).where(Stream.id.in_([late.id, dead.id])).values(
            created_at=hour_ago))  # fmt: skip
        db.commit()
    assert sweeper.sweep().requeued == []  # seen without state: not yet
    chunks.init(late.id)  # the post goes on: marks the log queued, sends, marks it sent
    chunks.mark_sent(late.id)
    assert chunks.state(late.id).status == "queued"
    time.sleep(0.6)
    assert sweeper.sweep().requeued == [dead.id]
    assert sweeper.sweep().requeued == []  # its copy may still wait
    assert [sid for sid, _ in sent.calls] == [dead.id]
    # The dead post's copy is claimed and the stream runs as any other.
    assert chunks.claim(dead.id, "t", 0.5).result == "claimed"


def test_mark_requeue_answers(chunks: ChunkLog) -> None:
    chunks.init("q1")
    assert chunks.mark_requeue("q1", 0, 0, max_attempts=1) == REQUEUE_SEND
    assert chunks.mark_requeue("q1", 0, 0, 1, resend_wait_s=10) == REQUEUE_NO  # a copy waits
    assert chunks.mark_requeue("q1", 0, 0, 1, resend_wait_s=0) == REQUEUE_OVER_BUDGET


def test_a_claim_of_a_stream_sql_has_ended_is_void(
    chunks: ChunkLog, sessions: sessionmaker[Session]
) -> None:
    stream = new_stream(sessions)
    with sessions() as db:
        assert store.finalize(db, stream.id, status="cancelled", text="", layout=[], attempt=None)
        assert not store.mark_running(db, stream.id, stream.message_id, 1, "late")
        assert not store.finalize(db, stream.id, status="done", text="x", layout=[1], attempt=None)
        row, _ = sql_row(db, stream.id)
        assert (row.status, row.attempt) == ("cancelled", 0)


def test_a_pass_stops_between_batches_when_its_lock_is_lost(
    chunks: ChunkLog, sessions: sessionmaker[Session]
) -> None:
    for _ in range(3):
        new_stream(sessions)
    sweeper = lifecycle.Sweeper(chunks, sessions, Sent(), stale_after_s=5, batch=2)
    full = sweeper.sweep()
    assert full.checked >= 3
    assert sweeper.sweep(lambda: False).checked == 2


def test_an_end_left_by_a_writer_that_could_not_reach_sql_is_stored_by_the_sweeper(
    chunks: ChunkLog, sessions: sessionmaker[Session]
) -> None:
    """The writer generated everything but SQL stayed down past the budget: it leaves the
    end in the log's state; once SQL answers, the sweeper stores it (text, usage) and then
    writes the terminal event after the log's last entry."""
    stream = new_stream(sessions)
    sent = Sent()
    with sessions() as db:
        attempt = start_writer(chunks, db, stream, ["all ", "of ", "it"])
    assert chunks.pend_end(stream.id, attempt, "done", None, {"completion_tokens": 3})
    assert not chunks.pend_end(stream.id, attempt + 1, "done", None)  # only the owner
    report = lifecycle.Sweeper(chunks, sessions, sent, stale_after_s=5).sweep()
    assert report.ended == [stream.id] and sent.calls == []
    events = log_events(chunks, stream.id)
    assert [(e.seq, e.type) for e in events][-1] == (4, DONE)
    with sessions() as db:
        row, message = sql_row(db, stream.id)
        assert (row.status, message.status, message.content) == ("done", "complete", "all of it")
        assert message.completion_tokens == 3 and row.last_seq == 4


def test_a_heartbeat_after_the_end_was_left_does_not_hide_it_from_the_sweeper(
    chunks: ChunkLog, sessions: sessionmaker[Session]
) -> None:
    """The writer's heartbeat thread beats once more after the writer left its end (it stops
    only when the generation returns): the writer has stepped aside, so the beat is refused
    and the sweeper stores the end at once, not a stale interval later (CI found the beat
    landing in between once)."""
    stream = new_stream(sessions)
    with sessions() as db:
        attempt = start_writer(chunks, db, stream, ["a", "b"])
    assert chunks.pend_end(stream.id, attempt, "done", None)
    assert not chunks.heartbeat(stream.id, attempt).owner
    report = lifecycle.Sweeper(chunks, sessions, Sent(), stale_after_s=5).sweep()
    assert report.ended == [stream.id]
    assert [e.type for e in log_events(chunks, stream.id)][-1] == DONE


def test_a_seal_leaves_alone_a_stream_whose_live_writer_is_ending_it(
    chunks: ChunkLog, sessions: sessionmaker[Session]
) -> None:
    """The sweeper read the log as running, then the writer (SQL already ended) wrote its
    terminal event, or is about to: the seal changes nothing in either store."""
    stream = new_stream(sessions)
    with sessions() as db:
        attempt = start_writer(chunks, db, stream, ["a", "b"])
        assert store.finalize(
            db, stream.id, status="done", text="ab", layout=[1, 2], attempt=attempt
        )
        row, _ = sql_row(db, stream.id)
        assert lifecycle.seal_from_sql(chunks, db, row, 5) == "busy"  # its heartbeat is fresh
        chunks.append(stream.id, attempt, Event(3, DONE, message_id=stream.message_id))
        assert lifecycle.seal_from_sql(chunks, db, row, 0) == "finished"
        row, message = sql_row(db, stream.id)
        assert (row.last_seq, message.content) == (3, "ab")
    assert [e.type for e in log_events(chunks, stream.id)] == [CHUNK, CHUNK, DONE]


def test_a_hand_off_does_not_count_against_the_budget(chunks: ChunkLog) -> None:
    chunks.init("h1")
    first = chunks.claim("h1", "t", 5)
    assert chunks.release("h1", first.attempt)
    second = chunks.claim("h1", "t", 5)
    assert (second.result, second.tries) == ("claimed", 2)  # two claims, no hand-off


@pytest.mark.skipif(not PG_URL, reason="a PostgreSQL behaviour: set TEST_DATABASE_URL")
@pytest.mark.parametrize("fresh_database_url", ["postgresql"], indirect=True)
def test_deleting_a_chat_outlives_a_deadlock_with_its_writer(
    chunks: ChunkLog, sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """A chat deleted while its answer's writer stores the end: the writer holds the stream
    row and then wants the message row, which the deletion's cascade holds while it waits
    for the stream row. PostgreSQL aborts the deletion as the deadlock's victim; it is done
    again and succeeds, instead of a 503 that leaves the chat."""
    stream = new_stream(sessions)
    writer = sessions()
    writer.execute(sql("SET deadlock_timeout = '60s'"))  # the deletion detects it, not us
    writer.execute(update(Stream).where(Stream.id == stream.id).values(status=Stream.status))
    outcome: list[object] = []

    def delete() -> None:
        with sessions() as db:
            db.execute(sql("SET deadlock_timeout = '3s'"))
            db.commit()
            try:
                outcome.append(lifecycle.delete_chats(chunks, db, [stream.chat_id]))
            except Exception as exc:  # reported below
                outcome.append(exc)

    deleting = threading.Thread(target=delete)
    deleting.start()
    with sessions() as probe:  # until the deletion waits for the writer's stream row
        waits = sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
        deadline = time.monotonic() + 20
        while not probe.scalar(waits) and time.monotonic() < deadline:
            probe.rollback()
            time.sleep(0.02)
    # Now the writer wants the message row: a cycle, which the deletion breaks by failing.
    writer.execute(update(Message).where(Message.id == stream.message_id).values(content="the end"))
    writer.commit()
    writer.close()
    deleting.join(30)
    assert outcome == [1], outcome
    assert "lock conflict" in caplog.text  # the deadlock did happen, and was survived
    with sessions() as db:
        assert db.scalar(select(Chat).where(Chat.id == stream.chat_id)) is None
        assert db.scalar(select(Stream).where(Stream.id == stream.id)) is None


def _leftover(chunks: ChunkLog, stream_id: str) -> int:
    return int(chunks.redis.exists(keys.log_key(stream_id), keys.state_key(stream_id)))


@pytest.mark.parametrize("moment", ["before the pass reads the log", "within the deletion"])
def test_a_chat_deleted_while_a_sweep_looks_at_its_stream_leaves_nothing_behind(
    chunks: ChunkLog,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    moment: str,
) -> None:
    """The sweep read a running stream's row, then its chat is deleted: the sweep finds no
    state and records when it first saw none, which would leave a state key for a chat
    that no longer exists (a clean-clone CI run once found one after a DELETE). Both orders
    leave nothing: the deletion committed before the sweep wrote (the sweep removes what
    it wrote), or the sweep wrote between the deletion's removal of the logs and its commit
    (the deletion removes the logs again after it)."""
    stream = new_stream(sessions)
    with sessions() as db:
        start_writer(chunks, db, stream, ["Hel", "lo"])
    sent = Sent()
    sweeper = lifecycle.Sweeper(chunks, sessions, sent, stale_after_s=60)

    def delete() -> None:
        with sessions() as db:
            assert lifecycle.delete_chats(ChunkLog(chunks.redis), db, [stream.chat_id]) == 1

    if moment == "before the pass reads the log":
        states = chunks.states

        def deleted_then_states(stream_ids: Sequence[str]) -> tuple[int, list[LogState]]:
            delete()
            return states(stream_ids)

        monkeypatch.setattr(chunks, "states", deleted_then_states)
        report = sweeper.sweep()
    else:
        forget = ChunkLog.forget
        swept: list[lifecycle.SweepReport] = []
        calls: list[Sequence[str]] = []

        def forget_then_sweep(self: ChunkLog, stream_ids: Sequence[str]) -> None:
            forget(self, stream_ids)
            calls.append(stream_ids)
            if len(calls) == 1:  # the deletion's first removal, before its commit
                swept.append(sweeper.sweep())

        monkeypatch.setattr(ChunkLog, "forget", forget_then_sweep)
        delete()
        (report,) = swept
    assert report.checked == 1 and report.requeued == [] and sent.calls == []
    assert _leftover(chunks, stream.id) == 0


def test_a_seal_of_a_stream_whose_chat_was_just_deleted_leaves_nothing_behind(
    chunks: ChunkLog, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream ended in SQL whose log still says running (its writer died between the two
    writes): the sweep seals it from SQL. Its chat is deleted between the sweep's read of
    the row and the seal: the seal writes a log that nothing owns, and the sweep removes it."""
    stream = new_stream(sessions)
    with sessions() as db:
        attempt = start_writer(chunks, db, stream, ["Hel", "lo"])
        assert store.finalize(
            db, stream.id, status="done", text="Hello", layout=[3, 5], attempt=attempt
        )
    seal = chunks.seal

    def deleted_then_seal(stream_id: str, events: list[Event], stale_after_s: float) -> str:
        with sessions() as db:
            assert lifecycle.delete_chats(ChunkLog(chunks.redis), db, [stream.chat_id]) == 1
        return seal(stream_id, events, stale_after_s)

    monkeypatch.setattr(chunks, "seal", deleted_then_seal)
    report = lifecycle.Sweeper(chunks, sessions, Sent(), stale_after_s=0).sweep()
    assert report.sealed == []
    assert _leftover(chunks, stream.id) == 0


def test_a_pass_hands_the_process_back_after_every_page_and_batch(
    chunks: ChunkLog, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass shares a worker's event loop with the answers being written: it never reads
    more than a page of rows, or checks more than a batch of streams, between two pauses."""
    for _ in range(7):
        new_stream(sessions)
    checked: list[str] = []
    at_pauses: list[int] = []  # streams checked so far, at each pause
    sweeper = lifecycle.Sweeper(chunks, sessions, Sent(), stale_after_s=5, batch=3, page=2)
    sweeper.pause = lambda: at_pauses.append(len(checked))
    check = sweeper._check

    def counted(db: Session, row: Any, *args: Any) -> None:
        checked.append(row.id)
        check(db, row, *args)

    monkeypatch.setattr(sweeper, "_check", counted)
    assert sweeper.sweep().checked == 7
    # Reading 7 rows two at a time pauses 4 times (nothing checked yet), then checking them
    # three at a time 3 times.
    assert at_pauses == [0, 0, 0, 0, 3, 6, 7]


# The default pause in a patched process: a greenlet whose socket is readable runs during
# it (gevent.sleep(0) alone may switch back without polling for I/O).
PAUSE = """
from gevent import monkey
monkey.patch_all()
import socket, gevent
from models.lifecycle import Sweeper
ran = []
a, b = socket.socketpair()
reader = gevent.spawn(lambda: ran.append(a.recv(1)))
gevent.sleep(0.01)  # the reader waits on its socket now
b.send(b"x")
Sweeper.pause()
print(ran == [b"x"])
"""


def test_the_default_pause_lets_a_waiting_greenlet_run() -> None:
    assert run_snippet(PAUSE).split() == ["True"]
