"""SQL progress writes and the SQL replay, on SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event, update
from sqlalchemy.orm import Session

from models import store
from models.events import Event
from models.tables import Message, Stream
from tests.conftest import guest_chat


def make_stream(db: Session) -> Stream:
    chat = guest_chat(db)
    answer = Message(chat_id=chat.id, position=1, role="assistant", status="pending")
    db.add(answer)
    db.flush()
    stream = Stream(chat_id=chat.id, message_id=answer.id)
    db.add(stream)
    db.commit()
    return stream


def test_checkpoint_and_finalize_are_fenced_by_attempt(db: Session) -> None:
    stream = make_stream(db)
    answer = db.get(Message, stream.message_id)  # the session's copy, held as a caller would
    store.mark_running(db, stream.id, stream.message_id, 2, "task")
    assert store.checkpoint(db, stream.id, stream.message_id, 1, "stale", [5]) is False
    assert store.checkpoint(db, stream.id, stream.message_id, 2, "Hel", [3]) is True
    # The writes are Core statements: the copy is older (on PostgreSQL no fenced write rolls
    # back, so nothing expired it), and the session hands it out until it is expired.
    db.expire_all()
    assert answer is not None and answer.content == "Hel"
    assert not store.finalize(db, stream.id, status="done", text="x", layout=[1], attempt=1)
    assert store.finalize(db, stream.id, status="done", text="Hello", layout=[3, 5], attempt=2)
    db.expire_all()
    row = db.get(Stream, stream.id)
    assert row is not None and row.status == "done" and row.last_seq == 3
    assert row.content_hash == store.content_hash("Hello")
    message = db.get(Message, stream.message_id)
    assert message is not None and (message.content, message.status) == ("Hello", "complete")


def test_checkpoint_more_adds_to_the_checkpoint_before_it(db: Session) -> None:
    """A later checkpoint sends only what is new; SQL then holds what one whole write of
    the answer would (the same text, the same layout, other events' items included)."""
    stream = make_stream(db)
    sid, mid = stream.id, stream.message_id
    store.mark_running(db, sid, mid, 1, "task")
    assert store.checkpoint(db, sid, mid, 1, "Hé", [2])
    assert store.checkpoint_more(db, sid, mid, 1, 1, [5, ["tool", '{"a": "ü]"}']], "llo")
    assert store.checkpoint_more(db, sid, mid, 1, 3, [8], " 😀!")
    db.expire_all()
    row, message = db.get(Stream, sid), db.get(Message, mid)
    assert row is not None and message is not None
    whole = [2, 5, ["tool", '{"a": "ü]"}'], 8]
    assert (message.content, row.last_seq, store.load_layout(row)) == ("Héllo 😀!", 4, whole)
    texts = [e.text for e in store.events_from_sql(row, message.content, 0) if e.type == "chunk"]
    assert texts == ["Hé", "llo", " 😀!"]


@pytest.mark.parametrize(
    ("since", "attempt", "status"),
    [(1, 2, "running"), (2, 1, "running"), (2, 2, "cancelled")],
    ids=["sql-holds-another-checkpoint", "a-stale-attempt", "not-running"],
)
def test_checkpoint_more_writes_nothing_unless_sql_holds_the_checkpoint_before(
    db: Session, since: int, attempt: int, status: str
) -> None:
    stream = make_stream(db)
    sid, mid = stream.id, stream.message_id
    store.mark_running(db, sid, mid, 2, "task")
    assert store.checkpoint(db, sid, mid, 2, "abc", [1, 3])
    if status != "running":
        db.execute(update(Stream).where(Stream.id == sid).values(status=status))
        db.commit()
    assert not store.checkpoint_more(db, sid, mid, attempt, since, [7], "defg")
    db.expire_all()
    row, message = db.get(Stream, sid), db.get(Message, mid)
    assert row is not None and message is not None
    assert (message.content, row.last_seq, store.load_layout(row)) == ("abc", 2, [1, 3])


def test_finalize_stores_the_reported_usage_and_keeps_it_when_an_end_reports_none(
    db: Session,
) -> None:
    stream = make_stream(db)
    usage = {"model": "m-1", "prompt_tokens": 7, "completion_tokens": 2, "finish_reason": "stop"}
    assert store.finalize(db, stream.id, status="done", text="Hi", layout=[2], attempt=None,
                          usage=usage)  # fmt: skip
    db.expire_all()
    first = db.get(Stream, stream.id)
    assert first is not None
    store.reopen(db, first, [2, ["resumed", "{}"]], "task-2")
    # The retry's generator reported nothing: what the first end stored stays.
    assert store.finalize(db, stream.id, status="cancelled", text="Hi", layout=[2, ["r", ""]],
                          attempt=None, reason="abandoned")  # fmt: skip
    db.expire_all()
    message = db.get(Message, stream.message_id)
    assert message is not None and message.status == "cancelled"
    reported = (message.model, message.prompt_tokens, message.completion_tokens,
                message.finish_reason)  # fmt: skip
    assert reported == ("m-1", 7, 2, "stop")
    row = db.get(Stream, stream.id)
    assert row is not None
    assert (row.status, row.end_reason, row.last_seq) == ("cancelled", "abandoned", 3)


def test_finalize_refuses_a_usage_field_it_does_not_store(db: Session) -> None:
    stream = make_stream(db)
    with pytest.raises(ValueError, match="total_tokens"):
        store.finalize(db, stream.id, status="done", text="", layout=[], attempt=None,
                       usage={"total_tokens": 3})  # fmt: skip
    db.rollback()
    row = db.get(Stream, stream.id)
    assert row is not None and row.status == "queued"  # nothing was written


def test_events_from_sql_rebuild_the_log(db: Session) -> None:
    stream = make_stream(db)
    store.finalize(db, stream.id, status="done", text="Hello", layout=[3, 5], attempt=None)
    db.expire_all()
    row = db.get(Stream, stream.id)
    assert row is not None
    assert store.events_from_sql(row, "Hello", 0) == [
        Event(1, "chunk", text="Hel"),
        Event(2, "chunk", text="lo"),
        Event(3, "done", message_id=stream.message_id),
    ]
    assert store.events_from_sql(row, "Hello", 2) == [Event(3, "done", message_id=row.message_id)]
    assert store.events_from_sql(row, "Hello", 3) == []


def test_failed_stream_replays_its_error(db: Session) -> None:
    stream = make_stream(db)
    store.finalize(
        db, stream.id, status="failed", text="Hi", layout=[2], attempt=None,
        error=store.ErrorInfo("generation_failed", "boom"),
    )  # fmt: skip
    db.expire_all()
    row = db.get(Stream, stream.id)
    assert row is not None
    assert store.events_from_sql(row, "Hi", 1) == [
        Event(2, "error", error={"code": "generation_failed", "message": "boom"})
    ]


def test_events_from_sql_with_markers_after_a_retry(db: Session) -> None:
    stream = make_stream(db)
    layout: store.Layout = [2, ["cancelled", ""], ["resumed", "2"], 4]
    store.finalize(db, stream.id, status="done", text="Heyo", layout=layout, attempt=None)
    db.expire_all()
    row = db.get(Stream, stream.id)
    assert row is not None
    assert [e.to_dict() for e in store.events_from_sql(row, "Heyo", 0)] == [
        {"type": "chunk", "seq": 1, "text": "He"},
        {"type": "cancelled", "seq": 2},
        {"type": "resumed", "seq": 3, "attempt": 2},
        {"type": "chunk", "seq": 4, "text": "yo"},
        {"type": "done", "seq": 5, "messageId": row.message_id},
    ]
    assert store.chunk_count(row) == 4


def test_the_workers_fenced_writes_are_one_statement_each_on_postgresql(db: Session) -> None:
    """The worker's mark_running and checkpoints on a ``fenced_writer`` connection: each is
    one statement in autocommit on PostgreSQL (one round trip, no BEGIN or COMMIT), two in a
    transaction on SQLite; fenced the same either way (a stale attempt writes nothing)."""
    stream = make_stream(db)
    sid, mid = stream.id, stream.message_id
    engine = db.get_bind()
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        with engine.connect() as conn:
            writer = store.fenced_writer(conn)
            assert store.mark_running(writer, sid, mid, 2, "task")
            assert store.checkpoint(writer, sid, mid, 2, "ab", [2])
            assert store.checkpoint_more(writer, sid, mid, 2, 1, [4], "cd")
            assert not store.checkpoint(writer, sid, mid, 1, "stale", [5])
            assert not store.checkpoint_more(writer, sid, mid, 2, 1, [9], "late")
            on_postgresql = engine.dialect.name == "postgresql"
            driver = writer.connection.driver_connection
            assert getattr(driver, "autocommit", False) is on_postgresql
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(statements) == (5 if on_postgresql else 2 + 2 + 2 + 1 + 1)
    db.expire_all()
    row, message = db.get(Stream, sid), db.get(Message, mid)
    assert row is not None and message is not None
    assert (message.content, row.last_seq, store.load_layout(row)) == ("abcd", 2, [2, 4])
    assert (row.status, row.attempt, message.status) == ("running", 2, "streaming")
