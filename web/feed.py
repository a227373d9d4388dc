"""The live feed endpoints: a user's open pages hear about their chats as things happen.

``GET /api/v1/feed/ws`` (WebSocket, one JSON text message per event) and
``GET /api/v1/feed/events`` (SSE, ``id:`` = seq) serve the user's feed (models/feed.py)
after ``after`` (SSE: or Last-Event-ID), then live, until the client leaves or the process
goes away (1001; SSE: the response ends, the EventSource reconnects). Without ``after``, or
from before what the feed keeps, the first event is ``{"type": "reset", "seq": n}``: reload
the chat list, then apply the events after ``n``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Generator, Iterator
from contextlib import closing

from flask import Blueprint, Flask, Response, current_app, request

from models.exceptions import BadRequest, RelayError
from models.feed import Feed, FeedPage, reset_event
from web import shutdown
from web.auth import check_origin, current_user_id
from web.errors import UNAVAILABLE_ERRORS, as_unavailable
from web.feedhub import FeedHub
from web.runtime import Runtime, get_db, get_runtime
from web.streaming import CLOSE_GOING_AWAY, SSE_KEEPALIVE_S, parse_after
from web.websocket import RelayServer, RelaySock

log = logging.getLogger("relay.feed")
# What a follower yields: the JSON of the events to send now, or None (wait for ``wake``).
Texts = Generator[list[str] | None, None, None]
_hub_lock = threading.Lock()
READ_COUNT = 500  # events per catch-up read
bp = Blueprint("feed", __name__, url_prefix="/api/v1/feed")


def feed_hub(rt: Runtime) -> FeedHub:
    """The process's feed subscriber, created on first use (after gunicorn forked)."""
    with _hub_lock:
        hub: FeedHub | None = current_app.extensions.get("relay-feed")
        if hub is None:
            url = rt.settings.log_redis_url or rt.settings.redis_url
            hub = current_app.extensions["relay-feed"] = FeedHub(url, rt.log.redis)
            shutdown.on_begin(hub.wake_all)
        return hub


def parse_feed_after(raw: str | None) -> int | None:
    """The client's last seen feed seq; None when absent (start now, with a reset)."""
    return None if raw is None or raw == "" else parse_after(raw)


def follow(
    feed: Feed, hub: FeedHub, user_id: str, after: int | None, wake: threading.Event
) -> Texts:
    """Yield the feed's events after ``after`` once each, in seq order, then the live ones as
    they come; never waits (None: nothing now, resume after ``wake`` is set)."""
    watch = hub.watch(user_id, wake)
    try:
        texts, cursor = _read(feed, user_id, after, after or 0)
        yield texts
        while True:
            wake.clear()
            offered, reread = watch.take()
            texts = []
            if reread:
                texts, cursor = _read(feed, user_id, cursor, cursor)
            for seq, data in offered:
                if seq <= cursor:
                    continue  # already read from the feed
                if seq > cursor + 1:  # a gap: the feed fills it (this event included)
                    more, cursor = _read(feed, user_id, cursor, cursor)
                    texts += more
                    continue
                texts.append(data)
                cursor = seq
            yield texts or None
    finally:
        hub.unwatch(watch)


def _read(feed: Feed, user_id: str, after: int | None, cursor: int) -> tuple[list[str], int]:
    """Everything the feed has after ``after`` (a reset first when it cannot), and the new
    cursor (``cursor`` when nothing came)."""
    texts: list[str] = []
    while True:
        page: FeedPage = feed.read(user_id, after, READ_COUNT)
        if page.reset is not None:
            texts.append(reset_event(page.reset))
        texts += [data for _, data in page.events]
        if page.last is None:
            return texts, cursor
        cursor = after = page.last
        if page.reset is not None or len(page.events) < READ_COUNT:
            return texts, cursor


# -- WebSocket -------------------------------------------------------------------------------


def serve_socket(ws: RelayServer) -> None:
    rt = get_runtime()
    try:
        check_origin(rt.settings.allowed_origins)
        after = parse_feed_after(request.args.get("after"))
        with rt.sessions() as db:
            uid = current_user_id(db)
        events = follow(Feed(rt.log.redis), feed_hub(rt), uid, after, ws.event)
        first = next(events)  # the catch-up (Redis unreachable: raised here, 1013)
    except RelayError as exc:
        ws.close(exc.ws_close, exc.message[:120])
        return
    log.info("feed user=%s attach transport=ws after=%s", uid, after)
    with closing(events):
        _send(ws, first)
        ws.arm(ws.event.set)  # a client message (or its leaving) wakes the loop
        try:
            for texts in events:
                _read_client(ws)
                if shutdown.going_away():
                    ws.close(CLOSE_GOING_AWAY, "server restarting; reconnect with after=<last seq>")
                    return
                if texts is None:
                    ws.event.wait(min(ws.until_keepalive(), rt.settings.idle_tick_s))
                else:
                    _send(ws, texts)
        finally:
            ws.disarm()


def _send(ws: RelayServer, texts: list[str] | None) -> None:
    for text in texts or ():
        ws.send(text)


def _read_client(ws: RelayServer) -> None:
    """Take in what the client sent ({"type": "ping"} only); raises ConnectionClosed once it
    has gone, BadRequest for anything else."""
    for kind in ws.client_messages():
        if kind != "ping":
            raise BadRequest('the feed takes no messages but {"type": "ping"}')


# -- SSE -------------------------------------------------------------------------------------


@bp.get("/events")
def feed_events() -> Response:
    rt = get_runtime()
    db = get_db()
    after = parse_feed_after(request.headers.get("Last-Event-ID") or request.args.get("after"))
    uid = current_user_id(db)
    wake = threading.Event()
    events = follow(Feed(rt.log.redis), feed_hub(rt), uid, after, wake)
    first = next(events)  # Redis unreachable: 503 now, not a broken stream
    log.info("feed user=%s attach transport=sse after=%s", uid, after)
    idle_s = min(rt.settings.idle_tick_s, SSE_KEEPALIVE_S)
    return Response(
        _sse_body(first, events, wake, idle_s),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _sse_body(
    first: list[str] | None, events: Texts, wake: threading.Event, idle_s: float
) -> Iterator[str]:
    yield "retry: 1000\n\n"
    with closing(events):
        try:
            yield _sse_text(first)
            last_write = time.monotonic()
            for texts in events:
                if shutdown.going_away():
                    return  # the EventSource reconnects (to another process), Last-Event-ID
                if texts:
                    last_write = time.monotonic()
                    yield _sse_text(texts)
                    continue
                if time.monotonic() - last_write >= SSE_KEEPALIVE_S:
                    last_write = time.monotonic()
                    yield ": keepalive\n\n"
                wake.wait(idle_s)
        except UNAVAILABLE_ERRORS as exc:
            log.warning("feed sse ended: backend unavailable (%s)", type(exc).__name__)
            yield f": {as_unavailable(exc).message}\n\n"


def _sse_text(texts: list[str] | None) -> str:
    """Events as SSE messages (no ``event:`` line: every event is a ``message``)."""
    return "".join(f"id: {json.loads(t)['seq']}\ndata: {t}\n\n" for t in texts or ())


def init_app(app: Flask) -> None:
    sock = RelaySock(app)

    @sock.route("/api/v1/feed/ws")
    def feed_socket(ws: RelayServer) -> None:
        try:
            serve_socket(ws)
        except UNAVAILABLE_ERRORS as exc:
            log.warning("feed socket ended: backend unavailable (%s)", type(exc).__name__)
            unavailable = as_unavailable(exc)  # 1013: the client retries later, after=<last>
            ws.close(unavailable.ws_close, unavailable.message[:120])

    app.register_blueprint(bp)
