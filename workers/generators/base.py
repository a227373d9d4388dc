"""The generator plugin interface: turn a conversation into a stream of text pieces."""

from __future__ import annotations

from collections.abc import Generator as PyGenerator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Turn:
    role: str  # user | assistant
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """What a generator gets: the whole conversation and any text already streamed."""

    stream_id: str
    history: tuple[Turn, ...]
    # Text already in the log from an earlier attempt: continue after it, never repeat it.
    partial: str = ""
    options: dict[str, str] = field(default_factory=dict)

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
        Closing the iterator (``.close()``) must release any upstream resource at once.
        """
        ...
