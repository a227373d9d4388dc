"""The generator plugin interface: turn a conversation into a stream of text pieces."""

from __future__ import annotations

import threading
from collections.abc import Callable
from collections.abc import Generator as PyGenerator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Turn:
    role: str  # user | assistant
    content: str


@dataclass
class GenerationReport:
    """What the provider said about the answer, filled in while generating."""

    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None  # stop | length | content_filter | ...


class Abort:
    """Lets the worker stop a generator from another thread (a cancel while it waits)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._closers: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def on_abort(self, closer: Callable[[], None]) -> None:
        """Run ``closer`` (e.g. close the upstream HTTP response) when aborted."""
        with self._lock:
            if not self._event.is_set():
                self._closers.append(closer)
                return
        closer()

    def abort(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            closers, self._closers = self._closers, []
        for closer in closers:
            closer()


@dataclass(frozen=True)
class GenerationRequest:
    """What a generator gets: the whole conversation and any text already streamed."""

    stream_id: str
    history: tuple[Turn, ...]
    # Text already in the log from an earlier attempt: continue after it, never repeat it.
    partial: str = ""
    model: str | None = None
    report: GenerationReport = field(default_factory=GenerationReport)
    abort: Abort = field(default_factory=Abort)

    @property
    def prompt(self) -> str:
        for turn in reversed(self.history):
            if turn.role == "user":
                return turn.content
        return ""


class Generator(Protocol):
    """A source of answer text. Implementations must be safe to call from worker threads."""

    name: str
    # True when generate() can continue a partial answer (request.partial) coherently.
    supports_continuation: bool

    def generate(self, request: GenerationRequest) -> PyGenerator[str, None, None]:
        """Yield the answer's text in pieces, starting after ``request.partial``.

        Raise models.exceptions.GenerationError with a viewer-safe message on failure.
        Closing the iterator (``.close()``) must release any upstream resource at once, and
        so must ``request.abort`` (called from another thread).
        """
        ...
