"""The OpenAPI document (web/openapi.py) stays true: it describes every route of the app with
the same methods and nothing else, it is valid OpenAPI 3.1, and real responses of a live
stack (a sample of each kind, errors included) have a documented status, content type and
body. tests/test_schemathesis.py fuzzes every operation on top of this."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator

from models.settings import Settings
from ops.httperrors import CODES as GUNICORN_CODES
from tests.client import Client, wait_for
from tests.conftest import Stack
from web import create_app
from web.openapi import PATH, document

AUTOMATIC = {"HEAD", "OPTIONS"}  # Flask answers these for every rule; not listed
METHODS = ("get", "put", "post", "delete", "patch")
AI = "/api/v1/ai-sdk/chat"
SHORT = "[demo:words=5]"


def openapi_path(rule: str) -> str:
    """A Flask rule as an OpenAPI path: ``<chat_id>`` (or ``<path:x>``) becomes ``{chat_id}``."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return document(Settings())


def test_every_route_is_described_with_its_methods_and_nothing_else(
    doc: dict[str, Any],
) -> None:
    app = create_app({"secret_key": "test", "database_url": "sqlite://"})
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        methods = {m.lower() for m in (rule.methods or set()) - AUTOMATIC}
        routes.setdefault(openapi_path(rule.rule), set()).update(methods)
    described = {path: {m for m in item if m in METHODS} for path, item in doc["paths"].items()}
    missing = {p: sorted(m - described.get(p, set())) for p, m in routes.items()}
    extra = {p: sorted(m - routes.get(p, set())) for p, m in described.items()}
    assert not {p: m for p, m in missing.items() if m}, "routes the document does not describe"
    assert not {p: m for p, m in extra.items() if m}, "operations the app does not have"


def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    OpenAPIV31SpecValidator(doc).validate()
    Draft202012Validator.check_schema(doc["components"]["schemas"]["Error"])
    ids = [op["operationId"] for item in doc["paths"].values() for op in operations(item)]
    assert len(ids) == len(set(ids))
    for item in doc["paths"].values():  # every operation says what a server error looks like
        for op in operations(item):
            assert "500" in op["responses"], op["operationId"]


def test_every_code_an_error_response_names_is_an_error_code(doc: dict[str, Any]) -> None:
    """A response narrowed to codes ErrorCode lacks can never validate: each code it names
    must be in the enum, and so must every code gunicorn's own refusals carry."""
    enum = set(doc["components"]["schemas"]["ErrorCode"]["enum"])
    named: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            code = node.get("properties", {}).get("error", {}).get("properties", {}).get("code")
            if isinstance(code, dict) and "enum" in code:
                named.update(code["enum"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert named, "no narrowed error responses found"
    assert named - enum == set()
    assert set(GUNICORN_CODES.values()) - enum == set()


def test_the_document_follows_the_settings() -> None:
    settings = Settings(max_message_chars=99, allowed_models=("big",), list_page_size=7)
    built = document(settings)
    schemas, params = built["components"]["schemas"], built["components"]["parameters"]
    assert schemas["PostChat"]["properties"]["message"]["maxLength"] == 99
    assert schemas["Model"]["enum"] == ["big", "demo", None]
    assert params["Limit"]["schema"]["maximum"] == 7


def operations(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
    return (op for method, op in item.items() if method in METHODS)


# -- live responses against the document ------------------------------------------------------


class Checker:
    """Checks a real response against the operation the document gives for it."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.seen: set[tuple[str, str, str]] = set()

    def check(self, path: str, method: str, resp: requests.Response) -> Any:
        """Status documented, content type documented, body valid; returns the body."""
        op = self.doc["paths"][path][method]
        status = str(resp.status_code)
        assert status in op["responses"], (path, method, status, resp.text[:300])
        self.seen.add((path, method, status))
        pointer = f"#/paths/{escape(path)}/{method}/responses/{status}"
        response = op["responses"][status]
        if "$ref" in response:
            pointer = response["$ref"]
            response = self.resolve(pointer)
        content = response.get("content")
        if content is None:
            assert resp.content == b"", (path, status, resp.content[:200])
            return None
        media = resp.headers["Content-Type"].split(";")[0].strip()
        assert media in content, (path, method, status, media)
        for name, header in response.get("headers", {}).items():
            header = self.resolve(header["$ref"]) if "$ref" in header else header
            assert not header.get("required") or name in resp.headers, (path, status, name)
        schema_pointer = f"{pointer}/content/{escape(media)}/schema"
        if media == "application/json":
            body = resp.json()
            self.validate(schema_pointer, body)
            return body
        if media == "text/event-stream":
            events = sse_events(resp.text)
            for event in events:
                self.validate(schema_pointer, event)
            return events
        return resp.text

    def resolve(self, pointer: str) -> Any:
        node: Any = self.doc
        for part in pointer.removeprefix("#/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def validate(self, pointer: str, instance: Any) -> None:
        """Validate against the schema at ``pointer``, with the document as the root (so
        ``#/components/...`` references resolve); an SSE ``data`` field that names a
        ``contentSchema`` is parsed and validated too."""
        Draft202012Validator({**self.doc, "$ref": pointer}).validate(instance)
        target = self.resolve(pointer)
        target = self.resolve(target["$ref"]) if "$ref" in target else target
        for branch in target.get("oneOf", []):  # the branch the instance matched
            branch = self.resolve(branch["$ref"]) if "$ref" in branch else branch
            if Draft202012Validator({**self.doc, **branch}).is_valid(instance):
                target = branch
                break
        data_schema = target.get("properties", {}).get("data", {})
        branches = data_schema.get("anyOf", [data_schema])
        content = [b["contentSchema"] for b in branches if "contentSchema" in b]
        if content and isinstance(instance, dict) and instance.get("data") != "[DONE]":
            assert len(content) == 1
            ref = content[0]["$ref"]
            Draft202012Validator({**self.doc, "$ref": ref}).validate(json.loads(instance["data"]))

    def error(self, path: str, method: str, resp: requests.Response, code: str) -> None:
        body = self.check(path, method, resp)
        assert body["error"]["code"] == code, body


def escape(path: str) -> str:
    return path.replace("~", "~0").replace("/", "~1")


def sse_events(text: str) -> list[dict[str, Any]]:
    """The event blocks of an SSE body, as schemathesis reads them (``data`` joined, the
    default ``event`` is ``message``); blocks without data (``retry:``) are skipped."""
    events: list[dict[str, Any]] = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        data: list[str] = []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "retry":
                fields["retry"] = int(value)
            else:
                fields[name] = value
        if data:
            events.append({"event": "message", **fields, "data": "\n".join(data)})
    return events


@pytest.fixture
def checker(stack: Stack) -> Checker:
    served = requests.get(stack.base_url + PATH, timeout=10)
    assert served.status_code == 200
    served_doc: dict[str, Any] = served.json()
    OpenAPIV31SpecValidator(served_doc).validate()
    return Checker(served_doc)


def test_chat_responses_match_the_document(client: Client, checker: Checker) -> None:
    c = checker
    posted = c.check("/api/v1/chat", "post", post(client, {"message": f"Hi {SHORT}"}))
    sid, cid = posted["streamId"], posted["chatId"]
    client.wait_status(sid, {"done"})
    c.check("/api/v1/chats", "get", client.request("GET", "/api/v1/chats"))
    c.check("/api/v1/chats", "get", client.request("GET", "/api/v1/chats?limit=1"))
    chat = c.check("/api/v1/chats/{chat_id}", "get", client.request("GET", f"/api/v1/chats/{cid}"))
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant"]
    stream = c.check(
        "/api/v1/streams/{stream_id}", "get", client.request("GET", f"/api/v1/streams/{sid}")
    )
    events = c.check(
        "/api/v1/streams/{stream_id}/events",
        "get",
        client.request("GET", f"/api/v1/streams/{sid}/events?batch=1"),
    )
    assert events[-1]["event"] == "done" and events[-1]["id"] == str(stream["lastSeq"])
    ended = client.request("GET", f"/api/v1/streams/{sid}/events?after={stream['lastSeq']}")
    c.check("/api/v1/streams/{stream_id}/events", "get", ended)
    assert ended.status_code == 204
    resumed = c.check("/api/v1/chat", "get", client.request("GET", f"/api/v1/chat?chatId={cid}"))
    assert resumed is None or [e["event"] for e in resumed] == ["chunk", "done"]
    cancel = client.request("POST", f"/api/v1/streams/{sid}/cancel")
    c.error("/api/v1/streams/{stream_id}/cancel", "post", cancel, "stream_finished")
    accept = {"Accept": "text/event-stream"}
    streamed = c.check("/api/v1/chat", "post", post(client, {"message": f"Hi {SHORT}"}, **accept))
    assert streamed[0]["event"] == "turn" and streamed[-1]["event"] == "done"
    resuming = post(client, {"message": "x"}, **accept, **{"Last-Event-ID": "2"})
    c.error("/api/v1/chat", "post", resuming, "invalid_after")
    regenerated = client.request(
        "POST", f"/api/v1/chats/{cid}/regenerate", headers={"Accept": "text/event-stream"}
    )
    turn = c.check("/api/v1/chats/{chat_id}/regenerate", "post", regenerated)[0]
    sid = json.loads(turn["data"])["streamId"]
    running = post(client, {"message": "Long [demo:words=400]", "chatId": cid})
    new_sid = c.check("/api/v1/chat", "post", running)["streamId"]
    busy = post(client, {"message": "Again", "chatId": cid})
    c.error("/api/v1/chat", "post", busy, "chat_busy")
    cancelled = client.request("POST", f"/api/v1/streams/{new_sid}/cancel")
    assert c.check("/api/v1/streams/{stream_id}/cancel", "post", cancelled)["status"] in (
        "cancelling",
        "cancelled",
    )
    client.wait_status(new_sid, {"cancelled"})
    gone = client.request("DELETE", f"/api/v1/chats/{cid}")
    c.check("/api/v1/chats/{chat_id}", "delete", gone)
    assert gone.status_code == 204
    again = client.request("GET", f"/api/v1/chats/{cid}")
    c.error("/api/v1/chats/{chat_id}", "get", again, "chat_not_found")


def post(client: Client, body: Any, **headers: str) -> requests.Response:
    return client.request("POST", "/api/v1/chat", json=body, headers=headers)


def test_error_responses_match_the_document(client: Client, checker: Checker) -> None:
    c = checker
    raw = client.request("POST", "/api/v1/chat", data=b"not json")
    c.error("/api/v1/chat", "post", raw, "invalid_json")
    c.error("/api/v1/chat", "post", post(client, {"message": "  "}), "invalid_message")
    c.error("/api/v1/chat", "post", post(client, {"message": "x", "chatId": ""}), "bad_request")
    c.error(
        "/api/v1/chat",
        "post",
        post(client, {"message": "x", "model": "gpt-9"}),
        "model_not_allowed",
    )
    c.error("/api/v1/chat", "post", post(client, {"message": "x" * 32_001}), "message_too_large")
    missing = post(client, {"message": "x", "chatId": str(uuid.uuid4())})
    c.error("/api/v1/chat", "post", missing, "chat_not_found")
    key = f"k-{uuid.uuid4()}"
    c.check("/api/v1/chat", "post", post(client, {"message": SHORT}, **{"Idempotency-Key": key}))
    replayed = post(client, {"message": SHORT}, **{"Idempotency-Key": key})
    c.check("/api/v1/chat", "post", replayed)
    assert replayed.headers["Idempotent-Replayed"] == "true"
    reused = post(client, {"message": "other"}, **{"Idempotency-Key": key})
    c.error("/api/v1/chat", "post", reused, "idempotency_key_reused")
    origin = post(client, {"message": "x"}, Origin="https://evil.example")
    c.error("/api/v1/chat", "post", origin, "forbidden_origin")
    bearer = client.request("GET", "/api/v1/chats", headers={"Authorization": "Bearer nope"})
    c.error("/api/v1/chats", "get", bearer, "unauthorized")
    # A Unicode digit passed str.isdigit() and then int() raised: a 500.
    for limit in ("\u00b2", "0", "x", "-1", "100000"):
        bad = client.request("GET", "/api/v1/chats", params={"limit": limit})
        c.error("/api/v1/chats", "get", bad, "bad_request")
    c.error("/api/v1/chat", "get", client.request("GET", "/api/v1/chat"), "bad_request")
    nowhere = client.request("GET", f"/api/v1/chat?chatId={uuid.uuid4()}")
    c.error("/api/v1/chat", "get", nowhere, "chat_not_found")
    long_id = "x" * 65
    c.error(
        "/api/v1/streams/{stream_id}",
        "get",
        client.request("GET", f"/api/v1/streams/{long_id}"),
        "not_found",
    )
    c.error(
        "/api/v1/streams/{stream_id}",
        "get",
        client.request("GET", f"/api/v1/streams/{uuid.uuid4()}"),
        "stream_not_found",
    )
    sid = client.post_chat(f"Events {SHORT}")["streamId"]
    events = "/api/v1/streams/{stream_id}/events"
    c.error(events, "get", client.request("GET", f"/api/v1/streams/{sid}/events?after=x"),
            "invalid_after")  # fmt: skip
    c.error(events, "get", client.request("GET", f"/api/v1/streams/{sid}/events?after=999999"),
            "invalid_after")  # fmt: skip
    c.error(events, "get", client.request("GET", f"/api/v1/streams/{sid}/events?batch=2"),
            "invalid_parameter")  # fmt: skip
    plain = client.request("GET", f"/api/v1/streams/{sid}/ws")  # no upgrade
    c.error("/api/v1/streams/{stream_id}/ws", "get", plain, "bad_request")
    # An upgrade without Sec-WebSocket-Key / -Version was a 500 (wsproto's protocol error).
    for extra in ({}, {"Sec-WebSocket-Version": "13"}, {"Sec-WebSocket-Version": "8"}):
        upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", **extra}
        broken = client.request("GET", f"/api/v1/streams/{sid}/ws", headers=upgrade)
        c.error("/api/v1/streams/{stream_id}/ws", "get", broken, "bad_request")
    # gunicorn answers these before relay reads the request (ops/httperrors.py); a fuzzed
    # query string found the 414's code missing from ErrorCode.
    long_line = client.request("GET", "/api/v1/chats?" + "limit=5&" * 600)
    c.error("/api/v1/chats", "get", long_line, "request_uri_too_large")
    long_header = client.request("GET", "/api/v1/chats", headers={"X-Long": "x" * 9000})
    c.error("/api/v1/chats", "get", long_header, "request_header_fields_too_large")
    # 405 and an unknown URL are not operations; they still have the error shape.
    for resp, code in (
        (client.request("PUT", "/api/v1/chat"), "method_not_allowed"),
        (client.request("GET", "/api/v1/nowhere"), "not_found"),
    ):
        body = resp.json()
        c.validate("#/components/schemas/Error", body)
        assert body["error"]["code"] == code
    allow = client.request("PUT", "/api/v1/chat").headers["Allow"]  # was missing from 405s
    assert {"GET", "POST"} <= {m.strip() for m in allow.split(",")}


def test_ai_sdk_and_service_responses_match_the_document(client: Client, checker: Checker) -> None:
    c = checker
    chat = uuid.uuid4().hex
    body = {"id": chat, "messages": [{"role": "user", "parts": [{"type": "text", "text": SHORT}]}]}
    parts = c.check(AI, "post", client.request("POST", AI, json=body))
    assert parts[-1]["data"] == "[DONE]"
    c.check(AI + "/{chat}/messages", "get", client.request("GET", f"{AI}/{chat}/messages"))
    stop = client.request("POST", f"{AI}/{chat}/stop")
    assert c.check(AI + "/{chat}/stop", "post", stop)["status"] == "none"
    nothing = client.request("GET", f"{AI}/{uuid.uuid4().hex}/stream")
    c.check(AI + "/{chat}/stream", "get", nothing)
    assert nothing.status_code == 204
    c.error(AI, "post", client.request("POST", AI, json={"messages": []}), "bad_request")
    trigger = {**body, "trigger": "regenerate-message"}
    c.error(AI, "post", client.request("POST", AI, json=trigger), "unsupported_trigger")
    for path in ("/healthz", "/readyz", "/metrics", "/", PATH):
        c.check(path, "get", client.request("GET", path))


def test_a_deeply_nested_stop_body_is_read_as_none(client: Client, checker: Checker) -> None:
    """The stop body is optional: one nested past the JSON parser's limit was a 500."""
    deep = '{"messageId": ' + "[" * 5000 + "]" * 5000 + "}"
    resp = client.request("POST", f"{AI}/{uuid.uuid4().hex}/stop", data=deep.encode())
    assert checker.check(AI + "/{chat}/stop", "post", resp) == {"status": "none", "messageId": None}


def test_sse_of_a_running_answer_matches_the_document(client: Client, checker: Checker) -> None:
    posted = client.post_chat("Stream it [demo:words=40]")
    wait_for(lambda: client.stream(posted["streamId"])["status"] == "running")
    live = client.request("GET", f"/api/v1/chat?chatId={posted['chatId']}")
    events = checker.check("/api/v1/chat", "get", live)
    assert events[-1]["event"] == "done"
