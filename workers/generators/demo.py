"""The offline demo generator: deterministic, paced, multi-sentence answers about the prompt.

Seeded by the stream ID and the prompt, so the same stream always produces the same text:
that is what lets a new attempt continue a partial answer exactly where the last one stopped.

Directives in the prompt (demo only, off with RELAY_DEMO_DIRECTIVES=0):
``[demo:words=N]`` answer length, ``[demo:rate=N]`` chunks per second,
``[demo:continue-rate=N]`` chunks per second when continuing a partial answer (a retry; default
the rate), ``[demo:fail-after=N]`` raise after N chunks, ``[demo:echo]`` answer with the prompt
verbatim.
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
# Words that do not name a topic: function words and the verbs questions are made of.
_STOPWORDS = frozenset(
    """a about after all also an and any are as at be been best but by can could did do does
    doing explain for from get give good happen happens have help how i if in into is it its
    just know let like make makes me more most my need no not of on or our please should so
    some survive tell than that the their them then there these they this to use used using
    very want was way we well were what when where which who why will with work works would
    you your""".split()  # noqa: SIM905 - a word list reads better as text
)
# What {b} can be besides the prompt's own phrases, so a sentence never pairs a topic with itself.
_RELATED = ("the failure modes", "the data you keep", "the people using it", "the cost")
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
    """The prompt's topic phrases: runs of up to three consecutive content words, in order."""
    phrases: dict[str, None] = {}
    run: list[str] = []
    for word in [*re.findall(r"[A-Za-z][A-Za-z'-]*", prompt), "."]:
        low = word.lower()
        if len(low) > 2 and low not in _STOPWORDS and len(run) < 3:
            run.append(low)
            continue
        if run:
            phrases.setdefault(" ".join(run), None)
        run = [low] if len(low) > 2 and low not in _STOPWORDS else []
    return list(phrases) or ["this topic", "the details"]


def compose(prompt: str, seed: str, words: int) -> str:
    """A deterministic Markdown answer of about ``words`` words about the prompt."""
    rng = random.Random(hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest())
    terms = keywords(prompt)
    topic = terms[0]

    def fill(template: str) -> str:
        a = rng.choice(terms)
        b = rng.choice([t for t in (*terms, *_RELATED) if t != a])
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
        rate = float(found.get("rate", self.chunks_per_second))
        if request.partial:
            rate = float(found.get("continue-rate", rate))
        rate = max(0.5, min(rate, 1000.0))
        fail_after = found.get("fail-after")
        pieces = chunk(text, request.stream_id)
        for n, piece in enumerate(remaining(pieces, request.partial), start=1):
            time.sleep(1.0 / rate)
            if fail_after is not None and n > fail_after:
                raise GenerationError(f"demo generator failed after {fail_after} chunks on request")
            yield piece
