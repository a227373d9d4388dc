"""The OpenAI-compatible provider, through each transport (the lean urllib3 and httpx ones and
the real ``openai`` client), against a local server speaking the streaming protocol (over
HTTP and HTTPS, directly and through a proxy): in-process, and end to end through a real
worker.

In process, every behaviour runs on every transport. End to end, what depends on how a
transport waits under gevent (a cancel that closes the upstream under a blocked read, the
silence limit, a kept-alive or TLS connection) runs on every transport too; what the worker
does with a transport's answer (usage and history, odd text, a retried 429, an error event,
an admin's retry, a crash's continuation) runs on one each (``on``), spread so that every
transport has some of them: each is an isolated stack of its own, and three of each were a
tenth of the suite's time."""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import httpx_sse
import pytest
import trustme
import urllib3

from models.exceptions import GenerationError
from models.settings import Settings
from tests.client import chunk_text, read_rest, wait_for
from tests.conftest import Stack
from tests.fake_openai import ANSWER, BAD_STORED, FakeOpenAI, answer_for
from tests.procs import BIN, ROOT
from tests.tunnel_proxy import TunnelProxy
from workers.generators import GenerationRequest, Turn
from workers.generators.openai_chat import TRANSPORTS, OpenAIChatGenerator, trim
from workers.generators.openai_pool import env_proxy, pool_manager
from workers.generators.openai_stream import SSEParser, loads, sdk_env_headers

KEY = "sk-test-secret-0123456789"
MakeGenerator = Callable[..., OpenAIChatGenerator]


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Every behaviour holds for every transport."""
    return str(request.param)


@pytest.fixture
def generator(fake: FakeOpenAI, transport: str) -> MakeGenerator:
    def make(**overrides: object) -> OpenAIChatGenerator:
        settings = replace(
            Settings(), generator="openai", model="fake-ok", openai_base_url=fake.base_url,
            openai_api_key=KEY, openai_retry_backoff_s=0.01, system_prompt="Be brief.",
            openai_transport=transport,
        )  # fmt: skip
        return OpenAIChatGenerator(replace(settings, **overrides))  # type: ignore[arg-type]

    return make


def request(model: str = "fake-ok", partial: str = "") -> GenerationRequest:
    history = (Turn("user", "hi"), Turn("assistant", "hello"), Turn("user", "explain logs"))
    return GenerationRequest("sid", history, partial=partial, model=model)


# -- in process -------------------------------------------------------------------------------


def test_streams_the_answer_and_reports_usage(fake: FakeOpenAI, generator: MakeGenerator) -> None:
    req = request()
    assert "".join(generator().generate(req)) == ANSWER
    assert (req.report.finish_reason, req.report.prompt_tokens) == ("stop", 42)
    assert req.report.completion_tokens and req.report.model == "fake-ok"
    sent = fake.exchanges[0]
    assert sent.headers["Authorization"] == f"Bearer {KEY}"
    assert sent.body["stream"] is True and sent.body["stream_options"] == {"include_usage": True}
    assert [m["role"] for m in sent.body["messages"]] == ["system", "user", "assistant", "user"]
    assert sent.body["messages"][0]["content"] == "Be brief."


def test_the_body_is_compact_json_with_text_as_utf8(
    fake: FakeOpenAI, generator: MakeGenerator
) -> None:
    """Every transport encodes the request as the official client does: compact JSON, the
    conversation's text in UTF-8 as is (not as \\u escapes, which cost up to six bytes a
    character on long non-English histories)."""
    req = GenerationRequest("sid", (Turn("user", "Grüße, 世界 ✓"),), model="fake-ok")
    assert "".join(generator().generate(req)) == ANSWER
    raw = fake.exchanges[0].raw
    assert "Grüße, 世界 ✓".encode() in raw and b"\\u" not in raw
    assert raw == json.dumps(fake.exchanges[0].body, ensure_ascii=False,
                             separators=(",", ":")).encode()  # fmt: skip


def test_history_is_capped_to_the_newest_turns() -> None:
    turns = tuple(Turn("user", "x" * 10) for _ in range(5))
    assert len(trim(turns, 35)) == 3
    assert len(trim((Turn("user", "y" * 100),), 10)) == 1  # the latest turn always goes


def test_429_then_success_is_retried(fake: FakeOpenAI, generator: MakeGenerator) -> None:
    req = request("fake-429")
    assert "".join(generator().generate(req)) == ANSWER
    assert len(fake.exchanges) == 2


def test_persistent_5xx_gives_up_with_a_clear_error(
    fake: FakeOpenAI, generator: MakeGenerator
) -> None:
    with pytest.raises(GenerationError) as info:
        list(generator(openai_retries=2).generate(request("fake-500")))
    assert info.value.code == "upstream_error" and "500" in str(info.value)
    assert len(fake.exchanges) == 3


def test_errors_never_carry_the_api_key(fake: FakeOpenAI, generator: MakeGenerator) -> None:
    with pytest.raises(GenerationError) as info:
        list(generator().generate(request("fake-401")))
    assert info.value.code == "upstream_rejected"
    assert KEY not in str(info.value) and "[redacted]" in str(info.value)
    assert len(fake.exchanges) == 1  # a 4xx is not retried


def test_a_drop_after_text_is_not_retried(fake: FakeOpenAI, generator: MakeGenerator) -> None:
    pieces = []
    with pytest.raises(GenerationError) as info:
        for piece in generator().generate(request("fake-drop")):
            pieces.append(piece)
    assert info.value.code == "upstream_disconnected"
    assert len(pieces) == 10 and len(fake.exchanges) == 1


def test_abort_closes_the_upstream_connection(fake: FakeOpenAI, generator: MakeGenerator) -> None:
    req = request("fake-slow")
    pieces = generator().generate(req)
    assert next(pieces)
    req.abort.abort()  # what the worker does when a cancel arrives while it waits
    assert list(pieces) == []
    wait_for(lambda: fake.exchanges[0].disconnected, timeout=5)
    sent = fake.exchanges[0].chunks_sent
    assert sent < 100 and not fake.exchanges[0].completed


@pytest.mark.parametrize(
    ("mode", "extra"),
    [
        ("prefix", {"prefix": True}),
        ("trailing", {}),
        ("vllm", {}),
    ],
)
def test_continuation_sends_the_partial_as_an_assistant_prefix(
    fake: FakeOpenAI, generator: MakeGenerator, mode: str, extra: dict[str, object]
) -> None:
    gen = generator(openai_continuation=mode)
    assert gen.supports_continuation
    rest = "".join(gen.generate(request(partial=ANSWER[:50])))
    assert ANSWER[:50] + rest == ANSWER
    last = fake.exchanges[0].body["messages"][-1]
    assert last == {"role": "assistant", "content": ANSWER[:50], **extra}
    if mode == "vllm":
        assert fake.exchanges[0].body["continue_final_message"] is True
    assert not generator().supports_continuation  # "none", the default


def test_no_key_still_sends_a_bearer(fake: FakeOpenAI, generator: MakeGenerator) -> None:
    assert "".join(generator(openai_api_key="").generate(request())) == ANSWER
    assert fake.exchanges[0].headers["Authorization"] == "Bearer unused"


def test_an_error_event_mid_stream_ends_with_the_providers_message(
    fake: FakeOpenAI, generator: MakeGenerator
) -> None:
    pieces = []
    with pytest.raises(GenerationError) as info:
        for piece in generator().generate(request("fake-error")):
            pieces.append(piece)
    assert info.value.code == "upstream_error"
    assert "The server is overloaded" in str(info.value)
    assert KEY not in str(info.value) and "[redacted]" in str(info.value)
    assert len(pieces) == 10 and len(fake.exchanges) == 1


def test_a_stream_without_finish_reason_is_cut(fake: FakeOpenAI, generator: MakeGenerator) -> None:
    with pytest.raises(GenerationError) as info:
        list(generator().generate(request("fake-nofinish")))
    assert info.value.code == "upstream_disconnected"


@pytest.mark.parametrize("model", ["fake-crlf", "fake-cr"])
def test_any_line_ending_comments_fields_and_multi_line_data(
    fake: FakeOpenAI, generator: MakeGenerator, model: str
) -> None:
    req = request(model)
    assert "".join(generator().generate(req)) == ANSWER
    assert (req.report.finish_reason, req.report.prompt_tokens) == ("stop", 42)


def test_abort_wakes_a_reader_blocked_on_a_silent_upstream(
    fake: FakeOpenAI, generator: MakeGenerator
) -> None:
    assert_abort_wakes_the_reader(fake, generator(openai_timeout_s=30))


def assert_abort_wakes_the_reader(fake: FakeOpenAI, generator: OpenAIChatGenerator) -> None:
    """An abort from another thread (as the worker's heartbeat sends it) ends a read that
    waits on a silent model at once, and the upstream sees its connection close."""
    req = request("fake-silent")
    pieces = generator.generate(req)
    assert next(pieces)
    rest: list[list[str]] = []
    reader = threading.Thread(target=lambda: rest.append(list(pieces)))
    reader.start()
    time.sleep(0.3)  # the reader is now waiting for a byte that will not come
    started = time.monotonic()
    req.abort.abort()
    reader.join(timeout=5)
    assert rest == [[]] and time.monotonic() - started < 2  # not the 30 s read timeout
    wait_for(lambda: fake.exchanges[0].disconnected, timeout=2)


def test_a_model_silent_past_the_timeout_is_hung_up_as_a_timeout(
    fake: FakeOpenAI, generator: MakeGenerator
) -> None:
    """RELAY_OPENAI_TIMEOUT_S bounds the silence between reads of the body: the model that
    goes quiet after its first chunk (for 10 s, then ends without a finish) is hung up and
    the answer fails as a timeout, not as a cut answer once the model gives up."""
    pieces = generator(openai_timeout_s=1.0).generate(request("fake-silent"))
    assert next(pieces)
    with pytest.raises(GenerationError) as failed:
        list(pieces)
    assert failed.value.code == "upstream_timeout"
    wait_for(lambda: fake.exchanges[0].disconnected, timeout=5)


def test_a_model_quiet_less_than_the_timeout_each_time_is_read_to_the_end(
    fake: FakeOpenAI, generator: MakeGenerator
) -> None:
    """The limit is on each silence, not on the answer: 0.3 s pauses over about 2 s."""
    assert "".join(generator(openai_timeout_s=1.2).generate(request("fake-pauses"))) == ANSWER
    # Not hung up: the model wrote its body to the end (it notes that after the last write,
    # which may come after the reader has [DONE] and returned).
    wait_for(lambda: fake.exchanges[0].completed, timeout=5)


def test_closing_the_generator_closes_the_upstream_connection(
    fake: FakeOpenAI, generator: MakeGenerator
) -> None:
    pieces = generator().generate(request("fake-slow"))
    assert next(pieces)
    pieces.close()  # what the worker does when it stops reading
    wait_for(lambda: fake.exchanges[0].disconnected, timeout=5)
    assert not fake.exchanges[0].completed


def test_an_unknown_transport_refuses_to_start() -> None:
    with pytest.raises(ValueError, match="RELAY_OPENAI_TRANSPORT"):
        OpenAIChatGenerator(replace(Settings(), generator="openai", openai_transport="curl"))
    assert Settings.from_env({}).openai_transport == "urllib3"
    assert Settings.from_env({"RELAY_OPENAI_TRANSPORT": "httpx"}).openai_transport == "httpx"
    assert Settings.from_env({"RELAY_OPENAI_TRANSPORT": "sdk"}).openai_transport == "sdk"


# -- over TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_fake(ca: trustme.CA) -> Iterator[FakeOpenAI]:
    """The fake over HTTPS, with a certificate for 127.0.0.1 from a CA of the test's own."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF  # a client's hang-up reads as an end
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server = FakeOpenAI(tls=context).start()
    yield server
    server.stop()


@pytest.fixture
def trusting(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Trust the test's CA the way a deployment points at its own bundle: SSL_CERT_FILE."""
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    return bundle


def over_tls(fake: FakeOpenAI, transport: str, **overrides: object) -> OpenAIChatGenerator:
    settings = replace(
        Settings(), generator="openai", model="fake-ok", openai_base_url=fake.base_url,
        openai_api_key=KEY, openai_retry_backoff_s=0.01, openai_transport=transport,
    )  # fmt: skip
    return OpenAIChatGenerator(replace(settings, **overrides))  # type: ignore[arg-type]


@pytest.mark.usefixtures("trusting")
def test_tls_an_answer_streams_from_a_server_the_bundle_trusts(
    tls_fake: FakeOpenAI, transport: str
) -> None:
    assert "".join(over_tls(tls_fake, transport).generate(request())) == ANSWER
    wait_for(lambda: tls_fake.exchanges[0].completed, timeout=5)


@pytest.mark.usefixtures("trusting")
def test_tls_abort_wakes_a_reader_blocked_on_a_silent_upstream(
    tls_fake: FakeOpenAI, transport: str
) -> None:
    """The hang-up shuts a TLS socket down under a blocked read: the read ends at once."""
    assert_abort_wakes_the_reader(tls_fake, over_tls(tls_fake, transport, openai_timeout_s=30))


@pytest.mark.usefixtures("trusting")
def test_tls_through_the_proxy_the_environment_names(
    tls_fake: FakeOpenAI, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTPS_PROXY: the answer goes through the proxy's tunnel (CONNECT), end to end."""
    proxy = TunnelProxy().start()
    try:
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "https_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        assert "".join(over_tls(tls_fake, transport).generate(request())) == ANSWER
        port = tls_fake.base_url.split(":")[2].split("/")[0]
        assert proxy.tunnels == [f"127.0.0.1:{port}"]
    finally:
        proxy.stop()


def test_tls_a_certificate_from_an_unknown_authority_is_refused(
    tls_fake: FakeOpenAI, transport: str
) -> None:
    """Certificates are verified (against certifi's bundle, SSL_CERT_FILE being unset): the
    answer fails as a lost connection, and the model is never asked."""
    with pytest.raises(GenerationError) as info:
        "".join(over_tls(tls_fake, transport, openai_retries=0).generate(request()))
    assert info.value.code == "upstream_disconnected"
    assert tls_fake.exchanges == []


def test_the_pool_takes_the_proxy_the_environment_names() -> None:
    """HTTPS_PROXY / HTTP_PROXY / ALL_PROXY in either case, NO_PROXY exempting hosts (the
    rules httpx follows); a SOCKS proxy refuses to start with a clear reason."""
    url = "https://api.openai.com/v1/chat/completions"
    assert env_proxy(url, {}) is None
    assert env_proxy(url, {"HTTPS_PROXY": "http://proxy:3128"}) == "http://proxy:3128"
    assert env_proxy(url, {"https_proxy": "http://proxy:3128"}) == "http://proxy:3128"
    assert env_proxy(url, {"HTTP_PROXY": "http://proxy:3128"}) is None  # for http:// only
    assert env_proxy(url, {"ALL_PROXY": "http://all:1"}) == "http://all:1"
    both = {"HTTPS_PROXY": "http://proxy:3128", "ALL_PROXY": "http://all:1"}
    assert env_proxy(url, both) == "http://proxy:3128"
    for exempt in ("api.openai.com", ".openai.com", "openai.com", "*", "localhost,openai.com"):
        assert env_proxy(url, {"HTTPS_PROXY": "http://p:1", "NO_PROXY": exempt}) is None, exempt
    assert env_proxy(url, {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "example.com"})
    pooled = pool_manager(url, 5.0, {"HTTPS_PROXY": "http://proxy:3128"})
    assert isinstance(pooled, urllib3.ProxyManager)
    assert pooled.proxy is not None and pooled.proxy.host == "proxy"
    assert type(pool_manager(url, 5.0, {})) is urllib3.PoolManager
    with pytest.raises(ValueError, match="socks5 proxy"):
        pool_manager(url, 5.0, {"ALL_PROXY": "socks5://proxy:1080"})


# -- the SSE parser of the httpx transport ----------------------------------------------------

# Everything the event-stream format allows: LF, CRLF and CR line ends, comments, fields with
# and without a space, multi-line and empty data, ids, unknown fields, raw UTF-8 (U+2028 is no
# line end here, unlike in httpx's iter_lines), and a last event left unterminated.
TRICKY = (
    ": a comment\n\ndata: one\n\ndata:two\r\ndata:  three\r\n\r\n"
    'event: completion\rid: 5\rretry: 100\rdata: {"a":\r\rdata\n\n'
    "data: caf\u00e9 \u2028 \U0001f600\nfoo: bar\n\nevent: error\ndata: {}\n\n"
    "data: not finished"
).encode()
EXPECTED = [
    (b"", b"one"), (b"", b"two\n three"), (b"completion", b'{"a":'), (b"", b""),
    (b"", "caf\u00e9 \u2028 \U0001f600".encode()), (b"error", b"{}"),
]  # fmt: skip


def parse(pieces: list[bytes]) -> list[tuple[bytes, bytes]]:
    parser = SSEParser()
    return [event for piece in pieces for event in parser.feed(piece)] + parser.end()


def test_the_parser_reads_every_form_split_anywhere() -> None:
    assert parse([TRICKY]) == EXPECTED
    assert parse([TRICKY[i : i + 1] for i in range(len(TRICKY))]) == EXPECTED
    for cut in range(len(TRICKY)):
        assert parse([TRICKY[:cut], TRICKY[cut:]]) == EXPECTED, cut
    assert parse([b"data: x\r", b"\r"]) == [(b"", b"x")]  # a CR at the very end ends a line


def test_the_parser_agrees_with_httpx_sse() -> None:
    """The maintained library as the oracle (where it follows the standard)."""
    response = httpx.Response(200, headers={"Content-Type": "text/event-stream"}, content=TRICKY)
    theirs = [
        ((e.event if e.event != "message" else "").encode(), e.data.encode())
        for e in httpx_sse.EventSource(response).iter_sse()
    ]
    assert parse([TRICKY]) == theirs == EXPECTED


def test_the_parser_skips_keep_alives_after_an_id() -> None:
    """A comment-only block after an ``id:``, or an event with no data, is no event
    (httpx-sse and the official client emit empty ones, which then fail to parse as JSON)."""
    assert parse([b"id: 1\ndata: {}\n\n: ping\n\nevent: ping\n\n"]) == [(b"", b"{}")]


@pytest.mark.parametrize(
    "data",
    [
        b'{"choices":[{"delta":{"content":"caf\xc3\xa9 \\u00e9 \\ud83d\\ude00"}}]}',
        b'{"a":NaN,"b":-Infinity}',  # json reads these; orjson does not
        b'{"text":"\\ud800"}',  # a lone surrogate's escape
        b"[1, 2.5e3, null, true]",
    ],
)
def test_a_chunk_is_read_exactly_as_json_reads_it(data: bytes) -> None:
    got = loads(data)
    want = json.loads(data.decode())
    assert json.dumps(got) == json.dumps(want) and type(got) is type(want)


def test_an_integer_past_64_bits_is_read_as_a_float() -> None:
    """orjson's one difference from json that ``loads`` keeps: relay reads only strings and
    token counts from a chunk."""
    assert loads(b'{"n":123456789012345678901234567890}') == {"n": 1.2345678901234568e29}


@pytest.mark.parametrize("data", [b'{"a":', b"\xff\xfe", b"{'a': 1}", b""])
def test_a_chunk_json_does_not_read_is_refused_as_json_refuses_it(data: bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(data.decode())
    with pytest.raises(ValueError):
        loads(data)


def test_the_sdks_environment_headers_are_kept() -> None:
    env = {"OPENAI_ORG_ID": "org-1", "OPENAI_CUSTOM_HEADERS": "X-A: 1\nX-B:2"}
    assert sdk_env_headers(env) == {"OpenAI-Organization": "org-1", "X-A": "1", "X-B": "2"}


# -- end to end, through a real worker --------------------------------------------------------

OPENAI_ENV = {
    "RELAY_GENERATOR": "openai",
    "RELAY_MODEL": "fake-ok",
    "RELAY_ALLOWED_MODELS": (
        "fake-slow,fake-drop,fake-429,fake-length,fake-error,fake-keepalive,fake-badtext,"
        "fake-silent"
    ),
    "OPENAI_API_KEY": KEY,
    "RELAY_OPENAI_CONTINUATION": "prefix",
    "RELAY_OPENAI_RETRY_BACKOFF_S": "0.05",
}


def talking_to(stack: Stack, fake: FakeOpenAI, transport: str) -> Stack:
    """``stack``, whose workers (started by the test) talk to the fake through ``transport``."""
    stack.env["OPENAI_BASE_URL"] = fake.base_url
    stack.env["RELAY_OPENAI_TRANSPORT"] = transport
    return stack


@pytest.fixture
def openai_stack(isolated_stack: Stack, fake: FakeOpenAI, transport: str) -> Stack:
    return talking_to(isolated_stack, fake, transport)


pytestmark_e2e = pytest.mark.stack_env(**OPENAI_ENV)


def on(transport: str) -> pytest.MarkDecorator:
    """An end-to-end test of the worker's side, on one transport (the module's docstring)."""
    assert transport in TRANSPORTS
    return pytest.mark.parametrize("transport", [transport])


@pytestmark_e2e
@on("sdk")
def test_e2e_answer_usage_and_history(openai_stack: Stack, fake: FakeOpenAI) -> None:
    worker = openai_stack.start_worker("w1")
    client = openai_stack.client()
    first = client.post_chat("first question")
    assert client.attach(first["streamId"]).text == ANSWER
    second = client.post_chat("and another", chat_id=first["chatId"], model="fake-length")
    got = client.attach(second["streamId"])
    answer = client.answer(first["chatId"])
    assert answer["content"] == got.text == ANSWER[:60]
    assert answer["model"] == "fake-length" and answer["finishReason"] == "length"
    assert answer["usage"]["promptTokens"] == 42
    sent = [m["content"] for m in fake.exchanges[-1].body["messages"]]
    assert sent == ["first question", ANSWER, "and another"]  # the whole conversation
    assert KEY not in worker.output()


@pytestmark_e2e
@on("urllib3")
def test_e2e_a_model_sending_nul_and_lone_surrogates_is_stored(
    openai_stack: Stack, fake: FakeOpenAI
) -> None:
    """What UTF-8 (Redis) and PostgreSQL cannot hold does not break the worker's writes: a
    NUL and a lone surrogate become U+FFFD, a surrogate pair split over two chunks is joined;
    the viewer and the stored answer agree."""
    openai_stack.start_worker("w1")
    client = openai_stack.client()
    posted = client.post_chat("say something odd", model="fake-badtext")
    got = client.attach(posted["streamId"])
    assert got.last["type"] == "done", got.last
    answer = client.answer(posted["chatId"])
    assert got.text == answer["content"] == BAD_STORED
    assert answer["status"] == "complete"


@pytestmark_e2e
@pytest.mark.parametrize("lean", ["urllib3", "httpx"])
def test_e2e_the_next_answer_reuses_the_upstream_connection(
    isolated_stack: Stack, fake: FakeOpenAI, lean: str
) -> None:
    # The lean transports: the official client closes its response at [DONE], so it never
    # reuses one.
    stack = talking_to(isolated_stack, fake, lean)
    stack.start_worker("w1")
    client = stack.client()
    for question in ("first", "second"):
        posted = client.post_chat(question, model="fake-keepalive")
        assert client.attach(posted["streamId"]).text == ANSWER
    first, second = fake.exchanges
    assert first.completed and second.completed
    assert first.peer == second.peer  # one TCP connection: no new handshake for the second


@pytestmark_e2e
@pytest.mark.parametrize("lean", ["urllib3", "httpx"])
def test_e2e_over_tls_the_connection_is_kept_and_a_cancel_ends_it(
    isolated_stack: Stack, tls_fake: FakeOpenAI, trusting: Path, lean: str
) -> None:
    """A worker (gevent) talking HTTPS: the second answer goes over the first one's TLS
    connection, and a cancel shuts that connection down under the read that waits."""
    stack = talking_to(isolated_stack, tls_fake, lean)
    stack.env["SSL_CERT_FILE"] = str(trusting)
    stack.start_worker("w1")
    client = stack.client()
    for question in ("first", "second"):
        posted = client.post_chat(question, model="fake-keepalive")
        assert client.attach(posted["streamId"]).text == ANSWER
    posted = client.post_chat("a long one", model="fake-slow")
    seen = client.attach(posted["streamId"], until=lambda a: len(a.events) >= 5)
    client.request("POST", f"/api/v1/streams/{posted['streamId']}/cancel")
    first, second, slow = tls_fake.exchanges
    assert first.peer == second.peer == slow.peer  # one TLS connection, one handshake
    wait_for(lambda: slow.disconnected, timeout=10)
    rest = client.attach(posted["streamId"], after=seen.last["seq"])
    assert rest.last["type"] == "cancelled" and not slow.completed


@pytestmark_e2e
def test_e2e_unknown_model_is_rejected(isolated_stack: Stack) -> None:
    client = isolated_stack.client()  # the web tier answers: no worker, no transport
    resp = client.request("POST", "/api/v1/chat", json={"message": "hi", "model": "gpt-9"})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "model_not_allowed"
    assert client.get_json("/api/v1/chats")["chats"] == []


@pytestmark_e2e
@on("httpx")
def test_e2e_429_then_success(openai_stack: Stack, fake: FakeOpenAI) -> None:
    openai_stack.start_worker("w1")
    client = openai_stack.client()
    posted = client.post_chat("rate limited", model="fake-429")
    assert client.attach(posted["streamId"]).last["type"] == "done"
    assert len(fake.exchanges) == 2


@pytestmark_e2e
def test_e2e_cancel_closes_the_upstream_stream(openai_stack: Stack, fake: FakeOpenAI) -> None:
    openai_stack.start_worker("w1")
    client = openai_stack.client()
    posted = client.post_chat("a long one", model="fake-slow")
    seen = client.attach(posted["streamId"], until=lambda a: len(a.events) >= 5)
    client.request("POST", f"/api/v1/streams/{posted['streamId']}/cancel")
    wait_for(lambda: fake.exchanges[0].disconnected, timeout=10)
    sent_at_close = fake.exchanges[0].chunks_sent
    rest = client.attach(posted["streamId"], after=seen.last["seq"])
    assert rest.last["type"] == "cancelled"
    assert not fake.exchanges[0].completed
    assert sent_at_close < len(answer_for("fake-slow")) // 7 // 2
    assert client.answer(posted["chatId"])["content"] == seen.text + rest.text


@pytestmark_e2e
@on("sdk")
def test_e2e_error_event_reaches_the_viewer(openai_stack: Stack, fake: FakeOpenAI) -> None:
    worker = openai_stack.start_worker("w1")
    client = openai_stack.client()
    posted = client.post_chat("overload me", model="fake-error")
    got = client.attach(posted["streamId"])
    assert got.last["type"] == "error" and got.last["error"]["code"] == "upstream_error"
    assert "The server is overloaded" in got.last["error"]["message"]
    assert KEY not in got.last["error"]["message"] and KEY not in worker.output()
    assert got.text == ANSWER[:70] == client.answer(posted["chatId"])["content"]


@pytestmark_e2e
def test_e2e_a_model_silent_past_the_timeout_fails_the_answer_as_a_timeout(
    openai_stack: Stack, fake: FakeOpenAI
) -> None:
    """In a worker (gevent), the silence limit between reads still holds: the answer ends
    with upstream_timeout and what was streamed before it, and the model sees the hang-up."""
    openai_stack.env["RELAY_OPENAI_TIMEOUT_S"] = "1"
    openai_stack.start_worker("w1")
    client = openai_stack.client()
    posted = client.post_chat("say one thing", model="fake-silent")
    got = client.attach(posted["streamId"])
    assert got.last["type"] == "error" and got.last["error"]["code"] == "upstream_timeout"
    assert got.text == ANSWER[:7] == client.answer(posted["chatId"])["content"]
    wait_for(lambda: fake.exchanges[0].disconnected, timeout=5)


@pytestmark_e2e
@on("urllib3")
def test_e2e_upstream_drop_then_admin_retry_continues(
    openai_stack: Stack, fake: FakeOpenAI
) -> None:
    openai_stack.start_worker("w1")
    client = openai_stack.client()
    posted = client.post_chat("drop me", model="fake-drop")
    sid = posted["streamId"]
    first = client.attach(sid)
    assert first.last["type"] == "error"
    assert first.last["error"]["code"] == "upstream_disconnected"
    assert "lost in the middle of the answer" in first.last["error"]["message"]
    assert client.answer(posted["chatId"])["content"] == first.text
    # The provider recovers; the admin retries and the answer continues after the prefix.
    subprocess.run(
        [str(BIN / "python"), "-c",
         f"from models.db import make_engine\nfrom sqlalchemy import text\n"
         f"e = make_engine({openai_stack.env['DATABASE_URL']!r})\n"
         f"with e.begin() as c: c.execute(text(\"UPDATE messages SET model='fake-ok' "
         f"WHERE role='assistant'\"))"],
        env=openai_stack.env, cwd=ROOT, check=True,
    )  # fmt: skip
    subprocess.run(
        [str(BIN / "celery"), "-A", "workers", "streams", "retry", sid],
        env=openai_stack.env, cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    rest = client.attach(sid, after=first.last["seq"])
    assert rest.events[0]["type"] == "resumed" and rest.last["type"] == "done"
    events = first.events + rest.events
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert chunk_text(events) == ANSWER == client.answer(posted["chatId"])["content"]
    assert fake.exchanges[-1].body["messages"][-1] == {
        "role": "assistant", "content": first.text, "prefix": True,
    }  # fmt: skip


@pytestmark_e2e
@on("httpx")
def test_e2e_worker_crash_is_continued_with_a_prefix(openai_stack: Stack, fake: FakeOpenAI) -> None:
    first = openai_stack.start_worker("w1")
    client = openai_stack.client()
    posted = client.post_chat("crash in the middle", model="fake-slow")
    seen = client.attach(posted["streamId"], until=lambda a: len(a.events) >= 20)
    first.kill()
    openai_stack.start_worker("w2")
    events = read_rest(client, posted["streamId"], seen)
    assert events[-1]["type"] == "done"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert chunk_text(events) == answer_for("fake-slow")
    assert client.answer(posted["chatId"])["content"] == answer_for("fake-slow")


@pytest.mark.stack_env(**{**OPENAI_ENV, "RELAY_OPENAI_CONTINUATION": "none"})
@on("sdk")
def test_e2e_worker_crash_without_continuation_fails_clearly(
    openai_stack: Stack, fake: FakeOpenAI
) -> None:
    first = openai_stack.start_worker("w1")
    client = openai_stack.client()
    posted = client.post_chat("crash, no prefix support", model="fake-slow")
    seen = client.attach(posted["streamId"], until=lambda a: len(a.events) >= 20)
    first.kill()
    openai_stack.start_worker("w2")
    events = read_rest(client, posted["streamId"], seen)
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["code"] == "cannot_continue"
    answer = client.answer(posted["chatId"])
    assert answer["status"] == "failed" and answer["content"] == chunk_text(events)
