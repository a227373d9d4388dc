"""The pooled transport of the OpenAI-compatible provider (``RELAY_OPENAI_TRANSPORT=urllib3``,
the default): urllib3's connection pool and chunked-body reader under relay's SSE parser and
``json.loads`` per chunk (openai_stream.py).

Why urllib3 rather than httpx for the stream: its chunked body is read by ``http.client``'s
buffered reader (the size line is one ``readline`` in C), where httpx goes through httpcore
and h11's state machine in Python for every HTTP chunk, and a streamed answer is one HTTP
chunk per token. Per chunk, paced as a model streams, the worker spends about half the CPU
(``bench.openai_parse``; docs/providers.md "Streaming cost"). It keeps what the httpx
transport gives: connections kept for the next answer (a body read to its end goes back to
the pool), TLS verified against certifi's bundle unless ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``
say otherwise (as httpx does), ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY`` /
``NO_PROXY``, redirects, the same request, and errors raised as the ``openai`` package's own
exception types (so retries and viewer-facing error codes are decided in one place).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Generator, Iterator, Mapping
from typing import Any

import certifi
import httpx
import openai
import urllib3
from urllib3.exceptions import MaxRetryError, NewConnectionError
from urllib3.exceptions import TimeoutError as PoolTimeout

from models.settings import Settings
from ops.geventfix import start_background
from workers.generators.base import GenerationRequest
from workers.generators.openai_stream import (
    LIMITS,
    Event,
    SSEParser,
    chunks,
    completions_url,
    drain_for_reuse,
    request_body,
    request_headers,
    status_error,
    texts,
)

READ_SIZE = 65536  # a read of a body that is not chunked returns what has arrived, up to this
MAX_ERROR_BODY = 1 << 20  # what is read of a non-2xx answer's body for its error
# No retries here (the generator retries, knowing whether text was streamed); redirects
# followed as httpx follows them (at most 20; 303 becomes a GET, 307 and 308 keep the POST).
RETRIES = urllib3.Retry(
    total=None, connect=0, read=0, status=0, other=0, redirect=20, raise_on_status=False
)
# Headers of an error body that urllib3 has already decoded and de-chunked.
_BODY_FRAMING = {"content-encoding", "content-length", "transfer-encoding"}


class Urllib3Transport:
    """Stream chat completions through a urllib3 pool, reading each chunk as a plain dict."""

    def __init__(self, settings: Settings) -> None:
        self.url = completions_url(settings)
        self.headers = {**request_headers(settings), "Content-Type": "application/json"}
        self.timeout = settings.openai_timeout_s
        self.pool = pool_manager(self.url, self.timeout, os.environ)
        self.silences = Silences(self.timeout)
        self.request = httpx.Request("POST", self.url)  # named in the SDK's errors

    def stream(
        self, request: GenerationRequest, params: dict[str, Any]
    ) -> Generator[str, None, None]:
        """Yield the answer's pieces from one upstream request."""
        # As httpx and the official client encode it: compact, UTF-8 as is.
        body = json.dumps(
            request_body(params), ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode()
        try:
            response = self.pool.urlopen(
                "POST", self.url, body=body, headers=self.headers, preload_content=False,
                pool_timeout=self.timeout,
            )  # fmt: skip
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise sdk_error(exc, self.request) from exc
        request.abort.on_abort(lambda: hang_up(response))
        silence = self.silences.watch(response)
        try:
            stream = events(response, silence)
            try:
                if not 200 <= response.status < 300:
                    raise status_error(as_httpx(response, self.request))
                finished = yield from texts(chunks(stream, self.request), request.report)
            except (urllib3.exceptions.HTTPError, OSError) as exc:  # also reading an error
                if silence.expired:
                    raise openai.APITimeoutError(self.request) from exc
                raise sdk_error(exc, self.request) from exc
            if not finished and not request.abort.requested:
                if silence.expired:
                    raise openai.APITimeoutError(self.request)
                # The connection closed before the model said it was done: a cut answer.
                raise openai.APIConnectionError(
                    message="the stream ended without a finish_reason", request=self.request
                )
            drain_for_reuse(stream)
        finally:
            self.silences.forget(silence)
            # A body read to its end has gone back to the pool already. Otherwise (also on
            # .close() of this generator) the connection closes, which stops the tokens,
            # and its place in the pool is given back.
            response.close()
            response.release_conn()


class Silence:
    """One open response's last read (``time.monotonic()``), and whether it was hung up for
    being silent too long."""

    __slots__ = ("expired", "last", "response")

    def __init__(self, response: urllib3.BaseHTTPResponse) -> None:
        self.response = response
        self.last = time.monotonic()
        self.expired = False


class Silences:
    """The read timeout of every open response of a transport, kept by one sweeper.

    urllib3 gives the socket a timeout for the connect and the response's headers. For the
    body that timeout is taken off and this keeps the same limit instead: once a second (or a
    quarter of the limit, if shorter) it hangs up each response that has read nothing for
    ``timeout`` seconds, and the reader raises the SDK's timeout error. Under gevent a socket
    timeout costs a ``Timeout`` armed and cancelled around every wait for a byte, one per
    token of every answer: 17 % of the worker's CPU per chunk read (bench.upstream_read).
    The sweeper runs only while a response is open."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.period = max(0.01, min(1.0, timeout / 4))
        self._open: set[Silence] = set()
        self._lock = threading.Lock()
        self._sweeping = False

    def watch(self, response: urllib3.BaseHTTPResponse) -> Silence:
        """Keep ``response``'s body to the limit from now on (its socket without a timeout)."""
        silence = Silence(response)
        conn = response.connection
        sock = getattr(conn, "sock", None) if conn is not None else None
        # No socket on the connection: http.client gave it to the response, whose body ends
        # with the connection ("Connection: close"); urllib3's per-read timeout stays there.
        if sock is None:
            return silence
        try:
            sock.settimeout(None)  # urllib3 sets it again for the connection's next request
        except OSError:  # closed under us: the read fails at once, no limit to keep
            return silence
        with self._lock:
            self._open.add(silence)
            start, self._sweeping = not self._sweeping, True
        if start:
            start_background(self._sweep, "relay-upstream-silences")
        return silence

    def forget(self, silence: Silence) -> None:
        with self._lock:
            self._open.discard(silence)

    def _sweep(self) -> None:
        while True:
            time.sleep(self.period)
            with self._lock:
                if not self._open:
                    self._sweeping = False
                    return
                open_now = list(self._open)
            now = time.monotonic()
            for silence in open_now:
                if not silence.expired and now - silence.last >= self.timeout:
                    silence.expired = True
                    hang_up(silence.response)


def pool_manager(url: str, timeout: float, environ: Mapping[str, str]) -> Any:
    """The pool for ``url``: through the proxy the environment names for it, if any."""
    options: dict[str, Any] = {
        "maxsize": LIMITS.max_connections,
        "block": True,  # at most that many at once (waiting up to the timeout), as httpx
        "timeout": urllib3.Timeout(connect=timeout, read=timeout),
        "retries": RETRIES,
        "ca_certs": environ.get("SSL_CERT_FILE") or certifi.where(),
        "ca_cert_dir": environ.get("SSL_CERT_DIR") or None,
    }
    proxy = env_proxy(url, environ)
    if proxy is None:
        return urllib3.PoolManager(**options)
    if urllib.parse.urlsplit(proxy).scheme not in ("http", "https"):
        raise ValueError(
            f"the {proxy.split(':', 1)[0]} proxy in the environment is not supported by "
            "RELAY_OPENAI_TRANSPORT=urllib3 (http and https proxies are)"
        )
    return urllib3.ProxyManager(proxy, **options)


def env_proxy(url: str, environ: Mapping[str, str]) -> str | None:
    """The proxy for ``url`` from ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY`` (either
    case), unless ``NO_PROXY`` exempts its host: the rules httpx and requests follow."""
    proxies = {
        name[:-6].lower(): value
        for name, value in environ.items()
        if value and name.lower().endswith("_proxy")
    }
    split = urllib.parse.urlsplit(url)
    host = split.hostname or ""
    # The standard library's NO_PROXY rules (what requests uses; not in typeshed).
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if not proxies or bypass(host, proxies):
        return None
    return proxies.get(split.scheme) or proxies.get("all")


def events(response: urllib3.BaseHTTPResponse, silence: Silence) -> Iterator[Event]:
    """Yield the server-sent events of a streamed response (each read noted in ``silence``)."""
    parser = SSEParser()
    for raw in body_pieces(response):
        silence.last = time.monotonic()
        yield from parser.feed(raw)
    yield from parser.end()


def body_pieces(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """The body as it arrives: HTTP chunk by HTTP chunk, or whatever a read returns."""
    if (
        response.chunked
        and isinstance(response, urllib3.HTTPResponse)
        and response.supports_chunked_reads()
    ):
        yield from response.read_chunked()
        return
    while piece := response.read1(READ_SIZE):
        yield piece


def hang_up(response: urllib3.BaseHTTPResponse) -> None:
    """End a streamed response from any thread, at once: a read blocked on a silent model
    wakes (urllib3's ``shutdown``), and the reader then closes the connection, which the
    upstream sees. Nothing to do once the response is done."""
    with contextlib.suppress(ValueError, RuntimeError, OSError):
        response.shutdown()


def as_httpx(response: urllib3.BaseHTTPResponse, request: httpx.Request) -> httpx.Response:
    """A non-2xx answer as the SDK's errors take it (read whole, up to MAX_ERROR_BODY)."""
    content = response.read(MAX_ERROR_BODY)
    headers = [(k, v) for k, v in response.headers.items() if k.lower() not in _BODY_FRAMING]
    return httpx.Response(response.status, headers=headers, content=content, request=request)


def sdk_error(exc: BaseException, request: httpx.Request) -> openai.APIConnectionError:
    """urllib3's failure as the SDK's: a timeout, or a connection error."""
    reason = exc.reason if isinstance(exc, MaxRetryError) and exc.reason is not None else exc
    # NewConnectionError subclasses ConnectTimeoutError in urllib3: a refusal is no timeout.
    timeout = isinstance(reason, PoolTimeout | TimeoutError)
    if timeout and not isinstance(reason, NewConnectionError):
        return openai.APITimeoutError(request)
    return openai.APIConnectionError(message=f"{type(reason).__name__}: {reason}", request=request)
