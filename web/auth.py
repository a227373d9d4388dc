"""Who is asking: a bearer token (API users) or a signed session cookie (browser guests)."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
import uuid
from urllib.parse import urlparse

from flask import g, request, session
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from models.exceptions import ForbiddenOrigin, Unauthorized
from models.tables import User


def check_origin(allowed: tuple[str, ...]) -> None:
    """Refuse cross-site WebSockets and writes: browsers attach the session cookie to them.

    The Origin header decides when present. Without it, a browser's Fetch Metadata still
    tells a cross-site request (``Sec-Fetch-Site: cross-site`` or ``same-site``, a sibling
    subdomain); requests with neither (curl, API clients) are not cross-site requests."""
    origin = request.headers.get("Origin")
    if origin:
        if urlparse(origin).netloc == request.host or origin in allowed:
            return
        raise ForbiddenOrigin(f"origin {origin} may not do this on {request.host}")
    site = request.headers.get("Sec-Fetch-Site")
    if site in ("cross-site", "same-site"):
        raise ForbiddenOrigin(f"a {site} request may not do this on {request.host}")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenCache:
    """Bearer token hashes this process has seen lately, with their user IDs: a thousand API
    viewers attaching at once each paid a SQL query for the same token (a fifth of the web
    process's CPU). Only tokens that exist are kept, for ``ttl_s``; relay has no way to
    revoke a token yet, and when it has one, a revoked token stops working here within
    ``ttl_s``. A plain dict: one small map does not need a cache library."""

    def __init__(self, ttl_s: float = 30.0, max_size: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_size = max_size
        self._entries: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def get(self, token_hash: str) -> str | None:
        entry = self._entries.get(token_hash)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def put(self, token_hash: str, user_id: str) -> None:
        with self._lock:
            if len(self._entries) >= self.max_size:
                self._entries.clear()  # rare: more live tokens than this; start over
            self._entries[token_hash] = (user_id, time.monotonic() + self.ttl_s)


TOKENS = TokenCache()


def current_user_id(db: Session) -> str:
    """The caller's user ID; a first-time browser gets a new guest ID in its session cookie.

    The guest's row is written only when it first creates something (``ensure_user``).
    """
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        token_hash = hash_token(header[7:].strip())
        user_id = TOKENS.get(token_hash)
        if user_id is None:
            user_id = db.scalar(select(User.id).where(User.token_hash == token_hash))
            if user_id is None:
                raise Unauthorized("the bearer token is not valid")
            TOKENS.put(token_hash, user_id)
        g.user_row_exists = True  # an API user's row is made with its token
        return user_id
    uid = session.get("uid")
    if not isinstance(uid, str):
        uid = str(uuid.uuid4())
        session["uid"] = uid
        session.permanent = True
    return uid


def ensure_user(db: Session, uid: str) -> None:
    """Create the guest row the first time this user writes something. A new guest is
    counted against its address's limit first (a Redis call, before the write), and the
    row is inserted ignoring an existing one, so a new guest's parallel first posts do not
    race (two of them may both be counted)."""
    if g.get("user_row_exists"):
        return
    if db.scalar(select(User.id).where(User.id == uid)) is not None:
        return
    from web.ratelimit import check_new_guest
    from web.runtime import get_runtime

    check_new_guest(get_runtime())
    insert = sqlite_insert if db.get_bind().dialect.name == "sqlite" else pg_insert
    db.execute(insert(User).values(id=uid, kind="guest").on_conflict_do_nothing())


def create_api_user(db: Session, name: str) -> tuple[str, str]:
    """Create an API user; return (user id, bearer token). Only the token's hash is stored."""
    token = "rly_" + secrets.token_urlsafe(32)
    user = User(kind="api", name=name, token_hash=hash_token(token))
    db.add(user)
    db.commit()
    return user.id, token
