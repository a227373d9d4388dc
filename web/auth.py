"""Who is asking: a bearer token (API users) or a signed session cookie (browser guests)."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from urllib.parse import urlparse

from flask import request, session
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.exceptions import ForbiddenOrigin, Unauthorized
from models.tables import User


def check_origin(allowed: tuple[str, ...]) -> None:
    """Refuse cross-site WebSockets and writes: browsers attach the session cookie to them.

    Requests without an Origin header (curl, API clients) are not cross-site requests."""
    origin = request.headers.get("Origin")
    if not origin or urlparse(origin).netloc == request.host or origin in allowed:
        return
    raise ForbiddenOrigin(f"origin {origin} may not do this on {request.host}")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def current_user_id(db: Session) -> str:
    """The caller's user ID; a first-time browser gets a new guest ID in its session cookie.

    The guest's row is written only when it first creates something (``ensure_user``).
    """
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        token = header[7:].strip()
        # The whole row: it stays in the session, so ensure_user() needs no second query.
        user = db.scalar(select(User).where(User.token_hash == hash_token(token)))
        if user is None:
            raise Unauthorized("the bearer token is not valid")
        return user.id
    uid = session.get("uid")
    if not isinstance(uid, str):
        uid = str(uuid.uuid4())
        session["uid"] = uid
        session.permanent = True
    return uid


def ensure_user(db: Session, uid: str) -> None:
    """Create the guest row the first time this user writes something."""
    if db.get(User, uid) is None:
        db.add(User(id=uid, kind="guest"))
        db.flush()


def create_api_user(db: Session, name: str) -> tuple[str, str]:
    """Create an API user; return (user id, bearer token). Only the token's hash is stored."""
    token = "rly_" + secrets.token_urlsafe(32)
    user = User(kind="api", name=name, token_hash=hash_token(token))
    db.add(user)
    db.commit()
    return user.id, token
