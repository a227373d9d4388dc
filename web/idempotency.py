"""``Idempotency-Key`` on POSTs: a retried request gets the first one's answer, and starts
nothing new (a double submit from a flaky network must not start, and bill, two answers).

Per user, for 24 h, in Redis (shared by every web process): the first request claims the key
(``SET NX``) with the digest of its body; once answered, the key holds the response. A
request with the key while the first is still being answered gets 409
``idempotency_in_progress`` (retry shortly); with another body, 422
``idempotency_key_reused``. A first request that fails releases the key, so the retry runs.

POST /api/v1/chat stores its JSON answer (``answer_once``, or ``run_once`` when the answer
goes out as the turn's events); the AI SDK's send stores the stream it started and answers a
repeat with that stream from its start (``claim``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from flask import Response, jsonify, request

from models import keys
from models.exceptions import BadRequest, IdempotencyInProgress, IdempotencyKeyReused
from models.redisconn import RedisClient

TTL_S = 24 * 3600
HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_CHARS = 255

Answer = tuple[dict[str, Any], int]
# An answer and whether it is the first request's, replayed.
Outcome = tuple[dict[str, Any], int, bool]


def requested_key() -> str | None:
    """The request's Idempotency-Key: 1-255 printable ASCII characters, or absent."""
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not 0 < len(key) <= MAX_KEY_CHARS or not key.isascii() or not key.isprintable():
        raise BadRequest(f"{HEADER} must be 1-{MAX_KEY_CHARS} printable ASCII characters")
    return key


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Claim:
    """This request holds the key: ``store`` its answer once it has one, ``release`` the key
    if it started nothing (so the retry runs)."""

    def __init__(self, client: RedisClient, slot: str, body_digest: str) -> None:
        self.client = client
        self.slot = slot
        self.body_digest = body_digest

    def store(self, body: dict[str, Any], status: int) -> None:
        record = {"body": self.body_digest, "status": status, "response": body}
        self.client.set(self.slot, json.dumps(record), ex=TTL_S)

    def release(self) -> None:
        self.client.delete(self.slot)


def claim(client: RedisClient, user_id: str, key: str) -> Claim | Answer:
    """Claim ``key`` for this request (a ``Claim``), or, when this user used it before with
    the same body, the first request's stored answer. 409 while the first request is still
    being answered; 422 for another body."""
    slot = keys.idempotency_key(user_id, _digest(key.encode()))
    body_digest = _digest(request.get_data())
    if client.set(slot, json.dumps({"body": body_digest}), nx=True, ex=TTL_S):
        return Claim(client, slot, body_digest)
    return _recorded(client.get(slot), body_digest)


def run_once(
    client: RedisClient, user_id: str, key: str | None, produce: Callable[[], Answer]
) -> Outcome:
    """``produce()``'s answer, or, for a key this user used before, the first answer
    (``replayed``): the caller renders it (JSON, or the turn's events on the response)."""
    if key is None:
        body, status = produce()
        return body, status, False
    claimed = claim(client, user_id, key)
    if not isinstance(claimed, Claim):
        return claimed[0], claimed[1], True
    try:
        body, status = produce()
    except BaseException:
        claimed.release()  # nothing was started: let the retry run
        raise
    claimed.store(body, status)
    return body, status, False


def answer_once(
    client: RedisClient, user_id: str, key: str | None, produce: Callable[[], Answer]
) -> tuple[Response, int]:
    """``produce()``'s JSON answer, or, for a key this user used before, the first answer."""
    body, status, replayed = run_once(client, user_id, key, produce)
    response = jsonify(body)
    if replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return response, status


def _recorded(raw: Any, body_digest: str) -> Answer:
    if raw is None:  # expired between the two calls: rare; the client retries
        raise IdempotencyInProgress("the request with this Idempotency-Key just expired; retry")
    record = json.loads(raw)
    if record["body"] != body_digest:
        raise IdempotencyKeyReused(f"this {HEADER} was used with a different request body")
    if "response" not in record:
        raise IdempotencyInProgress(f"a request with this {HEADER} is still being answered")
    return record["response"], int(record["status"])
