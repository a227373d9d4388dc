"""Attaching to streams: the WebSocket endpoints and the SSE responses."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import closing, contextmanager

from flask import Flask, Response, request
from sqlalchemy.orm import Session

from models.exceptions import InvalidAfter, InvalidParameter, RelayError, StreamNotFound
from models.tables import TERMINAL_STREAM_STATUSES
from web import shutdown
from web.attach import Followed, Follower, Snapshot, load_snapshot
from web.auth import check_origin, current_user_id
from web.chats import StreamRef, latest_stream_ref, stream_ref
from web.errors import UNAVAILABLE_ERRORS, as_unavailable
from web.frames import Batch, Notice
from web.hub import DirectWrite
from web.instruments import ATTACHES, VIEWERS
from web.runtime import Runtime, get_runtime
from web.viewer import SocketViewer
from web.websocket import RelayServer, RelaySock

log = logging.getLogger("relay.web")
SSE_KEEPALIVE_S = 10.0
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
Resolver = Callable[[Session, str], StreamRef]


def parse_after(raw: str | None) -> int:
    """The client's last seen seq: a non-negative integer, 0 when absent."""
    if raw is None or raw == "":
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise InvalidAfter(f"after must be a non-negative integer, got {raw!r}") from None
    if value < 0:
        raise InvalidAfter(f"after must be a non-negative integer, got {raw!r}")
    return value


def parse_batch(raw: str | None) -> bool:
    """Whether the client asked for the batch form (``batch=1``)."""
    if raw in (None, "", "0", "false"):
        return False
    if raw in ("1", "true"):
        return True
    raise InvalidParameter(f"batch must be 1 or 0, got {raw!r}")


def nothing_after(rt: Runtime, stream: StreamRef, after: int) -> bool:
    """Check ``after`` against the stream; True when the client has already seen its end.
    SQL's ``last_seq`` never runs ahead of the log, so an ``after`` below it needs no look
    at Redis (a thousand viewers catching up from 0 cost no extra round trip)."""
    if after == 0 or after < stream.last_seq:
        return False  # from the start (a stream's first event is seq 1), or already valid
    last = max(rt.log.last_seq(stream.id), stream.last_seq)
    if after > last:
        raise InvalidAfter(f"after={after} is beyond the stream's last event (seq {last})")
    return stream.status in TERMINAL_STREAM_STATUSES and after == last


def follower(
    rt: Runtime, stream_id: str, wake: threading.Event, direct: DirectWrite | None = None
) -> Follower:
    def snapshot() -> Snapshot:
        with rt.sessions() as db:
            snap = load_snapshot(db, stream_id)
        if snap is None:
            raise StreamNotFound(f"stream {stream_id} disappeared")
        return snap

    return Follower(
        rt.log,
        rt.hub,
        rt.blocks,
        stream_id,
        snapshot,
        wake=wake,
        direct=direct,
        stale_ms=rt.settings.heartbeat_stale_s * 1000,
    )


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_response(
    rt: Runtime, stream: StreamRef, after: int, batched: bool = False, preface: str = ""
) -> Response:
    """Serve the events after ``after`` as Server-Sent Events (204 when nothing is left).
    ``preface``: SSE text that goes before the events (a streamed post's ``turn`` event);
    with one, nothing left is a 200 with the preface alone."""
    if nothing_after(rt, stream, after):
        if preface:
            return Response(preface, mimetype="text/event-stream", headers=SSE_HEADERS)
        return Response(status=204)
    wake = threading.Event()
    finished = stream.status in TERMINAL_STREAM_STATUSES
    events = follower(rt, stream.id, wake).follow(after, finished)
    ATTACHES.labels("sse", "resume" if after else "new").inc()
    log.info("stream=%s attach transport=sse after=%d", stream.id, after)
    idle_s = min(rt.settings.idle_tick_s, SSE_KEEPALIVE_S)
    return Response(
        _sse_body(events, batched, wake, idle_s, preface),
        mimetype="text/event-stream",
        headers=SSE_HEADERS,
    )


def snapshot_response(text: str, message_id: str) -> Response:
    """The seed's fallback: a finished answer as one chunk plus ``done``."""
    body = (
        f"id: 1\nevent: chunk\ndata: {json.dumps({'type': 'chunk', 'seq': 1, 'text': text})}\n\n"
        f"id: 2\nevent: done\ndata: "
        f"{json.dumps({'type': 'done', 'seq': 2, 'messageId': message_id})}\n\n"
    )
    return Response(body, mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse_body(
    events: Followed,
    batched: bool,
    wake: threading.Event,
    idle_s: float,
    preface: str = "",
) -> Iterator[str]:
    yield "retry: 1000\n\n" + preface
    VIEWERS.labels("sse").inc()
    with closing(events), _finally(VIEWERS.labels("sse").dec):
        try:
            yield from _sse_events(events, batched, wake, idle_s)
        except UNAVAILABLE_ERRORS as exc:
            # The status line is long sent: end the response (not a server error). The
            # EventSource reconnects with Last-Event-ID and gets 503 while it lasts.
            log.warning("sse ended: backend unavailable (%s)", type(exc).__name__)
            yield f": {as_unavailable(exc).message}\n\n"


def _sse_events(
    events: Followed,
    batched: bool,
    wake: threading.Event,
    idle_s: float,
) -> Iterator[str]:
    # Going away: the EventSource reconnects (to another process) with Last-Event-ID.
    yield from sse_frames(events, lambda batch: batch.sse_text(batched), wake, idle_s)


def sse_frames(
    events: Followed,
    encode: Callable[[Batch | Notice], str],
    wake: threading.Event,
    idle_s: float,
) -> Generator[str, None, bool]:
    """A follower's batches as SSE text (``encode``; empty text is skipped), with a
    keepalive comment when nothing was written for SSE_KEEPALIVE_S. Returns True when it
    stopped because this process is going away, False at the end of the events."""
    last_write = time.monotonic()
    for batch in events:
        now = time.monotonic()
        if shutdown.going_away():
            return True
        if batch is None:
            if now - last_write >= SSE_KEEPALIVE_S:
                last_write = now
                yield ": keepalive\n\n"
            wake.wait(idle_s)  # the follower has nothing: until the hub has something
            continue
        text = encode(batch)
        if text:
            last_write = now
            yield text
    return False


@contextmanager
def _finally(action: Callable[[], None]) -> Iterator[None]:
    try:
        yield
    finally:
        action()


# -- WebSocket -------------------------------------------------------------------------------


def serve_socket(ws: RelayServer, resolve: Resolver) -> None:
    """Validate, then stream events to the socket until the terminal event (close 1000)."""
    rt = get_runtime()
    try:
        check_origin(rt.settings.allowed_origins)
        after = parse_after(request.args.get("after"))
        batched = parse_batch(request.args.get("batch"))
        with rt.sessions() as db:
            uid = current_user_id(db)
            stream = resolve(db, uid)
        if nothing_after(rt, stream, after):
            ws.close(CLOSE_NORMAL, "stream already ended")
            return
    except RelayError as exc:
        ws.close(exc.ws_close, exc.message[:120])
        return
    ATTACHES.labels("ws", "resume" if after else "new").inc()
    VIEWERS.labels("ws").inc()
    log.info("stream=%s attach transport=ws after=%d", stream.id, after)
    # The socket's readability (or its reader thread) sets ws.event: the follower and the
    # hub share it. While the viewer waits, the hub writes new batches itself (direct).
    viewer = follower(rt, stream.id, ws.event, direct=ws.direct_writer(batched))
    events = viewer.follow(after, stream.status in TERMINAL_STREAM_STATUSES)
    SocketViewer(rt, ws, uid, viewer, batched, events).run()


def _chat_latest(chat_id: str) -> Resolver:
    def resolve(db: Session, uid: str) -> StreamRef:
        return latest_stream_ref(db, uid, chat_id)

    return resolve


def _stream_by_id(stream_id: str) -> Resolver:
    def resolve(db: Session, uid: str) -> StreamRef:
        return stream_ref(db, uid, stream_id)

    return resolve


def init_app(app: Flask) -> None:
    sock = RelaySock(app)

    @sock.route("/api/v1/streams/<stream_id>/ws")
    def stream_socket(ws: RelayServer, stream_id: str) -> None:
        _guarded(ws, _stream_by_id(stream_id))

    @sock.route("/api/v1/chats/<chat_id>/ws")
    def chat_socket(ws: RelayServer, chat_id: str) -> None:
        _guarded(ws, _chat_latest(chat_id))


def _guarded(ws: RelayServer, resolve: Resolver) -> None:
    try:
        serve_socket(ws, resolve)
    except RelayError as exc:  # raised while streaming, e.g. a bad client message
        ws.close(exc.ws_close, exc.message[:120])
    except UNAVAILABLE_ERRORS as exc:
        log.warning("socket ended: backend unavailable (%s)", type(exc).__name__)
        unavailable = as_unavailable(exc)  # 1013: the client retries later, after=<last>
        ws.close(unavailable.ws_close, unavailable.message[:120])
