"""web.chats against real SQL and a real Redis: what the status endpoints build from both."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import store
from models.chunklog import ChunkLog
from models.db import make_engine, make_sessionmaker
from models.events import Event, error_event
from models.exceptions import ChatBusy
from models.tables import Chat, Message, Stream
from tests.conftest import guest_chat
from tests.test_store import make_stream
from web.chats import add_client_turn, add_turn, commit_turn, stream_json
from web.runtime import Runtime


class LogOnly:
    """The part of the web runtime ``stream_json`` reads: the chunk log."""

    def __init__(self, log: ChunkLog) -> None:
        self.log = log


@pytest.fixture
def sessions(database_url: str) -> Iterator[tuple[Session, Session]]:
    engine = make_engine(database_url)
    factory = make_sessionmaker(engine)
    with factory() as web, factory() as worker:
        yield web, worker
    engine.dispose()


def test_a_stream_that_ends_between_the_sql_read_and_the_log_read_shows_its_error(
    sessions: tuple[Session, Session], redis_client: redis.Redis
) -> None:
    """The endpoint reads the row, then the log's state. A worker that ends the stream in
    between (SQL first, then the terminal event) must not give ``failed`` with no error."""
    web, worker = sessions
    log = ChunkLog(redis_client)
    made = make_stream(worker)
    sid = made.id
    log.init(sid)
    attempt = log.claim(sid, "task", stale_after_s=30).attempt
    assert store.mark_running(worker, sid, made.message_id, attempt, "task")
    log.append(sid, attempt, Event(1, "chunk", text="Hi"))
    row = web.get(Stream, sid)  # the web tier's read: still running
    assert row is not None and row.status == "running"

    error = store.ErrorInfo("generation_failed", "the model went away")
    assert store.finalize(
        worker, sid, status="failed", text="Hi", layout=[2], attempt=attempt, error=error
    )
    log.append(sid, attempt, error_event(2, error.code, error.message))

    shown = stream_json(cast(Runtime, LogOnly(log)), row)
    assert shown["status"] == "failed"
    assert shown["error"] == {"code": "generation_failed", "message": "the model went away"}
    assert shown["finishedAt"] is not None and shown["lastSeq"] == 2


# -- the new turn: prebuilt Core statements, one transaction -------------------------------


def test_a_turn_is_written_whole_and_the_next_one_follows_it(
    sessions: tuple[Session, Session],
) -> None:
    """``add_turn`` writes nothing; ``commit_turn`` writes the chat, both messages and the
    stream in one transaction, with the ids the turn announced."""
    db, reader = sessions
    uid = guest_chat(db).user_id
    db.commit()
    first = add_turn(db, uid, None, "Hello there", "m1", 30)
    assert reader.get(Chat, first.chat_id) is None  # nothing written yet
    commit_turn(db, first)
    chat = reader.get(Chat, first.chat_id)
    assert chat is not None and (chat.user_id, chat.title) == (uid, "Hello there")
    assert first.new_chat
    second = add_turn(db, uid, first.chat_id, "And again", None, None)
    commit_turn(db, second)
    assert not second.new_chat and second.title == "Hello there"
    rows = reader.execute(
        select(Message.position, Message.role, Message.status, Message.content, Message.model)
        .where(Message.chat_id == first.chat_id)
        .order_by(Message.position)
    ).all()
    assert [tuple(r) for r in rows] == [
        (0, "user", "complete", "Hello there", None),
        (1, "assistant", "pending", "", "m1"),
        (2, "user", "complete", "And again", None),
        (3, "assistant", "pending", "", None),
    ]
    stream = reader.get(Stream, second.stream_id)
    assert stream is not None and stream.message_id == second.message_id
    assert (stream.status, stream.attempt, stream.last_seq) == ("queued", 0, 0)
    assert reader.get(Stream, first.stream_id).detach_after_s == 30  # type: ignore[union-attr]


def test_two_turns_racing_for_one_chat_the_second_commit_gets_chat_busy(
    sessions: tuple[Session, Session],
) -> None:
    """Two posts that both read the chat's end before either commits: the second commit
    collides on the message position, answers ChatBusy and writes none of its rows."""
    one, two = sessions
    uid = guest_chat(one).user_id
    one.commit()
    start = add_turn(one, uid, None, "Hi", None, None)
    commit_turn(one, start)
    first = add_turn(one, uid, start.chat_id, "first", None, None)
    second = add_turn(two, uid, start.chat_id, "second", None, None)
    commit_turn(one, first)
    with pytest.raises(ChatBusy):
        commit_turn(two, second)
    assert two.get(Stream, second.stream_id) is None
    assert two.get(Message, second.question_id) is None
    assert two.get(Stream, first.stream_id) is not None


def test_two_first_turns_racing_for_one_client_chat_id_the_second_gets_chat_busy(
    sessions: tuple[Session, Session],
) -> None:
    """The AI SDK's first posts of one chat id race to create it: one chat, one 409."""
    one, two = sessions
    uid = guest_chat(one).user_id
    one.commit()
    first = add_client_turn(one, uid, "client-chat", None, "first", None)
    second = add_client_turn(two, uid, "client-chat", None, "second", None)
    commit_turn(one, first)
    with pytest.raises(ChatBusy):
        commit_turn(two, second)
    chats = two.scalars(select(Chat).where(Chat.client_id == "client-chat")).all()
    assert [c.id for c in chats] == [first.chat_id]
