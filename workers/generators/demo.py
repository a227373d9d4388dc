"""The offline demo generator: deterministic, paced, multi-sentence answers about the prompt.

Seeded by the stream ID and the prompt, so the same stream always produces the same text:
that is what lets a new attempt continue a partial answer exactly where the last one stopped.

Directives in the prompt (demo only, off with RELAY_DEMO_DIRECTIVES=0):
``[demo:words=N]`` answer length, ``[demo:rate=N]`` chunks per second,
``[demo:fail-after=N]`` raise after N chunks, ``[demo:echo]`` answer with the prompt verbatim.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from collections.abc import Generator, Iterator

from models.exceptions import GenerationError
from workers.generators.base import GenerationRequest

_DIRECTIVE = re.compile(r"\[demo:([a-z-]+)(?:=(\d+))?\]")
_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "can",
        "could",
        "do",
        "does",
        "for",
        "from",
        "have",
        "how",
        "i",
        "if",
        "in",
        "is",
        "it",
        "me",
        "my",
        "of",
        "on",
        "or",
        "please",
        "so",
        "tell",
        "that",
        "the",
        "this",
        "to",
        "was",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "about",
        "explain",
        "give",
        "some",
    ]
)
_OPENERS = (
    "Here is a short take on {topic}.",
    "Good question about {topic}.",
    "Let's think about {topic} step by step.",
    "{Topic} is worth looking at from a few angles.",
)
_SENTENCES = (
    "The first thing to notice about {a} is how much it depends on {b}.",
    "In practice, {a} works best when {b} is kept simple and observable.",
    "Many people start with {a}, then discover that {b} matters just as much.",
    "A useful rule of thumb: measure {a} before you change {b}.",
    "When {a} goes wrong, it is usually because {b} was assumed rather than checked.",
    "Think of {a} as a log of decisions, and of {b} as the reader of that log.",
    "The trade-off between {a} and {b} is mostly about latency versus durability.",
    "Small, repeatable experiments with {a} teach more than big rewrites of {b}.",
)
_BULLETS = (
    "**Start small** with {a}.",
    "**Write it down**: keep notes on {b}.",
    "**Check the edges**, where {a} meets {b}.",
    "**Measure** before and after every change to {a}.",
)
_CLOSERS = (
    "In short, {a} rewards patience and careful measurement.",
    "That should give you a solid starting point for {a}.",
    "If you want, ask a follow-up about {b} and we can go deeper.",
)


def parse_directives(prompt: str) -> tuple[str, dict[str, int]]:
    """Split ``[demo:...]`` directives out of a prompt."""
    found = {m.group(1): int(m.group(2) or 1) for m in _DIRECTIVE.finditer(prompt)}
    return _DIRECTIVE.sub("", prompt).strip(), found


def keywords(prompt: str) -> list[str]:
    words = re.findall(r"[A-Za-z][A-Za-z'-]{2,}", prompt)
    seen: dict[str, None] = {}
    for word in words:
        low = word.lower()
        if low not in _STOPWORDS:
            seen.setdefault(low, None)
    return list(seen) or ["this topic", "the details"]


def compose(prompt: str, seed: str, words: int) -> str:
    """A deterministic Markdown answer of about ``words`` words about the prompt."""
    rng = random.Random(hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest())
    terms = keywords(prompt)
    topic = " ".join(terms[:3])

    def fill(template: str) -> str:
        a, b = rng.choice(terms), rng.choice(terms)
        return template.format(topic=topic, Topic=topic.capitalize(), a=a, b=b)

    parts = [fill(rng.choice(_OPENERS))]
    count = len(parts[0].split())
    bullets_done = False
    while count < words:
        if not bullets_done and count > words // 2:
            bullets = [f"- {fill(b)}" for b in rng.sample(_BULLETS, 3)]
            parts.append("\n\n" + "\n".join(bullets) + "\n\n")
            bullets_done = True
            count += sum(len(b.split()) for b in bullets)
            continue
        sentence = fill(rng.choice(_SENTENCES))
        parts.append(" " + sentence if not parts[-1].endswith("\n") else sentence)
        count += len(sentence.split())
    closer = fill(rng.choice(_CLOSERS))
    parts.append(" " + closer if not parts[-1].endswith("\n") else closer)
    return "".join(parts)


def chunk(text: str, seed: str) -> list[str]:
    """Cut text into token-sized pieces (1 to 6 characters, often a word fragment)."""
    rng = random.Random(seed)
    pieces: list[str] = []
    i = 0
    while i < len(text):
        step = rng.randint(1, 6)
        pieces.append(text[i : i + step])
        i += step
    return pieces


def remaining(pieces: list[str], partial: str) -> Iterator[str]:
    """The pieces after ``partial``; a piece cut in the middle yields its tail."""
    done = 0
    for piece in pieces:
        end = done + len(piece)
        if end <= len(partial):
            done = end
            continue
        yield piece[max(0, len(partial) - done) :]
        done = end


class DemoGenerator:
    name = "demo"
    supports_continuation = True

    def __init__(
        self, chunks_per_second: float = 30.0, directives: bool = True, words: int = 90
    ) -> None:
        self.chunks_per_second = chunks_per_second
        self.directives = directives
        self.words = words

    def answer(self, request: GenerationRequest) -> tuple[str, dict[str, int]]:
        """The full answer text for a request, and the directives that shaped it."""
        prompt = request.prompt
        found: dict[str, int] = {}
        if self.directives:
            prompt, found = parse_directives(prompt)
        if "echo" in found:
            return prompt, found
        words = max(5, min(found.get("words", self.words), 20_000))
        return compose(prompt, request.stream_id, words), found

    def generate(self, request: GenerationRequest) -> Generator[str, None, None]:
        text, found = self.answer(request)
        if request.partial and not text.startswith(request.partial):
            raise GenerationError(
                "the partial answer does not match this generator's output", "cannot_continue"
            )
        rate = max(0.5, min(float(found.get("rate", self.chunks_per_second)), 1000.0))
        fail_after = found.get("fail-after")
        pieces = chunk(text, request.stream_id)
        for n, piece in enumerate(remaining(pieces, request.partial), start=1):
            time.sleep(1.0 / rate)
            if fail_after is not None and n > fail_after:
                raise GenerationError(f"demo generator failed after {fail_after} chunks on request")
            yield piece
