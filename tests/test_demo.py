"""The offline demo generator: deterministic, about the prompt, able to continue."""

from __future__ import annotations

import pytest

from models.exceptions import GenerationError
from workers.generators import GenerationRequest, Turn
from workers.generators.demo import DemoGenerator, chunk, parse_directives, remaining


def request(prompt: str, sid: str = "sid-1", partial: str = "") -> GenerationRequest:
    return GenerationRequest(sid, (Turn("user", prompt),), partial=partial)


def test_same_stream_same_answer_and_it_is_about_the_prompt() -> None:
    gen = DemoGenerator(chunks_per_second=1000)
    a = "".join(gen.generate(request("How do lighthouses work?")))
    b = "".join(gen.generate(request("How do lighthouses work?")))
    assert a == b
    assert "lighthouses" in a.lower()
    assert a.count(".") >= 3  # several sentences
    other = "".join(gen.generate(request("How do lighthouses work?", sid="sid-2")))
    assert other != a


def test_continuation_yields_exactly_the_rest() -> None:
    gen = DemoGenerator(chunks_per_second=1000)
    full = "".join(gen.generate(request("Tell me about tides")))
    for cut in (0, 1, 17, len(full) // 2, len(full) - 1):
        rest = "".join(gen.generate(request("Tell me about tides", partial=full[:cut])))
        assert full[:cut] + rest == full


def test_continuation_refuses_text_it_did_not_write() -> None:
    gen = DemoGenerator(chunks_per_second=1000)
    with pytest.raises(GenerationError) as info:
        list(gen.generate(request("Tell me about tides", partial="Something else")))
    assert info.value.code == "cannot_continue"


def test_directives() -> None:
    text, found = parse_directives("echo this [demo:echo] [demo:words=12]")
    assert text == "echo this" and found == {"echo": 1, "words": 12}
    gen = DemoGenerator(chunks_per_second=1000)
    assert "".join(gen.generate(request("<b>hi</b> [demo:echo]"))) == "<b>hi</b>"
    pieces = gen.generate(request("x [demo:fail-after=3]"))
    assert [next(pieces) for _ in range(3)]
    with pytest.raises(GenerationError):
        next(pieces)
    off = DemoGenerator(chunks_per_second=1000, directives=False)
    assert "".join(off.generate(request("[demo:echo]"))) != "[demo:echo]"


def test_chunks_and_remaining() -> None:
    pieces = chunk("abcdefghij", "seed")
    assert "".join(pieces) == "abcdefghij"
    assert all(1 <= len(p) <= 6 for p in pieces)
    assert "".join(remaining(pieces, "abcd")) == "efghij"


def test_a_continuation_goes_at_its_own_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """``continue-rate`` paces only an attempt that continues a partial answer (a retry)."""
    pauses: list[float] = []
    monkeypatch.setattr("workers.generators.demo.time.sleep", pauses.append)
    gen = DemoGenerator(chunks_per_second=30)
    prompt = "Tell me about tides [demo:words=40] [demo:rate=20] [demo:continue-rate=400]"
    full = "".join(gen.generate(request(prompt)))
    assert set(pauses) == {1 / 20}
    pauses.clear()
    rest = "".join(gen.generate(request(prompt, partial=full[:30])))
    assert full[:30] + rest == full and set(pauses) == {1 / 400}
    pauses.clear()
    "".join(gen.generate(request("Tell me about tides [demo:rate=20]", partial="")))
    assert set(pauses) == {1 / 20}
