"""An OpenAI-compatible chat-completions provider (OpenAI, vLLM, Ollama, llama.cpp server,
LM Studio, ...).

- Three transports (``openai_transport``): ``urllib3`` (default; openai_pool.py) and ``httpx``
  (openai_stream.py) read the event stream as plain dicts, urllib3 at about half httpx's CPU
  per chunk; ``sdk`` streams through the official ``openai`` package, which builds a pydantic
  model per chunk and costs several times more CPU per chunk.

- The conversation is sent whole, cut to the newest turns within ``history_max_chars``.
- Rate limits, 5xx, timeouts and dropped connections before the first piece of text are
  retried with exponential backoff; after text was streamed an error ends the stream (an
  admin ``streams retry`` continues it).
- Cancelling shuts the upstream connection down at once (``request.abort``), waking a read
  that waits on a silent model, so a cancelled answer stops costing tokens.
- A partial answer is continued by sending it as an assistant prefix, in the dialect the
  server understands (``openai_continuation``: vllm | prefix | trailing); with ``none`` the
  generator says it cannot continue and the worker ends such a stream ``failed``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Generator
from typing import Any, Protocol

import httpx
import openai
from openai import OpenAI

from models.exceptions import GenerationError
from models.settings import Settings
from workers.generators.base import GenerationRequest, Turn
from workers.generators.openai_pool import Urllib3Transport
from workers.generators.openai_stream import LIMITS, HttpxTransport, hang_up

log = logging.getLogger("relay.openai")
_KEYLIKE = re.compile(r"\b(sk|rk|pk)-[A-Za-z0-9_\-*]{6,}")
CONTINUATION_MODES = ("none", "vllm", "prefix", "trailing")
TRANSPORTS = ("urllib3", "httpx", "sdk")


class Transport(Protocol):
    """How one request goes upstream: a lean path (urllib3, httpx) or the official client."""

    def stream(
        self, request: GenerationRequest, params: dict[str, Any]
    ) -> Generator[str, None, None]:
        """Yield the answer's pieces from one upstream request; fill in ``request.report``."""
        ...


class SDKTransport:
    """Stream through the official client (one pydantic model per chunk)."""

    def __init__(self, settings: Settings) -> None:
        self.client = OpenAI(
            base_url=settings.openai_base_url or None,
            # Self-hosted servers often need no key; the client insists on one.
            api_key=settings.openai_api_key or "unused",
            timeout=settings.openai_timeout_s,
            max_retries=0,  # retried by the generator, which knows whether text was streamed
            http_client=openai.DefaultHttpxClient(limits=LIMITS),
        )

    def stream(
        self, request: GenerationRequest, params: dict[str, Any]
    ) -> Generator[str, None, None]:
        """Yield the answer's pieces from one upstream request."""
        stream = self.client.chat.completions.create(**params)
        request.abort.on_abort(lambda: hang_up(stream.response))
        finished = False
        try:
            for chunk in stream:
                if chunk.usage is not None:
                    request.report.prompt_tokens = chunk.usage.prompt_tokens
                    request.report.completion_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.finish_reason:
                        request.report.finish_reason = choice.finish_reason
                        finished = True
                    if choice.delta and choice.delta.content:
                        yield choice.delta.content
            if not finished and not request.abort.requested:
                # The connection closed before the model said it was done: a cut answer.
                raise httpx.RemoteProtocolError("the stream ended without a finish_reason")
        finally:
            stream.close()  # also on .close() of this generator: stop paying for tokens


class OpenAIChatGenerator:
    name = "openai"

    def __init__(self, settings: Settings) -> None:
        if settings.openai_continuation not in CONTINUATION_MODES:
            raise ValueError(
                f"RELAY_OPENAI_CONTINUATION must be one of {', '.join(CONTINUATION_MODES)}"
            )
        if settings.openai_transport not in TRANSPORTS:
            raise ValueError(f"RELAY_OPENAI_TRANSPORT must be one of {', '.join(TRANSPORTS)}")
        self.settings = settings
        self.supports_continuation = settings.openai_continuation != "none"
        kinds: dict[str, Callable[[Settings], Transport]] = {
            "urllib3": Urllib3Transport, "httpx": HttpxTransport, "sdk": SDKTransport,
        }  # fmt: skip
        self.transport: Transport = kinds[settings.openai_transport](settings)

    # -- request -----------------------------------------------------------------------------

    def messages(self, request: GenerationRequest) -> list[dict[str, Any]]:
        """The chat history to send: system prompt, newest turns that fit, any prefix."""
        out: list[dict[str, Any]] = []
        if self.settings.system_prompt:
            out.append({"role": "system", "content": self.settings.system_prompt})
        turns = trim(request.history, self.settings.history_max_chars)
        out += [{"role": t.role, "content": t.content} for t in turns]
        if request.partial:
            prefix: dict[str, Any] = {"role": "assistant", "content": request.partial}
            if self.settings.openai_continuation == "prefix":
                prefix["prefix"] = True  # DeepSeek / Mistral style
            out.append(prefix)
        return out

    def params(self, request: GenerationRequest) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": request.model or self.settings.model,
            "messages": self.messages(request),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.settings.max_output_tokens:
            params["max_tokens"] = self.settings.max_output_tokens
        if request.partial and self.settings.openai_continuation == "vllm":
            params["extra_body"] = {"continue_final_message": True, "add_generation_prompt": False}
        return params

    # -- streaming ---------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> Generator[str, None, None]:
        params = self.params(request)
        request.report.model = params["model"]
        attempt = 0
        while True:
            attempt += 1
            streamed = False
            try:
                for text in self.transport.stream(request, params):
                    if request.abort.requested:
                        return  # text read before the hang-up: nothing more after a cancel
                    streamed = True
                    yield text
                return
            except GenerationError:
                raise
            except Exception as exc:
                if request.abort.requested:
                    return  # the worker cancelled: closing the response raised here
                if streamed or not retriable(exc) or attempt > self.settings.openai_retries:
                    raise upstream_error(exc, streamed, self.settings.openai_api_key) from None
                delay = self.settings.openai_retry_backoff_s * 2 ** (attempt - 1)
                log.warning("stream=%s upstream %s; retry %d in %.1fs", request.stream_id,
                            type(exc).__name__, attempt, delay)  # fmt: skip
                time.sleep(delay)


def trim(history: tuple[Turn, ...], max_chars: int) -> list[Turn]:
    """The newest turns whose content fits in ``max_chars`` (the last one always)."""
    kept: list[Turn] = []
    used = 0
    for turn in reversed(history):
        if kept and used + len(turn.content) > max_chars:
            break
        kept.append(turn)
        used += len(turn.content)
    return list(reversed(kept))


def retriable(exc: Exception) -> bool:
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    return isinstance(exc, openai.APIConnectionError | httpx.TransportError)


def upstream_error(exc: Exception, streamed: bool, api_key: str) -> GenerationError:
    """A viewer-safe error: what went wrong upstream, never a secret."""
    code, detail = _classify(exc, streamed)
    return GenerationError(scrub(detail, api_key), code)


def _classify(exc: Exception, streamed: bool) -> tuple[str, str]:
    if isinstance(exc, openai.APIStatusError):
        code = "upstream_rate_limited" if exc.status_code == 429 else (
            "upstream_error" if exc.status_code >= 500 else "upstream_rejected")  # fmt: skip
        return code, f"the model provider answered {exc.status_code}: {_body_message(exc)}"
    if isinstance(exc, openai.APITimeoutError | httpx.TimeoutException):
        return "upstream_timeout", "the model provider did not answer in time"
    if isinstance(exc, openai.APIConnectionError | httpx.TransportError):
        return "upstream_disconnected", "the connection to the model provider was lost" + (
            " in the middle of the answer" if streamed else "")  # fmt: skip
    if isinstance(exc, openai.APIError):  # an error event in the stream, with its message
        return "upstream_error", f"the model provider reported an error: {_body_message(exc)}"
    return "upstream_error", f"the model provider's stream failed ({type(exc).__name__})"


def _body_message(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])[:300]
    return str(exc.message)[:300]


def scrub(text: str, api_key: str) -> str:
    if api_key:
        text = text.replace(api_key, "[redacted]")
    return _KEYLIKE.sub("[redacted]", text)
